"""Differentially private training pieces: the budget plan, and every noisy release a private module makes.

A private module is (epsilon, delta)-DP for its site's images of that class under replace-one adjacency (one image
replaced by another of the class; the count is public: accounting.py says why). Two ways (privacy.method), each a
set of mechanisms that the PLD accountant composes (accounting.py):
- "embedding" (DP-MERF, Harder et al. 2021): one Gaussian release of the sum of the images' random Fourier
  features (each of norm 1, so replacing an image moves the sum by at most 2); the decoder is then trained, from
  standard-normal latents, to match that embedding, reading no image. On 2 CPU cores this is the one that gives
  usable modules (docs/privacy.md).
- "dp-sgd" (Abadi et al. 2016, Alg. 1) for the autoencoder: Poisson sampling at rate q = batch / n, per-image
  gradients clipped to max_grad_norm C, Gaussian noise of std noise_multiplier x C on their sum (replacing an
  image moves it by at most 2C); plus two Gaussian releases for the latent model: the sum of latents clipped to
  norm r (sensitivity 2r) and the sum of their outer products (sensitivity 2r^2 in Frobenius norm; "Analyze
  Gauss", Dwork, Talwar, Thakurta, Zhang 2014).
Everything else the module ships is post-processing of these, or fixed without looking at the images. Every
noise draw goes through gaussian_release, the one place noise is added.
"""

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from fedfactory.data.images import to_float
from fedfactory.privacy.accounting import (
    ACCOUNTANT,
    ADJACENCY,
    ADJACENCY_TEXT,
    Mechanism,
    PrivacyBudgetError,
    calibrate,
    epsilon_of,
)
from fedfactory.seeding import torch_generator

# The latent statistics get this share of epsilon (by itself; the accountant then composes all of it): they are
# two releases of a 32-dim mean and covariance, which need far less noise than thousands of gradient steps.
STATISTICS_SHARE = 0.1
# Past this noise multiplier, a batch of 64 images' clipped gradient (norm <= 64 C) drowns in noise of norm
# sigma C sqrt(parameters): the module would be noise. A budget that needs more is refused before training.
MAX_NOISE_MULTIPLIER = 10.0


def embedding_mechanism(noise_multiplier: float) -> Mechanism:
    """The DP-MERF release: a sum of features of norm 1, so replace-one sensitivity 2."""
    return Mechanism("embedding", "gaussian", 2.0, noise_multiplier)


def statistics_mechanisms(noise_multiplier: float, radius: float) -> list[Mechanism]:
    """The two latent-moment releases of noisy_moments, latents clipped to norm radius.

    Replacing latent x by y moves the sum by |x - y| <= 2r, and the outer products by
    ||x x^T - y y^T||_F = sqrt(|x|^4 + |y|^4 - 2 (x.y)^2) <= sqrt(2) r^2 (reached by orthogonal x, y); the released
    upper triangle moves by no more than the whole matrix.
    """
    return [Mechanism("latent-sum", "gaussian", 2 * radius, noise_multiplier * radius),
            Mechanism("latent-outer-products", "gaussian", math.sqrt(2) * radius**2, noise_multiplier * radius**2)]


def dp_sgd_mechanism(noise_multiplier: float, max_grad_norm: float, steps: int, sampling_rate: float) -> Mechanism:
    """DP-SGD's steps: the clipped per-image gradients' sum, Poisson-sampled, replace-one sensitivity 2C."""
    if sampling_rate >= 1:
        return Mechanism("autoencoder-dp-sgd", "gaussian", 2 * max_grad_norm, noise_multiplier * max_grad_norm,
                         steps)
    return Mechanism("autoencoder-dp-sgd", "poisson-subsampled-gaussian", 2 * max_grad_norm,
                     noise_multiplier * max_grad_norm, steps, sampling_rate)


@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanisms of one private module and what they spend together."""

    method: str  # embedding | dp-sgd
    target_epsilon: float
    delta: float
    num_images: int
    steps: int
    sampling_rate: float
    max_grad_norm: float
    noise_multiplier: float  # DP-SGD, or the embedding's release: noise std over one image's norm bound
    statistics_noise_multiplier: float  # dp-sgd: each of the two latent-moment releases (0 for embedding)
    latent_radius: float  # dp-sgd: the norm latents are clipped to (0 for embedding)
    mechanisms: tuple[Mechanism, ...]
    epsilon: float  # what the composition spends, <= target_epsilon

    def manifest(self, blur_sigma: float) -> dict:
        """The manifest's `privacy` entry: the guarantee, every mechanism behind it, and in prose what is not one."""
        if self.method == "embedding":
            derived = [f"decoder: {self.steps} steps fitted to the released embedding only (post-processing)",
                       "latent model: standard normal, fixed"]
        else:
            derived = ["autoencoder: the EMA of the DP-SGD iterates (post-processing)",
                       "latent model: one Gaussian from the two noisy moments (post-processing)"]
        return {"epsilon": round(self.epsilon, 6), "delta": self.delta, "adjacency": ADJACENCY,
                "accountant": ACCOUNTANT, "mechanisms": [m.to_dict() for m in self.mechanisms],
                "notes": derived + [f"blur: fixed at {blur_sigma:g} pixels, not measured",
                                    "residual model, adversarial critic: off",
                                    f"image count {self.num_images}: public ({ADJACENCY_TEXT})"]}


