"""Differentially private training pieces: the budget plan, DP-SGD's noisy gradient, noisy moments.

A private module is (epsilon, delta)-DP with respect to adding or removing one of its site's images. Two ways
(privacy.method), each a set of mechanisms that one RDP accountant composes (accounting.py):
- "embedding" (DP-MERF, Harder et al. 2021): one Gaussian mechanism releases the sum of the images' random
  Fourier features (each of norm 1); the decoder is then trained, from standard-normal latents, to match that
  embedding, reading no image. On 2 CPU cores this is the one that gives usable modules (README, Privacy).
- "dp-sgd" (Abadi et al. 2016, Alg. 1) for the autoencoder: Poisson sampling at rate q = batch / n, per-image
  gradients clipped to max_grad_norm, Gaussian noise of std noise_multiplier x max_grad_norm on their sum;
  plus two Gaussian mechanisms for the latent model: the sum of clipped latents and the sum of their outer
  products (the "Analyze Gauss" release of second moments, Dwork, Talwar, Thakurta, Zhang 2014).
Everything else the module ships is post-processing of these, or fixed without looking at the images.
The class count n is not privatized: the server needs it to weight modules (as Opacus and TF-Privacy, the
accountant takes the dataset size as given), and the README says so.
"""

import functools
import math
import secrets
from dataclasses import dataclass

import torch

from fedfactory.privacy.accounting import (
    ACCOUNTANT,
    PrivacyBudgetError,
    gaussian_rdp,
    noise_for_budget,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)

# The latent statistics get this share of epsilon (by itself; the accountant then composes all of it): they are
# two releases of a 32-dim mean and covariance, which need far less noise than thousands of gradient steps.
STATISTICS_SHARE = 0.1
# Past this noise multiplier, a batch of 64 images' clipped gradient (norm <= 64 C) drowns in noise of norm
# sigma C sqrt(parameters): the module would be noise. A budget that needs more is refused before training.
MAX_NOISE_MULTIPLIER = 10.0


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
    noise_multiplier: float  # DP-SGD, or the embedding's release
    statistics_noise_multiplier: float  # dp-sgd: each of the two latent-moment releases (0 for embedding)
    epsilon: float  # what the composition spends, <= target_epsilon
    order: float  # the RDP order that gives it

    def manifest(self, latent_radius: float, blur_sigma: float, features: int = 0) -> dict:
        """The manifest's `privacy` entry: the guarantee and every mechanism behind it."""
        common = {"epsilon": round(self.epsilon, 6), "delta": self.delta,
                  "accountant": f"{ACCOUNTANT}: Renyi DP (Mironov 2017), Poisson-sampled Gaussian (Mironov, Talwar, "
                                f"Zhang 2019), converted at order {self.order:g} (Balle et al. 2020); add or remove "
                                "one image"}
        if self.method == "embedding":
            return common | {"mechanisms": [
                f"embedding: Gaussian mechanism on the sum of {features} random Fourier features of norm 1, noise "
                f"multiplier {self.noise_multiplier:.4f} (DP-MERF)",
                f"decoder: {self.steps} steps fitted to the released embedding only (post-processing)",
                "latent model: standard normal, fixed",
                f"blur: fixed at {blur_sigma:g} pixels, not measured",
                "residual model, adversarial critic: off",
                f"image count {self.num_images}: public, not privatized",
            ]}
        return common | {
            "mechanisms": [
                f"autoencoder: DP-SGD, {self.steps} steps, Poisson sampling rate {self.sampling_rate:.6g}, clipping "
                f"norm {self.max_grad_norm:g}, noise multiplier {self.noise_multiplier:.4f}",
                f"latent Gaussian: noisy sum and outer-product sum of latents clipped to norm {latent_radius:g}, "
                f"noise multiplier {self.statistics_noise_multiplier:.4f} each",
                f"blur: fixed at {blur_sigma:g} pixels, not measured",
                "residual model, adversarial critic: off",
                f"image count {self.num_images}: public, not privatized",
            ],
        }


