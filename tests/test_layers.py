"""Imports point downwards only (docs/architecture.md, "Layers"): no layer imports an upper one, even in a function."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedfactory"
LAYERS = [  # lowest first; a module may import its own layer and the ones below
    ("support", ("config", "errors", "seeding", "runs", "device", "progress", "workers", "__init__")),
    ("data", ("data",)),
    ("privacy", ("privacy",)),
    ("modules", ("modules",)),
    ("ml", ("generative", "classifier", "metrics", "registry")),
    ("report and audit", ("report", "audit")),
    ("federation", ("federation",)),
    ("entry", ("flower", "cli")),
]


def layer_of(module: str) -> int:
    top = module.removeprefix("fedfactory.").split(".")[0] or "__init__"
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedfactory"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("fedfactory")}
    return names - {"fedfactory"}


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_an_upper_layer(path):
    own = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = sorted(m for m in imported_modules(path) if layer_of(m) > own)
    assert upward == [], f"{LAYERS[own][0]} imports {upward}"


def test_federation_never_imports_flower_and_report_no_federation():
    for path in (PACKAGE / "federation").rglob("*.py"):
        assert not any(m.startswith("fedfactory.flower") for m in imported_modules(path)), path.name
    report = sorted((PACKAGE / "report").rglob("*.py"))
    assert report, "the report package moved: point this test at it"
    for path in report:
        upward = [m for m in imported_modules(path) if m.startswith(("fedfactory.federation", "fedfactory.flower"))]
        assert upward == [], path.name
