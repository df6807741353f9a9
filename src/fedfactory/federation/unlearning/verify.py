"""Verification from scratch: retrain every remaining module on the withdrawn partition, rerun the stage, and
compare the result with the unlearned run bit for bit (modules, classifier or experts, metrics)."""

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedfactory.federation.client import client_plans, module_jobs, train_modules
from fedfactory.federation.runner import RunContext, factory_stage, keep_released, read_release, record_release
from fedfactory.federation.unlearning.certificate import trained_record
from fedfactory.federation.unlearning.plan import TRAINED
from fedfactory.registry import Module, load_registry
from fedfactory.runs import Timer
from fedfactory.workers import job_threads

_UNCOMPARED_METRICS = ("timings", "bytes")  # left out of the verification's metrics comparison (see there)
DEPLOYMENT_SKIPPED = ("verification retrains the remaining modules from their real images, which stay at the sites "
                      "of a deployment; run it where the data is (or rerun the federation without the site and "
                      "compare the classifiers)")


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


def verify_from_scratch(ctx: RunContext, expected: dict[str, Module], unlearned_metrics: dict) -> dict:
    """Rerun the pipeline from scratch on the withdrawn partition (the data ctx holds) and compare it with the
    unlearned run in ctx.out."""
    cfg, train, parts, device, unlearned_dir = ctx.cfg, ctx.train, ctx.parts, ctx.device, ctx.out
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
        clients = [] if private else [train.subset(rows) for rows in parts]
        jobs = [job for k, client in enumerate(clients)
                for job in module_jobs(client, client_plans(client, k, cfg).values(), cfg, device)]
        for t in train_modules(jobs, cfg.run.workers):
            # The release check runs again; a withheld module must be withheld again (metrics["release"]).
            full = keep_released(tmp, t)
            if full is None:
                continue
            tensors = t.module.tensors
            mid = full["module_id"]
            trained.add(mid)
            if mid not in expected or full["weights_sha256"] != expected[mid].manifest["weights_sha256"]:
                module_mismatches.append(mid)
                # Modules finish in any order on several workers: report the first module id's difference.
                if mid in expected and (module_difference is None or mid < module_difference["module_id"]):
                    found = first_difference(expected[mid].tensors, tensors) or {"reason": "weights hash differs"}
                    module_difference = {"module_id": mid} | found
        module_mismatches.sort()
        missing = sorted(expected.keys() - trained)
        # The same synthesis, classifier and evaluation; the timer is the verification's own.
        metrics = factory_stage(replace(ctx, out=tmp, timer=Timer()), load_registry(tmp / "modules"))
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
        summary += (f" (retrained with {job_threads(cfg.run.workers)} torch threads a module on {device}; modules are "
                    "bit-reproducible only on the same device type and thread count as the original run: set "
                    "OMP_NUM_THREADS to the original's)")
    return {"verified": verified, "summary": summary, "modules_retrained": len(trained),
            "module_mismatches": module_mismatches, "modules_not_retrained": missing,
            "first_module_difference": module_difference, "first_classifier_difference": difference,
            "classifier": scratch, "metrics_identical": not differing_metrics,
            "seconds": round(time.perf_counter() - t0, 3)}
