"""What an unlearning removes, decided before anything is written: the source run is read and checked, and a
frozen UnlearningPlan says which modules and rows go, which classes that touches and what the stage retrains.

Nothing here trains or writes; every refusal of a request or of an edited source run is raised from here, so a
refused unlearning has created nothing.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfactory.config import Config, apply, config_hash, load_config
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram
from fedfactory.errors import FedFactoryError
from fedfactory.modules.ids import client_name, client_of, implied_modules, module_filename

log = logging.getLogger("fedfactory")

TRAINED = {"server": "classifier.safetensors", "local": "experts"}  # what the stage of each mode trains
CLASS_GROUPS = {
    "only_removed": "classes whose every module was removed: no synthetic image of them remains",
    "shared": "classes the removed modules held together with remaining holders: re-weighted over those",
    "removed_any": "only_removed and shared together: every class a removed module held",
    "rest": "classes no removed module held",
}


class UnlearningError(FedFactoryError, ValueError):
    """The unlearning request or the source run is unusable; the message says which and how to fix it."""


@dataclass(frozen=True, eq=False)
class UnlearningPlan:
    """What one unlearning removes from a finished run, and what the unlearned run is built from."""

    deployment: bool  # the source is a deployment's server directory (sites' counts, no rows), not a simulation
    mode: str  # classifier.mode: the stage retrains TRAINED[mode]
    clients: tuple[int | str, ...]  # as requested: every module and row of these goes
    modules: tuple[str, ...]  # as requested: these single modules go
    removed: tuple[str, ...]  # module ids deleted, sorted
    remaining: tuple[str, ...]  # module ids kept, in the source registry's order
    withdrawn: tuple[str, ...]  # every module withdrawn from this run's lineage, earlier unlearnings included
    class_names: tuple[str, ...]
    groups: dict[str, list[int]]  # class ids per CLASS_GROUPS entry
    partition: dict  # the unlearned run's partition.json
    parts: tuple[np.ndarray, ...] | None  # a simulation's rows per client after the withdrawal; None in a deployment
    release: tuple[dict, ...]  # the source's release-check records that stay (withheld modules of kept clients too)
    participants: dict | None  # local mode: the clients that retrain their experts (local_participants)

    @property
    def retrains(self) -> str:
        """What the stage trains again from the remaining modules: the classifier file or the experts folder."""
        return TRAINED[self.mode]


def default_out(run_dir: Path, clients=(), modules=()) -> Path:
    """A sibling of the run directory named after what is removed, e.g. runs/tiny-unlearn-client-3."""
    parts = [f"client-{k}" for k in clients] + list(modules)
    return run_dir.parent / f"{run_dir.name}-unlearn-{'-'.join(parts)}"


def is_deployment(partition_doc: dict) -> bool:
    """A deployment's partition.json names its sites and holds only the counts they reported, no row indices."""
    return partition_doc.get("scheme") == "sites"


