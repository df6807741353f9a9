"""Quality sweep on a validation split: which generator and classifier recipe make the best synthetic data.

Protocol: Fashion-MNIST training set; validation = 1,000 images per class
(a permutation of each class's rows drawn with numpy.random.default_rng(123), first 1,000), given to no
client. Silos: client c trains one module on the other 5,000 images of class c. The classifier is scored on
the validation images; the test set is never read here.

Each variant is a set of GeneratorConfig overrides; its modules are trained through the package's own
`train_module`, cached under --out, and scored with every classifier recipe asked for.

  python benchmarks/quality.py --variant preset500 --set steps=500 --blur 0.8,1.5

Another preset's dataset with --config (its training set only); digits, about 144 images a class, holds out 40:

  python benchmarks/quality.py --config digits --val-per-class 40 --variant digits-s200 --set steps=200
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fedfactory.generative.train as train_lib  # noqa: E402
import fedfactory.privacy.dp as dp  # noqa: E402
from fedfactory.classifier import predict_log_proba, predict_proba, train_classifier  # noqa: E402
from fedfactory.config import load_config  # noqa: E402
from fedfactory.data.datasets import load_data  # noqa: E402
from fedfactory.data.partition import split_clients  # noqa: E402
from fedfactory.federation.client import client_plans, train_client_module  # noqa: E402
from fedfactory.federation.factory import expert_recipe, local_training_set, product_of_experts, synthesize  # noqa: E402
from fedfactory.generative.train import plan_training, train_module  # noqa: E402
from fedfactory.metrics import evaluate  # noqa: E402
from fedfactory.modules.files import module_to_bytes  # noqa: E402
from fedfactory.modules.ids import module_id  # noqa: E402
from fedfactory.registry import Module  # noqa: E402
from fedfactory.runs import provenance  # noqa: E402
from fedfactory.seeding import derive_seed  # noqa: E402


def validation_split(labels: np.ndarray, per_class: int = 1000, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
    """(client rows, validation rows): per_class rows of every class held out, as in the protocol above."""
    rng = np.random.default_rng(seed)
    val = []
    for c in range(int(labels.max()) + 1):
        rows = np.flatnonzero(labels == c)
        val.append(rows[rng.permutation(len(rows))[:per_class]])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def load_cached(path: Path, num_images: int, image_shape: list[int]) -> dict:
    """A cached module, refused if it was trained on other images (the cache key is only the variant's name, so
    another --config, --val-per-class or --data under the same name would otherwise be scored silently)."""
    saved = torch.load(path, weights_only=False)
    m = saved["manifest"]
    if m["num_samples"] != num_images or list(m["image_shape"]) != image_shape:
        raise SystemExit(f"{path}: cached for {m['num_samples']} images of shape {m['image_shape']}, this row has "
                         f"{num_images} of {image_shape}; name another --variant or delete {path.parent}")
    return saved


def truncate_residual(manifest: dict, tensors: dict, rank: int) -> tuple[dict, dict]:
    """The module with only its first `rank` residual directions (0 drops the residual model)."""
    if rank > manifest["network"].get("residual_rank", 0):
        raise SystemExit(f"--residual-rank {rank}: the modules were trained with a lower rank")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("residual.") or rank}
    if rank:
        tensors["residual.basis"] = tensors["residual.basis"][:rank].contiguous()
    return {**manifest, "network": {**manifest["network"], "residual_rank": rank}}, tensors


def saved_module(tensors: dict, manifest: dict, seconds: float, path: Path) -> dict:
    """Serialize a freshly trained module as the registry would (for its byte count) and cache it at path."""
    payload, manifest = module_to_bytes(tensors, manifest)
    saved = {"manifest": manifest, "tensors": tensors, "seconds": seconds, "bytes": len(payload)}
    torch.save(saved, path)
    return saved


def summary(results: Path) -> str:
    """The sweep's rows as one Markdown table, in the order they ran."""
    lines = ["# Quality sweep on the validation split (Fashion-MNIST silos)", "",
             "Protocol: `benchmarks/quality.py` docstring. Every row is validation accuracy (1,000 held-out training",
             "images per class); the test set is never read. Rows run with one torch thread beside other jobs, so",
             "their seconds are inflated; compare accuracies, not times.", "",
             "| variant | mode | generator | classifier | residual rank | input blur | samples/class | epochs | "
             "val accuracy | shirt | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in results.read_text().splitlines():
        r = json.loads(line)
        show = lambda d: " ".join(f"{k}={v}" for k, v in d.items()) or "preset"  # noqa: E731
        mode = r.get("mode", "server") + (f" ({r['local_synthetic']} synthetic)" if r.get("local_synthetic") else "")
        lines.append(f"| {r['variant']} | {mode} | {show(r['generator'])} | "
                     f"{show(r.get('classifier', {}))} | {r.get('residual_rank', 16)} | {r['blur']} | "
                     f"{r['samples_per_class']} | {r['epochs']} | {r['val_accuracy']:.4f} | {r['per_class'][6]:.3f} | "
                     f"{(r.get('git_commit') or 'before provenance')[:12]} |")
    return "\n".join(lines) + "\n"


def set_dp_constants(items: list[str]) -> None:
    """--dp-constant NAME=VALUE: set an upper-case constant of privacy/dp.py or generative/train.py, for exploration
    only (a module trained so is not what the package would train; its row records the constants)."""
    for item in items:
        name, sep, value = item.partition("=")
        owner = next((m for m in (dp, train_lib) if hasattr(m, name)), None)
        if not sep or owner is None or not name.isupper():
            raise SystemExit(f"--dp-constant {item!r}: expected NAME=VALUE with NAME a constant of privacy/dp.py or "
                             "generative/train.py, e.g. RFF_FEATURES=2048")
        try:
            setattr(owner, name, type(getattr(owner, name))(json.loads(value)))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"--dp-constant {item!r}: {value!r} is not a JSON value of {name}'s type "
                             f"({type(getattr(owner, name)).__name__}): {e}") from None


