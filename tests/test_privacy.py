"""Privacy: the accountant against independent numbers, the audit on modules built to leak or not, DP modules."""

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from fedfactory.audit import auc, audit_images, audit_module
from fedfactory.cli import main
from fedfactory.config import ConfigError, load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.plan import manifest_plan
from fedfactory.federation.runner import run
from fedfactory.federation.unlearning import unlearn
from fedfactory.generative.aegmm import PRIVATE_BLUR_SIGMA, AutoEncoder
from fedfactory.generative.train import plan_training, train_module
from fedfactory.modules.files import module_to_bytes
from fedfactory.modules.refusal import ModuleError
from fedfactory.privacy import dp
from fedfactory.privacy.accounting import (
    Mechanism,
    PrivacyBudgetError,
    calibrate,
    epsilon_of,
    guarantee_problem,
)
from fedfactory.privacy.dp import clip_rows, gaussian_release, noisy_gradient, plan_privacy, poisson_batch
from fedfactory.registry import Module, load_registry
from fedfactory.report import render_report


def reuse_reason(manifest: dict, cfg) -> str | None:
    """factory.trained_as_asked against the plan of the manifest's own cell under cfg, as a server judges a module."""
    return trained_as_asked(manifest, manifest_plan(cfg, manifest), cfg.generator)


def analytic_gaussian_delta(mu: float, eps: float) -> float:
    """delta(epsilon) of a Gaussian mechanism with sensitivity / std = mu, exactly (Balle and Wang 2018, Thm. 8):
    written here from the paper, sharing no code with the accountant."""
    return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))


def invert(delta_of, delta: float) -> float:
    """The epsilon at which a decreasing delta(epsilon) reaches delta, by bisection."""
    low, high = 0.0, 200.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def exact_gaussian_epsilon(mechanisms: list[dict], delta: float) -> float:
    """Epsilon of composed Gaussian releases from their manifest fields alone: the composition of Gaussians with
    sensitivity/std mu_i is one Gaussian with mu = sqrt(sum mu_i^2) (Dong, Roth, Su 2019, Cor. 3.3)."""
    assert all(m["kind"] == "gaussian" and m["sampling_rate"] == 1.0 for m in mechanisms)
    mu = math.sqrt(sum(m["steps"] * (m["sensitivity"] / m["noise_std"]) ** 2 for m in mechanisms))
    return invert(lambda e: analytic_gaussian_delta(mu, e), delta)


def exact_poisson_epsilon(q: float, noise_std: float, sensitivity: float, delta: float) -> float:
    """Epsilon of one Poisson-subsampled Gaussian step under replace-one, by integrating the hockey-stick divergence
    of (1-q) N(0, s^2) + q N(-b, s^2) against (1-q) N(0, s^2) + q N(b, s^2), b = sensitivity / 2, on a fine grid."""
    b, s = sensitivity / 2, noise_std
    x = np.linspace(-b - 40 * s, b + 40 * s, 400_001)
    p = (1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, -b, s)
    r = (1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, b, s)
    dx = x[1] - x[0]
    return invert(lambda e: float(np.maximum(p - math.exp(e) * r, 0).sum() * dx), delta)


@pytest.mark.parametrize("sensitivity, std, count", [(2.0, 1.0, 1), (2.0, 7.47, 1), (11.3, 60.0, 1), (2.0, 3.0, 4)])
def test_the_accountant_agrees_with_the_exact_gaussian_epsilon(sensitivity, std, count):
    mechanisms = [Mechanism(f"m{i}", "gaussian", sensitivity, std) for i in range(count)]
    exact = exact_gaussian_epsilon([m.to_dict() for m in mechanisms], 1e-5)
    spent = epsilon_of(mechanisms, 1e-5)
    # Pessimistic: never below the truth, and tight (the PLD grid is 1e-3 in privacy loss).
    assert exact <= spent <= exact + 0.01


@pytest.mark.parametrize("q, std", [(0.5, 2.0), (0.1, 1.0), (0.01, 0.8)])
def test_the_accountant_agrees_with_the_integrated_poisson_step(q, std):
    spent = epsilon_of([Mechanism("sgd", "poisson-subsampled-gaussian", 2.0, std, 1, q)], 1e-5)
    exact = exact_poisson_epsilon(q, std, 2.0, 1e-5)
    assert exact - 1e-3 <= spent <= exact + 0.01


