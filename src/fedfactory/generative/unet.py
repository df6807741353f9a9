"""A small U-Net that maps (noisy image, noise embedding) to an image-shaped output.

It knows nothing about diffusion: the EDM wrapper (edm.py) owns preconditioning, loss and sampling.
Layout follows the DDPM++/EDM family at toy scale: residual blocks with GroupNorm, the noise embedding
added as a per-channel shift, skip connections between mirrored resolutions, no attention.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def groups_for(channels: int) -> int:
    return math.gcd(channels, 8)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017), as in EDM's networks."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):  # t: (B,)
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups_for(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups_for(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.skip(x) + h) / math.sqrt(2)  # unit-variance residual sum, as in EDM


class UNet(nn.Module):
    """Encoder-decoder over len(channel_mult) resolutions with num_blocks residual blocks each."""

    def __init__(self, image_channels: int, channels: int = 32, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_blocks: int = 1):
        super().__init__()
        emb_dim = channels * 4
        self.embed = nn.Sequential(PositionalEmbedding(channels), nn.Linear(channels, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.stem = nn.Conv2d(image_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [channels]
        cin = channels
        for level, width in enumerate(widths):
            for _ in range(num_blocks):
                self.down.append(Block(cin, width, emb_dim))
                cin = width
                skips.append(cin)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
        self.mid = Block(cin, cin, emb_dim)
        self.up = nn.ModuleList()
        for width in reversed(widths):
            for _ in range(num_blocks + 1):
                self.up.append(Block(cin + skips.pop(), width, emb_dim))
                cin = width
        self.num_blocks = num_blocks
        self.num_levels = len(widths)
        self.out_norm = nn.GroupNorm(groups_for(cin), cin)
        self.out = nn.Conv2d(cin, image_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start as the identity of the skip path (EDM initialises outputs at 0)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, noise_label):  # x: (B, C, H, W), noise_label: (B,)
        emb = self.embed(noise_label)
        h = self.stem(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(self.num_levels):
            for _ in range(self.num_blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < self.num_levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid(h, emb)
        blocks = iter(self.up)
        for level in reversed(range(self.num_levels)):
            for _ in range(self.num_blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest")
        return self.out(F.silu(self.out_norm(h)))
