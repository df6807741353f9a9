"""Quality sweep of generator designs: classification accuracy score (CAS) on silos, one process per variant.

Each variant trains one module per class (silos: client c holds all of class c), synthesizes a class-balanced
set and trains the project's classifier on it, for a few classifier recipes; the centralized reference trains
the same classifier on the real training set. Variants run as parallel subprocesses (one GPU can host many of
these small jobs). Model choice never looks at the test set: every variant and recipe is reported.

  python benchmarks/sweep.py --dataset fashion-mnist --root DIR --device cuda --out OUT --parallel 8 --deadline 420
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = {
    "ae16-z32-k20-s2000": dict(family="aegmm", channels=16, latent_dim=32, mixture_components=20, steps=2000),
    "ae16-z32-k20-s2000-r16": dict(family="aegmm", channels=16, latent_dim=32, mixture_components=20, steps=2000,
                                   residual_rank=16),
    "ae16-z32-k20-s4000": dict(family="aegmm", channels=16, latent_dim=32, mixture_components=20, steps=4000),
    "ae32-z32-k20-s2000": dict(family="aegmm", channels=32, latent_dim=32, mixture_components=20, steps=2000),
    "ae16-z64-k20-s2000": dict(family="aegmm", channels=16, latent_dim=64, mixture_components=20, steps=2000),
    "ae16-z32-k50-s2000": dict(family="aegmm", channels=16, latent_dim=32, mixture_components=50, steps=2000),
    "ae32-z64-k50-s4000-r16": dict(family="aegmm", channels=32, latent_dim=64, mixture_components=50, steps=4000,
                                   residual_rank=16),
    "edm32-s4000": dict(family="edm", channels=32, steps=4000, lr=1e-3, sampler_steps=18),
    "edm32-s12000": dict(family="edm", channels=32, steps=12000, lr=1e-3, sampler_steps=18),
}
RECIPES = [(3000, 5, "none"), (10000, 3, "none"), (3000, 5, "flip")]  # (samples per class, epochs, augment)
SMOKE = dict(steps=20, channels=8, latent_dim=8, mixture_components=3)


def run_variant(name: str, args) -> dict:
    import numpy as np

    from fedfactory.classifier import predict_proba, train_classifier
    from fedfactory.config import ClassifierConfig, GeneratorConfig
    from fedfactory.data.datasets import load_dataset
    from fedfactory.device import select_device
    from fedfactory.federation.factory import synthesize
    from fedfactory.generative.train import plan_training, train_module
    from fedfactory.metrics import evaluate
    from fedfactory.modules.files import module_to_bytes
    from fedfactory.modules.ids import module_id
    from fedfactory.seeding import derive_seed

    device = select_device(args.device, 2)
    train, test = load_dataset(args.dataset, args.root, args.image_size)
    recipes = [(40, 1, "none")] if args.smoke else RECIPES
    if args.recipes:
        recipes = [(int(n), int(e), a) for n, e, a in (r.split(":") for r in args.recipes.split(","))]
    result = {"variant": name, "device": str(device), "recipes": []}
    if name == "centralized":
        for _, epochs, aug in recipes:
            cfg = ClassifierConfig(epochs=epochs, augment=aug, width=8 if args.smoke else 32)
            t0 = time.perf_counter()
            model = train_classifier(train.images, train.labels, train.num_classes, cfg, 0, device, progress=False)
            m = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
            result["recipes"].append({"samples_per_class": "all real", "epochs": epochs, "augment": aug,
                                      "accuracy": m["accuracy"], "classifier_s": time.perf_counter() - t0})
        return result
    gcfg = replace(GeneratorConfig(), **(VARIANTS[name] | (SMOKE if args.smoke else {})))
    modules, train_s, sizes = [], [], []
    for c in range(train.num_classes):
        images = train.images[train.labels == c]
        t0 = time.perf_counter()
        plan = plan_training(gcfg, len(images), derive_seed(0, "train", c, c))
        tensors, fields = train_module(images, gcfg, plan, device, progress=False)
        train_s.append(time.perf_counter() - t0)
        manifest = {"module_id": module_id(c, c), "client_id": c, "class_id": c,
                    "class_name": train.class_names[c], "num_samples": int(len(images))} | fields
        payload, manifest = module_to_bytes(tensors, manifest)
        sizes.append(len(payload))
        modules.append((manifest, tensors))
    result |= {"train_s_per_module": float(np.mean(train_s)), "bytes_per_module": int(np.mean(sizes))}
    # Ablation of the residual noise model: the same modules with their residual tensors dropped.
    plain = [({**m, "network": {**m["network"], "residual_rank": 0}},
              {k: v for k, v in t.items() if not k.startswith("residual.")}) for m, t in modules]
    runs = [(r, modules) for r in recipes]
    if gcfg.family == "aegmm" and gcfg.residual_rank:
        runs += [((n, e, a + "+no-residual"), plain) for n, e, a in recipes]
    for (n, epochs, aug), mods in runs:
        t0 = time.perf_counter()
        images, labels, _ = synthesize(mods, train.num_classes, n, 0, device, 500, progress=False)
        aug = aug.removesuffix("+no-residual") if mods is plain else aug
        sample_s = time.perf_counter() - t0
        cfg = ClassifierConfig(epochs=epochs, augment=aug, width=8 if args.smoke else 32)
        t0 = time.perf_counter()
        model = train_classifier(images, labels, train.num_classes, cfg, 0, device, progress=False)
        m = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
        result["recipes"].append({"samples_per_class": n, "epochs": epochs, "augment": aug, "accuracy": m["accuracy"],
                                  "residual": mods is not plain and bool(gcfg.residual_rank),
                                  "per_class_accuracy": m["per_class_accuracy"], "sample_s": sample_s,
                                  "classifier_s": time.perf_counter() - t0})
        print(json.dumps({"variant": name, **result["recipes"][-1]}), flush=True)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", default=None, help="run one variant in this process")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--deadline", type=float, default=420.0, help="seconds after which unfinished variants stop")
    p.add_argument("--smoke", action="store_true", help="tiny settings, to check the script itself")
    p.add_argument("--recipes", default="", help="e.g. 3000:5:none,10000:3:none (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        result = run_variant(args.variant, args)
        (out / f"variant-{args.variant}.json").write_text(json.dumps(result, indent=1))
        return
    names = [v for v in ["centralized", *VARIANTS] if not args.only or v in args.only.split(",")]
    start, pending, running = time.time(), list(names), {}
    passthrough = ["--dataset", args.dataset, "--image-size", str(args.image_size), "--device", args.device,
                   "--out", args.out, "--recipes", args.recipes]
    passthrough += (["--root", args.root] if args.root else []) + (["--smoke"] if args.smoke else [])
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(out / f"log-{name}.txt", "w")
            running[name] = subprocess.Popen([sys.executable, __file__, *passthrough, "--variant", name],
                                              stdout=log, stderr=subprocess.STDOUT,
                                              env=os.environ | {"OMP_NUM_THREADS": "2"})
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode} after {time.time() - start:.0f}s", flush=True)
                del running[name]
        if time.time() - start > args.deadline:
            for name, proc in running.items():
                proc.kill()
                print(f"{name}: killed at the deadline", flush=True)
            break
        time.sleep(1)
    results = [json.loads(f.read_text()) for f in sorted(out.glob("variant-*.json"))]
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "results": results,
               "not_finished": [n for n in names if not (out / f"variant-{n}.json").exists()]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    for r in results:
        for rec in r["recipes"]:
            print(f"{r['variant']:<26} n={rec['samples_per_class']!s:<8} ep={rec['epochs']} aug={rec['augment']:<5} "
                  f"residual={rec.get('residual', '-')!s:<5} "
                  f"acc={rec['accuracy']:.4f} train_s/module={r.get('train_s_per_module', 0):.1f} "
                  f"bytes/module={r.get('bytes_per_module', 0)}")


if __name__ == "__main__":
    main()
