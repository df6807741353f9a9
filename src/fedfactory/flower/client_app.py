"""The ClientApp: a SuperNode trains one module per class it holds and replies with their bytes.

Simulation (flower.deployment=false): the node's partition comes from its node config, `partition-id` and
`num-partitions`: the Simulation Engine sets them for each virtual SuperNode; a real SuperNode gets them with
`--node-config "partition-id=0 num-partitions=3"`. Each node loads the dataset itself (data.dataset, data.root) and
takes its own partition with the run's seed, the same split the in-process runner makes, so the modules are the
same bits.

Deployment (flower.deployment=true): the node is a site with its own data, `--node-config "site='hospital-a'
data-root='/srv/data'"`, an image folder `train/<class>/`, optional `test/<class>/`, classes named in the run's
data.classes. It uses all its files, replies with its images per class and its modules (ids carry the site name),
and on an evaluate message scores its test folder with the server's classifier and replies with counts only.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load

from fedfactory.classifier import classifier_from_state, predict_log_proba, train_classifier
from fedfactory.config import Config, ConfigError, class_list, config_hash
from fedfactory.data.datasets import load_data, load_dataset
from fedfactory.data.folders import read_class_folders
from fedfactory.data.images import ImageDataset, relabel
from fedfactory.data.partition import split_clients
from fedfactory.device import select_device
from fedfactory.errors import FedFactoryError
from fedfactory.federation.client import client_plans, held_classes, train_client_modules
from fedfactory.federation.factory import combine_experts, expert_recipe, local_training_set
from fedfactory.federation.intake import reusable_modules
from fedfactory.flower.run_config import parse_run_config
from fedfactory.flower.wire import (
    ExpertTask,
    counts_content,
    expert_reply_content,
    module_bytes,
    parse_evaluate_task,
    parse_task,
    reply_content,
    site_error_content,
    site_reply_content,
)
from fedfactory.metrics import score_counts
from fedfactory.modules.files import module_from_bytes, module_to_bytes, tensors_to_bytes
from fedfactory.modules.ids import is_site_name, module_id
from fedfactory.registry import Module, module_spec
from fedfactory.seeding import derive_seed

# Flower configures this logger in SuperNode and simulation processes, so these lines reach the node's console.
log = logging.getLogger("flwr")

app = ClientApp()


def node_partition(node_config: dict, num_clients: int) -> int:
    """This node's client id, checked against the run's data.num_clients."""
    k, n = node_config.get("partition-id"), node_config.get("num-partitions")
    if "site" in node_config and k is None:
        raise ConfigError(f"this SuperNode is site {str(node_config['site'])[:40]!r} but the run is a simulation; run "
                          "a deployment with flower.deployment=true in the run config")
    if type(k) is not int or type(n) is not int:
        raise ConfigError(f"node config must set integer partition-id and num-partitions, got {k!r} and {n!r}; "
                         "start the SuperNode with --node-config 'partition-id=0 num-partitions=3'")
    if n != num_clients:
        raise ConfigError(f"node config num-partitions={n} but the run has data.num_clients={num_clients}; "
                         "start one SuperNode per client and give every node num-partitions=data.num_clients")
    if not 0 <= k < n:
        raise ConfigError(f"node config partition-id={k} is outside [0, {n})")
    return k


def node_threads(node_config: dict, run_threads: int) -> int:
    """Torch threads for this ClientApp: the node config's `threads` where the site sets it, else run.threads where
    the run sets it (> 0), else 1.

    Several SuperNodes often share one machine (a rehearsal of the federation, the Simulation Engine); each taking
    every core oversubscribes it: three sites of two threads each on 2 cores ran the README walkthrough 3.5x slower
    than the same work in process. A site alone on its machine says so: --node-config "... threads=8".
    """
    threads = node_config.get("threads")
    if threads is None:
        return run_threads if run_threads > 0 else 1
    if type(threads) is not int or threads < 1:
        raise ConfigError(f"node config threads={threads!r}: must be an integer >= 1 (torch threads for this "
                          "SuperNode's ClientApp)")
    return threads


def node_site(node_config: dict) -> tuple[str, Path, str]:
    """This site's name, data folder and data format, from the node config of a deployment."""
    site, root = node_config.get("site"), node_config.get("data-root")
    dataset = node_config.get("dataset", "imagefolder")
    fix = "start the SuperNode with --node-config \"site='hospital-a' data-root='/path/to/site/data'\""
    if "partition-id" in node_config and site is None:
        raise ConfigError(f"this run is a deployment (flower.deployment=true) but the node config gives a "
                          f"partition-id, not a site; {fix}")
    if not is_site_name(site):
        raise ConfigError(f"node config site={site!r}: a site name is 1 to 40 lowercase letters, digits and dashes "
                          f"starting with a letter, e.g. hospital-a; {fix}")
    if not isinstance(root, str) or not Path(root).expanduser().is_dir():
        raise ConfigError(f"site {site}: node config data-root={root!r} is not a folder; {fix}")
    if not isinstance(dataset, str):
        raise ConfigError(f"site {site}: node config dataset={dataset!r} must be a dataset name such as "
                          "imagefolder (the default) or fashion-mnist")
    return site, Path(root).expanduser(), dataset