def plan_privacy(epsilon: float, delta: float, max_grad_norm: float, num_images: int, batch_size: int,
                 steps: int, method: str = "dp-sgd", latent_dim: int = 32) -> PrivacyPlan:
    """The noise every mechanism needs so the module spends at most (epsilon, delta); refuses an impossible budget.

    Called before training: a budget that the requested steps cannot meet is an error, not a useless module.
    """
    if delta >= 1 / num_images:
        raise PrivacyBudgetError(f"privacy.delta={delta} is not below 1/n = 1/{num_images}, which lets a "
                                 f"mechanism publish an image outright; lower privacy.delta below {1 / num_images:.2g}")
    if method == "embedding":
        # One release; the decoder's steps read only it, so any number of them is free.
        sigma = calibrate(lambda s: [embedding_mechanism(s)], epsilon, delta)
        mechanisms = (embedding_mechanism(sigma),)
        return PrivacyPlan(method, epsilon, delta, num_images, steps, 1.0, max_grad_norm, sigma, 0.0, 0.0,
                           mechanisms, epsilon_of(mechanisms, delta))
    q = min(1.0, batch_size / num_images)
    radius = latent_radius(latent_dim)
    stats_sigma = calibrate(lambda s: statistics_mechanisms(s, radius), STATISTICS_SHARE * epsilon, delta)
    stats = statistics_mechanisms(stats_sigma, radius)
    try:
        sigma = calibrate(lambda s: [dp_sgd_mechanism(s, max_grad_norm, steps, q), *stats], epsilon, delta,
                          max_noise=MAX_NOISE_MULTIPLIER)
    except PrivacyBudgetError:
        most = max_steps(epsilon, delta, q, max_grad_norm, stats)
        fix = (f"lower generator.steps to {most} or fewer" if most else "no number of steps is enough") + \
            " or raise privacy.epsilon"
        raise PrivacyBudgetError(f"privacy.epsilon={epsilon} cannot be met with {steps} DP-SGD steps at "
                                 f"sampling rate {q:.4g} ({num_images} images, batch {batch_size}) without a noise "
                                 f"multiplier above {MAX_NOISE_MULTIPLIER:g}; {fix}") from None
    mechanisms = (dp_sgd_mechanism(sigma, max_grad_norm, steps, q), *stats)
    return PrivacyPlan(method, epsilon, delta, num_images, steps, q, max_grad_norm, sigma, stats_sigma, radius,
                       mechanisms, epsilon_of(mechanisms, delta))


def max_steps(epsilon: float, delta: float, sampling_rate: float, max_grad_norm: float,
              others: list[Mechanism]) -> int:
    """The most DP-SGD steps that fit the budget at MAX_NOISE_MULTIPLIER (0 if none does)."""
    def fits(steps: int) -> bool:
        sgd = dp_sgd_mechanism(MAX_NOISE_MULTIPLIER, max_grad_norm, steps, sampling_rate)
        return epsilon_of([sgd, *others], delta) <= epsilon

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def gaussian_release(value: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """value + N(0, noise_std^2) on every coordinate, in value's dtype: the one place noise is added.

    A batch of values (B, ...) gets B independent draws, which is how the empirical audit releases a mechanism
    many times in one call (tests/test_privacy_audit.py).
    """
    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device="cpu")
    return value + noise_std * noise.to(value.device)


def secret_generator() -> torch.Generator:
    """A generator for every random draw a DP guarantee rests on (the noise, and DP-SGD's Poisson sample), seeded
    from OS entropy, never from the run seed.

    Every other seed here derives from run.seed, which the run config shares with the server and every site:
    noise seeded that way could be regenerated and subtracted, and the guarantee would be void. The price: a
    private module is not bit-reproducible, so exact unlearning's --verify reuses the kept private modules
    instead of retraining them (federation/unlearning/verify.py).
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_batch(num_images: int, sampling_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: every image independently with probability sampling_rate (the accountant's
    assumption; a fixed-size batch would need another analysis)."""
    return torch.nonzero(torch.rand(num_images, generator=generator) < sampling_rate).flatten()


