"""Dataset loaders on tiny files written in each real on-disk format, plus conversions."""

import csv
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from fedfactory.data import datasets
from fedfactory.data.datasets import load_dataset
from fedfactory.data.images import DatasetError, ImageDataset, resize, to_float, to_uint8


def test_image_dataset_validates_and_subsets():
    images = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1], dtype=np.int64)
    ds = ImageDataset(images, labels, ("a", "b", "c"), "toy", groups=np.array([0, 0, 1, 1]))
    assert (len(ds), ds.num_classes, ds.image_shape) == (4, 3, (3, 5, 6))
    sub = ds.subset([3, 1])
    assert sub.labels.tolist() == [1, 1] and sub.groups.tolist() == [1, 0]
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(images.astype(np.float32), labels, ("a", "b", "c"), "toy")
    with pytest.raises(DatasetError, match="int64"):
        ImageDataset(images, labels.astype(np.int32), ("a", "b", "c"), "toy")
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        ImageDataset(images, labels, ("a", "b"), "toy")
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        ImageDataset(images, labels[:3], ("a", "b", "c"), "toy")
    with pytest.raises(DatasetError, match="channels"):
        ImageDataset(np.zeros((4, 5, 6, 2), np.uint8), labels, ("a", "b", "c"), "toy")


def test_float_uint8_round_trip_is_exact():
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=3)
    x = to_float(u)
    assert x.dtype == np.float32 and x.shape == (4, 3, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x), u)
    # Out-of-range values clip rather than wrap.
    assert to_uint8(np.full((1, 1, 2, 2), 3.0)).max() == 255
    assert to_uint8(np.full((1, 1, 2, 2), -3.0)).min() == 0


def test_resize_shapes_constants_and_area_average():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    assert resize(images, 16).shape == (3, 16, 16, 3)
    assert resize(images, 5).shape == (3, 5, 5, 3)
    assert resize(images[:, :, :6], 4).shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(resize(images, 8), images)
    np.testing.assert_array_equal(resize(images, 16), resize(images, 16))
    const = np.full((2, 7, 7, 1), 123, dtype=np.uint8)
    assert set(np.unique(resize(const, 3))) == {123} and set(np.unique(resize(const, 20))) == {123}
    # Halving averages each 2x2 block.
    blocks = images.astype(np.float64).reshape(3, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    assert np.abs(resize(images, 4).astype(np.float64) - blocks).max() <= 0.5


def test_digits_split_is_fixed_and_stratified():
    np.random.seed(123)  # the split must not depend on global numpy state
    train, test = load_dataset("digits")
    np.random.seed(7)
    train2, test2 = load_dataset("digits")
    np.testing.assert_array_equal(test.images, test2.images)
    np.testing.assert_array_equal(train.labels, train2.labels)
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.class_names == tuple("0123456789")
    assert len(train) + len(test) == 1797 and train.images.max() == 255
    per_class = np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.rint(0.2 * per_class))
    big, _ = load_dataset("digits", image_size=16)
    assert big.images.shape == (len(train), 16, 16, 1)


def test_unknown_dataset_lists_names():
    with pytest.raises(DatasetError, match="fashion-mnist"):
        load_dataset("imagenet")


def _write_idx(path: Path, magic: int, array: np.ndarray, payload_cut: int = 0):
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - payload_cut])


def _write_fashion(folder: Path, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x00000803, images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801, labels)
    return images, labels


