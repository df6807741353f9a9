"""Bad configs are refused at load time with one line naming the key and what it accepts; every user-facing
error of the command line is one line without a traceback (unless --debug)."""

import ast
import re
from pathlib import Path

import pytest

from fedfactory.cli import main
from fedfactory.config import ConfigError, load_config, to_toml, valid_keys
from fedfactory.data.images import DatasetError
from fedfactory.data.partition import PartitionError
from fedfactory.errors import FedFactoryError
from fedfactory.federation.compare import CompareError
from fedfactory.federation.factory import SynthesisError
from fedfactory.federation.unlearning.plan import UnlearningError
from fedfactory.flower.run_config import flower_keys
from fedfactory.modules.refusal import ModuleError
from fedfactory.report import ReportError
from fedfactory.runs import RunDirError

ROOT = Path(__file__).resolve().parents[1]

ALL_KEYS = ", ".join(valid_keys())


@pytest.mark.parametrize("override, message", [
    # Unknown keys: the message lists every valid key.
    ("generator.stepz=1", f"unknown config key 'generator.stepz'; valid keys: {ALL_KEYS}"),
    ("gen.steps=1", f"unknown config key 'gen.steps'; valid keys: {ALL_KEYS}"),
    ("steps=1", f"unknown config key 'steps'; valid keys: {ALL_KEYS}"),
    ("data.alpha.x=1", f"unknown config key 'data.alpha.x'; valid keys: {ALL_KEYS}"),
    ("generator.steps", "override 'generator.steps' must look like section.key=value"),
    # Wrong types.
    ("generator.steps=abc", "generator.steps='abc': expected int"),
    ("generator.steps=1.5", "generator.steps='1.5': expected int"),
    ("data.alpha=high", "data.alpha='high': expected float"),
    ("reference.centralized=maybe", "reference.centralized='maybe': expected bool"),
    ("run.progress=2", "run.progress='2': expected bool"),
    # Choices: the message lists the valid values.
    ("data.partition=random", "data.partition='random': valid values are iid, pathological, dirichlet, natural"),
    ("generator.family=gan", "generator.family='gan': valid values are aegmm, edm"),
    ("classifier.augment=rotate", "classifier.augment='rotate': valid values are none or any of flip, crop, blur, "
     "noise joined by '+' (e.g. crop+flip)"),
    ("run.device=tpu", "run.device='tpu': valid values are auto, cpu, cuda"),
    ("classifier.norm=layer", "classifier.norm='layer': valid values are batch, group"),
    ("generator.min_samples=0", "generator.min_samples=0: must be >= 1"),
    # Ranges.
    ("data.alpha=0", "data.alpha=0.0: the Dirichlet concentration must be > 0"),
    ("data.alpha=-0.5", "data.alpha=-0.5: the Dirichlet concentration must be > 0"),
    ("data.alpha=nan", "data.alpha=nan: must be a finite number"),
    ("data.alpha=inf", "data.alpha=inf: must be a finite number"),
    ("generator.steps=0", "generator.steps=0: must be >= 1"),
    ("generator.steps=-5", "generator.steps=-5: must be >= 1"),
    ("generator.batch_size=0", "generator.batch_size=0: must be >= 1"),
    ("generator.lr=0", "generator.lr=0.0: the learning rate must be > 0"),
    ("generator.lr=nan", "generator.lr=nan: must be a finite number"),
    ("classifier.lr=-1", "classifier.lr=-1.0: the learning rate must be > 0"),
    ("synthesis.samples_per_class=0", "synthesis.samples_per_class=0: must be >= 1"),
    ("synthesis.samples_per_class=-1", "synthesis.samples_per_class=-1: must be >= 1"),
    ("synthesis.batch_size=0", "synthesis.batch_size=0: must be >= 1"),
    ("data.num_clients=0", "data.num_clients=0: must be >= 1"),
    ("data.classes_per_client=0", "data.classes_per_client=0: must be >= 1"),
    ("data.min_partition_size=-1", "data.min_partition_size=-1: must be >= 0"),
    ("data.image_size=-1", "data.image_size=-1: must be >= 0"),
    ("data.image_size=2", "data.image_size=2: valid values are 0 (native size) or 4 to 1024"),
    ("data.image_size=5000", "data.image_size=5000: valid values are 0 (native size) or 4 to 1024"),
    ("run.threads=-1", "run.threads=-1: must be >= 0"),
    ("classifier.epochs=0", "classifier.epochs=0: must be >= 1"),
    ("classifier.weight_decay=-0.1", "classifier.weight_decay=-0.1: must be >= 0"),
    ("classifier.label_smoothing=1", "classifier.label_smoothing=1.0: must lie in [0, 1)"),
    ("classifier.label_smoothing=inf", "classifier.label_smoothing=inf: must be a finite number"),
    ("baselines.rounds=0", "baselines.rounds=0: must be >= 1"),
    ("baselines.fedprox_mu=-0.1", "baselines.fedprox_mu=-0.1: must be >= 0 (0 makes FedProx FedAvg)"),
    ("baselines.feddyn_alpha=0", "baselines.feddyn_alpha=0.0: must be > 0 (the server divides by it)"),
    ("baselines.lr=0", "baselines.lr=0.0: the learning rate must be > 0"),
    ("baselines.weighting=size", "baselines.weighting='size': valid values are samples, uniform"),
    ("baselines.clients_per_round=11",
     "baselines.clients_per_round=11: valid values are 0 (all) to data.num_clients=10"),
    ("baselines.val_fraction=1", "baselines.val_fraction=1.0: must lie in [0, 1)"),
])
def test_bad_override_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as refused:
        load_config("tiny", [override])
    assert str(refused.value) == message
    assert "\n" not in message


