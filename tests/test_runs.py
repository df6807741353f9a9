"""Atomic writes and file hashing in fedfactory.runs."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from fedfactory import runs


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_creates_and_overwrites(tmp_path):
    target = tmp_path / "blob.bin"
    runs.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    runs.atomic_write_bytes(target, b"\x00second\xff")
    assert target.read_bytes() == b"\x00second\xff"
    assert _listing(tmp_path) == ["blob.bin"]


def test_atomic_write_respects_umask(tmp_path):
    # Read the umask without changing it for good; tests run in one thread.
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "blob.bin"
    runs.atomic_write_bytes(target, b"x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_text_is_utf8_and_keeps_newlines(tmp_path):
    target = tmp_path / "log.txt"
    text = "réseau\r\nλ = 0.5\n"
    runs.atomic_write_text(target, text)
    assert target.read_bytes() == text.encode("utf-8")


def test_atomic_write_json_format(tmp_path):
    target = tmp_path / "metrics.json"
    runs.atomic_write_json(target, {"b": [1, 2], "a": {"y": 1, "x": "é"}})
    expected = '{\n  "a": {\n    "x": "\\u00e9",\n    "y": 1\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert target.read_text(encoding="utf-8") == expected
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": {"x": "é", "y": 1}, "b": [1, 2]}


def test_atomic_write_json_unserializable_touches_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    runs.atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        runs.atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _listing(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch, failing):
    target = tmp_path / "blob.bin"
    runs.atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(runs.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        runs.atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["blob.bin"]


def test_failed_first_write_leaves_no_target(tmp_path):
    target = tmp_path / "blob.bin"
    with pytest.raises(TypeError):
        runs.atomic_write_bytes(target, "not bytes")
    assert _listing(tmp_path) == []


def test_atomic_write_into_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        runs.atomic_write_bytes(tmp_path / "missing" / "blob.bin", b"x")


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    # 2.5 chunks, so the chunked loop and its tail are both exercised.
    data = bytes(range(256)) * (5 * (1 << 20) // 512)
    target = tmp_path / "big.bin"
    target.write_bytes(data)
    assert len(data) == (5 << 20) // 2
    assert runs.sha256_file(target) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert runs.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_provenance_names_the_command_and_the_commit_of_the_checkout():
    root = Path(__file__).resolve().parents[1]
    p = runs.provenance(root / "benchmarks" / "compare.py", ["--config", "tiny", "a b"])
    assert p["command"] == "python benchmarks/compare.py --config tiny 'a b'"
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert p["git_commit"] == head.strip() and isinstance(p["git_dirty"], bool)
        assert f"at commit `{head[:12]}`" in runs.provenance_line(p)


def test_every_benchmark_script_records_provenance():
    # sweep*.py and quality*.py belong to the generator-quality work and record their own.
    scripts = [p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
               if not p.name.startswith(("_", "sweep", "quality"))]
    assert scripts and [p.name for p in scripts if "provenance(__file__" not in p.read_text()] == []
