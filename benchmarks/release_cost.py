"""What the release check costs beside training one module at a preset: both timed on the same cells, one after the
other, on Fashion-MNIST training images of one class (the test set is not read).

  python benchmarks/release_cost.py --config fashion-mnist --sizes 50,1000 run.threads=2
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fedfactory.audit import release_check
from fedfactory.config import load_config
from fedfactory.data.datasets import load_data
from fedfactory.device import select_device
from fedfactory.federation.client import train_client_module
from fedfactory.federation.plan import plan_module
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--sizes", default="50,1000")
    p.add_argument("--name", default="release-cost")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = select_device(cfg.run.device, cfg.run.threads)
    train, _ = load_data(cfg.data)
    prov = provenance(__file__, sys.argv[1:])
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        data = train.subset(np.flatnonzero(train.labels == 0)[:n])
        t0 = time.perf_counter()
        module = train_client_module(data, plan_module(cfg, 0, 0, n), cfg.generator, device, progress=False)
        t1 = time.perf_counter()
        release_check(module, data.images, cfg.run.seed, cfg.release.max_copy_fraction, device)
        t2 = time.perf_counter()
        rows.append({"cell_size": n, "steps": module.manifest["training"]["steps"], "train_seconds": t1 - t0,
                     "check_seconds": t2 - t1, "share": (t2 - t1) / (t1 - t0)})
        print(rows[-1], flush=True)
    atomic_write_json(RESULTS / f"{args.name}.json", {"provenance": prov, "rows": rows})
    lines = [f"# Release check cost ({args.config})", "", provenance_line(prov), "",
             "| cell size | steps | train s | check s | check / train |", "|---|---|---|---|---|"]
    lines += [f"| {r['cell_size']} | {r['steps']} | {r['train_seconds']:.2f} | {r['check_seconds']:.2f} | "
              f"{r['share']:.3f} |" for r in rows]
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
