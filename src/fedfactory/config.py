"""Frozen per-stage configs loaded from TOML presets with type-checked `section.key=value` overrides."""

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from fedfactory.errors import FedFactoryError


class ConfigError(FedFactoryError, ValueError):
    """A config file or override is invalid; the message names the key and the valid choices."""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    out: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch; 0 = all cores
    # Processes that train a run's modules (and local mode's experts) side by side, threads split among them
    # (fedfactory.workers); 1 = one after another in this process.
    workers: int = 1
    progress: bool = True  # tqdm bars on stderr


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | fashion-mnist | cifar10 | medmnist:<subset> | isic2019 | imagefolder
    root: str = ""  # directory of the dataset files; "" = the dataset's default location
    # imagefolder: the global class list, comma-separated (a Flower run-config value is a scalar); index = position.
    classes: str = ""
    test_root: str = ""  # a folder of <class>/*.png to evaluate on instead of the dataset's test split
    image_size: int = 0  # resize square images to this size; 0 = native
    partition: str = "pathological"  # iid | pathological | dirichlet | natural
    num_clients: int = 10
    classes_per_client: int = 1
    alpha: float = 0.5  # Dirichlet concentration
    min_partition_size: int = 10


@dataclass(frozen=True)
class GeneratorConfig:
    family: str = "aegmm"  # aegmm (autoencoder + Gaussian mixture) | edm (pixel diffusion)
    steps: int = 3000  # optimizer steps per module (the most, with steps_per_image)
    steps_per_image: float = 0.0  # > 0: a module of n images trains min(steps, max(min_steps, n * this)) steps
    min_steps: int = 200  # the floor of that data-proportional budget (train.planned_steps)
    max_epochs: int = 0  # > 0: no module trains more than this many passes over its images (0 = no cap)
    batch_size: int = 64
    lr: float = 2e-3
    channels: int = 32  # base width of the network
    latent_dim: int = 32  # aegmm: latent size
    mixture_components: int = 20  # aegmm: Gaussian mixture components
    residual_rank: int = 0  # aegmm: principal components of the reconstruction residual added back as noise
    # aegmm: one residual model of that rank per mixture component (the residuals of the images it explains best)
    # instead of one for the class; each sample draws from its own component's (aegmm.fit_component_residuals).
    # Nothing to do at residual_rank 0, so `generator.residual_rank=0` alone turns the residual off (privacy needs it).
    residual_per_component: bool = False
    sampler_steps: int = 18  # edm: Heun steps
    adversarial: float = 0.0  # aegmm: weight of the patch critic's loss on decoded images (0 = plain autoencoder)
    adversarial_start: float = 0.25  # aegmm: fraction of the steps trained on reconstruction alone first
    # A client trains a module for a class only if it holds at least this many images of it: a module fitted
    # to a handful of images can only replay them. Measured on Fashion-MNIST validation images
    # (benchmarks/results/replay-fashion-mnist.md): near-copies in every class up to 5 images, 0.1-0.2% of samples
    # at 10 to 20, none from 50 on. The class is left to its other holders; a class nobody holds enough of gets no
    # synthetic data (metrics.json: release.classes_without_module, missing_classes).
    min_samples: int = 50


@dataclass(frozen=True)
class SynthesisConfig:
    samples_per_class: int = 3000
    batch_size: int = 500
    # Local mode: which classes a client's synthetic images cover. "missing": only the classes it holds fewer than
    # samples_per_class real images of (topped up to samples_per_class); "all": every class gets samples_per_class
    # synthetic images, its own included, so an expert cannot learn "decoded texture means another client's class".
    local_synthetic: str = "missing"
    # Local mode: each of the client's real images appears this many times in its training set (each copy under its
    # own augmentation), so an expert's own classes weigh more against the synthetic ones at the same epochs.
    local_real_copies: int = 1


