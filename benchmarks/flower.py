"""Flower's overhead on a preset: wall time in-process vs Simulation Engine vs Deployment Engine, and the bytes a
module takes on the wire against its file.

    OMP_NUM_THREADS=1 python benchmarks/flower.py --config tiny

One SuperNode per client (the tiny preset has 10), everything on 127.0.0.1, run.threads=1 in all three modes.
Wall time is what a user waits for: `fedfactory run` as a subprocess (Python and torch start-up included) against
`flwr run --stream` on an already started federation; the federation's own start-up is reported apart. The three
runs must give the same module hashes and metrics, or the script fails. Writes benchmarks/results/flower-<name>.json
and .md, each naming the command that made it.

    OMP_NUM_THREADS=1 python benchmarks/flower.py --sites --config digits data.num_clients=3 data.classes_per_client=4

A real deployment instead: `split-sites` writes the run's partition as one image folder per site, one SuperNode per
site reads only its folder, the server's run config names no data path, and the sites score the classifier on their
test folders (counts only). Against the in-process run of the same split: accuracy (not bit-identical: a
deployment's module ids, hence seeds, carry the site names), bytes up and down per site, wall time. Writes
benchmarks/results/flower-sites-<name>.json and .md.

    python benchmarks/flower.py --walkthrough --config digits data.num_clients=3 data.classes_per_client=4

docs/flower.md's walkthrough as a new user runs it: the same as --sites, but with no thread setting anywhere
(no OMP_NUM_THREADS, no run.threads override), so the in-process run takes every core and each ClientApp its
default. Measured one after the other in this one process; run it on an otherwise idle machine. Writes
benchmarks/results/flower-walkthrough-<name>.json and .md.
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flwr
import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedfactory.config import load_config, to_toml
from fedfactory.federation.sites import split_sites
from fedfactory.flower import loopback
from fedfactory.flower.wire import module_array
from fedfactory.modules.ids import client_name, client_of
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FLOWER_ONLY = {"timings", "failed_clients", "missing_modules", "flower"}


def load_run(out: Path) -> tuple[dict, dict[str, str]]:
    """metrics.json and the sha256 of every module file."""
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "modules").glob("*"))}
    return json.loads((out / "metrics.json").read_text()), hashes


def array_wire_bytes(data: bytes) -> int:
    """Bytes Flower transfers for one module's Array: its header object plus its chunks."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(module_array(data)).values())


def flower_mode(tmp: Path, preset: str, overrides: list[str], simulation: bool, timeout_s: float) -> dict:
    name = "simulation" if simulation else "deployment"
    cfg = load_config(preset, [*overrides, f"run.out={tmp / name}"])
    rc = tmp / f"{name}.toml"
    rc.write_text(to_toml(cfg))
    t0, load = time.perf_counter(), os.getloadavg()[0]
    with loopback.start(tmp / f"{name}-home", cfg.data.num_clients, simulation) as fed:
        if not simulation:
            fed.wait_for_nodes(timeout_s)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = fed.run(ROOT, rc, timeout_s)
        wall = time.perf_counter() - t0
        if done.returncode != 0 or not (tmp / name / "metrics.json").is_file():
            sys.exit(f"{name} run failed:\n{fed.logs()}")
    return {"out": tmp / name, "seconds": {"federation_startup": round(startup, 2), "run": round(wall, 2)},
            "load_average_before": load}


