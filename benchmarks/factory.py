"""End-to-end benchmark of `fedfactory run` on a preset, one or more generator families, one table.

Runs each family (and each root seed) as a subprocess under /usr/bin/time -v (peak resident memory) and
collects metrics.json: accuracy, ratio to the centralized reference measured in the same run, train s, sample s,
bytes per module. With several seeds the table ends with the mean and the sample standard deviation per family.

  python benchmarks/factory.py --config fashion-mnist --families aegmm --name fashion-mnist-silos
  python benchmarks/factory.py --config fashion-mnist --seeds 0,1,2 --name fashion-mnist-silos-seeds
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(config: str, family: str, seed: int | None, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedfactory.cli", "run", "--config", config, f"run.out={out}",
           f"generator.family={family}", "run.progress=false", *overrides]
    if seed is not None:
        cmd.append(f"run.seed={seed}")
    timer = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") else []
    proc = subprocess.run(timer + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    m = json.loads((out / "metrics.json").read_text())
    sizes = list(m["bytes"]["per_module"].values())
    ref = "centralized" in (m.get("reference") or {})  # absent with reference.centralized=false
    return {"mode": m.get("mode", "server"), "family": family, "seed": seed,
            "command": " ".join(["python", "-m", "fedfactory.cli", *cmd[3:]]),
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            "auroc": m["auroc"], "centralized_accuracy": m["reference"]["centralized"]["accuracy"] if ref else None,
            "ratio": m["reference"]["accuracy_ratio"] if ref else None, "per_class_accuracy": m["per_class_accuracy"],
            "train_s": m["timings"].get("client_training"), "sample_s": m["timings"]["synthesis"],
            "classifier_s": m["timings"]["classifier"], "end_to_end_s": m["timings"]["end_to_end"],
            "reference_s": m["timings"].get("reference"), "bytes_per_module": sum(sizes) / len(sizes),
            "peak_rss_mib": int(peak.group(1)) / 1024 if peak else None,
            "classifier_input_blur": m.get("classifier_input_blur")}


def num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def spread(entry: dict, key: str, digits: int) -> str:
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        group = [r for r in rows if r["family"] == family]
        entry = {"family": family, "seeds": len(group)}
        for key in ("accuracy", "centralized_accuracy", "ratio", "end_to_end_s"):
            values = [r[key] for r in group if r[key] is not None]
            if len(values) < 2:
                entry[f"{key}_mean"] = entry[f"{key}_std"] = None
                continue
            entry[f"{key}_mean"] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values)
        out.append(entry)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--families", default="aegmm")
    p.add_argument("--name", required=True)
    p.add_argument("--seeds", default="", help="comma-separated root seeds; empty: the preset's own")
    p.add_argument("--runs", default="benchmarks/runs")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (timings are then contended)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    source = provenance(__file__, sys.argv[1:])  # the tree the runs start from, not whatever it is when they end

    def one(family: str, seed: int | None) -> dict:
        out = Path(args.runs) / (f"{args.name}-{family}" + ("" if seed is None else f"-seed{seed}"))
        row = run_one(args.config, family, seed, out, args.overrides)
        print(json.dumps(row), flush=True)
        return row

    # --jobs > 1 runs that many runs side by side (give each run.threads=1): their times then share the cores.
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda fs: one(*fs), [(f, s) for f in args.families.split(",") for s in seeds]))
    RESULTS.mkdir(exist_ok=True)
    summary = summarize(rows) if len(seeds) > 1 else []
    result = source | {"cpu_threads": os.cpu_count(), "jobs": args.jobs, "rows": rows, "summary": summary}
    atomic_write_json(RESULTS / f"{args.name}.json", result)
    lines = [f"# {args.name}", "", provenance_line(source), ""]
    if args.jobs > 1:
        lines += [f"{args.jobs} runs side by side on {os.cpu_count()} cores: their seconds are contended.", ""]
    lines += ["| family | seed | accuracy | centralized | ratio | train s | sample s | classifier s | end-to-end s | "
              "bytes/module | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = "preset" if r["seed"] is None else r["seed"]
        lines.append(f"| {r['family']} | {seed} | {r['accuracy']:.4f} | {num(r['centralized_accuracy'], 4)} | "
                     f"{num(r['ratio'], 3)} | "
                     f"{r['train_s']:.0f} | {r['sample_s']:.0f} | {r['classifier_s']:.0f} | {r['end_to_end_s']:.0f} | "
                     f"{r['bytes_per_module']:.0f} | {r['peak_rss_mib'] or float('nan'):.0f} |")
    if summary:
        lines += ["", "Mean and sample standard deviation over seeds:", "",
                  "| family | seeds | accuracy | centralized | ratio | end-to-end s |", "|---|---|---|---|---|---|"]
        for s in summary:
            lines.append(f"| {s['family']} | {s['seeds']} | {spread(s, 'accuracy', 4)} | "
                         f"{spread(s, 'centralized_accuracy', 4)} | {spread(s, 'ratio', 3)} | "
                         f"{s['end_to_end_s_mean']:.0f} |")
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
