"""Renyi-DP accounting for the mechanisms a private module uses, and conversion to (epsilon, delta).

A module composes a subsampled Gaussian mechanism (DP-SGD, Abadi et al. 2016) with a few plain Gaussian
mechanisms (noisy sufficient statistics). Renyi differential privacy (Mironov 2017) composes them by adding
their RDP curves order by order; the sum is converted to (epsilon, delta) once, at the end.

Adjacency is add-or-remove one image, the one the sampled Gaussian analysis (Mironov, Talwar, Zhang 2019)
is stated for. Every function here is plain float math: no torch, no data.
"""

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from fedfactory.errors import FedFactoryError

# The orders TF-Privacy and Opacus evaluate: fractional orders near 1 matter for small epsilon, large ones for
# large epsilon; the smallest converted epsilon over all of them is reported.
DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])
ACCOUNTANT = "rdp"


class PrivacyBudgetError(FedFactoryError, ValueError):
    """A privacy budget that cannot be met (or parameters that define no mechanism)."""


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for an integer order: the binomial expansion of Sec. 3.3 of Mironov, Talwar, Zhang 2019."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float, chunk: int = 256) -> float:
    """log A_alpha for a fractional order: the two convergent series of Sec. 3.3 of Mironov, Talwar, Zhang 2019,
    split at z0 where the two Gaussians' densities, weighted by the sampling, cross.

    Summed in chunks of terms until the first term of both series falls below exp(-30), as TF-Privacy does;
    binom(alpha, i) changes sign past alpha, so the terms carry signs through the log-sum-exp.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    logs, signs = [], []
    for start in range(0, 1 << 20, chunk):
        i = np.arange(start, start + chunk, dtype=np.float64)
        j = alpha - i
        log_coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)  # log |binom|
        sign = special.gammasgn(j + 1)
        log_e0 = math.log(0.5) + math.log(2) + special.log_ndtr(-(i - z0) / sigma)  # 1/2 erfc((i - z0)/(sqrt2 s))
        log_e1 = math.log(0.5) + math.log(2) + special.log_ndtr(-(z0 - j) / sigma)
        log_s0 = log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2) + log_e1
        small = np.flatnonzero(np.maximum(log_s0, log_s1) < -30)
        stop = small[0] + 1 if len(small) else chunk
        logs += [log_s0[:stop], log_s1[:stop]]
        signs += [sign[:stop], sign[:stop]]
        if len(small):
            break
    return float(special.logsumexp(np.concatenate(logs), b=np.concatenate(signs)))


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of the Gaussian mechanism with noise std = noise_multiplier x L2 sensitivity: alpha / (2 sigma^2)
    (Prop. 7 of Mironov 2017)."""
    return np.asarray(orders, dtype=np.float64) / (2 * noise_multiplier**2)


def sampled_gaussian_rdp(sampling_rate: float, noise_multiplier: float, steps: int,
                         orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP, per order, of `steps` compositions of the Poisson-subsampled Gaussian mechanism.

    Each step includes every record independently with probability sampling_rate and adds Gaussian noise of
    std noise_multiplier x clipping norm to the sum of clipped per-record vectors (Mironov, Talwar, Zhang 2019).
    """
    q, sigma = sampling_rate, noise_multiplier
    if not 0 <= q <= 1:
        raise PrivacyBudgetError(f"sampling rate {q} must lie in [0, 1]")
    if sigma <= 0:
        raise PrivacyBudgetError(f"noise multiplier {sigma} must be > 0")
    if q == 0:
        return np.zeros(len(orders))
    if q == 1:
        return steps * gaussian_rdp(sigma, orders)
    per_step = []
    for alpha in orders:
        if alpha <= 1:
            raise PrivacyBudgetError(f"RDP order {alpha} must be > 1")
        log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
        per_step.append(log_a / (alpha - 1))
    return steps * np.asarray(per_step)


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS,
                   conversion: str = "balle") -> tuple[float, float]:
    """(epsilon, best order) of an RDP curve at delta, the smallest over the orders.

    "balle": epsilon = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)
    (Balle et al. 2020, Thm. 21; Canonne, Kamath, Steinke 2020, Prop. 12), tighter than
    "mironov": epsilon = rdp + log(1 / delta) / (alpha - 1) (Prop. 3 of Mironov 2017), which older
    TF-Privacy versions report and is kept to compare with their published numbers.
    """
    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"delta={delta} must lie in (0, 1)")
    a = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    if conversion == "mironov":
        eps = rdp + math.log(1 / delta) / (a - 1)
    elif conversion == "balle":
        eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    else:
        raise ValueError(f"unknown conversion {conversion!r}; valid: balle, mironov")
    eps = np.where(np.isfinite(eps), eps, np.inf)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


def noise_for_budget(epsilon: float, delta: float, sampling_rate: float, steps: int,
                     extra_rdp: np.ndarray | None = None, orders: Sequence[float] = DEFAULT_ORDERS,
                     max_noise: float = 1e3, tolerance: float = 1e-3) -> float:
    """The smallest DP-SGD noise multiplier (to a relative tolerance) whose `steps` sampled Gaussian steps,
    composed with extra_rdp (the other mechanisms' RDP curve), stay within (epsilon, delta).

    Epsilon falls monotonically as the noise grows, so a bisection on the log of sigma finds it. Raises
    PrivacyBudgetError when even max_noise does not meet the budget (the other mechanisms alone may spend it).
    """
    extra = np.zeros(len(orders)) if extra_rdp is None else np.asarray(extra_rdp, dtype=np.float64)

    def spent(sigma: float) -> float:
        return rdp_to_epsilon(sampled_gaussian_rdp(sampling_rate, sigma, steps, orders) + extra, delta, orders)[0]

    if spent(max_noise) > epsilon:
        raise PrivacyBudgetError(f"epsilon={epsilon} at delta={delta} cannot be met by {steps} steps at sampling "
                                 f"rate {sampling_rate:.4g} even with noise multiplier {max_noise}")
    low, high = 1e-2, max_noise
    if spent(low) <= epsilon:
        return low
    while high / low > 1 + tolerance:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high


def gaussian_noise_for_epsilon(epsilon: float, delta: float, releases: int = 1,
                               orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The noise multiplier of `releases` plain Gaussian mechanisms that together spend (epsilon, delta)."""
    return noise_for_budget(epsilon, delta, 1.0, releases, orders=orders)
