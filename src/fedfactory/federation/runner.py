"""The in-process runner: every client and the server in one process, writing one run directory.

Orchestration only: each stage is a call into the client, factory and classifier functions that compare,
unlearning and the Flower apps call too:
load data -> partition -> client modules (G_{k,c}, one file each) -> synthesis -> classifier -> evaluation.
"""

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from fedfactory.classifier import TrainingError, predict_log_proba, predict_proba, train_classifier
from fedfactory.config import Config, config_hash
from fedfactory.data.datasets import load_data
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram, format_histogram, implied_cells, split_clients
from fedfactory.device import select_device
from fedfactory.federation.client import Trained, module_jobs, train_modules
from fedfactory.federation.factory import (
    bytes_per_client,
    combine_experts,
    expert_recipe,
    local_training_set,
    module_guarantees,
    synthesize,
    trained_as_asked,
)
from fedfactory.federation.intake import (
    class_shares,
    flat_plan,
    partition_mismatches,
    release_summary,
    reusable_modules,
    trust_record,
)
from fedfactory.federation.plan import ModulePlan, manifest_plan, plan_modules
from fedfactory.metrics import evaluate, format_table
from fedfactory.modules.files import save_module, tensors_to_bytes
from fedfactory.modules.ids import client_name, module_filename
from fedfactory.modules.refusal import ModuleError
from fedfactory.privacy.accounting import PrivacyBudgetError
from fedfactory.registry import Module, load_registry, load_registry_file
from fedfactory.report import write_report, write_samples_png
from fedfactory.runs import Timer, atomic_write_bytes, atomic_write_json, check_run_dir, prepare_run_dir, setup_logging
from fedfactory.seeding import derive_seed
from fedfactory.workers import run_jobs

