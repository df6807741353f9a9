"""End-to-end benchmark of `fedfactory run` on a preset, one or more generator families, one table.

Runs each family (and each root seed) as a subprocess under /usr/bin/time -v (peak resident memory) and
collects metrics.json: accuracy, ratio to the centralized reference measured in the same run, train s, sample s,
bytes per module. With several seeds the table ends with the mean and the sample standard deviation per family.

  python benchmarks/factory.py --config fashion-mnist --families aegmm --name fashion-mnist-silos
  python benchmarks/factory.py --config fashion-mnist --seeds 0,1,2 --name fashion-mnist-silos-seeds

Seeds read one at a time (a run longer than a session) are joined with --merge: the named results files must hold the
same recipe, the `fedfactory run` command alike but for the machine settings below, and distinct seeds.

  python benchmarks/factory.py --merge NAME-s0,NAME-s1,NAME-s2 --name NAME-seeds
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(config: str, family: str, seed: int | None, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedfactory.cli", "run", "--config", config, f"run.out={out}",
           f"generator.family={family}", "run.progress=false", *overrides]
    if seed is not None:
        cmd.append(f"run.seed={seed}")
    timer = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") else []
    proc = subprocess.run(timer + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    m = json.loads((out / "metrics.json").read_text())
    sizes = list(m["bytes"]["per_module"].values())
    ref = "centralized" in (m.get("reference") or {})  # absent with reference.centralized=false
    return {"mode": m.get("mode", "server"), "family": family, "seed": seed,
            "command": " ".join(["python", "-m", "fedfactory.cli", *cmd[3:]]),
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            "auroc": m["auroc"], "centralized_accuracy": m["reference"]["centralized"]["accuracy"] if ref else None,
            "ratio": m["reference"]["accuracy_ratio"] if ref else None, "per_class_accuracy": m["per_class_accuracy"],
            "train_s": m["timings"].get("client_training"), "sample_s": m["timings"]["synthesis"],
            "classifier_s": m["timings"]["classifier"], "end_to_end_s": m["timings"]["end_to_end"],
            "reference_s": m["timings"].get("reference"), "bytes_per_module": sum(sizes) / len(sizes),
            "bytes_down_per_client": bytes_down(m),
            "peak_rss_mib": int(peak.group(1)) / 1024 if peak else None,
            "classifier_input_blur": m.get("classifier_input_blur")}


def bytes_down(metrics: dict) -> list[int] | None:
    """Local mode's smallest and largest download of one client (the other clients' modules); None in server mode."""
    down = list(metrics["bytes"].get("down_per_client", {}).values())
    return [min(down), max(down)] if down else None


def num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def spread(entry: dict, key: str, digits: int) -> str:
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        group = [r for r in rows if r["family"] == family]
        entry = {"family": family, "seeds": len(group)}
        for key in ("accuracy", "centralized_accuracy", "ratio", "end_to_end_s"):
            values = [r[key] for r in group if r[key] is not None]
            if len(values) < 2:
                entry[f"{key}_mean"] = entry[f"{key}_std"] = None
                continue
            entry[f"{key}_mean"] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values)
        out.append(entry)
    return out


# Where a run writes, its root seed and how many threads and processes it uses: they change which seed is read or how
# fast, not the recipe (threads change the last bits of the floats, not what is trained), so --merge ignores them.
MACHINE_SETTINGS = ("run.out=", "run.seed=", "run.threads=", "run.workers=", "run.progress=")


def recipe(command: str) -> list[str]:
    """A row's `fedfactory run` command without its machine settings and its family (a row's own column)."""
    return [t for t in command.split() if not t.startswith((*MACHINE_SETTINGS, "generator.family="))]


def merge(names: list[str], results: Path) -> tuple[list[dict], list[dict]]:
    """The rows of earlier results files of one recipe and distinct seeds, and each file's provenance."""
    rows, sources = [], []
    for name in names:
        path = results / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist; name results files of benchmarks/factory.py, "
                             "without .json")
        try:
            data = json.loads(path.read_text())
            file_rows = data["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge: {path} is not a results file of benchmarks/factory.py ({e!r}); rerun the "
                             "seed it held or leave it out") from None
        sources.append({"name": name} | {k: data.get(k) for k in ("command", "git_commit", "git_dirty")})
        for row in file_rows:
            if "bytes_down_per_client" not in row:  # written before rows carried it: its run's metrics.json, if kept
                out = next((t.removeprefix("run.out=") for t in row["command"].split() if t.startswith("run.out=")), "")
                metrics = Path(out) / "metrics.json"
                kept = out and metrics.is_file()
                row["bytes_down_per_client"] = bytes_down(json.loads(metrics.read_text())) if kept else None
            rows.append(row)
    first = recipe(rows[0]["command"])
    for r in rows[1:]:
        if recipe(r["command"]) != first:
            raise SystemExit(f"--merge: the runs differ in more than machine settings: "
                             f"{' '.join(recipe(r['command']))!r} against {' '.join(first)!r}; merge only one recipe's "
                             "seeds")
    seeds = [(r["family"], r["seed"]) for r in rows]
    if any(seed is None for _, seed in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: the runs' families and root seeds are {seeds}; each run of a family must name its "
                         "own seed (--seeds)")
    return rows, sources


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--families", default="aegmm")
    p.add_argument("--name", required=True)
    p.add_argument("--seeds", default="", help="comma-separated root seeds; empty: the preset's own")
    p.add_argument("--runs", default="benchmarks/runs")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (timings are then contended)")
    p.add_argument("--merge", default="", help="comma-separated results names to join instead of running")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    source = provenance(__file__, argv)  # the tree the runs start from, not whatever it is when they end
    if args.merge:
        ignored = [f"--{k}" for k in ("config", "families", "seeds", "runs", "jobs")
                   if getattr(args, k) != p.get_default(k)]
        if args.overrides or ignored:
            raise SystemExit(f"--merge joins finished results; it takes no {' '.join(ignored) or 'overrides'} (each "
                             "results file records its own)")
        names = args.merge.split(",")
        if len(names) < 2:
            raise SystemExit("--merge needs at least two results names, comma-separated")
        rows, sources = merge(names, args.results)
        # Seconds from different sessions' machines do not average into a timing; the rows keep their own.
        summary = [s | {"end_to_end_s_mean": None, "end_to_end_s_std": None} for s in summarize(rows)]
        write(args.name, args.results, source | {"merged": sources}, rows, 1, summary)
        return
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]

    def one(family: str, seed: int | None) -> dict:
        out = Path(args.runs) / (f"{args.name}-{family}" + ("" if seed is None else f"-seed{seed}"))
        row = run_one(args.config, family, seed, out, args.overrides)
        print(json.dumps(row), flush=True)
        return row

    # --jobs > 1 runs that many runs side by side (give each run.threads=1): their times then share the cores.
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda fs: one(*fs), [(f, s) for f in args.families.split(",") for s in seeds]))
    write(args.name, args.results, source, rows, args.jobs, summarize(rows) if len(seeds) > 1 else [])


