"""EDM diffusion (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models").

The network is any module net(x, noise_label) -> image; this file owns the preconditioning (Table 1 / Eq. 7),
the training loss (Eq. 8 with the log-normal noise distribution) and the deterministic Heun sampler
(Algorithm 1). Changing the sampler never touches the network.
"""

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class EDMParams:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def to_dict(self) -> dict:
        return asdict(self)


def denoise(net, x, sigma, p: EDMParams):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7, Table 1 of Karras et al. 2022)."""
    sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    c_skip = p.sigma_data**2 / (sigma**2 + p.sigma_data**2)
    c_out = sigma * p.sigma_data / (sigma**2 + p.sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + p.sigma_data**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    return c_skip * x + c_out * net(c_in * x, c_noise).to(x.dtype)


def edm_loss(net, x, p: EDMParams, generator: torch.Generator | None = None):
    """Weighted denoising loss with ln(sigma) ~ N(P_mean, P_std^2) and lambda(sigma) of Table 1."""
    b = x.shape[0]
    rnd = torch.randn(b, generator=generator, device="cpu").to(x.device)
    sigma = (rnd * p.p_std + p.p_mean).exp()
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device) * sigma.reshape(-1, 1, 1, 1)
    weight = (sigma**2 + p.sigma_data**2) / (sigma * p.sigma_data) ** 2
    out = denoise(net, x + noise, sigma, p)
    return (weight.reshape(-1, 1, 1, 1) * (out - x) ** 2).mean()


def sigma_steps(num_steps: int, p: EDMParams, device=None) -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of Eq. 5, with sigma_N = 0 appended."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    inv = 1 / p.rho
    t = (p.sigma_max**inv + i / max(num_steps - 1, 1) * (p.sigma_min**inv - p.sigma_max**inv)) ** p.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def heun_sample(net, noise, num_steps: int, p: EDMParams):
    """Deterministic 2nd-order Heun sampler (Algorithm 1 of Karras et al. 2022); noise: (B, C, H, W) ~ N(0, I)."""
    sigmas = sigma_steps(num_steps, p, device=noise.device)
    x = noise.double() * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        # Euler step from s to s_next.
        d = (x - denoise(net, x.float(), s.float().expand(x.shape[0]), p).double()) / s
        x_next = x + (s_next - s) * d
        # Heun correction, skipped on the last step where sigma_next = 0.
        if s_next > 0:
            d_next = (x_next - denoise(net, x_next.float(), s_next.float().expand(x.shape[0]), p).double()) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x.float()
