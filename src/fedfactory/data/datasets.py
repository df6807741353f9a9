"""Image datasets as uint8 NHWC arrays, read from local files only, with strict validation."""

from __future__ import annotations

import csv
import gzip
import importlib
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedfactory.config import class_list
from fedfactory.errors import FedFactoryError

if TYPE_CHECKING:
    from fedfactory.config import DataConfig

DATASETS = ("digits", "fashion-mnist", "cifar10", "medmnist:<subset>", "isic2019", "imagefolder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MEDMNIST_DEFAULT_ROOT = "~/.medmnist"  # where the `medmnist` package downloads its .npz files

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_DEFAULT_SIZE = 64  # pixels; JPEGs are up to 1024 px, so some size must be chosen at decode time

# Class counts of the 2D MedMNIST v2 subsets, so a class absent from a split still counts.
MEDMNIST_NUM_CLASSES = {
    "pathmnist": 9,
    "dermamnist": 7,
    "octmnist": 4,
    "pneumoniamnist": 2,
    "retinamnist": 5,
    "breastmnist": 2,
    "bloodmnist": 8,
    "tissuemnist": 8,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
}

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_CIFAR_PIXELS = 3 * 32 * 32


class DatasetError(FedFactoryError, ValueError):
    """Raised for missing, corrupt or malformed dataset files; message names the file and the fix."""


@dataclass(frozen=True, eq=False)  # field-wise == on arrays is ambiguous, so compare by identity
class ImageDataset:
    """Images with integer labels and an optional natural-split group column."""

    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}
    labels: np.ndarray  # int64 (N,), values in [0, num_classes)
    class_names: tuple[str, ...]
    name: str
    groups: np.ndarray | None = None  # int64 (N,), e.g. ISIC acquisition center id

    def __post_init__(self):
        where = f"dataset {self.name!r}"
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{where}: images must be a uint8 array of shape (N, H, W, C)")
        if self.images.shape[3] not in (1, 3):
            raise DatasetError(f"{where}: images must have 1 or 3 channels, got shape {self.images.shape}")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise DatasetError(f"{where}: labels must be an int64 array of shape (N,)")
        if len(self.labels) != len(self.images):
            raise DatasetError(f"{where}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.class_names) == 0:
            raise DatasetError(f"{where}: class_names is empty")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DatasetError(
                f"{where}: labels must lie in [0, {len(self.class_names)}), "
                f"got [{self.labels.min()}, {self.labels.max()}]"
            )
        if self.groups is not None:
            if (
                not isinstance(self.groups, np.ndarray)
                or self.groups.dtype != np.int64
                or self.groups.ndim != 1
            ):
                raise DatasetError(f"{where}: groups must be an int64 array of shape (N,) or None")
            if len(self.groups) != len(self.labels):
                raise DatasetError(f"{where}: {len(self.labels)} labels but {len(self.groups)} groups")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image as the networks see it: (C, H, W)."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> ImageDataset:
        """Return the rows at `indices` (any integer index array) as a new dataset."""
        indices = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else self.groups[indices]
        return ImageDataset(self.images[indices], self.labels[indices], self.class_names, self.name, groups)


def to_float(images: np.ndarray) -> np.ndarray:
    """Map uint8 NHWC images to float32 NCHW in [-1, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"to_float expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map float NCHW in [-1, 1] to uint8 NHWC, rounding and clipping."""
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {x.shape}")
    u = np.clip(np.rint((np.asarray(x, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix: area average when shrinking, bilinear when enlarging."""
    if n_out == n_in:
        return np.eye(n_in)
    scale = n_in / n_out
    out = np.arange(n_out)
    if n_out < n_in:
        # Output pixel i covers input interval [i*scale, (i+1)*scale); weight = overlap with pixel j.
        lo, hi = out[:, None] * scale, (out[:, None] + 1) * scale
        j = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
        return overlap / scale
    # Half-pixel centres (align_corners=False), clamped at the borders.
    src = np.clip((out + 0.5) * scale - 0.5, 0, n_in - 1)
    j0 = np.floor(src).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    frac = src - j0
    w = np.zeros((n_out, n_in))
    np.add.at(w, (out, j0), 1.0 - frac)
    np.add.at(w, (out, j1), frac)
    return w


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 NHWC images to size x size (area average to shrink, bilinear to enlarge)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"resize expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if size < 1:
        raise ValueError(f"resize size must be >= 1, got {size}")
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.copy()
    wh, ww = _resize_weights(h, size), _resize_weights(w, size)
    out = np.empty((n, size, size, c), dtype=np.uint8)
    chunk = 2048  # images per step; bounds the float64 temporaries for 60k-image datasets
    for start in range(0, n, chunk):
        x = images[start : start + chunk].astype(np.float64).transpose(0, 3, 1, 2)  # (n, C, H, W)
        y = (wh @ x @ ww.T).transpose(0, 2, 3, 1)  # separable: rows then columns
        out[start : start + chunk] = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return out


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, test) sorted index split, round(test_fraction * n_c) test rows per class."""
    # The split uses its own RandomState(0), not the run seed, so every run evaluates on the same rows.
    rs = np.random.RandomState(0)
    train, test = [], []
    for c in np.unique(labels):
        idx = rs.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def _load_digits() -> tuple[ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in a 4x4 block.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    names = tuple(str(i) for i in range(10))
    train, test = stratified_split(labels)
    return (
        ImageDataset(images[train], labels[train], names, "digits"),
        ImageDataset(images[test], labels[test], names, "digits"),
    )


def _read_idx(path: Path, magic: int, fix: str) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes, checking header and payload length."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; {fix}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable gzip file ({e}); re-download it. {fix}") from e
    if len(raw) < 4:
        raise DatasetError(f"{path}: file too short for an IDX header; re-download it")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DatasetError(
            f"{path}: IDX magic number is {found:#010x}, expected {magic:#010x}; wrong or corrupt file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header is truncated; re-download it")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: IDX payload has {len(raw) - header} bytes but dimensions {dims} need {expected} "
            "(truncated or padded file); re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(root: str | None) -> tuple[ImageDataset, ImageDataset]:
    folder = Path(DEBIAN_FASHION_MNIST if root is None else root).expanduser()
    fix = "run `apt-get install -y dataset-fashion-mnist` or pass data.root=<folder with the four IDX .gz>"
    splits = []
    for prefix in ("train", "t10k"):
        images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC, fix)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, fix).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(
                f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels; "
                "the files come from different releases, re-download both"
            )
        if min(images.shape) == 0:
            raise DatasetError(f"{images_path}: empty image array {images.shape}; re-download it")
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{labels_path}: label {labels.max()} is not a Fashion-MNIST class (0..9)")
        splits.append(ImageDataset(images[..., None].copy(), labels, FASHION_MNIST_CLASSES, "fashion-mnist"))
    if splits[0].images.shape[1:] != splits[1].images.shape[1:]:
        raise DatasetError(
            f"{folder}: train and test images differ in size; the files do not belong together"
        )
    return splits[0], splits[1]


def _numpy_attr(module: str, name: str):
    """Resolve a numpy name under either numpy._core (numpy 2) or numpy.core (numpy 1)."""
    for candidate in (
        module.replace("numpy.core", "numpy._core"),
        module.replace("numpy._core", "numpy.core"),
    ):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise DatasetError(f"cannot resolve {module}.{name} in this numpy version")


# Exactly what the official CIFAR-10 batches (numpy arrays pickled by Python 2) reference.
_CIFAR_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays, so a planted batch file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_ALLOWED:
            raise DatasetError(f"refusing to unpickle {module}.{name}")
        if module == "numpy":
            return getattr(np, name)
        return _numpy_attr(module, name)


def _unpickle_cifar(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(
            f"{path}: file not found; pass data.root=<cifar-10-batches-py folder or its parent> "
            "(extract cifar-10-python.tar.gz there)"
        )
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}; this is not an official CIFAR-10 batch, re-download it") from e
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        struct.error,
    ) as e:
        raise DatasetError(f"{path}: corrupt pickle ({type(e).__name__}: {e}); re-download CIFAR-10") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}; re-download CIFAR-10")
    # Official files have bytes keys (Python 2 str); accept str keys from re-pickled copies too.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_cifar(path)
    data, labels = d.get(b"data"), d.get(b"labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_PIXELS
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(
            f"{path}: b'data' must be uint8 (N, {_CIFAR_PIXELS}), got {got}; re-download CIFAR-10"
        )
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DatasetError(f"{path}: b'labels' must be a list of {len(data)} ints; re-download CIFAR-10")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: labels must be integers in 0..9; re-download CIFAR-10")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), each plane row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _load_cifar10(root: str | None) -> tuple[ImageDataset, ImageDataset]:
    if root is None:
        raise DatasetError(
            "cifar10 has no default location; pass data.root=<cifar-10-batches-py folder or its parent>"
        )
    folder = Path(root).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    meta_path = folder / "batches.meta"
    names = _unpickle_cifar(meta_path).get(b"label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{meta_path}: b'label_names' must list 10 class names; re-download CIFAR-10")
    class_names = tuple(n.decode("ascii") if isinstance(n, bytes) else str(n) for n in names)
    train = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = _cifar_batch(folder / "test_batch")
    return (
        ImageDataset(
            np.concatenate([b[0] for b in train]),
            np.concatenate([b[1] for b in train]),
            class_names,
            "cifar10",
        ),
        ImageDataset(test_images, test_labels, class_names, "cifar10"),
    )


def _find_medmnist(folder: Path, subset: str, image_size: int) -> Path:
    """Pick `<subset>_<image_size>.npz` when present, else `<subset>.npz`, else the smallest sized file."""
    candidates = []
    if image_size > 0:
        candidates.append(folder / f"{subset}_{image_size}.npz")
    candidates.append(folder / f"{subset}.npz")
    sized = []
    for p in folder.glob(f"{subset}_*.npz"):
        suffix = p.stem[len(subset) + 1 :]
        if suffix.isdigit():
            sized.append((int(suffix), p))
    candidates.extend(p for _, p in sorted(sized))
    for p in candidates:
        if p.is_file():
            return p
    raise DatasetError(
        f"{folder / (subset + '.npz')}: file not found; download it with `pip install medmnist` "
        f"(`python -m medmnist download`) or from Zenodo and pass data.root=<folder holding {subset}.npz>"
    )


def _load_medmnist(subset: str, root: str | None, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    if not subset or not subset.replace("_", "").isalnum():
        raise DatasetError(f"bad MedMNIST subset {subset!r}; use a name like medmnist:bloodmnist")
    path = _find_medmnist(
        Path(MEDMNIST_DEFAULT_ROOT if root is None else root).expanduser(), subset, image_size
    )
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing arrays {missing}; this is not a MedMNIST .npz, re-download it"
                )
            arrays = {k: z[k] for k in keys}
    except DatasetError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(
            f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e}); re-download it"
        ) from e
    # The val split is ignored: train is train_images only, test is test_images.
    num_classes = MEDMNIST_NUM_CLASSES.get(subset)
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DatasetError(
                f"{path}: labels have {labels.shape[1]} columns; multi-label subsets are unsupported"
            )
        if labels.ndim not in (1, 2) or labels.dtype.kind not in "iu":
            raise DatasetError(
                f"{path}: {split}_labels must be integers of shape (N,) or (N, 1), got {labels.shape}"
            )
        labels = labels.reshape(-1).astype(np.int64)
        if images.dtype != np.uint8:
            raise DatasetError(f"{path}: {split}_images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DatasetError(
                f"{path}: {split}_images shape {images.shape} is not (N, H, W) or (N, H, W, 3); "
                "3D volumes are unsupported"
            )
        if len(images) != len(labels):
            raise DatasetError(
                f"{path}: {len(images)} {split} images but {len(labels)} labels; re-download it"
            )
        if len(labels) and labels.min() < 0:
            raise DatasetError(f"{path}: negative {split} label {labels.min()}; re-download it")
        splits[split] = (images, labels)
    observed = 1 + max(int(lab.max()) for _, lab in splits.values() if len(lab))
    if num_classes is None:
        num_classes = observed
    elif observed > num_classes:
        raise DatasetError(f"{path}: label {observed - 1} exceeds the {num_classes} classes of {subset}")
    names = tuple(f"class-{i}" for i in range(num_classes))
    name = f"medmnist:{subset}"
    return tuple(ImageDataset(np.ascontiguousarray(im), lab, names, name) for im, lab in splits.values())


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: unreadable CSV ({e}); re-download it") from e


