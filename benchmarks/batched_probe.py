"""Issue 15 CPU probe: does training ten `aegmm` autoencoders at once beat training them one at a time?

Builds ten `fedfactory.generative.aegmm.AutoEncoder` networks at the `fashion-mnist` preset's size (channels,
latent_dim, batch_size from configs/fashion-mnist.toml; 28x28x1 images; random uint8 pixels, since only speed
is measured) and times Adam steps of the plain L1 reconstruction loss (`autoencoder_loss` with critic=None)
four ways:

  a      one module at a time: ten models and ten Adams, stepped in turn (today's path);
  b_grad torch.func.stack_module_state + vmap(grad(loss)) over functional_call, one Adam over the stacked params;
  b_sum  the same stacked params, vmap(loss) summed and .backward() (autograd through vmap);
  c      the ten as one grouped-convolution network (groups=10; linears as batched einsums), one Adam.

Each step trains all ten modules on their own batch of 64 (640 images); reported: training images/s at
torch.set_num_threads(1) and (2), after warm-up, median over repeats (methods interleaved within each repeat
so machine load hits all alike), plus decoding (sampling without the mixture/residual draws) batched vs one at a
time. Before timing it checks that b and c give the same losses, gradients and post-Adam parameters as a for the
same parameters and batch, and says whether the bits are identical. The 1-minute load average is recorded at
the start and end of each thread count.

  PYTHONPATH=src python benchmarks/batched_probe.py --out benchmarks/results/batched-probe-cpu.json \\
      --md benchmarks/results/batched-probe-cpu.md
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from fedfactory.config import load_config
from fedfactory.data.images import to_float
from fedfactory.generative.aegmm import AutoEncoder, autoencoder_loss
from fedfactory.runs import atomic_write_json, provenance

SHAPE = (1, 28, 28)  # C, H, W


# ---------------------------------------------------------------- (a) one module at a time


class Sequential:
    def __init__(self, models, lr):
        self.models = models
        self.opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
        self.gen = torch.Generator()

    def step(self, x):  # x: (M, B, C, H, W)
        losses = []
        for m, opt, xm in zip(self.models, self.opts, x, strict=True):
            opt.zero_grad(set_to_none=True)
            loss, _ = autoencoder_loss(m, xm, None, 0.0, self.gen)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    def grads(self, x):
        out = []
        for m, xm in zip(self.models, x, strict=True):
            m.zero_grad(set_to_none=True)
            loss, _ = autoencoder_loss(m, xm, None, 0.0, self.gen)
            loss.backward()
            out.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
        return torch.stack([o[0] for o in out]), {k: torch.stack([o[1][k] for o in out]) for k in out[0][1]}

    @torch.no_grad()
    def forward_only(self, x):
        pairs = zip(self.models, x, strict=True)
        return torch.stack([autoencoder_loss(m, xm, None, 0.0, self.gen)[0] for m, xm in pairs])

    def params(self):
        return {k: torch.stack([dict(m.named_parameters())[k].detach() for m in self.models])
                for k, _ in self.models[0].named_parameters()}

    @torch.no_grad()
    def decode(self, z):  # z: (M, N, D)
        return torch.stack([m.decoder(zm) for m, zm in zip(self.models, z, strict=True)])


# ---------------------------------------------------------------- (b) stacked parameters + vmap


class Stacked:
    def __init__(self, models, lr, mode):
        self.mode = mode
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(models[0]).to("meta")
        self.opt = torch.optim.Adam(list(self.params.values()), lr=lr)

        def loss_one(p, b, x):
            return (functional_call(self.base, (p, b), (x,)) - x).abs().mean()

        self.loss_one = loss_one
        self.vgrad = vmap(grad(loss_one, has_aux=False), in_dims=(0, 0, 0))
        self.vloss = vmap(loss_one, in_dims=(0, 0, 0))
        self.vgrad_and_loss = vmap(torch.func.grad_and_value(loss_one), in_dims=(0, 0, 0))

        def decode_one(p, z):
            dec = {k[len("decoder."):]: v for k, v in p.items() if k.startswith("decoder.")}
            return functional_call(self.base.decoder, dec, (z,))

        self.vdecode = vmap(decode_one, in_dims=(0, 0))

    def grads(self, x):
        if self.mode == "grad":
            g, loss = self.vgrad_and_loss(self.params, self.buffers, x)
            return loss.detach(), {k: v.detach() for k, v in g.items()}
        for p in self.params.values():
            p.grad = None
        losses = self.vloss(self.params, self.buffers, x)
        losses.sum().backward()
        return losses.detach(), {k: p.grad.clone() for k, p in self.params.items()}

    def step(self, x):
        self.opt.zero_grad(set_to_none=True)
        if self.mode == "grad":
            g, loss = self.vgrad_and_loss(self.params, self.buffers, x)
            for k, p in self.params.items():
                p.grad = g[k]
        else:
            loss = self.vloss(self.params, self.buffers, x)
            loss.sum().backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def forward_only(self, x):
        return self.vloss(self.params, self.buffers, x)

    def param_dict(self):
        return {k: v.detach() for k, v in self.params.items()}

    @torch.no_grad()
    def decode(self, z):
        return self.vdecode(self.params, z)


# ---------------------------------------------------------------- (c) one grouped-convolution network


class GroupedLinear(nn.Module):
    """M independent linears on (B, M, in) -> (B, M, out); weight (M, out, in) like a stacked nn.Linear."""

    def __init__(self, linears):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]).clone())
        self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]).clone())

    def forward(self, x):
        return torch.einsum("bmi,moi->bmo", x, self.weight) + self.bias


def grouped_conv(convs):
    """M convolutions (or transposed convolutions) as one with groups=M; weights concatenated along dim 0."""
    c0, m = convs[0], len(convs)
    if isinstance(c0, nn.ConvTranspose2d):
        g = nn.ConvTranspose2d(c0.in_channels * m, c0.out_channels * m, c0.kernel_size, c0.stride, c0.padding,
                               groups=m)
    else:
        g = nn.Conv2d(c0.in_channels * m, c0.out_channels * m, c0.kernel_size, c0.stride, c0.padding, groups=m)
    with torch.no_grad():
        g.weight.copy_(torch.cat([c.weight for c in convs]))
        g.bias.copy_(torch.cat([c.bias for c in convs]))
    return g


class GroupedAutoEncoder(nn.Module):
    """The M AutoEncoders fused: activations (B, M*C, H, W), each module's channels a contiguous block."""

    def __init__(self, models):
        super().__init__()
        self.m = len(models)
        self.bottom = models[0].bottom
        layers = []
        for part in ("encoder", "decoder"):
            seq = []
            for i, layer in enumerate(getattr(models[0], part)):
                same = [getattr(mod, part)[i] for mod in models]
                if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                    seq.append(grouped_conv(same))
                elif isinstance(layer, nn.Linear):
                    seq.append(GroupedLinear(same))
                elif isinstance(layer, (nn.SiLU, nn.Flatten, nn.Unflatten)):
                    seq.append(layer)
                else:
                    raise TypeError(layer)
            layers.append(nn.ModuleList(seq))
        self.encoder, self.decoder = layers

    def run(self, layers, h):
        b = h.shape[0]
        for layer in layers:
            if isinstance(layer, nn.Flatten):
                h = h.reshape(b, self.m, -1)
            elif isinstance(layer, nn.Unflatten):
                c, hh, ww = self.bottom
                h = h.reshape(b, self.m * c, hh, ww)
            else:
                h = layer(h)
        return h

    def forward(self, x):  # (B, M*C, H, W)
        return self.run(self.decoder, self.run(self.encoder, x))

    def param_dict(self):
        """Parameters in the stacked (M, ...) layout of stack_module_state, for comparison with a and b."""
        out = {}
        for part in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(self, part)):
                if isinstance(layer, GroupedLinear):
                    w, b = layer.weight, layer.bias
                elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                    w = layer.weight.reshape(self.m, -1, *layer.weight.shape[1:])
                    b = layer.bias.reshape(self.m, -1)
                else:
                    continue
                out[f"{part}.{i}.weight"], out[f"{part}.{i}.bias"] = w.detach(), b.detach()
        return out


