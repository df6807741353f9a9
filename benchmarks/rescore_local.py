"""Score a finished local-mode run's experts under another classifier.combine rule, without retraining them.

The experts a local-mode run saved (experts/client-KKK.safetensors) are loaded as the run built them, the
real images per class each client trained on come from the run's partition.json, and the combined
prediction is scored on the run's test set: the number `fedfactory run` would report with that rule and the
same experts. For reporting a finished configuration only; rules are chosen on validation (benchmarks/combine.py).

  python benchmarks/rescore_local.py benchmarks/runs/cmp-fmnist-dir01-local/factory-local --combine holders
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedfactory.classifier import classifier_from_state, predict_log_proba
from fedfactory.config import load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.factory import combine_experts, expert_recipe
from fedfactory.federation.runner import expert_path
from fedfactory.metrics import evaluate
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path, help="a local-mode run directory (metrics.json, experts/, partition.json)")
    p.add_argument("--combine", required=True, choices=("product", "holders"))
    p.add_argument("--name", required=True, help="results file name under benchmarks/results")
    args = p.parse_args()
    missing = [f for f in ("config.toml", "metrics.json", "partition.json") if not (args.run / f).is_file()]
    if missing:
        raise SystemExit(f"{args.run}: no {', '.join(missing)}; give the directory of a finished local-mode run")
    cfg = load_config(str(args.run / "config.toml"))
    metrics = json.loads((args.run / "metrics.json").read_text())
    if metrics.get("mode") != "local":
        raise SystemExit(f"{args.run} is not a local-mode run (metrics.json mode {metrics.get('mode')!r})")
    histogram = np.array(json.loads((args.run / "partition.json").read_text())["histogram"])
    experts = [int(k) for k in metrics["experts"]]
    _, test = load_dataset(cfg.data.dataset, cfg.data.root or None, cfg.data.image_size, cfg.data.classes,
                           cfg.data.test_root)
    device = torch.device("cpu")
    log_probs = [predict_log_proba(classifier_from_state(
        load_file(expert_path(args.run, k)), test.images.shape[3], test.num_classes,
        expert_recipe(cfg.classifier), metrics["classifier_input_blur"]), test.images, device) for k in experts]
    scored = evaluate(combine_experts(log_probs, histogram[experts], args.combine), test.labels, test.class_names)
    source = provenance(__file__, sys.argv[1:])
    row = {"run": str(args.run), "combine": args.combine, "run_combine": cfg.classifier.combine,
           "run_accuracy": metrics["accuracy"], **{k: scored[k] for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                          "auroc", "per_class_accuracy")}}
    atomic_write_json(RESULTS / f"{args.name}.json", source | row)
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join([
        f"# {args.name}", "", provenance_line(source), "",
        f"The experts of `{args.run}` (trained with classifier.combine={cfg.classifier.combine}, which scored "
        f"{metrics['accuracy']:.4f}), combined by `{args.combine}`, on the run's test set ({len(test)} images):", "",
        "| combine | accuracy | balanced acc. | macro F1 | AUROC |", "|---|---:|---:|---:|---:|",
        f"| {args.combine} | {scored['accuracy']:.4f} | {scored['balanced_accuracy']:.4f} | {scored['macro_f1']:.4f} "
        f"| {scored['auroc']:.4f} |", ""]))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
