"""The in-process runner: every client and the server in one process, writing one run directory.

Stages, each a call into the client or factory functions that the Flower apps call too:
load data -> partition -> client modules (G_{k,c}, one file each) -> synthesis -> classifier -> evaluation.
"""

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from fedfactory.classifier import predict_log_proba, predict_proba, train_classifier
from fedfactory.config import Config, config_hash, to_toml
from fedfactory.data.datasets import ImageDataset, load_dataset
from fedfactory.data.partition import class_histogram, format_histogram, partition
from fedfactory.device import select_device
from fedfactory.errors import FedFactoryError
from fedfactory.federation.client import held_classes, train_client_module
from fedfactory.federation.factory import load_registry, module_spec, synthesize, trained_as_asked
from fedfactory.generative.artifact import ModuleError, load_module, module_filename, module_id, save_module
from fedfactory.metrics import evaluate, format_table
from fedfactory.report import write_report
from fedfactory.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stale_temp_files
from fedfactory.seeding import derive_seed

log = logging.getLogger("fedfactory")


class RunDirError(FedFactoryError, ValueError):
    """The run directory belongs to a different config or cannot be used."""


@dataclass
class Timer:
    timings: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings.get(phase, 0.0) + seconds, 3)


def has_results(out: Path) -> bool:
    """Whether a run directory holds anything a run computed: a module, a classifier or metrics."""
    return ((out / "metrics.json").exists() or (out / "classifier.safetensors").exists()
            or any((out / "modules").glob("*.safetensors")))


def check_run_dir(cfg: Config) -> None:
    """Refuse run.out if it holds results of a different config (or results with no readable config.toml).

    A directory with a different (or unreadable, or missing) config.toml is refused as soon as it holds results,
    so two configs never mix; one without results (a run that failed before its first module) may be taken over.
    """
    from fedfactory.config import ConfigError, load_config

    out = Path(cfg.run.out)
    saved = out / "config.toml"
    fix = f"choose another run.out or delete {out}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run.out={out} is a file, not a directory; choose another run.out")
    if out.exists() and has_results(out):
        if not saved.is_file():
            raise RunDirError(f"{out} holds results but no config.toml to match them to this config; {fix}")
        try:
            same = config_hash(load_config(str(saved))) == config_hash(cfg)
        except ConfigError as e:
            raise RunDirError(f"{saved} is not a config this fedfactory reads ({e}); {fix}") from None
        if not same:
            raise RunDirError(f"{out} holds a run with a different config; {fix}")


def prepare_run_dir(cfg: Config) -> Path:
    """Create runs/<name>/ or reuse it when its config.toml equals this config (check_run_dir); write config.toml.

    Temp files of writes cut short by a kill are deleted: one run per directory at a time.
    """
    check_run_dir(cfg)
    out = Path(cfg.run.out)
    saved = out / "config.toml"
    out.mkdir(parents=True, exist_ok=True)
    (out / "modules").mkdir(exist_ok=True)
    for folder in (out, *sorted(p for p in out.iterdir() if p.is_dir())):  # modules/, experts/, ...
        for name in remove_stale_temp_files(folder):
            log.info("removed %s, left by an interrupted write", folder / name)
    atomic_write_text(saved, to_toml(cfg))
    return out