class Grouped:
    def __init__(self, models, lr):
        self.net = GroupedAutoEncoder(models)
        self.m = len(models)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)

    def losses(self, x):  # x (M, B, C, H, W) -> per-module mean L1 (M,)
        m, b, c, h, w = x.shape
        xg = x.transpose(0, 1).reshape(b, m * c, h, w)
        r = self.net(xg)
        return (r - xg).abs().reshape(b, m, c * h * w).mean(dim=(0, 2))

    def grads(self, x):
        self.net.zero_grad(set_to_none=True)
        loss = self.losses(x)
        loss.sum().backward()
        g = {}
        for part in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(self.net, part)):
                if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, GroupedLinear)):
                    gw, gb = layer.weight.grad, layer.bias.grad
                    g[f"{part}.{i}.weight"] = gw.reshape(self.m, -1, *gw.shape[1:]) if gw.ndim == 4 else gw
                    g[f"{part}.{i}.bias"] = gb.reshape(self.m, -1)
        return loss.detach(), g

    def step(self, x):
        self.opt.zero_grad(set_to_none=True)
        loss = self.losses(x)
        loss.sum().backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def forward_only(self, x):
        return self.losses(x)

    def param_dict(self):
        return self.net.param_dict()

    @torch.no_grad()
    def decode(self, z):  # z (M, N, D)
        h = z.transpose(0, 1)  # (N, M, D)
        n = h.shape[0]
        for layer in self.net.decoder:
            if isinstance(layer, nn.Unflatten):
                c, hh, ww = self.net.bottom
                h = h.reshape(n, self.m * c, hh, ww)
            else:
                h = layer(h)
        return h.reshape(n, self.m, -1, *h.shape[2:]).transpose(0, 1)


