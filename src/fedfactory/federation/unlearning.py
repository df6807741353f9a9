"""Exact modular unlearning: delete modules from a finished run, re-synthesize, retrain, and prove it bit for bit.

Deleting the modules G_{k,.} of a client k is exact because nothing else depends on them: every other module
was trained only on its own client's rows with the seed ("train", k', c), image i of module m depends only on
(root seed, m, i), and the classifier's seed is ("classifier",). The classifier retrained on the remaining
modules is therefore the one a run without k would have trained from the start; `verify=True` proves it by
retraining every remaining module from scratch and comparing weights bit for bit.

The unlearned run is a new directory built from a whitelist, so nothing derived from a removed module can
survive in it (synthetic images, classifier, BatchNorm statistics, metrics, sample grids, reports, caches):
- config.toml: the source config with run.out set to the new directory and reference.centralized=false, since
  the centralized reference pools the raw data of every client, the removed ones included;
- partition.json: the source partition without the withdrawn rows (client ids keep their numbers);
- modules/: byte copies of the remaining module files, validated again on load;
- what server_stage writes (samples.png, classifier.safetensors, metrics.json), log.txt and unlearning.json.

Local mode (classifier.mode=local) is unlearned the same way, except that there is no single classifier: every
remaining client's expert was trained on synthetic images that may come from the removed modules, so every
remaining client retrains its expert (local_stage), and the certificate lists those clients as the participants
the unlearning needs, and which of them had actually drawn images from a removed module.
The directory is assembled under a hidden temporary name and renamed into place when complete; report.html
is then written from it as `run` does.
"""

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedfactory.config import Config, apply, config_hash, load_config, to_toml
from fedfactory.data.datasets import load_data
from fedfactory.data.folders import read_class_folders
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram, implied_cells
from fedfactory.device import select_device
from fedfactory.errors import FedFactoryError
from fedfactory.federation.client import client_plans, train_client_modules
from fedfactory.federation.runner import (
    factory_stage,
    keep_released,
    read_release,
    record_release,
    server_stage,
    test_set_score,
)
from fedfactory.metrics import metrics_from_counts, score_counts
from fedfactory.modules.ids import client_name, client_of, module_filename, module_id
from fedfactory.modules.manifest import weights_sha256
from fedfactory.registry import Module, load_registry
from fedfactory.report import write_report
from fedfactory.runs import Timer, atomic_write_bytes, atomic_write_json, atomic_write_text, setup_logging, sha256_file

log = logging.getLogger("fedfactory")

CERTIFICATE_VERSION = 1
CLASS_GROUPS = {
    "only_removed": "classes whose every module was removed: no synthetic image of them remains",
    "shared": "classes the removed modules held together with remaining holders: re-weighted over those",
    "removed_any": "only_removed and shared together: every class a removed module held",
    "rest": "classes no removed module held",
}
_UNCOMPARED_METRICS = ("timings", "bytes")  # left out of the verification's metrics comparison (see there)


class UnlearningError(FedFactoryError, ValueError):
    """The unlearning request or the source run is unusable; the message says which and how to fix it."""


def default_out(run_dir: Path, clients=(), modules=()) -> Path:
    """A sibling of the run directory named after what is removed, e.g. runs/tiny-unlearn-client-3."""
    parts = [f"client-{k}" for k in clients] + list(modules)
    return run_dir.parent / f"{run_dir.name}-unlearn-{'-'.join(parts)}"


