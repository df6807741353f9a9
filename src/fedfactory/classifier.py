"""The classifier every method trains: a small VGG-style CNN, its training loop and its predictions.

Server mode, the centralized reference and the baselines all call these functions, so a comparison
differs only in the data the classifier sees.
"""

import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedfactory.config import ClassifierConfig
from fedfactory.data.images import to_float
from fedfactory.errors import FedFactoryError
from fedfactory.progress import progress as progress_bar


class TrainingError(FedFactoryError, ValueError):
    """A classifier cannot be trained or diverged: too few images, a NaN or Inf loss, non-finite weights."""


def gaussian_kernels(sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (n, 2*radius + 1) for sigmas (n,) in pixels; sigma 0 is the identity."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].float().clamp(min=1e-6) ** 2))
    return k / k.sum(1, keepdim=True)


class GaussianBlur(nn.Module):
    """A fixed (not trained) separable Gaussian low-pass filter, applied to every input alike.

    Generated images are smoother than real ones; a classifier trained on them reads fine texture in real
    test images as evidence it never saw. Low-passing every input (training and test, synthetic and real)
    at the blur level the clients measured for their decoders removes that mismatch without looking at
    the test set.
    """

    def __init__(self, channels: int, sigma: float, radius: int = 2):
        super().__init__()
        k = gaussian_kernels(torch.tensor([float(sigma)]), radius)[0]
        # Persistent, so a saved classifier carries its input filter and loads without the run's metrics.
        self.register_buffer("kernel", k.repeat(channels, 1, 1, 1))  # (C, 1, 1, 2r+1)
        self.channels, self.radius = channels, radius

    def forward(self, x):
        r, c = self.radius, self.channels
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), self.kernel, groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), self.kernel.transpose(2, 3), groups=c)


def build_classifier(image_channels: int, num_classes: int, width: int = 32, input_blur: float = 0.0,
                     norm: str = "batch") -> nn.Module:
    """[Fixed Gaussian blur], two conv-conv-pool stages, a conv, global average pooling and a linear head.

    norm: "batch" (BatchNorm) or "group" (GroupNorm with up to 8 groups, no running statistics).
    """
    if norm not in ("batch", "group"):
        raise ValueError(f"norm={norm!r}: valid values are batch, group")

    def conv(cin, cout):
        layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(math.gcd(8, cout), cout)
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True)]

    w = width
    blur = [GaussianBlur(image_channels, input_blur)] if input_blur > 0 else []
    return nn.Sequential(
        *blur,
        *conv(image_channels, w), *conv(w, w), nn.MaxPool2d(2),
        *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
        *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def random_blur(x: torch.Tensor, gen: torch.Generator, max_sigma: float = 1.5, radius: int = 2) -> torch.Tensor:
    """Blur each image with its own Gaussian, sigma uniform in [0, max_sigma] pixels (replicate padding)."""
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=gen) * max_sigma
    k = gaussian_kernels(sigma, radius).repeat_interleave(c, 0).to(x.device)  # (b*c, 2r+1): one kernel per image
    # Every (image, channel) plane becomes a group of a grouped convolution, so each gets its own kernel.
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, kind: str, gen: torch.Generator, noise_std: float = 0.2) -> torch.Tensor:
    """Apply the augmentations named in kind ("crop+flip", ...) to a float batch in [-1, 1], drawn from gen.

    flip: random horizontal flips; crop: random 2-pixel translations (zero padding); blur: a random Gaussian
    blur per image; noise: Gaussian pixel noise with a standard deviation uniform in [0, noise_std] per image.
    The last two teach a classifier trained on smooth synthetic images to ignore the high frequencies that
    separate them from real ones (the texture gap) instead of reading them as evidence.
    """
    b = x.shape[0]
    parts = kind.split("+")
    if "flip" in parts:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    if "crop" in parts:
        pad = 2
        h, w = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if "blur" in parts:
        x = random_blur(x, gen)
    if "noise" in parts:
        std = torch.rand(b, 1, 1, 1, generator=gen) * noise_std
        x = x + std.to(x.device) * torch.randn(x.shape, generator=gen).to(x.device)
    return x