# ---------------------------------------------------------------- helpers


def build(cfg, m, seed):
    models = []
    for i in range(m):
        torch.manual_seed(seed + i)
        models.append(AutoEncoder(SHAPE, cfg.channels, cfg.latent_dim))
    return models


def make(method, models, lr):
    models = [copy.deepcopy(mod) for mod in models]
    if method == "a":
        return Sequential(models, lr)
    if method == "b_grad":
        return Stacked(models, lr, "grad")
    if method == "b_sum":
        return Stacked(models, lr, "sum")
    if method == "c":
        return Grouped(models, lr)
    raise ValueError(method)


def batches(m, b, count, seed):
    """count batches of (M, B, 1, 28, 28) float32 in [-1, 1], each module drawing from its own uint8 pool."""
    rng = np.random.default_rng(seed)
    pools = rng.integers(0, 256, (m, 512, 28, 28, 1), dtype=np.uint8)
    out = []
    for _ in range(count):
        out.append(torch.stack([torch.from_numpy(to_float(pools[i][rng.integers(0, 512, b)])) for i in range(m)]))
    return out


def diff(ref: dict, other: dict) -> dict:
    worst, worst_rel, identical = 0.0, 0.0, True
    for k, r in ref.items():
        o = other[k].reshape(r.shape)
        d = (o - r).abs().max().item()
        worst = max(worst, d)
        worst_rel = max(worst_rel, d / max(r.abs().max().item(), 1e-30))
        identical &= torch.equal(o, r)
    return {"max_abs": worst, "max_rel_to_tensor_max": worst_rel, "bit_identical": bool(identical)}