log = logging.getLogger("fedfactory")


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run works in: its config, the directory it writes, the device and the timer; and the
    data where this process holds it (a simulation). A deployment's server holds none: train, test, parts are None.

    A stage that writes elsewhere or times itself apart takes `dataclasses.replace(ctx, out=..., timer=Timer())`.
    """

    cfg: Config
    out: Path
    device: torch.device
    timer: Timer
    train: ImageDataset | None = None
    test: ImageDataset | None = None
    parts: list[np.ndarray] | None = None  # row indices of train, one array per client


def write_partition(ctx: RunContext) -> None:
    """partition.json (scheme, class histogram, row indices per client), and the histogram in the log."""
    cfg, train, parts = ctx.cfg, ctx.train, ctx.parts
    hist = class_histogram(train.labels, parts, train.num_classes)
    atomic_write_json(ctx.out / "partition.json", {
        "scheme": cfg.data.partition, "num_clients": len(parts), "class_names": list(train.class_names),
        "histogram": hist.tolist(), "indices": [p.tolist() for p in parts]})
    log.info("partition (%s), samples per client and class:\n%s", cfg.data.partition,
             format_histogram(hist, train.class_names))


def kept_modules(modules_dir: Path, cfg: Config,
                 plans: Mapping[str, ModulePlan] = MappingProxyType({})) -> dict[str, int]:
    """Module id -> images trained on, for every finished module of an earlier attempt that validates and was trained
    as asked; intake.reusable_modules picks the ones a holder may skip (trained on as many images as it holds now).

    `plans`: the run's plans by module id, where it has made them. A module is judged by its cell's plan when that is
    for the images it was trained on, else by plan.manifest_plan: kept here, reusable_modules then says why it
    retrains (the partition holds other images).
    """
    kept = {}
    for path in sorted(Path(modules_dir).glob("*.safetensors")):
        try:
            manifest = load_registry_file(path).manifest
            plan = plans.get(manifest["module_id"])
            if plan is None or plan.num_images != manifest["num_samples"]:
                plan = manifest_plan(cfg, manifest)
        except (ModuleError, PrivacyBudgetError) as e:
            log.info("retraining %s: %s", path.name, e)
            continue
        if reason := trained_as_asked(manifest, plan, cfg.generator):
            log.info("retraining %s: %s", path.name, reason)
            continue
        kept[manifest["module_id"]] = manifest["num_samples"]
    return kept


def check_against_partition(modules: list[Module], train: ImageDataset, parts: list[np.ndarray]) -> list[Module]:
    """The registry's modules, after checking each one's num_samples is its cell's count in the partition (a
    module that says otherwise would weigh its class by images its client does not hold)."""
    bad = partition_mismatches([m for m, _ in modules], class_histogram(train.labels, parts, train.num_classes))
    if bad:
        raise ModuleError(f"{len(bad)} modules disagree with the partition, e.g. {bad[0]}; remove them from the "
                          "run's modules/ folder (they retrain) or run in a fresh run.out")
    return modules


def train_all_modules(ctx: RunContext) -> None:
    """Every client trains its modules; each is written atomically to the registry directory."""
    cfg, train, parts, out = ctx.cfg, ctx.train, ctx.parts, ctx.out
    # One plan per module, all made before the first module trains: a privacy budget that cannot be met is refused
    # before any training is wasted, and training and reuse read the same plan.
    hist = class_histogram(train.labels, parts, train.num_classes)
    plans = plan_modules(cfg, implied_cells(hist, cfg.generator.min_samples))
    kept = kept_modules(out / "modules", cfg, plans)
    reusable = set(reusable_modules(kept, {mid: p.num_images for mid, p in plans.items()}))

    def reuse(plan: ModulePlan) -> bool:
        if plan.module_id in reusable:
            log.info("reusing %s (hash checked)", module_filename(plan.module_id))
        elif plan.module_id in kept:
            log.info("retraining %s: trained on %d images, the partition holds %d", module_filename(plan.module_id),
                     kept[plan.module_id], plan.num_images)
        return plan.module_id in reusable

    jobs = []
    for k, rows in enumerate(parts):
        client = train.subset(rows)
        few = {c: int(n) for c, n in enumerate(hist[k]) if 0 < n < cfg.generator.min_samples}
        if few:
            log.info("client %d: no module for %s (fewer than generator.min_samples=%d images)", k,
                     ", ".join(f"class {c} ({n} images)" for c, n in few.items()), cfg.generator.min_samples)
        jobs += module_jobs(client, [p for p in plans.values() if p.client_id == k and not reuse(p)], cfg, ctx.device)

    # Every client's modules, run.workers at a time: in a federation each site trains on its own machine.
    if not jobs:
        return
    t0 = time.perf_counter()
    for trained in train_modules(jobs, cfg.run.workers):
        if keep_released(out, trained) is not None:
            manifest = trained.module.manifest
            log.info("client %d class %d (%s): %d images, %d steps in %.1fs, %d bytes", manifest["client_id"],
                     manifest["class_id"], manifest["class_name"], manifest["num_samples"],
                     manifest["training"]["steps"], trained.seconds,
                     (out / "modules" / module_filename(manifest["module_id"])).stat().st_size)
    ctx.timer.add("client_training", time.perf_counter() - t0)


def keep_released(out: Path, trained: Trained) -> dict | None:
    """Write a trained module to the registry if the release check passed it; record the verdict in release.json
    either way. Returns the written module's full manifest, None for a withheld module."""
    r = trained.release
    record_release(out, [r])
    if not trained.released:
        log.info("%s withheld by the release check: %.1f%% of %d samples are near-copies of its %d training images "
                 "(reference: %s), above release.max_copy_fraction=%g", r["module_id"], 100 * r["copy_fraction"],
                 r["num_synthetic"], r["num_samples"], r["reference"], r["max_copy_fraction"])
        return None
    return save_module(out / "modules" / module_filename(r["module_id"]), trained.module.tensors,
                       trained.module.manifest)


def record_release(out: Path, records: list[dict]) -> None:
    """Merge release-check records into out/release.json (module id -> record): a resumed run keeps the earlier
    ones, and a module checked again replaces its record."""
    # Sorted by module id: modules finish in any order when run.workers > 1.
    merged = read_release(out) | {r["module_id"]: r for r in records}
    atomic_write_json(out / "release.json", dict(sorted(merged.items())))


def read_release(out: Path) -> dict[str, dict]:
    """out/release.json's records, {} where the run has none (a run from before the release check)."""
    path = out / "release.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_classifier(model: torch.nn.Module, path: Path) -> None:
    """Write the classifier's weights as safetensors, atomically; refuses weights that are not finite."""
    # A NaN loss leaves NaN weights, whose predictions would still give a (meaningless) accuracy.
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"{path.stem}: training diverged, tensors {', '.join(bad[:3])} hold NaN or Inf; lower "
                            "classifier.lr or check the training images")
    # Serialized in memory: a temp file of our own would outlive a kill, and only atomic_write_bytes cleans up.
    atomic_write_bytes(path, tensors_to_bytes(model.state_dict()))