def _isic_groups(path: Path, images: list[str]) -> np.ndarray | None:
    """Integer center ids from a `center` or `dataset` metadata column, in sorted order of values."""
    rows = _read_csv(path)
    column = next((c for c in ("center", "dataset") if rows and c in rows[0]), None)
    if column is None:
        return None
    by_image = {r.get("image"): (r[column] or "").strip() for r in rows}
    values = []
    for image in images:
        value = by_image.get(image)
        if not value:
            raise DatasetError(
                f"{path}: no {column} value for image {image}; fix the metadata or remove the file"
            )
        values.append(value)
    _, ids = np.unique(np.array(values), return_inverse=True)
    return ids.astype(np.int64)


def _decode_jpeg(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            # draft() lets libjpeg decode at a reduced scale, several times faster for 1024 px images.
            im.draft("RGB", (size, size))
            rgb = im.convert("RGB")
            shrink = rgb.width >= size and rgb.height >= size
            rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e}); re-download it") from e


def _load_isic2019(root: str | None, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    if root is None:
        raise DatasetError(
            "isic2019 has no default location; "
            "pass data.root=<folder with ISIC_2019_Training_GroundTruth.csv>"
        )
    folder = Path(root).expanduser()
    csv_path = folder / "ISIC_2019_Training_GroundTruth.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"{csv_path}: file not found; download ISIC 2019 training data and pass data.root=<its folder>"
        )
    rows = _read_csv(csv_path)
    needed = ("image",) + ISIC2019_CLASSES
    if not rows or any(c not in rows[0] for c in needed):
        raise DatasetError(f"{csv_path}: expected columns {', '.join(needed)}[, UNK] and at least one row")
    columns = ISIC2019_CLASSES + (("UNK",) if "UNK" in rows[0] else ())
    image_dir = folder / "ISIC_2019_Training_Input"
    if not image_dir.is_dir():
        image_dir = folder
    size = image_size if image_size > 0 else ISIC2019_DEFAULT_SIZE

    names, labels, images = [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            onehot = np.array([float(row[c]) for c in columns])
        except (TypeError, ValueError) as e:
            raise DatasetError(
                f"{csv_path}: line {line} has a non-numeric label ({e}); fix or re-download it"
            ) from e
        label = int(onehot.argmax())
        if np.count_nonzero(onehot == 1.0) != 1 or np.count_nonzero(onehot) != 1:
            raise DatasetError(
                f"{csv_path}: line {line} ({row['image']}) is not one-hot; fix or re-download it"
            )
        if label >= len(ISIC2019_CLASSES):
            raise DatasetError(f"{csv_path}: line {line} ({row['image']}) is labelled UNK; remove that row")
        image_path = image_dir / f"{row['image']}.jpg"
        if not image_path.is_file():
            raise DatasetError(
                f"{image_path}: image listed in {csv_path.name} is missing; re-extract the image archive"
            )
        names.append(row["image"])
        labels.append(label)
        images.append(_decode_jpeg(image_path, size))

    labels = np.array(labels, dtype=np.int64)
    images = np.stack(images)
    meta_path = folder / "ISIC_2019_Training_Metadata.csv"
    groups = _isic_groups(meta_path, names) if meta_path.is_file() else None
    # No official test labels exist, so hold out a fixed stratified 20%.
    train, test = stratified_split(labels)
    full = ImageDataset(images, labels, ISIC2019_CLASSES, "isic2019", groups)
    return full.subset(train), full.subset(test)


def _decode_image(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, C): grayscale modes keep one channel, everything else becomes RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            return np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8).reshape(im.height, im.width, -1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e}); replace or remove the file") from e


