"""`fedfactory compare`: the factory and the weight-sharing baselines on one partition and one seed, one table.

Every method sees the same partition (`split_clients`), classifier network, augmentation, test set and metrics
code. Results go to run.out next to the factory's own files, so the modules are trained once and reused:
- comparison.json  {"config_hash", "module_training_s", "methods": [{"method", "rounds", "accuracy",
  "balanced_accuracy", "macro_f1", "auroc", "bytes_up", "bytes_down", "bytes_total", "wall_s", ...}, ...]},
  rewritten atomically after every method; a rerun skips the methods it already holds for this config;
- comparison.md (the same table, with the accounting rules) and comparison.png (accuracy against bytes).

The factory mode named by classifier.mode writes its results where `fedfactory run` would (metrics.json,
classifier or experts); the other mode runs as a nested run directory, run.out/factory-<mode>, whose module
files are hard links to run.out/modules.

Bytes are the lengths of actual payloads. factory-server: module files up, nothing down (the classifier stays
with the server). factory-local: module files up, and each client downloads every other client's module files.
fedavg, fedprox, feddyn: per round and participant, the global model down and the local model up (safetensors).
scaffold: the same plus the control variate down and the control-variate change up. centralized: each client
uploads its rows (images and labels as safetensors). local-only: nothing. wall_s of the factory rows includes
the module training time recorded in this directory (module_training_s), shared by both factory modes.
"""

import io
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from fedfactory.config import Config, apply, config_hash
from fedfactory.errors import FedFactoryError
from fedfactory.federation import runner
from fedfactory.federation.baselines import HEADLINE, run_baseline
from fedfactory.registry import load_registry
from fedfactory.report import write_report
from fedfactory.runs import Timer, atomic_write_bytes, atomic_write_json, atomic_write_text, prepare_run_dir

log = logging.getLogger("fedfactory")

METHODS = ("factory-server", "factory-local", "fedavg", "fedprox", "scaffold", "feddyn", "centralized", "local-only")
FACTORY_MODES = {"factory-server": "server", "factory-local": "local"}
COLUMNS = ("method", "rounds", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "bytes_up", "bytes_down",
           "bytes_total", "wall_s")


class CompareError(FedFactoryError, ValueError):
    """A compare request that cannot run as asked; the message lists the valid values."""