def input_blur(cfg: Config, modules: list[Module]) -> float:
    """The classifier's input low-pass sigma: the mean of the blur the clients measured, if matching is on."""
    sigmas = [m["training"].get("blur_sigma", 0.0) for m, _ in modules]
    return round(float(np.mean(sigmas)), 4) if cfg.classifier.match_sharpness and sigmas else 0.0


def centralized_reference(ctx: RunContext, blur: float, metrics: dict) -> list[tuple[str, dict]]:
    """If asked, train the same classifier and recipe on the pooled real data; adds metrics["reference"]."""
    cfg, train, test = ctx.cfg, ctx.train, ctx.test
    if not cfg.reference.centralized:
        return []
    t0 = time.perf_counter()
    model = train_classifier(train.images, train.labels, train.num_classes, cfg.classifier,
                             derive_seed(cfg.run.seed, "classifier"), ctx.device, desc="centralized",
                             progress=cfg.run.progress, input_blur=blur)
    ref = evaluate(predict_proba(model, test.images, ctx.device), test.labels, test.class_names)
    ctx.timer.add("reference", time.perf_counter() - t0)
    metrics["reference"] = {"centralized": ref, "accuracy_ratio": metrics["accuracy"] / ref["accuracy"]}
    return [("centralized", ref)]


def write_metrics(ctx: RunContext, metrics: dict, rows: list[tuple[str, dict]], blur: float) -> str:
    """Add the keys every run records, write metrics.json atomically, return the printed results table."""
    metrics |= {"generator_family": ctx.cfg.generator.family, "classifier_input_blur": blur,
                "device": str(ctx.device), "config_hash": config_hash(ctx.cfg)}
    atomic_write_json(ctx.out / "metrics.json", metrics)
    table = format_table(rows)
    if "reference" in metrics:
        table += f"\naccuracy relative to centralized: {metrics['reference']['accuracy_ratio']:.4f}"
    return table


Score = Callable[[torch.nn.Module, float], dict]  # (classifier, its input blur) -> metrics (metrics.py's keys)


def test_set_score(test: ImageDataset, device: torch.device) -> Score:
    """Score a classifier on a test set held here."""
    return lambda model, blur: evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)


def server_stage(ctx: RunContext, modules: list[Module], class_names: tuple[str, ...], score: Score,
                 test_name: str = "test set") -> dict:
    """Synthesize a class-balanced set from the modules, train the classifier, score it; write the results.

    `score` evaluates the classifier: on a test set held here, or by the sites of a deployment (counts only). The
    centralized reference pools ctx's real data, when this process holds it.
    """
    cfg, out, device, timer = ctx.cfg, ctx.out, ctx.device, ctx.timer
    num_classes = len(class_names)
    t0 = time.perf_counter()
    images, labels, plan = synthesize(modules, num_classes, cfg.synthesis.samples_per_class, cfg.run.seed,
                                      device, cfg.synthesis.batch_size, progress=cfg.run.progress)
    timer.add("synthesis", time.perf_counter() - t0)
    log.info("synthesized %d images from %d modules in %.1fs", len(images), len(modules), timer.timings["synthesis"])
    write_samples_png(images, labels, class_names, out / "samples.png")

    blur = input_blur(cfg, modules)
    t0 = time.perf_counter()
    model = train_classifier(images, labels, num_classes, cfg.classifier,
                             derive_seed(cfg.run.seed, "classifier"), device, progress=cfg.run.progress,
                             input_blur=blur)
    timer.add("classifier", time.perf_counter() - t0)
    save_classifier(model, out / "classifier.safetensors")

    t0 = time.perf_counter()
    metrics = score(model, blur)
    timer.add("evaluation", time.perf_counter() - t0)
    timer.add("end_to_end", time.perf_counter() - timer.start)

    # Centralized reference: the same classifier and recipe on the pooled real training data.
    rows = [("factory-server", metrics)]
    if ctx.train is not None:
        rows += centralized_reference(ctx, blur, metrics)

    sizes = {p.stem: p.stat().st_size for p in sorted((out / "modules").glob("*.safetensors"))}
    present = {m["class_id"] for m, _ in modules}
    metrics |= {
        "timings": timer.timings,
        "bytes": bytes_per_client([m for m, _ in modules], sizes),
        "privacy": module_guarantees([m for m, _ in modules]),
        "synthesis_plan": plan,
        "modules": sorted(sizes),
        "missing_classes": [class_names[c] for c in range(num_classes) if c not in present],
    }
    table = write_metrics(ctx, metrics, rows, blur)
    if metrics["missing_classes"]:
        log.info("no module for classes %s: the classifier never sees them", metrics["missing_classes"])
    log.info("results (%s, %d test images):\n%s", test_name, metrics["num_test"], table)
    log.info("timings (s): %s", json.dumps(timer.timings))
    return metrics


