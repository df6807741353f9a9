import numpy as np
import pytest
import torch

from fedfactory.config import GeneratorConfig
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.factory import allocate, plan_synthesis
from fedfactory.generative.aegmm import (
    add_residual,
    component_of,
    fit_component_residuals,
    fit_residual,
    pick_components,
)
from fedfactory.generative.edm import EDMParams, denoise, edm_loss, heun_sample, sigma_steps
from fedfactory.generative.train import expected_tensors, plan_training, sample_module, train_module
from fedfactory.generative.unet import UNet
from fedfactory.modules.files import load_module, save_module
from fedfactory.modules.ids import module_id
from fedfactory.registry import module_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sevens():
    train, _ = load_dataset("digits", image_size=8)
    return train.images[train.labels == 7]


def test_sigma_schedule_endpoints():
    p = EDMParams()
    s = sigma_steps(18, p)
    assert s.shape == (19,) and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(p.sigma_max, dtype=s.dtype))
    assert torch.isclose(s[-2], torch.tensor(p.sigma_min, dtype=s.dtype))
    assert torch.all(s[:-1] > s[1:])


def test_preconditioning_is_identity_at_zero_noise():
    net = UNet(1, 8)
    x = torch.randn(2, 1, 8, 8)
    out = denoise(net, x, torch.full((2,), 1e-6), EDMParams())
    assert torch.allclose(out, x, atol=1e-4)


def test_heun_sampler_reaches_the_data_point_of_an_ideal_denoiser():
    target = torch.randn(1, 1, 8, 8)

    class Ideal(torch.nn.Module):
        # F chosen so that D(x; sigma) = target for every x and sigma (Eq. 7 solved for F).
        def forward(self, x_in, c_noise):
            p = EDMParams()
            sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
            x = x_in * (sigma**2 + p.sigma_data**2).sqrt()
            c_skip = p.sigma_data**2 / (sigma**2 + p.sigma_data**2)
            c_out = sigma * p.sigma_data / (sigma**2 + p.sigma_data**2).sqrt()
            return (target - c_skip * x) / c_out

    out = heun_sample(Ideal(), torch.randn(3, 1, 8, 8), 10, EDMParams())
    assert torch.allclose(out, target.expand(3, -1, -1, -1), atol=1e-3)


