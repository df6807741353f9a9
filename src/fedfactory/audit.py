"""Measure what a module gives away about its training images: memorization and membership inference.

For every module, members are its training images and non-members held-out images of the same class (in
simulation the class's test images: an audit of a finished run, not a design choice, so the test set is fair
game here). Two measurements, both in pixel space ([-1, 1], flattened, L2):

- Memorization: for each synthetic sample, the distance to its nearest member over the distance to its nearest
  non-member. A sample is a near-copy when the ratio is below 1/3, the threshold of Carlini et al. 2023
  ("Extracting training data from diffusion models", Sec. 4.1), which there compares the nearest training
  image with the others; here with held-out images of the same class, so a module that merely draws typical
  images of the class (close to members and non-members alike) scores a ratio near 1.
- Membership inference (black box, GAN-Leaks, Chen et al. 2020, Sec. 5.1): a candidate scores minus its
  distance to the closest of many synthetic samples; the AUC of that score at telling an equal number of
  members and non-members apart, with a bootstrap interval. 0.5 is chance, 1 a module that gives its
  members away. For `edm` also a white-box attack: minus the denoising loss (Sec. 5.3 of GAN-Leaks; Carlini
  et al. 2023 Sec. 5), lower for images the denoiser was trained on.
"""

import io
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from fedfactory.config import class_list, load_config
from fedfactory.data.datasets import load_data
from fedfactory.data.folders import read_class_folders
from fedfactory.data.images import to_float
from fedfactory.errors import FedFactoryError
from fedfactory.generative.edm import EDMParams, denoise
from fedfactory.generative.train import build_network, sample_module
from fedfactory.registry import Module, load_registry
from fedfactory.runs import atomic_write_bytes, atomic_write_json
from fedfactory.seeding import derive_seed, numpy_rng, torch_generator

NEAR_COPY_RATIO = 1 / 3  # Carlini et al. 2023
RATIO_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95)
WHITE_BOX_SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # noise levels of the denoising-loss attack, [-1, 1] pixels


class AuditError(FedFactoryError, ValueError):
    """A run directory that cannot be audited; the message says what is missing."""


def flat(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C*H*W) in [-1, 1]."""
    return torch.from_numpy(to_float(images)).flatten(1)


def nearest_distances(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference; queries (n, D), refs (m, D)."""
    dist, index = [], []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk].double(), refs.double())
        best = d.min(1)
        dist.append(best.values.numpy())
        index.append(best.indices.numpy())
    return np.concatenate(dist), np.concatenate(index)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores where positives should score higher (Mann-Whitney U / (n_pos n_neg))."""
    ranks = stats.rankdata(np.concatenate([positive, negative]))  # ties share their mean rank (count as one half)
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(positive: np.ndarray, negative: np.ndarray, rng: np.random.Generator,
                       resamples: int = 200, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members separately."""
    values = [auc(positive[rng.integers(0, len(positive), len(positive))],
                  negative[rng.integers(0, len(negative), len(negative))]) for _ in range(resamples)]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def membership_inference(member_scores: np.ndarray, non_member_scores: np.ndarray, seed: int,
                         resamples: int = 200) -> dict:
    """AUC and bootstrap interval of an attack whose score is higher for members."""
    return {"auc": auc(member_scores, non_member_scores),
            "auc_interval": bootstrap_interval(member_scores, non_member_scores, numpy_rng(seed, "bootstrap"),
                                               resamples)}


def audit_images(synthetic: np.ndarray, members: np.ndarray, non_members: np.ndarray, seed: int,
                 max_candidates: int = 1000, resamples: int = 200) -> dict:
    """Memorization and black-box membership inference of one module from its synthetic samples.

    synthetic, members, non_members: uint8 (N, H, W, C). Memorization compares each synthetic sample with every
    member (a copy of any training image counts) and every non-member. The attack uses equal numbers of
    members and non-members (at most max_candidates each, drawn with `seed`) so the AUC's chance level is 0.5.
    """
    if min(len(synthetic), len(members), len(non_members)) == 0:
        raise AuditError("an audit needs synthetic samples, members and non-members; one of them is empty")
    syn, mem, non = flat(synthetic), flat(members), flat(non_members)
    # Memorization (Carlini et al. 2023 near-copy ratio, against held-out images).
    d_member, nearest_member = nearest_distances(syn, mem)
    d_non, _ = nearest_distances(syn, non)
    ratio = d_member / np.maximum(d_non, 1e-12)
    # Membership inference (GAN-Leaks black box): a candidate's score is minus its distance to the closest sample.
    m = min(len(members), len(non_members), max_candidates)
    rng = numpy_rng(seed, "candidates")
    pick_mem = np.sort(rng.choice(len(members), m, replace=False))
    pick_non = np.sort(rng.choice(len(non_members), m, replace=False))
    score_mem = -nearest_distances(mem[pick_mem], syn)[0]
    score_non = -nearest_distances(non[pick_non], syn)[0]
    attack = membership_inference(score_mem, score_non, seed, resamples)
    closest = np.argsort(ratio, kind="stable")[:8]
    return {
        "num_synthetic": len(synthetic), "num_members": len(members), "num_non_members": len(non_members),
        "num_candidates": m,
        "copy_fraction": float((ratio < NEAR_COPY_RATIO).mean()),
        "ratio_quantiles": {str(q): float(np.quantile(ratio, q)) for q in RATIO_QUANTILES},
        "mia_auc": attack["auc"], "mia_auc_interval": attack["auc_interval"],
        # For the figure only: which synthetic sample came closest to which member.
        "closest_pairs": [[int(i), int(nearest_member[i]), float(ratio[i])] for i in closest],
    }