def expert_path(out: Path, client_id: int) -> Path:
    return out / "experts" / f"{client_name(client_id)}.safetensors"


@dataclass(frozen=True)
class ExpertJob:
    """What local mode's client k needs to train its expert (train_expert), in a worker process or here."""

    client_id: int
    client: ImageDataset  # its real images
    modules: list[Module]  # every module it receives
    test_images: np.ndarray
    cfg: Config
    input_blur: float
    device: torch.device


def train_expert(job: ExpertJob) -> tuple[torch.nn.Module, np.ndarray, dict[str, int], dict[str, float]]:
    """Local mode, one client: its training set (local_training_set), its expert, the expert's test
    log-probabilities; with the synthesis plan and each step's seconds."""
    cfg, device, seconds = job.cfg, job.device, {}
    t0 = time.perf_counter()
    images, labels, plan = local_training_set(job.client, job.modules, cfg.synthesis.samples_per_class, cfg.run.seed,
                                              device, cfg.synthesis.batch_size, cfg.synthesis.local_synthetic,
                                              cfg.synthesis.local_real_copies)
    seconds["synthesis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = train_classifier(images, labels, job.client.num_classes, expert_recipe(cfg.classifier),
                             derive_seed(cfg.run.seed, "classifier", job.client_id), device,
                             desc=f"expert {job.client_id}", progress=cfg.run.progress and cfg.run.workers == 1,
                             input_blur=job.input_blur)
    seconds["classifier"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_probs = predict_log_proba(model, job.test_images, device)
    seconds["evaluation"] = time.perf_counter() - t0
    return model, log_probs, plan, seconds


def local_stage(ctx: RunContext, modules: list[Module]) -> dict:
    """Local mode: each client with data trains an expert on its real data and the modules it receives (every
    other client's); the experts' predictions are combined by classifier.combine (combine_experts). Writes experts/
    and metrics.json to ctx.out; module sizes come from ctx.out/modules.
    """
    cfg, out, device, timer = ctx.cfg, ctx.out, ctx.device, ctx.timer
    train, test, parts = ctx.train, ctx.test, ctx.parts
    sizes = {p.stem: p.stat().st_size for p in sorted((out / "modules").glob("*.safetensors"))}
    blur = input_blur(cfg, modules)
    (out / "experts").mkdir(exist_ok=True)
    log_probs, plans, expert_accuracy = [], {}, {}
    # A client whose every row was withdrawn has no data, no modules and no expert, and receives nothing.
    experts = [k for k, rows in enumerate(parts) if len(rows)]
    jobs = [ExpertJob(k, train.subset(parts[k]), modules, test.images, cfg, blur, device) for k in experts]
    # run.workers experts at a time, in client order (every expert's set is topped up to about the same size): in a
    # federation each site trains its own. The stage timings below add up each expert's seconds, so with several
    # workers they can exceed the wall clock (end_to_end).
    for job, (model, lp, plan, seconds) in zip(jobs, run_jobs(train_expert, jobs, cfg.run.workers, device),
                                               strict=True):
        for stage, dt in seconds.items():
            timer.add(stage, dt)
        save_classifier(model, expert_path(out, job.client_id))
        plans[str(job.client_id)] = plan
        log_probs.append(lp)
        expert_accuracy[str(job.client_id)] = float((lp.argmax(1) == test.labels).mean())
        log.info("expert %d: %d real + %d synthetic images, alone %.4f on the test set", job.client_id,
                 len(job.client), sum(plan.values()), expert_accuracy[str(job.client_id)])
    if not log_probs:
        raise ValueError("local mode: no client holds any data, so there is no expert to combine")

    t0 = time.perf_counter()
    holdings = np.stack([np.bincount(train.labels[parts[k]], minlength=train.num_classes) for k in experts])
    metrics = evaluate(combine_experts(log_probs, holdings, cfg.classifier.combine), test.labels, test.class_names)
    timer.add("evaluation", time.perf_counter() - t0)
    timer.add("end_to_end", time.perf_counter() - timer.start)

    rows = [("factory-local", metrics)] + centralized_reference(ctx, blur, metrics)

    held = set(np.flatnonzero(holdings.sum(axis=0)).tolist())
    metrics |= {
        "mode": "local",
        "timings": timer.timings,
        "bytes": bytes_per_client([m for m, _ in modules], sizes, receivers=experts),
        "privacy": module_guarantees([m for m, _ in modules]),
        "synthesis_plan": plans,
        "expert_accuracy": expert_accuracy,
        "experts": sorted(expert_accuracy, key=int),
        "modules": sorted(sizes),
        "missing_classes": [train.class_names[c] for c in range(train.num_classes) if c not in held],
    }
    table = write_metrics(ctx, metrics, rows, blur)
    log.info("results (%s, %d test images, %d experts combined by %s):\n%s", test.name, len(test), len(log_probs),
             cfg.classifier.combine, table)
    log.info("timings (s): %s", json.dumps(timer.timings))
    return metrics


def factory_stage(ctx: RunContext, modules: list[Module]) -> dict:
    """The stage that follows the clients for cfg's classifier mode, on the data ctx holds: server_stage or
    local_stage."""
    cfg, train, test, parts, out = ctx.cfg, ctx.train, ctx.test, ctx.parts, ctx.out
    if cfg.classifier.mode == "local":
        metrics = local_stage(ctx, modules)
    else:
        metrics = server_stage(ctx, modules, train.class_names, test_set_score(test, ctx.device), test_name=test.name)
    # How much each client weighs in each class, in fedfactory run and a Flower simulation alike (a deployment's
    # server records the same from the sites' reports).
    histogram = class_histogram(train.labels, parts, train.num_classes)
    metrics["release"] = release_summary(read_release(out), histogram, list(range(len(parts))), train.class_names,
                                         cfg.generator.min_samples, cfg.release.max_copy_fraction)
    counts = {str(k): {train.class_names[c]: int(n) for c, n in enumerate(row) if n} for k, row in enumerate(histogram)}
    metrics["trust"] = trust_record(None, sorted(counts), simulation=True)
    metrics["site_shares"] = class_shares(counts, flat_plan(metrics["synthesis_plan"]), [m for m, _ in modules],
                                          train.class_names)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def start_run(cfg: Config, kind: str = "run") -> RunContext:
    """Open the run directory and its log, choose the device, load the data and write the partition.

    Shared by the in-process runner, compare and the Flower server's simulation.
    """
    # Every refusal (run directory, dataset files, partition) comes before the first write: a run that cannot
    # start leaves no directory behind, and an existing one untouched.
    check_run_dir(cfg)
    device = select_device(cfg.run.device, cfg.run.threads)
    timer = Timer()
    t0 = time.perf_counter()
    train, test = load_data(cfg.data)
    parts = split_clients(cfg.data, cfg.run.seed, train)
    timer.add("data", time.perf_counter() - t0)
    out = prepare_run_dir(cfg).resolve()
    setup_logging(out)
    log.info("%s %s on %s, config %s", kind, out, device, config_hash(cfg)[:12])
    ctx = RunContext(cfg, out, device, timer, train, test, parts)
    write_partition(ctx)
    return ctx


def run(cfg: Config) -> dict:
    """Run the whole method in one process; returns the metrics written to metrics.json."""
    ctx = start_run(cfg)

    # Clients: one module per held class, trained from scratch.
    train_all_modules(ctx)

    # Server mode: validate the registry, synthesize, train and evaluate the classifier.
    # Local mode: every client trains an expert on its data and the modules it receives; experts are multiplied.
    modules = check_against_partition(load_registry(ctx.out / "modules"), ctx.train, ctx.parts)
    metrics = factory_stage(ctx, modules)
    log.info("report: %s", write_report(ctx.out, device=ctx.device))
    return metrics