def read_class_folders(folder: str | Path, class_names: tuple[str, ...], image_size: int = 0,
                       name: str = "imagefolder") -> ImageDataset:
    """Images of `folder/<class>/*.png|jpg`, labelled by the class's position in `class_names`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; an image folder holds train/<class>/*.png (and optionally "
                           "test/<class>/*.png)")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subdirs if p.name not in class_names]
    if unknown:
        raise DatasetError(f"{folder}: class folder(s) {', '.join(map(repr, unknown))} are not in data.classes="
                           f"{','.join(class_names)!r}; rename the folder or add the class to data.classes")
    images, labels = [], []
    for p in subdirs:
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{p}: class folder holds no {'/'.join(IMAGE_SUFFIXES)} images; add images or "
                               "remove the folder")
        c = class_names.index(p.name)
        for f in files:
            img = _decode_image(f)
            if image_size > 0 and img.shape[:2] != (image_size, image_size):
                img = resize(img[None], image_size)[0]  # the resize every loader uses, image by image
            images.append(img)
            labels.append(c)
    if not images:
        raise DatasetError(f"{folder}: no class folders with images; expected {folder}/<class>/*.png")
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        mixed = "grayscale and RGB images" if len({s[2] for s in shapes}) > 1 else "images of different sizes"
        fix = ("convert them to one mode" if len({s[2] for s in shapes}) > 1
               else "set data.image_size to resize them all")
        raise DatasetError(f"{folder}: {mixed} ({', '.join(map(str, shapes[:3]))}); {fix}")
    return ImageDataset(np.stack(images), np.array(labels, dtype=np.int64), class_names, name)


def write_class_folders(data: ImageDataset, folder: str | Path) -> None:
    """Write a dataset as `folder/<class>/<index>.png` (lossless, so reading it back gives the same pixels)."""
    from PIL import Image

    # Plain writes: a caller that must not leave a half-written folder writes to a staging folder and renames it.
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        path = Path(folder) / data.class_names[label] / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path, format="PNG")


def relabel(data: ImageDataset, class_names: tuple[str, ...]) -> ImageDataset:
    """The same images labelled by their class's position in `class_names` (a federation's global class list)."""
    held = np.unique(data.labels)
    unknown = [data.class_names[c] for c in held if data.class_names[c] not in class_names]
    if unknown:
        raise DatasetError(f"dataset {data.name!r}: classes {unknown[:5]} are not in data.classes="
                           f"{','.join(class_names)!r}; add them to data.classes or remove their images")
    index = np.array([class_names.index(n) if n in class_names else -1 for n in data.class_names], dtype=np.int64)
    return ImageDataset(data.images, index[data.labels], class_names, data.name)


def load_image_folder(root: str | Path, class_names: tuple[str, ...], image_size: int = 0,
                      test_root: str | Path | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) from `root/train/<class>/` and `root/test/<class>/` (or `test_root/<class>/`); no test
    folder gives an empty test set. Grayscale or RGB; image_size > 0 resizes to image_size x image_size."""
    root = Path(root).expanduser()
    train = read_class_folders(root / "train", class_names, image_size, "imagefolder")
    test_dir = Path(test_root).expanduser() if test_root else root / "test"
    if test_dir.is_dir() or test_root:
        test = read_class_folders(test_dir, class_names, image_size, "imagefolder")
        if test.image_shape != train.image_shape:
            raise DatasetError(f"{test_dir}: test images are {test.image_shape} (C, H, W) but the training images "
                               f"are {train.image_shape}; set data.image_size or convert them to one mode")
    else:
        test = ImageDataset(np.zeros((0, *train.images.shape[1:]), np.uint8), np.zeros(0, np.int64), class_names,
                            "imagefolder")
    return train, test