def setup_logging(out: Path) -> None:
    """Log to stdout and to <run>/log.txt (appending, so a resumed run keeps its history)."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(), logging.FileHandler(out / "log.txt")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    return load_dataset(cfg.data.dataset, cfg.data.root or None, cfg.data.image_size)


def split_clients(cfg: Config, train: ImageDataset) -> list[np.ndarray]:
    """The partition of the training rows among clients, seeded by ("partition",)."""
    d = cfg.data
    return partition(train.labels, d.partition, d.num_clients, derive_seed(cfg.run.seed, "partition"),
                     num_classes=train.num_classes, classes_per_client=d.classes_per_client, alpha=d.alpha,
                     min_partition_size=d.min_partition_size, groups=train.groups)


def write_partition(cfg: Config, train: ImageDataset, parts: list[np.ndarray], out: Path) -> None:
    """partition.json (scheme, class histogram, row indices per client), and the histogram in the log."""
    hist = class_histogram(train.labels, parts, train.num_classes)
    atomic_write_json(out / "partition.json", {
        "scheme": cfg.data.partition, "num_clients": len(parts), "class_names": list(train.class_names),
        "histogram": hist.tolist(), "indices": [p.tolist() for p in parts]})
    log.info("partition (%s), samples per client and class:\n%s", cfg.data.partition,
             format_histogram(hist, train.class_names))


def reusable_module(path: Path, cfg: Config) -> bool:
    """A finished module from an earlier attempt is reused only if it validates and was trained as asked."""
    if not path.exists():
        return False
    try:
        manifest, _ = load_module(path, expected=module_spec)
    except ModuleError as e:
        log.info("retraining %s: %s", path.name, e)
        return False
    if reason := trained_as_asked(manifest, cfg):
        log.info("retraining %s: %s", path.name, reason)
        return False
    return True


def train_all_modules(cfg: Config, train: ImageDataset, parts: list[np.ndarray], out: Path,
                      device: torch.device, timer: Timer) -> None:
    """Every client trains its modules; each is written atomically to the registry directory."""
    for k, rows in enumerate(parts):
        client = train.subset(rows)
        counts = held_classes(client)
        held = {c: n for c, n in counts.items() if n >= cfg.generator.min_samples}
        few = {c: n for c, n in counts.items() if c not in held}
        if few:
            log.info("client %d: no module for %s (fewer than generator.min_samples=%d images)", k,
                     ", ".join(f"class {c} ({n} images)" for c, n in few.items()), cfg.generator.min_samples)
        for c, n in held.items():
            path = out / "modules" / module_filename(module_id(k, c))
            if reusable_module(path, cfg):
                log.info("reusing %s (hash checked)", path.name)
                continue
            t0 = time.perf_counter()
            tensors, manifest = train_client_module(client, k, c, cfg.generator, cfg.run.seed, device,
                                                    progress=cfg.run.progress)
            save_module(path, tensors, manifest)
            dt = time.perf_counter() - t0
            timer.add("client_training", dt)
            log.info("client %d class %d (%s): %d images, %d steps in %.1fs, %d bytes", k, c, client.class_names[c],
                     n, cfg.generator.steps, dt, path.stat().st_size)


class TrainingError(FedFactoryError, ValueError):
    """A classifier came out of training with NaN or Inf weights: its loss diverged."""


def save_classifier(model: torch.nn.Module, path: Path) -> None:
    """Write the classifier's weights as safetensors, atomically; refuses weights that are not finite."""
    # A NaN loss leaves NaN weights, whose predictions would still give a (meaningless) accuracy.
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"{path.stem}: training diverged, tensors {', '.join(bad[:3])} hold NaN or Inf; lower "
                            "classifier.lr or check the training images")
    # Serialized in memory: a temp file of our own would outlive a kill, and only atomic_write_bytes cleans up.
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def save_samples_png(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], path: Path,
                     per_class: int = 10) -> None:
    """A grid with one row of synthetic samples per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class * 0.6, len(class_names) * 0.6 + 0.2))
    axes = np.atleast_2d(axes)
    for c, name in enumerate(class_names):
        rows = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(rows):
                img = images[rows[j]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_title(name, fontsize=6, loc="left")
    fig.tight_layout(pad=0.1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def input_blur(cfg: Config, modules: list) -> float:
    """The classifier's input low-pass sigma: the mean of the blur the clients measured, if matching is on."""
    sigmas = [m["training"].get("blur_sigma", 0.0) for m, _ in modules]
    return round(float(np.mean(sigmas)), 4) if cfg.classifier.match_sharpness and sigmas else 0.0


def centralized_reference(cfg: Config, train: ImageDataset, test: ImageDataset, device: torch.device, timer: Timer,
                          blur: float, metrics: dict) -> list[tuple[str, dict]]:
    """If asked, train the same classifier and recipe on the pooled real data; adds metrics["reference"]."""
    if not cfg.reference.centralized:
        return []
    t0 = time.perf_counter()
    model = train_classifier(train.images, train.labels, train.num_classes, cfg.classifier,
                             derive_seed(cfg.run.seed, "classifier"), device, desc="centralized",
                             progress=cfg.run.progress, input_blur=blur)
    ref = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
    timer.add("reference", time.perf_counter() - t0)
    metrics["reference"] = {"centralized": ref, "accuracy_ratio": metrics["accuracy"] / ref["accuracy"]}
    return [("centralized", ref)]


def write_metrics(cfg: Config, metrics: dict, rows: list[tuple[str, dict]], out: Path, device: torch.device,
                  blur: float) -> str:
    """Add the keys every run records, write metrics.json atomically, return the printed results table."""
    metrics |= {"generator_family": cfg.generator.family, "classifier_input_blur": blur, "device": str(device),
                "config_hash": config_hash(cfg)}
    atomic_write_json(out / "metrics.json", metrics)
    table = format_table(rows)
    if "reference" in metrics:
        table += f"\naccuracy relative to centralized: {metrics['reference']['accuracy_ratio']:.4f}"
    return table


