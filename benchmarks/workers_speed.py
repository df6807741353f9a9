"""Seconds to train the same modules one after another and on run.workers processes, back to back in one hour.

Timings from different runs differ with what else the machine was doing (15 to 25% from hour to hour on the 2-core
machine), so this trains the same cells under each setting in turn on the same threads, checks that each setting
gives the bits its threads per module give, and prints the ratio to the first setting and the peak memory of all
the processes together. Cells: classes of the
preset's dataset, each client holding one class (silos), optionally fewer images each (--images).

  python benchmarks/workers_speed.py --config digits --threads 2 --workers 1,2 --name workers-speed-digits
"""

import argparse
import hashlib
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fedfactory.config import load_config
from fedfactory.data.datasets import load_data
from fedfactory.device import select_device
from fedfactory.federation.client import module_jobs, train_modules
from fedfactory.federation.plan import plan_modules
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line
from fedfactory.workers import job_threads

RESULTS = Path(__file__).resolve().parent / "results"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def pss_mib(pid: int) -> float:
    """A process's proportional set size (shared pages split among the processes sharing them), 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in text.splitlines() if line.startswith("Pss:")), 0.0)


class MemorySampler(threading.Thread):
    """Samples this process's and its worker processes' summed PSS every 0.5 s; .peak holds the largest sum (MiB).
    GNU time's maximum resident set size is one process's, not the sum over a run's processes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            pids = [os.getpid()] + [c.pid for c in multiprocessing.active_children()]
            self.peak = max(self.peak, sum(pss_mib(pid) for pid in pids))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits")
    p.add_argument("--classes", default="", help="comma-separated class ids (default: every class)")
    p.add_argument("--images", type=int, default=0, help="train each module on this many images (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="comma-separated run.workers settings, timed in this order")
    p.add_argument("--name", default="", help="also write benchmarks/results/NAME.{md,json}")
    args = p.parse_args()
    settings = [int(w) for w in args.workers.split(",")]
    cfg = load_config(args.config, [f"run.threads={args.threads}", "run.progress=false"])
    device = select_device("cpu", args.threads)
    train, _ = load_data(cfg.data)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(train.num_classes))
    clients = []
    for c in classes:
        rows = np.flatnonzero(train.labels == c)
        clients.append(train.subset(rows[: args.images] if args.images else rows))
    plans = plan_modules(cfg, {(k, c): len(client) for k, (c, client) in enumerate(zip(classes, clients, strict=True))})
    jobs = [job for k, client in enumerate(clients)
            for job in module_jobs(client, [pl for pl in plans.values() if pl.client_id == k], cfg, device)]
    rows, hashes = [], {}
    for workers in settings:
        sampler = MemorySampler()
        sampler.start()
        t0 = time.perf_counter()
        trained = list(train_modules(jobs, workers))
        seconds = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        digest = {t.module.manifest["module_id"]: weights_digest(t.module.tensors) for t in trained}
        threads = job_threads(workers)
        same = hashes.setdefault(threads, digest) == digest  # the same threads per module, the same bits
        rows.append({"workers": workers, "threads_per_module": threads, "seconds": round(seconds, 1),
                     "peak_pss_mib": round(sampler.peak),
                     "same_bits_as_first_at_these_threads": same})
        print(f"workers {workers} ({threads} thread(s) a module): {seconds:.1f} s", flush=True)
        if not same:
            raise SystemExit("modules differ at the same threads per module: run.workers changed the results")
    steps = sum(pl.training.steps for pl in plans.values())
    source = provenance(__file__, sys.argv[1:])
    lines = [f"# Module training on worker processes: {args.config}, {len(jobs)} modules, {steps:,} steps, "
             f"{args.threads} threads", "", provenance_line(source), "",
             "| run.workers | threads a module | seconds | speed-up over the first | peak PSS, all processes (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['threads_per_module']} | {r['seconds']:.1f} | "
              f"{rows[0]['seconds'] / r['seconds']:.2f}x | {r['peak_pss_mib']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.name:
        atomic_write_json(RESULTS / f"{args.name}.json", source | {"modules": len(jobs), "steps": steps, "rows": rows})
        atomic_write_text(RESULTS / f"{args.name}.md", text)


if __name__ == "__main__":
    main()
