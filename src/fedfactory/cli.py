"""Command line: `fedfactory run [--config FILE|PRESET] [section.key=value ...]`, `fedfactory report RUN_DIR`,
`fedfactory unlearn RUN_DIR --client K [--verify]`, `fedfactory inspect MODULE|DIR`, `fedfactory audit RUN_DIR`,
`fedfactory compare [--config FILE|PRESET] [--methods m1,m2] [section.key=value ...]`,
`fedfactory split-sites [--config FILE|PRESET] --out DIR [section.key=value ...]`."""

import argparse
import json
import re
import sys
from pathlib import Path

from fedfactory.config import load_config, valid_keys
from fedfactory.errors import FedFactoryError
from fedfactory.modules.refusal import ModuleError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, refused in one line otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def cmd_run(args) -> int:
    from fedfactory.federation.runner import run

    cfg = load_config(args.config, args.overrides)
    run(cfg)
    return 0


def cmd_compare(args) -> int:
    from fedfactory.federation.compare import compare, markdown, parse_methods

    cfg = load_config(args.config, args.overrides)
    doc = compare(cfg, parse_methods(args.methods))
    print(markdown(doc, cfg), end="")
    return 0


def cmd_report(args) -> int:
    from fedfactory.device import select_device
    from fedfactory.report import write_report

    print(write_report(args.run_dir, show_real=args.show_real, device=select_device(args.device)))
    return 0


def cmd_unlearn(args) -> int:
    from fedfactory.federation.unlearning import unlearn

    # A simulation numbers its clients; a deployment names its sites (module ids carry the name).
    clients = [int(k) if re.fullmatch(r"-?[0-9]+", k) else k for k in args.client or ()]
    cert = unlearn(args.run_dir, clients=clients, modules=args.module or (), out=args.out, verify=args.verify)
    print(f"unlearned run: {cert['out']} (certificate: {cert['out']}/unlearning.json)")
    if "skipped" in cert.get("verification", {}):
        print(f"fedfactory: verification skipped: {cert['verification']['skipped']}", file=sys.stderr)
    if cert["verified"] is False:
        print(f"fedfactory: verification failed: {cert['verification']['summary']}", file=sys.stderr)
        return 1
    return 0


def cmd_split_sites(args) -> int:
    from fedfactory.federation.sites import split_sites

    cfg = load_config(args.config, args.overrides)
    doc = split_sites(cfg, Path(args.out))
    for site, counts in doc["sites"].items():
        print(f"{site}: {counts['train']} training and {counts['test']} test images in {args.out}/{site}")
    print(f"run config for the deployment: {doc['run_config']}")
    return 0


def cmd_audit(args) -> int:
    from fedfactory.audit import audit_run, summary_line
    from fedfactory.device import select_device

    doc = audit_run(args.run_dir, num_synthetic=args.synthetic, max_candidates=args.candidates,
                    figure=args.figure, device=select_device(args.device), site=args.site, data_root=args.data_root)
    name = "audit.json" if args.site is None else f"audit-{args.site}.json"
    print(f"{summary_line(doc)}; written to {Path(args.run_dir) / name}")
    return 0


def check_module_file(path: Path, in_registry: bool) -> tuple[dict | None, str | None]:
    """(manifest or None, refusal or None) for one module file, checked as load_registry checks it."""
    from fedfactory.modules.files import load_module, read_manifest
    from fedfactory.registry import load_registry_file, module_spec

    try:
        # Header only, so a module refused later (a hash mismatch, say) still shows what it claims to be.
        manifest = read_manifest(path)
    except ModuleError:
        manifest = None  # load_module refuses it too and says why
    try:
        manifest = load_registry_file(path).manifest if in_registry else load_module(path, expected=module_spec)[0]
    except ModuleError as e:
        return manifest, str(e)
    return manifest, None


def _printable(text: str) -> str:
    # File names come from whoever filled the directory; keep control characters off the terminal.
    return text if text.isprintable() else ascii(text)


