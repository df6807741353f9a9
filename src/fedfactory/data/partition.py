"""Seeded, validated splits of a labelled dataset among federated clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedfactory.errors import FedFactoryError
from fedfactory.seeding import derive_seed

if TYPE_CHECKING:
    from fedfactory.config import DataConfig
    from fedfactory.data.images import ImageDataset

SCHEMES = ("iid", "pathological", "dirichlet", "natural")


class PartitionError(FedFactoryError, ValueError):
    """Raised when a partition cannot be made as asked; message names the setting to change."""


def _class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Sorted row indices of each class; schemes work on these so only per-class counts matter."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]
    return np.split(order.astype(np.int64), bounds)


def _iid(by_class: list[np.ndarray], num_clients: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    # Shuffle a canonical class-major order rather than row order, so row order cannot change the result.
    canonical = np.concatenate(by_class)
    return [[p] for p in np.array_split(canonical[rng.permutation(len(canonical))], num_clients)]


def _assign_classes(num_clients: int, num_classes: int, classes_per_client: int, rng: np.random.Generator):
    """Class sets per client: client i first holds class i % C, then uncovered classes, then random ones."""
    held = [[i % num_classes] for i in range(num_clients)]
    uncovered = [c for c in range(num_classes) if c >= num_clients]
    for _ in range(1, classes_per_client):
        for i in range(num_clients):
            if uncovered:
                # An uncovered class is held by nobody, so it is new to client i too.
                held[i].append(uncovered.pop(0))
            else:
                free = np.setdiff1d(np.arange(num_classes), held[i])
                held[i].append(int(rng.choice(free)))
    return held


def _pathological(by_class, num_clients, classes_per_client, rng):
    num_classes = len(by_class)
    held = _assign_classes(num_clients, num_classes, classes_per_client, rng)
    parts = [[] for _ in range(num_clients)]
    for c, idx in enumerate(by_class):
        holders = [i for i in range(num_clients) if c in held[i]]
        # Each class is split evenly among its holders; with one holder per class it stays whole.
        for i, share in zip(
            holders, np.array_split(idx[rng.permutation(len(idx))], len(holders)), strict=True
        ):
            parts[i].append(share)
    return parts


def _dirichlet(by_class, num_clients, alpha, min_partition_size, max_retries, rng):
    # An empty client is never acceptable, whatever min_partition_size says.
    min_size = max(min_partition_size, 1)
    smallest = 0
    for _ in range(max_retries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = idx[rng.permutation(len(idx))]
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for i, share in enumerate(np.split(shuffled, cuts)):
                parts[i].append(share)
        sizes = [sum(len(s) for s in p) for p in parts]
        smallest = min(sizes)
        if smallest >= min_size:
            return parts
    raise PartitionError(
        f"dirichlet partition left a client with {smallest} < {min_size} samples after {max_retries} tries; "
        "lower data.min_partition_size, raise data.alpha or lower data.num_clients"
    )


def _natural(groups, num_samples, num_clients):
    if groups is None:
        raise PartitionError(
            "the natural scheme needs a groups column (e.g. ISIC centers); this dataset has none"
        )
    groups = np.asarray(groups)
    if groups.shape != (num_samples,) or groups.dtype.kind not in "iu":
        raise PartitionError(
            f"groups must be integers of shape ({num_samples},), got {groups.dtype} {groups.shape}"
        )
    values = np.unique(groups)
    if len(values) != num_clients:
        raise PartitionError(
            f"the natural scheme makes one client per group: "
            f"set data.num_clients={len(values)}, not {num_clients}"
        )
    return [[np.flatnonzero(groups == v).astype(np.int64)] for v in values]


def partition(
    labels: np.ndarray,
    scheme: str,
    num_clients: int,
    seed: int,
    *,
    num_classes: int | None = None,  # default: max label + 1
    classes_per_client: int = 1,  # pathological only
    alpha: float = 0.5,  # dirichlet concentration; small = skewed
    min_partition_size: int = 10,  # dirichlet only; samples per client
    groups: np.ndarray | None = None,  # natural only; (N,) group id per row
    max_retries: int = 100,  # dirichlet resampling attempts
) -> list[np.ndarray]:
    """Split row indices among clients; each returned array is sorted int64 indices."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise PartitionError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown data.partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise PartitionError(f"data.num_clients must be an int >= 1, got {num_clients!r}")
    if num_clients > len(labels):
        raise PartitionError(
            f"data.num_clients={num_clients} exceeds the {len(labels)} samples; lower data.num_clients"
        )
    if labels.min() < 0:
        raise PartitionError(f"labels must be >= 0, got {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise PartitionError(f"label {labels.max()} is out of range for num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    by_class = _class_indices(labels, num_classes)

    if scheme == "iid":
        parts = _iid(by_class, num_clients, rng)
    elif scheme == "pathological":
        if not 1 <= classes_per_client <= num_classes:
            raise PartitionError(
                f"data.classes_per_client must lie in [1, {num_classes}], got {classes_per_client}"
            )
        if num_clients * classes_per_client < num_classes:
            raise PartitionError(
                f"{num_clients} clients x {classes_per_client} classes cannot cover {num_classes} classes; "
                "raise data.num_clients or data.classes_per_client"
            )
        parts = _pathological(by_class, num_clients, classes_per_client, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise PartitionError(f"data.alpha must be > 0, got {alpha}")
        if min_partition_size < 0:
            raise PartitionError(f"data.min_partition_size must be >= 0, got {min_partition_size}")
        if max_retries < 1:
            raise PartitionError(f"max_retries must be >= 1, got {max_retries}")
        if num_clients * min_partition_size > len(labels):
            raise PartitionError(
                f"{num_clients} clients x data.min_partition_size={min_partition_size} exceeds the "
                f"{len(labels)} samples; lower data.min_partition_size or data.num_clients"
            )
        parts = _dirichlet(by_class, num_clients, alpha, min_partition_size, max_retries, rng)
    else:
        parts = _natural(groups, len(labels), num_clients)

    result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    for i, p in enumerate(result):
        if len(p) == 0:
            raise PartitionError(
                f"client {i} would be empty: lower data.num_clients "
                "or use a scheme that gives every client data"
            )
    return result


def split_clients(cfg: DataConfig, root_seed: int, train: ImageDataset) -> list[np.ndarray]:
    """A run's partition of the training rows among its clients, seeded by ("partition",)."""
    try:
        return partition(train.labels, cfg.partition, cfg.num_clients, derive_seed(root_seed, "partition"),
                         num_classes=train.num_classes, classes_per_client=cfg.classes_per_client,
                         alpha=cfg.alpha, min_partition_size=cfg.min_partition_size, groups=train.groups)
    except PartitionError as e:
        valid = [s for s in SCHEMES if s != "natural" or train.groups is not None]
        raise PartitionError(f"{e} (valid data.partition values for {train.name}: {', '.join(valid)})") from None


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class counts, shape (num_clients, num_classes), int64."""
    labels = np.asarray(labels)
    if not parts:
        return np.zeros((0, num_classes), dtype=np.int64)
    return np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]).astype(
        np.int64
    )


def implied_cells(histogram, min_samples: int = 1) -> dict[tuple[int, int], int]:
    """(client, class) -> real count, for every cell of a class histogram that gets a generative module."""
    # The one rule for which modules a partition implies (runner, unlearning, Flower server and report call it): a
    # cell needs at least generator.min_samples images, since a module of a handful of images can only replay them.
    hist = np.atleast_2d(np.asarray(histogram, dtype=np.int64))  # (clients, classes)
    return {(int(k), int(c)): int(hist[k, c]) for k, c in zip(*np.nonzero(hist >= max(min_samples, 1)), strict=True)}


def split_test_by_holders(labels: np.ndarray, histogram: np.ndarray, seed: int) -> list[np.ndarray]:
    """Deal test rows out to sites like their training data: class c's rows go to the sites holding c, in
    proportion to their training counts (largest remainder); a class no site holds is dealt round-robin to all.

    Disjoint, and the union is every row, so scoring the sites' test sets together is scoring the whole test set.
    """
    hist = np.atleast_2d(np.asarray(histogram, dtype=np.int64))  # (sites, classes)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(hist))]
    for c in range(hist.shape[1]):
        rows = rng.permutation(np.flatnonzero(np.asarray(labels) == c))
        weights = hist[:, c] if hist[:, c].sum() > 0 else np.ones(len(hist), dtype=np.int64)
        exact = weights / weights.sum() * len(rows)
        take = np.floor(exact).astype(np.int64)
        order = np.argsort(-(exact - take), kind="stable")
        take[order[: len(rows) - int(take.sum())]] += 1
        for k, chunk in enumerate(np.split(rows, np.cumsum(take)[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def format_histogram(hist: np.ndarray, class_names) -> str:
    """Fixed-width table of a class histogram: one row per client, plus totals."""
    hist = np.asarray(hist)
    if hist.ndim != 2 or hist.shape[1] != len(class_names):
        raise ValueError(f"histogram shape {hist.shape} does not match {len(class_names)} class names")
    header = ["client", *map(str, class_names), "total"]
    rows = [[str(i), *map(str, row), str(row.sum())] for i, row in enumerate(hist)]
    rows.append(["total", *map(str, hist.sum(axis=0)), str(hist.sum())])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows]
    )
