"""The paper's comparison on one preset: factory (server and local) against FedAvg, FedProx, SCAFFOLD, FedDyn,
centralized and local-only, on one partition and seed; one table with accuracy, bytes and wall time.

Runs `fedfactory compare` in this process (it resumes: rerunning the same command skips finished methods) and
writes benchmarks/results/compare-<name>.json and .md, each naming the command, device and torch threads, e.g.

    python benchmarks/compare.py --config fashion-mnist --name fashion-mnist-silos --out runs/cmp-fmnist-silos
    python benchmarks/compare.py --config fashion-mnist --name fashion-mnist-dirichlet-0.1 \\
        --out runs/cmp-fmnist-dir01 data.partition=dirichlet data.alpha=0.1
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from fedfactory.config import config_hash, load_config, to_dict
from fedfactory.federation.compare import compare, markdown, parse_methods
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name or TOML file")
    parser.add_argument("--name", required=True, help="results name: compare-<name>.json / .md")
    parser.add_argument("--out", type=Path, required=True, help="run directory (run.out); reused to resume")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the .json and .md")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    source = provenance(__file__, argv)

    cfg = load_config(args.config, [*args.overrides, f"run.out={args.out}", "run.progress=false"])
    methods = parse_methods(args.methods)
    t0 = time.perf_counter()
    doc = compare(cfg, methods)
    elapsed = time.perf_counter() - t0
    device = "cuda" if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu"
    result = source | {
        "run_dir": str(args.out),
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "device": device,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # Methods this invocation found finished were not rerun: the sum of their wall_s is the honest total.
        "seconds_this_invocation": round(elapsed, 1),
        "methods": [{k: v for k, v in r.items() if k not in ("train_loss", "val_accuracy")} for r in doc["methods"]],
    }
    table = markdown(doc, cfg)
    text = (f"# Comparison: {args.name}\n\n{provenance_line(source)}\n\nDevice: {result['cuda'] or result['device']}, "
            f"{result['torch_threads']} torch threads; this invocation {elapsed:.0f} s.\n\n{table}")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"compare-{args.name}.json", result)
    atomic_write_text(args.results / f"compare-{args.name}.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
