"""Class folders (`<folder>/<class>/*.png|jpg`): read them as an ImageDataset, write one, and the imagefolder
format's (train, test) pair of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfactory.data.images import DatasetError, ImageDataset, resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
