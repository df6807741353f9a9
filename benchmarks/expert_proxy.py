"""Local mode on the validation split at a fraction of its cost: retrain only some experts with another classifier
recipe and score the holders rule with the other experts' saved log-probabilities.

Under classifier.combine = "holders" on silos, class c's score is expert c's log p(c | x) alone, so a recipe change
on the experts of the confused classes (T-shirt, pullover, coat, shirt: 0, 2, 4, 6) shows most of what it would do
to all ten, at 4/10 of the cost. A recipe that moves the experts' scale (more synthetic images lower each expert's
prior of its own class) is read by the holders rule within the retrained classes (`within`). Same data and seeds
as `quality.py --local` (its training set for expert c, its classifier seed); the base experts come from its
--save-log-probs file:

  python benchmarks/quality.py --variant steps1000-pc8 --set steps=1000 steps_per_image=0.2 residual_rank=8 \
      residual_per_component=true --local --samples 3000 --threads 2 --save-log-probs base.npz
  python benchmarks/expert_proxy.py --modules <quality.py --out>/steps1000-pc8 --base base.npz --tag e10 \
      --cls epochs=10

With --experts naming every class no base expert is left, so --base may be left out: the row then has no "before"
reading (the base's score is in its own row) and trains all ten experts, about 45 minutes at 5 epochs on 2 threads.
--workers 2 trains two experts side by side in processes of one thread each: 1.7x faster than --workers 1 at one
thread, with the same bits (checked on ten tiny experts); an expert's bits depend on its threads, so a row at
--threads 2 --workers 1 (two threads an expert) is another draw of the same recipe, and a cached tag refuses it.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import validation_split  # noqa: E402

from fedfactory.classifier import predict_log_proba, train_classifier  # noqa: E402
from fedfactory.config import Config, load_config  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.data.images import ImageDataset  # noqa: E402
from fedfactory.federation.factory import combine_experts, expert_recipe, local_training_set  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.registry import Module  # noqa: E402
from fedfactory.runs import provenance  # noqa: E402
from fedfactory.seeding import derive_seed  # noqa: E402
from fedfactory.workers import job_threads, run_jobs  # noqa: E402


def within(log_probs: list[np.ndarray], experts: list[int], labels: np.ndarray) -> float:
    """The holders rule restricted to the retrained experts' classes, on those classes' images: every score compared
    comes from experts of one recipe, so unlike the full rule it is fair when a recipe moves the experts' scale (a
    different share of synthetic images changes each expert's prior of its own class)."""
    rows = np.isin(labels, experts)
    scores = np.stack([log_probs[c][rows, c] for c in experts], axis=1)
    return float((np.asarray(experts)[scores.argmax(1)] == labels[rows]).mean())


@dataclass(frozen=True)
class ProxyJob:
    """Expert c's training, as quality.py --local trains it: class c's real fit images and every module."""

    expert: int
    own: ImageDataset
    modules: list[Module]
    val_images: np.ndarray
    cfg: Config
    samples: int
    real_copies: int
    blur: float


def train_proxy_expert(job: ProxyJob) -> tuple[int, np.ndarray, float]:
    """Expert job.expert's validation log-probabilities and its seconds (a worker process's job under --workers)."""
    t0, device, cfg = time.perf_counter(), torch.device("cpu"), job.cfg
    x, y, _ = local_training_set(job.own, job.modules, job.samples, 0, device, cfg.synthesis.batch_size,
                                 cfg.synthesis.local_synthetic, job.real_copies)
    expert = train_classifier(x, y, job.own.num_classes, expert_recipe(cfg.classifier),
                              derive_seed(1, "expert", job.expert), device, progress=False, input_blur=job.blur)
    return job.expert, predict_log_proba(expert, job.val_images, device), time.perf_counter() - t0


