"""Sites of a real deployment: `split-sites` writes a simulation's partition as one image folder per site, so a
deployment on one machine can be tried with the same split the in-process runner makes."""

import dataclasses
import os
import shutil
from pathlib import Path

from fedfactory.config import Config, ConfigError, to_toml
from fedfactory.data.datasets import load_dataset
from fedfactory.data.folders import write_class_folders
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram, split_clients, split_test_by_holders
from fedfactory.runs import atomic_write_text
from fedfactory.seeding import derive_seed


def site_name(client_id: int) -> str:
    """The site name split-sites gives partition k."""
    return f"site-{client_id}"


def folder_name(class_name: str) -> str:
    # A class folder is one path component; Fashion-MNIST's "T-shirt/top" is not.
    return class_name.replace("/", "-")


def deployment_config(cfg: Config, class_names: tuple[str, ...], num_sites: int) -> Config:
    """The run config of the deployment: the same recipe on image folders, the server naming no data path."""
    data = dataclasses.replace(cfg.data, dataset="imagefolder", root="", test_root="", num_clients=num_sites,
                               classes=",".join(class_names))
    return dataclasses.replace(cfg, data=data, reference=dataclasses.replace(cfg.reference, centralized=False))


def split_sites(cfg: Config, out: Path) -> dict:
    """Write DIR/<site>/train/<class>/*.png and DIR/<site>/test/<class>/*.png for the run's partition, and
    DIR/federation.toml; returns the image counts per site."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose a new --out")
    # Everything goes to a staging folder renamed at the end: an interrupted split leaves no half-written site.
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    # Native size: the sites resize with the same function the in-process loader uses, so the pixels agree.
    train, test = load_dataset(cfg.data.dataset, cfg.data.root or None, 0, cfg.data.classes, cfg.data.test_root)
    names = tuple(folder_name(n) for n in train.class_names)
    train = dataclasses.replace(train, class_names=names, groups=None)
    test = dataclasses.replace(test, class_names=names, groups=None)
    parts = split_clients(cfg.data, cfg.run.seed, train)
    hist = class_histogram(train.labels, parts, train.num_classes)
    tests = split_test_by_holders(test.labels, hist, derive_seed(cfg.run.seed, "partition", "test"))
    counts = {}
    for k, (rows, test_rows) in enumerate(zip(parts, tests, strict=True)):
        site: tuple[ImageDataset, ImageDataset] = (train.subset(rows), test.subset(test_rows))
        write_class_folders(site[0], stage / site_name(k) / "train")
        write_class_folders(site[1], stage / site_name(k) / "test")
        counts[site_name(k)] = {"train": len(rows), "test": len(test_rows)}
    atomic_write_text(stage / "federation.toml",
                      to_toml(deployment_config(cfg, names, len(parts))) + "[flower]\ndeployment = true\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(stage, out)
    return {"sites": counts, "run_config": str(out / "federation.toml")}
