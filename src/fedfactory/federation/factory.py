"""The server's factory: a registry of module files, class-balanced synthesis, classifier training."""

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedfactory.config import Config
from fedfactory.errors import FedFactoryError
from fedfactory.generative.artifact import ModuleError, load_module, module_filename
from fedfactory.generative.train import expected_tensors, sample_module
from fedfactory.seeding import derive_seed


class SynthesisError(FedFactoryError, ValueError):
    """The modules cannot make a synthetic set: none at all, or image shapes that disagree."""


def module_spec(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The `expected` callback for artifact validation: a bad network config is a refused module."""
    try:
        return expected_tensors(manifest)
    except (ValueError, KeyError, TypeError) as e:
        raise ModuleError(f"module {manifest.get('module_id')}: network config does not define a valid network "
                          f"({e})") from None


def trained_as_asked(manifest: dict, cfg: Config) -> str | None:
    """Why a valid module was not trained as cfg asks (family, steps, batch size, seed), or None if it was."""
    t, g = manifest["training"], cfg.generator
    seed = derive_seed(cfg.run.seed, "train", manifest["client_id"], manifest["class_id"])
    # .get: the artifact schema requires only steps and seed, so a module may lack the other training fields.
    if manifest["family"] != g.family or t.get("steps") != g.steps or t.get("batch_size") != g.batch_size:
        return (f"trained as {manifest['family']} with {t.get('steps')} steps, batch {t.get('batch_size')}; "
                f"the run asks {g.family}, {g.steps} steps, batch {g.batch_size}")
    if t.get("seed") != seed:
        return f"trained with seed {t.get('seed')}, the run derives {seed}"
    return None


def load_registry(modules_dir: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Load and validate every module in a directory (the registry is the directory), sorted by module id."""
    modules = []
    for path in sorted(Path(modules_dir).glob("*.safetensors")):
        manifest, tensors = load_module(path, expected=module_spec)
        if path.name != module_filename(manifest["module_id"]):
            raise ModuleError(f"{path}: file name does not match module id {manifest['module_id']}; "
                              "rename or remove it")
        modules.append((manifest, tensors))
    return modules


def allocate(counts: list[int], total: int) -> list[int]:
    """Split `total` samples in proportion to `counts` (largest remainder; ties go to the earlier entry)."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0 or counts.sum() <= 0:
        return [0] * len(counts)
    exact = counts / counts.sum() * total
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")
    base[order[: total - int(base.sum())]] += 1
    return base.tolist()


def plan_synthesis(manifests: list[dict], num_classes: int, samples_per_class: int) -> dict[str, int]:
    """Module id -> how many images it contributes: each class gets samples_per_class images, drawn from its
    holders' modules in proportion to their real counts n_{k,c} (the mixture of the paper's class-wise factory)."""
    plan = {}
    for c in range(num_classes):
        holders = sorted((m for m in manifests if m["class_id"] == c), key=lambda m: m["module_id"])
        for m, n in zip(holders, allocate([m["num_samples"] for m in holders], samples_per_class), strict=True):
            plan[m["module_id"]] = n
    return plan


def synthesize(modules: list[tuple[dict, dict[str, torch.Tensor]]], num_classes: int, samples_per_class: int,
               root_seed: int, device: torch.device, batch_size: int = 500,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A class-balanced synthetic set as uint8 images (N, H, W, C) and int64 labels, plus the plan used."""
    if not modules:
        raise SynthesisError("no modules to synthesize from: the registry is empty (every cell may hold fewer than "
                             "generator.min_samples images)")
    plan = plan_synthesis([m for m, _ in modules], num_classes, samples_per_class)
    c, h, w = modules[0][0]["image_shape"]
    # Preallocate the uint8 set and fill it module by module: memory stays at samples x pixels bytes
    # (an 8-class x 10,000-image x 3x128x128 set is 3.9 GB; float32, or a list then a concatenate, would double it).
    images = np.empty((sum(plan.values()), h, w, c), dtype=np.uint8)
    labels = np.empty(len(images), dtype=np.int64)
    start = 0
    for manifest, tensors in tqdm(modules, desc="synthesis", unit="module", disable=not progress, leave=False):
        if tuple(manifest["image_shape"]) != (c, h, w):
            raise SynthesisError(f"module {manifest['module_id']} has image shape {manifest['image_shape']}, "
                             f"others {[c, h, w]}: all modules of a federation must share one image shape")
        n = plan.get(manifest["module_id"], 0)
        images[start:start + n] = sample_module(tensors, manifest, range(n), root_seed, device, batch_size)
        labels[start:start + n] = manifest["class_id"]
        start += n
    return images, labels, plan