def read_object(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object of the source run holding `keys`; an unreadable or edited file is refused in one line."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnlearningError(f"{path} is unreadable ({e}); restore it or rerun the run") from None
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise UnlearningError(f"{path} is not as fedfactory wrote it (no {', '.join(missing)}); restore it or "
                              "rerun the run")
    return doc


def check_confusion(metrics: dict, num_classes: int, run_dir: Path) -> None:
    """The source metrics' confusion matrix, which the before/after accuracies are read from, fits the dataset."""
    try:
        shape = np.asarray(metrics["confusion_matrix"], dtype=np.int64).shape
    except (TypeError, ValueError):
        shape = None
    if shape != (num_classes, num_classes):
        raise UnlearningError(f"{run_dir / 'metrics.json'}: confusion_matrix is not {num_classes} x {num_classes} "
                              "counts; restore it or rerun the run")


def read_source(run_dir: Path) -> tuple[Config, dict, dict]:
    """The finished run's config, partition and metrics; refuses runs that cannot be unlearned exactly."""
    def require(name: str) -> None:
        if not (run_dir / name).exists():
            raise UnlearningError(f"{run_dir} has no {name}: not a finished run directory; finish it with "
                                  f"`fedfactory run --config {run_dir / 'config.toml'}` first")

    require("config.toml")
    cfg = load_config(str(run_dir / "config.toml"))
    for name in ("partition.json", "metrics.json", TRAINED[cfg.classifier.mode], "modules"):
        require(name)
    # A deployment's partition.json names its sites and holds only the counts they reported, no row indices.
    keys = ("sites",) if read_object(run_dir / "partition.json", ()).get("scheme") == "sites" else ("indices",)
    partition_doc = read_object(run_dir / "partition.json", (*keys, "histogram", "class_names"))
    metrics = read_object(run_dir / "metrics.json", ("accuracy", "confusion_matrix", "per_class_accuracy"))
    if metrics.get("config_hash") != config_hash(cfg):
        log.warning("%s/config.toml no longer hashes to the config recorded in metrics.json; the before/after "
                    "comparison may mix two configs", run_dir)
    return cfg, partition_doc, metrics


def client_parts(partition_doc: dict, train: ImageDataset, num_clients: int) -> list[np.ndarray]:
    """partition.json's index arrays, checked against the training set they index."""
    indices = partition_doc.get("indices")
    if not isinstance(indices, list) or len(indices) != num_clients:
        raise UnlearningError(f"partition.json must list indices for {num_clients} clients")
    if partition_doc.get("class_names") != list(train.class_names):
        raise UnlearningError("partition.json's class names differ from the dataset's: the data changed since the run")
    try:
        parts = [np.asarray(rows, dtype=np.int64).reshape(-1) for rows in indices]
    except (TypeError, ValueError):
        raise UnlearningError("partition.json's indices must be lists of row numbers") from None
    every = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(every) and (every.min() < 0 or every.max() >= len(train) or len(np.unique(every)) != len(every)):
        raise UnlearningError(f"partition.json indices must be distinct rows of the {len(train)}-image training set")
    if class_histogram(train.labels, parts, train.num_classes).tolist() != partition_doc.get("histogram"):
        raise UnlearningError("partition.json's histogram does not match its indices on this dataset: the data "
                              "changed since the run")
    return parts


def check_registry_matches(manifests: dict[str, dict], hist: np.ndarray, min_samples: int,
                           clients: list[int | str] | None = None, withheld: frozenset[str] = frozenset()) -> None:
    """Every (client, class) cell of the class histogram that implies a module has exactly one, trained on that many
    real images, unless the release check withheld it. `clients` names the histogram's rows (a deployment's sites);
    default 0, 1, ..."""
    clients = clients or list(range(len(hist)))
    held = {module_id(clients[k], c): n for (k, c), n in implied_cells(hist, min_samples).items()
            if module_id(clients[k], c) not in withheld}
    declared = {mid: m["num_samples"] for mid, m in manifests.items()}
    if held != declared:
        diff = sorted(set(held.items()) ^ set(declared.items()))[:3]
        raise UnlearningError(f"the registry does not match partition.json (module, samples): {diff}; the "
                              "run directory was edited or is unfinished")


def select_removed(manifests: dict[str, dict], num_clients: int, clients, modules, run_dir: Path) -> list[str]:
    """Module ids to delete: every module of each client in `clients`, plus the ids in `modules`."""
    if not clients and not modules:
        raise UnlearningError("nothing to unlearn: name at least one client or module")
    removed = set()
    sites = sorted({m["client_id"] for m in manifests.values() if isinstance(m["client_id"], str)})
    for k in clients:
        if sites and k not in sites:
            raise UnlearningError(f"unknown site {k!r}: {run_dir} has modules of sites {', '.join(sites)}")
        if not sites and (type(k) is not int or not 0 <= k < num_clients):
            raise UnlearningError(f"unknown client {k!r}: {run_dir} has clients 0..{num_clients - 1}")
        own = {mid for mid, m in manifests.items() if m["client_id"] == k}
        if not own:
            raise UnlearningError(f"client {k} has no modules in {run_dir / 'modules'} (already unlearned?)")
        removed |= own
    for mid in modules:
        try:
            module_filename(mid)
        except ValueError as e:
            raise UnlearningError(str(e)) from None
        if mid not in manifests:
            raise UnlearningError(f"unknown module {mid}: not in {run_dir / 'modules'}")
        removed.add(mid)
    if len(removed) == len(manifests):
        raise UnlearningError("that would remove every module: nothing would remain to synthesize from")
    return sorted(removed)


def class_groups(manifests: dict[str, dict], removed: list[str], num_classes: int) -> dict[str, list[int]]:
    """Split the classes by how the removal touches them (definitions in CLASS_GROUPS)."""
    holders = [{mid for mid, m in manifests.items() if m["class_id"] == c} for c in range(num_classes)]
    hit = [h & set(removed) for h in holders]
    groups = {
        "only_removed": [c for c in range(num_classes) if hit[c] and hit[c] == holders[c]],
        "shared": [c for c in range(num_classes) if hit[c] and hit[c] != holders[c]],
        "removed_any": [c for c in range(num_classes) if hit[c]],
        "rest": [c for c in range(num_classes) if not hit[c]],
    }
    return groups


def group_accuracy(confusion: list[list[int]], classes: list[int]) -> float | None:
    """Accuracy over the test images whose true class is in `classes` (rows of the confusion matrix)."""
    cm = np.asarray(confusion, dtype=np.int64)
    total = int(cm[classes].sum()) if classes else 0
    return float(cm[classes, classes].sum() / total) if total else None


def summarize(metrics: dict, groups: dict[str, list[int]]) -> dict:
    """Headline metrics, per-class accuracy and accuracy per class group, from a metrics.json."""
    out = {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "per_class_accuracy",
                                       "missing_classes", "synthesis_plan")}
    out["group_accuracy"] = {name: group_accuracy(metrics["confusion_matrix"], cs) for name, cs in groups.items()}
    ref = metrics.get("reference", {}).get("centralized")
    out["centralized_accuracy"] = ref["accuracy"] if ref else None
    return out