def test_the_shipped_noise_of_the_old_calibration_is_far_weaker_than_it_claimed():
    # The old embedding release at "epsilon 10" used noise 0.530 for sensitivity 1; replace-one needs 2. Recomputed
    # from the paper's formula it is epsilon ~22.5, and the new calibration for 10 draws about twice the noise.
    old = exact_gaussian_epsilon([{"kind": "gaussian", "sampling_rate": 1.0, "steps": 1, "sensitivity": 2.0,
                                   "noise_std": 0.530}], 1e-5)
    assert 22 < old < 23.5
    plan = plan_privacy(10.0, 1e-5, 1.0, 6000, 64, 600, method="embedding")
    assert plan.noise_multiplier > 0.99 and plan.mechanisms[0].sensitivity == 2.0
    assert exact_gaussian_epsilon([m.to_dict() for m in plan.mechanisms], 1e-5) <= 10.0


def test_dp_sgd_steps_compose_and_subsampling_amplifies():
    def eps(steps, q):
        return epsilon_of([Mechanism("sgd", "poisson-subsampled-gaussian", 2.0, 1.0, steps, q)], 1e-5)

    assert eps(10, 0.01) < eps(100, 0.01) < eps(1000, 0.01)
    assert eps(100, 0.01) < eps(100, 0.1) < epsilon_of([Mechanism("sgd", "gaussian", 2.0, 1.0, 100)], 1e-5)


def test_calibration_meets_the_budget_with_the_least_noise():
    def mechanisms(s):
        return [Mechanism("sgd", "poisson-subsampled-gaussian", 2.0, s, 500, 0.01)]

    sigma = calibrate(mechanisms, 2.0, 1e-5)
    assert epsilon_of(mechanisms(sigma), 1e-5) <= 2.0 < epsilon_of(mechanisms(sigma * 0.99), 1e-5)
    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        calibrate(mechanisms, 0.001, 1e-5, max_noise=2.0)


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
        assert 7.9 < p["epsilon"] <= 8 and p["delta"] == 1e-5 and p["adjacency"] == "replace-one"
        assert [m["name"] for m in p["mechanisms"]] == ["embedding"]
        # Nothing the images fix without noise: one noisy Gaussian, no residual, a fixed blur, no batch loss.
        assert tensors["mixture.means"].shape[0] == 1 and not any(k.startswith("residual.") for k in tensors)
        assert manifest["training"]["blur_sigma"] == PRIVATE_BLUR_SIGMA and "final_loss" not in manifest["training"]
        # From the manifest's fields alone, the paper's exact formula gives no more than the stated epsilon.
        assert exact_gaussian_epsilon(p["mechanisms"], p["delta"]) <= p["epsilon"]
        # The latent model is fixed, not fitted: a standard normal.
        assert float(tensors["mixture.means"].abs().max()) == 0.0
    html = (out / "report.html").read_text()
    assert "differentially private" in html


def test_private_and_plain_modules_are_never_reused_for_each_other(private_run, tiny_run):
    cfg, _, out = private_run
    private = load_registry(out / "modules")[0].manifest
    plain = load_registry(tiny_run / "modules")[0].manifest
    assert reuse_reason(private, cfg) is None
    assert "dp_epsilon" in reuse_reason(private, load_config("tiny"))
    assert "dp_epsilon" in reuse_reason(plain, cfg)
    assert "dp_epsilon" in reuse_reason(private, load_config("tiny", ["privacy.epsilon=4"]))
    assert "dp_method" in reuse_reason(private, load_config("tiny", ["privacy.epsilon=8", "privacy.method=dp-sgd"]))