def noisy_gradient(per_sample: dict[str, torch.Tensor], max_grad_norm: float, noise_multiplier: float,
                   expected_batch: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient (Abadi et al. 2016, Alg. 1): clip each image's gradient (B, ...) to max_grad_norm in L2
    over all parameters, sum, add N(0, (noise_multiplier max_grad_norm)^2), divide by the expected batch size.

    Dividing by the expected rather than the drawn batch size keeps the normalisation data-independent.
    """
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values()))  # (B,)
    scale = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
    out = {}
    for name, g in per_sample.items():
        total = torch.einsum("b,b...->...", scale, g)
        out[name] = gaussian_release(total, noise_multiplier * max_grad_norm, generator) / expected_batch
    return out


def clip_rows(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row of x (N, D) down to L2 norm at most radius."""
    return x * (radius / x.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)


def noisy_moments(x: torch.Tensor, radius: float, noise_multiplier: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Private mean (D,) and covariance (D, D) of rows x (N, D), float64, from two Gaussian mechanisms.

    Rows are clipped to norm radius, so replacing one image changes the sum by at most 2 radius and the sum of
    outer products by at most 2 radius^2 in Frobenius norm (statistics_mechanisms); noise of std noise_multiplier
    x radius (x radius^2) goes on each, the covariance's on the upper triangle mirrored (Analyze Gauss, Dwork et
    al. 2014). The covariance is
    then projected onto the positive semi-definite matrices (post-processing) with a floor on its eigenvalues.
    """
    n, d = x.shape
    x = clip_rows(x.double(), radius)
    total = gaussian_release(x.sum(0), noise_multiplier * radius, generator)
    # Noise on the upper triangle (the release), mirrored below: the matrix stays symmetric.
    upper = gaussian_release(torch.zeros(d, d, dtype=torch.float64), noise_multiplier * radius**2, generator).triu()
    second = x.T @ x + upper + upper.triu(1).T
    mean = total / n
    cov = second / n - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    floor = 1e-4 * radius**2 / d
    cov = vectors @ torch.diag(values.clamp(min=floor)) @ vectors.T
    return mean, (cov + cov.T) / 2


def latent_radius(latent_dim: int) -> float:
    """The norm latents are clipped to in private training and statistics: sqrt(latent_dim), about one per
    coordinate, fixed without looking at the data."""
    return math.sqrt(latent_dim)


RFF_FEATURES = 4096  # random frequencies; each gives a cosine and a sine feature
RFF_SCALES = (0.25, 0.5, 1.0)  # Gaussian-kernel bandwidths, in units of sqrt(pixels): fixed, not fitted


def random_frequencies(image_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Frequencies (C*H*W, RFF_FEATURES) of random Fourier features for a sum of Gaussian kernels (Rahimi and
    Recht 2007), one block per bandwidth in RFF_SCALES x sqrt(pixels); drawn from the seed, never from data."""
    dim = math.prod(image_shape)
    gen = torch_generator(seed, "frequencies")
    blocks = [torch.randn(dim, RFF_FEATURES // len(RFF_SCALES), generator=gen) / (s * math.sqrt(dim))
              for s in RFF_SCALES]
    return torch.cat(blocks, 1)


def random_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """phi(x) (B, 2F) = [cos(x w), sin(x w)] / sqrt(F) for images x (B, C, H, W): every phi(x) has norm exactly 1."""
    proj = x.flatten(1) @ frequencies
    return torch.cat([proj.cos(), proj.sin()], 1) / math.sqrt(frequencies.shape[1])


@torch.no_grad()
def noisy_embedding(images: np.ndarray, frequencies: torch.Tensor, noise_multiplier: float,
                    generator: torch.Generator) -> torch.Tensor:
    """The private mean embedding of the images (2F,): the sum of their features (each of norm 1, so replacing one
    image moves the sum by at most 2: privacy/dp.py embedding_mechanism) plus N(0, noise_multiplier^2 I), over the
    (public) count: one Gaussian mechanism (DP-MERF, Harder et al. 2021, Eq. 6)."""
    return (gaussian_release(feature_sum(images, frequencies), noise_multiplier, generator) / len(images)).float()


@torch.no_grad()
def feature_sum(images: np.ndarray, frequencies: torch.Tensor) -> torch.Tensor:
    """The sum of the images' random features (2F,), float64: the embedding release before its noise."""
    return sum(random_features(torch.from_numpy(to_float(images[i:i + 1000])), frequencies).double().sum(0)
               for i in range(0, len(images), 1000))
