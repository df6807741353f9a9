"""How local mode's experts should combine, chosen on the validation split from saved expert outputs.

`benchmarks/quality.py --local --save-log-probs F.npz` writes every expert's validation log-probabilities
(experts, N, C) for Fashion-MNIST silos (expert k holds the real images of class k). This scores combination
rules on them without retraining a single expert; the test set is never read.

  python benchmarks/combine.py /tmp/lp/missing-3000-5.npz /tmp/lp/all-3000-5.npz
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from fedfactory.federation.factory import combine_experts
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def rules(lp: np.ndarray) -> dict[str, np.ndarray]:
    """Scores (N, C) of every rule from experts' log-probabilities (K, N, C), expert k the holder of class k."""
    k, c = lp.shape[0], lp.shape[2]
    holders = np.eye(k, c)  # silos: expert k holds the real images of class k
    out = {"product": combine_experts(list(lp), None, "product"),
           "mixture (mean probability)": np.log(np.exp(lp).mean(axis=0)),
           "others only (no holder)": np.where(holders[:, None, :] > 0, 0.0, lp).sum(axis=0)}
    for lam in (0.25, 0.5, 0.75, 0.9, 1.0):
        # Per class c, a weighted geometric mean of the experts' p_k(c | x): weight (1 - lam) / K for every
        # expert plus lam times expert k's share of the real images of c (lam 0: the product; 1: holders only).
        w = (1 - lam) / k + lam * holders / holders.sum(axis=0, keepdims=True)
        out[f"holder weight {lam}"] = np.einsum("kc,knc->nc", w, lp)
    # The rule the package ships, through the package: it must agree with holder weight 1.0.
    out["holders (combine_experts)"] = combine_experts(list(lp), holders, "holders")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--results", default=str(RESULTS / "combine-fashion-mnist-silos"),
                   help="results path without suffix (.json and .md are written)")
    args = p.parse_args()
    source = provenance(__file__, sys.argv[1:])
    rows = []
    for f in args.files:
        if not Path(f).is_file():
            raise SystemExit(f"{f}: no such file; make it with benchmarks/quality.py --local --save-log-probs {f}")
        d = np.load(f)
        if not {"log_probs", "labels"} <= set(d.files):
            raise SystemExit(f"{f} holds {d.files}, not log_probs and labels from quality.py --save-log-probs")
        lp, y = d["log_probs"], d["labels"]
        rows.append({"file": Path(f).name,
                     "experts_alone": [round(float((e.argmax(1) == y).mean()), 4) for e in lp],
                     "rules": {name: round(float((s.argmax(1) == y).mean()), 4) for name, s in rules(lp).items()}})
    atomic_write_json(Path(args.results + ".json"), source | {"rows": rows})
    names = [r["file"] for r in rows]
    lines = ["# How local mode's experts combine (Fashion-MNIST silos, validation split)", "",
             provenance_line(source), "",
             "Validation accuracy (1,000 held-out training images per class, `benchmarks/quality.py` protocol) of",
             "the same experts under each rule; expert k holds the real images of class k. The test set is not read.",
             "Expert outputs from `python benchmarks/quality.py --variant preset500 --set steps=500 --local",
             "--local-synthetic {missing,all} --samples 3000 --epochs 5 --save-log-probs F.npz` (the preset's local",
             "recipe; their product rows are in quality-sweep.md). Holder weight w: class c's score is",
             "(1 - w) * mean_k log p_k(c | x) + w * log p_c(c | x); w = 0 is the product, w = 1 the `holders` rule.",
             "", "| rule | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for rule in rows[0]["rules"]:
        lines.append(f"| {rule} | " + " | ".join(f"{r['rules'][rule]:.4f}" for r in rows) + " |")
    lines.append("| each expert alone (min to max) | " + " | ".join(
        f"{min(r['experts_alone']):.4f} to {max(r['experts_alone']):.4f}" for r in rows) + " |")
    atomic_write_text(Path(args.results + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
