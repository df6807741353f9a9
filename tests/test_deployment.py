"""A real deployment: every SuperNode reads only its own site folder, the server holds no data.

Run alone with `pytest -m flower`. Everything stays on 127.0.0.1 with FLWR_HOME in a temp dir; every process
started here is stopped with its descendants.
"""

import datetime
import ipaddress
import json
import logging
import re
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Metadata, RecordDict  # noqa: E402
from flwr.app.message import make_message  # noqa: E402
from flwr.common.config import flatten_dict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedfactory.audit import AuditError, audit_run  # noqa: E402
from fedfactory.classifier import classifier_from_state, predict_log_proba, predict_proba  # noqa: E402
from fedfactory.cli import main  # noqa: E402
from fedfactory.config import ConfigError, class_list, config_hash, load_config, to_toml  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.data.folders import read_class_folders, write_class_folders  # noqa: E402
from fedfactory.data.images import DatasetError  # noqa: E402
from fedfactory.federation.factory import combine_experts, expert_recipe, product_of_experts  # noqa: E402
from fedfactory.federation.intake import ReplyError, counts_limit, load_pins  # noqa: E402
from fedfactory.federation.records import Roster  # noqa: E402
from fedfactory.flower import client_app as client_app_module  # noqa: E402
from fedfactory.flower import loopback  # noqa: E402
from fedfactory.flower.client_app import app as client_app  # noqa: E402
from fedfactory.flower.client_app import node_partition, node_site, node_threads, site_data  # noqa: E402
from fedfactory.flower.run_config import parse_run_config  # noqa: E402
from fedfactory.flower.server_app import collect, serve  # noqa: E402
from fedfactory.flower.site_rounds import expert_modules, site_counts  # noqa: E402
from fedfactory.flower.wire import CLIENT, COUNTS, MODULES, counts_content, task_content  # noqa: E402
from fedfactory.metrics import MAX_TEST_IMAGES, evaluate, score_counts  # noqa: E402
from fedfactory.registry import Module  # noqa: E402

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parents[1]
SITES = {"site-a": (0, 1, 2, 3), "site-b": (4, 5, 6), "site-c": (7, 8, 9)}  # disjoint class sets
CLASSES = ",".join(map(str, range(10)))


def deployment_config(out: Path, num_sites: int):
    """The server's config: image folders, the class list, and no data path anywhere."""
    return load_config("tiny", ["run.threads=1", "data.dataset=imagefolder", f"data.classes={CLASSES}",
                                f"data.num_clients={num_sites}", "reference.centralized=false", f"run.out={out}"])


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three site folders of digits with disjoint classes, and a fourth whose training folder holds a corrupt image."""
    root = tmp_path_factory.mktemp("sites")
    train, test = load_data(load_config("tiny").data)
    for site, classes in SITES.items():
        write_class_folders(train.subset(np.flatnonzero(np.isin(train.labels, classes))), root / site / "train")
        write_class_folders(test.subset(np.flatnonzero(np.isin(test.labels, classes))), root / site / "test")
    write_class_folders(train.subset(np.flatnonzero(train.labels == 1)[:20]), root / "site-d" / "train")
    (root / "site-d" / "train" / "1" / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root


def make_security(folder: Path, num_nodes: int, num_registered: int) -> loopback.Security:
    """A test CA, a SuperLink certificate for 127.0.0.1 signed by it, and an EC key pair per SuperNode; the first
    num_registered public keys are registered with the SuperLink."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    pem, plain = serialization.Encoding.PEM, serialization.NoEncryption()

    def certificate(subject: str, key, ca_key, is_ca: bool) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfactory test CA")])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if not is_ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(pem)

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (folder / "ca.crt").write_bytes(certificate("fedfactory test CA", ca_key, ca_key, True))
    (folder / "server.pem").write_bytes(certificate("127.0.0.1", server_key, ca_key, False))
    (folder / "server.key").write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    for k in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())  # Flower takes EC keys on NIST curves, in OpenSSH format
        (folder / f"node-{k}").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain))
        (folder / f"node-{k}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                           serialization.PublicFormat.OpenSSH))
    return loopback.Security(folder / "ca.crt", folder / "server.pem", folder / "server.key",
                             tuple(folder / f"node-{k}" for k in range(num_nodes)),
                             tuple(folder / f"node-{k}.pub" for k in range(num_registered)))


def site_context(root: Path, site: str, run_config: dict, node_id: int = 1) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"site": site, "data-root": str(root / site)},
                   state=RecordDict(), run_config=run_config)