@dataclass(frozen=True)
class ClassifierConfig:
    mode: str = "server"  # server | local
    # Local mode: how the experts' predictions combine (federation.factory.combine_experts). "product": the
    # paper's product of experts; "holders": each class is scored by the experts holding real images of it.
    combine: str = "product"
    width: int = 32  # base channels of the CNN
    epochs: int = 8
    # Local mode: passes over each expert's training set (0: classifier.epochs). An expert trains on one client's
    # set, so local mode can afford more passes than the server's classifier without the server paying for them.
    local_epochs: int = 0
    # Local mode: each expert's base channels (0: classifier.width). Local mode reads close to what the same CNN
    # reaches on real images (benchmarks/ceiling.py); a wider expert lifts that ceiling without the server paying.
    local_width: int = 0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: str = "none"  # none, or any of flip, crop, blur, noise joined by "+" (AUGMENTATIONS)
    noise_std: float = 0.2  # augment "noise": the largest per-image noise standard deviation ([-1, 1] pixels)
    # Mixed training pairs (classifier.mix_batch): "mixup" (Zhang et al. 2018) blends two images and their labels,
    # "cutmix" (Yun et al. 2019) pastes a box of one into the other; lambda ~ Beta(mix_alpha, mix_alpha) per batch.
    mix: str = "none"
    mix_alpha: float = 1.0
    # batch | group. BatchNorm fails under label skew (Hsieh et al. 2020, "The Non-IID Data Quagmire"): a
    # one-class client's batch statistics are not the federation's. GroupNorm has no statistics to average.
    norm: str = "batch"
    match_sharpness: bool = True  # low-pass every input at the modules' measured blur (GaussianBlur)


@dataclass(frozen=True)
class ReferenceConfig:
    centralized: bool = True  # also train the same classifier on the pooled real data


@dataclass(frozen=True)
class BaselinesConfig:
    """Weight-sharing FL baselines for `fedfactory compare` (plain SGD, momentum 0, no weight decay)."""

    rounds: int = 50  # communication rounds
    local_epochs: int = 1  # local passes over the client's data per round (used when local_steps = 0)
    local_steps: int = 0  # > 0: this many local SGD steps per round instead of local_epochs
    lr: float = 0.05  # local SGD step size
    batch_size: int = 32
    fedprox_mu: float = 0.01  # FedProx proximal weight mu
    feddyn_alpha: float = 0.01  # FedDyn regulariser weight alpha
    clients_per_round: int = 0  # 0 = every client in every round (full participation)
    weighting: str = "samples"  # aggregation weights: samples (n_k / n) | uniform (1 / num_clients)
    val_fraction: float = 0.0  # > 0: hold out this share of each client's rows to choose a round; 0 = final only


@dataclass(frozen=True)
class PrivacyConfig:
    """Differentially private modules (aegmm only): each module is (epsilon, delta)-DP for its site's images."""

    epsilon: float = 0.0  # the whole module's budget; 0 = off (no guarantee)
    # embedding: one noisy random-feature embedding, then the decoder fits it (DP-MERF) | dp-sgd: DP-SGD autoencoder
    method: str = "embedding"
    delta: float = 1e-5  # must lie below 1 / (images of the smallest module)
    max_grad_norm: float = 1.0  # DP-SGD: per-image gradient clipping norm (L2)
    # embedding: the decoder's fit to the released embedding. It reads only the release (post-processing), so its
    # budget does not follow the image count and costs no privacy; generator.steps, steps_per_image, lr and
    # batch_size are the DP-SGD and non-private modules'. Chosen on Fashion-MNIST validation at epsilon 10
    # (benchmarks/results/quality-private.md): 500 steps at lr 0.002 and 128 latents 0.7058, 1800 steps at lr 0.004
    # 0.8022, the same at 64 latents 0.8057 in 41% less time.
    decoder_steps: int = 1800
    decoder_lr: float = 4e-3
    decoder_batch_size: int = 64  # standard-normal latents decoded per step; their mean embedding is the estimate