def server_stage(cfg: Config, modules: list, train: ImageDataset, test: ImageDataset, out: Path,
                 device: torch.device, timer: Timer) -> dict:
    """Synthesize a class-balanced set from the modules, train the classifier, evaluate it; write the results.

    `train` supplies class names and, for the centralized reference only, the pooled real data.
    """
    t0 = time.perf_counter()
    images, labels, plan = synthesize(modules, train.num_classes, cfg.synthesis.samples_per_class, cfg.run.seed,
                                      device, cfg.synthesis.batch_size, progress=cfg.run.progress)
    timer.add("synthesis", time.perf_counter() - t0)
    log.info("synthesized %d images from %d modules in %.1fs", len(images), len(modules), timer.timings["synthesis"])
    save_samples_png(images, labels, train.class_names, out / "samples.png")

    blur = input_blur(cfg, modules)
    t0 = time.perf_counter()
    model = train_classifier(images, labels, train.num_classes, cfg.classifier,
                             derive_seed(cfg.run.seed, "classifier"), device, progress=cfg.run.progress,
                             input_blur=blur)
    timer.add("classifier", time.perf_counter() - t0)
    save_classifier(model, out / "classifier.safetensors")

    t0 = time.perf_counter()
    metrics = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
    timer.add("evaluation", time.perf_counter() - t0)
    timer.add("end_to_end", time.perf_counter() - timer.start)

    # Centralized reference: the same classifier and recipe on the pooled real training data.
    rows = [("factory-server", metrics)] + centralized_reference(cfg, train, test, device, timer, blur, metrics)

    sizes = {p.stem: p.stat().st_size for p in sorted((out / "modules").glob("*.safetensors"))}
    per_client: dict[str, int] = {}
    for m, _ in modules:
        per_client[str(m["client_id"])] = per_client.get(str(m["client_id"]), 0) + sizes[m["module_id"]]
    present = {m["class_id"] for m, _ in modules}
    metrics |= {
        "timings": timer.timings,
        "bytes": {"per_module": sizes, "per_client": per_client, "total_up": sum(sizes.values())},
        "synthesis_plan": plan,
        "modules": sorted(sizes),
        "missing_classes": [train.class_names[c] for c in range(train.num_classes) if c not in present],
    }
    table = write_metrics(cfg, metrics, rows, out, device, blur)
    if metrics["missing_classes"]:
        log.info("no module for classes %s: the classifier never sees them", metrics["missing_classes"])
    log.info("results (%s, %d test images):\n%s", test.name, len(test), table)
    log.info("timings (s): %s", json.dumps(timer.timings))
    return metrics