@pytest.mark.parametrize("toml, pattern", [
    ("[generator]\nsteps = 'ten'\n", r"generator.steps='ten': expected int"),
    ("[generator]\nsteps = 3.0\n", r"generator.steps=3.0: expected int, got float"),
    ("[generator]\nlr = nan\n", r"generator.lr=nan: must be a finite number"),
    ("[data]\nalpha = -inf\n", r"data.alpha=-inf: must be a finite number"),
    ("[synthesis]\nsamples_per_class = 0\n", r"synthesis.samples_per_class=0: must be >= 1"),
    ("[reference]\ncentralized = 1\n", r"reference.centralized=1: expected bool, got int"),
    ("[generatr]\nsteps = 3\n", r"unknown config key 'generatr.steps'; valid keys: run.seed"),
    ("[generator.sub]\nsteps = 3\n", r"unknown config key 'generator.sub'; valid keys: run.seed"),
    ("[data]\nroot = 3\n", r"data.root=3: expected str, got int"),
    ("steps = 3\n", r"top-level key 'steps' must be a \[section\]; valid keys: run.seed"),
    ("[generator\nsteps = 3\n", r"invalid TOML"),
])
def test_bad_toml_file_is_refused(tmp_path, toml, pattern):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=pattern) as refused:
        load_config(str(path))
    assert "\n" not in str(refused.value)


def test_valid_edges_are_accepted():
    cfg = load_config("tiny", ["data.image_size=4", "data.alpha=1e-3", "classifier.label_smoothing=0",
                               "classifier.weight_decay=0", "data.min_partition_size=0", "run.threads=0"])
    assert cfg.data.image_size == 4 and cfg.data.alpha == 1e-3


def test_the_cli_catches_the_projects_errors_and_nothing_else():
    for error in (ConfigError, DatasetError, PartitionError, RunDirError, UnlearningError, CompareError, ReportError,
                  SynthesisError, ModuleError):
        assert issubclass(error, FedFactoryError) and issubclass(error, ValueError), error


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug"), OSError("a bug")])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    import fedfactory.federation.runner as runner

    def broken(cfg):
        raise bug

    monkeypatch.setattr(runner, "run", broken)
    with pytest.raises(type(bug), match="a bug"):
        main(["run", "--config", "tiny"])