def read_object(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object of the source run holding `keys`; an unreadable or edited file is refused in one line."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnlearningError(f"{path} is unreadable ({e}); restore it or rerun the run") from None
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise UnlearningError(f"{path} is not as fedfactory wrote it (no {', '.join(missing)}); restore it or "
                              "rerun the run")
    return doc


def read_source(run_dir: Path) -> tuple[Config, dict, dict]:
    """The finished run's config, partition and metrics; refuses runs that cannot be unlearned exactly."""
    def require(name: str) -> None:
        if not (run_dir / name).exists():
            raise UnlearningError(f"{run_dir} has no {name}: not a finished run directory; finish it with "
                                  f"`fedfactory run --config {run_dir / 'config.toml'}` first")

    require("config.toml")
    cfg = load_config(str(run_dir / "config.toml"))
    for name in ("partition.json", "metrics.json", TRAINED[cfg.classifier.mode], "modules"):
        require(name)
    keys = ("sites",) if is_deployment(read_object(run_dir / "partition.json", ())) else ("indices",)
    partition_doc = read_object(run_dir / "partition.json", (*keys, "histogram", "class_names"))
    metrics = read_object(run_dir / "metrics.json", ("accuracy", "confusion_matrix", "per_class_accuracy"))
    if metrics.get("config_hash") != config_hash(cfg):
        log.warning("%s/config.toml no longer hashes to the config recorded in metrics.json; the before/after "
                    "comparison may mix two configs", run_dir)
    if is_deployment(partition_doc) and cfg.classifier.mode == "local":
        # The experts are trained on the sites' real images, which the server's run directory does not hold.
        raise UnlearningError(f"{run_dir} is a deployment in local mode: every remaining site must retrain its expert "
                              "on its own data; rerun the federation without the site (fedfactory unlearn retrains "
                              "only what the server holds, the classifier of server mode)")
    return cfg, partition_doc, metrics


def check_confusion(metrics: dict, num_classes: int, run_dir: Path) -> None:
    """The source metrics' confusion matrix, which the before/after accuracies are read from, fits the dataset."""
    try:
        shape = np.asarray(metrics["confusion_matrix"], dtype=np.int64).shape
    except (TypeError, ValueError):
        shape = None
    if shape != (num_classes, num_classes):
        raise UnlearningError(f"{run_dir / 'metrics.json'}: confusion_matrix is not {num_classes} x {num_classes} "
                              "counts; restore it or rerun the run")


def client_parts(partition_doc: dict, train: ImageDataset, num_clients: int) -> list[np.ndarray]:
    """partition.json's index arrays, checked against the training set they index."""
    indices = partition_doc.get("indices")
    if not isinstance(indices, list) or len(indices) != num_clients:
        raise UnlearningError(f"partition.json must list indices for {num_clients} clients")
    if partition_doc.get("class_names") != list(train.class_names):
        raise UnlearningError("partition.json's class names differ from the dataset's: the data changed since the run")
    try:
        parts = [np.asarray(rows, dtype=np.int64).reshape(-1) for rows in indices]
    except (TypeError, ValueError):
        raise UnlearningError("partition.json's indices must be lists of row numbers") from None
    every = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(every) and (every.min() < 0 or every.max() >= len(train) or len(np.unique(every)) != len(every)):
        raise UnlearningError(f"partition.json indices must be distinct rows of the {len(train)}-image training set")
    if class_histogram(train.labels, parts, train.num_classes).tolist() != partition_doc.get("histogram"):
        raise UnlearningError("partition.json's histogram does not match its indices on this dataset: the data "
                              "changed since the run")
    return parts


def withheld(release: dict[str, dict]) -> frozenset[str]:
    """Module ids a run's release check withheld, from its release.json records."""
    return frozenset(mid for mid, r in release.items() if not r["released"])


def check_registry_matches(manifests: dict[str, dict], hist: np.ndarray, min_samples: int,
                           clients: list[int | str] | None = None, withheld: frozenset[str] = frozenset()) -> None:
    """Every (client, class) cell of the class histogram that implies a module has exactly one, trained on that many
    real images, unless the release check withheld it. `clients` names the histogram's rows (a deployment's sites);
    default 0, 1, ..."""
    clients = clients or list(range(len(hist)))
    held = {mid: n for mid, n in implied_modules(hist, clients, min_samples).items() if mid not in withheld}
    declared = {mid: m["num_samples"] for mid, m in manifests.items()}
    if held != declared:
        diff = sorted(set(held.items()) ^ set(declared.items()))[:3]
        raise UnlearningError(f"the registry does not match partition.json (module, samples): {diff}; the "
                              "run directory was edited or is unfinished")


def select_removed(manifests: dict[str, dict], num_clients: int, clients, modules, run_dir: Path) -> list[str]:
    """Module ids to delete: every module of each client in `clients`, plus the ids in `modules`."""
    if not clients and not modules:
        raise UnlearningError("nothing to unlearn: name at least one client or module")
    removed = set()
    sites = sorted({m["client_id"] for m in manifests.values() if isinstance(m["client_id"], str)})
    for k in clients:
        if sites and k not in sites:
            raise UnlearningError(f"unknown site {k!r}: {run_dir} has modules of sites {', '.join(sites)}")
        if not sites and (type(k) is not int or not 0 <= k < num_clients):
            raise UnlearningError(f"unknown client {k!r}: {run_dir} has clients 0..{num_clients - 1}")
        own = {mid for mid, m in manifests.items() if m["client_id"] == k}
        if not own:
            raise UnlearningError(f"client {k} has no modules in {run_dir / 'modules'} (already unlearned?)")
        removed |= own
    for mid in modules:
        try:
            module_filename(mid)
        except ValueError as e:
            raise UnlearningError(str(e)) from None
        if mid not in manifests:
            raise UnlearningError(f"unknown module {mid}: not in {run_dir / 'modules'}")
        removed.add(mid)
    if len(removed) == len(manifests):
        raise UnlearningError("that would remove every module: nothing would remain to synthesize from")
    return sorted(removed)


def class_groups(manifests: dict[str, dict], removed: list[str], num_classes: int) -> dict[str, list[int]]:
    """Split the classes by how the removal touches them (definitions in CLASS_GROUPS)."""
    holders = [{mid for mid, m in manifests.items() if m["class_id"] == c} for c in range(num_classes)]
    hit = [h & set(removed) for h in holders]
    groups = {
        "only_removed": [c for c in range(num_classes) if hit[c] and hit[c] == holders[c]],
        "shared": [c for c in range(num_classes) if hit[c] and hit[c] != holders[c]],
        "removed_any": [c for c in range(num_classes) if hit[c]],
        "rest": [c for c in range(num_classes) if not hit[c]],
    }
    return groups


def withdraw_rows(parts: list[np.ndarray], labels: np.ndarray, removed: list[dict], clients=()) -> list[np.ndarray]:
    """The partition without the removed modules' rows and without every row of a withdrawn client."""
    # A withdrawn client also loses its cells too small for a module: local mode would train its expert on them.
    parts = list(parts)
    for k in clients:
        parts[k] = parts[k][:0]
    for m in removed:
        k = m["client_id"]
        parts[k] = parts[k][labels[parts[k]] != m["class_id"]]
    return parts


def withdraw_counts(hist: np.ndarray, sites: list[str], removed: list[dict], clients=()) -> np.ndarray:
    """A deployment's class histogram without the removed modules' cells and without every cell of a withdrawn
    site (withdraw_rows for the counts the sites reported)."""
    hist = hist.copy()
    for k in clients:
        hist[sites.index(k)] = 0
    for m in removed:
        hist[sites.index(m["client_id"]), m["class_id"]] = 0
    return hist


def kept_release(release: dict[str, dict], removed: list[str], clients) -> tuple[dict, ...]:
    """The source run's release records without the removed modules' and the withdrawn clients' ones."""
    withdrawn = {client_name(k) for k in clients}
    return tuple(r for mid, r in release.items() if mid not in removed and client_of(mid) not in withdrawn)


def local_participants(before: dict, parts: list[np.ndarray], removed: list[str]) -> dict:
    """Who a local-mode unlearning needs: every remaining client with data retrains its expert."""
    plans = before.get("synthesis_plan") or {}
    used = sorted(int(k) for k, plan in plans.items() if isinstance(plan, dict) and set(plan) & set(removed))
    return {"clients": [k for k, rows in enumerate(parts) if len(rows)],
            "used_removed_modules": used,
            "why": "local mode: every remaining client received the removed modules and trained its expert on "
                   "synthetic images that may come from them, so every remaining expert is retrained"}


def plan_simulation(run_dir: Path, cfg: Config, partition_doc: dict, before: dict, manifests: dict[str, dict],
                    release: dict[str, dict], clients, modules, train: ImageDataset) -> UnlearningPlan:
    """The plan for a simulation's run directory, whose partition.json indexes the rows of `train`."""
    removed = select_removed(manifests, cfg.data.num_clients, clients, modules, run_dir)
    parts = client_parts(partition_doc, train, cfg.data.num_clients)
    check_confusion(before, train.num_classes, run_dir)
    check_registry_matches(manifests, class_histogram(train.labels, parts, train.num_classes),
                           cfg.generator.min_samples, withheld=withheld(release))
    parts = withdraw_rows(parts, train.labels, [manifests[mid] for mid in removed], clients)
    withdrawn = sorted(set(partition_doc.get("withdrawn_modules", [])) | set(removed))
    partition = partition_doc | {"histogram": class_histogram(train.labels, parts, train.num_classes).tolist(),
                                 "indices": [p.tolist() for p in parts], "withdrawn_modules": withdrawn}
    participants = local_participants(before, parts, removed) if cfg.classifier.mode == "local" else None
    return _plan(False, cfg, manifests, release, clients, modules, removed, withdrawn, train.class_names, partition,
                 tuple(parts), participants)


def plan_deployment(run_dir: Path, cfg: Config, partition_doc: dict, before: dict, manifests: dict[str, dict],
                    release: dict[str, dict], clients, modules) -> UnlearningPlan:
    """The plan for a deployment's server directory: it holds the modules and the sites' counts, no rows."""
    removed = select_removed(manifests, cfg.data.num_clients, clients, modules, run_dir)
    class_names = tuple(partition_doc["class_names"])
    check_confusion(before, len(class_names), run_dir)
    sites, hist = list(partition_doc["sites"]), np.asarray(partition_doc["histogram"], dtype=np.int64)
    if hist.shape != (len(sites), len(class_names)):
        raise UnlearningError(f"{run_dir / 'partition.json'}: histogram is not sites x classes; restore it")
    check_registry_matches(manifests, hist, cfg.generator.min_samples, sites, withheld=withheld(release))
    hist = withdraw_counts(hist, sites, [manifests[mid] for mid in removed], clients)
    withdrawn = sorted(set(partition_doc.get("withdrawn_modules", [])) | set(removed))
    partition = partition_doc | {"histogram": hist.tolist(), "withdrawn_modules": withdrawn}
    return _plan(True, cfg, manifests, release, clients, modules, removed, withdrawn, class_names, partition,
                 None, None)


def _plan(deployment: bool, cfg: Config, manifests: dict[str, dict], release: dict[str, dict], clients, modules,
          removed: list[str], withdrawn: list[str], class_names: tuple[str, ...], partition: dict,
          parts: tuple[np.ndarray, ...] | None, participants: dict | None) -> UnlearningPlan:
    return UnlearningPlan(
        deployment=deployment, mode=cfg.classifier.mode, clients=tuple(clients), modules=tuple(modules),
        removed=tuple(removed), remaining=tuple(mid for mid in manifests if mid not in removed),
        withdrawn=tuple(withdrawn), class_names=tuple(class_names),
        groups=class_groups(manifests, removed, len(class_names)), partition=partition, parts=parts,
        release=kept_release(release, removed, clients), participants=participants)


def unlearned_config(cfg: Config, out: Path) -> Config:
    """The source config for the unlearned run, with the centralized reference off: it pools the raw training data
    of every client, the removed ones included."""
    return apply(cfg, {"run.out": str(out), "reference.centralized": False})
