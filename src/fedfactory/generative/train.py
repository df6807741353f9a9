"""Train one generative module on the images of one (client, class) and sample from it.

This file owns the loop and the one dispatch on the family; each family's networks, losses and sampling
live in their own file:
- "aegmm": autoencoder + Gaussian mixture on its latents (aegmm.py); the module ships only the decoder
  and the densities, never the encoder or the critic.
- "edm": pixel-space EDM diffusion with a small U-Net (unet.py, edm.py), EMA weights, Heun sampling.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from fedfactory.config import NO_PRIVACY, GeneratorConfig, PrivacyConfig
from fedfactory.data.images import to_float, to_uint8
from fedfactory.errors import FedFactoryError
from fedfactory.generative.aegmm import (
    BLUR_GRID,
    PRIVATE_BLUR_SIGMA,
    AutoEncoder,
    PatchDiscriminator,
    autoencoder_loss,
    decode_samples,
    discriminator_loss,
    fit_densities,
    fit_embedding_decoder,
    fit_private_densities,
    per_image_gradients,
    standard_normal_latents,
)
from fedfactory.generative.edm import EDMParams, edm_loss, heun_sample
from fedfactory.generative.unet import UNet
from fedfactory.privacy.dp import (
    PrivacyBudgetError,
    PrivacyPlan,
    noisy_embedding,
    noisy_gradient,
    plan_privacy,
    poisson_batch,
    random_frequencies,
    secret_generator,
)
from fedfactory.progress import progress as progress_bar
from fedfactory.seeding import derive_seed, torch_generator


class GeneratorTrainingError(FedFactoryError, ValueError):
    """A generative module diverged (a NaN or Inf loss)."""


def network_config(cfg: GeneratorConfig, image_shape: tuple[int, int, int]) -> dict:
    """The part of the generator config that fixes the module's tensors (recorded in its manifest)."""
    net = {"channels": cfg.channels, "image_channels": image_shape[0]}
    if cfg.family == "aegmm":
        net |= {"latent_dim": cfg.latent_dim, "mixture_components": cfg.mixture_components,
                "residual_rank": cfg.residual_rank}
        if cfg.residual_per_component and cfg.residual_rank:  # absent otherwise: other modules keep their bytes
            net["residual_per_component"] = True
    return net


def build_network(family: str, image_shape: tuple[int, int, int], net: dict) -> torch.nn.Module:
    if family == "aegmm":
        return AutoEncoder(tuple(image_shape), net["channels"], net["latent_dim"])
    if family == "edm":
        return UNet(image_shape[0], net["channels"])
    raise ValueError(f"unknown generator family {family!r}; valid: aegmm, edm")