CONFIG_SECTIONS = ("run", "data", "generator", "synthesis", "classifier", "reference", "baselines", "flower")
KEY_IN_TEXT = re.compile(rf"(?<![\w.])(?:{'|'.join(CONFIG_SECTIONS)})\.[a-z_]+\b")


def test_error_messages_name_only_config_keys_that_exist():
    # Every string a `raise` builds (f-string parts included) that looks like section.key must be a real key.
    valid = set(valid_keys()) | set(flower_keys())
    wrong = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        wrong += [f"{path.name}:{node.lineno} {key}" for key in KEY_IN_TEXT.findall(part.value)
                                  if key not in valid]
    assert wrong == []


def _finished_looking_run(out, overrides):
    """A directory that a run with `overrides` would have left: its config.toml and a metrics.json."""
    out.mkdir()
    (out / "config.toml").write_text(to_toml(load_config("tiny", [f"run.out={out}", *overrides])))
    (out / "metrics.json").write_text("{}\n")


def _prepare_foreign_module(out):
    """A run directory of this config whose registry holds a pickle under a module-like name."""
    out.mkdir()
    (out / "config.toml").write_text(to_toml(load_config("tiny", [f"run.out={out}", "generator.steps=2"])))
    (out / "modules").mkdir()
    (out / "modules" / "client-099_class-000.safetensors").write_bytes(b"\x80\x04K\x01.")


# (argv after the command, setup, exception type, pattern of the one error line)
CLI_ERRORS = {
    "config": (["run", "--config", "tiny", "generator.stepz=1"], None, ConfigError,
               r"unknown config key 'generator.stepz'"),
    "dataset": (["run", "--config", "tiny", "run.out={out}", "data.dataset=nope"], None, DatasetError,
                r"unknown dataset 'nope'; data.dataset must be one of digits, .*medmnist"),
    "dataset files": (["run", "--config", "tiny", "run.out={out}", "data.dataset=fashion-mnist",
                       "data.root={tmp}/nowhere"], None, DatasetError, r"fashion-mnist"),
    "partition": (["run", "--config", "tiny", "run.out={out}", "data.num_clients=100000"], None, PartitionError,
                  r"data.num_clients=100000 exceeds the \d+ samples; lower data.num_clients"),
    "module": (["run", "--config", "tiny", "run.out={out}", "generator.steps=2"], _prepare_foreign_module,
               ModuleError, r"client-099_class-000.safetensors: file is a Python pickle, which is never loaded"),
    "run dir": (["run", "--config", "tiny", "run.out={out}"],
                lambda out: _finished_looking_run(out, ["generator.steps=3"]), RunDirError,
                r"holds a run with a different config; choose another run.out or delete"),
    "run dir is a file": (["run", "--config", "tiny", "run.out={out}"], lambda out: out.write_text("x"),
                          RunDirError, r"is a file, not a directory; choose another run.out"),
    "unlearning": (["unlearn", "{tmp}", "--client", "0"], None, UnlearningError,
                   r"has no config.toml: not a finished run directory"),
    "inspect": (["inspect", "{out}"], None, ModuleError, r"no such module file or directory"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_error_is_one_line_without_traceback_unless_debug(capsys, tmp_path, case):
    argv, setup, error, pattern = CLI_ERRORS[case]
    out = tmp_path / "run"
    argv = [a.format(out=out, tmp=tmp_path) for a in argv]
    if setup:
        setup(out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress logging also goes to stderr; the error itself is exactly one line.
    errors = [line for line in err.splitlines() if line.startswith("fedfactory: error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    with pytest.raises(error, match=pattern):
        main(["--debug", *argv])
