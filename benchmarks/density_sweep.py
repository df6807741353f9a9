"""The fits that follow an autoencoder's training (latent mixture, residual model), swept on the validation split.

Same protocol as quality.py (Fashion-MNIST silos, 1,000 held-out training images per class, the test set never
read), but the trained autoencoders are cached and only the ex-post fits change between rows, so a row costs a
synthesis and a classifier, not ten modules. The fits and the draw are the package's own (aegmm.fit_densities,
aegmm.decode_samples), seeded per row; a chosen fit is then checked through the package with quality.py. Rows
recorded at commit 27a8857 or earlier drew their own noise in another order (same arithmetic), so rerunning them
gives other draws.

Fits, as key=value after the row's name (NAME:key=value,...):
  components=K        mixture components (the preset's generator.mixture_components: 20)
  rank=R              rank of the one residual model of the class (16 until round seven)
  per_component=R     instead: a residual model of rank R for each mixture component, fitted to the residuals of
                      the images whose latent that component explains best; a sample adds its own component's

  python benchmarks/density_sweep.py --rows base: c50:components=50 pc8:per_component=8 --threads 2
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import validation_split  # noqa: E402

from fedfactory.classifier import predict_proba, train_classifier  # noqa: E402
from fedfactory.config import load_config  # noqa: E402
from fedfactory.data.datasets import load_dataset  # noqa: E402
from fedfactory.generative.aegmm import decode_samples, fit_densities  # noqa: E402
from fedfactory.generative.train import build_network, fit_network, network_config, plan_training  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.runs import provenance  # noqa: E402
from fedfactory.seeding import derive_seed, torch_generator  # noqa: E402

FITS = {"components": 20, "rank": 16, "per_component": 0}


def parse_row(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    fits = dict(FITS)
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in FITS:
            raise SystemExit(f"--rows {text!r}: {item!r} is not key=value with key one of {sorted(FITS)}")
        if not value.isdigit():
            raise SystemExit(f"--rows {text!r}: {item!r} needs a non-negative integer value")
        fits[key] = int(value)
    return name, fits


def sample_class(decoder, tensors: dict, n: int, latent_dim: int, gen: torch.Generator) -> np.ndarray:
    """n images of a class from fit_densities' tensors, drawn as a module draws them (aegmm.decode_samples)."""
    rank = tensors["residual.basis"].shape[-4] if "residual.basis" in tensors else 0
    noise = torch.randn(n, latent_dim + 1 + rank, generator=gen, dtype=torch.float64)
    return decode_samples(decoder, tensors, noise, latent_dim, rank)


def density_bytes(tensors: dict) -> int:
    """Bytes of the mixture and residual tensors (float32), the part of a module these fits change."""
    return sum(v.numel() * 4 for k, v in tensors.items() if not k.startswith("decoder."))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", required=True, help="NAME:key=value,... (keys: " + ", ".join(FITS) + ")")
    p.add_argument("--set", nargs="*", default=["steps=1000", "steps_per_image=0.2"],
                   help="generator overrides of the autoencoders (cache key: --cache)")
    p.add_argument("--samples", type=int, default=9000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthesis-seed", type=int, default=0, help="seed of the synthetic images (classifier seed: 1)")
    p.add_argument("--cache", default="benchmarks/runs/density/ae1000")
    p.add_argument("--results", default="benchmarks/results/density-sweep.jsonl")
    args = p.parse_args()
    rows = [parse_row(r) for r in args.rows]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config("fashion-mnist", [f"generator.{s}" for s in args.set])
    train, _ = load_dataset("fashion-mnist", None, 0)
    fit_rows, val_rows = validation_split(train.labels)
    fit, val = train.subset(fit_rows), train.subset(val_rows)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    encoders = {}
    for c in range(train.num_classes):
        images = fit.images[fit.labels == c]
        plan = plan_training(cfg.generator, len(images), derive_seed(0, "train", c, c))
        path = cache / f"class-{c}.pt"
        if path.exists():
            ema = build_network("aegmm", (1, 28, 28), network_config(cfg.generator, (1, 28, 28)))
            ema.load_state_dict(torch.load(path))
            ema.eval()
        else:
            t0 = time.perf_counter()
            ema, _ = fit_network(images, cfg.generator, plan, device, f"class {c}", False)
            torch.save(ema.state_dict(), path)
            print(f"class {c}: autoencoder {plan.steps} steps in {time.perf_counter() - t0:.1f}s", flush=True)
        encoders[c] = (ema, images, plan.seed)

    for name, fits in rows:
        t0 = time.perf_counter()
        xs, ys, blurs, sizes = [], [], [], []
        for c, (ema, images, seed) in encoders.items():
            rank = fits["per_component"] or fits["rank"]
            tensors, fields = fit_densities(ema, images, fits["components"], rank, seed, bool(fits["per_component"]))
            xs.append(sample_class(ema.decoder, tensors, args.samples, cfg.generator.latent_dim,
                                   torch_generator(args.synthesis_seed, "density-sweep", c)))
            ys.append(np.full(args.samples, c))
            blurs.append(fields["blur_sigma"])
            sizes.append(density_bytes(tensors))
        fit_s = time.perf_counter() - t0
        sigma = float(np.mean(blurs))
        model = train_classifier(np.concatenate(xs), np.concatenate(ys), train.num_classes, cfg.classifier, 1, device,
                                 progress=False, input_blur=sigma)
        m = evaluate(predict_proba(model, val.images, device), val.labels, val.class_names)
        row = {"row": name, "fits": fits, "generator": args.set, "blur": sigma, "clients_blur": blurs,
               "samples_per_class": args.samples, "synthesis_seed": args.synthesis_seed,
               "val_accuracy": round(m["accuracy"], 4),
               "per_class": [round(a, 3) for a in m["per_class_accuracy"].values()],
               "density_bytes": int(np.mean(sizes)), "fit_and_sample_s": round(fit_s, 1),
               "total_s": round(time.perf_counter() - t0, 1), **provenance(__file__, sys.argv[1:])}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