def module_record(path: Path, manifest: dict) -> dict:
    return {"module_id": manifest["module_id"], "client_id": manifest["client_id"], "class_id": manifest["class_id"],
            "class_name": manifest["class_name"], "num_samples": manifest["num_samples"],
            "file_sha256": sha256_file(path), "weights_sha256": manifest["weights_sha256"]}


def classifier_record(path: Path) -> dict:
    """File hash and canonical tensor hash (names, dtypes, shapes, bytes) of a saved classifier."""
    return {"file_sha256": sha256_file(path), "weights_sha256": weights_sha256(load_file(str(path)))}


TRAINED = {"server": "classifier.safetensors", "local": "experts"}  # what the stage of each mode trains


def trained_record(run_dir: Path, mode: str) -> dict:
    """classifier_record of the server's classifier, or {"experts": {name: record}} of every local expert."""
    if mode == "local":
        return {"experts": {p.stem: classifier_record(p) for p in sorted((run_dir / "experts").glob("*.safetensors"))}}
    return classifier_record(run_dir / "classifier.safetensors")


def trained_difference(a_dir: Path, b_dir: Path, mode: str) -> dict | None:
    """first_difference of the classifiers, or of each expert (named in the answer), of two run directories."""
    if mode != "local":
        return first_difference(load_file(str(a_dir / TRAINED[mode])), load_file(str(b_dir / TRAINED[mode])))
    a = {p.name for p in (a_dir / "experts").glob("*.safetensors")}
    b = {p.name for p in (b_dir / "experts").glob("*.safetensors")}
    for name in sorted(a | b):
        if name not in a or name not in b:
            return {"expert": name, "reason": f"only in the {'unlearned' if name in a else 'verification'} run"}
        found = first_difference(load_file(str(a_dir / "experts" / name)), load_file(str(b_dir / "experts" / name)))
        if found:
            return {"expert": name} | found
    return None