def inspect_registry(directory: Path) -> int:
    """One row per module file of a registry directory, then the verdict of load_registry itself."""
    from fedfactory.registry import load_registry

    paths = sorted(directory.glob("*.safetensors"))
    others = sorted(p.name for p in directory.iterdir() if p not in paths)
    rows = [("file", "verdict", "client", "class", "class name", "samples", "family", "bytes")]
    for path in paths:
        manifest, refusal = check_module_file(path, in_registry=True)
        if refusal is None:
            m = manifest
            rows.append((path.name, "valid", str(m["client_id"]), str(m["class_id"]), m["class_name"],
                         str(m["num_samples"]), m["family"], str(path.stat().st_size)))
        else:
            rows.append((_printable(path.name), "refused", refusal.removeprefix(f"{path}: ")))
    # A refused row is (file, "refused", rule): the rule runs on unaligned after the first two columns.
    widths = [max(len(r[j]) for r in rows if len(r) > 3 or j < 2) for j in range(len(rows[0]))]
    for r in rows if paths else ():
        cells = [c.ljust(w) for c, w in zip(r[:2] if len(r) == 3 else r, widths, strict=False)]
        print("  ".join(cells + ([r[2]] if len(r) == 3 else [])).rstrip())
    if others:
        print(f"ignored (not *.safetensors): {', '.join(_printable(n) for n in others)}")
    if not paths:
        print(f"refused: {directory} holds no module files (*.safetensors)")
        return 2
    try:
        registry = load_registry(directory)
    except ModuleError as e:
        print(f"registry refused: {e}")
        return 2
    print(f"registry valid: {len(registry)} modules")
    return 0


def cmd_inspect(args) -> int:
    path = Path(args.module)
    if not path.exists():
        raise ModuleError(f"{path}: no such module file or directory")
    if path.is_dir():
        return inspect_registry(path)
    manifest, refusal = check_module_file(path, in_registry=False)
    if manifest is not None:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    print("valid" if refusal is None else f"refused: {refusal}")
    return 0 if refusal is None else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfactory", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train client modules, synthesize, train and evaluate the classifier",
                       epilog="keys: " + ", ".join(valid_keys()))
    p.add_argument("--config", default=None, help="TOML file or preset name in configs/ (digits, fashion-mnist, ...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="the factory, FL baselines, centralized and local-only on one partition: "
                       "comparison.json/.md/.png in run.out", epilog="keys: " + ", ".join(valid_keys()))
    p.add_argument("--config", default=None, help="TOML file or preset name in configs/ (digits, fashion-mnist, ...)")
    p.add_argument("--methods", default=None, help="comma-separated, default all: factory-server, factory-local, "
                   "fedavg, fedprox, scaffold, feddyn, centralized, local-only")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("split-sites", help="write the run's partition as one image folder per site "
                       "(DIR/<site>/train/<class>/*.png, DIR/<site>/test/...) and DIR/federation.toml, to try a "
                       "real Flower deployment", epilog="keys: " + ", ".join(valid_keys()))
    p.add_argument("--config", default=None, help="TOML file or preset name in configs/ (digits, fashion-mnist, ...)")
    p.add_argument("--out", required=True, help="folder to write; must not exist or be empty")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_split_sites)
    p = sub.add_parser("report", help="write RUN_DIR/report.html (also written at the end of `run`)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--show-real", action="store_true",
                   help="also show real training images next to each module's samples (needs the dataset)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="device for sampling")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("unlearn", help="write a new run without a client's modules: re-synthesize, retrain, evaluate")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--client", action="append", metavar="K",
                   help="remove every module of client K, or of site K in a deployment's run (repeatable)")
    p.add_argument("--module", action="append", metavar="MODULE_ID",
                   help="remove one module, e.g. client-003_class-007 (repeatable)")
    p.add_argument("--out", default=None, help="new run directory (default: RUN_DIR-unlearn-client-K); must not exist")
    p.add_argument("--verify", action="store_true",
                   help="also retrain the remaining modules from scratch and check the classifier is bit-identical")
    p.set_defaults(func=cmd_unlearn)
    p = sub.add_parser("audit", help="memorization and membership inference of every module: RUN_DIR/audit.json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--synthetic", type=positive_int, default=2000, help="synthetic samples per module (default 2000)")
    p.add_argument("--candidates", type=positive_int, default=1000,
                   help="members and non-members each that the attack scores (default 1000)")
    p.add_argument("--figure", action="store_true", help="also write RUN_DIR/audit-closest.png, the synthetic "
                   "samples closest to training images (shows real images: only for whoever may see the site's data)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="device for sampling")
    p.add_argument("--site", help="a deployment: audit this site's modules, at the site (needs --data-root)")
    p.add_argument("--data-root", help="the site's image folder (train/<class>/, test/<class>/)")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("inspect", help="print a module's manifest and whether the server accepts it (exit 2 if not)")
    p.add_argument("module", metavar="MODULE", help="a module .safetensors file, or a registry directory of them")
    p.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    # Only the project's own refusals (ModuleError among them) become one line; any other exception is a bug and
    # keeps its traceback.
    try:
        return args.func(args)
    except FedFactoryError as e:
        if args.debug:
            raise
        print(f"fedfactory: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
