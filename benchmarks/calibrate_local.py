"""Whether calibrating local mode's experts would help the holders rule, on the validation split.

Under `holders` (Fashion-MNIST silos) class c is scored by expert c's log p_c(c | x) alone, so the experts' scores are
compared with each other as they come. If one expert were over-confident, a per-expert calibration would move the
decision. A client can calibrate its expert only with what it holds, its own real images of its class; so each rule
below is fitted on half of every class's validation images (expert c sees its class's half only) and all rules are
scored on the other half. The last rule cheats on purpose: per-class biases fitted for accuracy with every
class's real images (no client has them), to see whether any per-expert shift would help at all. The test set is
never read.

  python benchmarks/calibrate_local.py /work/scratch/lp/pc8-local.npz
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from fedfactory.federation.factory import combine_experts
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def halves(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A boolean mask: half of every class's rows (the calibration half), drawn with `seed`."""
    rng, mask = np.random.default_rng(seed), np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        mask[rows[: len(rows) // 2]] = True
    return mask


def rules(lp: np.ndarray, labels: np.ndarray, cal: np.ndarray,
          server: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scores (N, C) of each rule from the experts' log-probabilities (K = C, N, C), expert c holding class c, and
    optionally a server-mode classifier's probabilities (N, C) on the same images."""
    num_classes = lp.shape[2]
    own = np.stack([lp[c, :, c] for c in range(num_classes)], 1)  # log p_c(c | x), the holders rule's scores
    logit = own - np.log(-np.expm1(np.minimum(own, -1e-12)))  # log p / (1 - p): the same order as own, unbounded
    positives = [np.sort(logit[cal & (labels == c), c]) for c in range(num_classes)]
    out = {"holders (as shipped)": combine_experts(list(lp), np.eye(num_classes), "holders"),
           # Each expert's score as the share of its own held-out images it beats (a rank, comparable across experts).
           "own-image rank": np.stack([np.searchsorted(p, logit[:, c]) / len(p) for c, p in enumerate(positives)], 1)
           + 1e-9 * logit,
           # Each expert's logit standardized by its own held-out images' mean and spread.
           "own-image z-score": np.stack([(logit[:, c] - p.mean()) / p.std() for c, p in enumerate(positives)], 1)}
    # Not available to any client: per-class biases that maximize accuracy on the calibration half, with
    # every class's images, by coordinate ascent over a grid.
    bias, grid = np.zeros(num_classes), np.linspace(-3, 3, 121)
    for _ in range(3):
        for c in range(num_classes):
            trial = np.repeat(bias[None], len(grid), 0)
            trial[:, c] = grid
            accuracy = [((logit[cal] + b).argmax(1) == labels[cal]).mean() for b in trial]
            bias[c] = grid[int(np.argmax(accuracy))]
    out["per-class bias, all classes' images (no client has them)"] = logit + bias
    if server is not None:
        # One more expert: the server-mode classifier (synthetic images only, the modules every client receives),
        # its log-probabilities added with a weight fitted on the calibration half.
        log_server = np.log(np.maximum(server, 1e-12))
        weights = np.linspace(0, 2, 21)
        best = max(weights, key=lambda w: ((own + w * log_server)[cal].argmax(1) == labels[cal]).mean())
        out["server classifier alone"] = log_server
        out["holders + server classifier, weight 1"] = own + log_server
        out[f"holders + server classifier, weight fitted ({best:.1f})"] = own + best * log_server
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("file", help="quality.py --local --save-log-probs output (silos)")
    p.add_argument("--server", help="quality.py --save-probs output on the same validation images (server mode)")
    p.add_argument("--results", default=str(RESULTS / "calibrate-fashion-mnist-silos"))
    args = p.parse_args()
    if not Path(args.file).is_file():
        raise SystemExit(f"{args.file}: no such file; make it with benchmarks/quality.py --local --save-log-probs")
    d = np.load(args.file)
    lp, labels = d["log_probs"].astype(np.float64), d["labels"]
    if lp.shape[0] != lp.shape[2]:
        raise SystemExit(f"{args.file}: {lp.shape[0]} experts for {lp.shape[2]} classes; silos need one per class")
    server = None
    if args.server:
        if not Path(args.server).is_file():
            raise SystemExit(f"{args.server}: no such file; make it with benchmarks/quality.py --save-probs")
        s = np.load(args.server)
        if not np.array_equal(s["labels"], labels):
            raise SystemExit(f"{args.server} holds other validation images than {args.file} (labels differ)")
        server = s["probs"][0].astype(np.float64)
    cal = halves(labels)
    held_out = ~cal
    rows = {}
    for name, scores in rules(lp, labels, cal, server).items():
        pred = scores[held_out].argmax(1)
        per_class = [float((pred[labels[held_out] == c] == c).mean()) for c in range(lp.shape[2])]
        rows[name] = {"accuracy": round(float((pred == labels[held_out]).mean()), 4),
                      "per_class": [round(a, 3) for a in per_class]}
    source = provenance(__file__, sys.argv[1:])
    atomic_write_json(Path(args.results + ".json"), source | {"file": Path(args.file).name, "server": args.server,
                                                               "scored_images": int(held_out.sum()), "rules": rows})
    lines = ["# Calibrating local mode's experts (Fashion-MNIST silos, validation split)", "", provenance_line(source),
             "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Scored on {int(held_out.sum())} validation images (the half no rule was fitted on).", "",
             "| rule | accuracy | T-shirt | pullover | coat | shirt |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        pc = r["per_class"]
        lines.append(f"| {name} | {r['accuracy']:.4f} | {pc[0]:.3f} | {pc[2]:.3f} | {pc[4]:.3f} | {pc[6]:.3f} |")
    atomic_write_text(Path(args.results + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
