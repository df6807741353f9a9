"""Train one generative module on the images of one (client, class) and sample from it.

Two families share this file's loop shape:
- "aegmm": autoencoder + Gaussian mixture on its latents (autoencoder.py); the module ships only the decoder
  and the mixture, never the encoder.
- "edm": pixel-space EDM diffusion with a small U-Net (unet.py, edm.py), EMA weights, Heun sampling.
"""

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from fedfactory.config import GeneratorConfig
from fedfactory.data.datasets import to_float, to_uint8
from fedfactory.generative.autoencoder import AutoEncoder, fit_mixture, sample_latents
from fedfactory.generative.edm import EDMParams, edm_loss, heun_sample
from fedfactory.generative.unet import UNet
from fedfactory.seeding import derive_seed, torch_generator


def network_config(cfg: GeneratorConfig, image_shape: tuple[int, int, int]) -> dict:
    """The part of the generator config that fixes the module's tensors (recorded in its manifest)."""
    net = {"channels": cfg.channels, "image_channels": image_shape[0]}
    if cfg.family == "aegmm":
        net |= {"latent_dim": cfg.latent_dim, "mixture_components": cfg.mixture_components,
                "residual_rank": cfg.residual_rank}
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
        if r:
            spec |= {"residual.mean": (shape, "float32"), "residual.basis": ((r, *shape), "float32")}
        return spec
    return {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}


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


def train_module(images: np.ndarray, cfg: GeneratorConfig, seed: int, device: torch.device,
                 desc: str = "module", progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one module from scratch on uint8 images (N, H, W, C); returns (tensors, manifest fields)."""
    if len(images) == 0:
        raise ValueError(f"{desc}: no images to train on")
    image_shape = (images.shape[3], images.shape[1], images.shape[2])
    net_cfg = network_config(cfg, image_shape)
    gen = torch_generator(seed)
    torch.manual_seed(derive_seed(seed, "init"))  # parameter init is the only use of the global generator
    model = build_network(cfg.family, image_shape, net_cfg).to(device)
    ema = build_network(cfg.family, image_shape, net_cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    params = EDMParams()
    data = torch.from_numpy(images)  # stays uint8; batches are scaled on the fly
    use_amp = device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        # Draw a batch (with replacement, so tiny classes still give full batches).
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x = torch.from_numpy(to_float(data[idx].numpy())).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr)
        # Loss: L1 reconstruction for the autoencoder (sharper than L2), Eq. 8 of EDM for diffusion.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if cfg.family == "aegmm":
                loss = (model(x) - x).abs().mean()
            else:
                loss = edm_loss(model, x, params, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, step)
        if progress and step % 50 == 0:
            img_s = (step + 1) * cfg.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
    bar.close()
    ema = ema.cpu().eval()
    training = {"steps": cfg.steps, "seed": seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "final_loss": float(loss.item())}
    if cfg.family == "aegmm":
        # Ex-post density estimation: fit the mixture to the EMA encoder's latents of every training image.
        # Reconstructions are decoded per chunk of 1000 when needed, never held for the whole class (a
        # 10,000-image class of 3x128x128 would take 2 GB as float32).
        with torch.no_grad():
            z = torch.cat([ema.encoder(torch.from_numpy(to_float(images[i:i + 1000])))
                           for i in range(0, len(images), 1000)])
        mixture = fit_mixture(z, cfg.mixture_components, derive_seed(seed, "mixture"))
        tensors = {f"decoder.{k}": v.contiguous() for k, v in ema.decoder.state_dict().items()} | mixture

        @torch.no_grad()
        def reconstruct(start: int, stop: int) -> torch.Tensor:
            return ema.decoder(z[start:stop])

        if cfg.residual_rank:
            tensors |= fit_residual(images, reconstruct, cfg.residual_rank, derive_seed(seed, "residual"))
        training["blur_sigma"] = measure_blur(images, reconstruct(0, min(len(images), 1000)))
        training["mixture_size"] = int(mixture["mixture.means"].shape[0])
        diffusion = {}
    else:
        tensors = {k: v.contiguous() for k, v in ema.state_dict().items()}
        diffusion = params.to_dict() | {"sampler": "heun", "sampler_steps": cfg.sampler_steps}
    return tensors, {"family": cfg.family, "image_shape": list(image_shape), "network": net_cfg,
                     "diffusion": diffusion, "training": training}


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
        mixture = {k: v.double() for k, v in tensors.items() if k.startswith("mixture.")}
        d, r = net_cfg["latent_dim"], net_cfg.get("residual_rank", 0)
        for start in range(indices.start, indices.stop, batch_size):
            idx = range(start, min(start + batch_size, indices.stop))
            noise = torch.stack([image_noise(root_seed, mid, i, (d + 1 + r,)) for i in idx]).double()
            # Coordinates: d for the latent, one picking the component through the normal CDF, r for the residual.
            uniform = 0.5 * (1 + torch.erf(noise[:, d] / math.sqrt(2)))
            z = sample_latents(mixture, noise[:, :d], uniform).float().to(device)
            x = decoder(z).cpu()
            if r:
                basis = tensors["residual.basis"].flatten(1)  # (r, C*H*W)
                x = x + tensors["residual.mean"] + (noise[:, d + 1:].float() @ basis).reshape(x.shape)
            out.append(to_uint8(x.clamp(-1, 1).numpy()))
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
