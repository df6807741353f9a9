"""The classifier recipe's ceiling on real images, on the validation split: the same network and training as the
factory's classifier (classifier overrides allowed), trained on every class's client images (the protocol's 5,000 a
class on Fashion-MNIST), scored on the 1,000 held-out images a class no client sees. A local-mode expert trains on
real images and synthetic ones, so a recipe that cannot read higher than this on real images alone will not lift
local mode past it; the test set is never read.

  python benchmarks/ceiling.py --tag e10 --cls epochs=10
  python benchmarks/ceiling.py --tag e10-w48 --cls epochs=10 width=48 --blur 0.65
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

from fedfactory.classifier import predict_log_proba, train_classifier  # noqa: E402
from fedfactory.config import ConfigError, load_config  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.runs import provenance  # noqa: E402
from fedfactory.seeding import derive_seed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True, help="name of the recipe in the results")
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--cls", nargs="*", default=[], help="classifier overrides key=value")
    p.add_argument("--blur", type=float, default=0.0, help="classifier input blur sigma (a run matches its modules')")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default="benchmarks/results/ceiling.jsonl")
    args = p.parse_args()
    if not Path(args.results).parent.is_dir():  # before minutes of training, not after
        raise SystemExit(f"--results {args.results}: its folder does not exist; create it or name another file")
    source = provenance(__file__, sys.argv[1:])
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, [f"classifier.{kv}" for kv in args.cls])
    except ConfigError as e:
        raise SystemExit(f"--config/--cls: {e}") from None
    train, _ = load_data(cfg.data)  # the test set is not used
    fit, val = validation_split(train.labels)
    t0 = time.perf_counter()
    model = train_classifier(train.images[fit], train.labels[fit], train.num_classes, cfg.classifier,
                             derive_seed(cfg.run.seed, "classifier"), torch.device("cpu"), progress=False,
                             input_blur=args.blur)
    seconds = time.perf_counter() - t0
    log_probs = predict_log_proba(model, train.images[val], torch.device("cpu"))
    m = evaluate(np.exp(log_probs), train.labels[val], train.class_names)
    row = {"tag": args.tag, "val_accuracy": m["accuracy"], "per_class": m["per_class_accuracy"], "fit_images": len(fit),
           "classifier": {k: getattr(cfg.classifier, k) for k in ("width", "epochs", "augment", "noise_std")},
           "input_blur": args.blur, "seconds": round(seconds, 1), "threads": args.threads, **source}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
