"""Fixtures shared by the suites, and the `slow` marker for `make test-fast`."""

import pytest

from fedfactory.config import load_config
from fedfactory.federation.runner import run

# A test that needs one of these trains a whole run (or reads one that did): `make test-fast` leaves it out.
RUN_FIXTURES = frozenset({"tiny_run", "silos", "dirichlet", "private_run", "compared", "reference", "client_replies",
                          "registry", "audits"})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny preset run once for the whole session: (config, metrics, run directory). Tests read it; a test that
    edits a run copies it first. Unlearning writes beside it, never into it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config("tiny", [f"run.out={out}"])
    return cfg, run(cfg), out


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RUN_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("flower"):
            item.add_marker(pytest.mark.slow)
