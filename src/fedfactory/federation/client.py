"""What a client does: train one generative module per class it holds, from scratch, on its own data, and check
each one before it may leave the site (the release check: a module that replays its images stays home)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedfactory.audit import release_check
from fedfactory.config import Config, GeneratorConfig
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import implied_cells
from fedfactory.federation.plan import ModulePlan, plan_modules
from fedfactory.generative.train import train_module
from fedfactory.registry import Module


def held_classes(data: ImageDataset, min_samples: int = 1) -> dict[int, int]:
    """Class id -> number of real samples, for the classes this client holds at least min_samples of."""
    counts = np.bincount(data.labels, minlength=data.num_classes)
    return {c: n for (_, c), n in implied_cells(counts[None], min_samples).items()}


def client_plans(data: ImageDataset, client_id: int | str, cfg: Config) -> dict[str, ModulePlan]:
    """The plans of the modules this client trains: one per class it holds generator.min_samples images of."""
    return plan_modules(cfg, {(client_id, c): n for c, n in held_classes(data, cfg.generator.min_samples).items()})


def train_client_module(data: ImageDataset, plan: ModulePlan, cfg: GeneratorConfig, device: torch.device,
                        progress: bool = True) -> Module:
    """Train the module G_{k,c} on the client's images of class c, as its plan says."""
    images = data.images[data.labels == plan.class_id]
    tensors, fields = train_module(images, cfg, plan.training, device, desc=plan.module_id, progress=progress)
    manifest = {"module_id": plan.module_id, "client_id": plan.client_id, "class_id": plan.class_id,
                "class_name": data.class_names[plan.class_id], "num_samples": int(len(images))} | fields
    return Module(manifest, tensors)


@dataclass(frozen=True)
class Trained:
    """A module a client trained, and the release check's verdict on it (fedfactory.audit.release_check)."""

    module: Module
    release: dict

    @property
    def released(self) -> bool:
        return self.release["released"]


def train_client_modules(data: ImageDataset, plans: dict[str, ModulePlan], cfg: Config, device: torch.device,
                         skip: Callable[[ModulePlan], bool] = lambda plan: False) -> Iterator[Trained]:
    """Train each planned module of this client (client_plans) unless skip(plan), and check each before release
    against the client's images of its class.

    The check samples with the run seed, so its verdict is deterministic: a withheld module is withheld again on a
    rerun, and exact unlearning's verification reproduces it.
    """
    for plan in plans.values():
        if skip(plan):
            continue
        module = train_client_module(data, plan, cfg.generator, device, progress=cfg.run.progress)
        members = data.images[data.labels == plan.class_id]
        yield Trained(module, release_check(module, members, cfg.run.seed, cfg.release.max_copy_fraction, device))
