"""An empirical privacy audit: release each mechanism many times on two neighbouring inputs, attack with a threshold
test, and turn the attack's error rates into a statistical lower bound on epsilon (Jagielski, Ullman, Oprea 2020;
Nasr et al. 2021).

It shares no code with the accountant: it runs the release code itself (the features, the clipping, the noise
draw), on neighbours built to reach each mechanism's stated sensitivity, and only counts how often a test tells
them apart. A correct mechanism keeps the bound below the epsilon the accountant states; a mechanism with too
little noise for its sensitivity pushes it above (tests/test_privacy_audit.py checks both).

Each neighbouring pair replaces one record by another (replace-one adjacency, accounting.py):
- embedding: two images whose random features are antipodal. The frequencies are a public parameter, so the
  guarantee must hold for every choice of them; the audit picks frequencies that map the replaced image's
  features to minus the canary's, so the feature sums differ by exactly 2.
- latent-sum: a latent of norm 10 r against its negative: clipping brings both to norm r, a distance of 2r.
- latent-outer-products: latents of norm 10 r along two orthogonal axes: their clipped outer products differ by
  sqrt(2) r^2 on the released upper triangle.
- autoencoder-dp-sgd: one DP-SGD step at Poisson rate q on a canary gradient of norm 10 C against its negative.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fedfactory.privacy.accounting import Mechanism, calibrate, epsilon_of
from fedfactory.privacy.dp import (
    clip_rows,
    dp_sgd_mechanism,
    embedding_mechanism,
    feature_sum,
    gaussian_release,
    noisy_gradient,
    poisson_batch,
    statistics_mechanisms,
)

THRESHOLDS = 24  # threshold tests tried; the confidence is split over them (Bonferroni)


def epsilon_lower_bound(null: np.ndarray, alternative: np.ndarray, delta: float, thresholds: np.ndarray,
                        alpha: float = 0.05) -> float:
    """A (1 - alpha)-confidence lower bound on epsilon from scores of releases on D (null) and on D' (alternative).

    For the test "score > t means D'", (epsilon, delta)-DP implies TPR <= e^epsilon FPR + delta, so
    epsilon >= log((TPR - delta) / FPR). Clopper-Pearson intervals bound TPR from below and FPR from above, each at
    alpha / (2 x the number of thresholds), so the bound holds for the best threshold at once.
    """
    level = alpha / (2 * len(thresholds))
    n0, n1 = len(null), len(alternative)
    best = 0.0
    for t in thresholds:
        fp, tp = int((null > t).sum()), int((alternative > t).sum())
        fpr_high = 1.0 if fp == n0 else float(stats.beta.ppf(1 - level, fp + 1, n0 - fp))
        tpr_low = 0.0 if tp == 0 else float(stats.beta.ppf(level, tp, n1 - tp + 1))
        if tpr_low > delta:
            best = max(best, math.log((tpr_low - delta) / fpr_high))
    return best


@dataclass(frozen=True)
class AuditRow:
    name: str
    kind: str
    claimed_epsilon: float  # the accountant's epsilon for the calibrated noise
    noise_std: float  # what the releases actually drew (the calibrated std x noise_scale)
    lower_bound: float  # the audit's 95%-confidence lower bound on epsilon
    releases: int  # per neighbour

    @property
    def violated(self) -> bool:
        return self.lower_bound > self.claimed_epsilon


def _grid(center: float, std: float) -> np.ndarray:
    return center + std * np.linspace(0.0, 4.5, THRESHOLDS)


def _batched(value: torch.Tensor, direction: torch.Tensor, noise_std: float, n: int,
             gen: torch.Generator, chunk: int = 20000) -> np.ndarray:
    """Scores <release, direction> of n releases of gaussian_release(value), drawn in chunks of one call each."""
    out = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        released = gaussian_release(value.expand(b, *value.shape).clone(), noise_std, gen)
        out.append((released.reshape(b, -1) @ direction.reshape(-1)).double().numpy())
    return np.concatenate(out)


def audit_gaussian(name: str, mechanism: Mechanism, d: torch.Tensor, d_prime: torch.Tensor, delta: float, n: int,
                   noise_scale: float, gen: torch.Generator) -> AuditRow:
    """Audit one Gaussian release whose noiseless values on the two neighbours are d and d_prime."""
    diff = (d_prime - d).double()
    distance = float(diff.norm())
    if not distance <= mechanism.sensitivity * (1 + 1e-6):
        raise AssertionError(f"{name}: neighbours {distance:.6g} apart, above the stated sensitivity "
                             f"{mechanism.sensitivity:.6g}: the sensitivity bound is wrong")
    direction = (diff / distance).to(d.dtype)
    std = mechanism.noise_std * noise_scale
    null, alt = (_batched(v, direction, std, n, gen) for v in (d, d_prime))
    center = float((d.double().reshape(-1) * direction.double().reshape(-1)).sum())
    bound = epsilon_lower_bound(null, alt, delta, _grid(center, mechanism.noise_std))
    return AuditRow(name, mechanism.kind, epsilon_of([mechanism], delta), std, bound, n)


def antipodal_images(size: int = 4) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Two uint8 images (1, size, size, 1) and frequencies (size^2, 4) under which their features are antipodal:
    every frequency w has w.(b - a) = pi, so cos and sin of the projections flip sign."""
    a = np.zeros((1, size, size, 1), np.uint8)
    b = np.full((1, size, size, 1), 255, np.uint8)
    delta = torch.full((size * size,), 2.0)  # to_float maps 0 -> -1 and 255 -> 1
    w = math.pi * delta / float(delta @ delta)
    return a, b, w[:, None].repeat(1, 4)


