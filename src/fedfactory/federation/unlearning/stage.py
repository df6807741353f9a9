"""The unlearning stage: the unlearned run's inputs (config, partition, release records, the remaining modules'
bytes) written into its directory, then synthesis and training rerun by the runner's own stages, so nothing here
can train differently from a run."""

import logging
from pathlib import Path

import numpy as np
import torch

from fedfactory.config import Config, to_toml
from fedfactory.data.folders import read_class_folders
from fedfactory.federation.runner import (
    RunContext,
    Score,
    factory_stage,
    record_release,
    server_stage,
    test_set_score,
)
from fedfactory.federation.unlearning.plan import UnlearningPlan
from fedfactory.metrics import metrics_from_counts, score_counts
from fedfactory.modules.ids import module_filename
from fedfactory.registry import Module, load_registry
from fedfactory.runs import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger("fedfactory")


def write_inputs(plan: UnlearningPlan, cfg: Config, stage: Path) -> None:
    """The unlearned run's partition.json (without the withdrawn rows or counts) and config.toml."""
    atomic_write_json(stage / "partition.json", plan.partition)
    atomic_write_text(stage / "config.toml", to_toml(cfg))


def copy_modules(plan: UnlearningPlan, source: Path, stage: Path) -> list[Module]:
    """The kept release records and byte copies of the remaining modules; loading them again re-checks every hash."""
    record_release(stage, list(plan.release))
    for mid in plan.remaining:
        name = module_filename(mid)
        atomic_write_bytes(stage / "modules" / name, (source / "modules" / name).read_bytes())
    return load_registry(stage / "modules")


def deployment_score(cfg: Config, class_names: tuple[str, ...], device: torch.device) -> Score:
    """Score on data.test_root when the server owns one; otherwise not at all here (the test images stay at the
    sites), with empty counts in metrics.json."""
    if cfg.data.test_root:
        return test_set_score(read_class_folders(cfg.data.test_root, class_names, cfg.data.image_size), device)
    log.info("not scored: the test images of a deployment stay at its sites; rerun the federation, or set "
             "data.test_root to a test set the server owns")
    empty = score_counts(np.zeros((0, len(class_names))), np.zeros(0, np.int64), len(class_names))
    return lambda model, blur: metrics_from_counts(**empty, class_names=class_names)


def retrain(plan: UnlearningPlan, ctx: RunContext, registry: list[Module]) -> dict:
    """Re-synthesize from the remaining modules and retrain what plan.retrains names, as the source run did: a
    simulation's stage for its classifier mode on the data ctx holds, or a deployment server's classifier."""
    if plan.deployment:
        return server_stage(ctx, registry, plan.class_names, deployment_score(ctx.cfg, plan.class_names, ctx.device),
                            test_name="no test set here")
    return factory_stage(ctx, registry)
