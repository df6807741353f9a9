"""Privacy benchmark: `fedfactory run` at several privacy.epsilon values, then `fedfactory audit` of each run.

One row per epsilon (0 = off): accuracy, wall time per phase, the weakest module guarantee, and the audit's
largest membership-inference AUC and near-copy fraction. Runs are subprocesses, so each is exactly the
command in the table; an existing finished run directory is audited as it is (`--audit-only`).

  python benchmarks/privacy.py --config fashion-mnist --epsilons 10,1 --name privacy-fashion-mnist-silos \
      generator.residual_rank=0 run.threads=1 reference.centralized=false
  python benchmarks/privacy.py --audit-only benchmarks/runs/fashion-mnist-silos-aegmm --name audit-fashion-mnist-silos
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs"


def sh(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def audit(run_dir: Path) -> dict:
    """Audit a finished run directory (writes its audit.json) and return one results row."""
    cmd = [sys.executable, "-m", "fedfactory.cli", "audit", str(run_dir)]
    sh(cmd)
    a = json.loads((run_dir / "audit.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    guarantees = [g for g in (m.get("privacy") or {}).values() if g]
    return {"run_dir": str(run_dir), "audit_command": " ".join(["fedfactory", *cmd[3:]]),
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "timings": m["timings"],
            "epsilon_max": max((g["epsilon"] for g in guarantees), default=None),
            "delta": guarantees[0]["delta"] if guarantees else None,
            "adjacency": guarantees[0].get("adjacency") if guarantees else None,
            "accountant": guarantees[0]["accountant"] if guarantees else None,
            "mechanisms": max(guarantees, key=lambda g: g["epsilon"])["mechanisms"] if guarantees else [],
            "notes": max(guarantees, key=lambda g: g["epsilon"]).get("notes", []) if guarantees else [],
            "mia_auc_max": a["mia_auc_max"], "copy_fraction_max": a["copy_fraction_max"],
            "modules": [{k: r[k] for k in ("module_id", "mia_auc", "mia_auc_interval", "copy_fraction",
                                           "ratio_quantiles")} for r in a["modules"]]}


def markdown(rows: list[dict], prov: dict, title: str, note: str = "") -> str:
    lines = [f"# {title}", "", provenance_line(prov), ""] + ([note, ""] if note else []) + [
             "| epsilon (delta) | accuracy | client training s | end to end s | MIA AUC max | near-copy fraction max |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        eps = "off" if r["epsilon_max"] is None else f"{r['epsilon_max']:.3f} ({r['delta']:g})"
        t = r["timings"]
        lines.append(f"| {eps} | {r['accuracy']:.4f} | {t.get('client_training', 0):.0f} | {t['end_to_end']:.0f} | "
                     f"{r['mia_auc_max']:.3f} | {r['copy_fraction_max']:.4f} |")
    for r in rows:
        eps = "off" if r["epsilon_max"] is None else f"epsilon {r['epsilon_max']:.3f}"
        lines += ["", f"## {Path(r['run_dir']).name} ({eps})", "", f"Audit: `{r['audit_command']}`", ""]
        if r["mechanisms"]:
            lines += [f"Adjacency {r['adjacency']}; mechanisms of the weakest module (accountant: {r['accountant']}):",
                      "", "| mechanism | kind | sensitivity | noise std | steps | sampling rate |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {m['name']} | {m['kind']} | {m['sensitivity']:.4g} | {m['noise_std']:.4g} | {m['steps']} | "
                      f"{m['sampling_rate']:.4g} |" for m in r["mechanisms"]]
            lines += ["", "Not a mechanism: " + "; ".join(r["notes"]) + ".", ""]
        lines += ["| module | MIA AUC [95% bootstrap] | near-copy fraction | ratio quantiles 5% / 50% / 95% |",
                  "|---|---|---|---|"]
        for mod in r["modules"]:
            lo, hi = mod["mia_auc_interval"]
            q = mod["ratio_quantiles"]
            lines.append(f"| {mod['module_id']} | {mod['mia_auc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{mod['copy_fraction']:.4f} | {q['0.05']:.3f} / {q['0.5']:.3f} / {q['0.95']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--epsilons", default="10,1", help="comma-separated privacy.epsilon values (0 = off)")
    p.add_argument("--audit-only", nargs="*", default=None, metavar="RUN_DIR", help="audit these finished runs")
    p.add_argument("--name", required=True, help="results file stem in benchmarks/results")
    p.add_argument("--note", default="", help="a paragraph for the results file (where the runs came from)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    args = p.parse_args()
    rows = []
    if args.audit_only is not None:
        rows = [audit(Path(d)) for d in args.audit_only]
    else:
        for eps in args.epsilons.split(","):
            out = RUNS / f"{args.name}-eps{eps}"
            cmd = [sys.executable, "-m", "fedfactory.cli", "run", "--config", args.config, f"run.out={out}",
                   "run.progress=false", f"privacy.epsilon={eps}", *args.overrides]
            sh(cmd)
            rows.append({"run_command": " ".join(["fedfactory", *cmd[3:]])} | audit(out))
            prov = provenance(__file__, sys.argv[1:])
            atomic_write_json(RESULTS / f"{args.name}.json", {"provenance": prov, "rows": rows})
    prov = provenance(__file__, sys.argv[1:])
    atomic_write_json(RESULTS / f"{args.name}.json", {"provenance": prov, "note": args.note, "rows": rows})
    text = markdown(rows, prov, f"Privacy: {args.name}", args.note)
    atomic_write_text(RESULTS / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