def train_message(cfg, node_id: int = 1):
    md = Metadata(run_id=1, message_id=f"ins-{node_id}", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=600.0, message_type="train")
    return make_message(metadata=md, content=task_content(config_hash(cfg), []))


def as_reply(content: RecordDict, node_id: int):
    md = Metadata(run_id=1, message_id=f"rep-{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id=f"ins-{node_id}", group_id="", created_at=time.time(), ttl=600.0,
                  message_type="train")
    return make_message(metadata=md, content=content)


def site_roster(cfg, pins=None) -> Roster:
    """What a deployment's server knows before the round: the class list and the pins, no counts."""
    return Roster(config_hash(cfg), class_list(cfg.data.classes), cfg.generator.min_samples, pins=pins)


def flat(cfg, flower: str = "") -> dict:
    """What a ClientApp's context.run_config holds for the deployment's run config file (plus `flower` lines)."""
    return flatten_dict(tomllib.loads(to_toml(cfg) + "[flower]\ndeployment = true\n" + flower))


def test_the_server_checks_what_a_site_claims(sites, tmp_path):
    cfg = deployment_config(tmp_path / "out", 3)
    run_config = flat(cfg)
    good = client_app(train_message(cfg), site_context(sites, "site-b", run_config)).content
    info, modules = dict(good.config_records[CLIENT]), good.array_records[MODULES]
    assert info["classes"] == ["4", "5", "6"] and sorted(modules) == [f"site-b_class-00{c}" for c in (4, 5, 6)]

    def lying(node: int, modules=modules, **fields):
        return as_reply(RecordDict({MODULES: ArrayRecord(dict(modules)), CLIENT: ConfigRecord(info | fields)}), node)

    one = {"site-b_class-004": modules["site-b_class-004"]}
    replies = [
        lying(1, classes=["4", "5", "mole"]),  # a class outside data.classes
        lying(2, counts=[145, 0, 145]),  # a non-positive count
        lying(9, counts=[145, 146, 1 << 40]),  # a count that would swamp the mixture weights
        lying(10, site="site-f", error="x" * 10**5),  # an error text too long to keep whole
        lying(3, classes=["4", "4", "6"]),  # a class twice
        lying(4, site="Site B"),  # not a site name
        lying(5, one, classes=["4"], counts=[100]),  # the module was trained on more images than reported
        lying(6, one, site="site-e", classes=["5"], counts=[146]),  # a module of a class it did not report
    ]
    got, _ = collect(replies, {f"ins-{n}": n for n in (*range(1, 7), 9, 10)}, site_roster(cfg), cfg, tmp_path)
    reasons = {e["node_id"]: e["reason"] for e in got.errors}
    assert "outside data.classes" in reasons[1] and "positive integer" in reasons[2]
    assert "site site-b reports 1099511627776 images of class 6, more than the limit" in reasons[9]
    assert got.site_errors["site-f"] == "x" * 2000 and len(reasons[10]) < 2100
    assert "a class twice" in reasons[3] and "not a site name" in reasons[4]
    assert [r["node_id"] for r in got.rejected] == [5, 6]
    assert "site reported 100" in got.rejected[0]["reason"] and "reported no such class" in got.rejected[1]["reason"]
    assert list(tmp_path.iterdir()) == []
    # A second node claiming a site that already answered is refused, not merged.
    got, _ = collect([as_reply(good, 7), as_reply(good, 8)], {"ins-7": 7, "ins-8": 8}, site_roster(cfg), cfg,
                     tmp_path)
    assert "already answered from node 7" in got.errors[0]["reason"]
    # Only the honest reply's modules were written, under the site's name.
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"site-b_class-00{c}.safetensors"
                                                                      for c in (4, 5, 6)]
    assert {k: s.counts for k, s in got.senders.items()} == {"site-b": {"4": 145, "5": 146, "6": 145}}
    assert got.senders["site-b"].test_images == 108  # declared in the train reply, before any scoring
    # With a pin file, only the pinned node speaks for site-b: the same reply from node 7 is refused and writes
    # nothing; a pinned reply that resends a module with other bytes sets the kept one aside.
    pins = tmp_path / "pins" / "federation.toml"
    pins.parent.mkdir()
    pins.write_text('[[site]]\nname = "site-b"\nnode_id = 8\nmax_test_images = 200\n')
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    got, _ = collect([as_reply(good, 7)], {"ins-7": 7}, site_roster(cfg, load_pins(pins)), cfg, fresh)
    assert "site site-b is pinned to node 8" in got.errors[0]["reason"] and list(fresh.iterdir()) == []
    (tmp_path / "site-b_class-004.safetensors").write_bytes(modules["site-b_class-005"].data)  # other bytes
    got, moved = collect([as_reply(good, 8)], {"ins-8": 8}, site_roster(cfg, load_pins(pins)), cfg, tmp_path)
    assert got.errors == () and moved == [f"stale/site-b_class-004.{stale_digest(tmp_path)}.safetensors"]


