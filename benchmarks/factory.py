"""End-to-end benchmark of `fedfactory run` on a preset, one or more generator families, one table.

Runs each family as a subprocess under /usr/bin/time -v (peak resident memory) and collects metrics.json:
accuracy, ratio to the centralized reference measured in the same run, train s, sample s, bytes per module.

  python benchmarks/factory.py --config fashion-mnist --families aegmm --name fashion-mnist-silos
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(config: str, family: str, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedfactory.cli", "run", "--config", config, f"run.out={out}",
           f"generator.family={family}", "run.progress=false", *overrides]
    timer = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") else []
    proc = subprocess.run(timer + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    m = json.loads((out / "metrics.json").read_text())
    sizes = list(m["bytes"]["per_module"].values())
    return {"family": family, "command": " ".join(["python", "-m", "fedfactory.cli", *cmd[3:]]),
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            "auroc": m["auroc"], "centralized_accuracy": m["reference"]["centralized"]["accuracy"],
            "ratio": m["reference"]["accuracy_ratio"], "per_class_accuracy": m["per_class_accuracy"],
            "train_s": m["timings"].get("client_training"), "sample_s": m["timings"]["synthesis"],
            "classifier_s": m["timings"]["classifier"], "end_to_end_s": m["timings"]["end_to_end"],
            "reference_s": m["timings"].get("reference"), "bytes_per_module": sum(sizes) / len(sizes),
            "peak_rss_mib": int(peak.group(1)) / 1024 if peak else None,
            "classifier_input_blur": m.get("classifier_input_blur")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--families", default="aegmm")
    p.add_argument("--name", required=True)
    p.add_argument("--runs", default="benchmarks/runs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = []
    for family in args.families.split(","):
        out = Path(args.runs) / f"{args.name}-{family}"
        rows.append(run_one(args.config, family, out, args.overrides))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    source = provenance(__file__, sys.argv[1:])
    result = source | {"cpu_threads": os.cpu_count(), "rows": rows}
    atomic_write_json(RESULTS / f"{args.name}.json", result)
    lines = [f"# {args.name}", "", provenance_line(source), "",
             "| family | accuracy | centralized | ratio | train s | sample s | classifier s | end-to-end s | "
             "bytes/module | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['accuracy']:.4f} | {r['centralized_accuracy']:.4f} | {r['ratio']:.3f} | "
                     f"{r['train_s']:.0f} | {r['sample_s']:.0f} | {r['classifier_s']:.0f} | {r['end_to_end_s']:.0f} | "
                     f"{r['bytes_per_module']:.0f} | {r['peak_rss_mib'] or float('nan'):.0f} |")
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
