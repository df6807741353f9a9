"""Privacy: the accountant against independent numbers, the audit on modules built to leak or not, DP modules."""

import json
import math

import numpy as np
import pytest
import torch

from fedfactory.cli import main
from fedfactory.config import ConfigError, load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.runner import run
from fedfactory.federation.unlearning import unlearn
from fedfactory.generative.aegmm import PRIVATE_BLUR_SIGMA
from fedfactory.generative.artifact import ModuleError, module_to_bytes
from fedfactory.generative.train import train_module
from fedfactory.privacy.accounting import (
    PrivacyBudgetError,
    gaussian_rdp,
    noise_for_budget,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)
from fedfactory.privacy.audit import auc, audit_images, audit_module
from fedfactory.privacy.dp import plan_privacy
from fedfactory.registry import Module, load_registry
from fedfactory.report import render_report


def test_unsubsampled_gaussian_has_the_closed_form_rdp():
    # Sampling rate 1 is the plain Gaussian mechanism: RDP alpha / (2 sigma^2) (Mironov 2017, Prop. 7), for
    # integer and fractional orders alike, and composition over steps multiplies it.
    orders = [1.5, 2, 3.25, 8, 32]
    assert np.allclose(sampled_gaussian_rdp(1.0, 2.0, 5, orders), 5 * np.array(orders) / 8)
    # The subsampled series at a rate just below 1 must agree with it (both series of Mironov et al. 2019).
    assert np.allclose(sampled_gaussian_rdp(1 - 1e-9, 2.0, 1, orders), np.array(orders) / 8, rtol=1e-4)


def test_fractional_and_integer_series_agree_at_integer_orders():
    # Two independent expansions of Mironov, Talwar, Zhang 2019: the binomial sum (integer orders) and the
    # two erfc-weighted series (any order), evaluated just off the integer.
    for q, sigma in ((0.01, 0.7), (0.3, 1.5)):
        exact = sampled_gaussian_rdp(q, sigma, 1, [2, 3, 8])
        assert np.allclose(sampled_gaussian_rdp(q, sigma, 1, [2 + 1e-9, 3 + 1e-9, 8 + 1e-9]), exact, rtol=1e-6)


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
    html = render_report(tiny_run)
    assert "membership-inference AUC at most" in html and "No module carries a differential-privacy" in html


def test_cli_audit_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "private"
    cfg = load_config("tiny", [f"run.out={out}", "reference.centralized=false", "privacy.epsilon=8"])
    return cfg, run(cfg), out


def test_private_run_records_each_modules_guarantee(private_run):
    cfg, metrics, out = private_run
    modules = load_registry(out / "modules")
    assert len(modules) == 10 and set(metrics["privacy"]) == {m.manifest["module_id"] for m in modules}
    for manifest, tensors in modules:
        p = manifest["privacy"]
        assert metrics["privacy"][manifest["module_id"]] == p
        assert 7.9 < p["epsilon"] <= 8 and p["delta"] == 1e-5 and "rdp" in p["accountant"]
        assert any("random Fourier features" in m for m in p["mechanisms"])
        # Nothing the images fix without noise: one noisy Gaussian, no residual, a fixed blur, no batch loss.
        assert tensors["mixture.means"].shape[0] == 1 and not any(k.startswith("residual.") for k in tensors)
        assert manifest["training"]["blur_sigma"] == PRIVATE_BLUR_SIGMA and "final_loss" not in manifest["training"]
        # The composed epsilon, recomputed from the recorded mechanisms, is what the manifest claims.
        t = manifest["training"]
        plan = plan_privacy(8.0, 1e-5, 1.0, manifest["num_samples"], t["batch_size"], t["steps"], method="embedding")
        assert f"noise multiplier {plan.noise_multiplier:.4f}" in p["mechanisms"][0]
        assert rdp_to_epsilon(gaussian_rdp(plan.noise_multiplier), 1e-5)[0] == pytest.approx(p["epsilon"], abs=1e-5)
        # The latent model is fixed, not fitted: a standard normal.
        assert float(tensors["mixture.means"].abs().max()) == 0.0
    html = (out / "report.html").read_text()
    assert "differentially private" in html


def test_private_and_plain_modules_are_never_reused_for_each_other(private_run, tiny_run):
    cfg, _, out = private_run
    private = load_registry(out / "modules")[0].manifest
    plain = load_registry(tiny_run / "modules")[0].manifest
    assert trained_as_asked(private, cfg) is None
    assert "dp_epsilon" in trained_as_asked(private, load_config("tiny"))
    assert "dp_epsilon" in trained_as_asked(plain, cfg)
    assert "dp_epsilon" in trained_as_asked(private, load_config("tiny", ["privacy.epsilon=4"]))
    assert "dp_method" in trained_as_asked(private, load_config("tiny", ["privacy.epsilon=8", "privacy.method=dp-sgd"]))


