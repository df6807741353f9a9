"""Crash safety: a run killed with SIGKILL resumes to the same results; writes are atomic; stale temp files of
killed writes are ignored by the registry and removed by the next run."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfactory import runs
from fedfactory.config import load_config, to_toml
from fedfactory.federation.runner import save_classifier
from fedfactory.registry import load_registry
from fedfactory.report import write_samples_png
from fedfactory.runs import RunDirError, prepare_run_dir

REPO = Path(__file__).resolve().parents[1]
# Long enough (about half a second per module on one idle thread) to kill it between two modules.
COMMAND = [sys.executable, "-m", "fedfactory.cli", "run", "--config", "tiny", "generator.steps=120"]
RUN_SPECIFIC = ("timings",)  # wall-clock seconds; everything else in metrics.json is a function of the config
STALE = ".client-009_class-009.safetensors.0123456789abcdef.tmp"  # what a kill inside atomic_write_bytes leaves


def start(out: Path, log: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # A session of its own, so the whole process group can be killed.
    return subprocess.Popen([*COMMAND, f"run.out={out}"], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it may exit between poll() and killpg()
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not finish within {timeout}s; log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def module_files(out: Path) -> list[Path]:
    return sorted((out / "modules").glob("*.safetensors"))


def without(metrics: dict, keys=RUN_SPECIFIC) -> dict:
    return {k: v for k, v in metrics.items() if k not in keys}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    procs = []
    try:
        # The uninterrupted run, alongside (each run uses one thread).
        procs.append(start(reference, tmp_path / "reference.log"))
        procs.append(proc := start(victim, tmp_path / "victim-1.log"))

        # Kill it with SIGKILL once two modules are finished, well before metrics.json.
        deadline = time.monotonic() + 180
        while len(module_files(victim)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        kill(proc)
        log = (tmp_path / "victim-1.log").read_text()
        assert len(module_files(victim)) >= 2, f"no module within the time limit; log:\n{log[-3000:]}"
        assert not (victim / "metrics.json").exists(), "the run finished before the kill: raise generator.steps"
        finished = module_files(victim)
        assert len(finished) < 10

        # Simulate what a kill can leave besides finished modules: temp files of writes cut short. Corrupt one
        # finished module as a disk could, to show that resuming checks hashes instead of trusting names.
        (victim / "modules" / STALE).write_bytes(b"half a module")
        (victim / ".metrics.json.fedcba9876543210.tmp").write_text('{"accuracy": ')
        corrupted = finished[-1]
        data = bytearray(corrupted.read_bytes())
        data[-1] ^= 0x40
        corrupted.write_bytes(bytes(data))
        kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished if p != corrupted}

        # The same command again, to completion.
        procs.append(proc := start(victim, tmp_path / "victim-2.log"))
        finish(proc, tmp_path / "victim-2.log")
        finish(procs[0], tmp_path / "reference.log")
    finally:
        for p in procs:
            kill(p)

    log = (tmp_path / "victim-2.log").read_text()
    # Finished modules were reused untouched after their hash check; the corrupted one was retrained.
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in module_files(victim) if p.name in kept} == kept
    for name in kept:
        assert f"reusing {name} (hash checked)" in log
    assert re.search(rf"retraining {corrupted.name}: .*weights hash", log), log[-3000:]
    # Temp files of killed writes are gone.
    assert not [p.name for p in victim.rglob("*.tmp")]

    # Same results as the run that was never interrupted.
    a = json.loads((victim / "metrics.json").read_text())
    b = json.loads((reference / "metrics.json").read_text())
    assert without(a) == without(b)
    assert a["modules"] == [f"client-{k:03d}_class-{k:03d}" for k in range(10)]
    for name in ("classifier.safetensors", "partition.json", "samples.png", "config.toml"):
        assert (victim / name).read_bytes() == (reference / name).read_bytes().replace(
            str(reference).encode(), str(victim).encode()), name
    for p in module_files(reference):
        assert (victim / "modules" / p.name).read_bytes() == p.read_bytes(), p.name


def test_stale_temp_files_are_ignored_by_the_registry_and_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("tiny", [f"run.out={out}"])
    prepare_run_dir(cfg)
    (out / "experts").mkdir()
    stale = [out / "modules" / STALE, out / ".metrics.json.0123456789abcdef.tmp",
             out / ".classifier.safetensors.00112233445566ff.tmp",
             out / "experts" / ".client-003.safetensors.aaaaaaaaaaaaaaaa.tmp"]
    for path in stale:
        path.write_bytes(b"\x80\x04half")
    # Not temp files of ours: left alone.
    keep = [out / "notes.tmp", out / ".notes.tmp", out / ".metrics.json.xyz.tmp", out / "modules" / "README"]
    for path in keep:
        path.write_text("mine")
    (out / ".0123456789abcdef.tmp").mkdir()
    # The registry is *.safetensors. pathlib's glob does return dotfiles, so what keeps a temp file out is its
    # .tmp suffix.
    assert list((out / "modules").glob("*.safetensors")) == []
    (tmp_path / ".hidden.safetensors").write_bytes(b"")
    assert [p.name for p in tmp_path.glob("*.safetensors")] == [".hidden.safetensors"]
    assert load_registry(out / "modules") == []

    prepare_run_dir(cfg)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep) and (out / ".0123456789abcdef.tmp").is_dir()


def test_temp_names_match_what_atomic_writes_create(tmp_path, monkeypatch):
    # Keep the temp file that a kill right before the rename would leave, and check cleanup recognises it.
    monkeypatch.setattr(runs.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(runs.Path, "unlink", lambda self, missing_ok=False: None)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write_bytes(tmp_path / "client-000_class-000.safetensors", b"data")
    monkeypatch.undo()
    [left] = list(tmp_path.iterdir())
    assert left.name.endswith(".tmp") and not (tmp_path / "client-000_class-000.safetensors").exists()
    assert runs.remove_stale_temp_files(tmp_path) == [left.name]
    assert list(tmp_path.iterdir()) == []


def test_run_dir_with_results_of_another_or_unknown_config_is_refused(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("tiny", [f"run.out={out}"])
    other = load_config("tiny", [f"run.out={out}", "generator.steps=3"])

    # A run that stopped before its first module (a wrong dataset path, say) does not lock its directory.
    prepare_run_dir(other)
    prepare_run_dir(cfg)
    assert load_config(str(out / "config.toml")) == cfg

    # Once it holds results, another config is refused, and so are results whose config is unknown.
    (out / "modules" / "client-000_class-000.safetensors").write_bytes(b"x")
    with pytest.raises(RunDirError, match="different config"):
        prepare_run_dir(other)
    (out / "config.toml").write_text("[generator]\nstepz = 3\n")
    with pytest.raises(RunDirError, match=r"config.toml is not a config this fedfactory reads \(unknown config key"):
        prepare_run_dir(cfg)
    (out / "config.toml").unlink()
    with pytest.raises(RunDirError, match="holds results but no config.toml"):
        prepare_run_dir(cfg)
    (out / "config.toml").write_text(to_toml(cfg))
    assert prepare_run_dir(cfg) == out


def test_classifier_and_samples_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    images = np.zeros((4, 8, 8, 1), np.uint8)
    labels = np.array([0, 0, 1, 1])
    save_classifier(model, tmp_path / "classifier.safetensors")
    write_samples_png(images, labels, ("a", "b"), tmp_path / "samples.png", per_class=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # A failure at the last step (the rename) leaves the previous files and no temp file behind.
    def fail(*args):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(runs.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        save_classifier(torch.nn.Linear(3, 2), tmp_path / "classifier.safetensors")
    with pytest.raises(OSError, match="simulated"):
        write_samples_png(images + 255, labels, ("a", "b"), tmp_path / "samples.png", per_class=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# Writes that go through an atomic pattern; log.txt is an append-only log by design (a kill can cut its last line).
_RAW_WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|\bsave_file\(|torch\.save\(|np\.save|"
                         r"open\([^)]*[\"'][wax]b?[\"']|\.savefig\((?!buf\b)|imsave\((?!buf\b)")


_PACKAGE = REPO / "src" / "fedfactory"
_WRITERS = sorted({*(_PACKAGE / "federation").glob("*.py"), *(_PACKAGE / "report").glob("*.py"),
                   _PACKAGE / "flower" / "server_app.py", _PACKAGE / "flower" / "site_rounds.py"})


@pytest.mark.parametrize("path", [p for p in _WRITERS if p.exists()], ids=lambda p: str(p.relative_to(_PACKAGE)))
def test_run_directory_writers_use_atomic_writes_only(path):
    raw = [line.strip() for line in path.read_text().splitlines() if _RAW_WRITES.search(line)]
    assert raw == [], f"{path.name} writes without runs.atomic_*: {raw}"
