"""The unlearning certificate (unlearning.json): what was removed and what stayed, each with its file and weights
hashes, the retrained classifier's hashes, and accuracy before and after per class group (docs/unlearning.md)."""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedfactory.config import config_hash
from fedfactory.federation.runner import RunContext, read_release
from fedfactory.federation.unlearning.plan import CLASS_GROUPS, UnlearningPlan, withheld
from fedfactory.modules.ids import module_filename
from fedfactory.modules.manifest import weights_sha256
from fedfactory.registry import Module
from fedfactory.runs import atomic_write_json, sha256_file

CERTIFICATE_VERSION = 1


def module_record(path: Path, manifest: dict) -> dict:
    return {"module_id": manifest["module_id"], "client_id": manifest["client_id"], "class_id": manifest["class_id"],
            "class_name": manifest["class_name"], "num_samples": manifest["num_samples"],
            "file_sha256": sha256_file(path), "weights_sha256": manifest["weights_sha256"]}


def classifier_record(path: Path) -> dict:
    """File hash and canonical tensor hash (names, dtypes, shapes, bytes) of a saved classifier."""
    return {"file_sha256": sha256_file(path), "weights_sha256": weights_sha256(load_file(str(path)))}


def trained_record(run_dir: Path, mode: str) -> dict:
    """classifier_record of the server's classifier, or {"experts": {name: record}} of every local expert."""
    if mode == "local":
        return {"experts": {p.stem: classifier_record(p) for p in sorted((run_dir / "experts").glob("*.safetensors"))}}
    return classifier_record(run_dir / "classifier.safetensors")


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


def build_certificate(plan: UnlearningPlan, ctx: RunContext, source: Path, manifests: dict[str, dict], before: dict,
                      out: Path, registry: list[Module], after: dict, seconds: float) -> dict:
    """The certificate of an unlearning whose new run directory is assembled in ctx.out (renamed to `out` later);
    `verified` stays None until record_verification."""
    cfg, stage = ctx.cfg, ctx.out
    doc = {
        "format_version": CERTIFICATE_VERSION,
        "source_run": str(source),
        "source_config_hash": before.get("config_hash"),
        "source_classifier": trained_record(source, plan.mode),
        "out": str(out),
        "requested": {"clients": list(plan.clients), "modules": list(plan.modules)},
        "removed_modules": [module_record(source / "modules" / module_filename(mid), manifests[mid])
                            for mid in plan.removed],
        "remaining_modules": [module_record(stage / "modules" / module_filename(m["module_id"]), m)
                              for m, _ in registry],
        "withdrawn_modules_total": list(plan.withdrawn),
        # Modules of the remaining clients that the release check kept at their sites, in both runs.
        "withheld_modules": sorted(withheld(read_release(stage))),
        "seed": cfg.run.seed,
        "device": str(ctx.device),
        "torch_threads": torch.get_num_threads(),
        "config_hash": config_hash(cfg),
        "classifier": trained_record(stage, plan.mode),
        "centralized_reference": ("disabled (reference.centralized=false): it pools the raw training data of "
                                  "every client, the removed ones included"),
        "class_groups": {"definitions": CLASS_GROUPS} | {
            name: [plan.class_names[c] for c in cs] for name, cs in plan.groups.items()},
        "before": summarize(before, plan.groups),
        "after": summarize(after, plan.groups),
        "seconds": {"unlearn": seconds, "verify": None},
        "timings": after["timings"],
        "verified": None,
    }
    if plan.mode == "local":
        doc |= {"mode": "local", "participants": plan.participants}
    return doc


def record_verification(doc: dict, verification: dict) -> None:
    """Add a verification (verify.py) to the certificate; one that was skipped leaves `verified` None."""
    doc["verification"] = verification
    if "skipped" not in verification:
        doc["verified"] = verification["verified"]
        doc["seconds"]["verify"] = verification["seconds"]


def write_certificate(run_dir: Path, doc: dict) -> Path:
    """Write the certificate as run_dir/unlearning.json, atomically."""
    path = run_dir / "unlearning.json"
    atomic_write_json(path, doc)
    return path
