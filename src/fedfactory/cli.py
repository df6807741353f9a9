"""Command line: `fedfactory run [--config FILE|PRESET] [section.key=value ...]`."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfactory", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train client modules, synthesize, train and evaluate the classifier",
                       epilog="keys: " + ", ".join(valid_keys()))
    p.add_argument("--config", default=None, help="TOML file or preset name in configs/ (digits, fashion-mnist, ...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_run)
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
