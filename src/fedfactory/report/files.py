"""Reading a run directory for the report: every piece it can use, each None (with a note) when missing or
unreadable, so nothing here raises for an interrupted run or a malformed file."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedfactory.config import Config, load_config
from fedfactory.errors import FedFactoryError
from fedfactory.modules.ids import implied_modules

REPORT_NAME = "report.html"
RUN_PIECES = ("config.toml", "partition.json", "metrics.json", "modules")


class ReportError(FedFactoryError, ValueError):
    """The path is not a run directory."""


@dataclass
class RunFiles:
    """The pieces of a run directory, each None when absent or unreadable (with a note saying which)."""

    path: Path
    config_text: str | None = None
    config: Config | None = None
    partition: dict | None = None
    metrics: dict | None = None
    comparison: dict | None = None
    unlearning: dict | None = None
    audit: dict | None = None
    module_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_json(path: Path, notes: list[str], required: bool) -> dict | None:
    """A JSON object from `path`, or None with a note when it is missing (if required) or malformed."""
    if not path.is_file():
        if required:
            notes.append(f"{path.name} is missing")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name} is unreadable ({e})")
        return None
    if not isinstance(value, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return None
    return value


def read_run(run_dir: Path) -> RunFiles:
    """Read every piece a report can use; nothing here raises for a missing or malformed piece."""
    run = RunFiles(run_dir)
    config_path = run_dir / "config.toml"
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:
            run.config = load_config(str(config_path))
        except ValueError as e:
            run.notes.append(f"config.toml does not load ({e}); samples use seed 0")
    else:
        run.notes.append("config.toml is missing; samples use seed 0")
    run.partition = read_json(run_dir / "partition.json", run.notes, required=True)
    run.metrics = read_json(run_dir / "metrics.json", run.notes, required=True)
    if run.metrics is None and (run_dir / "partition.json").is_file():
        run.notes.append("no results yet: the run stopped before evaluation (resume it with the same command)")
    run.comparison = read_json(run_dir / "comparison.json", run.notes, required=False)
    run.unlearning = read_json(run_dir / "unlearning.json", run.notes, required=False)
    run.audit = read_json(run_dir / "audit.json", run.notes, required=False)
    run.module_paths = sorted((run_dir / "modules").glob("*.safetensors"))
    if not run.module_paths:
        run.notes.append("no modules in modules/")
    return run


def expected_modules(partition: dict, min_samples: int = 1) -> list[str]:
    """Module ids the partition implies: one per (client, class) cell with at least min_samples real images."""
    # A deployment's partition.json names its sites (module ids carry the site name); a simulation's numbers them.
    clients = partition.get("sites") or list(range(len(partition["histogram"])))
    return list(implied_modules(partition["histogram"], clients, min_samples))
