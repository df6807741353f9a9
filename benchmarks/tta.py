"""Test-time augmentation on the validation split: does averaging the classifier over augmented copies of each
image help a classifier trained on synthetic images?

The classifier learns to ignore the blur and noise of its training augmentation (classifier.augment); averaging
its outputs over K such copies of a real image is a zero-training-cost ensemble. Protocol of quality.py (server
mode, silos, 1,000 validation images per class, the test set never read), on modules that quality.py cached:

  python benchmarks/tta.py --modules <quality.py --out>/steps1000-pc8 --samples 3000
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import validation_split  # noqa: E402

from fedfactory.classifier import augment, to_float, train_classifier  # noqa: E402
from fedfactory.config import load_config  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.federation.factory import synthesize  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.registry import Module  # noqa: E402
from fedfactory.runs import provenance, provenance_line  # noqa: E402


def accuracy(log_probs: np.ndarray, labels: np.ndarray) -> float:
    return float((log_probs.argmax(1) == labels).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", required=True, help="a quality.py variant directory (class-0.pt ... class-9.pt)")
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--samples", type=int, default=3000, help="synthetic images per class")
    p.add_argument("--copies", type=int, nargs="+", default=[4, 8, 16], help="K augmented copies per image")
    p.add_argument("--kinds", nargs="+", default=["blur+noise:0.6", "noise:0.6", "blur:0.6", "blur+noise:0.3"],
                   help="augmentation:noise_std pairs to average over")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    source = provenance_line(provenance(__file__, sys.argv[1:]))  # the tree the classifier starts from
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, [])
    train, _ = load_data(cfg.data)
    _, val_rows = validation_split(train.labels)
    val = train.subset(val_rows)
    cached = [torch.load(Path(args.modules) / f"class-{c}.pt", weights_only=False) for c in range(train.num_classes)]
    modules = [Module(m["manifest"], m["tensors"]) for m in cached]
    blur = float(np.mean([m["manifest"]["training"].get("blur_sigma", 0.0) for m in cached]))
    images, labels, _ = synthesize(modules, train.num_classes, args.samples, 0, device, progress=False)
    t0 = time.perf_counter()
    model = train_classifier(images, labels, train.num_classes, cfg.classifier, 1, device, progress=False,
                             input_blur=blur).eval()
    print(source, flush=True)
    print(f"classifier trained in {time.perf_counter() - t0:.0f}s", flush=True)
    x = torch.from_numpy(to_float(val.images)).to(device)
    with torch.no_grad():
        clean = model(x).log_softmax(1).double().cpu().numpy()
        m = evaluate(np.exp(clean), val.labels, val.class_names)
        print(f"no augmentation: {m['accuracy']:.4f} per class "
              f"{[round(a, 3) for a in m['per_class_accuracy'].values()]}", flush=True)
        print("| augmentation | noise_std | K | mean log-prob | mean prob | mean log-prob with the clean copy |")
        for spec in args.kinds:
            kind, noise = spec.split(":")
            gen = torch.Generator().manual_seed(0)  # the copies are a seeded draw: the rows are reproducible
            copies = np.stack([model(augment(x, kind, gen, float(noise))).log_softmax(1).double().cpu().numpy()
                               for _ in range(max(args.copies))])
            for k in args.copies:
                mean_lp = copies[:k].mean(0)
                mean_p = np.log(np.exp(copies[:k]).mean(0))
                with_clean = np.concatenate([copies[:k], clean[None]]).mean(0)
                print(f"| {kind} | {noise} | {k} | {accuracy(mean_lp, val.labels):.4f} | "
                      f"{accuracy(mean_p, val.labels):.4f} | {accuracy(with_clean, val.labels):.4f} |", flush=True)


if __name__ == "__main__":
    main()