def mix_batch(x: torch.Tensor, kind: str, alpha: float, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed batch, partner index, lambda): every image mixed with the image at partner[i], the loss then
    lambda * CE(y) + (1 - lambda) * CE(y[partner]).

    mixup (Zhang et al. 2018): x' = lambda x + (1 - lambda) x[partner]. cutmix (Yun et al. 2019): a box of area
    (1 - lambda) of the image, centred uniformly and clipped at the borders, comes from the partner; lambda is then
    the share of pixels left, so the labels weigh what the image shows. lambda ~ Beta(alpha, alpha), one per batch.
    """
    b, _, h, w = x.shape
    # Beta(a, a) as G1 / (G1 + G2) of two Gamma(a) draws: torch's Beta sampler takes no Generator.
    g = torch._standard_gamma(torch.full((2,), float(alpha)), generator=gen)
    lam = float(g[0] / g.sum())
    partner = torch.randperm(b, generator=gen).to(x.device)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[partner], partner, lam
    if kind != "cutmix":
        raise ValueError(f"mix={kind!r}: valid values are mixup, cutmix")
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = (int(v) for v in torch.randint(0, h, (1,), generator=gen).tolist() +
              torch.randint(0, w, (1,), generator=gen).tolist())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
    return x, partner, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig,
                     seed: int, device: torch.device, desc: str = "classifier", progress: bool = True,
                     input_blur: float = 0.0) -> nn.Module:
    """Train from scratch on uint8 images (N, H, W, C) with AdamW and a one-cycle schedule."""
    if len(images) < cfg.batch_size:
        raise TrainingError(f"{desc}: {len(images)} training images, fewer than classifier.batch_size="
                            f"{cfg.batch_size}; lower classifier.batch_size or train on more images")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init
    model = build_classifier(images.shape[3], num_classes, cfg.width, input_blur, cfg.norm).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(images) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    y_all = torch.from_numpy(labels.astype(np.int64))
    use_amp = device.type == "cuda"
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        bar = progress_bar(range(steps_per_epoch), f"{desc} epoch {epoch + 1}/{cfg.epochs}", "batch", progress)
        for i in bar:
            # Scale one uint8 batch to [-1, 1] float; the synthetic set itself stays uint8.
            b = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = torch.from_numpy(to_float(images[b.numpy()]))
            x = augment(x, cfg.augment, gen, cfg.noise_std).to(device) if cfg.augment != "none" else x.to(device)
            y = y_all[b].to(device)
            if cfg.mix != "none":
                x, partner, lam = mix_batch(x, cfg.mix, cfg.mix_alpha, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                if cfg.mix != "none":
                    loss = lam * loss + (1 - lam) * F.cross_entropy(out, y[partner],
                                                                    label_smoothing=cfg.label_smoothing)
            # Stop at the first bad step: a NaN loss turns every weight NaN, and the epochs after it are wasted.
            # One scalar per step; on CUDA the check costs a host-device sync per step.
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1}/{cfg.epochs}, step "
                                    f"{i + 1}/{steps_per_epoch}; lower classifier.lr (now {cfg.lr}) or check the "
                                    "training images")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                seen = (epoch * steps_per_epoch + i + 1) * cfg.batch_size
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
    return model.eval()


def classifier_from_state(state: dict[str, torch.Tensor], image_channels: int, num_classes: int,
                          cfg: ClassifierConfig, input_blur: float = 0.0) -> nn.Module:
    """The classifier train_classifier built, with the weights of a saved state dict (strict: every tensor)."""
    model = build_classifier(image_channels, num_classes, cfg.width, input_blur, cfg.norm)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TrainingError(f"the classifier's weights do not fit a {image_channels}-channel, {num_classes}-class "
                            f"network of width {cfg.width} ({str(e).splitlines()[0]}); run with the same config "
                            "and images of the same mode (grayscale or RGB)") from None
    return model.eval()


def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, num_classes) as float64 for uint8 images (N, H, W, C)."""
    return np.exp(predict_log_proba(model, images, device, batch_size))


@torch.no_grad()
def predict_log_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """Log class probabilities (N, num_classes); summing these over experts gives a product of experts."""
    model.eval()
    out = [model(torch.from_numpy(to_float(images[i:i + batch_size])).to(device)).float().log_softmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()
