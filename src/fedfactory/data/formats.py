"""File readers of the dataset formats: IDX, CIFAR-10 pickles (numpy arrays only), MedMNIST .npz, ISIC CSV and JPEG.

Each reader checks what its file claims and raises DatasetError naming the file and the fix; the loaders in
`datasets.py` turn what they return into ImageDatasets."""

from __future__ import annotations

import csv
import gzip
import importlib
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedfactory.data.images import DatasetError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_CIFAR_PIXELS = 3 * 32 * 32


def read_idx(path: Path, magic: int, fix: str) -> np.ndarray:
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


def unpickle_cifar(path: Path) -> dict:
    """One CIFAR-10 pickle as a dict with bytes keys, through an unpickler that admits numpy arrays only."""
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


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as uint8 (N, 32, 32, 3) images and int64 labels in 0..9."""
    d = unpickle_cifar(path)
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


def find_medmnist(folder: Path, subset: str, image_size: int) -> Path:
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


def read_medmnist(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...} of a MedMNIST .npz: uint8 (N, H, W, C) and int64 (N,) labels."""
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
    return splits


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a UTF-8 CSV file as dicts keyed by its header."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: unreadable CSV ({e}); re-download it") from e


def read_isic_groups(path: Path, images: list[str]) -> np.ndarray | None:
    """Integer center ids from a `center` or `dataset` metadata column, in sorted order of values."""
    rows = read_csv(path)
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


def decode_jpeg(path: Path, size: int) -> np.ndarray:
    """One JPEG as uint8 (size, size, 3) RGB: box filter to shrink, bilinear to enlarge."""
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
