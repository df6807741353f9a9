"""Generator training and sampler throughput (images per second) on one device, for the project's presets.

  python benchmarks/throughput.py --device cpu --out benchmarks/results/throughput-cpu.json
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from fedfactory.config import GeneratorConfig
from fedfactory.device import select_device
from fedfactory.generative.train import plan_training, sample_module, train_module
from fedfactory.modules.ids import module_id
from fedfactory.runs import atomic_write_json, provenance

CASES = {  # name: (image shape HWC, generator config)
    "aegmm-fmnist": ((28, 28, 1), GeneratorConfig(family="aegmm", channels=16, latent_dim=32, mixture_components=20)),
    "edm-fmnist": ((28, 28, 1), GeneratorConfig(family="edm", channels=32, sampler_steps=18)),
    "aegmm-cifar": ((32, 32, 3), GeneratorConfig(family="aegmm", channels=32, latent_dim=64, mixture_components=20)),
    "edm-cifar": ((32, 32, 3), GeneratorConfig(family="edm", channels=64, sampler_steps=18)),
}


def measure(shape, cfg: GeneratorConfig, device, train_steps: int, samples: int) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (512, *shape), dtype=np.uint8)
    # Warm-up run (allocator, kernels), then a timed run of train_steps.
    warm, timed = replace(cfg, steps=5), replace(cfg, steps=train_steps)
    train_module(images, warm, plan_training(warm, len(images), 0), device, progress=False)
    t0 = time.perf_counter()
    tensors, fields = train_module(images, timed, plan_training(timed, len(images), 0), device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    manifest = {"module_id": module_id(0, 0)} | fields
    sample_module(tensors, manifest, range(0, 8), 0, device, batch_size=8)
    t0 = time.perf_counter()
    sample_module(tensors, manifest, range(0, samples), 0, device, batch_size=500)
    sample_s = time.perf_counter() - t0
    return {"train_img_per_s": train_steps * cfg.batch_size / train_s, "train_steps": train_steps,
            "batch_size": cfg.batch_size, "sample_img_per_s": samples / sample_s, "samples": samples,
            "sampler_steps": cfg.sampler_steps if cfg.family == "edm" else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="fewer steps (CPU)")
    args = p.parse_args()
    device = select_device(args.device, args.threads)
    results = provenance(__file__, sys.argv[1:]) | {"device": str(device),
               "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "cases": {}}
    for name, (shape, cfg) in CASES.items():
        steps = 100 if args.quick or device.type == "cpu" else 500
        samples = (200 if cfg.family == "edm" else 2000) if device.type == "cpu" else 5000
        results["cases"][name] = measure(shape, cfg, device, steps, samples)
        print(name, json.dumps(results["cases"][name]), flush=True)
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
