"""Where synthetic data loses, per class, on the validation split (issue 22, step 1): fidelity, coverage or classifier.

Protocol (benchmarks/quality.py): Fashion-MNIST training set; validation = 1,000 images per class given to no
client; silos: the module of class c trains on the other 5,000 images of c. The test set is never read.

Every classifier below is the package's own (train_classifier) with the same recipe, trained on 3,000 images per
class and scored on the validation images. What it is trained on isolates one stage of the generator:
- real: 3,000 real client images per class (the ceiling at this recipe and count);
- recon: the autoencoder's reconstructions D(E(x)) of the same real images, plus residual noise when the module
  has a residual model: the decoder's loss with a perfect latent prior;
- synthetic: the module's samples (latents from the mixture), as the server would train on;
- synthetic, fresh x k: k times as many samples per class and k times the epochs (the classifier's side).
A big real -> recon gap is fidelity lost in the decoder; a big recon -> synthetic gap is the prior (latents
the mixture puts where no image is, or modes it misses).

Precision and recall (Kynkaanniemi et al. 2019, k = 3) of 1,000 samples of each class against the class's 1,000
validation images, in the 128-d penultimate features of a classifier trained from scratch on all 50,000 client
images (no augmentation, no blur): low precision = samples off the real manifold (fidelity), low recall = real
modes no sample reaches (coverage).

  python benchmarks/diagnose.py --variant preset500 --set steps=500
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
from fedfactory.data.images import to_float, to_uint8  # noqa: E402
from fedfactory.federation.factory import synthesize  # noqa: E402
from fedfactory.generative.aegmm import add_residual, fit_densities  # noqa: E402
from fedfactory.generative.train import build_network, fit_network, manifest_fields, plan_training  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.modules.files import module_to_bytes  # noqa: E402
from fedfactory.modules.ids import module_id  # noqa: E402
from fedfactory.registry import Module  # noqa: E402
from fedfactory.runs import provenance  # noqa: E402
from fedfactory.seeding import derive_seed  # noqa: E402


def train_cell(images: np.ndarray, gcfg, c: int, class_name: str, path: Path) -> dict:
    """Train (or load) class c's autoencoder and module; the encoder is kept here for the reconstructions."""
    if path.exists():
        return torch.load(path, weights_only=False)
    plan = plan_training(gcfg, len(images), derive_seed(0, "train", c, c))
    t0 = time.perf_counter()
    ema, loss = fit_network(images, gcfg, plan, torch.device("cpu"), f"class {c}", False)
    tensors, fields = fit_densities(ema, images, gcfg.mixture_components, gcfg.residual_rank, plan.seed)
    seconds = time.perf_counter() - t0
    manifest = {"module_id": module_id(c, c), "client_id": c, "class_id": c, "class_name": class_name,
                "num_samples": int(len(images))} | manifest_fields(gcfg, (images.shape[3], *images.shape[1:3]), plan,
                                                                     {"final_loss": loss} | fields)
    payload, manifest = module_to_bytes(tensors, manifest)
    saved = {"manifest": manifest, "tensors": tensors, "autoencoder": ema.state_dict(), "seconds": seconds,
             "bytes": len(payload)}
    torch.save(saved, path)
    print(f"class {c}: {seconds:.1f}s, {len(payload)} bytes, blur {fields['blur_sigma']}", flush=True)
    return saved


@torch.no_grad()
def reconstructions(saved: dict, images: np.ndarray, seed: int) -> np.ndarray:
    """D(E(x)) of uint8 images, plus a draw of the module's residual noise when it has one."""
    m = saved["manifest"]
    ae = build_network("aegmm", tuple(m["image_shape"]), m["network"])
    ae.load_state_dict(saved["autoencoder"])
    x = torch.cat([ae(torch.from_numpy(to_float(images[i:i + 1000]))) for i in range(0, len(images), 1000)])
    r = m["network"].get("residual_rank", 0)
    if r:
        x = add_residual(x, saved["tensors"], torch.randn(len(x), r, generator=torch.Generator().manual_seed(seed)))
    return to_uint8(x.clamp(-1, 1).numpy())