@functools.lru_cache(maxsize=256)  # the same module is planned before training (to refuse early) and while training
def plan_privacy(epsilon: float, delta: float, max_grad_norm: float, num_images: int, batch_size: int,
                 steps: int, method: str = "dp-sgd") -> PrivacyPlan:
    """The noise every mechanism needs so the module spends at most (epsilon, delta); refuses an impossible budget.

    Called before training: a budget that the requested steps cannot meet is an error, not a useless module.
    """
    if delta >= 1 / num_images:
        raise PrivacyBudgetError(f"privacy.delta={delta} is not below 1/n = 1/{num_images}, which lets a "
                                 f"mechanism publish an image outright; lower privacy.delta below {1 / num_images:.2g}")
    if method == "embedding":
        # One release; the decoder's steps read only it, so any number of them is free.
        sigma = noise_for_budget(epsilon, delta, 1.0, 1)
        spent, order = rdp_to_epsilon(gaussian_rdp(sigma), delta)
        return PrivacyPlan(method, epsilon, delta, num_images, steps, 0.0, max_grad_norm, sigma, 0.0, spent, order)
    q = min(1.0, batch_size / num_images)
    stats_sigma = noise_for_budget(STATISTICS_SHARE * epsilon, delta, 1.0, 2)
    stats_rdp = 2 * gaussian_rdp(stats_sigma)
    try:
        sigma = noise_for_budget(epsilon, delta, q, steps, extra_rdp=stats_rdp, max_noise=MAX_NOISE_MULTIPLIER)
    except PrivacyBudgetError:
        most = max_steps(epsilon, delta, q, stats_rdp)
        fix = (f"lower generator.steps to {most} or fewer" if most else "no number of steps is enough") + \
            " or raise privacy.epsilon"
        raise PrivacyBudgetError(f"privacy.epsilon={epsilon} cannot be met with {steps} DP-SGD steps at "
                                 f"sampling rate {q:.4g} ({num_images} images, batch {batch_size}) without a noise "
                                 f"multiplier above {MAX_NOISE_MULTIPLIER:g}; {fix}") from None
    spent, order = rdp_to_epsilon(sampled_gaussian_rdp(q, sigma, steps) + stats_rdp, delta)
    return PrivacyPlan(method, epsilon, delta, num_images, steps, q, max_grad_norm, sigma, stats_sigma, spent, order)


def max_steps(epsilon: float, delta: float, sampling_rate: float, extra_rdp) -> int:
    """The most DP-SGD steps that fit the budget at MAX_NOISE_MULTIPLIER (0 if none does)."""
    def fits(steps: int) -> bool:
        rdp = sampled_gaussian_rdp(sampling_rate, MAX_NOISE_MULTIPLIER, steps) + extra_rdp
        return rdp_to_epsilon(rdp, delta)[0] <= epsilon

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def secret_generator() -> torch.Generator:
    """A generator for every random draw a DP guarantee rests on (the noise, and DP-SGD's Poisson sample), seeded
    from OS entropy, never from the run seed.

    Every other seed here derives from run.seed, which the run config shares with the server and every site:
    noise seeded that way could be regenerated and subtracted, and the guarantee would be void. The price: a
    private module is not bit-reproducible, so exact unlearning's --verify reuses the kept private modules
    instead of retraining them (federation/unlearning.py).
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
        noise = torch.randn(total.shape, generator=generator) * (noise_multiplier * max_grad_norm)
        out[name] = (total + noise.to(total.device)) / expected_batch
    return out


def clip_rows(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row of x (N, D) down to L2 norm at most radius."""
    return x * (radius / x.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)


def noisy_moments(x: torch.Tensor, radius: float, noise_multiplier: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Private mean (D,) and covariance (D, D) of rows x (N, D), float64, from two Gaussian mechanisms.

    Rows are clipped to norm radius, so one image changes the sum by at most radius and the sum of outer
    products by at most radius^2 in Frobenius norm; noise of std noise_multiplier x that goes on each, the
    covariance's noise on the upper triangle mirrored (Analyze Gauss, Dwork et al. 2014). The covariance is
    then projected onto the positive semi-definite matrices (post-processing) with a floor on its eigenvalues.
    """
    n, d = x.shape
    x = clip_rows(x.double(), radius)
    total = x.sum(0) + torch.randn(d, generator=generator, dtype=torch.float64) * noise_multiplier * radius
    noise = torch.randn(d, d, generator=generator, dtype=torch.float64).triu() * noise_multiplier * radius**2
    second = x.T @ x + noise + noise.triu(1).T
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
