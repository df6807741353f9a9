"""Privacy: the accountant against independent numbers, the audit on modules built to leak or not, DP modules."""

import json
import math

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.federation.runner import run
from fedfactory.privacy.accounting import (
    PrivacyBudgetError,
    gaussian_rdp,
    noise_for_budget,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)
from fedfactory.privacy.audit import auc, audit_images


def test_unsubsampled_gaussian_has_the_closed_form_rdp():
    # Sampling rate 1 is the plain Gaussian mechanism: RDP alpha / (2 sigma^2) (Mironov 2017, Prop. 7), for
    # integer and fractional orders alike, and composition over steps multiplies it.
    orders = [1.5, 2, 3.25, 8, 32]
    assert np.allclose(sampled_gaussian_rdp(1.0, 2.0, 5, orders), 5 * np.array(orders) / 8)
    # The subsampled series at a rate just below 1 must agree with it (both series of Mironov et al. 2019).
    assert np.allclose(sampled_gaussian_rdp(1 - 1e-9, 2.0, 1, orders), np.array(orders) / 8, rtol=1e-4)


def test_dp_sgd_epsilon_matches_tf_privacys_published_value():
    # TF-Privacy's compute_dp_sgd_privacy docstring: N=60000, batch 256, noise 1.12, 60 epochs, delta 1e-5
    # "satisfies (2.92, 1e-5)-DP", with its orders and the conversion of Mironov 2017, Prop. 3.
    orders = [1.25, 1.5, 1.75, 2., 2.25, 2.5, 3., 3.5, 4., 4.5] + list(range(5, 64)) + [128, 256, 512]
    steps = math.ceil(60 * 60000 / 256)
    rdp = sampled_gaussian_rdp(256 / 60000, 1.12, steps, orders)
    assert rdp_to_epsilon(rdp, 1e-5, orders, conversion="mironov")[0] == pytest.approx(2.92, abs=0.005)
    # The default conversion (Balle et al. 2020) is never looser.
    assert rdp_to_epsilon(rdp, 1e-5, orders)[0] < 2.92


def test_noise_search_meets_the_budget_and_refuses_the_impossible():
    sigma = noise_for_budget(2.0, 1e-5, 0.01, 500)
    spent = rdp_to_epsilon(sampled_gaussian_rdp(0.01, sigma, 500), 1e-5)[0]
    assert spent <= 2.0 and spent > 1.99
    assert noise_for_budget(1.0, 1e-5, 0.01, 500) > sigma
    # Other mechanisms that already spend the whole budget leave nothing for DP-SGD.
    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        noise_for_budget(1.0, 1e-5, 0.01, 500, extra_rdp=gaussian_rdp(0.1))


def images(rng, n):
    """Random 8x8 images: smooth blobs, so nearest neighbours are not all at one distance."""
    base = rng.normal(size=(n, 4, 4, 1))
    return np.clip(128 + 60 * base.repeat(2, 1).repeat(2, 2), 0, 255).astype(np.uint8)


def test_audit_catches_a_module_that_replays_its_training_images():
    rng = np.random.default_rng(0)
    members, non_members = images(rng, 150), images(rng, 150)
    replay = members[np.arange(400) % len(members)]
    result = audit_images(replay, members, non_members, seed=0, resamples=50)
    assert result["copy_fraction"] == 1.0 and result["mia_auc"] == 1.0
    assert result["mia_auc_interval"][0] > 0.95


def test_audit_of_a_data_independent_module_is_at_chance():
    rng = np.random.default_rng(1)
    members, non_members, fresh = images(rng, 300), images(rng, 300), images(rng, 1000)
    result = audit_images(fresh, members, non_members, seed=0, resamples=100)
    assert result["copy_fraction"] == 0.0
    assert abs(result["mia_auc"] - 0.5) < 0.06
    lo, hi = result["mia_auc_interval"]
    assert lo < 0.5 < hi or abs(result["mia_auc"] - 0.5) < 0.03


def test_auc_counts_ties_as_half():
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run(load_config("tiny", [f"run.out={out}", "reference.centralized=false"]))
    return out


def test_cli_audit_writes_audit_json_and_changes_nothing_else(tiny_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    assert main(["audit", str(tiny_run), "--synthetic", "200", "--candidates", "50"]) == 0
    assert "membership-inference AUC" in capsys.readouterr().out
    doc = json.loads((tiny_run / "audit.json").read_text())
    assert len(doc["modules"]) == 10
    assert doc["mia_auc_max"] == max(m["mia_auc"] for m in doc["modules"])
    assert doc["copy_fraction_max"] == max(m["copy_fraction"] for m in doc["modules"])
    assert all(0 <= m["copy_fraction"] <= 1 and 0 <= m["mia_auc"] <= 1 for m in doc["modules"])
    after = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.name != "audit.json"}
    assert after == before
    assert not (tiny_run / "audit-closest.png").exists()  # the figure shows real images: only when asked


def test_cli_audit_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
