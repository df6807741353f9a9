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

plan.py decides what goes (nothing written yet), stage.py writes the new directory's inputs and reruns the
runner's stage, verify.py retrains from scratch and compares, certificate.py writes unlearning.json.
"""

import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from fedfactory.data.datasets import load_data
from fedfactory.device import select_device
from fedfactory.federation.runner import RunContext, read_release
from fedfactory.federation.unlearning.certificate import build_certificate, record_verification, write_certificate
from fedfactory.federation.unlearning.plan import (
    UnlearningError,
    default_out,
    is_deployment,
    plan_deployment,
    plan_simulation,
    read_source,
    unlearned_config,
)
from fedfactory.federation.unlearning.stage import copy_modules, retrain, write_inputs
from fedfactory.federation.unlearning.verify import DEPLOYMENT_SKIPPED, verify_from_scratch
from fedfactory.registry import load_registry
from fedfactory.report import write_report
from fedfactory.runs import Timer, setup_logging

log = logging.getLogger("fedfactory")


def unlearn(run_dir, clients=(), modules=(), out=None, verify: bool = False) -> dict:
    """Write a new run directory without the given clients' (or modules') modules; returns the certificate."""
    run_dir = Path(run_dir)
    clients, modules = tuple(clients), tuple(modules)
    cfg, partition_doc, before = read_source(run_dir)
    out = Path(out) if out is not None else default_out(run_dir, clients, modules)
    if out.exists():
        raise UnlearningError(f"{out} already exists; choose another --out or delete it")

    # Validate the source registry (hashes included), the request and the source files before writing anything.
    manifests = {m["module_id"]: m for m, _ in load_registry(run_dir / "modules")}
    new_cfg = unlearned_config(cfg, out)
    device = select_device(new_cfg.run.device, new_cfg.run.threads)
    timer = Timer()
    release = read_release(run_dir)
    t0 = time.perf_counter()
    if is_deployment(partition_doc):
        train = test = None
        plan = plan_deployment(run_dir, cfg, partition_doc, before, manifests, release, clients, modules)
    else:
        train, test = load_data(new_cfg.data)
        plan = plan_simulation(run_dir, cfg, partition_doc, before, manifests, release, clients, modules, train)

    stage = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir(parents=True)
    # The unlearned run, written in `stage` and renamed to `out` once complete; a deployment's holds no data.
    ctx = RunContext(new_cfg, stage, device, timer, train, test, None if plan.parts is None else list(plan.parts))
    try:
        (stage / "modules").mkdir()
        setup_logging(stage)
        log.info("unlearning %s from %s into %s", ", ".join(plan.removed), run_dir, out)
        write_inputs(plan, new_cfg, stage)
        if not plan.deployment:  # a deployment's server loads no data
            timer.add("data", time.perf_counter() - t0)
        registry = copy_modules(plan, run_dir, stage)
        after = retrain(plan, ctx, registry)
        unlearn_seconds = round(time.perf_counter() - timer.start, 3)
        cert = build_certificate(plan, ctx, run_dir, manifests, before, out, registry, after, unlearn_seconds)
        if verify and plan.deployment:
            log.info("verification skipped: %s", DEPLOYMENT_SKIPPED)
            record_verification(cert, {"skipped": DEPLOYMENT_SKIPPED})
        elif verify:
            log.info("verifying: retraining %d modules from scratch without the removed ones", len(plan.remaining))
            record_verification(cert, verify_from_scratch(ctx, {m.manifest["module_id"]: m for m in registry},
                                                          after))
            log.info("verification %s: %s", "passed" if cert["verified"] else "FAILED",
                     cert["verification"]["summary"])
        write_certificate(stage, cert)
        os.rename(stage, out)
    except BaseException:
        # A failed unlearning leaves nothing behind; the source run was only ever read.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # Written in place, as `run` does: the report names its directory, and shows only the remaining modules.
    log.info("report: %s", write_report(out, device=device))
    log.info("unlearned run written to %s in %.1fs (certificate: %s)", out, unlearn_seconds, out / "unlearning.json")
    return cert