def expected_tensors(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names, shapes and dtypes a module with this manifest must hold (checked on load)."""
    family, shape, net = manifest["family"], tuple(manifest["image_shape"]), manifest["network"]
    for key in ("channels",) + (("latent_dim", "mixture_components") if family == "aegmm" else ()):
        if not isinstance(net.get(key), int) or not 1 <= net[key] <= 4096:
            raise ValueError(f"network.{key} must be an int in [1, 4096]")
    blur = manifest["training"].get("blur_sigma", 0.0)
    if not isinstance(blur, int | float) or isinstance(blur, bool) or not 0 <= blur <= max(BLUR_GRID):
        raise ValueError(f"training.blur_sigma must be a number in [0, {max(BLUR_GRID)}]")
    with torch.device("meta"):
        model = build_network(family, shape, net)
    if family == "aegmm":
        spec = {f"decoder.{k}": (tuple(v.shape), "float32") for k, v in model.decoder.state_dict().items()}
        k, d = manifest["training"].get("mixture_size", net["mixture_components"]), net["latent_dim"]
        if not isinstance(k, int) or not 1 <= k <= net["mixture_components"]:
            raise ValueError("training.mixture_size must be an int in [1, network.mixture_components]")
        spec |= {"mixture.log_weights": ((k,), "float32"), "mixture.means": ((k, d), "float32"),
                 "mixture.scale_tril": ((k, d, d), "float32")}
        r = net.get("residual_rank", 0)
        if not isinstance(r, int) or not 0 <= r <= math.prod(shape):
            raise ValueError("network.residual_rank must be an int in [0, C*H*W]")
        per_component = net.get("residual_per_component", False)
        if not isinstance(per_component, bool):
            raise ValueError("network.residual_per_component must be true or false")
        if r and per_component:
            spec |= {"residual.mean": ((k, *shape), "float32"), "residual.basis": ((k, r, *shape), "float32")}
        elif r:
            spec |= {"residual.mean": (shape, "float32"), "residual.basis": ((r, *shape), "float32")}
        return spec
    return {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}


def _training_plan(family: str, num_images: int, seed: int, requested: dict, privacy: PrivacyPlan | None
                   ) -> "TrainingPlan":
    return TrainingPlan(family, num_images, seed, MappingProxyType(requested), privacy)


def planned_steps(cfg: GeneratorConfig, num_images: int) -> int:
    """Optimizer steps for a module of num_images images.

    generator.steps for every module, or, with generator.steps_per_image > 0, a budget that follows the data
    (at least generator.min_steps, at most generator.steps): a 15-image cell then costs a fraction of a 6,000-image
    one, and any split of the same dataset trains in about the same total time. The floor matters on skewed splits:
    an autoencoder needs a number of optimizer steps to converge whatever its data size, and a 2,000-image cell at
    200 steps decodes blurrier than a 5,000-image one at 500 (benchmarks/results/quality-round2.md, round five).
    generator.max_epochs > 0 caps any budget at that many passes over the images (batch_size images a step, at
    least one step): the floor's 500 steps are 560 epochs of a 57-image cell, time spent learning those images by
    heart, and a split with many small cells then takes far longer than the silos.
    """
    steps = cfg.steps
    if cfg.steps_per_image > 0:
        steps = min(cfg.steps, max(cfg.min_steps, math.ceil(num_images * cfg.steps_per_image)))
    if cfg.max_epochs > 0:
        steps = min(steps, max(1, math.ceil(cfg.max_epochs * num_images / cfg.batch_size)))
    return steps


def requested_training(cfg: GeneratorConfig, num_images: int, seed: int,
                       privacy: PrivacyConfig = NO_PRIVACY) -> dict:
    """The manifest's training fields that a config and a class size fix, read once into TrainingPlan.requested by
    plan_training: a module whose manifest disagrees with its plan's was not trained as asked (a non-private module
    is never what a private run asked for)."""
    if privacy.epsilon > 0 and privacy.method == "embedding":
        # The decoder fits the one release, never an image: its own budget, whatever the class size.
        fields = {"steps": privacy.decoder_steps, "seed": seed, "batch_size": privacy.decoder_batch_size,
                  "lr": privacy.decoder_lr}
    else:
        fields = {"steps": planned_steps(cfg, num_images), "seed": seed, "batch_size": cfg.batch_size, "lr": cfg.lr}
    if adversarial(cfg):
        fields |= {"adversarial": cfg.adversarial, "adversarial_start": cfg.adversarial_start}
    if privacy.epsilon > 0:
        fields |= {"dp_epsilon": privacy.epsilon, "dp_delta": privacy.delta, "dp_method": privacy.method}
        if privacy.method == "dp-sgd":
            fields["dp_max_grad_norm"] = privacy.max_grad_norm
    return fields


@dataclass(frozen=True)
class TrainingPlan:
    """What one module's training is fixed by, decided before any module of the run trains: the manifest's training
    fields the config asks for a class of this size (what "trained as asked" compares, `requested_training`), and
    the DP mechanisms with their calibrated noise when the run is private. Training reads it; nothing recomputes it.
    """

    family: str
    num_images: int
    seed: int
    requested: Mapping[str, object]  # read-only: requested_training(cfg, num_images, seed, privacy)
    privacy: PrivacyPlan | None

    def __reduce__(self):
        # A mapping proxy does not pickle; a plan travels to worker processes (run.workers) as a plain dict.
        return _training_plan, (self.family, self.num_images, self.seed, dict(self.requested), self.privacy)

    @property
    def steps(self) -> int:
        return int(self.requested["steps"])

    @property
    def batch_size(self) -> int:
        return int(self.requested["batch_size"])

    @property
    def lr(self) -> float:
        return float(self.requested["lr"])


def plan_training(cfg: GeneratorConfig, num_images: int, seed: int, privacy: PrivacyConfig = NO_PRIVACY,
                  desc: str = "module") -> TrainingPlan:
    """The plan of one module; refuses what cannot be trained (no images, privacy on a family without a private
    mechanism, a budget the requested steps cannot meet) before anything trains."""
    if num_images <= 0:
        raise ValueError(f"{desc}: no images to train on")
    requested = MappingProxyType(requested_training(cfg, num_images, seed, privacy))
    dp = None
    if privacy.epsilon > 0:
        if cfg.family != "aegmm":
            raise ValueError(f"{desc}: privacy.epsilon is only supported for aegmm")
        try:
            dp = plan_privacy(privacy.epsilon, privacy.delta, privacy.max_grad_norm, num_images,
                              requested["batch_size"], requested["steps"], privacy.method, cfg.latent_dim)
        except PrivacyBudgetError as e:
            raise PrivacyBudgetError(f"{desc}: {e}") from None
    return TrainingPlan(cfg.family, num_images, seed, requested, dp)


def manifest_fields(cfg: GeneratorConfig, image_shape: tuple[int, int, int], plan: TrainingPlan, fields: dict,
                    diffusion: dict | None = None) -> dict:
    """The manifest fields every family and mechanism writes the same way: family, shape, network, the planned
    training fields plus what training measured, the diffusion parameters, and the privacy block of a private
    module (privacy/dp.py: PrivacyPlan.manifest)."""
    out = {"family": cfg.family, "image_shape": list(image_shape), "network": network_config(cfg, image_shape),
           "diffusion": diffusion or {}, "training": dict(plan.requested) | fields}
    if plan.privacy is not None:
        out["privacy"] = plan.privacy.manifest(fields["blur_sigma"])
    return out


def train_embedding_module(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan,
                           device: torch.device, desc: str, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A private aegmm module by DP-MERF (Harder et al. 2021): release one noisy mean embedding of the images,
    then train the decoder on standard-normal latents to match it. Only the first line reads the images."""
    image_shape = shape_of(images)
    frequencies = random_frequencies(image_shape, derive_seed(plan.seed, "features"))
    embedding = noisy_embedding(images, frequencies, plan.privacy.noise_multiplier, secret_generator())
    torch.manual_seed(derive_seed(plan.seed, "init"))  # parameter init is the only use of the global generator
    model = build_network("aegmm", image_shape, network_config(cfg, image_shape))
    fit_embedding_decoder(model.decoder, embedding, frequencies, cfg.latent_dim, plan.steps, plan.batch_size,
                          plan.lr, lr_at, plan.seed)
    tensors = {f"decoder.{k}": v.detach().contiguous() for k, v in model.decoder.state_dict().items()}
    fields = {"blur_sigma": PRIVATE_BLUR_SIGMA, "mixture_size": 1}
    return tensors | standard_normal_latents(cfg.latent_dim), manifest_fields(cfg, image_shape, plan, fields)