def summarize(modes: dict, source: dict, preset: str, overrides: list[str]) -> dict:
    ref_metrics, ref_hashes = load_run(modes["in_process"]["out"])
    same = {}
    for name in ("simulation", "deployment"):
        metrics, hashes = load_run(modes[name]["out"])
        same[name] = {"module_hashes": hashes == ref_hashes,
                      "metrics": {k: v for k, v in metrics.items() if k not in FLOWER_ONLY}
                      == {k: v for k, v in ref_metrics.items() if k not in FLOWER_ONLY}}
        modes[name]["metrics"] = metrics
    if not all(all(s.values()) for s in same.values()):
        sys.exit(f"Flower runs differ from the in-process run: {same}")

    # Bytes: the module files, the Array that carries each, and whole reply messages as the ServerApp received them.
    files = {p.name: p.read_bytes() for p in sorted((modes["in_process"]["out"] / "modules").glob("*"))}
    per_module = {name: {"file": len(data), "array_on_wire": array_wire_bytes(data)} for name, data in files.items()}
    flower = modes["deployment"]["metrics"]["flower"]
    per_client = {k: {"modules": len([m for m in files if client_of(m) == client_name(int(k))]),
                      "module_bytes": flower["module_bytes_received"][k], "reply_message": flower["bytes_on_wire"][k]}
                  for k in sorted(flower["bytes_on_wire"], key=int)}
    file_total = sum(m["file"] for m in per_module.values())
    reply_total = sum(c["reply_message"] for c in per_client.values())

    base = modes["in_process"]["seconds"]["run"]
    return source | {
        "preset": preset,
        "overrides": overrides,
        "num_clients": len(per_client),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "flwr": flwr.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "seconds": {name: m["seconds"] for name, m in modes.items()},
        "overhead_ratio": {name: round(modes[name]["seconds"]["run"] / base, 2)
                           for name in ("simulation", "deployment")},
        "load_average_before": {name: round(m["load_average_before"], 2) for name, m in modes.items()},
        "end_to_end_in_metrics": {name: (m.get("metrics") or ref_metrics)["timings"]["end_to_end"]
                                  for name, m in modes.items()},
        "identical_to_in_process": same,
        "bytes": {
            "per_module": per_module,
            "per_client": per_client,
            "files_total": file_total,
            "reply_messages_total": reply_total,
            "wire_over_file": round(reply_total / file_total, 4),
        },
    }


