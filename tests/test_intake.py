"""The server's acceptance rules (federation.intake) against a dishonest site; no Flower needed."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save

from fedfactory.classifier import build_classifier
from fedfactory.config import load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.client import client_plans, train_client_module
from fedfactory.federation.intake import (
    MAX_SITE_IMAGES,
    ClaimError,
    PinError,
    accept_train,
    check_counts_reply,
    check_expert,
    check_scored,
    check_site_claim,
    class_shares,
    counts_limit,
    expected_modules,
    flat_plan,
    load_pins,
    oversized,
    parse_pins,
    partition_mismatches,
    reusable_modules,
    stale_modules,
    trust_record,
)
from fedfactory.federation.records import Arrival, CountsReply, ExpertReply, Payload, Roster, Sender, TrainReply
from fedfactory.metrics import score_counts
from fedfactory.modules.files import MAX_FILE_BYTES, module_to_bytes

CLASSES = ("cat", "dog", "fox")
PIN_FILE = """
[[site]]
name = "site-a"
node_id = 11
max_images_per_class = 500
max_test_images = 100

[[site]]
name = "site-b"
node_id = 22
"""


@pytest.fixture
def pins(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(PIN_FILE)
    return load_pins(path)


def claim(site="site-a", classes=("cat", "dog"), counts=(40, 60), test=50, **extra):
    """A site's train reply as flower.wire decodes it, built by hand."""
    return TrainReply(site, "h", classes=tuple(classes), counts=tuple(counts), test_images=test, train_seconds=1.0,
                      **extra)


def accept(info, node=11, pins=None, answered=None):
    return check_site_claim(info, node, config_hash="h", classes=CLASSES, answered=answered or {}, pins=pins)


