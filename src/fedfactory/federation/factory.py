"""The factory's rules: whether a module was trained as asked, class-balanced synthesis, the local training set,
the product of experts, and the bytes each client sends and receives."""

from dataclasses import replace

import numpy as np
import torch

from fedfactory.config import ClassifierConfig, GeneratorConfig
from fedfactory.data.images import ImageDataset
from fedfactory.errors import FedFactoryError
from fedfactory.federation.plan import ModulePlan
from fedfactory.generative.train import network_config, sample_module
from fedfactory.privacy.accounting import guarantee_problem
from fedfactory.progress import progress as progress_bar
from fedfactory.registry import Module


class SynthesisError(FedFactoryError, ValueError):
    """The modules cannot make a synthetic set: none at all, or image shapes that disagree."""


def trained_as_asked(manifest: dict, plan: ModulePlan, g: GeneratorConfig) -> str | None:
    """Why a valid module was not trained as its plan asks (family, network, steps, seed, recipe, privacy), or None
    if it was. The caller passes the module's one plan (federation/plan.py), the one its training read; `g` gives
    only the network the run builds for the module's image shape (the plan does not know the shape)."""
    if plan.module_id != manifest["module_id"]:
        raise ValueError(f"the plan of {plan.module_id} cannot judge module {manifest['module_id']}")
    t, training = manifest["training"], plan.training
    seed, asked = training.seed, dict(training.requested)
    # The plan's steps follow its image count when generator.steps_per_image is set (train.planned_steps).
    # .get: the artifact schema requires only steps and seed, so a module may lack the other training fields.
    if (manifest["family"] != training.family or t.get("steps") != asked["steps"]
            or t.get("batch_size") != asked["batch_size"]):
        return (f"trained as {manifest['family']} with {t.get('steps')} steps, batch {t.get('batch_size')}; "
                f"the run asks {training.family}, {asked['steps']} steps, batch {asked['batch_size']}")
    if t.get("seed") != seed:
        return f"trained with seed {t.get('seed')}, the run derives {seed}"
    net = network_config(g, tuple(manifest["image_shape"]))
    if manifest["network"] != net:
        return f"network {manifest['network']}; the run asks {net}"
    differ = [f"{k}={t.get(k)} where the run asks {v}" for k, v in asked.items() if t.get(k) != v]
    # A private module was not what a non-private run asked for either (the other direction is caught above).
    differ += [f"{k}={t[k]} where the run asks no differential privacy" for k in sorted(t)
               if k.startswith("dp_") and k not in asked]
    if differ:
        return f"trained with {', '.join(differ)}"
    if training.privacy is not None:
        # A manifest does not vouch for itself: its mechanisms are recomputed by the accountant against the run's ask.
        problem = guarantee_problem(manifest.get("privacy"), training.privacy.target_epsilon, training.privacy.delta)
        if problem:
            return f"not the guarantee the run asks: {problem}"
    return None


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


