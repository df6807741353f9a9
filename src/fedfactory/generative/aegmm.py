"""The "aegmm" family: a convolutional autoencoder with a Gaussian-mixture prior on its latents.

A two-stage generator in the spirit of Ghosh et al. 2020 ("From variational to deterministic autoencoders"):
a deterministic autoencoder learns a compact latent code, then a full-covariance Gaussian mixture is fitted
to the latents of the training images (ex-post density estimation). Sampling draws z from the mixture and
decodes it. It trains in a minute on a CPU and samples tens of thousands of images per second.

An L1 autoencoder regresses to the median and loses fine texture, which a classifier trained on its samples
then misses on real images. Two things put texture back: an optional adversarial term from a small patch
discriminator on the decoder (as in VQGAN, Esser et al. 2021, keeping the reconstruction loss and the
mixture prior), and a low-rank Gaussian model of the reconstruction residual added to every sample.
This file owns the networks, the losses, the fits that follow training and sampling; train.py owns the loop.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedfactory.data.images import to_float, to_uint8
from fedfactory.privacy.dp import clip_rows, noisy_moments, random_features, secret_generator
from fedfactory.seeding import derive_seed, torch_generator


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


def pick_components(mixture: dict[str, torch.Tensor], uniform: torch.Tensor) -> torch.Tensor:
    """The mixture component (B,) that uniforms (B,) in [0, 1) pick, by inverting the weights' CDF."""
    cdf = mixture["mixture.log_weights"].double().softmax(0).cumsum(0)
    return torch.searchsorted(cdf, uniform.double().clamp(max=float(cdf[-1]) - 1e-12))


