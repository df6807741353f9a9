"""Partition invariants: coverage, silos, minimum sizes, determinism, order independence, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfactory.data.partition import PartitionError, class_histogram, format_histogram, implied_cells, partition


def _labels(num_classes=10, per_class=30, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet"])
def test_every_index_assigned_exactly_once(scheme):
    labels = _labels()
    parts = partition(labels, scheme, 7, seed=3, classes_per_client=2, min_partition_size=5)
    assert len(parts) == 7
    _assert_cover(parts, len(labels))


def test_iid_sizes_are_near_equal():
    parts = partition(_labels(), "iid", 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_pathological_silos_hold_exactly_one_whole_class():
    labels = _labels()
    parts = partition(labels, "pathological", 10, seed=5, classes_per_client=1)
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, np.flatnonzero(labels == i))


def test_pathological_classes_per_client_and_even_split():
    labels = _labels(num_classes=10, per_class=40)
    hist = class_histogram(labels, partition(labels, "pathological", 6, seed=1, classes_per_client=3), 10)
    assert np.all((hist > 0).sum(axis=1) == 3)
    np.testing.assert_array_equal(hist.sum(axis=0), np.full(10, 40))
    for c in range(10):
        shares = hist[:, c][hist[:, c] > 0]
        assert shares.max() - shares.min() <= 1
    # More clients than classes: client i still starts from class i % C.
    hist = class_histogram(labels, partition(labels, "pathological", 20, seed=1), 10)
    np.testing.assert_array_equal(np.argmax(hist, axis=1), np.arange(20) % 10)


def test_dirichlet_respects_min_size_and_skews_with_small_alpha():
    labels = _labels(per_class=100)
    parts = partition(labels, "dirichlet", 5, seed=0, alpha=0.1, min_partition_size=20)
    assert min(len(p) for p in parts) >= 20
    skewed = class_histogram(labels, parts, 10)
    flat = class_histogram(labels, partition(labels, "dirichlet", 5, seed=0, alpha=1000.0), 10)
    assert skewed.std(axis=0).mean() > 3 * flat.std(axis=0).mean()


def test_natural_one_client_per_group_in_sorted_order():
    labels = _labels(num_classes=3, per_class=4)
    groups = np.array([7, 2, 7, 5] * 3)
    parts = partition(labels, "natural", 3, seed=0, groups=groups)
    for p, g in zip(parts, [2, 5, 7], strict=True):
        np.testing.assert_array_equal(p, np.flatnonzero(groups == g))
    with pytest.raises(PartitionError, match="data.num_clients=3"):
        partition(labels, "natural", 4, seed=0, groups=groups)
    with pytest.raises(PartitionError, match="groups"):
        partition(labels, "natural", 3, seed=0)


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet"])
def test_same_seed_same_result_other_seed_differs(scheme):
    labels = _labels()
    kwargs = dict(classes_per_client=2, min_partition_size=5)
    a = partition(labels, scheme, 6, seed=11, **kwargs)
    b = partition(labels, scheme, 6, seed=11, **kwargs)
    c = partition(labels, scheme, 6, seed=12, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _rank_sets(labels, parts):
    """Per client, the set of (class, rank of the row within its class) pairs."""
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange(np.count_nonzero(labels == c))
    return [set(zip(labels[p].tolist(), rank[p].tolist(), strict=True)) for p in parts]


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    num_clients=st.integers(1, 6),
    classes_per_client=st.integers(1, 5),
    scheme=st.sampled_from(["iid", "pathological", "dirichlet"]),
    seed=st.integers(0, 2**16),
    shuffle_seed=st.integers(0, 2**16),
)
def test_result_depends_only_on_class_counts(
    counts, num_clients, classes_per_client, scheme, seed, shuffle_seed
):
    labels = np.repeat(np.arange(len(counts)), counts)
    shuffled = np.random.default_rng(shuffle_seed).permutation(labels)
    kwargs = dict(classes_per_client=min(classes_per_client, len(counts)), alpha=1.0, min_partition_size=0)
    try:
        parts = partition(labels, scheme, num_clients, seed, **kwargs)
    except PartitionError:
        with pytest.raises(PartitionError):
            partition(shuffled, scheme, num_clients, seed, **kwargs)
        return
    parts_shuffled = partition(shuffled, scheme, num_clients, seed, **kwargs)
    _assert_cover(parts_shuffled, len(labels))
    assert _rank_sets(labels, parts) == _rank_sets(shuffled, parts_shuffled)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheme="random"), "iid, pathological, dirichlet, natural"),
        (dict(num_clients=0), "data.num_clients"),
        (dict(num_clients=301), "exceeds the 300 samples"),
        (dict(scheme="pathological", classes_per_client=0), "data.classes_per_client"),
        (dict(scheme="pathological", classes_per_client=11), "data.classes_per_client"),
        (dict(scheme="pathological", num_clients=3, classes_per_client=2), "cannot cover 10 classes"),
        (dict(scheme="dirichlet", alpha=0.0), "data.alpha"),
        (dict(scheme="dirichlet", min_partition_size=31), "data.min_partition_size"),
        (dict(scheme="dirichlet", alpha=0.01, num_clients=20, min_partition_size=14), "raise data.alpha"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, message):
    args = dict(scheme="iid", num_clients=10, seed=0) | kwargs
    with pytest.raises(PartitionError, match=message):
        partition(_labels(), args.pop("scheme"), args.pop("num_clients"), args.pop("seed"), **args)


def test_empty_client_is_an_error():
    # Class 1 has one sample but two holders, so client 3 (holding only class 1) gets nothing.
    labels = np.array([0, 0, 0, 0, 1])
    with pytest.raises(PartitionError, match="client 3 would be empty"):
        partition(labels, "pathological", 4, seed=0)


def test_histogram_and_table():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = class_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 3, 0]])
    assert hist.dtype == np.int64
    lines = format_histogram(hist, ("cat", "dog", "bird", "x")).splitlines()
    assert lines[0].split() == ["client", "cat", "dog", "bird", "x", "total"]
    assert lines[2].split() == ["1", "0", "1", "3", "0", "4"]
    assert lines[3].split() == ["total", "1", "2", "3", "0", "6"]
    assert len({len(line) for line in lines}) == 1


def test_implied_cells_is_the_one_min_samples_rule():
    hist = [[0, 3, 20], [19, 0, 1]]
    assert implied_cells(hist) == {(0, 1): 3, (0, 2): 20, (1, 0): 19, (1, 2): 1}
    assert implied_cells(np.asarray(hist), min_samples=19) == {(0, 2): 20, (1, 0): 19}
    assert implied_cells(np.zeros((0, 3), np.int64), 1) == {}