def main():
    if sys.argv[1:2] == ["--summary"]:
        results = Path("benchmarks/results/quality-sweep.jsonl")
        results.with_suffix(".md").write_text(summary(results))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True, help="name of the module set (cache key)")
    p.add_argument("--config", default="fashion-mnist")
    p.add_argument("--set", nargs="*", default=[], help="generator overrides key=value")
    p.add_argument("--cls", nargs="*", default=[], help="classifier overrides key=value")
    p.add_argument("--privacy", nargs="*", default=[], help="privacy overrides key=value (private modules)")
    p.add_argument("--data", nargs="*", default=[],
                   help="data overrides key=value (e.g. partition=dirichlet alpha=0.1): the fit rows are split among "
                        "clients as a run splits its training set, and every cell's module is the package's own "
                        "(client_plans, train_client_module); without it, silos (client c holds class c)")
    p.add_argument("--tag", default="", help="name of the classifier recipe in the results")
    p.add_argument("--blur", default="", help="classifier input blur sigmas (default: the clients' mean)")
    p.add_argument("--samples", type=int, default=3000, help="synthetic images per class")
    p.add_argument("--epochs", type=int, default=0, help="classifier epochs (default: the config's)")
    p.add_argument("--val-per-class", type=int, default=1000,
                   help="validation images held out per class (digits holds about 144 a class: use 40)")
    p.add_argument("--residual-rank", type=int, default=-1,
                   help="keep only the first N residual directions (an exact SVD's truncation is the rank-N fit)")
    p.add_argument("--local", action="store_true", help="score local mode (product of experts) instead")
    p.add_argument("--local-synthetic", default="missing", help="local mode's synthesis.local_synthetic")
    p.add_argument("--save-log-probs", default="",
                   help="local mode: also write every expert's validation log-probabilities to this .npz")
    p.add_argument("--classes", default="", help="only these classes (module timing only)")
    p.add_argument("--root-seed", type=int, default=0, help="root seed of the modules' training seeds (cache key)")
    p.add_argument("--with", dest="extra", default="",
                   help="also synthesize from this cached variant's modules (several modules per cell): each class's "
                        "images are split between its modules in proportion to their image counts")
    p.add_argument("--dp-constant", nargs="*", default=[], metavar="NAME=VALUE",
                   help="exploration only: set a module constant of the private embedding (RFF_FEATURES, "
                        "RFF_SCALES in privacy/dp.py) for this variant; the decoder's steps, step size and latents "
                        "per step are config keys (--privacy decoder_steps=... decoder_batch_size=...)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="server mode: K classifiers, member k trained on its own synthetic set (synthesis seed k, "
                        "classifier seed 1 + k); reports every member and the mean-probability ensemble of 1..K")
    p.add_argument("--ensemble-data", choices=["fresh", "same"], default="fresh",
                   help="fresh: member k synthesizes its own set (seed k); same: every member trains on set 0")
    p.add_argument("--save-probs", default="", help="server mode: write every member's validation probabilities "
                                                    "to this .npz")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 stays fast beside another job)")
    p.add_argument("--out", default="benchmarks/runs/quality")
    p.add_argument("--results", default="benchmarks/results/quality-sweep.jsonl")
    args = p.parse_args()
    if args.data and (args.extra or args.classes or args.local or args.root_seed):
        p.error("--data trains the split's own modules (seeded by the config's run.seed); it cannot be combined with "
                "--with, --classes, --local or --root-seed, which assume silos")
    if args.ensemble < 1 or (args.local and args.ensemble > 1):
        p.error(f"--ensemble {args.ensemble}: must be >= 1, and 1 with --local (local mode combines its experts)")
    torch.set_num_threads(args.threads)
    set_dp_constants(args.dp_constant)
    device = torch.device("cpu")
    # The package's own override parser: types are checked and an unknown key is refused with the valid ones.
    cfg = load_config(args.config, [f"generator.{s}" for s in args.set] + [f"classifier.{s}" for s in args.cls]
                      + [f"privacy.{s}" for s in args.privacy] + [f"data.{s}" for s in args.data]
                      + [f"classifier.epochs={args.epochs}"] * (args.epochs > 0)
                      + [f"synthesis.local_synthetic={args.local_synthetic}"])
    gcfg, ccfg = cfg.generator, cfg.classifier
    overrides = {k: getattr(gcfg, k) for k, _ in (s.split("=", 1) for s in args.set)}
    train, _ = load_data(cfg.data)  # the config's dataset; only its training set is read
    fit_rows, val_rows = validation_split(train.labels, args.val_per_class)
    fit, val = train.subset(fit_rows), train.subset(val_rows)
    smallest = int(np.bincount(train.labels, minlength=train.num_classes).min())
    if not 1 <= args.val_per_class < smallest:
        p.error(f"--val-per-class {args.val_per_class}: must be >= 1 and leave every class training images (the "
                f"smallest class of {args.config} has {smallest})")
    shape = [train.images.shape[3], train.images.shape[1], train.images.shape[2]]

    cached = []  # every module's saved dict: manifest, tensors, training seconds, bytes
    if args.data:
        # A split of the fit rows, seeded like a run's (data.partition.split_clients); the validation rows stay out.
        out = Path(args.out) / args.variant
        out.mkdir(parents=True, exist_ok=True)
        for k, rows in enumerate(split_clients(cfg.data, cfg.run.seed, fit)):
            client = fit.subset(rows)
            for mid, plan in client_plans(client, k, cfg).items():
                path = out / f"{mid}.pt"
                if path.exists():
                    saved = load_cached(path, plan.num_images, shape)
                else:
                    t0 = time.perf_counter()
                    manifest, tensors = train_client_module(client, plan, gcfg, device, progress=False)
                    saved = saved_module(tensors, manifest, time.perf_counter() - t0, path)
                print(f"{mid}: {plan.num_images} images, {plan.training.steps} steps, {saved['seconds']:.1f}s",
                      flush=True)
                cached.append(saved)
    sets = [] if args.data else [(args.variant, 0)] + ([(args.extra, train.num_classes)] if args.extra else [])
    for (variant, client0), c in ((v, c) for v in sets for c in range(train.num_classes)):
        # A second set's module of class c comes from a virtual client c + 10, so module ids stay distinct.
        out = Path(args.out) / variant
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"class-{c}.pt"
        if path.exists():
            saved = load_cached(path, int((fit.labels == c).sum()), shape)
            if client0:
                saved["manifest"] = {**saved["manifest"], "module_id": module_id(client0 + c, c),
                                     "client_id": client0 + c}
        elif client0:
            raise SystemExit(f"--with {variant}: no cached module {path}; train that variant first")
        else:
            images = fit.images[fit.labels == c]
            t0 = time.perf_counter()
            plan = plan_training(gcfg, len(images), derive_seed(args.root_seed, "train", c, c), cfg.privacy)
            tensors, fields = train_module(images, gcfg, plan, device, desc=f"class {c}", progress=False)
            seconds = time.perf_counter() - t0
            manifest = {"module_id": module_id(c, c), "client_id": c, "class_id": c,
                        "class_name": train.class_names[c], "num_samples": int(len(images))} | fields
            saved = saved_module(tensors, manifest, seconds, path)
            print(f"class {c}: {seconds:.1f}s {saved['bytes']} bytes blur {fields['training'].get('blur_sigma')}",
                  flush=True)
        cached.append(saved)
    modules = [Module(m["manifest"], m["tensors"]) for m in cached]
    train_s, sizes = [m["seconds"] for m in cached], [m["bytes"] for m in cached]
    blurs = [m["manifest"]["training"].get("blur_sigma", 0.0) for m in cached]
    if args.classes:
        return
    if args.residual_rank >= 0:
        modules = [Module(*truncate_residual(m, t, args.residual_rank)) for m, t in modules]
    t0 = time.perf_counter()
    images, labels, _ = synthesize(modules, train.num_classes, args.samples, 0, device, progress=False)
    sample_s = time.perf_counter() - t0
    cls = {k: getattr(ccfg, k) for k, _ in (s.split("=", 1) for s in args.cls)}
    sigmas = [float(s) for s in args.blur.split(",")] if args.blur else [float(np.mean(blurs))]
    for sigma in sigmas:
        t0 = time.perf_counter()
        if args.local:
            # Silos in local mode: client c trains an expert on its real images of c plus the synthetic set the
            # package's local mode gives it (synthesis.local_synthetic); the experts combine as a product of experts.
            log_probs = []
            for c in range(train.num_classes):
                x, y, _ = local_training_set(fit.subset(np.flatnonzero(fit.labels == c)), modules, args.samples, 0,
                                             device, cfg.synthesis.batch_size, cfg.synthesis.local_synthetic)
                expert = train_classifier(x, y, train.num_classes, expert_recipe(ccfg), derive_seed(1, "expert", c),
                                          device, progress=False, input_blur=sigma)
                log_probs.append(predict_log_proba(expert, val.images, device))
            proba = product_of_experts(log_probs)
            if args.save_log_probs:
                # For choosing how experts combine (benchmarks/combine.py) on validation, without retraining them.
                np.savez_compressed(args.save_log_probs, log_probs=np.stack(log_probs), labels=val.labels)
        else:
            members = []
            for k in range(args.ensemble):
                # Member 0 is the single classifier of every other row; member k > 0 sees a synthetic set of its
                # own, so the members differ in their data as well as in their initialisation.
                if k and args.ensemble_data == "fresh":
                    images, labels, _ = synthesize(modules, train.num_classes, args.samples, k, device,
                                                   progress=False)
                model = train_classifier(images, labels, train.num_classes, ccfg, 1 + k, device,
                                         progress=False, input_blur=sigma)
                members.append(predict_proba(model, val.images, device))
                single = evaluate(members[-1], val.labels, val.class_names)["accuracy"]
                joint = evaluate(np.mean(members, 0), val.labels, val.class_names)["accuracy"]
                print(f"member {k}: val {single:.4f}; ensemble of {k + 1}: {joint:.4f}", flush=True)
            proba = np.mean(members, 0)
            if args.save_probs:
                np.savez_compressed(args.save_probs, probs=np.stack(members), labels=val.labels)
        m = evaluate(proba, val.labels, val.class_names)
        row = {"config": args.config, "variant": args.variant + (f"+{args.extra}" if args.extra else ""),
               "generator": overrides, "val_per_class": args.val_per_class,
               "data": {k: getattr(cfg.data, k) for k, _ in (s.split("=", 1) for s in args.data)},
               "classifier": cls,
               "dp_constants": args.dp_constant,
               "privacy": {k: getattr(cfg.privacy, k) for k, _ in (s.split("=", 1) for s in args.privacy)},
               "mode": "local" if args.local else "server", "tag": args.tag,
               "local_synthetic": args.local_synthetic if args.local else None,
               "residual_rank": modules[0][0]["network"].get("residual_rank", 0),
               "blur": sigma, "clients_blur": blurs, "samples_per_class": args.samples, "epochs": ccfg.epochs,
               "ensemble": 1 if args.local else args.ensemble, "ensemble_data": args.ensemble_data,
               "val_accuracy": round(m["accuracy"], 4),
               "per_class": [round(a, 3) for a in m["per_class_accuracy"].values()],
               "train_s_per_module": round(float(np.mean(train_s)), 1), "bytes_per_module": int(np.mean(sizes)),
               "sample_s": round(sample_s, 1), "classifier_s": round(time.perf_counter() - t0, 1),
               **provenance(__file__, sys.argv[1:])}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