@torch.no_grad()
def features(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """The classifier's penultimate activations (after global average pooling), (N, 4 x width)."""
    body = model[:-1]  # everything but the linear head
    return torch.cat([body(torch.from_numpy(to_float(images[i:i + 1000]))) for i in range(0, len(images), 1000)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): a point is covered by a set when it lies inside
    some member's ball reaching that member's k-th nearest neighbour within the set."""
    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is its own nearest neighbour

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (fake, real)
    precision = (d <= r_real[None]).any(1).float().mean().item()
    recall = (d <= r_fake[:, None]).any(0).float().mean().item()
    return precision, recall


def per_class(m: dict) -> list[float]:
    return [round(a, 3) for a in m["per_class_accuracy"].values()]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True, help="name of the module set (cache key)")
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--set", nargs="*", default=[], help="generator overrides key=value")
    p.add_argument("--cls", nargs="*", default=[], help="classifier overrides key=value")
    p.add_argument("--samples", type=int, default=3000, help="images per class for every classifier")
    p.add_argument("--fresh", type=int, default=3, help="the classifier-side row: this many times the samples and "
                   "epochs (0: skip it)")
    p.add_argument("--stages", default="real,recon,synthetic", help="which classifiers to train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/runs/diagnose")
    p.add_argument("--results", default="benchmarks/results/diagnose-fashion-mnist.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, [f"generator.{s}" for s in args.set] + [f"classifier.{s}" for s in args.cls])
    gcfg, ccfg = cfg.generator, cfg.classifier
    train, _ = load_dataset("fashion-mnist", None, 0)
    fit_rows, val_rows = validation_split(train.labels)
    fit, val = train.subset(fit_rows), train.subset(val_rows)
    names = train.class_names
    out = Path(args.out) / args.variant
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    saved = [train_cell(fit.images[fit.labels == c], gcfg, c, names[c], out / f"class-{c}.pt")
             for c in range(train.num_classes)]
    modules = [Module(s["manifest"], s["tensors"]) for s in saved]
    blur = float(np.mean([s["manifest"]["training"]["blur_sigma"] for s in saved])) if ccfg.match_sharpness else 0.0
    rng = np.random.default_rng(7)
    subset = [np.flatnonzero(fit.labels == c)[rng.permutation((fit.labels == c).sum())[:args.samples]]
              for c in range(train.num_classes)]
    labels = np.repeat(np.arange(train.num_classes), args.samples)

    # The feature network: all client images, no augmentation, no blur; cached with the modules' data.
    feat_path = Path(args.out) / "features.pt"
    fcfg = load_config(args.config, ["classifier.augment=none"]).classifier
    if feat_path.exists():
        feat_net = torch.load(feat_path, weights_only=False)
    else:
        feat_net = train_classifier(fit.images, fit.labels, train.num_classes, fcfg, 11, device, progress=False)
        torch.save(feat_net, feat_path)
    feat_val = features(feat_net, val.images)
    feat_acc = evaluate(predict_proba(feat_net, val.images, device), val.labels, names)["accuracy"]

    sets = {}
    if "real" in args.stages:
        sets["real"] = (fit.images[np.concatenate(subset)], labels, ccfg)
    if "recon" in args.stages:
        recon = np.concatenate([reconstructions(saved[c], fit.images[subset[c]], derive_seed(3, c))
                                for c in range(train.num_classes)])
        sets["recon"] = (recon, labels, ccfg)
    images, syn_labels, _ = synthesize(modules, train.num_classes, args.samples, 0, device, progress=False)
    if "synthetic" in args.stages:
        sets["synthetic"] = (images, syn_labels, ccfg)
    if args.fresh:
        more, more_labels, _ = synthesize(modules, train.num_classes, args.fresh * args.samples, 1, device,
                                          progress=False)
        sets[f"synthetic x{args.fresh}"] = (more, more_labels,
                                            load_config(args.config, [f"classifier.{s}" for s in args.cls] + [
                                                f"classifier.epochs={ccfg.epochs * args.fresh}"]).classifier)

    rows = {}
    for name, (x, y, recipe) in sets.items():
        t0 = time.perf_counter()
        model = train_classifier(x, y, train.num_classes, recipe, 1, device, progress=False, input_blur=blur)
        m = evaluate(predict_proba(model, val.images, device), val.labels, names)
        confusion = np.asarray(m["confusion_matrix"]) if "confusion_matrix" in m else None
        rows[name] = {"val_accuracy": round(m["accuracy"], 4), "per_class": per_class(m),
                      "seconds": round(time.perf_counter() - t0, 1)}
        if confusion is not None:
            rows[name]["confusion"] = confusion.tolist()
        print(name, json.dumps(rows[name]), flush=True)

    # Fidelity and coverage of the samples, per class, against the held-out validation images.
    pr = []
    for c in range(train.num_classes):
        real_f = feat_val[val.labels == c]
        fake_f = features(feat_net, images[syn_labels == c][:len(real_f)])
        pr.append([round(v, 3) for v in precision_recall(real_f, fake_f)])
        if "recon" in sets:
            rec_f = features(feat_net, sets["recon"][0][labels == c][:len(real_f)])
            pr[-1] += [round(v, 3) for v in precision_recall(real_f, rec_f)]
    row = {"variant": args.variant, "generator": dict(s.split("=", 1) for s in args.set),
           "classifier": dict(s.split("=", 1) for s in args.cls), "samples_per_class": args.samples,
           "input_blur": round(blur, 4), "feature_net_val_accuracy": round(feat_acc, 4), "classifiers": rows,
           "precision_recall": pr, "train_s_per_module": round(float(np.mean([s["seconds"] for s in saved])), 1),
           "bytes_per_module": int(np.mean([s["bytes"] for s in saved])),
           "seconds": round(time.perf_counter() - t_start, 1), **provenance(__file__, sys.argv[1:])}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "classifiers"}), flush=True)


if __name__ == "__main__":
    main()