def site_data(cfg: Config, root: Path, dataset: str, split: str) -> ImageDataset | None:
    """All of this site's `split` ("train" or "test") images, classes indexed by data.classes; None for a site
    without a test set. An image folder by default; node config `dataset` names another format in data-root
    (fashion-mnist, medmnist:<subset>, isic2019, ...), whose class names must be in data.classes."""
    classes = class_list(cfg.data.classes)
    if dataset == "imagefolder":
        if split == "test" and not (root / "test").is_dir():
            return None
        return read_class_folders(root / split, classes, cfg.data.image_size)
    train, test = load_dataset(dataset, str(root), cfg.data.image_size)
    return relabel(train if split == "train" else test, classes)


def local_data(cfg: Config, client_id: int) -> ImageDataset:
    """This node's training rows: the dataset loaded here, partition `client_id` taken with the run's seed."""
    train, _ = load_data(cfg.data)
    return train.subset(split_clients(cfg.data, cfg.run.seed, train)[client_id])


def train_modules(data: ImageDataset, client_id: int | str, cfg: Config, device: torch.device,
                  skip: frozenset[str] = frozenset()) -> tuple[dict[str, bytes], list[dict]]:
    """Module id -> module file bytes for every held class not in `skip` that passes the release check, and the
    check's record of every module trained (a withheld module's bytes never leave the site)."""
    modules, records = {}, []
    plans = client_plans(data, client_id, cfg)
    for t in train_client_modules(data, plans, cfg, device, skip=lambda plan: plan.module_id in skip):
        records.append(t.release)
        if t.released:
            modules[t.module.manifest["module_id"]] = module_to_bytes(t.module.tensors, t.module.manifest)[0]
        else:
            log.info("fedfactory %s: %s withheld by the release check (%.1f%% near-copies, reference: %s)",
                     client_id, t.release["module_id"], 100 * t.release["copy_fraction"], t.release["reference"])
    return modules, records


def train_expert(msg: Message, task: ExpertTask, site: str, data: ImageDataset, cfg: Config, device: torch.device,
                 t0: float) -> Message:
    """Local mode: train this site's expert on its real images plus synthetic ones from the modules the server sent
    (the others', and its own where synthesis.local_synthetic tops up or fills a class it holds)."""
    sources = [f"module {p.module_id[:40]!r} sent to site {site}" for p in task.modules]
    modules = [Module(*module_from_bytes(module_bytes(p, source), source, expected=module_spec))
               for p, source in zip(task.modules, sources, strict=True)]
    images, labels, plan = local_training_set(data, modules, cfg.synthesis.samples_per_class, cfg.run.seed, device,
                                              cfg.synthesis.batch_size, cfg.synthesis.local_synthetic,
                                              cfg.synthesis.local_real_copies)
    model = train_classifier(images, labels, data.num_classes, expert_recipe(cfg.classifier),
                             derive_seed(cfg.run.seed, "classifier", site), device, desc=f"expert {site}",
                             progress=cfg.run.progress,
                             input_blur=task.input_blur)
    weights = tensors_to_bytes(model.state_dict())
    seconds = time.perf_counter() - t0
    log.info("fedfactory site %s: expert trained on %d real + %d synthetic images from %d modules in %.1fs", site,
             len(data), sum(plan.values()), len(modules), seconds)
    return Message(expert_reply_content(site, config_hash(cfg), weights, seconds), reply_to=msg)