RELEASE_SAMPLES = 2000  # the audit's num_synthetic: the release check samples what the audit samples, not more


def near_copy_ratios(synthetic: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, str]:
    """Each sample's distance to its nearest training image over its distance to the second-nearest, and the name of
    that reference: Carlini et al. 2023 (Sec. 4.1) compare the nearest training image with the others, and a sample
    that is a copy of one image is far closer to it than to any other. A module of one image has no reference:
    every sample counts as a copy of it.

    Both distances come from the same set, so the ratio does not depend on how many images a site holds. A ratio
    against held-out images does: the nearest of fewer images is farther, so a site whose test folder is smaller
    than its training folder sees more "copies" (docs/privacy.md, "The release check").
    """
    syn, mem = flat(synthetic), flat(members)
    if len(members) < 2:
        return np.zeros(len(syn)), "none (one training image: every sample is a copy of it)"
    # The two nearest training images of each sample, from one distance matrix per chunk.
    two = np.concatenate([torch.cdist(syn[i:i + 1024].double(), mem.double()).topk(2, largest=False).values.numpy()
                          for i in range(0, len(syn), 1024)])
    return two[:, 0] / np.maximum(two[:, 1], 1e-12), "second-nearest training image"


def release_check(module: Module, members: np.ndarray, root_seed: int, max_copy_fraction: float,
                  device: torch.device | None = None,
                  num_samples: int = RELEASE_SAMPLES) -> dict:
    """Whether a module may leave its site: its near-copy fraction (ratio below NEAR_COPY_RATIO) must not exceed
    max_copy_fraction. Samples the images the audit and synthesis draw first, so the verdict is deterministic."""
    manifest, tensors = module
    synthetic = sample_module(tensors, manifest, range(num_samples), root_seed, device or torch.device("cpu"))
    ratio, reference = near_copy_ratios(synthetic, members)
    fraction = float((ratio < NEAR_COPY_RATIO).mean())
    return {"module_id": manifest["module_id"], "num_samples": int(manifest["num_samples"]),
            "copy_fraction": fraction, "max_copy_fraction": max_copy_fraction,
            "released": fraction <= max_copy_fraction,
            "ratio_quantiles": {str(q): float(np.quantile(ratio, q)) for q in RATIO_QUANTILES},
            "reference": reference, "num_synthetic": num_samples}