NO_PRIVACY = PrivacyConfig()


@dataclass(frozen=True)
class ReleaseConfig:
    """The release check at the site: before a module leaves, its samples are compared with its training images."""

    # A module whose near-copy fraction (fedfactory.audit.near_copy_ratios) is above this is withheld: not sent,
    # reported with its numbers, and its class left to the other holders. 1 never withholds (the check still runs).
    # On Fashion-MNIST validation images (benchmarks/results/replay-fashion-mnist.md) every cell of 3 or fewer
    # images measured at least 0.059 (held-out reference) and 0.181 (second-nearest), every cell of 10 or more at
    # most 0.002. 0.005 also separated the 5-image cells, but withheld a 144-image digits module of the demo (0.007,
    # median ratio 0.90: not a replay); 0.02 keeps a 10x margin over every non-replaying cell measured.
    max_copy_fraction: float = 0.02


@dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    reference: ReferenceConfig = ReferenceConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    release: ReleaseConfig = ReleaseConfig()


CHOICES = {
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("data", "partition"): ("iid", "pathological", "dirichlet", "natural"),
    ("generator", "family"): ("aegmm", "edm"),
    ("classifier", "mode"): ("server", "local"),
    ("classifier", "combine"): ("product", "holders"),
    ("synthesis", "local_synthetic"): ("missing", "all"),
    ("classifier", "norm"): ("batch", "group"),
    ("classifier", "mix"): ("none", "mixup", "cutmix"),
    ("baselines", "weighting"): ("samples", "uniform"),
    ("privacy", "method"): ("embedding", "dp-sgd"),
}
AUGMENTATIONS = ("flip", "crop", "blur", "noise")  # classifier.augment joins any of these with "+"
POSITIVE = {
    ("run", "threads"): 0, ("run", "workers"): 1, ("data", "num_clients"): 1, ("data", "classes_per_client"): 1,
    ("data", "min_partition_size"): 0, ("data", "image_size"): 0,
    ("generator", "steps"): 1, ("generator", "batch_size"): 1, ("generator", "channels"): 1,
    ("generator", "latent_dim"): 1, ("generator", "residual_rank"): 0, ("generator", "mixture_components"): 1,
    ("generator", "sampler_steps"): 1, ("generator", "min_samples"): 1, ("generator", "min_steps"): 1,
    ("generator", "max_epochs"): 0,
    ("synthesis", "samples_per_class"): 1, ("synthesis", "batch_size"): 1, ("synthesis", "local_real_copies"): 1,
    ("classifier", "width"): 1, ("classifier", "epochs"): 1, ("classifier", "local_epochs"): 0,
    ("classifier", "local_width"): 0, ("classifier", "batch_size"): 1,
    ("baselines", "rounds"): 1, ("baselines", "local_epochs"): 1, ("baselines", "local_steps"): 0,
    ("baselines", "batch_size"): 1, ("baselines", "clients_per_round"): 0,
    ("privacy", "decoder_steps"): 1, ("privacy", "decoder_batch_size"): 1,
}
# ./configs first (a user's own presets), then the installed package's copy (pyproject.toml maps configs/ to
# fedfactory/configs/), then the checkout's configs/ (an editable install has no installed copy).
PRESET_DIRS = (Path.cwd() / "configs", Path(__file__).resolve().parent / "configs",
               Path(__file__).resolve().parents[2] / "configs")


def valid_keys() -> list[str]:
    return [f"{s.name}.{f.name}" for s in fields(Config) for f in fields(s.type)]


def class_list(text: str) -> tuple[str, ...]:
    """The class names of `data.classes` ("benign,melanoma,nevus"): class index = position in the list."""
    names = tuple(n.strip() for n in text.split(",")) if text.strip() else ()
    if not names or any(not n or "/" in n or n.startswith(".") for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"data.classes={text!r}: expected distinct class names joined by commas (the names of the "
                          "class folders), e.g. data.classes='benign,melanoma,nevus'")
    return names