def declared_test_images(cfg: Config, site: str, root: Path, dataset: str) -> int:
    """The test images this site will score, declared in its train reply before any scoring: the server refuses
    evaluation counts over more. A test folder that does not load declares 0; the evaluate message then names why."""
    try:
        test = site_data(cfg, root, dataset, "test")
    except FedFactoryError as e:
        log.info("fedfactory site %s: test folder does not load (%s); declaring 0 test images", site, e)
        return 0
    return 0 if test is None else len(test)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's modules and reply with their bytes."""
    t0 = time.perf_counter()
    cfg, fl = parse_run_config(context.run_config)
    task = parse_task(msg.content)
    device = select_device(cfg.run.device, node_threads(dict(context.node_config), cfg.run.threads))
    if fl.deployment:
        site, root, dataset = node_site(dict(context.node_config))
        try:
            data = site_data(cfg, root, dataset, "train")
            held = held_classes(data)
            counts = {data.class_names[c]: n for c, n in held.items()}
            if isinstance(task, ExpertTask):
                return train_expert(msg, task, site, data, cfg, device, t0)
            # A kept module is skipped only where this site still holds as many images of its class.
            trained_on = dict(zip(task.skip, task.skip_counts or (), strict=False))
            skip = frozenset(reusable_modules(trained_on, {module_id(site, c): n for c, n in held.items()}))
            modules, release = train_modules(data, site, cfg, device, skip)
        except FedFactoryError as e:
            # The site's own data is at fault: say so under the site's name, so the server can name it.
            log.info("fedfactory site %s: %s", site, e)
            return Message(site_error_content(site, config_hash(cfg), str(e)), reply_to=msg)
        test_images = declared_test_images(cfg, site, root, dataset)
        seconds = time.perf_counter() - t0
        log.info("fedfactory site %s: %d images of %d classes, %d test images, trained %d modules, %d bytes, in %.1fs",
                 site, len(data), len(counts), test_images, len(modules), sum(map(len, modules.values())), seconds)
        return Message(site_reply_content(site, config_hash(cfg), counts, modules, seconds, test_images, release),
                       reply_to=msg)
    k = node_partition(dict(context.node_config), cfg.data.num_clients)
    if isinstance(task, ExpertTask):
        raise ConfigError("expert messages belong to a deployment in local mode (flower.deployment=true)")
    # The server chose these by the partition's counts, which it holds (intake.reusable_modules).
    modules, release = train_modules(local_data(cfg, k), k, cfg, device, frozenset(task.skip))
    seconds = time.perf_counter() - t0
    log.info("fedfactory client %d: trained %d modules, %d bytes, in %.1fs", k, len(modules),
             sum(map(len, modules.values())), seconds)
    return Message(reply_content(k, config_hash(cfg), modules, seconds, release), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the server's classifier on this site's test folder; reply with counts only (metrics.score_counts)."""
    t0 = time.perf_counter()
    cfg, fl = parse_run_config(context.run_config)
    if not fl.deployment:
        raise ConfigError("evaluate messages belong to a deployment (flower.deployment=true)")
    site, root, dataset = node_site(dict(context.node_config))
    classes = class_list(cfg.data.classes)
    task = parse_evaluate_task(msg.content)
    if task.config_hash != config_hash(cfg):
        raise ConfigError(f"site {site}: the classifier comes from a run with another config")
    device = select_device(cfg.run.device, node_threads(dict(context.node_config), cfg.run.threads))
    test = site_data(cfg, root, dataset, "test")
    if test is not None and len(test):
        # One classifier, or the experts of local mode, combined by classifier.combine with the real images per
        # class each trained on (sent by the server with the experts).
        weights = task.classifiers
        recipe = expert_recipe(cfg.classifier) if cfg.classifier.mode == "local" else cfg.classifier
        log_probs = [predict_log_proba(classifier_from_state(load(w), test.images.shape[3], len(classes),
                                                             recipe, task.input_blur).to(device),
                                       test.images, device)
                     for w in weights.values()]
        held = None
        if len(weights) > 1 and cfg.classifier.combine == "holders":
            held = [task.held.get(name) for name in weights]
            bad = [name for name, h in zip(weights, held, strict=True) if not isinstance(h, list)
                   or len(h) != len(classes) or any(type(n) is not int or n < 0 for n in h)]
            if bad:
                raise ValueError(f"site {site}: the evaluate message lacks held-<expert> counts (one non-negative int "
                                 f"per class, {len(classes)} classes) for {bad[:3]}, which classifier.combine=holders "
                                 "needs; the server and this site run different fedfactory versions?")
        probs = np.exp(log_probs[0]) if len(log_probs) == 1 else combine_experts(log_probs, held,
                                                                                 cfg.classifier.combine)
        labels = test.labels
    else:
        log.info("fedfactory site %s: no test folder in %s, nothing to score", site, root)
        probs, labels = np.zeros((0, len(classes))), np.zeros(0, dtype=np.int64)
    counts = score_counts(probs, labels, len(classes))
    seconds = time.perf_counter() - t0
    log.info("fedfactory site %s: scored %d test images in %.1fs", site, len(labels), seconds)
    return Message(counts_content(site, config_hash(cfg), counts, seconds), reply_to=msg)