def synthesize(modules: list[Module], num_classes: int, samples_per_class: int,
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
    for manifest, tensors in progress_bar(modules, "synthesis", "module", progress):
        if tuple(manifest["image_shape"]) != (c, h, w):
            raise SynthesisError(f"module {manifest['module_id']} has image shape {manifest['image_shape']}, "
                             f"others {[c, h, w]}: all modules of a federation must share one image shape")
        n = plan.get(manifest["module_id"], 0)
        images[start:start + n] = sample_module(tensors, manifest, range(n), root_seed, device, batch_size)
        labels[start:start + n] = manifest["class_id"]
        start += n
    return images, labels, plan


def local_synthetic_count(real: int, samples_per_class: int, fill: str) -> int:
    """How many synthetic images of a class a client holding `real` images of it gets in local mode (see
    local_training_set)."""
    if fill not in ("missing", "all"):
        raise ValueError(f"fill={fill!r}: valid values are missing, all")
    return max(samples_per_class - (real if fill == "missing" else 0), 0)


def local_training_set(client: ImageDataset, modules: list[Module], samples_per_class: int, root_seed: int,
                       device: torch.device, batch_size: int,
                       fill: str = "missing", real_copies: int = 1) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A client's training set in local mode: all its real images, plus synthetic images per class.

    fill="missing": every class it holds fewer than samples_per_class real images of is topped up to
    samples_per_class; a class it holds at least that many real images of gets none. fill="all": every class gets
    samples_per_class synthetic images on top of the real ones (synthesis.local_synthetic).
    A class it lacks is synthesized from the other clients' modules of that class; a class it holds is synthesized
    from every module of that class it has (the others' and its own), in both cases by `synthesize`, mixed in
    proportion to the modules' real counts n_{k,c}. real_copies (synthesis.local_real_copies): the real images appear
    this many times; the synthetic counts do not change.
    """
    if real_copies < 1:
        raise ValueError(f"real_copies={real_copies}: must be >= 1")
    counts = np.bincount(client.labels, minlength=client.num_classes)
    images, labels, plan = [client.images] * real_copies, [client.labels] * real_copies, {}
    for c in range(client.num_classes):
        donors = [m for m in modules if m.manifest["class_id"] == c]
        need = local_synthetic_count(int(counts[c]), samples_per_class, fill)
        if need <= 0 or not donors:
            continue
        imgs, labs, part = synthesize(donors, client.num_classes, need, root_seed, device, batch_size, progress=False)
        images.append(imgs)
        labels.append(labs)
        plan |= {mid: n for mid, n in part.items() if n}
    return np.concatenate(images), np.concatenate(labels), plan


def expert_recipe(cfg: ClassifierConfig) -> ClassifierConfig:
    """A local-mode expert's classifier recipe: the classifier's, with classifier.local_epochs passes and
    classifier.local_width channels where they are set (0: the classifier's own). Every place that trains or loads an
    expert builds it from this recipe."""
    return replace(cfg, epochs=cfg.local_epochs or cfg.epochs, width=cfg.local_width or cfg.width)


def product_of_experts(log_probs: list[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, C) of a product of experts from each expert's log-probabilities (N, C).

    p(y | x) is proportional to prod_k p_k(y | x): sum the log-softmax outputs, then normalise with a
    log-sum-exp (shifting by the row maximum first), so very confident experts cannot overflow or underflow.
    """
    return softmax(np.sum(np.stack(log_probs), axis=0, dtype=np.float64))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float64 scores (N, C), shifted by the row maximum first so nothing overflows."""
    scores = scores - scores.max(axis=1, keepdims=True)
    return np.exp(scores - np.log(np.exp(scores).sum(axis=1, keepdims=True)))


def combine_experts(log_probs: list[np.ndarray], held: np.ndarray | None, rule: str) -> np.ndarray:
    """Class probabilities (N, C) of local mode's experts (classifier.combine), from each expert's log-probabilities
    (N, C) and held (K, C): the real images of each class expert k trained on (only "holders" needs it).

    "product": product_of_experts. "holders": class c's score is the mean of log p_k(c | x) over the experts
    weighted by their share of the real images of c (a class no expert holds: all experts alike); the scores are
    normalised with a softmax. An expert holding c trained on real images of c against synthetic images of the
    others, so it is the one that knows what a real c looks like; the other experts only ever saw decoded c. On
    Fashion-MNIST silos' validation split, holders only beat the product, and the more the holders' weight the
    better (benchmarks/results/combine-fashion-mnist-silos.md).
    """
    if not log_probs:
        raise ValueError("no expert to combine")
    if rule == "product":
        return product_of_experts(log_probs)
    if rule != "holders":
        raise ValueError(f"combine rule {rule!r}: valid rules are product, holders")
    expected = (len(log_probs), log_probs[0].shape[1])
    if held is None or np.shape(held) != expected:
        raise ValueError(f"the holders rule needs held: one row of real-image counts per expert, one column per class "
                         f"{expected}, got {None if held is None else np.shape(held)}")
    held = np.asarray(held, dtype=np.float64)
    if (held < 0).any():
        raise ValueError("held counts must be non-negative")
    total = held.sum(axis=0)
    weights = np.where(total > 0, held / np.maximum(total, 1), 1.0 / len(log_probs))
    return softmax(np.einsum("kc,knc->nc", weights, np.stack(log_probs).astype(np.float64)))


def module_guarantees(manifests: list[dict]) -> dict[str, dict | None]:
    """metrics.json's privacy: each module's differential-privacy guarantee from its manifest, None if it has none."""
    return {m["module_id"]: m.get("privacy") for m in sorted(manifests, key=lambda m: m["module_id"])}


def bytes_per_client(manifests: list[dict], sizes: dict[str, int], receivers: list[int] | None = None) -> dict:
    """metrics.json's bytes: uploads per client from the module file sizes, and downloads for local-mode receivers."""
    # Each client uploads its own modules; in local mode each receiver downloads every other client's (its own
    # never travel).
    up: dict[str, int] = {}
    sent: dict[str, int] = {}
    for m in manifests:
        up[str(m["client_id"])] = up.get(str(m["client_id"]), 0) + sizes[m["module_id"]]
        sent[str(m["client_id"])] = sent.get(str(m["client_id"]), 0) + 1
    doc = {"per_module": sizes, "per_client": up, "modules_per_client": sent, "total_up": sum(sizes.values())}
    if receivers is not None:
        down = {str(k): sum(sizes[m["module_id"]] for m in manifests if m["client_id"] != k) for k in receivers}
        doc |= {"down_per_client": down, "total_down": sum(down.values())}
    return doc
