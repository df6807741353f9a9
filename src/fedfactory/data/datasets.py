"""Named datasets: one loader per format, all behind one table, each returning (train, test) ImageDatasets.

Files are read from local paths only, by the readers in `formats.py` and `folders.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedfactory.config import class_list
from fedfactory.data.folders import load_image_folder, read_class_folders
from fedfactory.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    decode_jpeg,
    find_medmnist,
    read_cifar_batch,
    read_csv,
    read_idx,
    read_isic_groups,
    read_medmnist,
    unpickle_cifar,
)
from fedfactory.data.images import DatasetError, ImageDataset, resize, stratified_split

if TYPE_CHECKING:
    from fedfactory.config import DataConfig

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


@dataclass(frozen=True)
class Request:
    """What load_dataset was asked for; each format's loader reads the fields it needs."""

    root: str | None  # data.root; None: the format's default location
    image_size: int  # pixels a side; 0 keeps the native size
    subset: str = ""  # the <subset> of medmnist:<subset>
    classes: str = ""  # imagefolder: data.classes, comma-separated
    test_root: str = ""  # imagefolder: a test folder other than root/test


def _load_digits(request: Request) -> tuple[ImageDataset, ImageDataset]:
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


def _load_fashion_mnist(request: Request) -> tuple[ImageDataset, ImageDataset]:
    folder = Path(DEBIAN_FASHION_MNIST if request.root is None else request.root).expanduser()
    fix = "run `apt-get install -y dataset-fashion-mnist` or pass data.root=<folder with the four IDX .gz>"
    splits = []
    for prefix in ("train", "t10k"):
        images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        images = read_idx(images_path, IDX_IMAGES_MAGIC, fix)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC, fix).astype(np.int64)
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


def _load_cifar10(request: Request) -> tuple[ImageDataset, ImageDataset]:
    if request.root is None:
        raise DatasetError(
            "cifar10 has no default location; pass data.root=<cifar-10-batches-py folder or its parent>"
        )
    folder = Path(request.root).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    meta_path = folder / "batches.meta"
    names = unpickle_cifar(meta_path).get(b"label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{meta_path}: b'label_names' must list 10 class names; re-download CIFAR-10")
    class_names = tuple(n.decode("ascii") if isinstance(n, bytes) else str(n) for n in names)
    train = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = read_cifar_batch(folder / "test_batch")
    return (
        ImageDataset(
            np.concatenate([b[0] for b in train]),
            np.concatenate([b[1] for b in train]),
            class_names,
            "cifar10",
        ),
        ImageDataset(test_images, test_labels, class_names, "cifar10"),
    )


def _load_medmnist(request: Request) -> tuple[ImageDataset, ImageDataset]:
    subset = request.subset
    if not subset or not subset.replace("_", "").isalnum():
        raise DatasetError(f"bad MedMNIST subset {subset!r}; use a name like medmnist:bloodmnist")
    root = Path(MEDMNIST_DEFAULT_ROOT if request.root is None else request.root).expanduser()
    path = find_medmnist(root, subset, request.image_size)
    splits = read_medmnist(path)
    num_classes = MEDMNIST_NUM_CLASSES.get(subset)
    observed = 1 + max(int(lab.max()) for _, lab in splits.values() if len(lab))
    if num_classes is None:
        num_classes = observed
    elif observed > num_classes:
        raise DatasetError(f"{path}: label {observed - 1} exceeds the {num_classes} classes of {subset}")
    names = tuple(f"class-{i}" for i in range(num_classes))
    name = f"medmnist:{subset}"
    return tuple(ImageDataset(np.ascontiguousarray(im), lab, names, name) for im, lab in splits.values())


def _load_isic2019(request: Request) -> tuple[ImageDataset, ImageDataset]:
    if request.root is None:
        raise DatasetError(
            "isic2019 has no default location; "
            "pass data.root=<folder with ISIC_2019_Training_GroundTruth.csv>"
        )
    folder = Path(request.root).expanduser()
    csv_path = folder / "ISIC_2019_Training_GroundTruth.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"{csv_path}: file not found; download ISIC 2019 training data and pass data.root=<its folder>"
        )
    rows = read_csv(csv_path)
    needed = ("image",) + ISIC2019_CLASSES
    if not rows or any(c not in rows[0] for c in needed):
        raise DatasetError(f"{csv_path}: expected columns {', '.join(needed)}[, UNK] and at least one row")
    columns = ISIC2019_CLASSES + (("UNK",) if "UNK" in rows[0] else ())
    image_dir = folder / "ISIC_2019_Training_Input"
    if not image_dir.is_dir():
        image_dir = folder
    size = request.image_size if request.image_size > 0 else ISIC2019_DEFAULT_SIZE

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
        images.append(decode_jpeg(image_path, size))

    labels = np.array(labels, dtype=np.int64)
    images = np.stack(images)
    meta_path = folder / "ISIC_2019_Training_Metadata.csv"
    groups = read_isic_groups(meta_path, names) if meta_path.is_file() else None
    # No official test labels exist, so hold out a fixed stratified 20%.
    train, test = stratified_split(labels)
    full = ImageDataset(images, labels, ISIC2019_CLASSES, "isic2019", groups)
    return full.subset(train), full.subset(test)


def _load_imagefolder(request: Request) -> tuple[ImageDataset, ImageDataset]:
    if request.root is None:
        raise DatasetError("imagefolder has no default location; pass data.root=<folder with train/<class>/>")
    return load_image_folder(request.root, class_list(request.classes), request.image_size, request.test_root or None)


# The one list of dataset names: data.dataset must be a key here (medmnist:<subset> for any subset).
LOADERS: dict[str, Callable[[Request], tuple[ImageDataset, ImageDataset]]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "medmnist:<subset>": _load_medmnist,
    "isic2019": _load_isic2019,
    "imagefolder": _load_imagefolder,
}
DATASETS = tuple(LOADERS)


def _at_size(data: ImageDataset, image_size: int) -> ImageDataset:
    """The dataset with its images resized to image_size x image_size."""
    return ImageDataset(resize(data.images, image_size), data.labels, data.class_names, data.name, data.groups)


def load_dataset(
    name: str, root: str | None = None, image_size: int = 0, classes: str = "", test_root: str = ""
) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, test) for a dataset name; image_size > 0 resizes square images (0 keeps native)."""
    if not isinstance(image_size, int) or image_size < 0:
        raise DatasetError(f"data.image_size must be an int >= 0 (0 keeps native size), got {image_size!r}")
    family, has_subset, subset = name.partition(":")
    loader = LOADERS.get(f"{family}:<subset>" if has_subset else name)
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; data.dataset must be one of {', '.join(DATASETS)}")
    train, test = loader(Request(root, image_size, subset, classes, test_root))
    # isic2019 and imagefolder decode at image_size already, so only the other formats resize here.
    if image_size > 0 and train.images.shape[1:3] != (image_size, image_size):
        train, test = _at_size(train, image_size), _at_size(test, image_size)
    return train, test


def load_data(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of the dataset a run's data config names."""
    train, test = load_dataset(cfg.dataset, cfg.root or None, cfg.image_size, cfg.classes, cfg.test_root)
    if cfg.test_root and cfg.dataset != "imagefolder":
        # A public test set in an image folder, for any dataset: the same classes, in the same order.
        test = read_class_folders(cfg.test_root, train.class_names, cfg.image_size)
    return train, test
