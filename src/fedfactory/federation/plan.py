"""One frozen plan per module, built once per run before any module trains (docs/architecture.md).

A module's plan is its id, the seed derived from the root seed and its cell, and its training plan (steps, the
manifest fields the run asks, the DP mechanisms and their noise). Training reads the plan, and reuse reads it too:
factory.trained_as_asked compares a module's manifest with its plan, the runner's plan of the cell or, for a module
this run did not plan (at a server, or kept from an attempt on other images), `manifest_plan`.
"""

from dataclasses import dataclass

from fedfactory.config import Config
from fedfactory.generative.train import TrainingPlan, plan_training
from fedfactory.modules.ids import module_id
from fedfactory.seeding import derive_seed


@dataclass(frozen=True)
class ModulePlan:
    """G_{k,c}: the module client k trains on its num_images images of class c."""

    module_id: str
    client_id: int | str  # a partition's client index, or a deployment's site name
    class_id: int
    training: TrainingPlan

    @property
    def num_images(self) -> int:
        return self.training.num_images


def module_seed(root_seed: int, client_id: int | str, class_id: int) -> int:
    """The training seed of G_{k,c}: a function of the root seed and the cell only, so a module does not change when
    other clients join or leave (what exact unlearning relies on)."""
    return derive_seed(root_seed, "train", client_id, class_id)


def plan_module(cfg: Config, client_id: int | str, class_id: int, num_images: int) -> ModulePlan:
    mid = module_id(client_id, class_id)
    training = plan_training(cfg.generator, num_images, module_seed(cfg.run.seed, client_id, class_id), cfg.privacy,
                             desc=mid)
    return ModulePlan(mid, client_id, class_id, training)


def manifest_plan(cfg: Config, manifest: dict) -> ModulePlan:
    """The plan of the cell a module's manifest names, for the images it says it was trained on: what this run asks of
    a module it did not plan (one arriving at a server, or kept from an attempt on other images)."""
    return plan_module(cfg, manifest["client_id"], manifest["class_id"], manifest["num_samples"])


def plan_modules(cfg: Config, cells: dict[tuple[int | str, int], int]) -> dict[str, ModulePlan]:
    """Module id -> plan for every (client, class) cell with its image count, in the cells' order. Every plan is
    made before the caller trains anything, so a budget that cannot be met is refused before any training."""
    plans = [plan_module(cfg, k, c, n) for (k, c), n in cells.items()]
    return {p.module_id: p for p in plans}