def to_markdown(r: dict, name: str) -> str:
    s, b = r["seconds"], r["bytes"]
    modules = list(b["per_module"].values())
    array_over = [m["array_on_wire"] - m["file"] for m in modules]
    lines = [
        f"# Flower overhead: {name}",
        "",
        provenance_line(r),
        "",
        f"{r['num_clients']} clients, one SuperNode each, all on 127.0.0.1; {r['machine']['cpus']} CPUs, "
        f"flwr {r['machine']['flwr']}, torch {r['machine']['torch']}, run.threads=1. "
        "Each mode ran once, on a machine shared with other jobs (load averages below), so treat the seconds as "
        "indicative.",
        "",
        "| mode | federation start-up (s) | run (s) | run / in-process | load avg before | end_to_end in metrics (s) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("in_process", "simulation", "deployment"):
        ratio = "1.00" if mode == "in_process" else f"{r['overhead_ratio'][mode]:.2f}"
        startup = s[mode].get("federation_startup", "-")
        lines.append(f"| {mode} | {startup} | {s[mode]['run']} | {ratio} | {r['load_average_before'][mode]} | "
                     f"{r['end_to_end_in_metrics'][mode]} |")
    lines += [
        "",
        "In-process is `fedfactory run` as a subprocess; the Flower modes are `flwr run . <connection> --stream` on a "
        "started federation (start-up reported apart). The runs gave identical module hashes and metrics: "
        f"{json.dumps(r['identical_to_in_process'])}.",
        "",
        "## Bytes",
        "",
        f"- Module file: {min(m['file'] for m in modules)} to {max(m['file'] for m in modules)} bytes.",
        f"- The Array that carries a module adds {min(array_over)} to {max(array_over)} bytes to its file "
        "(object header, dtype/shape/stype, chunk ids); the bytes inside are the file, unchanged.",
        f"- Whole reply messages (metadata, client ConfigRecord, ArrayRecord, Arrays, chunks) as the ServerApp "
        f"received them: {b['reply_messages_total']} bytes for {b['files_total']} bytes of module files, "
        f"{b['wire_over_file']:.4f}x; gRPC/HTTP framing comes on top.",
        "",
        "| client | modules | module bytes | reply message bytes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {c['modules']} | {c['module_bytes']} | {c['reply_message']} |"
              for k, c in b["per_client"].items()]
    return "\n".join(lines) + "\n"


def sites_benchmark(args, overrides: list[str], source: dict, tmp: Path) -> dict:
    """split-sites, the in-process run of the same split, and the deployment over one SuperNode per site."""
    cfg = load_config(args.config, overrides)
    split = split_sites(cfg, tmp / "sites")
    sites = sorted(split["sites"])
    out = tmp / "in_process"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedfactory.cli", "run", "--config", args.config, *overrides,
                    "reference.centralized=false", f"run.out={out}"], check=True, capture_output=True,
                   timeout=args.timeout)
    in_process = {"seconds": round(time.perf_counter() - t0, 2), "load_average_before": round(load, 2),
                  "metrics": json.loads((out / "metrics.json").read_text())}

    # The deployment's run config is the one split-sites wrote; only where the server writes changes.
    rc = tmp / "federation.toml"
    rc.write_text(Path(split["run_config"]).read_text().replace(f'out = "{cfg.run.out}"', f'out = "{tmp / "deploy"}"'))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    node_configs = [loopback.site_node_config(s, tmp / "sites" / s) for s in sites]
    with loopback.start(tmp / "home", len(sites), False, node_configs=node_configs) as fed:
        fed.wait_for_nodes(args.timeout)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = fed.run(ROOT, rc, args.timeout)
        wall = time.perf_counter() - t0
        if done.returncode != 0 or not (tmp / "deploy" / "metrics.json").is_file():
            sys.exit(f"deployment run failed:\n{fed.logs()}")
    m = json.loads((tmp / "deploy" / "metrics.json").read_text())
    fl, ev = m["flower"], m["evaluation"]
    per_site = {s: {"train_images": split["sites"][s]["train"], "test_images": ev["sites"][s],
                    "modules": len([x for x in m["modules"] if x.startswith(s + "_")]),
                    "bytes_up": {"train_reply": fl["bytes_on_wire"][s], "evaluate_reply": ev["bytes_up"][s]},
                    "bytes_down": {"train_message": fl["bytes_down_on_wire"][s],
                                   "evaluate_message": ev["bytes_down"][s]}} for s in sites}
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "num_test")
    ratio = round(wall / in_process["seconds"], 2)
    return source | {
        "walkthrough": args.walkthrough,
        "preset": args.config,
        "overrides": overrides,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "flwr": flwr.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "sites": per_site,
        "metrics": {"deployment": {k: m[k] for k in keys}, "in_process": {k: in_process["metrics"][k] for k in keys}},
        "failed_sites": m["failed_sites"],
        "seconds": {"in_process": in_process["seconds"], "deployment_startup": round(startup, 2),
                    "deployment_run": round(wall, 2), "deployment_timings": m["timings"],
                    "deployment_over_in_process": ratio,
                    "deployment_with_startup_over_in_process": round((wall + startup) / in_process["seconds"], 2)},
        "load_average_before": {"in_process": in_process["load_average_before"], "deployment": round(load, 2)},
    }


