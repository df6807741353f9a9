"""The run directory: its lifecycle (refuse, create or resume it; log to it), atomic writes and file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedfactory.config import Config, ConfigError, config_hash, load_config, to_toml
from fedfactory.errors import FedFactoryError

log = logging.getLogger("fedfactory")

_HASH_CHUNK_BYTES = 1 << 20
_TEMP_TOKEN_HEX = 16  # hex digits of the random part of a temp name
# What atomic_write_bytes names its temp files: ".<target name>.<random hex>.tmp".
_TEMP_NAME_RE = re.compile(rf"\..+\.[0-9a-f]{{{_TEMP_TOKEN_HEX}}}\.tmp")


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a completed rename survives a crash."""
    # Windows cannot open a directory as a file; NTFS renames are journaled there anyway.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one."""
    path = Path(path)
    # The temp file lives in the target's directory because os.replace is only atomic within a filesystem.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(_TEMP_TOKEN_HEX // 2)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for a plain open(); mkstemp would force 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        # The temp name is already gone if the failure came after os.replace; a failed cleanup must not
        # hide the original error.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` as UTF-8, newlines unchanged."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    """Atomically write `obj` as JSON with sorted keys, indent 2 and a trailing newline."""
    # Serialize first so an unserializable object raises before any file is touched.
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete temp files that a killed atomic write left in `directory`; returns their names.

    Call it only while no other process writes to the directory: a live writer's temp file looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if _TEMP_NAME_RE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path.name)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class RunDirError(FedFactoryError, ValueError):
    """The run directory belongs to a different config or cannot be used."""


@dataclass
class Timer:
    """Seconds per phase of a run (metrics.json's timings), and when the run started."""

    timings: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings.get(phase, 0.0) + seconds, 3)


def has_results(out: Path) -> bool:
    """Whether a run directory holds anything a run computed: a module, a classifier or metrics."""
    return ((out / "metrics.json").exists() or (out / "classifier.safetensors").exists()
            or any((out / "modules").glob("*.safetensors")))


def check_run_dir(cfg: Config) -> None:
    """Refuse run.out if it holds results of a different config (or results with no readable config.toml).

    A directory with a different (or unreadable, or missing) config.toml is refused as soon as it holds results,
    so two configs never mix; one without results (a run that failed before its first module) may be taken over.
    """
    out = Path(cfg.run.out)
    saved = out / "config.toml"
    fix = f"choose another run.out or delete {out}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run.out={out} is a file, not a directory; choose another run.out")
    if out.exists() and has_results(out):
        if not saved.is_file():
            raise RunDirError(f"{out} holds results but no config.toml to match them to this config; {fix}")
        try:
            same = config_hash(load_config(str(saved))) == config_hash(cfg)
        except ConfigError as e:
            raise RunDirError(f"{saved} is not a config this fedfactory reads ({e}); {fix}") from None
        if not same:
            raise RunDirError(f"{out} holds a run with a different config; {fix}")


def prepare_run_dir(cfg: Config) -> Path:
    """Create runs/<name>/ or reuse it when its config.toml equals this config (check_run_dir); write config.toml.

    Temp files of writes cut short by a kill are deleted: one run per directory at a time.
    """
    check_run_dir(cfg)
    out = Path(cfg.run.out)
    saved = out / "config.toml"
    out.mkdir(parents=True, exist_ok=True)
    (out / "modules").mkdir(exist_ok=True)
    for folder in (out, *sorted(p for p in out.iterdir() if p.is_dir())):  # modules/, experts/, ...
        for name in remove_stale_temp_files(folder):
            log.info("removed %s, left by an interrupted write", folder / name)
    atomic_write_text(saved, to_toml(cfg))
    return out


def setup_logging(out: Path) -> None:
    """Log to stdout and to <run>/log.txt (appending, so a resumed run keeps its history)."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(), logging.FileHandler(out / "log.txt")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def provenance(script: str | os.PathLike, argv: list[str]) -> dict:
    """The command line, the git commit of the script's checkout and whether tracked files differed from it."""
    script = Path(script).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(script.parent), *args], capture_output=True, text=True,
                                  timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None  # no git, or not a checkout (an installed copy): the command is still recorded
        return done.stdout.strip()

    top = git("rev-parse", "--show-toplevel")
    name = str(script.relative_to(top)) if top and script.is_relative_to(top) else script.name
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"command": shlex.join(["python", name, *argv]), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status)}


def provenance_line(p: dict) -> str:
    """provenance() as one Markdown line for a results file."""
    commit = f"`{p['git_commit'][:12]}`" if p["git_commit"] else "unknown (not a git checkout)"
    return f"Command: `{p['command']}` at commit {commit}" + (" with uncommitted changes" if p["git_dirty"] else "")
