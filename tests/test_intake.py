"""The server's acceptance rules (federation.intake) against a dishonest site; no Flower needed."""

import subprocess
import sys

import numpy as np
import pytest

from fedfactory.federation.intake import (
    MAX_SITE_IMAGES,
    ClaimError,
    PinError,
    check_scored,
    check_site_claim,
    class_shares,
    counts_limit,
    flat_plan,
    load_pins,
    oversized,
    parse_pins,
    partition_mismatches,
    stale_modules,
    trust_record,
)
from fedfactory.metrics import score_counts
from fedfactory.modules.files import MAX_FILE_BYTES

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
    return {"site": site, "config-hash": "h", "classes": list(classes), "counts": list(counts), "test-images": test,
            "train-seconds": 1.0} | extra


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
    assert (pinned.site, pinned.counts, pinned.test_images) == ("site-a", {0: 40, 1: 60}, 50)


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
        accept({"site": "site-a", "config-hash": "h", "error": "x"}, node=33, pins=pins)


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
    stale = stale_modules(kept, {"site-a": {"cat": 41}}, {"site-a": ["site-a_class-000"]})
    assert [(s.module_id, s.site) for s in stale] == [("site-a_class-000", "site-a"), ("site-a_class-001", "site-a")]
    assert "site site-a now reports 0 images of class dog, the module was trained on 60" in stale[1].reason
    # ...and a pure rule names them only: it touches no file (the server moves them to modules/stale/).
    assert list(tmp_path.iterdir()) == []
    # A site that did not answer makes nothing of it stale.
    assert stale_modules(kept, {}, {}) == []


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