def local_participants(before: dict, parts: list[np.ndarray], removed: list[str]) -> dict:
    """Who a local-mode unlearning needs: every remaining client with data retrains its expert."""
    plans = before.get("synthesis_plan") or {}
    used = sorted(int(k) for k, plan in plans.items() if isinstance(plan, dict) and set(plan) & set(removed))
    return {"clients": [k for k, rows in enumerate(parts) if len(rows)],
            "used_removed_modules": used,
            "why": "local mode: every remaining client received the removed modules and trained its expert on "
                   "synthetic images that may come from them, so every remaining expert is retrained"}


def first_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict | None:
    """The first tensor (in name order) whose name, dtype, shape or bytes differ; None when bit-identical."""
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            return {"tensor": name, "reason": f"only in the {'unlearned' if name in a else 'verification'} classifier"}
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"tensor": name, "reason": f"{x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}"}
        # Compare bytes, not values: torch.equal calls -0.0 and 0.0 equal and NaN unequal to itself.
        if not torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else None
            return {"tensor": name, "reason": "values differ", "max_abs_diff": diff}
    return None


def withheld_modules(run_dir: Path) -> frozenset[str]:
    """Module ids the run's release check withheld (release.json)."""
    return frozenset(mid for mid, r in read_release(run_dir).items() if not r["released"])


def keep_release_records(run_dir: Path, stage: Path, removed: list[dict], clients) -> None:
    """The source run's release records without the removed modules' and the withdrawn clients' ones."""
    gone = {m["module_id"] for m in removed}
    withdrawn = {client_name(k) for k in clients}
    record_release(stage, [r for mid, r in read_release(run_dir).items()
                           if mid not in gone and client_of(mid) not in withdrawn])


def withdraw_rows(parts: list[np.ndarray], labels: np.ndarray, removed: list[dict], clients=()) -> list[np.ndarray]:
    """The partition without the removed modules' rows and without every row of a withdrawn client."""
    # A withdrawn client also loses its cells too small for a module: local mode would train its expert on them.
    parts = list(parts)
    for k in clients:
        parts[k] = parts[k][:0]
    for m in removed:
        k = m["client_id"]
        parts[k] = parts[k][labels[parts[k]] != m["class_id"]]
    return parts