def audit_embedding(epsilon: float, delta: float, n: int, noise_scale: float, gen: torch.Generator) -> AuditRow:
    a, b, frequencies = antipodal_images()
    other = np.full_like(a, 128)
    sigma = calibrate(lambda s: [embedding_mechanism(s)], epsilon, delta)
    d = feature_sum(np.concatenate([other, a]), frequencies)
    d_prime = feature_sum(np.concatenate([other, b]), frequencies)
    return audit_gaussian("embedding", embedding_mechanism(sigma), d, d_prime, delta, n, noise_scale, gen)


def audit_statistics(epsilon: float, delta: float, n: int, noise_scale: float,
                     gen: torch.Generator, dim: int = 4) -> list[AuditRow]:
    r = math.sqrt(dim)
    big = 10 * r
    e1, e2 = torch.eye(dim, dtype=torch.float64)[:2]
    other = torch.full((1, dim), 0.3, dtype=torch.float64)

    def calibrated(index: int) -> Mechanism:
        s = calibrate(lambda s: [statistics_mechanisms(s, r)[index]], epsilon, delta)
        return statistics_mechanisms(s, r)[index]

    def total(x):
        return clip_rows(x, r).sum(0)

    def upper(x):
        x = clip_rows(x, r)
        return torch.triu(x.T @ x)

    rows = [audit_gaussian("latent-sum", calibrated(0), total(torch.cat([other, big * e1[None]])),
                           total(torch.cat([other, -big * e1[None]])), delta, n, noise_scale, gen)]
    rows.append(audit_gaussian("latent-outer-products", calibrated(1), upper(torch.cat([other, big * e1[None]])),
                               upper(torch.cat([other, big * e2[None]])), delta, n, noise_scale, gen))
    return rows


def audit_dp_sgd(epsilon: float, delta: float, n: int, noise_scale: float, gen: torch.Generator,
                 sampling_rate: float = 0.5, max_grad_norm: float = 1.0) -> AuditRow:
    """One DP-SGD step through poisson_batch and noisy_gradient, on a canary gradient against its negative."""
    sigma = calibrate(lambda s: [dp_sgd_mechanism(s, max_grad_norm, 1, sampling_rate)], epsilon, delta)
    mechanism = dp_sgd_mechanism(sigma, max_grad_norm, 1, sampling_rate)
    e = torch.tensor([1.0, 0.0])
    scores = []
    for sign in (1.0, -1.0):
        grads = torch.stack([torch.zeros(2), sign * 10 * max_grad_norm * e])  # a bystander, then the canary
        out = np.empty(n)
        for i in range(n):
            idx = poisson_batch(2, sampling_rate, gen)
            g = noisy_gradient({"w": grads[idx]}, max_grad_norm, sigma * noise_scale, 1.0, gen)["w"]
            out[i] = float(g @ e)
        scores.append(out)
    # D holds the canary's negative, D' the canary: "score > t means D'".
    bound = epsilon_lower_bound(scores[1], scores[0], delta, _grid(0.0, mechanism.noise_std))
    return AuditRow("autoencoder-dp-sgd", mechanism.kind, epsilon_of([mechanism], delta), sigma * noise_scale,
                    bound, n)


def audit_all(epsilon: float = 2.0, delta: float = 1e-5, n: int = 100_000, n_sgd: int = 40_000,
              noise_scale: float = 1.0, seed: int = 0) -> list[AuditRow]:
    """Every mechanism a private module uses, each calibrated alone to epsilon, released n times per neighbour."""
    gen = torch.Generator().manual_seed(seed)
    return [audit_embedding(epsilon, delta, n, noise_scale, gen),
            *audit_statistics(epsilon, delta, n, noise_scale, gen),
            audit_dp_sgd(epsilon, delta, n_sgd, noise_scale, gen)]