def stale_digest(modules_dir: Path) -> str:
    return next((modules_dir / "stale").iterdir()).name.split(".")[1]


def test_the_server_checks_the_counts_a_site_scores(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 50)
    honest = score_counts(probs, rng.integers(0, 10, 50), 10)
    reply = as_reply(counts_content("site-a", "h", honest, 1.0), 1)
    assert {k: v.tolist() for k, v in site_counts(reply, "site-a", 10).items()} == \
        {k: v.tolist() for k, v in honest.items()}

    def content_with(counts: dict, site: str = "site-a", **arrays):
        content = counts_content(site, "h", counts, 1.0)
        content.array_records[COUNTS].update(arrays)
        return content

    def refused(counts: dict, match: str, site: str = "site-a", **arrays):
        content = content_with(counts, site, **arrays)
        with pytest.raises(ReplyError, match=match):
            site_counts(as_reply(content, 1), "site-a", 10)

    huge = honest | {"confusion": honest["confusion"] + MAX_TEST_IMAGES}
    refused(huge, r"site site-a: counts 'confusion' must lie in \[0, ")
    refused(honest | {"negative": -honest["negative"]}, "must lie in")
    shifted = honest | {"positive": np.roll(honest["positive"], 1, axis=0)}
    refused(shifted, "histograms do not add up to the confusion matrix")
    refused(honest | {"confusion": honest["confusion"][:9]}, r"shape \(10, 10\)")
    refused(honest | {"confusion": honest["confusion"].astype(np.float64)}, "int64")
    refused(honest, "not from site site-a", site="site-b")
    # A payload whose declared shape lies, or that is not an .npy at all, is refused, not decoded blindly.
    refused(honest, "do not decode",
            confusion=Array(dtype="int64", shape=(10, 10), stype="numpy.ndarray", data=b"not npy"))
    refused({k: v for k, v in honest.items() if k != "negative"}, "counts must be exactly")
    # More test images than the site declared before scoring, and a payload too large to be counts, never decoded.
    with pytest.raises(ReplyError, match="scored 50 test images but declared 49 before scoring"):
        site_counts(reply, "site-a", 10, declared=49)
    big = Array(dtype="int64", shape=(10, 10), stype="numpy.ndarray", data=b"\0" * (counts_limit(10) + 1))
    with pytest.raises(ReplyError, match=r"counts 'confusion': payload of \d+ bytes is over the limit"):
        site_counts(as_reply(content_with(honest, confusion=big), 1), "site-a", 10)