def test_dp_sgd_modules_compose_sgd_and_moments_in_one_guarantee():
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3]
    cfg = load_config("tiny", ["generator.steps=8", "privacy.epsilon=5", "privacy.method=dp-sgd"])
    tensors, fields = train_module(images, cfg.generator, plan_training(cfg.generator, len(images), 0, cfg.privacy),
                                   torch.device("cpu"), progress=False)
    p, t = fields["privacy"], fields["training"]
    assert t["dp_max_grad_norm"] == 1.0 and "final_loss" not in t and p["adjacency"] == "replace-one"
    sgd, *moments = p["mechanisms"]
    assert sgd["kind"] == "poisson-subsampled-gaussian" and sgd["steps"] == 8 and sgd["sensitivity"] == 2.0
    assert sgd["sampling_rate"] == pytest.approx(32 / len(images))
    assert [m["name"] for m in moments] == ["latent-sum", "latent-outer-products"]
    # From the fields alone, composed by dp-accounting with events this test builds itself.
    accountant = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                                                      value_discretization_interval=1e-4)
    step = dp_accounting.GaussianDpEvent(sgd["noise_std"] / (sgd["sensitivity"] / 2))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(sgd["sampling_rate"], step), sgd["steps"])
    for m in moments:
        accountant.compose(dp_accounting.GaussianDpEvent(m["noise_std"] / (m["sensitivity"] / 2)))
    assert accountant.get_epsilon(p["delta"]) <= p["epsilon"] <= 5
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_the_embedding_decoder_has_its_own_budget_whatever_the_class_size(monkeypatch):
    """The decoder fits only the release: privacy.decoder_* fix its steps, step size and latents per step for every
    class size, and training uses exactly those; DP-SGD modules keep the generator's steps (they read images)."""
    from fedfactory.generative import train as train_mod

    cfg = load_config("tiny", ["privacy.epsilon=5", "privacy.decoder_steps=7", "privacy.decoder_lr=0.003",
                               "privacy.decoder_batch_size=5", "generator.steps=1000", "generator.steps_per_image=0.2"])
    for n in (60, 6000):
        plan = plan_training(cfg.generator, n, 0, cfg.privacy)
        assert (plan.steps, plan.lr, plan.batch_size) == (7, 0.003, 5)
    sgd = dataclasses.replace(cfg.privacy, method="dp-sgd")
    assert plan_training(cfg.generator, 2500, 0, sgd).steps == 500 and plan_training(cfg.generator, 2500, 0, sgd).lr \
        == cfg.generator.lr
    seen = []
    real = train_mod.fit_embedding_decoder
    monkeypatch.setattr(train_mod, "fit_embedding_decoder",
                        lambda *a: seen.append(a[4:7]) or real(*a))
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3]
    _, fields = train_module(images, cfg.generator, plan_training(cfg.generator, len(images), 0, cfg.privacy),
                             torch.device("cpu"), progress=False)
    assert seen == [(7, 5, 0.003)]
    t = fields["training"]
    assert (t["steps"], t["batch_size"], t["lr"]) == (7, 5, 0.003)
    assert any("7 steps" in note for note in fields["privacy"]["notes"])


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
    ("privacy.decoder_steps=0", "must be >= 1"),
    ("privacy.decoder_batch_size=0", "must be >= 1"),
    ("privacy.decoder_lr=0", "must be > 0"),
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
    tensors, fields = train_module(members, cfg, plan_training(cfg, len(members), 0), torch.device("cpu"),
                                   progress=False)
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
    first, second = (train_module(images, cfg.generator, plan_training(cfg.generator, len(images), 7, cfg.privacy),
                                  torch.device("cpu"), progress=False)[0] for _ in range(2))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    plain = [train_module(images, cfg.generator, plan_training(cfg.generator, len(images), 7), torch.device("cpu"),
                          progress=False)[0] for _ in range(2)]
    assert all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])


