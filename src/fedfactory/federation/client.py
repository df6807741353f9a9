"""What a client does: train one generative module per class it holds, from scratch, on its own data, and check
each one before it may leave the site (the release check: a module that replays its images stays home)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedfactory.audit import release_check
from fedfactory.config import NO_PRIVACY, Config, GeneratorConfig, PrivacyConfig
from fedfactory.data.datasets import ImageDataset
from fedfactory.data.partition import implied_cells
from fedfactory.generative.artifact import module_id
from fedfactory.generative.train import module_privacy_plan, train_module
from fedfactory.registry import Module
from fedfactory.seeding import derive_seed


def held_classes(data: ImageDataset, min_samples: int = 1) -> dict[int, int]:
    """Class id -> number of real samples, for the classes this client holds at least min_samples of."""
    counts = np.bincount(data.labels, minlength=data.num_classes)
    return {c: n for (_, c), n in implied_cells(counts[None], min_samples).items()}


def train_client_module(data: ImageDataset, client_id: int, class_id: int, cfg: GeneratorConfig, root_seed: int,
                        device: torch.device, progress: bool = True,
                        privacy: PrivacyConfig = NO_PRIVACY) -> Module:
    """Train the module G_{k,c} on the client's images of class c (differentially private if privacy asks)."""
    images = data.images[data.labels == class_id]
    mid = module_id(client_id, class_id)
    seed = derive_seed(root_seed, "train", client_id, class_id)
    tensors, fields = train_module(images, cfg, seed, device, desc=mid, progress=progress, privacy=privacy)
    manifest = {"module_id": mid, "client_id": client_id, "class_id": class_id,
                "class_name": data.class_names[class_id], "num_samples": int(len(images))} | fields
    return Module(manifest, tensors)


@dataclass(frozen=True)
class Trained:
    """A module a client trained, and the release check's verdict on it (fedfactory.audit.release_check)."""

    module: Module
    release: dict

    @property
    def released(self) -> bool:
        return self.release["released"]


def train_client_modules(data: ImageDataset, client_id: int | str, cfg: Config, device: torch.device,
                         skip: Callable[[str], bool] = lambda mid: False,
                         held_out: ImageDataset | None = None) -> Iterator[Trained]:
    """Train G_{k,c} for each class c the client holds generator.min_samples images of, unless skip(module id), and
    check each before release against the client's images of c (and its held-out images of c, where it has them).

    The check samples with the run seed, so its verdict is deterministic: a withheld module is withheld again on a
    rerun, and exact unlearning's verification reproduces it.
    """
    held = held_classes(data, cfg.generator.min_samples)
    # Every module's budget is checked before the first one trains, so a refusal wastes no training.
    for c, n in held.items():
        module_privacy_plan(cfg.generator, cfg.privacy, n, module_id(client_id, c))
    for c in held:
        if skip(module_id(client_id, c)):
            continue
        module = train_client_module(data, client_id, c, cfg.generator, cfg.run.seed, device,
                                     progress=cfg.run.progress, privacy=cfg.privacy)
        members = data.images[data.labels == c]
        reference = None if held_out is None else held_out.images[held_out.labels == c]
        yield Trained(module, release_check(module, members, reference, cfg.run.seed,
                                            cfg.release.max_copy_fraction, device))
