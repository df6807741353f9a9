"""Command line: `fedfactory run [--config FILE|PRESET] [section.key=value ...]`, `fedfactory report RUN_DIR`,
`fedfactory unlearn RUN_DIR --client K [--verify]`."""

import argparse
import sys

from fedfactory.config import ConfigError, load_config, valid_keys
from fedfactory.data.datasets import DatasetError
from fedfactory.data.partition import PartitionError
from fedfactory.generative.artifact import ModuleError

USER_ERRORS = (ConfigError, DatasetError, PartitionError, ModuleError, FileNotFoundError, ValueError)


def cmd_run(args) -> int:
    from fedfactory.federation.runner import run

    cfg = load_config(args.config, args.overrides)
    run(cfg)
    return 0


def cmd_report(args) -> int:
    from fedfactory.device import select_device
    from fedfactory.report import write_report

    print(write_report(args.run_dir, show_real=args.show_real, device=select_device(args.device)))
    return 0


def cmd_unlearn(args) -> int:
    from fedfactory.federation.unlearning import unlearn

    cert = unlearn(args.run_dir, clients=args.client or (), modules=args.module or (), out=args.out,
                   verify=args.verify)
    print(f"unlearned run: {cert['out']} (certificate: {cert['out']}/unlearning.json)")
    if cert["verified"] is False:
        print(f"fedfactory: verification failed: {cert['verification']['summary']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfactory", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train client modules, synthesize, train and evaluate the classifier",
                       epilog="keys: " + ", ".join(valid_keys()))
    p.add_argument("--config", default=None, help="TOML file or preset name in configs/ (digits, fashion-mnist, ...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="write RUN_DIR/report.html (also written at the end of `run`)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--show-real", action="store_true",
                   help="also show real training images next to each module's samples (needs the dataset)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="device for sampling")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("unlearn", help="write a new run without a client's modules: re-synthesize, retrain, evaluate")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--client", type=int, action="append", metavar="K",
                   help="remove every module of client K (repeatable)")
    p.add_argument("--module", action="append", metavar="MODULE_ID",
                   help="remove one module, e.g. client-003_class-007 (repeatable)")
    p.add_argument("--out", default=None, help="new run directory (default: RUN_DIR-unlearn-client-K); must not exist")
    p.add_argument("--verify", action="store_true",
                   help="also retrain the remaining modules from scratch and check the classifier is bit-identical")
    p.set_defaults(func=cmd_unlearn)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"fedfactory: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