def test_local_mode_sends_a_site_its_own_modules_only_where_it_uses_them(tmp_path):
    def module(site, c, n):
        return Module({"module_id": f"{site}_class-{c:03d}", "client_id": site, "class_id": c, "num_samples": n}, {})

    modules = [module("site-a", 0, 30), module("site-a", 1, 50), module("site-b", 1, 10), module("site-b", 2, 90)]
    cfg = load_config("tiny", ["synthesis.samples_per_class=40"])
    # "missing": the others' modules, and its own of a class it holds fewer than samples_per_class images of.
    assert expert_modules("site-a", modules, cfg) == ["site-a_class-000", "site-b_class-001", "site-b_class-002"]
    assert expert_modules("site-b", modules, cfg) == ["site-a_class-000", "site-a_class-001", "site-b_class-001"]
    # "all": every module, its own included.
    cfg = load_config("tiny", ["synthesis.samples_per_class=40", "synthesis.local_synthetic=all"])
    assert expert_modules("site-a", modules, cfg) == [m.manifest["module_id"] for m in modules]


def test_clientapps_default_to_one_thread_so_sites_sharing_a_machine_do_not_oversubscribe_it():
    assert node_threads({}, 0) == 1  # run.threads=0 ("every core") would give each of N SuperNodes every core
    assert node_threads({}, 3) == 3 and node_threads({"threads": 8}, 0) == 8 and node_threads({"threads": 2}, 3) == 2
    for bad in (0, -1, "4", 1.5):
        with pytest.raises(ConfigError, match=r"node config threads=.*must be an integer >= 1"):
            node_threads({"threads": bad}, 0)


def test_a_deployment_run_config_without_its_switch_is_refused_in_one_line(tmp_path):
    cfg = load_config("tiny", [f"run.out={tmp_path / 'run'}", "data.dataset=imagefolder", f"data.classes={CLASSES}",
                               "data.num_clients=2", "reference.centralized=false"])
    with pytest.raises(ConfigError, match=r"add flower.deployment = true"):
        serve(None, cfg, parse_run_config({})[1])
    assert not (tmp_path / "run").exists()