def parse_methods(text: str | list[str] | None) -> list[str]:
    """Method names from "m1,m2" (or a list); None means all of METHODS. Unknown or repeated names are refused."""
    if text is None:
        return list(METHODS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise CompareError(f"unknown method {', '.join(map(repr, unknown)) or 'list (empty)'}; "
                           f"valid values are {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise CompareError(f"--methods names a method twice: {','.join(names)}")
    return names


def read_comparison(out: Path, chash: str) -> dict:
    """comparison.json's rows for this config (rows of any other config are dropped), or an empty document."""
    path = out / "comparison.json"
    doc = {"config_hash": chash, "module_training_s": None, "methods": []}
    if not path.exists():
        return doc
    try:
        old = json.loads(path.read_text())
        rows = [r for r in old["methods"] if r.get("config_hash") == chash and r.get("method") in METHODS]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompareError(f"{path} is not a comparison this fedfactory wrote ({e}); delete it to recompute") from None
    if old.get("config_hash") == chash:
        doc["module_training_s"] = old.get("module_training_s")
    return doc | {"methods": rows}


def link_modules(source: Path, target: Path) -> None:
    """Make target/ hold exactly source/'s module files, as hard links (a copy where links are impossible)."""
    names = {p.name for p in source.glob("*.safetensors")}
    for stale in target.glob("*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    for name in sorted(names):
        tmp = target / f".{name}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source / name, tmp)
            os.replace(tmp, target / name)
        except OSError:
            atomic_write_bytes(target / name, (source / name).read_bytes())


def run_factory(ctx: runner.RunContext, mode: str, doc: dict) -> dict:
    """Train (or reuse) every module, then run the server or local stage; returns the comparison row."""
    training = replace(ctx, timer=Timer())
    runner.train_all_modules(training)
    if "client_training" in training.timer.timings:
        trained_s = training.timer.timings["client_training"]
        doc["module_training_s"] = round((doc["module_training_s"] or 0.0) + trained_s, 3)

    # The stage's own timer; the other mode writes a nested run directory of its own.
    stage = replace(ctx, timer=Timer())
    if mode != ctx.cfg.classifier.mode:
        target = ctx.out / f"factory-{mode}"
        stage = replace(stage, cfg=apply(ctx.cfg, {"classifier.mode": mode, "run.out": str(target)}), out=target)
        prepare_run_dir(stage.cfg)
        link_modules(ctx.out / "modules", target / "modules")
        runner.write_partition(stage)

    metrics = runner.factory_stage(stage, load_registry(ctx.out / "modules"))
    # The stage's own work; the centralized reference it may train is the "centralized" row's business.
    stage_s = sum(stage.timer.timings.get(k, 0.0) for k in ("synthesis", "classifier", "evaluation"))
    b = metrics["bytes"]
    num_clients = len(ctx.parts)
    up = {str(k): int(b["per_client"].get(str(k), 0)) for k in range(num_clients)}
    down = {str(k): int(b.get("down_per_client", {}).get(str(k), 0)) for k in range(num_clients)}
    row = headline(metrics) | {
        "method": f"factory-{mode}", "rounds": 1, "bytes_up": sum(up.values()), "bytes_down": sum(down.values()),
        "stage_s": round(stage_s, 3), "module_training_s": doc["module_training_s"],
        "wall_s": round(stage_s + (doc["module_training_s"] or 0.0), 3),
        "bytes_per_client": {"up": up, "down": down}, "run_dir": str(stage.out),
        "per_class_accuracy": metrics["per_class_accuracy"]}
    if mode == "local":
        row["expert_accuracy"] = metrics["expert_accuracy"]
    return row


def headline(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in HEADLINE}


def baseline_row(result: dict, wall_s: float) -> dict:
    """A comparison row from a baselines result."""
    b = result["bytes"]
    row = headline(result["metrics"]) | {
        "method": result["method"], "rounds": result["rounds"], "bytes_up": b["up"], "bytes_down": b["down"],
        "wall_s": round(wall_s, 3),
        "bytes_per_client": {"up": {str(k): v for k, v in enumerate(b["up_per_client"])},
                             "down": {str(k): v for k, v in enumerate(b["down_per_client"])}}}
    if "per_class_accuracy" in result["metrics"]:
        row["per_class_accuracy"] = result["metrics"]["per_class_accuracy"]
    if result.get("selected"):
        s = result["selected"]
        row["selected"] = {"round": s["round"], "val_accuracy": s["val_accuracy"], "num_val": s["num_val"]} | \
            headline(s["metrics"])
    if "history" in result:
        row["train_loss"] = [h["train_loss"] for h in result["history"]]
        if any("val_accuracy" in h for h in result["history"]):
            row["val_accuracy"] = [h.get("val_accuracy") for h in result["history"]]
    if "best" in result:
        row |= {"best": result["best"], "per_client": result["per_client"]}
    return row


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def markdown(doc: dict, cfg: Config) -> str:
    """comparison.md: the table, then what the numbers mean."""
    head = ["method", "rounds", "accuracy", "balanced acc.", "macro F1", "AUROC", "bytes up", "bytes down",
            "bytes total", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in doc["methods"]:
        cells = [r["method"], fmt(r["rounds"])] + [fmt(r[k]) for k in HEADLINE] + \
            [fmt(r[k]) for k in ("bytes_up", "bytes_down", "bytes_total")] + [fmt(r["wall_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    d, b = cfg.data, cfg.baselines
    work = f"{b.local_steps} local steps" if b.local_steps else f"{b.local_epochs} local epoch(s)"
    notes = [
        "",
        f"Data: {d.dataset}, partition {d.partition}, {d.num_clients} clients, seed {cfg.run.seed}; config "
        f"{doc['config_hash'][:12]}. Test accuracy of the final round (no model selection on the test set).",
        f"Weight-sharing baselines: {b.rounds} rounds, {work} of plain SGD per round (lr {b.lr}, batch "
        f"{b.batch_size}, momentum 0, no weight decay), {b.clients_per_round or d.num_clients} clients per round, "
        f"aggregation weights {b.weighting}, FedProx mu {b.fedprox_mu}, FedDyn alpha {b.feddyn_alpha}; "
        + ("BatchNorm statistics are averaged with the weights." if cfg.classifier.norm == "batch"
           else "GroupNorm in every method (no statistics to average)."),
        "centralized: the factory's classifier recipe on the pooled real data. local-only: each client trains "
        "alone (the FL local trainer, no communication); the row is the mean over clients.",
        "Bytes are actual payload lengths (safetensors). factory-server: module files up, nothing down. "
        "factory-local: module files up, every other client's module files down. FedAvg/FedProx/FedDyn: model "
        "down and up per participant and round; SCAFFOLD adds control variates both ways. centralized: raw rows up.",
    ]
    if doc.get("module_training_s") is None and any(r["method"] in FACTORY_MODES for r in doc["methods"]):
        notes.append("The factory's modules were trained before this comparison: their training time is not in "
                     "its wall s.")
    for r in doc["methods"]:
        if r.get("selected"):
            s = r["selected"]
            notes.append(f"{r['method']}: round {s['round']} chosen on {s['num_val']} held-out client rows "
                         f"(validation accuracy {s['val_accuracy']:.4f}) has test accuracy {s['accuracy']:.4f}.")
        if r.get("best"):
            notes.append(f"{r['method']}: best single client {r['best']['client']}, test accuracy "
                         f"{r['best']['accuracy']:.4f}.")
    return "\n".join(lines + notes) + "\n"


def plot(doc: dict) -> bytes:
    """Accuracy against total bytes (log scale) as PNG bytes; methods that send nothing are named in the title."""
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    silent, placed = [], {}
    for r in doc["methods"]:
        if r["accuracy"] is None:
            continue
        if r["bytes_total"] <= 0:
            silent.append(f"{r['method']} {r['accuracy']:.3f}")
            continue
        ax.scatter(r["bytes_total"], r["accuracy"], s=30)
        # Methods with (nearly) the same cost and accuracy get their labels stacked instead of overprinted.
        spot = (round(math.log10(r["bytes_total"]), 1), round(r["accuracy"], 2))
        placed[spot] = placed.get(spot, -1) + 1
        ax.annotate(r["method"], (r["bytes_total"], r["accuracy"]), textcoords="offset points",
                    xytext=(5, -3 - 9 * placed[spot]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated in total (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs communication" + (f" (no bytes: {', '.join(silent)})" if silent else ""), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def save(out: Path, doc: dict, cfg: Config) -> None:
    """Write comparison.json, .md and .png, each atomically; rows in METHODS order."""
    doc["methods"].sort(key=lambda r: METHODS.index(r["method"]))
    for r in doc["methods"]:
        r["bytes_total"] = r["bytes_up"] + r["bytes_down"]
    atomic_write_json(out / "comparison.json", doc)
    atomic_write_text(out / "comparison.md", markdown(doc, cfg))
    atomic_write_bytes(out / "comparison.png", plot(doc))


def compare(cfg: Config, methods: list[str] | str | None = None) -> dict:
    """Run the chosen methods on cfg's partition and seed into run.out; returns the comparison document."""
    methods = parse_methods(methods)
    # The same opening as `fedfactory run`: every refusal comes before the run directory is touched.
    ctx = runner.start_run(cfg, kind="compare")
    out, chash = ctx.out, config_hash(cfg)
    log.info("methods: %s", ", ".join(methods))

    doc = read_comparison(out, chash)
    for method in methods:
        if any(r["method"] == method for r in doc["methods"]):
            log.info("%s: already in comparison.json for this config, skipped", method)
            continue
        log.info("%s: running", method)
        t0 = time.perf_counter()
        if method in FACTORY_MODES:
            row = run_factory(ctx, FACTORY_MODES[method], doc)
        else:
            result = run_baseline(method, ctx.train, ctx.parts, ctx.test, cfg.baselines, cfg.classifier,
                                  cfg.run.seed, ctx.device, progress=cfg.run.progress)
            row = baseline_row(result, time.perf_counter() - t0)
        row["config_hash"] = chash
        doc["methods"].append(row)
        save(out, doc, cfg)
        log.info("%s: accuracy %s, %s bytes, %.1f s", method, fmt(row["accuracy"]), fmt(row["bytes_total"]),
                 row["wall_s"])
    save(out, doc, cfg)
    log.info("comparison: %s, %s, %s", out / "comparison.json", out / "comparison.md", out / "comparison.png")
    log.info("report: %s", write_report(out, device=ctx.device))
    return doc