@torch.no_grad()
def denoising_scores(tensors: dict[str, torch.Tensor], manifest: dict, images: np.ndarray, seed: int,
                     device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Minus the EDM denoising loss of each image, averaged over WHITE_BOX_SIGMAS with fixed noise per image.

    A denoiser fits its training images better than unseen ones; the same noise for every candidate keeps the
    comparison paired.
    """
    net = build_network("edm", tuple(manifest["image_shape"]), manifest["network"])
    net.load_state_dict(tensors)
    net = net.to(device).eval()
    params = EDMParams(**{k: v for k, v in manifest["diffusion"].items() if k in EDMParams.__dataclass_fields__})
    x = torch.from_numpy(to_float(images))
    noise = torch.randn((len(WHITE_BOX_SIGMAS), *x.shape[1:]), generator=torch_generator(seed, "white-box"))
    losses = torch.zeros(len(x), dtype=torch.float64)
    for j, sigma in enumerate(WHITE_BOX_SIGMAS):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            s = torch.full((len(xb),), sigma, device=device)
            out = denoise(net, xb + sigma * noise[j].to(device), s, params)
            losses[i:i + batch_size] += ((out - xb) ** 2).flatten(1).mean(1).double().cpu()
    return -(losses / len(WHITE_BOX_SIGMAS)).numpy()


def audit_module(module: Module, members: np.ndarray, non_members: np.ndarray, root_seed: int,
                 num_synthetic: int = 2000, max_candidates: int = 1000, resamples: int = 200,
                 device: torch.device | None = None) -> dict:
    """Audit one module: its first num_synthetic images (those synthesis draws first) against its data."""
    device = device or torch.device("cpu")
    manifest, tensors = module
    seed = derive_seed(root_seed, "audit", manifest["module_id"])
    synthetic = sample_module(tensors, manifest, range(num_synthetic), root_seed, device)
    result = audit_images(synthetic, members, non_members, seed, max_candidates, resamples)
    if manifest["family"] == "edm":
        m = result["num_candidates"]
        rng = numpy_rng(seed, "candidates")  # the same candidates as the black-box attack
        pick_mem = np.sort(rng.choice(len(members), m, replace=False))
        pick_non = np.sort(rng.choice(len(non_members), m, replace=False))
        white = membership_inference(denoising_scores(tensors, manifest, members[pick_mem], seed, device),
                                     denoising_scores(tensors, manifest, non_members[pick_non], seed, device),
                                     derive_seed(seed, "white-box"), resamples)
        result |= {"mia_auc_white_box": white["auc"], "mia_auc_white_box_interval": white["auc_interval"]}
    return {"module_id": manifest["module_id"], "client_id": manifest["client_id"],
            "class_id": manifest["class_id"], "class_name": manifest["class_name"], "family": manifest["family"],
            "privacy": manifest.get("privacy")} | result


def module_data(run_dir: Path) -> tuple[dict, list[np.ndarray], object, object]:
    """A run's config, its clients' row indices, and its (train, test) data, checked against partition.json."""
    for name in ("config.toml", "partition.json", "modules"):
        if not (run_dir / name).exists():
            raise AuditError(f"{run_dir} has no {name}: not a run directory; audit the directory a "
                             "`fedfactory run` wrote")
    cfg = load_config(str(run_dir / "config.toml"))
    partition = json.loads((run_dir / "partition.json").read_text())
    train, test = load_data(cfg.data)
    if partition.get("class_names") != list(train.class_names):
        raise AuditError(f"{run_dir}/partition.json names other classes than {cfg.data.dataset}: the data changed "
                         "since the run")
    parts = [np.asarray(rows, dtype=np.int64) for rows in partition.get("indices", [])]
    if any(len(p) and (p.min() < 0 or p.max() >= len(train)) for p in parts):
        raise AuditError(f"{run_dir}/partition.json indexes rows outside the {len(train)}-image training set")
    return cfg, parts, train, test


Case = tuple[Module, np.ndarray, np.ndarray]  # a module, its members, its non-members


def simulation_cases(run_dir: Path, modules: list[Module]) -> tuple[object, list[Case]]:
    """(cfg, [(module, members, non-members)]) of a simulation run: members from partition.json's rows, non-members
    the class's test images (an audit, not a design choice, so reading the test set here is allowed)."""
    sites = sorted({str(m.manifest["client_id"]) for m in modules if not isinstance(m.manifest["client_id"], int)})
    if sites:
        raise AuditError(f"{run_dir} is a deployment's run (sites {sites}): the server holds no images, so each site "
                         "audits its own modules with --site NAME --data-root FOLDER")
    cfg, parts, train, test = module_data(run_dir)
    cases = []
    for module in modules:
        k, c = module.manifest["client_id"], module.manifest["class_id"]
        if not isinstance(k, int) or k >= len(parts):
            raise AuditError(f"module {module.manifest['module_id']}: partition.json has no client {k}; a "
                             "deployment's run is audited at each site with --site and --data-root")
        rows = parts[k][train.labels[parts[k]] == c]
        cases.append((module, train.images[rows], test.images[test.labels == c]))
    return cfg, cases


def site_cases(run_dir: Path, modules: list[Module], site: str, data_root: Path) -> tuple[object, list[Case]]:
    """(cfg, [(module, members, non-members)]) of one site of a deployment, audited at that site: members are its
    own training images of the module's class, non-members its own test/ images of that class."""
    if not (run_dir / "config.toml").exists():
        raise AuditError(f"{run_dir} has no config.toml: not a run directory")
    cfg = load_config(str(run_dir / "config.toml"))
    mine = [m for m in modules if m.manifest["client_id"] == site]
    if not mine:
        raise AuditError(f"{run_dir}/modules holds no module of site {site!r}; the sites there are "
                         f"{sorted({str(m.manifest['client_id']) for m in modules})}")
    if not cfg.data.classes:
        raise AuditError(f"{run_dir}/config.toml names no data.classes: a site audit needs the deployment's class list")
    names = class_list(cfg.data.classes)
    train = read_class_folders(data_root / "train", names, cfg.data.image_size)
    if not (data_root / "test").is_dir():
        raise AuditError(f"{data_root} has no test/ folder: the audit's non-members are the site's own held-out "
                         "images of each class (test/<class>/*.png)")
    test = read_class_folders(data_root / "test", names, cfg.data.image_size)
    return cfg, [(m, train.images[train.labels == m.manifest["class_id"]],
                  test.images[test.labels == m.manifest["class_id"]]) for m in mine]


def audit_run(run_dir: str | Path, num_synthetic: int = 2000, max_candidates: int = 1000, resamples: int = 200,
              figure: bool = False, device: torch.device | None = None, site: str | None = None,
              data_root: str | Path | None = None) -> dict:
    """Audit every module of a run; writes RUN_DIR/audit.json (and audit-closest.png if figure) atomically.

    With site and data_root (a deployment, at that site): only the site's modules, against its own folder;
    writes RUN_DIR/audit-<site>.json instead, so the sites' audits and a server's never overwrite each other.
    """
    run_dir = Path(run_dir)
    if (site is None) != (data_root is None):
        raise AuditError("a site audit needs both --site and --data-root (the site's image folder)")
    if not (run_dir / "modules").is_dir():
        raise AuditError(f"{run_dir} has no modules/: not a run directory; audit the directory a `fedfactory run` "
                         "wrote")
    modules = load_registry(run_dir / "modules")
    if not modules:
        raise AuditError(f"{run_dir}/modules holds no modules to audit")
    if site is None:
        cfg, cases = simulation_cases(run_dir, modules)
    else:
        cfg, cases = site_cases(run_dir, modules, site, Path(data_root).expanduser())
    results, pictures = [], []
    for module, members, non_members in cases:
        k, c = module.manifest["client_id"], module.manifest["class_id"]
        if len(members) != module.manifest["num_samples"]:
            raise AuditError(f"module {module.manifest['module_id']} was trained on {module.manifest['num_samples']} "
                             f"images, the audit's data gives client {k} {len(members)} of class {c}: the data "
                             "changed since the run")
        if not len(non_members):
            raise AuditError(f"no held-out images of class {c} to serve as non-members (the test set, or a site's "
                             "test/ folder)")
        result = audit_module(module, members, non_members, cfg.run.seed, num_synthetic, max_candidates,
                              resamples, device)
        pairs = result.pop("closest_pairs")
        if figure:
            synthetic = sample_module(module.tensors, module.manifest, range(num_synthetic), cfg.run.seed,
                                      device or torch.device("cpu"))
            pictures.append((result["module_id"], [(synthetic[i], members[j], r) for i, j, r in pairs[:4]]))
        results.append(result)
    doc = {
        "mia_auc_max": max(r["mia_auc"] for r in results),
        "copy_fraction_max": max(r["copy_fraction"] for r in results),
        "near_copy_ratio": NEAR_COPY_RATIO,
        "non_members": ("the class's test images (simulation)" if site is None
                        else f"site {site}'s own test/ images of the class"),
        "settings": {"num_synthetic": num_synthetic, "max_candidates": max_candidates, "resamples": resamples,
                     "distance": "L2 in [-1, 1] pixels"},
        "modules": results,
    }
    white = [r["mia_auc_white_box"] for r in results if "mia_auc_white_box" in r]
    if white:
        doc["mia_auc_white_box_max"] = max(white)
    suffix = "" if site is None else f"-{site}"
    atomic_write_json(run_dir / f"audit{suffix}.json", doc)
    if figure:
        atomic_write_bytes(run_dir / f"audit{suffix}-closest.png", closest_pairs_png(pictures))
    return doc


def closest_pairs_png(pictures: list[tuple[str, list]]) -> bytes:
    """A figure with one row per module: its synthetic samples closest to a member, each above that member."""
    from matplotlib.figure import Figure

    cols = max(len(p) for _, p in pictures) * 2
    fig = Figure(figsize=(cols * 0.8, len(pictures) * 0.9 + 0.3))
    axes = np.atleast_2d(fig.subplots(len(pictures), cols))
    for row, (mid, pairs) in enumerate(pictures):
        for j in range(cols):
            axes[row, j].axis("off")
        for j, (syn, real, ratio) in enumerate(pairs):
            for ax, picture, label in ((axes[row, 2 * j], syn, f"synthetic {ratio:.2f}"),
                                       (axes[row, 2 * j + 1], real, "member")):
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=255)
                ax.set_title(label, fontsize=5)
        axes[row, 0].text(-0.1, 0.5, mid, fontsize=5, ha="right", va="center", transform=axes[row, 0].transAxes)
    fig.tight_layout(pad=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def summary_line(doc: dict) -> str:
    """One line for the terminal."""
    worst = max(doc["modules"], key=lambda r: r["mia_auc"])
    return (f"{len(doc['modules'])} modules: membership-inference AUC max {doc['mia_auc_max']:.3f} "
            f"({worst['module_id']}), near-copy fraction max {doc['copy_fraction_max']:.4f}")
