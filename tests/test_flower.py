"""Flower carries only bytes: the Simulation and Deployment Engines give the in-process runner's modules and metrics.

Run alone with `pytest -m flower`. Everything stays on 127.0.0.1 with FLWR_HOME in a temp dir; every process
started here is stopped with its descendants.
"""

import hashlib
import json
import re
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Metadata, RecordDict  # noqa: E402
from flwr.app.message import make_message  # noqa: E402
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args  # noqa: E402

from fedfactory.config import ConfigError, config_hash, load_config, to_toml  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.data.partition import class_histogram, split_clients  # noqa: E402
from fedfactory.federation.records import Roster  # noqa: E402
from fedfactory.federation.runner import run  # noqa: E402
from fedfactory.flower import loopback, wire  # noqa: E402
from fedfactory.flower.client_app import app as client_app  # noqa: E402
from fedfactory.flower.run_config import FlowerConfig, default_run_config, parse_run_config  # noqa: E402
from fedfactory.flower.server_app import collect, serve  # noqa: E402
from fedfactory.flower.transport import exchange  # noqa: E402
from fedfactory.flower.wire import CLIENT, MODULE_STYPE, MODULES, task_content  # noqa: E402

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parents[1]
# 3 clients x 4 classes: 12 modules, some classes held by two clients, one thread so every process computes alike.
OVERRIDES = ["data.num_clients=3", "data.classes_per_client=4", "run.threads=1"]
# trust and site_shares are written by the ServerApp (server_app.serve), not by `fedfactory run`.
FLOWER_ONLY = {"timings", "failed_clients", "missing_modules", "flower", "trust", "site_shares"}


def module_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "modules").glob("*"))}


def shared_metrics(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in FLOWER_ONLY}


def run_config_file(path: Path, out: Path, flower: str = "", overrides: tuple[str, ...] = ()) -> Path:
    """A whole fedfactory config as a Flower --run-config file (to_toml output is valid run config)."""
    path.write_text(to_toml(load_config("tiny", [*OVERRIDES, *overrides, f"run.out={out}"])) + flower)
    return path


def flower_run_config(*overrides: str) -> dict:
    """What a ServerApp's context.run_config holds for `--run-config` overrides: pyproject defaults fused with them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defaults = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    return fuse_dicts(defaults, parse_config_args(list(overrides)))


def instruction(node_id: int, cfg, skip=()) -> object:
    md = Metadata(run_id=1, message_id=f"ins-{node_id}", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=600.0, message_type="train")
    return make_message(metadata=md, content=task_content(config_hash(cfg), list(skip)))


def reply(node_id: int, content: RecordDict | None = None, error: Error | None = None) -> object:
    md = Metadata(run_id=1, message_id=f"rep-{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id=f"ins-{node_id}", group_id="", created_at=time.time(), ttl=600.0,
                  message_type="train")
    return make_message(metadata=md, content=content) if content is not None else make_message(metadata=md, error=error)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process runner on the test config: what every Flower run must reproduce."""
    out = tmp_path_factory.mktemp("flower") / "in-process"
    cfg = load_config("tiny", [*OVERRIDES, f"run.out={out}"])
    run(cfg)
    return cfg, out


