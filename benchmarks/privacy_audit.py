"""The empirical privacy audit beside the accountant's epsilon, for every mechanism a private module uses.

Each mechanism is calibrated alone to the claimed epsilon (dp-accounting's PLD, replace-one), released many times on
two neighbours built to reach its sensitivity, and attacked with threshold tests; Clopper-Pearson turns the best
test's error rates into a 95%-confidence lower bound on epsilon (fedfactory/privacy/empirical.py). With the noise
the accountant asks for, the bound must stay below the claim; with half of it (what the old sensitivity of 1 did
under replace-one), above.

  python benchmarks/privacy_audit.py --epsilons 1,2 --releases 200000 --sgd-releases 60000
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from fedfactory.privacy.empirical import audit_all
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="1,2")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--releases", type=int, default=200_000, help="releases per neighbour (Gaussian mechanisms)")
    p.add_argument("--sgd-releases", type=int, default=60_000, help="DP-SGD steps per neighbour")
    p.add_argument("--name", default="privacy-audit")
    args = p.parse_args()
    rows = []
    for eps in (float(e) for e in args.epsilons.split(",")):
        for scale in (1.0, 0.5):
            for r in audit_all(eps, args.delta, args.releases, args.sgd_releases, scale, seed=0):
                rows.append(asdict(r) | {"noise_scale": scale, "violated": r.violated})
                print(rows[-1], flush=True)
    prov = provenance(__file__, sys.argv[1:])
    atomic_write_json(RESULTS / f"{args.name}.json", {"provenance": prov, "rows": rows})
    lines = ["# Empirical privacy audit against the accountant", "", provenance_line(prov), "",
             f"delta {args.delta:g}; 95%-confidence Clopper-Pearson lower bounds over {24} threshold tests "
             "(Bonferroni). Noise x1: what the accountant asks for the claimed epsilon; x0.5: half of it.", "",
             "| mechanism | kind | claimed epsilon | noise | noise std | releases per neighbour | "
             "empirical lower bound | flagged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['claimed_epsilon']:.3f} | x{r['noise_scale']:g} | "
                     f"{r['noise_std']:.4g} | {r['releases']:,} | {r['lower_bound']:.3f} | "
                     f"{'violation' if r['violated'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(RESULTS / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
