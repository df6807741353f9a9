"""The ImageDataset type (uint8 NHWC images, int64 labels) and the pure array helpers every loader and model uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfactory.errors import FedFactoryError


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


def relabel(data: ImageDataset, class_names: tuple[str, ...]) -> ImageDataset:
    """The same images labelled by their class's position in `class_names` (a federation's global class list)."""
    held = np.unique(data.labels)
    unknown = [data.class_names[c] for c in held if data.class_names[c] not in class_names]
    if unknown:
        raise DatasetError(f"dataset {data.name!r}: classes {unknown[:5]} are not in data.classes="
                           f"{','.join(class_names)!r}; add them to data.classes or remove their images")
    index = np.array([class_names.index(n) if n in class_names else -1 for n in data.class_names], dtype=np.int64)
    return ImageDataset(data.images, index[data.labels], class_names, data.name)