def honest_counts(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return score_counts(rng.dirichlet(np.ones(3), n), rng.integers(0, 3, n), 3)


def test_the_flower_free_rules_import_no_flower():
    code = "import sys, fedfactory.federation.intake; sys.exit(any(m.split('.')[0] == 'flwr' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_honest_claim_is_accepted_with_and_without_pins(pins):
    assert accept(claim()).counts == {0: 40, 1: 60}
    pinned = accept(claim(), pins=pins)
    assert (pinned.sender, pinned.counts, pinned.test_images) == ("site-a", {0: 40, 1: 60}, 50)


def test_inflated_counts_beyond_a_ceiling_are_refused(pins):
    with pytest.raises(ClaimError, match=r"site site-a reports 501 images of class dog, more than its pinned "
                                         r"max_images_per_class in .*federation.toml \(500\)"):
        accept(claim(counts=(40, 501)), pins=pins)
    # Without a pin the limit still holds: a count that would swamp every honest site's mixture weight.
    with pytest.raises(ClaimError, match=f"reports {MAX_SITE_IMAGES + 1} images of class cat, more than the limit"):
        accept(claim(counts=(MAX_SITE_IMAGES + 1, 1)))
    with pytest.raises(ClaimError, match=r"declares 101 test images, more than its pinned max_test_images"):
        accept(claim(test=101), pins=pins)


def test_an_impostor_claiming_a_pinned_name_from_another_node_is_refused(pins):
    with pytest.raises(ClaimError, match="site site-a is pinned to node 11 in .*, node 22 may not speak for it"):
        accept(claim(), node=22, pins=pins)
    # Nor may it send the pinned site's error under its name.
    with pytest.raises(ClaimError, match="pinned to node 11"):
        accept(TrainReply("site-a", "h", error="x"), node=33, pins=pins)


def test_an_unpinned_site_is_refused_when_a_pin_file_is_given(pins):
    with pytest.raises(ClaimError, match=r"site site-z \(node 11\) is not in the pin file .*federation.toml; add"):
        accept(claim(site="site-z"), pins=pins)


def test_a_second_node_for_an_answered_site_is_refused():
    with pytest.raises(ClaimError, match="site site-a already answered from node 11"):
        accept(claim(), node=12, answered={"site-a": 11})


def test_evaluation_counts_above_the_declared_test_images_are_refused():
    counts = honest_counts(60)
    assert check_scored(counts, 3, "site-a", declared=60) is counts
    with pytest.raises(ClaimError, match="site site-a scored 60 test images but declared 50 before scoring"):
        check_scored(counts, 3, "site-a", declared=50)


def test_a_site_reporting_a_trillion_correct_answers_is_refused(pins):
    counts = honest_counts(10)
    counts["confusion"] = counts["confusion"] + np.diag([10**12 // 3] * 3)
    counts["positive"][:, -1] += 10**12 // 3
    counts["negative"][:, 0] += 2 * (10**12 // 3)
    # The counts are self-consistent (check_counts accepts them); what bounds them is the site's declaration.
    with pytest.raises(ClaimError, match=r"scored 1000000000009 test images but declared 10 before scoring"):
        check_scored(counts, 3, "site-a", declared=10)
    # Declaring a trillion in the train reply is refused too, pinned or not.
    with pytest.raises(ClaimError, match="declares 1000000000000 test images, more than the limit"):
        accept(claim(test=10**12))
    with pytest.raises(ClaimError, match="more than its pinned max_test_images"):
        check_scored(counts, 3, "site-a", declared=10**13, pin=pins.of("site-a"))
    # Malformed counts are refused by metrics.check_counts, under the site's name.
    with pytest.raises(ClaimError, match="site site-a: the probability histograms do not add up"):
        check_scored(counts | {"positive": np.roll(counts["positive"], 1, 0)}, 3, "site-a", declared=10**13)


def test_a_module_whose_num_samples_disagrees_with_the_partition_is_refused():
    histogram = np.array([[40, 0, 5], [0, 30, 0]])
    manifests = [{"module_id": "client-000_class-000", "client_id": 0, "class_id": 0, "num_samples": 40},
                 {"module_id": "client-001_class-001", "client_id": 1, "class_id": 1, "num_samples": 3000},
                 {"module_id": "client-001_class-000", "client_id": 1, "class_id": 0, "num_samples": 7},
                 {"module_id": "client-009_class-000", "client_id": 9, "class_id": 0, "num_samples": 7}]
    assert partition_mismatches(manifests, histogram) == [
        "client-001_class-001: trained on 3000 images, the partition holds 30",
        "client-001_class-000: trained on 7 images, the partition holds 0",
        "client-009_class-000: trained on 7 images, the partition holds None"]


def test_an_impostors_stale_claim_sets_modules_aside_and_deletes_nothing(tmp_path):
    kept = [{"module_id": "site-a_class-000", "client_id": "site-a", "class_name": "cat", "num_samples": 40},
            {"module_id": "site-a_class-001", "client_id": "site-a", "class_name": "dog", "num_samples": 60},
            {"module_id": "site-b_class-002", "client_id": "site-b", "class_name": "fox", "num_samples": 9}]
    # An impostor answers as site-a with other counts: the kept modules it no longer backs are named stale...
    impostor = Sender("site-a", 11, counts={"cat": 41}, cells={"site-a_class-000": 41}, modules={}, wire_bytes=0,
                      train_seconds=0.0)
    stale = stale_modules(kept, {"site-a": impostor})
    assert [(s.module_id, s.site) for s in stale] == [("site-a_class-000", "site-a"), ("site-a_class-001", "site-a")]
    assert "site site-a now reports 0 images of class dog, the module was trained on 60" in stale[1].reason
    # ...and a pure rule names them only: it touches no file (the server moves them to modules/stale/).
    assert list(tmp_path.iterdir()) == []
    # A site that did not answer makes nothing of it stale.
    assert stale_modules(kept, {}) == []


def test_an_oversized_payload_is_refused_before_decoding():
    assert oversized(MAX_FILE_BYTES, MAX_FILE_BYTES, "module m") is None
    assert oversized(MAX_FILE_BYTES + 1, MAX_FILE_BYTES, "node 3 module 'm'") == \
        f"node 3 module 'm': payload of {MAX_FILE_BYTES + 1} bytes is over the limit of {MAX_FILE_BYTES} bytes"
    # A counts array is at most its int64 (C, bins) data plus an .npy header.
    limit = counts_limit(10)
    assert 80_000 < limit < 90_000 and oversized(limit + 1, limit, "counts") is not None


@pytest.mark.parametrize("text, match", [
    ("[[site]]\nname = 'site-a'\n", r"site 1: missing key 'node_id'; write one \[\[site\]\] table"),
    ("[[site]]\nname = 'site-a'\nnode_id = 1\nnode = 2\n", r"site 1: unknown key 'node'; valid keys: name, node_id"),
    ("[[site]]\nname = 'site-a'\nnode_id = '1'\n", r"site 1: node_id='1' must be a positive integer"),
    ("[[site]]\nname = 'site-a'\nnode_id = 1\nmax_test_images = 0\n", r"max_test_images=0 must be a positive"),
    ("[[site]]\nname = 'Site A'\nnode_id = 1\n", r"name='Site A' is not a site name"),
    ("[[site]]\nname = 'site-a'\nnode_id = 1\n[[site]]\nname = 'site-a'\nnode_id = 2\n",
     r"name 'site-a' is pinned twice"),
    ("[[site]]\nname = 'site-a'\nnode_id = 1\n[[site]]\nname = 'site-b'\nnode_id = 1\n",
     r"node_id 1 is pinned twice"),
    ("[sites]\nname = 'site-a'\n", r"expected only \[\[site\]\] tables, got \['sites'\]"),
    ("[[site]\n", r"not valid TOML"),
])
def test_a_bad_pin_file_is_refused_naming_the_file_the_key_and_the_fix(tmp_path, text, match):
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(PinError, match=match) as info:
        load_pins(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_pin_file_is_refused(tmp_path):
    with pytest.raises(PinError, match="flower.pins=.*absent.toml.*: no such file"):
        load_pins(tmp_path / "absent.toml")
    with pytest.raises(PinError, match="expected only"):
        parse_pins({}, "inline")


def test_trust_and_shares_say_what_each_site_weighs(pins):
    assert trust_record(None, ["site-a"]) == {"pinned": False, "note": trust_record(None, [])["note"]}
    assert "trusted as reported" in trust_record(None, [])["note"]
    assert trust_record(pins, ["site-a", "site-b"])["sites"] == {"site-a": 11, "site-b": 22}
    manifests = [{"module_id": "site-a_class-000", "client_id": "site-a", "class_name": "cat"},
                 {"module_id": "site-b_class-000", "client_id": "site-b", "class_name": "cat"},
                 {"module_id": "site-b_class-001", "client_id": "site-b", "class_name": "dog"}]
    plan = {"site-a_class-000": 25, "site-b_class-000": 75, "site-b_class-001": 100}
    shares = class_shares({"site-a": {"cat": 10}, "site-b": {"cat": 30, "dog": 5}}, plan, manifests, CLASSES)
    assert shares["site-a"] == {"cat": {"images": 10, "image_share": 0.25, "synthetic": 25, "synthetic_share": 0.25}}
    assert shares["site-b"]["dog"] == {"images": 5, "image_share": 1.0, "synthetic": 100, "synthetic_share": 1.0}
    # Local mode's plan (receiver -> module -> images) is summed over the receivers.
    assert flat_plan({"0": {"m": 2}, "1": {"m": 3, "n": 1}}) == {"m": 5, "n": 1}


# A train round decided from hand-built records: client 0 of a two-client partition holds 30 images of class 0 and 40
# of class 1, and 5 of class 2 (below generator.min_samples=20: no module); its two modules are briefly trained.
CFG = load_config("tiny", ["generator.steps=2", "generator.min_samples=20"])
HISTOGRAM = np.array([[30, 40, 5], [0, 0, 50]])


@pytest.fixture(scope="module")
def client_modules():
    """Module id -> file bytes of client 0's modules, as its ClientApp would send them."""
    train, _ = load_dataset("digits", image_size=8)
    rows = np.concatenate([np.flatnonzero(train.labels == c)[:n] for c, n in enumerate(HISTOGRAM[0])])
    data = train.subset(np.sort(rows))
    out = {}
    for mid, plan in client_plans(data, 0, CFG).items():
        manifest, tensors = train_client_module(data, plan, CFG.generator, torch.device("cpu"), progress=False)
        out[mid] = module_to_bytes(tensors, manifest)[0]
    return out


def partition_roster(histogram=HISTOGRAM):
    return Roster("h", ("0", "1", "2"), CFG.generator.min_samples, histogram=histogram)


def client_reply(k, modules, **fields):
    payloads = tuple(Payload(mid, data) for mid, data in modules.items())
    return TrainReply(k, "h", payloads, train_seconds=2.5, **fields)


def test_an_honest_client_is_accepted_with_every_module_its_cells_imply(client_modules):
    got = accept_train([Arrival(7, client_reply(0, client_modules), wire_bytes=999)], partition_roster(), CFG)
    assert got.errors == () and got.rejected == ()
    sender = got.senders[0]
    assert sender.cells == {"client-000_class-000": 30, "client-000_class-001": 40}  # class 2: 5 < min_samples
    assert sender.modules == client_modules and sender.module_bytes == sum(map(len, client_modules.values()))
    assert (sender.node_id, sender.wire_bytes, sender.train_seconds) == (7, 999, 2.5)
    assert sender.counts == {"0": 30, "1": 40, "2": 5}
    # Client 1 never answered: the server still expected its module, which the report names missing.
    assert expected_modules(partition_roster(), got) == {0: list(sender.cells), 1: ["client-001_class-002"]}


def test_a_dishonest_client_gets_nothing_of_what_it_claims_accepted(client_modules):
    mid = "client-000_class-000"
    tampered = bytearray(client_modules[mid])
    tampered[-1] ^= 1  # one flipped bit in the last weight
    arrivals = [
        Arrival(1, error="node unavailable"),  # the transport's own error, or no reply in time
        Arrival(2, client_reply(0, {mid: bytes(tampered)})),  # the hash check refuses it
        Arrival(3, client_reply(0, client_modules)),  # client 0 again, from another node
        Arrival(6, TrainReply(1, "other", ())),  # another config
        Arrival(4, client_reply(1, client_modules)),  # client 1 sends client 0's modules
        Arrival(5, client_reply(2, {})),  # no such client
        Arrival(8, TrainReply("site-a", "h", ())),  # a site's reply in a simulation
    ]
    got = accept_train(arrivals, partition_roster(), CFG)
    assert [(e["node_id"], e["reason"]) for e in got.errors] == [
        (1, "node unavailable"),
        (3, "client 0 already answered from node 2; two SuperNodes share a partition-id"),
        (6, "client 1 ran with a different config (hash other)"),
        (5, "client-id 2 is not a client of this run (0..1)"),
        (8, "site 'site-a' is not a client of this run (0..1)")]
    assert [(r["node_id"], r["module_id"]) for r in got.rejected] == [(2, mid), (4, mid), (4, "client-000_class-001")]
    assert "hash" in got.rejected[0]["reason"]
    assert got.rejected[1]["reason"].endswith("client 1 holds no such class in this run's partition")
    assert list(got.senders) == [0, 1] and got.accepted == {0: [], 1: []}  # answered, nothing taken


def test_a_module_is_refused_when_its_payload_or_count_disagrees(client_modules):
    mid = "client-000_class-001"
    bad = [Payload("client-000_class-000", problem="payload is stype 'numpy.ndarray', not 'fedfactory.safetensors'"),
           Payload(mid, client_modules[mid])]
    fewer = partition_roster(np.array([[30, 39, 5], [0, 0, 50]]))  # the partition holds one image less of class 1
    got = accept_train([Arrival(7, TrainReply(0, "h", tuple(bad)))], fewer, CFG)
    assert [r["reason"] for r in got.rejected] == [
        "node 7 client 0 module 'client-000_class-000': payload is stype 'numpy.ndarray', not 'fedfactory.safetensors'",
        f"node 7 client 0 module '{mid}': trained on 40 images, the partition holds 39"]
    # A module trained otherwise than the run asks is refused too (factory.trained_as_asked).
    other = load_config("tiny", ["generator.steps=3", "generator.min_samples=20"])
    got = accept_train([Arrival(7, client_reply(0, client_modules))], partition_roster(), other)
    assert len(got.rejected) == 2 and "2 steps" in got.rejected[0]["reason"]
    # A count no private module can be trained on under the run's budget: the module's plan refuses it, the round
    # goes on (a site's claimed counts cannot stop the server).
    private = load_config("tiny", ["generator.steps=2", "generator.min_samples=20", "privacy.epsilon=8",
                                   "privacy.delta=0.05"])
    got = accept_train([Arrival(7, client_reply(0, client_modules))], partition_roster(), private)
    assert len(got.rejected) == 2 and "is not below 1/n = 1/30" in got.rejected[0]["reason"]


def test_bad_release_records_are_refused_and_the_modules_still_judged_on_their_own(client_modules):
    record = {"module_id": "client-000_class-002", "num_samples": 5, "copy_fraction": 0.5, "max_copy_fraction": 0.02,
              "released": False, "ratio_quantiles": {}, "reference": "train", "num_synthetic": 10}
    arrivals = [Arrival(7, client_reply(0, client_modules, release=[record])),  # a cell without a module
                Arrival(8, client_reply(1, {}, release_problem="the reply's 'release' entry is not JSON"))]
    got = accept_train(arrivals, partition_roster(), CFG)
    first, second = (e["reason"] for e in got.errors)
    assert first.startswith("release records refused: client 0: a release record must have") and \
        first.endswith("for a module this sender holds")
    assert second == "release records refused: the reply's 'release' entry is not JSON"
    assert got.senders[0].modules == client_modules and got.release == {}
    ok = record | {"module_id": "client-000_class-001", "released": True}
    got = accept_train([Arrival(7, client_reply(0, client_modules, release=[ok]))], partition_roster(), CFG)
    assert got.release == {"client-000_class-001": ok}


def test_a_sites_cells_come_from_its_own_claim(pins):
    roster = Roster("h", CLASSES, 20, pins=pins)
    arrivals = [Arrival(11, claim(counts=(40, 10))),  # dog below min_samples: counted, no module expected
                Arrival(22, TrainReply("site-b", "h", error="x" * 5000)),  # its own data is at fault
                Arrival(33, TrainReply("site-b", "h", error="again"))]  # and a second voice for it
    got = accept_train(arrivals, roster, CFG)
    site = got.senders["site-a"]
    assert (site.counts, site.cells, site.test_images) == ({"cat": 40, "dog": 10}, {"site-a_class-000": 40}, 50)
    assert got.site_errors == {"site-b": "x" * 2000}
    assert got.errors[0]["reason"].startswith("site site-b failed: xxx")
    assert "site site-b is pinned to node 22" in got.errors[1]["reason"]
    assert expected_modules(roster, got) == {"site-a": ["site-a_class-000"]}  # only who answered
    # A module of a class it did not report is refused before its bytes are read.
    junk = (Payload("site-a_class-002", b"junk"),)
    got = accept_train([Arrival(11, claim(classes=("cat",), counts=(40,), modules=junk))], roster, CFG)
    assert got.rejected[0]["reason"] == ("node 11 client site-a module 'site-a_class-002': site site-a reported no "
                                         "such class")


def test_a_kept_module_is_reused_only_for_a_cell_of_the_same_count():
    kept = {"client-000_class-000": 30, "client-000_class-001": 41, "client-001_class-002": 50}
    cells = {"client-000_class-000": 30, "client-000_class-001": 40, "client-000_class-002": 9}
    assert reusable_modules(kept, cells) == ["client-000_class-000"]
    assert reusable_modules({}, cells) == [] and reusable_modules(kept, {}) == []


def test_an_expert_is_accepted_only_from_its_site_and_only_if_it_fits_the_run():
    cfg = CFG.classifier
    weights = save(build_classifier(1, 3, cfg.width, 0.0, cfg.norm).state_dict())
    assert check_expert(ExpertReply("site-a", "h", {"site-a": weights}), "site-a", 1, 3, cfg, 0.0) == weights
    for reply, match in [(ExpertReply("site-b", "h", {"site-b": weights}), "reply is not from site site-a"),
                         (ExpertReply("site-a", "h", {}, error="y" * 5000), "^y{2000}$"),
                         (ExpertReply("site-a", "h", {"site-b": weights}), r"expected one expert named site-a, got"),
                         (ExpertReply("site-a", "h", {"site-a": b"not safetensors"}), "."),
                         (ExpertReply("site-a", "h", {"site-a": weights}), "do not fit a 1-channel, 4-class")]:
        with pytest.raises(ClaimError, match=match):
            check_expert(reply, "site-a", 1, 4 if "4-class" in match else 3, cfg, 0.0)


def test_evaluation_counts_are_taken_only_from_the_site_that_was_asked():
    counts = honest_counts(20)
    assert check_counts_reply(CountsReply("site-a", "h", counts), "site-a", 3, declared=20) is counts
    with pytest.raises(ClaimError, match="evaluate reply is not from site site-a"):
        check_counts_reply(CountsReply("site-b", "h", counts), "site-a", 3, declared=20)
    with pytest.raises(ClaimError, match="scored 20 test images but declared 19"):
        check_counts_reply(CountsReply("site-a", "h", counts), "site-a", 3, declared=19)