def test_dp_sgd_modules_compose_sgd_and_moments_in_one_guarantee():
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3]
    cfg = load_config("tiny", ["generator.steps=8", "privacy.epsilon=5", "privacy.method=dp-sgd"])
    tensors, fields = train_module(images, cfg.generator, 0, torch.device("cpu"), progress=False, privacy=cfg.privacy)
    p, t = fields["privacy"], fields["training"]
    assert "DP-SGD" in p["mechanisms"][0] and t["dp_max_grad_norm"] == 1.0 and "final_loss" not in t
    plan = plan_privacy(5.0, 1e-5, 1.0, len(images), 32, 8)
    rdp = (sampled_gaussian_rdp(plan.sampling_rate, plan.noise_multiplier, 8)
           + 2 * gaussian_rdp(plan.statistics_noise_multiplier))
    assert rdp_to_epsilon(rdp, 1e-5)[0] == pytest.approx(p["epsilon"], abs=1e-5) and p["epsilon"] <= 5
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_a_budget_the_steps_cannot_meet_is_refused_before_training(tmp_path):
    out = tmp_path / "refused"
    # 143 images, batch 32: 3000 steps at epsilon 0.5 would need far more noise than a useful module tolerates.
    cfg = load_config("tiny", [f"run.out={out}", "privacy.epsilon=0.5", "privacy.method=dp-sgd",
                               "generator.steps=3000"])
    with pytest.raises(PrivacyBudgetError, match=r"cannot be met with 3000 DP-SGD steps.*lower generator.steps"):
        run(cfg)
    assert not list((out / "modules").glob("*.safetensors"))
    with pytest.raises(PrivacyBudgetError, match="privacy.delta"):
        plan_privacy(1.0, 0.01, 1.0, 143, 32, 30)


@pytest.mark.parametrize("override, message", [
    ("privacy.epsilon=-1", "must be >= 0"),
    ("privacy.delta=0", r"must lie in \(0, 1\)"),
    ("privacy.max_grad_norm=0", "must be > 0"),
    ("privacy.method=opacus", "valid values are embedding, dp-sgd"),
])
def test_privacy_config_is_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("generator.family=edm", "only supported for aegmm"),
    ("generator.residual_rank=4", "generator.residual_rank=0"),
    ("generator.adversarial=0.1", "generator.adversarial=0"),
])
def test_privacy_refuses_what_it_cannot_protect(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["privacy.epsilon=1", override])


def test_a_module_with_a_malformed_guarantee_is_refused(private_run, tmp_path):
    _, _, out = private_run
    manifest, tensors = load_registry(out / "modules")[0]
    for bad in ({"epsilon": -1.0}, {"delta": 2.0}, {"mechanisms": [1]}, {"extra": "x"}):
        with pytest.raises(ModuleError, match="privacy"):
            module_to_bytes(tensors, manifest | {"privacy": manifest["privacy"] | bad})


def test_edm_modules_also_get_the_white_box_denoising_attack():
    train, test = load_dataset("digits", image_size=8)
    members, non_members = train.images[train.labels == 3], test.images[test.labels == 3]
    cfg = load_config("tiny", ["generator.family=edm", "generator.steps=20", "generator.sampler_steps=4"]).generator
    tensors, fields = train_module(members, cfg, 0, torch.device("cpu"), progress=False)
    manifest = {"module_id": "client-000_class-003", "client_id": 0, "class_id": 3, "class_name": "3"} | fields
    result = audit_module(Module(manifest, tensors), members, non_members, 0, num_synthetic=50, resamples=20)
    assert 0 <= result["mia_auc_white_box"] <= 1 and len(result["mia_auc_white_box_interval"]) == 2
    assert result["privacy"] is None


def test_private_noise_is_secret_so_the_seed_cannot_regenerate_it():
    # The run seed is in the run config every party holds: noise seeded from it could be regenerated and
    # subtracted. Two trainings with the same seed must therefore differ; a plain module is bit-reproducible.
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3]
    cfg = load_config("tiny", ["privacy.epsilon=8"])
    first, second = (train_module(images, cfg.generator, 7, torch.device("cpu"), progress=False,
                                  privacy=cfg.privacy)[0] for _ in range(2))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    plain = [train_module(images, cfg.generator, 7, torch.device("cpu"), progress=False)[0] for _ in range(2)]
    assert all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])


def test_unlearning_a_private_run_verifies_from_the_kept_modules(private_run, tmp_path):
    _, _, out = private_run
    cert = unlearn(out, clients=(2,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    assert "private modules" in cert["verification"]["summary"]
    assert not list((tmp_path / "u" / "modules").glob("client-002_*"))
