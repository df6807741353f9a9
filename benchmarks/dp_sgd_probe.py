"""Does a DP-SGD autoencoder learn in the CPU budget? Train the aegmm autoencoder of the fashion-mnist preset with
privacy.method=dp-sgd's own step (per-image clipping, Poisson sampling, Gaussian noise) at the noise a budget
needs, and with almost no noise, on one class's training images; report the L1 reconstruction error on a
validation slice of the same class's training rows (never the test set), against the mean image's error.

  python benchmarks/dp_sgd_probe.py --epsilon 10 --steps 300 --name dp-sgd-probe
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from fedfactory.config import load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.data.images import to_float
from fedfactory.generative.aegmm import AutoEncoder
from fedfactory.generative.train import lr_at, private_step
from fedfactory.privacy.dp import clip_rows, latent_radius, plan_privacy, poisson_batch
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cls", type=int, default=0, help="Fashion-MNIST class")
    p.add_argument("--name", default="dp-sgd-probe")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("fashion-mnist", ["generator.residual_rank=0", f"privacy.epsilon={args.epsilon}",
                                        "privacy.method=dp-sgd"])
    g, pc = cfg.generator, cfg.privacy
    train, _ = load_dataset("fashion-mnist")
    rows = train.images[train.labels == args.cls]
    images, val = rows[:5000], torch.from_numpy(to_float(rows[5000:5500]))  # validation: held-out training rows
    radius = latent_radius(g.latent_dim)
    budget = plan_privacy(pc.epsilon, pc.delta, pc.max_grad_norm, len(images), g.batch_size, args.steps)
    results = {"provenance": provenance(__file__, sys.argv[1:]), "epsilon": budget.epsilon,
               "noise_multiplier": budget.noise_multiplier, "steps": args.steps, "class": args.cls,
               "mean_image_l1": float((val.mean(0) - val).abs().mean()), "runs": {}}
    for label, sigma in (("dp-sgd", budget.noise_multiplier), ("clipped, noise 0.01", 0.01)):
        plan = dataclasses.replace(budget, noise_multiplier=sigma)
        torch.manual_seed(0)
        model = AutoEncoder((1, 28, 28), g.channels, g.latent_dim)
        opt = torch.optim.Adam(model.parameters(), lr=g.lr)
        gen, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        data, curve, t0 = torch.from_numpy(images), [], time.perf_counter()
        for step in range(args.steps):
            x = torch.from_numpy(to_float(data[poisson_batch(len(data), plan.sampling_rate, gen)].numpy()))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, g.lr)
            opt.zero_grad(set_to_none=True)
            private_step(model, x, plan, radius, noise)
            opt.step()
            if (step + 1) % 50 == 0:
                with torch.no_grad():
                    recon = model.decoder(clip_rows(model.encoder(val), radius))
                curve.append([step + 1, float((recon - val).abs().mean())])
        results["runs"][label] = {"noise_multiplier": sigma, "val_l1": curve, "seconds": time.perf_counter() - t0}
        print(label, curve[-1], flush=True)
    atomic_write_json(RESULTS / f"{args.name}.json", results)
    lines = [f"# DP-SGD probe: aegmm autoencoder, Fashion-MNIST class {args.cls}", "",
             provenance_line(results["provenance"]), "",
             f"{args.steps} steps, Poisson rate {budget.sampling_rate:.4g}, clipping norm {pc.max_grad_norm:g}; "
             f"epsilon {budget.epsilon:.3f} needs noise multiplier {budget.noise_multiplier:.4f}. Validation L1 "
             f"(500 held-out training images of the class); the mean image scores {results['mean_image_l1']:.4f}.", "",
             "| training | " + " | ".join(f"step {s}" for s, _ in curve) + " |",
             "|---|" + "---|" * len(curve)]
    for label, r in results["runs"].items():
        values = " | ".join(f"{v:.4f}" for _, v in r["val_l1"])
        lines.append(f"| {label} (noise {r['noise_multiplier']:.4g}) | {values} |")
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