@pytest.mark.parametrize("family", ["aegmm", "edm"])
def test_loss_falls_and_training_is_deterministic(sevens, family):
    cfg = GeneratorConfig(family=family, steps=60, batch_size=32, channels=8, latent_dim=8, mixture_components=3)
    torch.manual_seed(0)
    t1, f1 = train_module(sevens, cfg, plan_training(cfg, len(sevens), 3), CPU, progress=False)
    t2, _ = train_module(sevens, cfg, plan_training(cfg, len(sevens), 3), CPU, progress=False)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    # The loss after training is below the loss of the untrained network on the same data.
    x = torch.from_numpy(sevens[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    if family == "aegmm":
        from fedfactory.generative.aegmm import AutoEncoder

        torch.manual_seed(1)
        fresh = AutoEncoder((1, 8, 8), 8, 8)
        assert f1["training"]["final_loss"] < (fresh(x) - x).abs().mean().item()
    else:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(1)
        fresh = UNet(1, 8)
        base = np.mean([edm_loss(fresh, x, EDMParams(), gen).item() for _ in range(5)])
        assert f1["training"]["final_loss"] < base


@pytest.mark.parametrize("family, residual_rank, per_component",
                         [("aegmm", 0, False), ("aegmm", 3, False), ("aegmm", 3, True), ("aegmm", 0, True),
                          ("edm", 0, False)])
def test_module_round_trip_and_per_image_sampling(tmp_path, sevens, family, residual_rank, per_component):
    cfg = GeneratorConfig(family=family, steps=5, batch_size=16, channels=8, latent_dim=8, mixture_components=2,
                          sampler_steps=4, residual_rank=residual_rank, residual_per_component=per_component)
    tensors, fields = train_module(sevens, cfg, plan_training(cfg, len(sevens), 1), CPU, progress=False)
    manifest = {"module_id": module_id(2, 7), "client_id": 2, "class_id": 7, "class_name": "7",
                "num_samples": len(sevens)} | fields
    assert {k: (tuple(v.shape), "float32") for k, v in tensors.items()} == expected_tensors(manifest)
    assert ("residual.basis" in tensors) == (residual_rank > 0)
    if per_component and residual_rank:  # one residual model per mixture component: (K, r, C, H, W)
        assert tensors["residual.basis"].shape == (fields["training"]["mixture_size"], 3, 1, 8, 8)
        assert "residual_per_component" in manifest["network"]
    else:  # the one-residual recipe's manifest is unchanged, and so is a module with no residual model
        assert "residual_per_component" not in manifest["network"]
    if family == "aegmm":
        bad = {**manifest, "network": {**manifest["network"], "residual_per_component": 1}}
        with pytest.raises(ValueError, match="network.residual_per_component must be true or false"):
            expected_tensors(bad)
    save_module(tmp_path / "m.safetensors", tensors, manifest)
    loaded_manifest, loaded = load_module(tmp_path / "m.safetensors", expected=module_spec)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    # Image i depends only on (seed, module, i): not on the batch it is drawn in nor the range around it.
    whole = sample_module(loaded, loaded_manifest, range(0, 12), 5, CPU, batch_size=5)
    part = sample_module(loaded, loaded_manifest, range(7, 9), 5, CPU, batch_size=2)
    assert whole.shape == (12, 8, 8, 1) and whole.dtype == np.uint8
    assert np.array_equal(whole[7:9], part)
    other_seed = sample_module(loaded, loaded_manifest, range(0, 12), 6, CPU, batch_size=5)
    assert not np.array_equal(whole, other_seed)


def test_allocation_is_proportional_and_exact():
    assert allocate([100, 300], 40) == [10, 30]
    assert sum(allocate([1, 1, 1], 100)) == 100
    assert allocate([], 10) == []
    plan = plan_synthesis([{"module_id": "client-000_class-001", "class_id": 1, "num_samples": 30},
                           {"module_id": "client-001_class-001", "class_id": 1, "num_samples": 10},
                           {"module_id": "client-001_class-000", "class_id": 0, "num_samples": 5}], 2, 100)
    assert plan == {"client-000_class-001": 75, "client-001_class-001": 25, "client-001_class-000": 100}


def test_streamed_residual_fit_matches_the_exact_svd():
    # A class whose residuals have four strong directions over small noise; the decoder reconstructs the mean.
    g = torch.Generator().manual_seed(0)
    n, shape = 400, (3, 8, 8)
    directions = torch.linalg.qr(torch.randn(192, 4, generator=g, dtype=torch.float64)).Q.T
    coeffs = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([900.0, 600.0, 400.0, 250.0])
    pixels = 128 + coeffs @ directions + torch.randn(n, 192, generator=g, dtype=torch.float64)
    images = pixels.clamp(0, 255).round().to(torch.uint8).reshape(n, *shape).permute(0, 2, 3, 1).numpy()
    mean_image = torch.zeros(1, *shape)

    def reconstruct(start, stop):
        return mean_image.expand(stop - start, *shape)

    exact = fit_residual(images, reconstruct, 4, seed=3)
    streamed = fit_residual(images, reconstruct, 4, seed=3, chunk=64, exact_bytes=0)
    assert torch.allclose(streamed["residual.mean"], exact["residual.mean"], atol=1e-5)
    # Bases agree up to sign: compare the covariances they define, basis^T basis.
    cov = [f["residual.basis"].flatten(1).double() for f in (exact, streamed)]
    cov = [b.T @ b for b in cov]
    assert torch.linalg.norm(cov[0] - cov[1]) < 1e-4 * torch.linalg.norm(cov[0])
    # Another test-subspace seed gives the same fit; the streamed path never saw more than 64 rows at once.
    again = fit_residual(images, reconstruct, 4, seed=4, chunk=64, exact_bytes=0)["residual.basis"].flatten(1)
    assert torch.linalg.norm(again.double().T @ again.double() - cov[1]) < 1e-4 * torch.linalg.norm(cov[0])


def test_adversarial_autoencoder_is_deterministic_and_ships_no_critic(sevens):
    """The critic changes the decoder (so it is really trained) but never reaches the module's tensors."""
    base = GeneratorConfig(steps=40, batch_size=16, channels=8, latent_dim=8, mixture_components=2)
    adv = GeneratorConfig(steps=40, batch_size=16, channels=8, latent_dim=8, mixture_components=2,
                          adversarial=0.5, adversarial_start=0.25)
    plain, _ = train_module(sevens, base, plan_training(base, len(sevens), 3), CPU, progress=False)
    t1, f1 = train_module(sevens, adv, plan_training(adv, len(sevens), 3), CPU, progress=False)
    t2, _ = train_module(sevens, adv, plan_training(adv, len(sevens), 3), CPU, progress=False)
    assert t1.keys() == plain.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not torch.equal(t1["decoder.0.weight"], plain["decoder.0.weight"])
    assert f1["training"]["adversarial"] == 0.5 and f1["training"]["adversarial_start"] == 0.25
    # The spec the server checks is the plain decoder's: an adversarial module loads like any other.
    manifest = {**f1, "module_id": module_id(7, 7)}
    assert expected_tensors(manifest) == {k: (tuple(v.shape), "float32") for k, v in t1.items()}


def test_compute_follows_data(sevens):
    """With steps_per_image, a module's steps grow with its images between the floor and generator.steps."""
    from fedfactory.generative.train import planned_steps

    cfg = GeneratorConfig(steps=1000, steps_per_image=0.2)
    assert [planned_steps(cfg, n) for n in (1, 15, 2500, 4000, 60000)] == [200, 200, 500, 800, 1000]
    assert planned_steps(GeneratorConfig(steps=1000), 15) == 1000
    # The floor is the config's: it lifts the small cells and leaves the large ones, under the cap of steps.
    floor = GeneratorConfig(steps=1000, steps_per_image=0.2, min_steps=600)
    assert [planned_steps(floor, n) for n in (15, 2500, 4000, 60000)] == [600, 600, 800, 1000]
    assert planned_steps(GeneratorConfig(steps=300, steps_per_image=0.2, min_steps=600), 15) == 300
    # An epoch cap overrides the floor for the small cells only: 40 passes of 64-image batches.
    capped = GeneratorConfig(steps=1000, steps_per_image=0.2, min_steps=500, max_epochs=40, batch_size=64)
    assert [planned_steps(capped, n) for n in (1, 57, 400, 800, 2500, 60000)] == [1, 36, 250, 500, 500, 1000]
    assert planned_steps(GeneratorConfig(steps=1000, max_epochs=40), 64) == 40
    small = GeneratorConfig(steps=300, steps_per_image=0.5, batch_size=8, channels=4, latent_dim=4,
                            mixture_components=2)
    _, fields = train_module(sevens[:10], small, plan_training(small, 10, 0), CPU, progress=False)
    assert fields["training"]["steps"] == small.min_steps == 200


def test_component_residuals_follow_their_component():
    # Two groups of 8x8 images whose residuals (the decoder reconstructs zero) vary along different directions.
    gen = np.random.default_rng(0)
    u, v = np.zeros((8, 8)), np.zeros((8, 8))
    u[:4], v[:, :4] = 1, 1
    a, b = gen.normal(size=(40, 1, 1)), gen.normal(size=(30, 1, 1))
    images = np.concatenate([128 + 40 * a * u, 64 + 40 * b * v]).round().clip(0, 255).astype(np.uint8)[..., None]
    comp = torch.tensor([0] * 40 + [1] * 30)
    fit = fit_component_residuals(images, lambda rows: torch.zeros(len(rows), 1, 8, 8), comp, 3, 1, seed=0)
    assert fit["residual.mean"].shape == (3, 1, 8, 8) and fit["residual.basis"].shape == (3, 1, 1, 8, 8)
    for k, direction in ((0, u), (1, v)):
        basis = fit["residual.basis"][k, 0, 0].double().numpy()
        cosine = abs((basis * direction).sum()) / (np.linalg.norm(basis) * np.linalg.norm(direction))
        assert cosine > 0.99
    # Each group's mean is its own (about 0 and -0.5 in [-1, 1] units).
    assert abs(fit["residual.mean"][0].mean().item()) < 0.1
    assert abs(fit["residual.mean"][1].mean().item() + 0.5) < 0.1
    # A component with too few images (here none; 4 per direction are needed) takes the class's one model.
    whole = fit_residual(images, lambda a, b: torch.zeros(b - a, 1, 8, 8), 1, seed=0)
    assert torch.allclose(fit["residual.mean"][2], whole["residual.mean"])
    assert torch.allclose(fit["residual.basis"][2].abs(), whole["residual.basis"].abs(), atol=1e-5)
    # With rank 8 the 30-image group (fewer than 32) falls back too; the 40-image one keeps its own.
    eight = fit_component_residuals(images, lambda rows: torch.zeros(len(rows), 1, 8, 8), comp, 2, 8, seed=0)
    assert torch.allclose(eight["residual.mean"][1], fit_residual(
        images, lambda a, b: torch.zeros(b - a, 1, 8, 8), 8, seed=0)["residual.mean"])
    assert torch.allclose(eight["residual.mean"][0], fit["residual.mean"][0])


def test_each_sample_draws_its_own_components_residual():
    d = 2
    mixture = {"mixture.log_weights": torch.log(torch.tensor([0.5, 0.5])),
               "mixture.means": torch.tensor([[-5.0, 0.0], [5.0, 0.0]]),
               "mixture.scale_tril": 0.1 * torch.eye(d).repeat(2, 1, 1)}
    uniform = torch.tensor([0.1, 0.9, 0.4, 0.6])
    comp = pick_components(mixture, uniform)
    assert comp.tolist() == [0, 1, 0, 1]
    # The latents a component draws are the ones component_of gives back to it.
    z = mixture["mixture.means"][comp] + 0.1 * torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    assert component_of(z, mixture).tolist() == comp.tolist()
    residual = {"residual.mean": torch.tensor([0.5, -0.5]).reshape(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous(),
                "residual.basis": torch.zeros(2, 3, 1, 4, 4)}
    residual["residual.basis"][1, 0] = 2.0  # component 1's only direction; its mean -0.5, so noise 1 gives 1.5
    noise = torch.ones(4, 3)
    x = add_residual(torch.zeros(4, 1, 4, 4), residual, noise, comp)
    assert torch.allclose(x[0], torch.full((1, 4, 4), 0.5)) and torch.allclose(x[2], torch.full((1, 4, 4), 0.5))
    assert torch.allclose(x[1], torch.full((1, 4, 4), 1.5)) and torch.allclose(x[3], torch.full((1, 4, 4), 1.5))
    # The one-residual model ignores components.
    one = {"residual.mean": torch.full((1, 4, 4), 0.25), "residual.basis": torch.zeros(3, 1, 4, 4)}
    assert torch.allclose(add_residual(torch.zeros(4, 1, 4, 4), one, noise, comp), torch.full((4, 1, 4, 4), 0.25))