def test_fashion_mnist_idx_loads(tmp_path):
    images, labels = _write_fashion(tmp_path)
    train, test = load_dataset("fashion-mnist", root=str(tmp_path))
    assert train.images.shape == (12, 28, 28, 1) and len(test) == 5
    np.testing.assert_array_equal(test.images[..., 0], images)
    np.testing.assert_array_equal(test.labels, labels)
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    small, _ = load_dataset("fashion-mnist", root=str(tmp_path), image_size=14)
    assert small.images.shape == (12, 14, 14, 1)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("truncated_gzip", "gzip"),
        ("truncated_payload", "truncated"),
        ("bad_magic", "magic"),
        ("count_mismatch", "labels"),
    ],
)
def test_fashion_mnist_rejects_bad_files(tmp_path, corrupt, message):
    _write_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if corrupt == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-40])
    elif corrupt == "truncated_payload":
        _write_idx(target, 0x00000803, np.zeros((12, 28, 28), np.uint8), payload_cut=100)
    elif corrupt == "bad_magic":
        _write_idx(target, 0x00000801, np.zeros((12, 28, 28), np.uint8))
    else:
        _write_idx(target, 0x00000803, np.zeros((11, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("fashion-mnist", root=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_fashion_mnist_missing_default_names_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(
    not Path(datasets.DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian dataset-fashion-mnist is not installed",
)
def test_real_debian_fashion_mnist():
    train, test = load_dataset("fashion-mnist")
    assert train.images.shape == (60000, 28, 28, 1) and len(test) == 10000
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))


def _dump_like_python2(obj) -> bytes:
    """Pickle with bytes opcodes and the GLOBAL names the official Python 2 batches use."""
    # Protocol 3 keeps bytes as bytes (Python 2 str) and names globals by text line like protocol 2.
    return pickle.dumps(obj, protocol=3).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_cifar(folder: Path, n=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": data,
        }
        batches[name] = batch
        (folder / name).write_bytes(_dump_like_python2(batch))
    meta = {b"label_names": [f"name{i}".encode() for i in range(10)], b"num_cases_per_batch": n}
    (folder / "batches.meta").write_bytes(_dump_like_python2(meta))
    return batches


def test_cifar10_batches_load_as_nhwc(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    assert (
        b"cnumpy.core.multiarray\n_reconstruct"
        in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    )
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train, test = load_dataset("cifar10", root=str(root))
        assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    row = batches["test_batch"][b"data"][1]
    # Pixel (y=2, x=5) of channel c sits at c*1024 + 2*32 + 5 in the row.
    assert test.images[1, 2, 5].tolist() == [row[c * 1024 + 69] for c in range(3)]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    assert train.class_names[3] == "name3"


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar10_refuses_malicious_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    # Check the payload really would create a file if unpickled naively.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Planted(probe))).close()
    assert probe.exists()
    marker = tmp_path / "marker"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Planted(marker), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to unpickle .*open") as info:
        load_dataset("cifar10", root=str(tmp_path))
    assert "data_batch_1" in str(info.value)
    assert not marker.exists()


def test_cifar10_rejects_bad_shapes_and_truncation(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    batch = {b"data": np.zeros((4, 1000), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(_dump_like_python2(batch))
    with pytest.raises(DatasetError, match="data_batch_2.*3072"):
        load_dataset("cifar10", root=str(tmp_path))
    _write_cifar(tmp_path / "b" / "cifar-10-batches-py")
    truncated = tmp_path / "b" / "cifar-10-batches-py" / "test_batch"
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(DatasetError, match="test_batch.*corrupt"):
        load_dataset("cifar10", root=str(tmp_path / "b"))
    with pytest.raises(DatasetError, match="data.root"):
        load_dataset("cifar10")


def _medmnist_arrays(n=6, size=8, rgb=True, label_cols=1, num_classes=8):
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if rgb else (size, size)
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, num_classes, size=(n, label_cols)).astype(np.uint8)
    return out


def test_medmnist_npz_loads(tmp_path):
    arrays = _medmnist_arrays()
    np.savez_compressed(tmp_path / "bloodmnist.npz", **arrays)
    train, test = load_dataset("medmnist:bloodmnist", root=str(tmp_path))
    assert train.images.shape == (6, 8, 8, 3) and train.num_classes == 8
    np.testing.assert_array_equal(test.labels, arrays["test_labels"][:, 0])
    np.savez_compressed(
        tmp_path / "pneumoniamnist_64.npz", **_medmnist_arrays(size=64, rgb=False, n=3, num_classes=2)
    )
    np.savez_compressed(
        tmp_path / "pneumoniamnist.npz", **_medmnist_arrays(size=28, rgb=False, n=3, num_classes=2)
    )
    gray, _ = load_dataset("medmnist:pneumoniamnist", root=str(tmp_path), image_size=64)
    assert gray.images.shape == (3, 64, 64, 1)
    native, _ = load_dataset("medmnist:pneumoniamnist", root=str(tmp_path))
    assert native.images.shape == (3, 28, 28, 1)


def test_medmnist_rejects_bad_files(tmp_path):
    np.savez_compressed(tmp_path / "chestmnist.npz", **_medmnist_arrays(label_cols=14))
    with pytest.raises(DatasetError, match="multi-label"):
        load_dataset("medmnist:chestmnist", root=str(tmp_path))
    np.savez_compressed(tmp_path / "pathmnist.npz", **_medmnist_arrays())
    raw = (tmp_path / "pathmnist.npz").read_bytes()
    (tmp_path / "pathmnist.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="pathmnist.npz.*corrupt") as info:
        load_dataset("medmnist:pathmnist", root=str(tmp_path))
    assert info.value.__cause__ is not None
    arrays = _medmnist_arrays()
    del arrays["test_labels"]
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    with pytest.raises(DatasetError, match="test_labels"):
        load_dataset("medmnist:dermamnist", root=str(tmp_path))
    with pytest.raises(DatasetError, match="octmnist.npz"):
        load_dataset("medmnist:octmnist", root=str(tmp_path))


def _write_isic(folder: Path, per_class=5, centers=True, unk_row=False):
    image_module = pytest.importorskip("PIL.Image")
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    (folder / "ISIC_2019_Training_Input").mkdir(parents=True)
    rows, meta = [], []
    for c in range(8):
        for k in range(per_class):
            name = f"ISIC_{c:02d}{k:03d}"
            onehot = ["1.0" if j == c else "0.0" for j in range(9)]
            rows.append([name, *onehot])
            meta.append([name, "45", "torso", "", "male", f"center_{k % 3}"])
            color = (30 * c, 10 * k, 200)
            image_module.new("RGB", (20 + c, 16), color).save(
                folder / "ISIC_2019_Training_Input" / f"{name}.jpg"
            )
    if unk_row:
        rows.append(["ISIC_9999999", *["0.0"] * 8, "1.0"])
    with open(folder / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *classes], *rows])
    if centers:
        with open(folder / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
            header = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex", "dataset"]
            csv.writer(f).writerows([header, *meta])


def test_isic2019_loads_with_groups_and_fixed_split(tmp_path):
    _write_isic(tmp_path)
    train, test = load_dataset("isic2019", root=str(tmp_path), image_size=8)
    assert train.images.shape[1:] == (8, 8, 3) and len(train) + len(test) == 40
    assert train.class_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=8), np.ones(8))
    assert set(train.groups.tolist()) | set(test.groups.tolist()) == {0, 1, 2}
    # A solid-colour JPEG keeps its colour after decoding and resizing (up to JPEG error).
    assert abs(int(train.images[0, 4, 4, 2]) - 200) < 8
    again, _ = load_dataset("isic2019", root=str(tmp_path), image_size=8)
    np.testing.assert_array_equal(again.images, train.images)


def test_isic2019_without_center_column_has_no_groups(tmp_path):
    _write_isic(tmp_path, per_class=2, centers=False)
    train, _ = load_dataset("isic2019", root=str(tmp_path), image_size=4)
    assert train.groups is None


def test_isic2019_rejects_missing_image_and_unk(tmp_path):
    _write_isic(tmp_path / "a", per_class=2)
    (tmp_path / "a" / "ISIC_2019_Training_Input" / "ISIC_03001.jpg").unlink()
    with pytest.raises(DatasetError, match="ISIC_03001.jpg.*missing"):
        load_dataset("isic2019", root=str(tmp_path / "a"), image_size=4)
    _write_isic(tmp_path / "b", per_class=2, unk_row=True)
    with pytest.raises(DatasetError, match="UNK"):
        load_dataset("isic2019", root=str(tmp_path / "b"), image_size=4)