def check_equivalence(models, x_list, lr) -> dict:
    """Losses and gradients at the same params and batch; then parameters after 3 Adam steps on the same batches."""
    ref = make("a", models, lr)
    ref_loss, ref_grads = ref.grads(x_list[0])
    out = {}
    for method in ("b_grad", "b_sum", "c"):
        alt = make(method, models, lr)
        loss, grads = alt.grads(x_list[0])
        out[method] = {"loss": diff({"loss": ref_loss}, {"loss": loss}), "grads": diff(ref_grads, grads)}
    runs = {method: make(method, models, lr) for method in ("a", "b_grad", "b_sum", "c")}
    for x in x_list[:3]:
        for r in runs.values():
            r.step(x)
    ref_params = runs["a"].params()
    for method in ("b_grad", "b_sum", "c"):
        out[method]["params_after_3_adam_steps"] = diff(ref_params, runs[method].param_dict())
    return out


def time_train(models, x_list, lr, methods, steps, repeats, warmup) -> dict:
    """Per step: forward only (no grad), forward+backward (gradients, no update), the full Adam step."""
    runs = {method: make(method, models, lr) for method in methods}
    phases = {"forward": lambda r, x: r.forward_only(x), "forward_backward": lambda r, x: r.grads(x),
              "step": lambda r, x: r.step(x)}
    for r in runs.values():
        for i in range(warmup):
            for fn in phases.values():
                fn(r, x_list[i % len(x_list)])
    times = {method: {ph: [] for ph in phases} for method in methods}
    for _ in range(repeats):
        for ph, fn in phases.items():
            for method, r in runs.items():
                t0 = time.perf_counter()
                for i in range(steps):
                    fn(r, x_list[i % len(x_list)])
                times[method][ph].append((time.perf_counter() - t0) / steps)
    m, b = x_list[0].shape[:2]
    out = {}
    for method, t in times.items():
        med = {ph: statistics.median(v) for ph, v in t.items()}
        out[method] = {"train_img_per_s": m * b / med["step"], "step_s_median": med["step"],
                       "forward_s_median": med["forward"], "forward_backward_s_median": med["forward_backward"],
                       "optimizer_s_estimate": med["step"] - med["forward_backward"], "step_s_all": t["step"]}
    return out


def time_decode(models, lr, n, repeats, methods) -> dict:
    m, d = len(models), models[0].encoder[-1].out_features
    z = torch.randn(m, n, d, generator=torch.Generator().manual_seed(1))
    runs = {method: make(method, models, lr) for method in methods}
    ref = runs["a"].decode(z)
    times = {method: [] for method in methods}
    agree = {}
    for method, r in runs.items():
        out = r.decode(z)  # warm-up and agreement
        agree[method] = {"max_abs": (out - ref).abs().max().item(), "bit_identical": bool(torch.equal(out, ref))}
    for _ in range(repeats):
        for method, r in runs.items():
            t0 = time.perf_counter()
            r.decode(z)
            times[method].append(time.perf_counter() - t0)
    return {method: {"s_median": statistics.median(t), "decode_img_per_s": m * n / statistics.median(t),
                     "vs_a": agree[method]} for method, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--modules", type=int, default=10)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--methods", default="a,b_grad,b_sum,c")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode-n", type=int, default=500, help="latents decoded per module")
    p.add_argument("--out", required=True)
    p.add_argument("--md", help="also write a Markdown table here")
    args = p.parse_args()
    cfg = load_config(args.preset).generator
    methods = args.methods.split(",")
    torch.set_num_threads(2)
    models = build(cfg, args.modules, 0)
    x_list = batches(args.modules, cfg.batch_size, 8, 0)
    results = provenance(__file__, sys.argv[1:]) | {
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "preset": args.preset, "family": cfg.family, "channels": cfg.channels, "latent_dim": cfg.latent_dim,
        "batch_size": cfg.batch_size, "modules": args.modules, "image_shape_chw": list(SHAPE), "lr": cfg.lr,
        "params_per_module": sum(q.numel() for q in models[0].parameters()),
        "loss": "L1 reconstruction (autoencoder_loss, critic=None); Adam; no EMA, no lr schedule, no data loading",
        "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
    }
    results["equivalence_vs_a"] = check_equivalence(models, x_list, cfg.lr)
    print(json.dumps(results["equivalence_vs_a"], indent=1), flush=True)
    results["by_threads"] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load0 = os.getloadavg()
        train = time_train(models, x_list, cfg.lr, methods, args.steps, args.repeats, args.warmup)
        decode = time_decode(models, cfg.lr, args.decode_n, args.repeats, methods)
        load1 = os.getloadavg()
        a = train["a"]["train_img_per_s"]
        entry = {"loadavg_1_5_15_start": list(load0), "loadavg_1_5_15_end": list(load1), "train": train,
                 "decode": decode,
                 "train_speedup_vs_a": {k: v["train_img_per_s"] / a for k, v in train.items()},
                 "decode_speedup_vs_a": {k: v["decode_img_per_s"] / decode["a"]["decode_img_per_s"]
                                         for k, v in decode.items()}}
        results["by_threads"][str(threads)] = entry
        print(threads, "threads, load", load0[0], "->", load1[0], flush=True)
        for k in methods:
            print(f"  {k:7s} train {train[k]['train_img_per_s']:8.0f} img/s  x{entry['train_speedup_vs_a'][k]:.2f}"
                  f"   decode {decode[k]['decode_img_per_s']:8.0f} img/s  x{entry['decode_speedup_vs_a'][k]:.2f}",
                  flush=True)
    atomic_write_json(args.out, results)
    if args.md:
        write_md(args.md, results, methods)