def test_unlearning_a_private_run_verifies_from_the_kept_modules(private_run, tmp_path):
    _, _, out = private_run
    cert = unlearn(out, clients=(2,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    assert "private modules" in cert["verification"]["summary"]
    assert not list((tmp_path / "u" / "modules").glob("client-002_*"))


def test_privacy_with_local_mode_is_refused():
    # Local mode's experts are trained on each site's raw images and leave the site.
    with pytest.raises(ConfigError, match=r"classifier.mode=local with privacy.epsilon=1.*leaves the site"):
        load_config("tiny", ["privacy.epsilon=1", "classifier.mode=local"])


def test_a_private_run_refuses_modules_that_vouch_for_themselves(private_run, tiny_run):
    cfg, _, out = private_run
    manifest = load_registry(out / "modules")[0].manifest
    p = manifest["privacy"]
    assert guarantee_problem(p, 8.0, 1e-5) is None and reuse_reason(manifest, cfg) is None
    weaker_noise = p | {"mechanisms": [p["mechanisms"][0] | {"noise_std": p["mechanisms"][0]["noise_std"] / 2}]}
    cases = {
        "no privacy block": ({k: v for k, v in manifest.items() if k != "privacy"}, "carries no privacy guarantee"),
        "half the noise, same claim": (manifest | {"privacy": weaker_noise}, "but its mechanisms compose to"),
        "half the noise, honest claim": (manifest | {"privacy": weaker_noise | {"epsilon": 19.2}}, "above the run"),
        "a weaker claim": (manifest | {"privacy": p | {"epsilon": 20.0}}, "above the run's privacy.epsilon=8"),
        "add-remove": (manifest | {"privacy": p | {"adjacency": "add-remove"}}, "not replace-one"),
        "larger delta": (manifest | {"privacy": p | {"delta": 1e-3}}, "above the run's privacy.delta"),
        "no mechanisms": (manifest | {"privacy": p | {"mechanisms": []}}, "lists no mechanism"),
    }
    for name, (tampered, message) in cases.items():
        reason = reuse_reason(tampered, cfg)
        assert reason is not None and message in reason, (name, reason)
    # A plain module whose training fields all claim the private recipe still lacks the guarantee.
    plain = load_registry(tiny_run / "modules")[0].manifest
    claimed = plain | {"training": plain["training"] | manifest["training"]}
    assert "no privacy guarantee" in reuse_reason(claimed, cfg)


def test_gaussian_release_draws_the_stated_std():
    gen = torch.Generator().manual_seed(0)
    value = torch.full((200_000,), 3.0, dtype=torch.float64)
    noise = gaussian_release(value, 2.5, gen) - value
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(2.5, rel=0.01)
    batch = gaussian_release(torch.zeros(4, 3), 1.0, gen)
    assert batch.shape == (4, 3) and len(set(batch.flatten().tolist())) == 12  # independent draws per row


def test_clipping_bounds_every_images_contribution():
    gen = torch.Generator().manual_seed(0)
    per_sample = {"a": torch.randn(5, 3, generator=gen) * 100, "b": torch.randn(5, 2, generator=gen) * 100}
    # Without noise the released sum of five clipped gradients has norm at most 5 C, and one alone exactly C.
    one = noisy_gradient({k: v[:1] for k, v in per_sample.items()}, 1.5, 0.0, 1.0, gen)
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in one.values()))) == pytest.approx(1.5, rel=1e-5)
    total = noisy_gradient(per_sample, 1.5, 0.0, 1.0, gen)
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in total.values()))) <= 5 * 1.5 + 1e-5
    rows = clip_rows(torch.randn(100, 4, generator=gen, dtype=torch.float64) * 10, 2.0)
    assert float(rows.norm(dim=1).max()) <= 2.0 + 1e-9


def test_poisson_batches_include_each_image_at_the_stated_rate():
    gen = torch.Generator().manual_seed(0)
    n, q, draws = 1000, 0.05, 400
    sizes = np.array([len(poisson_batch(n, q, gen)) for _ in range(draws)])
    # Binomial(n, q): the mean over draws within 4 standard errors, and the spread of a binomial.
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert sizes.std() == pytest.approx(math.sqrt(n * q * (1 - q)), rel=0.2)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[poisson_batch(n, q, gen).numpy()] += 1
    assert abs(counts.mean() / draws - q) < 0.005  # every image, not a fixed subset


@pytest.mark.parametrize("method", ["embedding", "dp-sgd"])
def test_training_draws_exactly_the_noise_its_manifest_states(method, monkeypatch):
    # The noise is measured where it is added (every release goes through gaussian_release), not recomputed.
    drawn = []

    def recording(value, noise_std, generator):
        out = real(value, noise_std, generator)
        drawn.append((noise_std, (out - value).flatten().double()))
        return out

    real = dp.gaussian_release
    monkeypatch.setattr(dp, "gaussian_release", recording)
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3]
    cfg = load_config("tiny", ["generator.steps=6", "privacy.epsilon=5", f"privacy.method={method}"])
    _, fields = train_module(images, cfg.generator, plan_training(cfg.generator, len(images), 0, cfg.privacy),
                                   torch.device("cpu"), progress=False)
    stated = {m["name"]: m for m in fields["privacy"]["mechanisms"]}
    if method == "embedding":
        (std, noise), = drawn
        assert std == stated["embedding"]["noise_std"] and float(noise.std()) == pytest.approx(std, rel=0.05)
        return
    sgd, stats_sum, stats_outer = stated["autoencoder-dp-sgd"], stated["latent-sum"], stated["latent-outer-products"]
    steps = [n for s, n in drawn if s == sgd["noise_std"]]
    params = sum(p.numel() for p in AutoEncoder((1, 8, 8), cfg.generator.channels, cfg.generator.latent_dim)
                 .parameters())
    assert sum(len(n) for n in steps) == 6 * params  # every parameter of every step got noise
    assert float(torch.cat(steps).std()) == pytest.approx(sgd["noise_std"], rel=0.05)
    rest = [(s, n) for s, n in drawn if s != sgd["noise_std"]]
    assert [s for s, _ in rest] == [stats_sum["noise_std"], stats_outer["noise_std"]]
    d = cfg.generator.latent_dim
    assert float(rest[1][1].reshape(d, d).triu().std()) > 0  # the released triangle is noisy
