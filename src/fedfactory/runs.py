"""Run directory I/O: atomic writes and file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path

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
