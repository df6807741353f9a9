"""The Flower run config: every fedfactory key as `section.key`, plus a `flower` section for the transport.

Flower flattens `[tool.flwr.app.config]` tables into dotted keys and parses `--run-config "data.alpha=0.1"`
as TOML, so the fedfactory keys travel unchanged. Flower only accepts override keys that pyproject.toml
declares, which is why pyproject declares all of them with the dataclass defaults; a preset file is passed
whole with `--run-config configs/tiny.toml`, and a run's resolved config.toml works the same way.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from fedfactory.config import Config, ConfigError, apply, to_dict

SECTION = "flower"


@dataclass(frozen=True)
class FlowerConfig:
    wait_nodes: float = 300.0  # seconds the ServerApp waits for data.num_clients SuperNodes to connect
    train_timeout: float = 86400.0  # seconds: TTL of a train message, and how long the server awaits replies
    # true: every SuperNode reads its own site's data (node config `site`, `data-root`) and the server holds none;
    # false: every SuperNode takes partition `partition-id` of the dataset the run config names (simulation).
    deployment: bool = False
    # A deployment's pin file (TOML, federation.intake.load_pins): each site's name, the SuperNode id that may speak
    # for it, ceilings on its counts. Empty: names and counts are trusted as reported, and metrics.json says so.
    pins: str = ""


def flower_keys() -> list[str]:
    return [f"{SECTION}.{f.name}" for f in fields(FlowerConfig)]


def default_run_config() -> dict[str, object]:
    """The flat run config pyproject.toml declares: fedfactory defaults plus the flower section."""
    flat = {f"{s}.{k}": v for s, body in to_dict(Config()).items() for k, v in body.items()}
    return flat | {f"{SECTION}.{f.name}": f.default for f in fields(FlowerConfig)}


def parse_run_config(run_config: Mapping[str, object]) -> tuple[Config, FlowerConfig]:
    """Split a Flower run config into the fedfactory config (type-checked as usual) and the transport config."""
    ours = {k: v for k, v in run_config.items() if k.startswith(SECTION + ".")}
    cfg = apply(Config(), {k: v for k, v in run_config.items() if k not in ours})
    values = {}
    for key, value in ours.items():
        name = key.removeprefix(SECTION + ".")
        if name not in {f.name for f in fields(FlowerConfig)}:
            raise ConfigError(f"unknown config key {key!r}; valid {SECTION} keys: {', '.join(flower_keys())}")
        if name == "deployment":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r}: expected true or false")
            values[name] = value
        elif name == "pins":
            if not isinstance(value, str):
                raise ConfigError(f"{key}={value!r}: expected the path of a pin file (a string), or \"\" for none")
            values[name] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}={value!r}: expected a number of seconds > 0")
        else:
            values[name] = float(value)
    return cfg, FlowerConfig(**values)