class ExpertCache:
    """--out/<tag>: the retrained experts' validation log-probabilities, reused by a later call with the same tag, and
    recipe.json, which says what they were trained with and at which commit, so a tag reused with another recipe is
    refused instead of scored with the wrong experts."""

    def __init__(self, out: Path, recipe: dict):
        self.path = out / "recipe.json"
        stored = json.loads(self.path.read_text()) if self.path.exists() else None
        if stored is None and any(out.glob("expert-*.npy")):
            raise SystemExit(f"{out}: cached experts without a recipe.json, so nothing says how they were trained; "
                             "delete the folder or pass another --tag")
        if stored is not None and stored["recipe"] != recipe:
            raise SystemExit(f"--tag {out.name}: its cached experts were trained with {stored['recipe']}, not "
                             f"{recipe}; pass another --tag or delete {out}")
        self.recipe, self.trained_at = recipe, (stored or {}).get("trained_at", {})
        out.mkdir(parents=True, exist_ok=True)
        self._write()

    def trained(self, expert: int, commit: str | None) -> None:
        self.trained_at[str(expert)] = commit
        self._write()

    def _write(self) -> None:
        self.path.write_text(json.dumps({"recipe": self.recipe, "trained_at": self.trained_at}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", required=True, help="a quality.py variant directory (class-0.pt ... class-9.pt)")
    p.add_argument("--base", default="", help="quality.py --local --save-log-probs file of the base experts "
                   "(needed unless --experts names every class)")
    p.add_argument("--tag", required=True, help="name of the recipe; its experts are cached under --out/<tag>")
    p.add_argument("--experts", default="0,2,4,6", help="the experts to retrain")
    p.add_argument("--cls", nargs="*", default=[], help="classifier overrides key=value")
    p.add_argument("--samples", type=int, default=3000, help="synthetic images per missing class")
    p.add_argument("--base-samples", type=int, default=3000, help="the base experts' synthetic images per class")
    p.add_argument("--real-copies", type=int, default=1,
                   help="synthesis.local_real_copies: each real image's copies in its expert's training set")
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1,
                   help="experts trained side by side, each in a process of threads/workers torch threads (as "
                   "run.workers); an expert's bits depend on its threads, so rows compare at one setting")
    p.add_argument("--out", default="runs/expert-proxy")
    p.add_argument("--results", default="benchmarks/results/expert-proxy.jsonl")
    args = p.parse_args()
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be an integer >= 1")
    source = provenance(__file__, sys.argv[1:])  # the tree the experts start from
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, [f"classifier.{s}" for s in args.cls])
    train, _ = load_data(cfg.data)
    fit_rows, val_rows = validation_split(train.labels)
    fit, val = train.subset(fit_rows), train.subset(val_rows)
    experts = [int(s) for s in args.experts.split(",") if s.strip().isdigit()]
    if (len(experts) != len(args.experts.split(",")) or len(set(experts)) != len(experts)
            or not all(c < train.num_classes for c in experts)):
        p.error(f"--experts {args.experts}: comma-separated distinct classes from 0 to {train.num_classes - 1}")
    if args.base:
        base = np.load(args.base)
        if not np.array_equal(base["labels"], val.labels):
            raise SystemExit(f"--base {args.base}: its labels are not this validation split's; save it with "
                             f"quality.py --local on --config {args.config}")
        base_log_probs = list(base["log_probs"])
    elif len(experts) < train.num_classes:
        p.error(f"--experts {args.experts} keeps some base experts, so --base (their saved log-probabilities) is "
                "needed; pass it, or retrain every expert")
    else:
        base_log_probs = None
    cached = [torch.load(Path(args.modules) / f"class-{c}.pt", weights_only=False) for c in range(train.num_classes)]
    modules = [Module(m["manifest"], m["tensors"]) for m in cached]
    blur = float(np.mean([m["manifest"]["training"].get("blur_sigma", 0.0) for m in cached]))
    # Silos: expert k holds the real images of class k only.
    held = np.diag(np.bincount(fit.labels, minlength=train.num_classes).astype(np.float64))
    log_probs = list(base_log_probs) if base_log_probs else [None] * train.num_classes
    out = Path(args.out) / args.tag
    cache = ExpertCache(out, {"modules": str(Path(args.modules).resolve()), "config": args.config,
                              "classifier": args.cls, "samples": args.samples, "real_copies": args.real_copies,
                              "expert_threads": job_threads(args.workers)})
    alone = {}
    todo = [c for c in experts if not (out / f"expert-{c}.npy").exists()]
    jobs = [ProxyJob(c, fit.subset(np.flatnonzero(fit.labels == c)), modules, val.images, cfg, args.samples,
                     args.real_copies, blur) for c in todo]
    # Written as each finishes, so a stopped call keeps its finished experts for the next call with this --tag.
    for c, lp, seconds in run_jobs(train_proxy_expert, jobs, args.workers, device,
                                   cost=lambda j: len(j.own), in_order=False):
        np.save(out / f"expert-{c}.npy", lp)
        cache.trained(c, source["git_commit"])
        print(f"expert {c}: {seconds:.0f}s", flush=True)
    for c in experts:
        lp = np.load(out / f"expert-{c}.npy")
        alone[c] = tuple(None if q is None else float((q.argmax(1) == val.labels).mean()) for q in (log_probs[c], lp))
        print(f"expert {c} alone: {alone[c][0]} -> {alone[c][1]:.4f}", flush=True)
        log_probs[c] = lp
    after = evaluate(combine_experts(log_probs, held, "holders"), val.labels, val.class_names)
    before = (evaluate(combine_experts(base_log_probs, held, "holders"), val.labels, val.class_names) if base_log_probs
              else {"accuracy": None, "per_class_accuracy": {}})
    per_class = {k: [round(v, 3) for v in m["per_class_accuracy"].values()] for k, m in
                 (("before", before), ("after", after))}
    # Prior-corrected reading: a retrained expert's own-class log-probability moved by log(new set / base set), as if
    # its own class kept the base experts' share of its training set (Bayes' rule with the other prior).
    real = np.bincount(fit.labels, minlength=train.num_classes)
    missing = train.num_classes - 1  # silos, local_synthetic = missing: every other class is synthetic
    corrected = list(log_probs)
    for c in experts:
        corrected[c] = log_probs[c].copy()
        share = (args.real_copies * real[c] + missing * args.samples) / (args.real_copies * real[c])
        corrected[c][:, c] += np.log(share / ((real[c] + missing * args.base_samples) / real[c]))
    prior = evaluate(combine_experts(corrected, held, "holders"), val.labels, val.class_names)["accuracy"]
    group = (within(base_log_probs, experts, val.labels) if base_log_probs else None,
             within(log_probs, experts, val.labels))
    print(f"holders: {before['accuracy']} -> {after['accuracy']:.4f}; within classes {args.experts}: "
          f"{group[0]} -> {group[1]:.4f}; prior-corrected: {prior:.4f}")
    print(f"per class: {per_class['before']} -> {per_class['after']}")
    row = {"tag": args.tag, "classifier": args.cls, "experts": args.experts, "samples_per_class": args.samples,
           "real_copies": args.real_copies, "workers": args.workers, "expert_threads": job_threads(args.workers),
           "val_accuracy_before": before["accuracy"], "val_accuracy": after["accuracy"], "per_class": per_class,
           "within_experts_before": group[0], "within_experts": group[1], "prior_corrected": prior,
           "experts_alone": alone, "experts_trained_at": {c: cache.trained_at.get(str(c)) for c in experts}} | source
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