def load_dataset(
    name: str, root: str | None = None, image_size: int = 0, classes: str = "", test_root: str = ""
) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, test) for a dataset name; image_size > 0 resizes square images (0 keeps native)."""
    if not isinstance(image_size, int) or image_size < 0:
        raise DatasetError(f"data.image_size must be an int >= 0 (0 keeps native size), got {image_size!r}")
    if name == "imagefolder":
        if root is None:
            raise DatasetError("imagefolder has no default location; pass data.root=<folder with train/<class>/>")
        return load_image_folder(root, class_list(classes), image_size, test_root or None)
    if name == "digits":
        train, test = _load_digits()
    elif name == "fashion-mnist":
        train, test = _load_fashion_mnist(root)
    elif name == "cifar10":
        train, test = _load_cifar10(root)
    elif name.startswith("medmnist:"):
        train, test = _load_medmnist(name.removeprefix("medmnist:"), root, image_size)
    elif name == "isic2019":
        return _load_isic2019(root, image_size)  # already decoded at the requested size
    else:
        raise DatasetError(f"unknown dataset {name!r}; data.dataset must be one of {', '.join(DATASETS)}")
    if image_size > 0 and train.images.shape[1:3] != (image_size, image_size):
        train = ImageDataset(
            resize(train.images, image_size), train.labels, train.class_names, train.name, train.groups
        )
        test = ImageDataset(
            resize(test.images, image_size), test.labels, test.class_names, test.name, test.groups
        )
    return train, test


def load_data(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of the dataset a run's data config names."""
    train, test = load_dataset(cfg.dataset, cfg.root or None, cfg.image_size, cfg.classes, cfg.test_root)
    if cfg.test_root and cfg.dataset != "imagefolder":
        # A public test set in an image folder, for any dataset: the same classes, in the same order.
        test = read_class_folders(cfg.test_root, train.class_names, cfg.image_size)
    return train, test
