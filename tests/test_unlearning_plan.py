"""The unlearning plan on hand-made partitions: which modules, rows and counts go, without data files or training."""

from pathlib import Path

import numpy as np
import pytest

from fedfactory.config import load_config
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram, implied_cells
from fedfactory.federation.unlearning.plan import UnlearningError, plan_deployment, plan_simulation
from fedfactory.modules.ids import module_id

RUN = Path("runs/never-written")  # the plan only names the run directory in its messages
#           client 0      client 1   client 2
LABELS = [0, 0, 1, 1] + [1, 1, 2] + [2, 2, 0, 2]
PARTS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]


def modules_of(hist, clients) -> dict[str, dict]:
    """The manifests' fields the plan reads, one per cell with at least min_samples=2 images."""
    out = {}
    for (k, c), n in implied_cells(hist, 2).items():
        mid = module_id(clients[k], c)
        out[mid] = {"module_id": mid, "client_id": clients[k], "class_id": c, "num_samples": n}
    return out


def before(num_classes: int) -> dict:
    return {"confusion_matrix": np.eye(num_classes, dtype=int).tolist(), "synthesis_plan": {}}


@pytest.fixture
def simulation():
    train = ImageDataset(images=np.zeros((len(LABELS), 2, 2, 1), np.uint8), labels=np.asarray(LABELS, np.int64),
                         class_names=("a", "b", "c"), name="hand-made")
    hist = class_histogram(train.labels, [np.asarray(p) for p in PARTS], 3)
    partition = {"scheme": "pathological", "indices": PARTS, "histogram": hist.tolist(), "class_names": ["a", "b", "c"],
                 "withdrawn_modules": ["client-003_class-000"]}
    manifests = modules_of(hist, [0, 1, 2])
    release = {mid: {"module_id": mid, "released": True} for mid in manifests}

    def plan(mode="server", clients=(), modules=()):
        cfg = load_config("tiny", ["data.num_clients=3", "generator.min_samples=2", f"classifier.mode={mode}"])
        return plan_simulation(RUN, cfg, partition, before(3), manifests, release, clients, modules, train)
    return plan


def test_a_client_loses_every_module_and_every_row_also_below_min_samples(simulation):
    plan = simulation(clients=(1,))
    assert plan.deployment is False and plan.retrains == "classifier.safetensors" and plan.participants is None
    # Client 1's class-2 row (6) trains no module (one image < min_samples) but is its data: withdrawn too.
    assert plan.removed == ("client-001_class-001",)
    assert [p.tolist() for p in plan.parts] == [PARTS[0], [], PARTS[2]] == plan.partition["indices"]
    assert plan.partition["histogram"][1] == [0, 0, 0]
    assert plan.withdrawn == ("client-001_class-001", "client-003_class-000")
    assert plan.remaining == ("client-000_class-000", "client-000_class-001", "client-002_class-002")
    assert [r["module_id"] for r in plan.release] == list(plan.remaining)
    # Class b keeps client 0's module (re-weighted); no other class had one of client 1's.
    assert plan.groups == {"only_removed": [], "shared": [1], "removed_any": [1], "rest": [0, 2]}


def test_a_single_module_takes_only_its_rows(simulation):
    plan = simulation(mode="local", modules=("client-002_class-002",))
    assert plan.removed == ("client-002_class-002",) and plan.retrains == "experts"
    # Client 2 keeps its class-a row (9) and every other client keeps everything.
    assert [p.tolist() for p in plan.parts] == [PARTS[0], PARTS[1], [9]]
    assert plan.groups["only_removed"] == [2] and plan.groups["rest"] == [0, 1]
    assert plan.participants["clients"] == [0, 1, 2]


def test_bad_requests_are_refused_by_the_plan(simulation):
    for clients, modules, message in [((), (), "nothing to unlearn"), ((5,), (), "unknown client 5"),
                                      ((), ("client-001_class-002",), "unknown module")]:
        with pytest.raises(UnlearningError, match=message):
            simulation(clients=clients, modules=modules)


def test_a_deployment_source_is_planned_from_its_counts():
    sites = ["site-a", "site-b"]
    hist = np.asarray([[3, 0], [2, 4]])
    partition = {"scheme": "sites", "sites": sites, "histogram": hist.tolist(), "class_names": ["a", "b"]}
    manifests = modules_of(hist, sites)
    cfg = load_config("tiny", ["generator.min_samples=2"])
    plan = plan_deployment(RUN, cfg, partition, before(2), manifests, {}, ("site-b",), ())
    assert plan.deployment is True and plan.parts is None
    assert plan.removed == ("site-b_class-000", "site-b_class-001") and plan.remaining == ("site-a_class-000",)
    assert plan.partition["histogram"] == [[3, 0], [0, 0]] and "indices" not in plan.partition
    assert plan.groups["only_removed"] == [1] and plan.groups["shared"] == [0]
    with pytest.raises(UnlearningError, match="unknown site"):
        plan_deployment(RUN, cfg, partition, before(2), manifests, {}, ("site-x",), ())