def product_of_experts(log_probs: list[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, C) of a product of experts from each expert's log-probabilities (N, C).

    p(y | x) is proportional to prod_k p_k(y | x): sum the log-softmax outputs, then normalise with a
    log-sum-exp (shifting by the row maximum first), so very confident experts cannot overflow or underflow.
    """
    total = np.sum(np.stack(log_probs), axis=0, dtype=np.float64)
    total -= total.max(axis=1, keepdims=True)
    return np.exp(total - np.log(np.exp(total).sum(axis=1, keepdims=True)))


def expert_path(out: Path, client_id: int) -> Path:
    return out / "experts" / f"client-{client_id:03d}.safetensors"


def local_training_set(client: ImageDataset, modules: list, samples_per_class: int, root_seed: int,
                       device: torch.device, batch_size: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A client's training set in local mode: all its real images, plus, for every class it holds fewer than
    samples_per_class real images of, synthetic images up to samples_per_class.

    A class it lacks is synthesized from the other clients' modules of that class; a class it holds partially is
    topped up from every module of that class it has (the others' and its own), in both cases by
    `factory.synthesize`, mixed in proportion to the modules' real counts n_{k,c}. A class it holds at least
    samples_per_class real images of gets no synthetic images.
    """
    counts = np.bincount(client.labels, minlength=client.num_classes)
    images, labels, plan = [client.images], [client.labels], {}
    for c in range(client.num_classes):
        donors = [(m, t) for m, t in modules if m["class_id"] == c]
        need = samples_per_class - int(counts[c])
        if need <= 0 or not donors:
            continue
        imgs, labs, part = synthesize(donors, client.num_classes, need, root_seed, device, batch_size, progress=False)
        images.append(imgs)
        labels.append(labs)
        plan |= {mid: n for mid, n in part.items() if n}
    return np.concatenate(images), np.concatenate(labels), plan


def local_stage(cfg: Config, modules: list, parts: list[np.ndarray], train: ImageDataset, test: ImageDataset,
                out: Path, device: torch.device, timer: Timer, modules_dir: Path | None = None) -> dict:
    """Local mode: each client with data trains an expert on its real data and the modules it receives (every
    other client's); the experts' predictions are combined as a product of experts. Writes experts/ and
    metrics.json to `out`; module sizes come from modules_dir (default out/modules).
    """
    modules_dir = modules_dir or out / "modules"
    sizes = {p.stem: p.stat().st_size for p in sorted(modules_dir.glob("*.safetensors"))}
    blur = input_blur(cfg, modules)
    (out / "experts").mkdir(exist_ok=True)
    log_probs, plans, expert_accuracy, down = [], {}, {}, {}
    for k, rows in enumerate(parts):
        if len(rows) == 0:
            continue  # a client whose every row was withdrawn has no data, no modules and no expert
        client = train.subset(rows)
        # Client k's own modules never travel; it receives every other client's.
        down[str(k)] = sum(sizes[m["module_id"]] for m, _ in modules if m["client_id"] != k)

        t0 = time.perf_counter()
        images, labels, plans[str(k)] = local_training_set(client, modules, cfg.synthesis.samples_per_class,
                                                           cfg.run.seed, device, cfg.synthesis.batch_size)
        timer.add("synthesis", time.perf_counter() - t0)

        t0 = time.perf_counter()
        model = train_classifier(images, labels, train.num_classes, cfg.classifier,
                                 derive_seed(cfg.run.seed, "classifier", k), device, desc=f"expert {k}",
                                 progress=cfg.run.progress, input_blur=blur)
        timer.add("classifier", time.perf_counter() - t0)
        save_classifier(model, expert_path(out, k))

        t0 = time.perf_counter()
        log_probs.append(predict_log_proba(model, test.images, device))
        expert_accuracy[str(k)] = float((log_probs[-1].argmax(1) == test.labels).mean())
        timer.add("evaluation", time.perf_counter() - t0)
        log.info("expert %d: %d real + %d synthetic images, alone %.4f on the test set", k, len(client),
                 len(images) - len(client), expert_accuracy[str(k)])
    if not log_probs:
        raise ValueError("local mode: no client holds any data, so there is no expert to combine")

    t0 = time.perf_counter()
    metrics = evaluate(product_of_experts(log_probs), test.labels, test.class_names)
    timer.add("evaluation", time.perf_counter() - t0)
    timer.add("end_to_end", time.perf_counter() - timer.start)

    rows = [("factory-local", metrics)] + centralized_reference(cfg, train, test, device, timer, blur, metrics)

    per_client: dict[str, int] = {}
    for m, _ in modules:
        per_client[str(m["client_id"])] = per_client.get(str(m["client_id"]), 0) + sizes[m["module_id"]]
    held = {c for rows_k in parts for c in np.unique(train.labels[rows_k]).tolist()}
    metrics |= {
        "mode": "local",
        "timings": timer.timings,
        "bytes": {"per_module": sizes, "per_client": per_client, "total_up": sum(sizes.values()),
                  "down_per_client": down, "total_down": sum(down.values())},
        "synthesis_plan": plans,
        "expert_accuracy": expert_accuracy,
        "experts": sorted(expert_accuracy, key=int),
        "modules": sorted(sizes),
        "missing_classes": [train.class_names[c] for c in range(train.num_classes) if c not in held],
    }
    table = write_metrics(cfg, metrics, rows, out, device, blur)
    log.info("results (%s, %d test images, product of %d experts):\n%s", test.name, len(test), len(log_probs), table)
    log.info("timings (s): %s", json.dumps(timer.timings))
    return metrics


def start_run(cfg: Config, kind: str = "run"):
    """Open the run directory and its log, choose the device, load the data and write the partition.

    Shared by the in-process runner and the Flower server; returns (out, device, timer, train, test, parts).
    """
    # Every refusal (run directory, dataset files, partition) comes before the first write: a run that cannot
    # start leaves no directory behind, and an existing one untouched.
    check_run_dir(cfg)
    device = select_device(cfg.run.device, cfg.run.threads)
    timer = Timer()
    t0 = time.perf_counter()
    train, test = load_data(cfg)
    parts = split_clients(cfg, train)
    timer.add("data", time.perf_counter() - t0)
    out = prepare_run_dir(cfg).resolve()
    setup_logging(out)
    log.info("%s %s on %s, config %s", kind, out, device, config_hash(cfg)[:12])
    write_partition(cfg, train, parts, out)
    return out, device, timer, train, test, parts


def run(cfg: Config) -> dict:
    """Run the whole method in one process; returns the metrics written to metrics.json."""
    out, device, timer, train, test, parts = start_run(cfg)

    # Clients: one module per held class, trained from scratch.
    train_all_modules(cfg, train, parts, out, device, timer)

    # Server mode: validate the registry, synthesize, train and evaluate the classifier.
    # Local mode: every client trains an expert on its data and the modules it receives; experts are multiplied.
    if cfg.classifier.mode == "local":
        metrics = local_stage(cfg, load_registry(out / "modules"), parts, train, test, out, device, timer)
    else:
        metrics = server_stage(cfg, load_registry(out / "modules"), train, test, out, device, timer)
    log.info("report: %s", write_report(out, device=device))
    return metrics
