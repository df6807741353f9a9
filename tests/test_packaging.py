"""The installed package, not the checkout: a wheel built from the project's files carries the presets."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_install_finds_every_preset_outside_the_checkout(tmp_path):
    # Build from a copy, so no build/ or egg-info lands in the checkout; no isolation and no deps: no network.
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fedfactory-*.whl")
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {f"fedfactory/configs/{p}" for p in presets} <= names
    # Every module of the checkout is in the wheel.
    assert {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")} <= names

    # From a directory without configs/, the installed package alone resolves every preset.
    code = ("import sys; from fedfactory.config import load_config, resolve_preset; "
            "[load_config(p) for p in sys.argv[1:]]; print(resolve_preset(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, *(p.removesuffix(".toml") for p in presets)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(tmp_path / "site" / "fedfactory" / "configs"))
