"""How much a module replays its training images as its cell shrinks: the replay curve behind the release defaults.

For each class and cell size n, one module of the preset's family is trained from scratch on n images of the class
(drawn from the training rows outside the validation split of benchmarks/quality.py); its first 2,000 samples (what
the release check and the audit sample) are compared with those n images and with the class's 1,000 validation
images. Per cell: the near-copy fraction against held-out images (the audit's ratio, Carlini et al. 2023), the
near-copy fraction against the second-nearest training image (the release check's rule where a site has no
held-out images: fedfactory.audit.near_copy_ratios), and the GAN-Leaks membership-inference AUC. The test set is
never read.

  python benchmarks/replay.py --config fashion-mnist --sizes 1,2,3,5,10,20,50,100,200,500 --classes 0,1,7 \
      --name replay-fashion-mnist run.threads=2
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import validation_split  # noqa: E402

from fedfactory.audit import NEAR_COPY_RATIO, RELEASE_SAMPLES, audit_images, near_copy_ratios  # noqa: E402
from fedfactory.config import load_config  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.device import select_device  # noqa: E402
from fedfactory.generative.train import plan_training, sample_module, train_module  # noqa: E402
from fedfactory.runs import atomic_write_json, atomic_write_text, provenance, provenance_line  # noqa: E402
from fedfactory.seeding import derive_seed, numpy_rng  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(rows: list[dict], prov: dict, cfg_name: str) -> str:
    sizes = sorted({r["cell_size"] for r in rows})
    classes = sorted({r["class_name"] for r in rows})
    lines = [f"# Replay curve: {cfg_name} preset, near-copy fraction against cell size", "", provenance_line(prov), "",
             "Each cell: one module trained from scratch on n training images of the class, "
             f"{RELEASE_SAMPLES} samples. "
             f"Near-copy: distance to the nearest training image below {NEAR_COPY_RATIO:.3f} of the reference "
             "distance (held-out: the nearest of 1,000 validation images of the class; second-nearest: the "
             "release check's rule without held-out images). MIA: GAN-Leaks AUC, members against as many "
             "validation images.", "",
             "| cell size | " + " | ".join(f"{c}: copy (held-out / 2nd-nearest), MIA" for c in classes) + " |",
             "|---|" + "---|" * len(classes)]
    for n in sizes:
        cells = []
        for c in classes:
            r = next((r for r in rows if r["cell_size"] == n and r["class_name"] == c), None)
            cells.append("" if r is None else f"{r['copy_fraction_held_out']:.3f} / {r['copy_fraction_second']:.3f}, "
                                              f"{r['mia_auc']:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--sizes", default="1,2,3,5,10,20,50,100,200,500")
    p.add_argument("--classes", default="0,1,7")
    p.add_argument("--name", default="replay-fashion-mnist")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = select_device(cfg.run.device, cfg.run.threads)
    train, _ = load_data(cfg.data)  # the test set is not read
    fit_rows, val_rows = validation_split(train.labels)
    fit, val = train.subset(fit_rows), train.subset(val_rows)
    prov = provenance(__file__, sys.argv[1:])
    rows = []
    for c in (int(x) for x in args.classes.split(",")):
        pool = fit.images[fit.labels == c]
        pool = pool[numpy_rng(cfg.run.seed, "replay", c).permutation(len(pool))]
        held_out = val.images[val.labels == c]
        for n in (int(x) for x in args.sizes.split(",")):
            members = pool[:n]
            t0 = time.perf_counter()
            seed = derive_seed(cfg.run.seed, "replay", c, n)
            tensors, fields = train_module(members, cfg.generator, plan_training(cfg.generator, n, seed), device,
                                           progress=False)
            seconds = time.perf_counter() - t0
            manifest = {"module_id": f"replay-{c:03d}-{n}", "class_id": c, "num_samples": n} | fields
            t0 = time.perf_counter()
            synthetic = sample_module(tensors, manifest, range(RELEASE_SAMPLES), cfg.run.seed, device)
            audit = audit_images(synthetic, members, held_out, seed, resamples=100)
            second, _ = near_copy_ratios(synthetic, members)
            rows.append({"class_id": c, "class_name": train.class_names[c], "cell_size": n,
                         "steps": fields["training"]["steps"], "train_seconds": round(seconds, 2),
                         "check_seconds": round(time.perf_counter() - t0, 2),
                         "copy_fraction_held_out": audit["copy_fraction"],
                         "copy_fraction_second": float((second < NEAR_COPY_RATIO).mean()),
                         "ratio_quantiles_held_out": audit["ratio_quantiles"],
                         "ratio_median_second": float(np.median(second)),
                         "mia_auc": audit["mia_auc"], "mia_auc_interval": audit["mia_auc_interval"]})
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_json(RESULTS / f"{args.name}.json", {"provenance": prov, "rows": rows})
    atomic_write_text(RESULTS / f"{args.name}.md", markdown(rows, prov, args.config))
    print(markdown(rows, prov, args.config))


if __name__ == "__main__":
    main()