def test_a_site_is_told_how_to_fix_its_node_config(sites, tmp_path):
    with pytest.raises(ConfigError, match="partition-id, not a site"):
        node_site({"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ConfigError, match="site 'hospital-a' but the run is a simulation.*flower.deployment=true"):
        node_partition({"site": "hospital-a", "data-root": str(sites)}, 3)
    with pytest.raises(ConfigError, match="site='Hospital A'.*lowercase"):
        node_site({"site": "Hospital A", "data-root": str(sites)})
    with pytest.raises(ConfigError, match="data-root=.*is not a folder"):
        node_site({"site": "hospital-a", "data-root": str(tmp_path / "absent")})
    # A site may hold a dataset in another format; its classes are mapped onto the run's list by name.
    cfg = load_config("tiny", ["data.dataset=imagefolder", "data.classes=9,8,7,6,5,4,3,2,1,0"])
    site, root, dataset = node_site({"site": "hospital-a", "data-root": str(tmp_path), "dataset": "digits"})
    train = site_data(cfg, root, dataset, "train")
    reference, _ = load_data(load_config("tiny").data)
    assert (train.labels == 9 - reference.labels).all() and train.class_names[0] == "9"
    with pytest.raises(DatasetError, match=r"classes \['0', '1'.*not in data.classes"):
        site_data(load_config("tiny", ["data.dataset=imagefolder", "data.classes=5,6,7,8,9"]), root, dataset, "test")
    assert site_data(cfg, sites / "site-d", "imagefolder", "test") is None  # no test folder: nothing to score
    # A site whose own data is at fault answers under its name, so the server can say which site to fix.
    cfg = deployment_config(tmp_path / "out", 3)
    reply = client_app(train_message(cfg), site_context(sites, "site-d", flat(cfg))).content
    assert reply.config_records[CLIENT]["site"] == "site-d"
    assert "000003.png: cannot decode image" in reply.config_records[CLIENT]["error"]
    # The server of a deployment holds no data: a centralized reference is refused before anything starts.
    central = load_config("tiny", ["data.dataset=imagefolder", f"data.classes={CLASSES}"])
    with pytest.raises(ConfigError, match="reference.centralized=true pools"):
        serve(None, central, parse_run_config({"flower.deployment": True})[1])
    assert not (tmp_path / "out").exists()


def test_a_deployment_over_tls_trains_from_site_folders_and_evaluates_by_counts(sites, tmp_path):
    # Four sites (three healthy with disjoint classes, one with a corrupt image) and an intruder whose key was never
    # registered; TLS on every connection, SuperNode authentication on.
    if not Path(loopback.venv_bin("flower-superlink")).is_file():
        pytest.skip("flower-superlink is not installed next to this Python")
    out = tmp_path / "run"
    cfg = deployment_config(out, 4)
    assert (cfg.data.root, cfg.data.test_root) == ("", "")
    rc = tmp_path / "rc.toml"
    rc.write_text(to_toml(cfg) + "\n[flower]\ndeployment = true\nwait_nodes = 120.0\n")
    node_configs = [loopback.site_node_config(s, sites / s) for s in (*SITES, "site-d", "site-a")]
    security = make_security(tmp_path / "keys", num_nodes=5, num_registered=4)
    with loopback.start(tmp_path / "flwr-home", 4, simulation=False, node_configs=node_configs,
                        security=security) as fed:
        done = fed.run(ROOT, rc, timeout_s=300)
        assert done.returncode == 0, fed.logs()
        intruder = (tmp_path / "flwr-home" / "supernode-4.log").read_text()
        assert "Failed to activate SuperNode" in intruder, fed.logs()
        assert "No SuperNode found with the given public key" in (tmp_path / "flwr-home" / "superlink.log").read_text()
        assert "https://127.0.0.1" in (tmp_path / "flwr-home" / "superlink.log").read_text()
        # The same run config without its switch: the refusal, in one line naming the switch, is in what `flwr run`
        # prints (Flower 1.42's `flwr run --stream` exits 0 whatever the ServerApp did).
        bad = tmp_path / "no-switch.toml"
        bad.write_text(to_toml(deployment_config(tmp_path / "never", 4)))
        done = fed.run(ROOT, bad, timeout_s=120)
        assert "add flower.deployment = true to its [flower] section" in done.stdout, done.stdout
        assert not (tmp_path / "never").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sites"] == sorted(SITES)
    assert list(metrics["failed_sites"]) == ["site-d"] and "cannot decode image" in metrics["failed_sites"]["site-d"]
    assert sorted(metrics["modules"]) == sorted(f"{s}_class-{c:03d}" for s, cs in SITES.items() for c in cs)
    partition = json.loads((out / "partition.json").read_text())
    assert partition["sites"] == sorted(SITES) and "indices" not in partition
    # The metrics from the sites' counts are those of one evaluation on the union of their test folders.
    classes = class_list(CLASSES)
    tests = [read_class_folders(sites / s / "test", classes, cfg.data.image_size) for s in SITES]
    model = classifier_from_state(load_file(out / "classifier.safetensors"), 1, 10, cfg.classifier,
                                  metrics["classifier_input_blur"])
    images, labels = np.concatenate([t.images for t in tests]), np.concatenate([t.labels for t in tests])
    pooled = evaluate(predict_proba(model, images, torch.device("cpu")), labels, classes)
    assert {k: metrics[k] for k in pooled} == pooled
    assert metrics["evaluation"]["sites"] == {s: len(t) for s, t in zip(SITES, tests, strict=True)}
    for s in SITES:
        assert metrics["flower"]["module_bytes_received"][s] == metrics["bytes"]["per_client"][s]
        assert metrics["evaluation"]["bytes_down"][s] > 0 and metrics["evaluation"]["bytes_up"][s] > 0
    log = (out / "log.txt").read_text()
    assert "site site-d delivered no modules" in log and "scored" in log

    # Unlearning a site works on the server's run directory; verification needs the sites' data and says so.
    assert main(["unlearn", str(out), "--client", "site-b", "--verify"]) == 0
    cert = json.loads((tmp_path / "run-unlearn-client-site-b" / "unlearning.json").read_text())
    assert [m["module_id"] for m in cert["removed_modules"]] == [f"site-b_class-00{c}" for c in (4, 5, 6)]
    assert cert["verified"] is None and "stay at the sites" in cert["verification"]["skipped"]
    assert cert["class_groups"]["only_removed"] == ["4", "5", "6"]
    unlearned = json.loads((tmp_path / "run-unlearn-client-site-b" / "partition.json").read_text())
    assert unlearned["histogram"][1] == [0] * 10 and unlearned["histogram"][0] == partition["histogram"][0]
    assert main(["unlearn", str(out), "--client", "site-x"]) == 2


class InProcessGrid:
    """A Grid whose SuperNodes are the ClientApp called in this process, one node per site folder."""

    def __init__(self, root: Path, sites: list[str], run_config: dict):
        self.contexts = {100 + i: site_context(root, s, run_config, 100 + i) for i, s in enumerate(sites)}
        self.replies = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            md = Metadata(run_id=1, message_id=f"m{len(self.replies)}", src_node_id=0,
                          dst_node_id=m.metadata.dst_node_id, reply_to_message_id="", group_id="",
                          created_at=time.time(), ttl=m.metadata.ttl, message_type=m.metadata.message_type)
            sent = make_message(metadata=md, content=m.content)
            try:
                self.replies[md.message_id] = client_app(sent, self.contexts[md.dst_node_id])
            except Exception as e:  # what a SuperNode does with a ClientApp that raises: an error reply
                reply_md = Metadata(run_id=1, message_id=f"r{md.message_id}", src_node_id=md.dst_node_id,
                                    dst_node_id=0, reply_to_message_id=md.message_id, group_id="",
                                    created_at=time.time(), ttl=md.ttl, message_type=md.message_type)
                self.replies[md.message_id] = make_message(metadata=reply_md, error=Error(code=0, reason=repr(e)))
            ids.append(md.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def serve_in_process(sites: Path, out: Path, monkeypatch, *overrides: str,
                     names: tuple[str, ...] = tuple(SITES), flower: str = "") -> dict:
    """serve over an InProcessGrid of the healthy sites (all three by default)."""
    cfg = load_config("tiny", ["run.threads=1", "data.dataset=imagefolder", f"data.classes={CLASSES}",
                               f"data.num_clients={len(names)}", "reference.centralized=false", f"run.out={out}",
                               *overrides])
    run_config = flat(cfg, flower)
    _, fl = parse_run_config(run_config)
    # What a ServerApp process has set before `main` runs: Message() reads the run and node ids from here.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    return serve(InProcessGrid(sites, list(names), run_config), cfg, fl)


def test_local_mode_trains_experts_at_the_sites_and_combines_them(sites, tmp_path, monkeypatch, caplog,
                                                                  capsys):
    # Both rounds of local mode with the real ClientApp behind an in-process grid: each site gets the others'
    # modules and, with synthesis.local_synthetic=all, its own back (a ClientApp keeps none), trains its expert on
    # 40 synthetic images of every class, and the experts, combined by the holders rule (each class scored by the
    # sites holding its real images, as the sites reported them), are scored at the sites by counts. Each site's
    # expert trains classifier.local_epochs passes (2) at classifier.local_width channels (12), not the preset's
    # classifier.epochs (1) and width (8); the server checks and the sites load the experts at that width.
    out = tmp_path / "local"
    recipes, train = [], client_app_module.train_classifier

    def recording(images, labels, num_classes, cfg, *args, **kwargs):
        recipes.append((cfg.epochs, cfg.width))
        return train(images, labels, num_classes, cfg, *args, **kwargs)

    monkeypatch.setattr(client_app_module, "train_classifier", recording)
    with caplog.at_level(logging.INFO, logger="flwr"):
        metrics = serve_in_process(sites, out, monkeypatch, "classifier.mode=local", "synthesis.local_synthetic=all",
                                   "classifier.combine=holders", "classifier.local_epochs=2",
                                   "classifier.local_width=12")
    assert recipes == [(2, 12)] * len(SITES)
    for s in SITES:
        assert re.search(rf"site {s}: expert trained on \d+ real \+ 400 synthetic images from 10 modules",
                         caplog.text), caplog.text
    cfg = load_config(str(out / "config.toml"))
    assert metrics["mode"] == "local" and metrics["experts"] == sorted(SITES)
    classes = class_list(CLASSES)
    tests = [read_class_folders(sites / s / "test", classes, cfg.data.image_size) for s in SITES]
    images, labels = np.concatenate([t.images for t in tests]), np.concatenate([t.labels for t in tests])
    log_probs = [predict_log_proba(classifier_from_state(load_file(out / "experts" / f"{s}.safetensors"), 1, 10,
                                                         expert_recipe(cfg.classifier),
                                                         metrics["classifier_input_blur"]),
                                   images, torch.device("cpu")) for s in SITES]
    held = np.array([[metrics["flower"]["site_counts"][s].get(c, 0) for c in classes] for s in SITES])
    assert (held > 0).sum() < held.size  # sites hold different classes, so the rule differs from the product
    pooled = evaluate(combine_experts(log_probs, held, "holders"), labels, classes)
    assert {k: metrics[k] for k in pooled} == pooled
    assert pooled != evaluate(product_of_experts(log_probs), labels, classes)
    # Each site downloads every module (the others' and, for "all", its own) and uploads one expert; all counted.
    sizes = metrics["bytes"]["per_module"]
    for s in SITES:
        assert metrics["bytes"]["down_per_client"][s] == sum(sizes.values())
        assert metrics["expert_round"]["bytes_down"][s] > sum(sizes.values())
        assert metrics["experts"] and metrics["flower"]["bytes_on_wire"][s] > 0
    assert json.loads((out / "metrics.json").read_text())["experts"] == sorted(SITES)
    # Unlearning would retrain every remaining expert on the sites' data, which the server does not hold: refused.
    assert main(["unlearn", str(out), "--client", "site-b"]) == 2
    assert "deployment in local mode" in capsys.readouterr().err
    assert not (tmp_path / "local-unlearn-client-site-b").exists()


def test_a_rerun_reuses_modules_and_retrains_what_a_sites_data_no_longer_backs(sites, tmp_path, monkeypatch):
    mine = tmp_path / "sites"
    for s in SITES:
        shutil.copytree(sites / s, mine / s)
    out = tmp_path / "run"
    first = serve_in_process(mine, out, monkeypatch)
    classifier = (out / "classifier.safetensors").read_bytes()
    # The same sites again: every module is reused (nothing travels), and the results are the same.
    again = serve_in_process(mine, out, monkeypatch)
    assert set(again["flower"]["module_bytes_received"].values()) == {0}
    assert (out / "classifier.safetensors").read_bytes() == classifier and again["accuracy"] == first["accuracy"]
    # site-b lost its class 6 and one image of class 5: that module is retrained, the class-6 one removed.
    shutil.rmtree(mine / "site-b" / "train" / "6")
    next((mine / "site-b" / "train" / "5").iterdir()).unlink()
    changed = serve_in_process(mine, out, monkeypatch)
    assert changed["flower"]["stale_modules_removed"] == ["site-b_class-006"]
    # Set aside, not deleted: the stale class-6 module, and the class-5 module its retrained one replaced.
    assert sorted(p.name.split(".")[0] for p in (out / "modules" / "stale").iterdir()) == [
        "site-b_class-005", "site-b_class-006"]
    assert len(changed["flower"]["stale_modules_set_aside"]) == 2
    received = changed["flower"]["module_bytes_received"]
    assert received["site-a"] == received["site-c"] == 0 and received["site-b"] > 0
    assert "site-b_class-006" not in changed["modules"] and changed["missing_classes"] == ["6"]
    assert json.loads((out / "partition.json").read_text())["histogram"][1][4:7] == [145, 145, 0]


def test_a_site_that_cannot_score_is_named_and_the_others_count(sites, tmp_path, monkeypatch):
    mine = tmp_path / "sites"
    for s in SITES:
        shutil.copytree(sites / s, mine / s)
    (mine / "site-c" / "test" / "8" / "000000.png").write_bytes(b"not an image")
    # The server also owns a public test set (a copy of site-a's test folder), which it scores itself.
    metrics = serve_in_process(mine, tmp_path / "run", monkeypatch, f"data.test_root={sites / 'site-a' / 'test'}")
    assert list(metrics["evaluation"]["failed_sites"]) == ["site-c"]
    assert "000000.png: cannot decode image" in metrics["evaluation"]["failed_sites"]["site-c"]
    assert metrics["evaluation"]["sites"] == {"site-a": 144, "site-b": 108} and metrics["num_test"] == 252
    assert metrics["public_test"]["num_test"] == 144
    assert metrics["public_test"]["per_class_accuracy"]["9"] is None  # site-a's test folder holds classes 0-3


def test_unlearning_a_site_equals_a_federation_that_never_had_it(sites, tmp_path, monkeypatch):
    # The deployment's stand-in for `unlearn --verify`, which needs the sites' data: a federation of the other two
    # sites from the start trains the same classifier, bit for bit, as unlearning site-b from the three.
    serve_in_process(sites, tmp_path / "three", monkeypatch)
    assert main(["unlearn", str(tmp_path / "three"), "--client", "site-b", "--out", str(tmp_path / "unlearned")]) == 0
    serve_in_process(sites, tmp_path / "two", monkeypatch, names=("site-a", "site-c"))
    assert (tmp_path / "unlearned" / "classifier.safetensors").read_bytes() == \
        (tmp_path / "two" / "classifier.safetensors").read_bytes()


def test_a_site_audits_its_own_modules_against_its_own_folder(sites, tmp_path, monkeypatch):
    serve_in_process(sites, tmp_path / "run", monkeypatch)
    run_dir = tmp_path / "run"
    # The server holds no images, so a deployment's run is audited at each site, against that site's folder.
    with pytest.raises(AuditError, match="--site"):
        audit_run(run_dir, num_synthetic=100, max_candidates=20, resamples=10)
    doc = audit_run(run_dir, num_synthetic=100, max_candidates=20, resamples=10, site="site-b",
                    data_root=sites / "site-b")
    assert sorted(r["module_id"] for r in doc["modules"]) == [f"site-b_class-00{c}" for c in SITES["site-b"]]
    assert "site-b" in doc["non_members"] and (run_dir / "audit-site-b.json").exists()
    assert not (run_dir / "audit.json").exists()
    with pytest.raises(AuditError, match="no module of site"):
        audit_run(run_dir, site="site-x", data_root=sites / "site-b")
    shutil.copytree(sites / "site-b" / "train", tmp_path / "no-test" / "train")
    with pytest.raises(AuditError, match="test/ folder"):
        audit_run(run_dir, site="site-b", data_root=tmp_path / "no-test")


def test_a_pin_file_binds_site_names_to_nodes_and_the_run_records_it(sites, tmp_path, monkeypatch):
    # InProcessGrid's nodes are 100, 101, 102 for site-a, site-b, site-c; the pin file puts site-c on node 999, so
    # the node that says it is site-c is an impostor: refused, and nothing of it is used.
    pins = tmp_path / "federation.toml"
    pins.write_text('[[site]]\nname = "site-a"\nnode_id = 100\nmax_test_images = 144\n'
                    '[[site]]\nname = "site-b"\nnode_id = 101\n[[site]]\nname = "site-c"\nnode_id = 999\n')
    metrics = serve_in_process(sites, tmp_path / "run", monkeypatch, flower=f"pins = {json.dumps(str(pins))}\n")
    assert metrics["sites"] == ["site-a", "site-b"]
    assert metrics["trust"] | {"note": ""} == {"pinned": True, "pin_file": str(pins), "note": "",
                                               "sites": {"site-a": 100, "site-b": 101}}
    assert any("site site-c is pinned to node 999" in e["reason"] for e in metrics["flower"]["errors"])
    assert not any(m.startswith("site-c") for m in metrics["modules"])
    ev = metrics["evaluation"]
    assert ev["declared_test_images"] == {"site-a": 144, "site-b": 108}
    assert sorted(ev["per_site"]) == ["site-a", "site-b"]
    assert ev["per_site"]["site-a"]["num_test"] + ev["per_site"]["site-b"]["num_test"] == metrics["num_test"]
    assert metrics["site_shares"]["site-b"]["5"]["image_share"] == 1.0
    assert metrics["site_shares"]["site-b"]["5"]["synthetic"] == metrics["synthesis_plan"]["site-b_class-005"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Sites: trust and influence" in report and "site-b (node 101)" in report
    assert "deployment, 2 sites: site-a, site-b" in report  # the header names the sites, not the run config's split
    sent = metrics["bytes"]["modules_per_client"]
    assert sent == {s: sum(m.startswith(s + "_") for m in metrics["modules"]) for s in ("site-a", "site-b")}
    assert "What each site holds, sent and scored" in report