@pytest.fixture(scope="module")
def client_replies(reference):
    """The ClientApp's train handler called in-process for each of the 3 partitions."""
    cfg, _ = reference
    run_config = flower_run_config(str(run_config_file(reference[1].parent / "rc.toml", reference[1])))
    replies = []
    for k in range(3):
        ctx = Context(run_id=1, node_id=100 + k, node_config={"partition-id": k, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
        replies.append(client_app(instruction(100 + k, cfg), ctx))
    return replies


def histogram_for(cfg):
    train, _ = load_data(cfg.data)
    return class_histogram(train.labels, split_clients(cfg.data, cfg.run.seed, train), train.num_classes)


def roster_for(cfg, histogram=None):
    """What a simulation's server knows before the round: the partition (by default the run's own)."""
    train, _ = load_data(cfg.data)
    histogram = histogram_for(cfg) if histogram is None else histogram
    return Roster(config_hash(cfg), train.class_names, cfg.generator.min_samples, histogram=histogram)


def test_pyproject_declares_every_config_key_with_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedfactory.flower.server_app:app",
                                 "clientapp": "fedfactory.flower.client_app:app"}
    declared, wanted = flatten_dict(app["config"]), default_run_config()
    assert sorted(wanted.keys() - declared.keys()) == [], "add these keys to [tool.flwr.app.config] in pyproject.toml"
    assert sorted(declared.keys() - wanted.keys()) == [], "remove these keys from [tool.flwr.app.config]"
    assert declared == wanted, "[tool.flwr.app.config] must hold the dataclass defaults"
    assert "federations" not in pyproject["tool"]["flwr"]


def test_run_config_maps_dotted_keys_and_preset_files_onto_the_config():
    cfg, fl = parse_run_config(flower_run_config("data.partition='dirichlet' data.alpha=0.1", "flower.wait_nodes=5"))
    assert (cfg.data.partition, cfg.data.alpha, fl.wait_nodes) == ("dirichlet", 0.1, 5.0)
    # A preset file passed whole is exactly `fedfactory run --config` on it.
    cfg, _ = parse_run_config(flower_run_config(str(ROOT / "configs" / "tiny.toml")))
    assert cfg == load_config("tiny")
    with pytest.raises(ConfigError, match="expected int"):
        parse_run_config(flower_run_config("data.num_clients='three'"))
    with pytest.raises(ConfigError, match="seconds > 0"):
        parse_run_config(flower_run_config("flower.train_timeout=-1"))
    with pytest.raises(ValueError, match="not present"):  # Flower itself refuses undeclared keys
        flower_run_config("data.num_clientz=3")


def test_client_replies_carry_the_runners_module_bytes(reference, client_replies, tmp_path):
    cfg, out = reference
    got, moved = collect(client_replies, {f"ins-{100 + k}": 100 + k for k in range(3)}, roster_for(cfg), cfg,
                         tmp_path)
    assert got.errors == () and got.rejected == () and moved == []
    assert sorted(got.accepted) == [0, 1, 2]
    ref = module_hashes(out)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == ref
    for k, r in enumerate(client_replies):
        array = r.content.array_records[MODULES]
        assert all(a.stype == MODULE_STYPE for a in array.values())
        assert got.senders[k].module_bytes == sum(len(a.data) for a in array.values())
        assert got.senders[k].wire_bytes > got.senders[k].module_bytes


def test_server_rejects_bad_replies_and_writes_nothing_from_them(reference, client_replies, tmp_path, monkeypatch):
    cfg, _ = reference
    good = client_replies[0].content
    mid = sorted(good.array_records[MODULES])[0]
    data = bytearray(good.array_records[MODULES][mid].data)
    data[-1] ^= 1  # one flipped bit in the last weight
    info = dict(good.config_records[CLIENT])

    def content(modules: dict, **fields) -> RecordDict:
        return RecordDict({MODULES: ArrayRecord(modules), CLIENT: ConfigRecord(info | fields)})

    def array(raw: bytes, stype: str = MODULE_STYPE) -> Array:
        return Array(dtype="uint8", shape=(len(raw),), stype=stype, data=raw)

    other = client_replies[1].content.array_records[MODULES]
    other_mid = sorted(other)[0]
    replies = [
        reply(1, content({mid: array(bytes(data))})),  # tampered weights: the hash check refuses it
        reply(2, error=Error(code=2, reason="boom")),  # the ClientApp raised
        reply(3, content({other_mid: other[other_mid]}, **{"client-id": 2})),  # client 2 sends client 1's module
        reply(4, content({}, **{"client-id": 1, "config-hash": "0" * 64})),  # ran another config
        reply(5, content({}, **{"client-id": 7})),  # no such client
    ]
    got, _ = collect(replies, {f"ins-{n}": n for n in range(1, 6)}, roster_for(cfg), cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert [r["node_id"] for r in got.rejected] == [1, 3]
    assert "hash" in got.rejected[0]["reason"] and "holds no such class" in got.rejected[1]["reason"]
    # Node 3 also carries client 0's release records, for modules client 2 does not hold: refused with them.
    assert [(e["node_id"], e["reason"][:12]) for e in got.errors] == [
        (2, "boom"), (3, "release reco"), (4, "client 1 ran"), (5, "client-id 7 ")]
    # A second node answering for a client that already answered is refused, not merged.
    twice, _ = collect([reply(6, good), reply(7, good)], {"ins-6": 6, "ins-7": 7}, roster_for(cfg), cfg, tmp_path)
    assert sorted(twice.accepted) == [0] and "already answered from node 6" in twice.errors[0]["reason"]
    # A payload that is not a module file never reaches the parser.
    wrong, _ = collect([reply(8, content({mid: array(b"\x80\x04junk", "numpy.ndarray")}))], {"ins-8": 8},
                       roster_for(cfg), cfg, tmp_path)
    assert "not 'fedfactory.safetensors'" in wrong.rejected[0]["reason"]
    # Nor does one over the module size limit (lowered here to stay small), whatever it holds.
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", len(data) - 1)
    huge, _ = collect([reply(9, content({mid: array(bytes(data))}))], {"ins-9": 9}, roster_for(cfg), cfg, tmp_path)
    assert f"payload of {len(data)} bytes is over the limit of {len(data) - 1}" in huge.rejected[0]["reason"]
    monkeypatch.undo()
    # A module whose num_samples is not its cell's count in the partition is refused (a simulation knows the cells).
    histogram = histogram_for(cfg)
    histogram[0] += 1
    (tmp_path / "off").mkdir()
    off, _ = collect([reply(10, good)], {"ins-10": 10}, roster_for(cfg, histogram), cfg, tmp_path / "off")
    assert len(off.rejected) == len(good.array_records[MODULES]) and list((tmp_path / "off").iterdir()) == []
    assert re.search(r"trained on (\d+) images, the partition holds (?!\1)\d+", off.rejected[0]["reason"])
    with pytest.raises(ConfigError, match="flower.pins binds deployment sites"):
        serve(None, cfg, FlowerConfig(pins="federation.toml"))


def test_exchange_gives_up_on_silent_nodes_after_the_timeout(reference):
    cfg, _ = reference

    class SilentGrid:
        def push_messages(self, messages):
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):
            return [reply(9, error=Error(code=5, reason="node unavailable"))] if "ins-9" in ids else []

    t0 = time.monotonic()
    replies, node_of, silent = exchange(SilentGrid(), [instruction(8, cfg), instruction(9, cfg)], 1.0, poll_s=0.1)
    assert time.monotonic() - t0 < 5
    assert node_of == {"ins-8": 8, "ins-9": 9} and silent == [8] and replies[0].error.reason == "node unavailable"


def federation_or_skip():
    if not Path(loopback.venv_bin("flower-superlink")).is_file():
        pytest.skip("flower-superlink is not installed next to this Python")


def check_same_as_reference(reference, out: Path, fed) -> dict:
    _, ref = reference
    assert (out / "metrics.json").is_file(), fed.logs()
    assert module_hashes(out) == module_hashes(ref)
    assert shared_metrics(out) == shared_metrics(ref)
    for name in ("partition.json", "classifier.safetensors"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert {p.name for p in out.iterdir()} == {p.name for p in ref.iterdir()}
    return json.loads((out / "metrics.json").read_text())


def test_simulation_engine_gives_the_runners_modules_and_metrics(reference, tmp_path):
    federation_or_skip()
    pytest.importorskip("ray", reason="the Simulation Engine needs flwr[simulation]")
    out = tmp_path / "sim"
    with loopback.start(tmp_path / "flwr-home", num_nodes=3, simulation=True) as fed:
        done = fed.run(ROOT, run_config_file(tmp_path / "rc.toml", out), timeout_s=300)
        assert done.returncode == 0, fed.logs()
        metrics = check_same_as_reference(reference, out, fed)
    assert metrics["failed_clients"] == [] and metrics["missing_modules"] == []
    assert len(metrics["flower"]["bytes_on_wire"]) == 3
    assert metrics["trust"]["pinned"] is False and "checked against the partition" in metrics["trust"]["note"]
    shares = metrics["site_shares"]
    assert sorted(shares) == ["0", "1", "2"]
    assert all(0 < r["image_share"] <= 1 for site in shares.values() for r in site.values())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A real SuperLink and 3 SuperNodes on loopback, shared by the deployment tests."""
    federation_or_skip()
    with loopback.start(tmp_path_factory.mktemp("flwr-home"), num_nodes=3, simulation=False) as fed:
        yield fed


def test_deployment_engine_gives_the_runners_modules_and_metrics(reference, deployment, tmp_path):
    out = tmp_path / "deploy"
    done = deployment.run(ROOT, run_config_file(tmp_path / "rc.toml", out), timeout_s=300)
    assert done.returncode == 0, deployment.logs()
    metrics = check_same_as_reference(reference, out, deployment)
    assert metrics["failed_clients"] == [] and len(set(metrics["flower"]["node_of_client"].values())) == 3
    for k, n in metrics["flower"]["module_bytes_received"].items():
        assert n == metrics["bytes"]["per_client"][k]
    assert "bytes on the wire" in (out / "log.txt").read_text()


def test_a_raising_client_and_a_gone_node_do_not_sink_the_run(reference, tmp_path):
    # The same apps, except that partition 1's ClientApp raises; and SuperNode 2 is down (never started). A
    # federation of its own, so the shared one keeps all its nodes whatever order the tests run in.
    federation_or_skip()
    app = tmp_path / "app"
    app.mkdir()
    (app / "failing_client.py").write_text(
        "from flwr.clientapp import ClientApp\n"
        "from fedfactory.flower.client_app import app as real\n"
        "app = ClientApp()\n\n\n"
        "@app.train()\n"
        "def train(msg, context):\n"
        "    if context.node_config['partition-id'] == 1:\n"
        "        raise RuntimeError('injected failure')\n"
        "    return real(msg, context)\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = pyproject.replace('"fedfactory.flower.client_app:app"', '"failing_client:app"')
    pyproject = pyproject.replace('fab-include = ["src/**/*.py", "configs/*.toml"]', 'fab-include = ["*.py"]')
    (app / "pyproject.toml").write_text(pyproject)
    out = tmp_path / "partial"
    with loopback.start(tmp_path / "flwr-home", num_nodes=3, simulation=False, partitions=(0, 1)) as fed:
        fed.wait_for_nodes(count=2)
        done = fed.run(app, run_config_file(tmp_path / "rc.toml", out, "\n[flower]\nwait_nodes = 5.0\n"),
                       timeout_s=300)
        assert done.returncode == 0, fed.logs()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["failed_clients"] == [1, 2]
    assert metrics["missing_modules"] == [f"client-{k:03d}_class-{c:03d}" for k, cs in ((1, (1, 3, 4, 7)),
                                                                                       (2, (0, 2, 5, 8))) for c in cs]
    assert metrics["missing_classes"] == ["1", "2", "4", "5", "7", "8"]  # 0 and 3 survive through client 0
    assert "injected failure" in metrics["flower"]["errors"][0]["reason"]
    assert module_hashes(out) == {k: v for k, v in module_hashes(reference[1]).items() if k.startswith("client-000")}
    log = (out / "log.txt").read_text()
    assert "only 2 of 3 SuperNodes" in log and "client 1 delivered no modules" in log
