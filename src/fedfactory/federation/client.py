"""What a client does: train one generative module per class it holds, from scratch, on its own data, and check
each one before it may leave the site (the release check: a module that replays its images stays home)."""

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from fedfactory.audit import release_check
from fedfactory.config import Config, GeneratorConfig
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import implied_cells
from fedfactory.federation.plan import ModulePlan, plan_modules
from fedfactory.generative.train import train_module
from fedfactory.registry import Module
from fedfactory.workers import run_jobs


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
    seconds: float = 0.0  # training and release check, wall clock in the process that ran them

    @property
    def released(self) -> bool:
        return self.release["released"]


class ModuleJob(NamedTuple):
    """One module to train (train_and_check): the client's images of the plan's class, what a worker is sent."""

    data: ImageDataset
    plan: ModulePlan
    cfg: Config
    device: torch.device


def train_and_check(job: ModuleJob) -> Trained:
    """Train one planned module on a client's images of its class and run the release check on it (a run_jobs job;
    the progress bar only where one process trains)."""
    data, plan, cfg, device = job
    t0 = time.perf_counter()
    module = train_client_module(data, plan, cfg.generator, device, progress=cfg.run.progress and cfg.run.workers == 1)
    members = data.images[data.labels == plan.class_id]
    release = release_check(module, members, cfg.run.seed, cfg.release.max_copy_fraction, device)
    return Trained(module, release, time.perf_counter() - t0)


def module_jobs(data: ImageDataset, plans: Iterable[ModulePlan], cfg: Config,
                device: torch.device) -> list[ModuleJob]:
    """One ModuleJob per plan."""
    return [ModuleJob(data.subset(np.flatnonzero(data.labels == plan.class_id)), plan, cfg, device) for plan in plans]


def train_modules(jobs: list[ModuleJob], workers: int) -> Iterator[Trained]:
    """train_and_check every job, on `workers` processes (fedfactory.workers.run_jobs), yielded as they finish."""
    device = jobs[0].device if jobs else torch.device("cpu")
    return run_jobs(train_and_check, jobs, workers, device, cost=lambda job: job.plan.training.steps, in_order=False)


def train_client_modules(data: ImageDataset, plans: dict[str, ModulePlan], cfg: Config, device: torch.device,
                         skip: Callable[[ModulePlan], bool] = lambda plan: False) -> Iterator[Trained]:
    """Train each planned module of this client (client_plans) unless skip(plan), and check each before release
    against the client's images of its class; run.workers of them side by side.

    The check samples with the run seed, so its verdict is deterministic: a withheld module is withheld again on a
    rerun, and exact unlearning's verification reproduces it.
    """
    return train_modules(module_jobs(data, [p for p in plans.values() if not skip(p)], cfg, device), cfg.run.workers)