def verify_from_scratch(cfg: Config, train: ImageDataset, test: ImageDataset, parts: list[np.ndarray],
                        expected: dict[str, Module], unlearned_metrics: dict, unlearned_dir: Path,
                        device: torch.device) -> dict:
    """Rerun the pipeline from scratch on the withdrawn partition and compare it with the unlearned run."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfactory-verify-") as tmp:
        tmp = Path(tmp)
        (tmp / "modules").mkdir()
        # Train every remaining (client, class) module with its own seed, as the original run did.
        trained, module_mismatches, module_difference = set(), [], None
        # Private modules draw their noise from OS entropy (privacy/dp.py: secret_generator), so no retraining
        # gives their bits back: the check then starts from the kept modules and covers everything downstream.
        private = cfg.privacy.epsilon > 0
        if private:
            for path in sorted((unlearned_dir / "modules").glob("*.safetensors")):
                shutil.copyfile(path, tmp / "modules" / path.name)
            record_release(tmp, list(read_release(unlearned_dir).values()))
            trained = set(expected)
        for k, rows in enumerate([] if private else parts):
            client = train.subset(rows)
            for t in train_client_modules(client, client_plans(client, k, cfg), cfg, device):
                # The release check runs again; a withheld module must be withheld again (metrics["release"]).
                full = keep_released(tmp, t)
                if full is None:
                    continue
                tensors = t.module.tensors
                mid = full["module_id"]
                trained.add(mid)
                if mid not in expected or full["weights_sha256"] != expected[mid].manifest["weights_sha256"]:
                    module_mismatches.append(mid)
                    if module_difference is None and mid in expected:
                        found = first_difference(expected[mid].tensors, tensors) or {"reason": "weights hash differs"}
                        module_difference = {"module_id": mid} | found
        missing = sorted(expected.keys() - trained)
        # The same synthesis, classifier and evaluation; the timer is the verification's own.
        metrics = factory_stage(cfg, load_registry(tmp / "modules"), parts, train, test, tmp, device, Timer())
        difference = trained_difference(unlearned_dir, tmp, cfg.classifier.mode)
        scratch = trained_record(tmp, cfg.classifier.mode)
    # Timings are wall clock, and module file sizes can differ by a byte or two because each manifest records
    # its own train_seconds; everything else in metrics.json must match.
    differing_metrics = sorted(k for k in metrics.keys() | unlearned_metrics.keys()
                               if k not in _UNCOMPARED_METRICS and metrics.get(k) != unlearned_metrics.get(k))
    verified = not module_mismatches and not missing and difference is None and not differing_metrics
    summary = ("classifier weights, metrics and every module are identical to a run without the removed modules"
               if verified else
               f"modules differing: {module_mismatches[:5]}, not retrained: {missing[:5]}, "
               f"first classifier difference: {difference}, metrics differing: {differing_metrics[:5]}")
    if private:
        summary += " (private modules: kept as they are, not retrained, since their noise is secret by design)"
    if module_mismatches:
        # CPU kernels split reductions by thread, so bits match only at the thread count that trained the modules.
        summary += (f" (retrained with {torch.get_num_threads()} torch threads on {device}; modules are "
                    "bit-reproducible only on the same device type and thread count as the original run: set "
                    "OMP_NUM_THREADS to the original's)")
    return {"verified": verified, "summary": summary, "modules_retrained": len(trained),
            "module_mismatches": module_mismatches, "modules_not_retrained": missing,
            "first_module_difference": module_difference, "first_classifier_difference": difference,
            "classifier": scratch, "metrics_identical": not differing_metrics,
            "seconds": round(time.perf_counter() - t0, 3)}


def deployment_stage(cfg: Config, partition_doc: dict, source: dict[str, dict], removed: list[str], clients,
                     run_dir: Path, before: dict, stage: Path, device: torch.device,
                     timer: Timer) -> tuple[dict, list[Module]]:
    """Unlearning in a deployment's run directory: the server holds the modules and the sites' counts, no data.

    The classifier is retrained from the remaining modules exactly as the server trained it; it is scored on
    data.test_root when the server owns one, otherwise not at all here (the test images stay at the sites).
    """
    class_names = tuple(partition_doc["class_names"])
    check_confusion(before, len(class_names), run_dir)
    sites, hist = list(partition_doc["sites"]), np.asarray(partition_doc["histogram"], dtype=np.int64)
    if hist.shape != (len(sites), len(class_names)):
        raise UnlearningError(f"{run_dir / 'partition.json'}: histogram is not sites x classes; restore it")
    check_registry_matches(source, hist, cfg.generator.min_samples, sites, withheld=withheld_modules(run_dir))
    for k in clients:
        hist[sites.index(k)] = 0
    for mid in removed:
        hist[sites.index(source[mid]["client_id"]), source[mid]["class_id"]] = 0
    withdrawn = sorted(set(partition_doc.get("withdrawn_modules", [])) | set(removed))
    atomic_write_json(stage / "partition.json", partition_doc | {"histogram": hist.tolist(),
                                                                 "withdrawn_modules": withdrawn})
    atomic_write_text(stage / "config.toml", to_toml(cfg))
    keep_release_records(run_dir, stage, [source[mid] for mid in removed], clients)
    for mid in source:
        if mid not in removed:
            name = module_filename(mid)
            atomic_write_bytes(stage / "modules" / name, (run_dir / "modules" / name).read_bytes())
    registry = load_registry(stage / "modules")
    if cfg.data.test_root:
        score = test_set_score(read_class_folders(cfg.data.test_root, class_names, cfg.data.image_size), device)
    else:
        log.info("not scored: the test images of a deployment stay at its sites; rerun the federation, or set "
                 "data.test_root to a test set the server owns")
        empty = score_counts(np.zeros((0, len(class_names))), np.zeros(0, np.int64), len(class_names))
        score = lambda model, blur: metrics_from_counts(**empty, class_names=class_names)  # noqa: E731
    after = server_stage(cfg, registry, class_names, score, stage, device, timer, test_name="no test set here")
    return after, registry


def unlearn(run_dir, clients=(), modules=(), out=None, verify: bool = False) -> dict:
    """Write a new run directory without the given clients' (or modules') modules; returns the certificate."""
    run_dir = Path(run_dir)
    clients, modules = tuple(clients), tuple(modules)
    cfg, partition_doc, before = read_source(run_dir)
    if partition_doc.get("scheme") == "sites" and cfg.classifier.mode == "local":
        # The experts are trained on the sites' real images, which the server's run directory does not hold.
        raise UnlearningError(f"{run_dir} is a deployment in local mode: every remaining site must retrain its expert "
                              "on its own data; rerun the federation without the site (fedfactory unlearn retrains "
                              "only what the server holds, the classifier of server mode)")
    out = Path(out) if out is not None else default_out(run_dir, clients, modules)
    if out.exists():
        raise UnlearningError(f"{out} already exists; choose another --out or delete it")

    # Validate the source registry (hashes included) and the request before writing anything.
    source = {m["module_id"]: m for m, _ in load_registry(run_dir / "modules")}
    removed = select_removed(source, cfg.data.num_clients, clients, modules, run_dir)
    remaining = [mid for mid in source if mid not in removed]
    removed_records = [module_record(run_dir / "modules" / module_filename(mid), source[mid]) for mid in removed]

    new_cfg = apply(cfg, {"run.out": str(out), "reference.centralized": False})
    device = select_device(new_cfg.run.device, new_cfg.run.threads)
    timer = Timer()
    stage = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir(parents=True)
    try:
        (stage / "modules").mkdir()
        setup_logging(stage)
        log.info("unlearning %s from %s into %s", ", ".join(removed), run_dir, out)

        if partition_doc.get("scheme") == "sites":
            class_names, parts, train, test = tuple(partition_doc["class_names"]), None, None, None
            after, registry = deployment_stage(new_cfg, partition_doc, source, removed, clients, run_dir, before,
                                               stage, device, timer)
            withdrawn = sorted(set(partition_doc.get("withdrawn_modules", [])) | set(removed))
        else:
            # Load the data and withdraw the removed modules' rows from the partition.
            t0 = time.perf_counter()
            train, test = load_data(new_cfg.data)
            parts = client_parts(partition_doc, train, cfg.data.num_clients)
            check_confusion(before, train.num_classes, run_dir)
            check_registry_matches(source, class_histogram(train.labels, parts, train.num_classes),
                                   cfg.generator.min_samples, withheld=withheld_modules(run_dir))
            parts = withdraw_rows(parts, train.labels, [source[mid] for mid in removed], clients)
            withdrawn = sorted(set(partition_doc.get("withdrawn_modules", [])) | set(removed))
            atomic_write_json(stage / "partition.json", partition_doc | {
                "histogram": class_histogram(train.labels, parts, train.num_classes).tolist(),
                "indices": [p.tolist() for p in parts], "withdrawn_modules": withdrawn})
            atomic_write_text(stage / "config.toml", to_toml(new_cfg))
            timer.add("data", time.perf_counter() - t0)

            # Copy the remaining modules (loading them again re-checks every hash) and the release checks of the
            # remaining clients' modules, withheld ones included.
            keep_release_records(run_dir, stage, [source[mid] for mid in removed], clients)
            for mid in remaining:
                name = module_filename(mid)
                atomic_write_bytes(stage / "modules" / name, (run_dir / "modules" / name).read_bytes())
            registry = load_registry(stage / "modules")

            # Re-synthesize, retrain and evaluate exactly as a run does.
            after = factory_stage(new_cfg, registry, parts, train, test, stage, device, timer)
            class_names = train.class_names
        unlearn_seconds = round(time.perf_counter() - timer.start, 3)
        new_classifier = trained_record(stage, new_cfg.classifier.mode)
        groups = class_groups(source, removed, len(class_names))
        certificate = {
            "format_version": CERTIFICATE_VERSION,
            "source_run": str(run_dir),
            "source_config_hash": before.get("config_hash"),
            "source_classifier": trained_record(run_dir, cfg.classifier.mode),
            "out": str(out),
            "requested": {"clients": list(clients), "modules": list(modules)},
            "removed_modules": removed_records,
            "remaining_modules": [module_record(stage / "modules" / module_filename(m["module_id"]), m)
                                  for m, _ in registry],
            "withdrawn_modules_total": withdrawn,
            # Modules of the remaining clients that the release check kept at their sites, in both runs.
            "withheld_modules": sorted(withheld_modules(stage)),
            "seed": new_cfg.run.seed,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "config_hash": config_hash(new_cfg),
            "classifier": new_classifier,
            "centralized_reference": ("disabled (reference.centralized=false): it pools the raw training data of "
                                      "every client, the removed ones included"),
            "class_groups": {"definitions": CLASS_GROUPS} | {
                name: [class_names[c] for c in cs] for name, cs in groups.items()},
            "before": summarize(before, groups),
            "after": summarize(after, groups),
            "seconds": {"unlearn": unlearn_seconds, "verify": None},
            "timings": after["timings"],
            "verified": None,
        }
        if new_cfg.classifier.mode == "local":
            certificate |= {"mode": "local", "participants": local_participants(before, parts, removed)}
        if verify and train is None:
            reason = ("verification retrains the remaining modules from their real images, which stay at the sites "
                      "of a deployment; run it where the data is (or rerun the federation without the site and "
                      "compare the classifiers)")
            log.info("verification skipped: %s", reason)
            certificate["verification"] = {"skipped": reason}
        elif verify:
            log.info("verifying: retraining %d modules from scratch without the removed ones", len(remaining))
            certificate["verification"] = verify_from_scratch(new_cfg, train, test, parts, {
                m.manifest["module_id"]: m for m in registry}, after, stage, device)
            certificate["verified"] = certificate["verification"]["verified"]
            certificate["seconds"]["verify"] = certificate["verification"]["seconds"]
            log.info("verification %s: %s", "passed" if certificate["verified"] else "FAILED",
                     certificate["verification"]["summary"])
        atomic_write_json(stage / "unlearning.json", certificate)
        os.rename(stage, out)
    except BaseException:
        # A failed unlearning leaves nothing behind; the source run was only ever read.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # Written in place, as `run` does: the report names its directory, and shows only the remaining modules.
    log.info("report: %s", write_report(out, device=device))
    log.info("unlearned run written to %s in %.1fs (certificate: %s)", out, unlearn_seconds, out / "unlearning.json")
    return certificate
