"""Convolutional autoencoder with a Gaussian-mixture prior on its latents (the "aegmm" family).

A two-stage generator in the spirit of Ghosh et al. 2020 ("From variational to deterministic autoencoders"):
a deterministic autoencoder learns a compact latent code, then a full-covariance Gaussian mixture is fitted
to the latents of the training images (ex-post density estimation). Sampling draws z from the mixture and
decodes it. It trains in a minute on a CPU and samples tens of thousands of images per second.
"""

import math

import torch
from torch import nn


def num_downsamples(size: int) -> int:
    """How many stride-2 stages bring a square image to at most 8 pixels (stopping at odd sizes)."""
    n = 0
    while size > 8 and size % 2 == 0:
        size //= 2
        n += 1
    return n


class AutoEncoder(nn.Module):
    """Strided-conv encoder to a flat latent of latent_dim and a mirrored transposed-conv decoder.

    Kept plain (no normalisation, no full-resolution residual blocks) because it must train in about a
    minute on two CPU cores; widths double per downsampling.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: int = 32, latent_dim: int = 32):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        n = num_downsamples(h)
        widths = [channels * 2**i for i in range(n + 1)]
        self.bottom = (widths[-1], h // 2**n, w // 2**n)
        flat = math.prod(self.bottom)

        enc = [nn.Conv2d(c, widths[0], 3, padding=1), nn.SiLU()]
        for i in range(n):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        enc += [nn.Conv2d(widths[-1], widths[-1], 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(flat, latent_dim)]
        self.encoder = nn.Sequential(*enc)

        dec = [nn.Linear(latent_dim, flat), nn.Unflatten(1, self.bottom), nn.SiLU(),
               nn.Conv2d(widths[-1], widths[-1], 3, padding=1), nn.SiLU()]
        for i in reversed(range(n)):
            dec += [nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1), nn.SiLU()]
        dec += [nn.Conv2d(widths[0], c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x):  # x: (B, C, H, W) in [-1, 1]
        return self.decoder(self.encoder(x))


def fit_mixture(latents: torch.Tensor, num_components: int, seed: int) -> dict[str, torch.Tensor]:
    """Fit a full-covariance Gaussian mixture to latents (N, D); returns tensors that define it."""
    from sklearn.mixture import GaussianMixture

    z = latents.double().numpy()
    if len(z) < 2:
        # One image: a single narrow Gaussian around its latent (EM needs at least two points).
        d = z.shape[1]
        return {"mixture.log_weights": torch.zeros(1), "mixture.means": torch.from_numpy(z[:1]).float(),
                "mixture.scale_tril": (0.01 * torch.eye(d)).unsqueeze(0)}
    k = max(1, min(num_components, len(z) // 4))  # a component needs a handful of points to estimate its covariance
    # reg_covar in units of the latent variance keeps covariances positive definite for small classes.
    gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4 * float(z.var()) + 1e-8,
                          max_iter=200, n_init=1, init_params="kmeans", random_state=seed % 2**32)
    gmm.fit(z)
    return {
        "mixture.log_weights": torch.from_numpy(gmm.weights_).log().float(),
        "mixture.means": torch.from_numpy(gmm.means_).float(),
        "mixture.scale_tril": torch.linalg.cholesky(torch.from_numpy(gmm.covariances_)).float(),
    }


def sample_latents(mixture: dict[str, torch.Tensor], noise: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw latents from the mixture given standard-normal noise (B, D) and uniforms (B,) for the component."""
    weights = mixture["mixture.log_weights"].double().softmax(0)
    cdf = weights.cumsum(0)
    comp = torch.searchsorted(cdf, uniform.double().clamp(max=float(cdf[-1]) - 1e-12))
    mean = mixture["mixture.means"][comp]  # (B, D)
    tril = mixture["mixture.scale_tril"][comp]  # (B, D, D)
    return mean + (tril @ noise.unsqueeze(-1)).squeeze(-1)
