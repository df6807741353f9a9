"""Seconds to train one module of one class under each of several recipes, one after another in one process.

Issue 22 bounds a private module's training time by twice a plain module's: timings from different runs differ with
what else the machine was doing, so this trains the recipes back to back on the same images and threads and prints
their ratio to the first. Each recipe is a space-separated list of config overrides ("" = the config as it is).

  python benchmarks/module_seconds.py --class 0 --threads 1 "" "privacy.epsilon=10 generator.residual_rank=0"
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import set_dp_constants  # noqa: E402

from fedfactory.config import load_config  # noqa: E402
from fedfactory.data.datasets import load_dataset  # noqa: E402
from fedfactory.generative.train import plan_training, train_module  # noqa: E402
from fedfactory.runs import atomic_write_text, provenance, provenance_line  # noqa: E402
from fedfactory.seeding import derive_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--class", dest="class_id", type=int, default=0, help="the class whose training images train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="", help="also write benchmarks/results/NAME.md")
    p.add_argument("--dp-constant", action="append", default=[], metavar="NAME=VALUE",
                   help="exploration only, for every recipe (repeat for several): as quality.py --dp-constant")
    p.add_argument("recipes", nargs="+", help='config overrides per recipe, space-separated ("" = none)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    set_dp_constants(args.dp_constant)
    configs = [load_config(args.config, r.split()) for r in args.recipes]  # every recipe refused before any trains
    train, _ = load_dataset(configs[0].data.dataset, None, 0)
    if not 0 <= args.class_id < train.num_classes:
        raise SystemExit(f"--class {args.class_id}: {configs[0].data.dataset} has classes 0 to {train.num_classes - 1}")
    images = train.images[train.labels == args.class_id]
    rows = []
    for recipe, cfg in zip(args.recipes, configs, strict=True):
        t0 = time.perf_counter()
        plan = plan_training(cfg.generator, len(images), derive_seed(0, "train", args.class_id), cfg.privacy)
        train_module(images, cfg.generator, plan, torch.device("cpu"), desc=f"class {args.class_id}", progress=False)
        rows.append((recipe or "(the config)", plan.steps, time.perf_counter() - t0))
        print(f"{rows[-1][0]}: {plan.steps} steps, {rows[-1][2]:.1f} s", flush=True)
    constants = f", constants {' '.join(args.dp_constant)}" if args.dp_constant else ""
    title = f"# Module training seconds: {args.config}, class {args.class_id}, {args.threads} thread(s){constants}"
    lines = [title, "",
             provenance_line(provenance(__file__, sys.argv[1:])), "",
             "| recipe | steps | seconds | ratio to the first |", "|---|---|---|---|"]
    lines += [f"| `{r}` | {s} | {t:.1f} | {t / rows[0][2]:.2f} |" for r, s, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.name:
        atomic_write_text(RESULTS / f"{args.name}.md", text)


if __name__ == "__main__":
    main()