def _coerce(key: str, value, kind: type):
    """Check or convert a TOML value or override string to the field's type."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _validate(cfg: Config) -> Config:
    # TOML and float() both accept nan and inf, which slip through every `<` check below.
    for s in fields(Config):
        for f in fields(s.type):
            value = getattr(getattr(cfg, s.name), f.name)
            if f.type is float and not math.isfinite(value):
                raise ConfigError(f"{s.name}.{f.name}={value}: must be a finite number")
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r}: valid values are {', '.join(choices)}")
    for (section, key), low in POSITIVE.items():
        value = getattr(getattr(cfg, section), key)
        if value < low:
            raise ConfigError(f"{section}.{key}={value}: must be >= {low}")
    for section in ("generator", "classifier"):
        if getattr(cfg, section).lr <= 0:
            raise ConfigError(f"{section}.lr={getattr(cfg, section).lr}: the learning rate must be > 0")
    parts = cfg.classifier.augment.split("+")
    if cfg.classifier.augment != "none" and (len(set(parts)) != len(parts) or not set(parts) <= set(AUGMENTATIONS)):
        raise ConfigError(f"classifier.augment={cfg.classifier.augment!r}: valid values are none or any of "
                          f"{', '.join(AUGMENTATIONS)} joined by '+' (e.g. crop+flip)")
    if cfg.classifier.noise_std < 0:
        raise ConfigError(f"classifier.noise_std={cfg.classifier.noise_std}: must be >= 0")
    if cfg.classifier.mix_alpha <= 0:
        raise ConfigError(f"classifier.mix_alpha={cfg.classifier.mix_alpha}: must be > 0 (classifier.mix=none turns "
                          "mixing off)")
    if cfg.generator.steps_per_image < 0:
        raise ConfigError(f"generator.steps_per_image={cfg.generator.steps_per_image}: must be >= 0 "
                          "(0 trains every module generator.steps)")
    if cfg.generator.adversarial < 0:
        raise ConfigError(f"generator.adversarial={cfg.generator.adversarial}: must be >= 0 (0 turns it off)")
    if not 0 <= cfg.generator.adversarial_start <= 1:
        raise ConfigError(f"generator.adversarial_start={cfg.generator.adversarial_start}: must lie in [0, 1]")
    if cfg.data.dataset == "imagefolder" or cfg.data.classes:
        class_list(cfg.data.classes)
    if cfg.data.alpha <= 0:
        raise ConfigError(f"data.alpha={cfg.data.alpha}: the Dirichlet concentration must be > 0")
    if cfg.data.image_size and not 4 <= cfg.data.image_size <= 1024:
        # The classifier pools twice by 2, and module manifests allow at most 1024 pixels a side.
        raise ConfigError(f"data.image_size={cfg.data.image_size}: valid values are 0 (native size) or 4 to 1024")
    if cfg.classifier.weight_decay < 0:
        raise ConfigError(f"classifier.weight_decay={cfg.classifier.weight_decay}: must be >= 0")
    if not 0 <= cfg.classifier.label_smoothing < 1:
        raise ConfigError(f"classifier.label_smoothing={cfg.classifier.label_smoothing}: must lie in [0, 1)")
    _validate_privacy(cfg)
    if not 0 <= cfg.release.max_copy_fraction <= 1:
        raise ConfigError(f"release.max_copy_fraction={cfg.release.max_copy_fraction}: must lie in [0, 1] (the "
                          "largest share of a module's samples that may be near-copies of its training images; "
                          "1 never withholds)")
    b = cfg.baselines
    if b.lr <= 0:
        raise ConfigError(f"baselines.lr={b.lr}: the learning rate must be > 0")
    if b.fedprox_mu < 0:
        raise ConfigError(f"baselines.fedprox_mu={b.fedprox_mu}: must be >= 0 (0 makes FedProx FedAvg)")
    if b.feddyn_alpha <= 0:
        raise ConfigError(f"baselines.feddyn_alpha={b.feddyn_alpha}: must be > 0 (the server divides by it)")
    if not 0 <= b.val_fraction < 1:
        raise ConfigError(f"baselines.val_fraction={b.val_fraction}: must lie in [0, 1)")
    if b.clients_per_round > cfg.data.num_clients:
        raise ConfigError(f"baselines.clients_per_round={b.clients_per_round}: valid values are 0 (all) to "
                          f"data.num_clients={cfg.data.num_clients}")
    return cfg


def _validate_privacy(cfg: Config) -> None:
    p, g = cfg.privacy, cfg.generator
    if p.epsilon < 0:
        raise ConfigError(f"privacy.epsilon={p.epsilon}: must be >= 0 (0 turns differential privacy off)")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta={p.delta}: must lie in (0, 1), below 1 / (images per module)")
    if p.max_grad_norm <= 0:
        raise ConfigError(f"privacy.max_grad_norm={p.max_grad_norm}: the clipping norm must be > 0")
    if p.decoder_lr <= 0:
        raise ConfigError(f"privacy.decoder_lr={p.decoder_lr}: the learning rate must be > 0")
    if p.epsilon == 0:
        return
    if cfg.classifier.mode == "local":
        # Local mode's experts are classifiers trained on each site's raw images and sent to the server and every
        # other site: nothing trained on raw images may leave a private site.
        raise ConfigError(f"classifier.mode=local with privacy.epsilon={p.epsilon}: every site's expert is trained on "
                          "its raw images without differential privacy and leaves the site; set "
                          "classifier.mode=server or privacy.epsilon=0")
    if g.family != "aegmm":
        raise ConfigError(f"privacy.epsilon is only supported for aegmm (generator.family={g.family!r}); set "
                          "generator.family=aegmm or privacy.epsilon=0")
    # Each of these fits something more to the images than the private autoencoder and latent model.
    if g.adversarial > 0 and g.adversarial_start < 1:
        raise ConfigError(f"generator.adversarial={g.adversarial} with privacy.epsilon={p.epsilon}: the patch critic "
                          "is trained on the images without noise; set generator.adversarial=0")
    if g.residual_rank > 0:
        raise ConfigError(f"generator.residual_rank={g.residual_rank} with privacy.epsilon={p.epsilon}: the residual "
                          "model is fitted to the images without noise; set generator.residual_rank=0")


def apply(cfg: Config, values: dict[str, object]) -> Config:
    """Return cfg with dotted keys replaced; unknown keys and wrong types raise ConfigError."""
    sections = {s.name: getattr(cfg, s.name) for s in fields(Config)}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        types = {f.name: f.type for f in fields(sections[section])} if section in sections else {}
        if key not in types:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}")
        sections[section] = dataclasses.replace(sections[section], **{key: _coerce(dotted, value, types[key])})
    return _validate(Config(**sections))


def _flatten(table: dict, path: str) -> dict[str, object]:
    flat = {}
    for section, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                              f"valid keys: {', '.join(valid_keys())}")
        flat.update({f"{section}.{k}": v for k, v in body.items()})
    return flat


def resolve_preset(name_or_path: str) -> Path:
    """A path to a TOML file, or a preset name looked up in configs/."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    for folder in PRESET_DIRS:
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    names = sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)}")


def load_config(preset: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then a TOML preset or file, then `section.key=value` overrides."""
    values: dict[str, object] = {}
    if preset:
        path = resolve_preset(preset)
        try:
            values.update(_flatten(tomllib.loads(path.read_text()), str(path)))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        values[key.strip()] = value
    return apply(Config(), values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialize a config as TOML that load_config reads back to an equal config."""
    lines = []
    for section, body in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def config_hash(cfg: Config) -> str:
    """Hash of everything that can change a result: run.out and run.progress only say where and how loudly."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("out", "progress")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