def sites_markdown(r: dict, name: str) -> str:
    d, p = r["metrics"]["deployment"], r["metrics"]["in_process"]
    walkthrough = r.get("walkthrough", False)
    threads = ("no thread setting anywhere (the in-process run takes every core, each ClientApp its default of one "
               "thread); one run each, one after the other, on an otherwise idle machine (load averages below)"
               if walkthrough else
               "run.threads=1; one run each on a shared machine (load averages below), so treat the seconds as "
               "indicative")
    lines = [
        f"# {'The deployment walkthrough' if walkthrough else 'A real deployment'}: {name}",
        "",
        provenance_line(r),
        "",
        f"{len(r['sites'])} SuperNodes on 127.0.0.1, each reading only its own site folder written by "
        "`fedfactory split-sites`; the server's run config names no data path and the sites score the classifier "
        f"on their own test folders (counts only). {r['machine']['cpus']} CPUs, flwr {r['machine']['flwr']}, torch "
        f"{r['machine']['torch']}, {threads}.",
        "",
        "| run | accuracy | balanced acc. | macro F1 | AUROC | test images | wall s | load avg before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| in-process, same split | {p['accuracy']:.4f} | {p['balanced_accuracy']:.4f} | {p['macro_f1']:.4f} | "
        f"{p['auroc']:.4f} | {p['num_test']} | {r['seconds']['in_process']} | "
        f"{r['load_average_before']['in_process']} |",
        f"| deployment, site folders | {d['accuracy']:.4f} | {d['balanced_accuracy']:.4f} | {d['macro_f1']:.4f} | "
        f"{d['auroc']:.4f} | {d['num_test']} | {r['seconds']['deployment_run']} | "
        f"{r['load_average_before']['deployment']} |",
        "",
        "In-process is `fedfactory run` as a subprocess on the same partition (the sites' folders hold exactly its "
        "rows; the union of their test folders is the whole test set). The deployment's wall time is `flwr run "
        f"--stream` on a started federation (start-up {r['seconds']['deployment_startup']} s apart). The runs are "
        "not bit-identical: a deployment's module ids, hence its seeds, carry the site names.",
        "",
        f"Deployment over in-process: **{r['seconds']['deployment_over_in_process']:.2f}x** "
        f"({r['seconds']['deployment_run']} s against {r['seconds']['in_process']} s); with the federation's "
        f"start-up, {r['seconds']['deployment_with_startup_over_in_process']:.2f}x.",
        "",
        "## Bytes per site (Flower messages, before gRPC/HTTP framing)",
        "",
        "| site | train images | test images | modules | up: modules reply | up: counts reply | down: train "
        "message | down: classifier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, v in r["sites"].items():
        lines.append(f"| {s} | {v['train_images']} | {v['test_images']} | {v['modules']} | "
                     f"{v['bytes_up']['train_reply']:,} | {v['bytes_up']['evaluate_reply']:,} | "
                     f"{v['bytes_down']['train_message']:,} | {v['bytes_down']['evaluate_message']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset or TOML file")
    parser.add_argument("--name", default=None, help="results name (default: the preset)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each Flower run")
    parser.add_argument("--sites", action="store_true",
                        help="a real deployment from split-sites folders against the in-process run")
    parser.add_argument("--walkthrough", action="store_true",
                        help="--sites as docs/flower.md's walkthrough runs it: no thread setting anywhere")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    name = args.name or Path(args.config).stem
    source = provenance(__file__, sys.argv[1:])
    if args.walkthrough:
        # What a user who follows the docs runs: every process at its own default thread count.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.pop(var, None) is not None:
                print(f"{var} unset: the walkthrough runs with no thread setting", file=sys.stderr)
        args.sites, overrides = True, list(args.overrides)
    else:
        overrides = ["run.threads=1", *args.overrides]
        if os.environ.get("OMP_NUM_THREADS"):
            source["command"] = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {source['command']}"
    if args.sites:
        with tempfile.TemporaryDirectory(prefix="fedfactory-sites-") as tmp:
            result = sites_benchmark(args, overrides, source, Path(tmp))
        kind = "walkthrough" if args.walkthrough else "sites"
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / f"flower-{kind}-{name}.json", result)
        atomic_write_text(RESULTS / f"flower-{kind}-{name}.md", sites_markdown(result, name))
        print(sites_markdown(result, name))
        return

    with tempfile.TemporaryDirectory(prefix="fedfactory-flower-") as tmp:
        tmp = Path(tmp)
        out = tmp / "in_process"
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedfactory.cli", "run", "--config", args.config, *overrides,
                        f"run.out={out}"], check=True, capture_output=True, timeout=args.timeout)
        modes = {"in_process": {"out": out, "seconds": {"run": round(time.perf_counter() - t0, 2)},
                                "load_average_before": load}}
        modes["simulation"] = flower_mode(tmp, args.config, overrides, True, args.timeout)
        modes["deployment"] = flower_mode(tmp, args.config, overrides, False, args.timeout)
        result = summarize(modes, source, args.config, overrides)

    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"flower-{name}.json", result)
    atomic_write_text(RESULTS / f"flower-{name}.md", to_markdown(result, name))
    print(to_markdown(result, name))


if __name__ == "__main__":
    main()