def write(name: str, results: Path, source: dict, rows: list[dict], jobs: int, summary: list[dict]) -> None:
    results.mkdir(exist_ok=True)
    # A merge ran nothing: the machine that joined the files says nothing about the rows' seconds.
    machine = {} if "merged" in source else {"cpu_threads": os.cpu_count(), "jobs": jobs}
    atomic_write_json(results / f"{name}.json", source | machine | {"rows": rows, "summary": summary})
    lines = [f"# {name}", "", provenance_line(source), ""]
    if "merged" in source:
        lines += ["The seeds were read by separate runs, possibly on different machines, so their seconds compare "
                  "only within a row:", ""]
        lines += [f"- `{m['name']}`: " + provenance_line(m) for m in source["merged"]] + [""]
    if jobs > 1:
        lines += [f"{jobs} runs side by side on {os.cpu_count()} cores: their seconds are contended.", ""]
    lines += ["| family | seed | accuracy | centralized | ratio | train s | sample s | classifier s | end-to-end s | "
              "bytes/module | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = "preset" if r["seed"] is None else r["seed"]
        lines.append(f"| {r['family']} | {seed} | {r['accuracy']:.4f} | {num(r['centralized_accuracy'], 4)} | "
                     f"{num(r['ratio'], 3)} | "
                     f"{r['train_s']:.0f} | {r['sample_s']:.0f} | {r['classifier_s']:.0f} | {r['end_to_end_s']:.0f} | "
                     f"{r['bytes_per_module']:.0f} | {r['peak_rss_mib'] or float('nan'):.0f} |")
    if any(r.get("bytes_down_per_client") for r in rows):
        several = len({r["family"] for r in rows}) > 1

        def down(r: dict) -> str:
            d = r.get("bytes_down_per_client")
            who = (f"{r['family']} " if several else "") + f"seed {r['seed']}: "
            return who + (f"{d[0]:,} to {d[1]:,}" if d else "-")

        lines += ["", "Bytes down per client (local mode: the other clients' modules), smallest to largest: " +
                  "; ".join(down(r) for r in rows)]
    if summary:
        lines += ["", "Mean and sample standard deviation over seeds:", "",
                  "| family | seeds | accuracy | centralized | ratio | end-to-end s |", "|---|---|---|---|---|---|"]
        for s in summary:
            lines.append(f"| {s['family']} | {s['seeds']} | {spread(s, 'accuracy', 4)} | "
                         f"{spread(s, 'centralized_accuracy', 4)} | {spread(s, 'ratio', 3)} | "
                         f"{num(s['end_to_end_s_mean'], 0)} |")
    atomic_write_text(results / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