def write_md(path, r, methods):
    from fedfactory.runs import provenance_line

    lines = ["# Issue 15 CPU probe: ten `aegmm` modules trained batched vs one at a time", "",
             provenance_line(r), "",
             f"{r['modules']} x AutoEncoder(channels={r['channels']}, latent_dim={r['latent_dim']}) at 28x28x1, "
             f"batch {r['batch_size']} per module, {r['params_per_module']:,} parameters each; {r['loss']}. "
             f"torch {r['torch']}, {r['cores']} cores; median of {r['repeats']} repeats x {r['steps_per_repeat']} "
             f"steps after {r['warmup_steps']} warm-up steps, methods interleaved. "
             "Times (ms) are per step of all ten modules (640 images).", "",
             "| threads | load avg (1 min) start/end | method | train img/s | x vs a | fwd ms | fwd+bwd ms "
             "| step ms | decode img/s | x vs a |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t, e in r["by_threads"].items():
        load = f"{e['loadavg_1_5_15_start'][0]:.2f} / {e['loadavg_1_5_15_end'][0]:.2f}"
        for k in methods:
            lines.append(f"| {t} | {load} | {k} | {e['train'][k]['train_img_per_s']:.0f} | "
                         f"{e['train_speedup_vs_a'][k]:.2f} | {1e3 * e['train'][k]['forward_s_median']:.0f} | "
                         f"{1e3 * e['train'][k]['forward_backward_s_median']:.0f} | "
                         f"{1e3 * e['train'][k]['step_s_median']:.0f} | {e['decode'][k]['decode_img_per_s']:.0f} | "
                         f"{e['decode_speedup_vs_a'][k]:.2f} |")
    lines += ["", "Agreement with a (same parameters and batch; params after 3 Adam steps on the same batches):", "",
              "| method | loss max abs | grads max abs (rel) | params after 3 steps max abs | bit-identical |",
              "|---|---|---|---|---|"]
    for k, v in r["equivalence_vs_a"].items():
        bits = all(v[q]["bit_identical"] for q in ("loss", "grads", "params_after_3_adam_steps"))
        lines.append(f"| {k} | {v['loss']['max_abs']:.1e} | {v['grads']['max_abs']:.1e} "
                     f"({v['grads']['max_rel_to_tensor_max']:.1e}) | {v['params_after_3_adam_steps']['max_abs']:.1e} "
                     f"| {'yes' if bits else 'no'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
