"""Unlearning cost and effect: time to unlearn one client against the original run, accuracy before and after.

Meant for a finished Fashion-MNIST silos run (10 clients, one class each), e.g.

    fedfactory run --config fashion-mnist run.out=runs/fmnist-silos
    python benchmarks/unlearning.py runs/fmnist-silos --client 3 --name fashion-mnist-silos

Writes benchmarks/results/unlearning-<name>.json and .md, each naming the command that made it. The unlearned
run goes to a temporary directory that is deleted afterwards, unless --out keeps it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedfactory.config import Config, load_config
from fedfactory.federation.unlearning import unlearn
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(cert: dict, source_metrics: dict, source_cfg: Config, device: str, source: dict) -> dict:
    """The benchmark's numbers from the certificate and the original run's metrics."""
    original = source_metrics["timings"]
    before, after = cert["before"]["group_accuracy"], cert["after"]["group_accuracy"]
    groups = {"forgotten": "only_removed", "shared": "shared", "remaining": "rest"}
    accuracy = {name: {"before": before[g], "after": after[g]} for name, g in groups.items()}
    accuracy["overall"] = {"before": cert["before"]["accuracy"], "after": cert["after"]["accuracy"]}
    return source | {
        "run_dir": cert["source_run"],
        "clients": cert["requested"]["clients"],
        "dataset": source_cfg.data.dataset,
        "partition": source_cfg.data.partition,
        "num_clients": source_cfg.data.num_clients,
        "device": {"original": source_metrics.get("device"), "unlearning": device},
        "removed_modules": [m["module_id"] for m in cert["removed_modules"]],
        "forgotten_classes": cert["class_groups"]["only_removed"],
        "shared_classes": cert["class_groups"]["shared"],
        "seconds": {"unlearn": cert["seconds"]["unlearn"], "verify": cert["seconds"]["verify"],
                    "original_end_to_end": original["end_to_end"],
                    "original_client_training": original.get("client_training")},
        "ratio": cert["seconds"]["unlearn"] / original["end_to_end"],
        # A resumed run reused its modules, so its end_to_end leaves out client training and the ratio flatters it.
        "original_resumed": "client_training" not in original,
        "accuracy": accuracy,
        "verified": cert["verified"],
        "classifier_weights_sha256": cert["classifier"]["weights_sha256"],
    }


def to_markdown(result: dict, name: str) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    s = result["seconds"]
    lines = [
        f"# Unlearning: {name}",
        "",
        provenance_line(result),
        "",
        f"Run `{result['run_dir']}` ({result['dataset']}, {result['partition']}, {result['num_clients']} clients); "
        f"removed {', '.join(result['removed_modules'])}; forgotten classes: "
        f"{', '.join(result['forgotten_classes']) or 'none'}; shared classes: "
        f"{', '.join(result['shared_classes']) or 'none'}.",
        "",
        "| time | seconds |",
        "|---|---:|",
        f"| original run, end to end | {s['original_end_to_end']:.1f} |",
        f"| unlearning (re-synthesis, retraining, evaluation) | {s['unlearn']:.1f} |",
        f"| ratio | {result['ratio']:.3f} |",
        "",
        "| accuracy | before | after |",
        "|---|---:|---:|",
    ]
    for group, acc in result["accuracy"].items():
        lines.append(f"| {group} classes | {fmt(acc['before'])} | {fmt(acc['after'])} |")
    if result["original_resumed"]:
        lines += ["", "The original run was resumed (no client training in its timings): the ratio is not meaningful."]
    if result["verified"] is not None:
        lines += ["", f"Bit-for-bit verification against a from-scratch run: {result['verified']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--client", type=int, default=0, help="the client to unlearn")
    parser.add_argument("--name", default=None, help="results name (default: the run directory's name)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the .json and .md")
    parser.add_argument("--out", type=Path, default=None, help="keep the unlearned run here")
    parser.add_argument("--verify", action="store_true", help="also verify bit for bit (retrains the other modules)")
    args = parser.parse_args(argv)
    name = args.name or args.run_dir.resolve().name
    source = provenance(__file__, argv)

    source_cfg = load_config(str(args.run_dir / "config.toml"))
    source_metrics = json.loads((args.run_dir / "metrics.json").read_text())
    with tempfile.TemporaryDirectory(prefix="fedfactory-unlearn-bench-") as tmp:
        out = args.out or Path(tmp) / f"{name}-unlearn-client-{args.client}"
        cert = unlearn(args.run_dir, clients=(args.client,), out=out, verify=args.verify)
        device = json.loads((out / "metrics.json").read_text())["device"]
    result = summarize(cert, source_metrics, source_cfg, device, source)

    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"unlearning-{name}.json", result)
    atomic_write_text(args.results / f"unlearning-{name}.md", to_markdown(result, name))
    print(to_markdown(result, name))
    return 0 if result["verified"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