def sample_latents(mixture: dict[str, torch.Tensor], noise: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw latents from the mixture given standard-normal noise (B, D) and uniforms (B,) for the component."""
    comp = pick_components(mixture, uniform)
    mean = mixture["mixture.means"][comp]  # (B, D)
    tril = mixture["mixture.scale_tril"][comp]  # (B, D, D)
    return mean + (tril @ noise.unsqueeze(-1)).squeeze(-1)


class PatchDiscriminator(nn.Module):
    """A small convolutional critic that scores overlapping patches (about 12 pixels wide) as real or decoded.

    Spectrally normalised (Miyato et al. 2018) so its gradients stay bounded for the decoder; trained only
    by the client and never shipped.
    """

    def __init__(self, image_channels: int, channels: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(image_channels, channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(channels, 2 * channels, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * channels, 1, 3, padding=1)),
        )

    def forward(self, x):  # (B, C, H, W) -> patch logits (B, 1, H/2, W/2)
        return self.net(x)


def mix_latents(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Convex combinations of random pairs of latents in the batch (as in ACAI, Berthelot et al. 2019).

    Mixture samples fall between training latents; asking the decoder to make those look real too is what
    carries the adversarial term from reconstructions over to samples.
    """
    b = z.shape[0]
    alpha = torch.rand(b, 1, generator=gen).to(z.device)
    partner = torch.randperm(b, generator=gen).to(z.device)
    return alpha * z + (1 - alpha) * z[partner]


def autoencoder_loss(model: AutoEncoder, x: torch.Tensor, disc: PatchDiscriminator | None, weight: float,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L1 reconstruction plus, when disc is given, weight x the non-saturating GAN loss of the decoded images.

    Returns (loss, fakes): the decoded images the discriminator should learn to reject (None without disc).
    """
    z = model.encoder(x)
    recon = model.decoder(z)
    loss = (recon - x).abs().mean()
    if disc is None:
        return loss, None
    fakes = torch.cat([recon, model.decoder(mix_latents(z, gen))])
    return loss + weight * F.softplus(-disc(fakes)).mean(), fakes


def discriminator_loss(disc: PatchDiscriminator, real: torch.Tensor, fakes: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the critic (Goodfellow et al. 2014): real patches up, decoded patches down."""
    return F.softplus(-disc(real)).mean() + F.softplus(disc(fakes.detach())).mean()


BLUR_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # pixels


@torch.no_grad()
def measure_blur(images: np.ndarray, recon: torch.Tensor, max_images: int = 500) -> float:
    """The Gaussian blur (sigma in pixels, from BLUR_GRID) that best maps real images to their reconstructions.

    Measured by the client on its own data and sent in the manifest, so the server can match the
    classifier's input sharpness to the generator's without seeing any real image.
    """
    from fedfactory.classifier import GaussianBlur

    x = torch.from_numpy(to_float(images[:max_images]))
    errors = [((GaussianBlur(x.shape[1], s)(x) - recon[:max_images]) ** 2).mean().item() for s in BLUR_GRID]
    return BLUR_GRID[int(np.argmin(errors))]


EXACT_RESIDUAL_BYTES = 256 << 20  # above this, the residual matrix is never materialised


@torch.no_grad()
def fit_residual(images: np.ndarray, reconstruct, rank: int, seed: int, chunk: int = 1000,
                 exact_bytes: int = EXACT_RESIDUAL_BYTES, power_iterations: int = 3) -> dict[str, torch.Tensor]:
    """Gaussian model of what the decoder misses: mean and top principal directions of x - D(E(x)).

    A deterministic decoder regresses to the mean and blurs fine texture; adding back residual noise drawn
    from this low-rank Gaussian (probabilistic PCA without isotropic noise) restores some of it.
    reconstruct(start, stop): the decoder's reconstructions of images[start:stop], (b, C, H, W) float32.

    A class whose residual matrix (N x pixels, float64) fits in exact_bytes gets an exact SVD. A larger one
    (an ISIC-size class: 10,000 x 3x128x128 would need 3.9 GB) gets a randomized SVD (Halko, Martinsson and
    Tropp 2011, Alg. 4.4 with power iterations) that streams chunks of rows, so memory stays at
    O((N + pixels) x (rank + 10)); its test subspace is drawn from `seed`, so the fit stays deterministic.
    """
    n = len(images)
    shape = (images.shape[3], images.shape[1], images.shape[2])
    dim = math.prod(shape)
    starts = range(0, n, chunk)

    def rows(start: int) -> torch.Tensor:
        stop = min(start + chunk, n)
        return (torch.from_numpy(to_float(images[start:stop])) - reconstruct(start, stop)).flatten(1).double()

    if n * dim * 8 <= exact_bytes:
        r = torch.cat([rows(i) for i in starts])
        mean = r.mean(0)
        _, s, vh = torch.linalg.svd(r - mean, full_matrices=False)
    else:
        mean = sum(rows(i).sum(0) for i in starts) / n

        def times(q: torch.Tensor) -> torch.Tensor:  # (R - mean) @ q, (N, l)
            return torch.cat([rows(i) @ q for i in starts]) - mean @ q

        def transpose_times(q: torch.Tensor) -> torch.Tensor:  # (R - mean)^T @ q, (dim, l)
            return sum(rows(i).T @ q[i:i + chunk] for i in starts) - torch.outer(mean, q.sum(0))

        gen = torch.Generator().manual_seed(seed % 2**63)
        q = torch.linalg.qr(times(torch.randn(dim, rank + 10, generator=gen, dtype=torch.float64))).Q
        for _ in range(power_iterations):
            q = torch.linalg.qr(times(torch.linalg.qr(transpose_times(q)).Q)).Q
        _, s, vh = torch.linalg.svd(transpose_times(q).T, full_matrices=False)  # Q^T (R - mean) = U S V^T
    k = min(rank, vh.shape[0])
    basis = torch.zeros(rank, dim, dtype=torch.float64)
    basis[:k] = vh[:k] * (s[:k, None] / math.sqrt(max(n - 1, 1)))
    return {"residual.mean": mean.float().reshape(shape).contiguous(),
            "residual.basis": basis.float().reshape(rank, *shape).contiguous()}


def component_of(z: torch.Tensor, mixture: dict[str, torch.Tensor]) -> torch.Tensor:
    """The component with the highest posterior for each latent (N, D): argmax_k log w_k + log N(z; mu_k, L_k L_k^T)."""
    means, tril = mixture["mixture.means"].double(), mixture["mixture.scale_tril"].double()
    best = torch.full((len(z),), -math.inf, dtype=torch.float64)
    comp = torch.zeros(len(z), dtype=torch.int64)
    for k in range(len(means)):  # one component at a time: (N, D) memory, not (N, K, D)
        sol = torch.linalg.solve_triangular(tril[k], (z.double() - means[k]).T, upper=False)
        score = (mixture["mixture.log_weights"][k].double() - tril[k].diagonal().log().sum()
                 - 0.5 * sol.pow(2).sum(0))
        comp = torch.where(score > best, k, comp)
        best = torch.maximum(score, best)
    return comp


IMAGES_PER_RESIDUAL_DIRECTION = 4  # a component's own residual model needs this many images per direction


def fit_component_residuals(images: np.ndarray, reconstruct, comp: torch.Tensor, num_components: int, rank: int,
                            seed: int) -> dict[str, torch.Tensor]:
    """fit_residual once per mixture component, on the images whose latent it explains best (component_of).

    One residual model for the whole class adds the same texture directions to a T-shirt and to a tank top; a
    component's own directions follow what its garments miss. reconstruct(rows): the decoder's reconstructions of
    images[rows]. A component explaining fewer than IMAGES_PER_RESIDUAL_DIRECTION x rank images takes the class's
    one model instead: rank directions fitted to a handful of residuals would span those images' own details, which
    samples would then replay. Shapes: mean (K, C, H, W), basis (K, rank, C, H, W).
    """
    def fit(rows: np.ndarray, key) -> dict[str, torch.Tensor]:
        return fit_residual(images[rows], lambda a, b: reconstruct(rows[a:b]), rank, derive_seed(seed, key))

    members = [torch.nonzero(comp == k).flatten().numpy() for k in range(num_components)]
    small = [len(rows) < IMAGES_PER_RESIDUAL_DIRECTION * rank for rows in members]
    whole = fit(np.arange(len(images)), "class") if any(small) else None
    fits = [whole if too_few else fit(rows, k) for k, (rows, too_few) in enumerate(zip(members, small, strict=True))]
    return {"residual.mean": torch.stack([f["residual.mean"] for f in fits]).contiguous(),
            "residual.basis": torch.stack([f["residual.basis"] for f in fits]).contiguous()}


@torch.no_grad()
def fit_densities(ema: AutoEncoder, images: np.ndarray, mixture_components: int, residual_rank: int,
                  seed: int, residual_per_component: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """After training: the shipped tensors (decoder, latent mixture, residual model) and the measured blur.

    Ex-post density estimation: the mixture is fitted to the EMA encoder's latents of every training image.
    Reconstructions are decoded per chunk of 1000 when needed, never held for the whole class (a
    10,000-image class of 3x128x128 would take 2 GB as float32).
    """
    z = torch.cat([ema.encoder(torch.from_numpy(to_float(images[i:i + 1000]))) for i in range(0, len(images), 1000)])
    mixture = fit_mixture(z, mixture_components, derive_seed(seed, "mixture"))
    tensors = {f"decoder.{k}": v.contiguous() for k, v in ema.decoder.state_dict().items()} | mixture

    def reconstruct(start: int, stop: int) -> torch.Tensor:
        return ema.decoder(z[start:stop])

    if residual_rank and residual_per_component:
        tensors |= fit_component_residuals(images, lambda rows: ema.decoder(z[rows]), component_of(z, mixture),
                                           len(mixture["mixture.means"]), residual_rank,
                                           derive_seed(seed, "residual"))
    elif residual_rank:
        tensors |= fit_residual(images, reconstruct, residual_rank, derive_seed(seed, "residual"))
    fields = {"blur_sigma": measure_blur(images, reconstruct(0, min(len(images), 1000))),
              "mixture_size": int(mixture["mixture.means"].shape[0])}
    return tensors, fields


# A private module cannot measure its blur on its images; it ships this fixed value instead: the blur non-private
# Fashion-MNIST modules measured (0.75 to 1.0 pixels, mean 0.775: benchmarks/runs, classifier_input_blur), a
# public design choice rather than a statistic of the site's images.
PRIVATE_BLUR_SIGMA = 0.75


def per_image_gradients(model: AutoEncoder, x: torch.Tensor, radius: float) -> tuple[dict[str, torch.Tensor],
                                                                                      torch.Tensor]:
    """Each image's gradient of its own L1 reconstruction loss, (B, *parameter shape) per parameter, and the losses.

    The latent is clipped to norm radius inside the forward pass, so the decoder learns on latents that the
    private latent model (clipped to the same radius) describes. torch.func's vmap over grad gives per-sample
    gradients in one pass, as DP-SGD needs (Abadi et al. 2016).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(p: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:  # image (C, H, W)
        enc = {k.removeprefix("encoder."): v for k, v in p.items() if k.startswith("encoder.")}
        dec = {k.removeprefix("decoder."): v for k, v in p.items() if k.startswith("decoder.")}
        z = clip_rows(functional_call(model.encoder, enc, (image[None],)), radius)
        return (functional_call(model.decoder, dec, (z,)) - image[None]).abs().mean()

    grads = vmap(grad(loss_of_one), in_dims=(None, 0))(params, x)
    with torch.no_grad():
        losses = vmap(loss_of_one, in_dims=(None, 0))(params, x)
    return grads, losses


@torch.no_grad()
def fit_private_densities(ema: AutoEncoder, images: np.ndarray, radius: float,
                          noise_multiplier: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The shipped tensors of a private module: the decoder (DP-SGD) and one Gaussian on the latents (noisy moments).

    A mixture fitted by EM would touch the images once per iteration; a single Gaussian from two noisy moment
    releases costs a fixed, small share of the budget. No residual model; the blur is PRIVATE_BLUR_SIGMA.
    """
    z = torch.cat([ema.encoder(torch.from_numpy(to_float(images[i:i + 1000]))) for i in range(0, len(images), 1000)])
    mean, cov = noisy_moments(z, radius, noise_multiplier, secret_generator())
    tensors = {f"decoder.{k}": v.contiguous() for k, v in ema.decoder.state_dict().items()}
    tensors |= {"mixture.log_weights": torch.zeros(1), "mixture.means": mean[None].float(),
                "mixture.scale_tril": torch.linalg.cholesky(cov)[None].float().contiguous()}
    return tensors, {"blur_sigma": PRIVATE_BLUR_SIGMA, "mixture_size": 1}


def fit_embedding_decoder(decoder: nn.Module, embedding: torch.Tensor, frequencies: torch.Tensor, latent_dim: int,
                          steps: int, batch_size: int, lr: float, lr_at, seed: int) -> float:
    """Train the decoder so that decoded N(0, I) latents have the private embedding: minimise the squared
    distance of mean embeddings, an MMD with the random-feature kernel (DP-MERF, Harder et al. 2021, Eq. 8).

    It touches only the released embedding, never an image: post-processing, free of privacy cost.
    """
    gen = torch_generator(seed, "latents")
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        z = torch.randn(batch_size, latent_dim, generator=gen)
        loss = (random_features(decoder(z), frequencies).mean(0) - embedding).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.item())


def standard_normal_latents(latent_dim: int) -> dict[str, torch.Tensor]:
    """The latent model of a decoder trained on N(0, I) latents: one standard Gaussian, fixed without data."""
    return {"mixture.log_weights": torch.zeros(1), "mixture.means": torch.zeros(1, latent_dim),
            "mixture.scale_tril": torch.eye(latent_dim)[None].contiguous()}


@torch.no_grad()
def decode_samples(decoder: nn.Module, tensors: dict[str, torch.Tensor], noise: torch.Tensor,
                   latent_dim: int, residual_rank: int) -> np.ndarray:
    """uint8 images (B, H, W, C) from standard-normal noise (B, latent_dim + 1 + residual_rank), float64.

    Coordinates: latent_dim for the latent, one picking the component through the normal CDF, the rest
    for the residual; so image i depends only on its own noise.
    """
    d, r = latent_dim, residual_rank
    mixture = {k: v.double() for k, v in tensors.items() if k.startswith("mixture.")}
    uniform = 0.5 * (1 + torch.erf(noise[:, d] / math.sqrt(2)))
    device = next(decoder.parameters()).device
    x = decoder(sample_latents(mixture, noise[:, :d], uniform).float().to(device)).cpu()
    if r:
        x = add_residual(x, tensors, noise[:, d + 1:].float(), pick_components(mixture, uniform))
    return to_uint8(x.clamp(-1, 1).numpy())


def add_residual(x: torch.Tensor, tensors: dict[str, torch.Tensor], noise: torch.Tensor,
                 components: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded images (B, C, H, W) plus one draw of the residual model per image, from normal noise (B, r).

    A per-component model (basis (K, r, C, H, W): fit_component_residuals) draws from each image's own mixture
    component, components (B,); the class's single model (basis (r, C, H, W)) ignores them.
    """
    basis, mean = tensors["residual.basis"], tensors["residual.mean"]
    if basis.dim() == x.dim():
        return x + mean + (noise @ basis.flatten(1)).reshape(x.shape)
    picked = basis.flatten(2)[components]  # (B, r, C*H*W)
    return x + mean[components] + torch.einsum("br,brp->bp", noise, picked).reshape(x.shape)