def train_dp_sgd_module(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan,
                        device: torch.device, desc: str, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A private aegmm module: the autoencoder by DP-SGD with Poisson sampling, one Gaussian on its latents from
    two noisy moments (privacy/dp.py). The loss of a batch of real images would be a statistic outside the
    guarantee, so no final loss is recorded."""
    ema, _ = fit_network(images, cfg, plan, device, desc, progress)
    tensors, fields = fit_private_densities(ema, images, plan.privacy.latent_radius,
                                            plan.privacy.statistics_noise_multiplier)
    return tensors, manifest_fields(cfg, shape_of(images), plan, fields)


def train_aegmm_module(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan,
                       device: torch.device, desc: str, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The default module: the autoencoder, then its latent mixture and residual model fitted ex post (aegmm.py)."""
    ema, loss = fit_network(images, cfg, plan, device, desc, progress)
    tensors, fields = fit_densities(ema, images, cfg.mixture_components, cfg.residual_rank, plan.seed,
                                    cfg.residual_per_component)
    return tensors, manifest_fields(cfg, shape_of(images), plan, {"final_loss": loss} | fields)


def train_edm_module(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan,
                     device: torch.device, desc: str, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A pixel-space EDM diffusion module (edm.py): the EMA weights of the U-Net and the sampler's parameters."""
    ema, loss = fit_network(images, cfg, plan, device, desc, progress)
    tensors = {k: v.contiguous() for k, v in ema.state_dict().items()}
    diffusion = EDMParams().to_dict() | {"sampler": "heun", "sampler_steps": cfg.sampler_steps}
    return tensors, manifest_fields(cfg, shape_of(images), plan, {"final_loss": loss}, diffusion)


def shape_of(images: np.ndarray) -> tuple[int, int, int]:
    """(C, H, W) of uint8 images (N, H, W, C)."""
    return images.shape[3], images.shape[1], images.shape[2]


def fit_network(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan, device: torch.device,
                desc: str, progress: bool) -> tuple[torch.nn.Module, float]:
    """The one training loop: the family's network from scratch on the images for plan.steps steps; returns its EMA
    (on the CPU, in eval mode) and the last batch's loss. Under a privacy plan every step is DP-SGD's."""
    dp = plan.privacy
    image_shape = shape_of(images)
    net_cfg = network_config(cfg, image_shape)
    gen = torch_generator(plan.seed)
    torch.manual_seed(derive_seed(plan.seed, "init"))  # parameter init is the only use of the global generator
    # Under DP-SGD the noise and the Poisson sample come from OS entropy (privacy/dp.py: secret_generator).
    noise_gen = secret_generator() if dp is not None else None
    sample_gen = secret_generator() if dp is not None else None
    model = build_network(cfg.family, image_shape, net_cfg).to(device)
    ema = build_network(cfg.family, image_shape, net_cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=plan.lr)
    # The critic of the adversarial term (aegmm only): trained here, never shipped.
    disc = PatchDiscriminator(image_shape[0], 2 * cfg.channels).to(device) if adversarial(cfg) else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=plan.lr, betas=(0.5, 0.99)) if disc is not None else None
    steps = plan.steps
    adversarial_from = int(steps * cfg.adversarial_start)
    params = EDMParams()
    data = torch.from_numpy(images)  # stays uint8; batches are scaled on the fly
    use_amp = device.type == "cuda"
    t0 = time.perf_counter()
    bar = progress_bar(range(steps), desc, "step", progress)
    for step in bar:
        # Draw a batch: with replacement, so tiny classes still give full batches; a Poisson sample under DP.
        if dp is None:
            idx = torch.randint(0, len(data), (plan.batch_size,), generator=gen)
        else:
            idx = poisson_batch(len(data), dp.sampling_rate, sample_gen)
        x = torch.from_numpy(to_float(data[idx].numpy())).to(device)
        lr = lr_at(step, steps, plan.lr)
        for group in opt.param_groups + (disc_opt.param_groups if disc_opt else []):
            group["lr"] = lr
        # Loss: L1 reconstruction (+ the adversarial term once the autoencoder has a shape to refine) for the
        # autoencoder, Eq. 8 of EDM for diffusion; under DP-SGD the gradient is set by private_step instead.
        critic = disc if disc is not None and step >= adversarial_from else None
        opt.zero_grad(set_to_none=True)
        if dp is not None:
            # DP-SGD: clipped per-image gradients plus Gaussian noise (Abadi et al. 2016, Alg. 1).
            loss = private_step(model, x, dp, dp.latent_radius, noise_gen)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                if cfg.family == "aegmm":
                    loss, fakes = autoencoder_loss(model, x, critic, cfg.adversarial, gen)
                else:
                    loss = edm_loss(model, x, params, generator=gen)
            loss.backward()
        opt.step()
        update_ema(ema, model, step)
        if critic is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                disc_loss = discriminator_loss(critic, x, fakes)
            disc_opt.zero_grad(set_to_none=True)
            disc_loss.backward()
            disc_opt.step()
        if progress and step % 50 == 0:
            img_s = (step + 1) * plan.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
    bar.close()
    if not math.isfinite(loss.item()):
        raise GeneratorTrainingError(f"{desc}: the training loss is {loss.item()}; lower generator.lr or check the "
                                     "training images")
    return ema.cpu().eval(), float(loss.item())


def private_step(model: torch.nn.Module, x: torch.Tensor, plan: PrivacyPlan, radius: float,
                 noise: torch.Generator) -> torch.Tensor:
    """Set the parameters' .grad to DP-SGD's noisy gradient for the Poisson batch x; returns its mean loss."""
    expected_batch = plan.sampling_rate * plan.num_images
    if len(x):
        per_image, losses = per_image_gradients(model, x, radius)
    else:  # an empty Poisson draw still takes a (pure-noise) step, as the accountant counts it
        per_image = {k: torch.zeros((0, *v.shape), device=v.device) for k, v in model.named_parameters()}
        losses = torch.zeros(1)
    grads = noisy_gradient(per_image, plan.max_grad_norm, plan.noise_multiplier, expected_batch, noise)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    return losses.mean()


def lr_at(step: int, steps: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    """EMA with warm-up: beta = min(0.999, (1 + step) / (10 + step)), so early averages forget the init fast."""
    beta = min(0.999, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - beta)


def trainer(plan: TrainingPlan):
    """The one dispatch on family and mechanism: which function trains a module of this plan."""
    if plan.privacy is not None:
        return train_embedding_module if plan.privacy.method == "embedding" else train_dp_sgd_module
    if plan.family == "aegmm":
        return train_aegmm_module
    if plan.family == "edm":
        return train_edm_module
    raise ValueError(f"unknown generator family {plan.family!r}; valid: aegmm, edm")


def train_module(images: np.ndarray, cfg: GeneratorConfig, plan: TrainingPlan, device: torch.device,
                 desc: str = "module", progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one module from scratch on uint8 images (N, H, W, C) as its plan says; returns (tensors, manifest
    fields). With a privacy plan the whole module is (epsilon, delta)-DP for these images (privacy/dp.py)."""
    if len(images) != plan.num_images or plan.family != cfg.family:
        raise ValueError(f"{desc}: planned for {plan.num_images} {plan.family} images, given {len(images)} "
                         f"{cfg.family}; plan the module with plan_training on the images it trains on")
    return trainer(plan)(images, cfg, plan, device, desc, progress)


def adversarial(cfg: GeneratorConfig) -> bool:
    """Whether this config trains an autoencoder with the adversarial term."""
    return cfg.family == "aegmm" and cfg.adversarial > 0 and cfg.adversarial_start < 1


def image_noise(root_seed: int, module: str, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise for image `index` of `module`: depends only on (root_seed, module, index)."""
    return torch.randn(shape, generator=torch_generator(root_seed, "sample", module, index))


@torch.no_grad()
def sample_module(tensors: dict[str, torch.Tensor], manifest: dict, indices: range, root_seed: int,
                  device: torch.device, batch_size: int = 500) -> np.ndarray:
    """Images `indices` of a module as uint8 (n, H, W, C); image i depends only on (root_seed, module, i)."""
    family, shape, net_cfg = manifest["family"], tuple(manifest["image_shape"]), manifest["network"]
    mid = manifest["module_id"]
    out = []
    if family == "aegmm":
        model = build_network(family, shape, net_cfg)
        model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
        decoder = model.decoder.to(device).eval()
        d, r = net_cfg["latent_dim"], net_cfg.get("residual_rank", 0)
        for start in range(indices.start, indices.stop, batch_size):
            idx = range(start, min(start + batch_size, indices.stop))
            noise = torch.stack([image_noise(root_seed, mid, i, (d + 1 + r,)) for i in idx]).double()
            out.append(decode_samples(decoder, tensors, noise, d, r))
    elif family == "edm":
        net = build_network(family, shape, net_cfg)
        net.load_state_dict(tensors)
        net = net.to(device).eval()
        params = EDMParams(**{k: v for k, v in manifest["diffusion"].items() if k in EDMParams.__dataclass_fields__})
        steps = int(manifest["diffusion"].get("sampler_steps", 18))
        for start in range(indices.start, indices.stop, batch_size):
            idx = range(start, min(start + batch_size, indices.stop))
            noise = torch.stack([image_noise(root_seed, mid, i, shape) for i in idx]).to(device)
            out.append(to_uint8(heun_sample(net, noise, steps, params).clamp(-1, 1).cpu().numpy()))
    else:
        raise ValueError(f"unknown generator family {family!r}")
    c, h, w = shape
    return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)
