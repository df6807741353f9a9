"""The ServerApp: send one train message per SuperNode, validate the module bytes that come back exactly as the
registry validates files, then run the same server stage as `fedfactory run` into the same run directory.

A client that raises, or whose node is gone, does not sink the run: the server finishes with the modules it has
and names the clients and modules that are missing, in metrics.json and the log.

Deployment (flower.deployment=true, `serve_sites`): the server holds no data. It learns from the replies which site
holds which classes and how many images (validated), writes partition.json from those counts, and evaluates by
sending the classifier to the sites, which return counts only (metrics.score_counts). In local mode a second
round sends each site the other sites' modules (and its own where it uses them, see expert_modules); each returns
its expert, and the sites score the product of the experts the same way.
"""

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from safetensors import SafetensorError
from safetensors.torch import load

from fedfactory.classifier import classifier_from_state
from fedfactory.config import Config, ConfigError, class_list, config_hash
from fedfactory.data.folders import read_class_folders
from fedfactory.data.images import ImageDataset
from fedfactory.data.partition import class_histogram, implied_cells
from fedfactory.device import select_device
from fedfactory.errors import FedFactoryError
from fedfactory.federation.factory import bytes_per_client, local_synthetic_count, trained_as_asked
from fedfactory.federation.intake import (
    MAX_ERROR_CHARS,
    MAX_SITE_IMAGES,
    ClaimError,
    Pins,
    SiteClaim,
    check_client_claim,
    check_scored,
    check_site_claim,
    class_shares,
    counts_limit,
    flat_plan,
    load_pins,
    module_count_reason,
    oversized,
    release_records,
    release_summary,
    stale_modules,
    trust_record,
)
from fedfactory.federation.runner import (
    Score,
    check_against_partition,
    factory_stage,
    input_blur,
    read_release,
    record_release,
    reusable_module,
    server_stage,
    start_run,
    test_set_score,
    write_metrics,
)
from fedfactory.flower.run_config import FlowerConfig, parse_run_config
from fedfactory.flower.wire import (
    CLASSIFIER,
    CLIENT,
    COUNTS,
    EVALUATE,
    MODULES,
    TRAIN,
    classifier_bytes,
    classifier_content,
    expert_task_content,
    module_bytes,
    release_list,
    task_content,
    wire_bytes,
)
from fedfactory.metrics import metrics_from_counts
from fedfactory.modules.files import module_from_bytes, tensors_to_bytes
from fedfactory.modules.ids import client_name, client_of, module_filename, module_id
from fedfactory.modules.refusal import ModuleError
from fedfactory.registry import Module, load_registry, load_registry_file, module_spec
from fedfactory.report import write_report
from fedfactory.runs import Timer, atomic_write_bytes, atomic_write_json, check_run_dir, prepare_run_dir, setup_logging

log = logging.getLogger("fedfactory")

app = ServerApp()

STALE_DIR = "stale"  # under modules/: kept modules a site's claim no longer backs, set aside, never deleted


class ReplyError(FedFactoryError, ValueError):
    """A reply that cannot be attributed to a client of this run; none of its modules is used."""


@dataclass
class Collected:
    accepted: dict[int, list[str]] = field(default_factory=dict)  # client id -> module ids written
    node_of: dict[int, int] = field(default_factory=dict)  # client id -> node id that answered for it
    module_bytes: dict[int, int] = field(default_factory=dict)  # client id -> bytes of its accepted modules
    wire_bytes: dict[int, int] = field(default_factory=dict)  # client id -> bytes of its reply message
    train_seconds: dict[int, float] = field(default_factory=dict)  # client id -> seconds the node reported
    errors: list[dict] = field(default_factory=list)  # replies refused: node id and reason
    rejected: list[dict] = field(default_factory=list)  # modules refused: node, client, module id and reason
    expected: dict[int | str, list[str]] = field(default_factory=dict)  # deployment: site -> modules its counts imply
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # deployment: site -> class name -> images
    site_errors: dict[str, str] = field(default_factory=dict)  # deployment: site -> why it delivered nothing
    claims: dict[str, SiteClaim] = field(default_factory=dict)  # deployment: site -> its accepted train claim
    pins: Pins | None = None  # deployment: the operator's pin file (flower.pins), None when names are trusted
    set_aside: list[str] = field(default_factory=list)  # files moved to modules/stale/ rather than overwritten
    release: dict[str, dict] = field(default_factory=dict)  # module id -> the sender's release-check record


def expected_modules(train: ImageDataset, parts: list[np.ndarray], min_samples: int = 1) -> dict[int, list[str]]:
    """Client id -> ids of the modules it should send: the cells of its partition that imply a module."""
    expected: dict[int, list[str]] = {k: [] for k in range(len(parts))}
    for k, c in implied_cells(class_histogram(train.labels, parts, train.num_classes), min_samples):
        expected[k].append(module_id(k, c))
    return expected


def wait_for_nodes(grid: Grid, count: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    """Node ids once `count` SuperNodes are connected, or whatever is connected when `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll_s)


def connected_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    """The SuperNodes that connected within wait_s: none is an error, fewer than count goes on without the rest."""
    nodes = wait_for_nodes(grid, count, wait_s)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within flower.wait_nodes={wait_s}s")
    if len(nodes) < count:
        log.info("only %d of %d SuperNodes connected within %.0fs; going on without the others", len(nodes), count,
                 wait_s)
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout_s: float,
             poll_s: float = 0.5) -> tuple[list[Message], dict[str, int], list[int]]:
    """Push the messages, pull replies until all arrived or `timeout_s` passed.

    Returns the replies, message id -> destination node (to attribute the SuperLink's own error replies, which
    come from node 0), and the nodes that never answered.
    """
    dst = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    node_of = {mid: node for mid, node in zip(ids, dst, strict=True) if mid}
    silent = [node for mid, node in zip(ids, dst, strict=True) if not mid]  # the push itself failed
    pending, replies = set(node_of), []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        if pending:
            time.sleep(poll_s)
    return replies, node_of, silent + [node_of[mid] for mid in sorted(pending)]


def train_reply_info(reply: Message):
    """The sender's ConfigRecord of a train reply, after checking it carries that and a modules ArrayRecord."""
    if not reply.has_content():
        raise ReplyError("reply has no content")
    info, modules = reply.content.config_records.get(CLIENT), reply.content.array_records.get(MODULES)
    if info is None or modules is None:
        raise ReplyError(f"reply lacks the {CLIENT!r} ConfigRecord or the {MODULES!r} ArrayRecord")
    return info


def _client_of(reply: Message, cfg: Config, got: Collected) -> int:
    """The client id a reply answers for, after checking it belongs to this run and is the first for that client."""
    return check_client_claim(dict(train_reply_info(reply)), num_clients=cfg.data.num_clients,
                              config_hash=config_hash(cfg), answered=got.node_of)


def set_aside(path: Path, modules_dir: Path, got: Collected) -> None:
    """Move a kept module out of the registry to modules/stale/, under its file's hash, so nothing written is lost
    on a claim the server cannot authenticate (a file that no longer validates is kept as well)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    (modules_dir / STALE_DIR).mkdir(exist_ok=True)
    target = modules_dir / STALE_DIR / f"{path.stem}.{digest}{path.suffix}"
    path.replace(target)
    got.set_aside.append(str(target.relative_to(modules_dir)))


def take_modules(reply: Message, node: int, k: int | str, expected: list[str] | tuple, cfg: Config, modules_dir: Path,
                 got: Collected, counts: dict[int, int], whose: str) -> None:
    """Validate every module of a reply with the registry's loader; write the good ones, record the rest.

    `counts`: class id -> the images of the sender's cell (the site's report, or the partition in a simulation);
    a module must say the same. `whose` names that source in the refusal.
    """
    try:
        got.release |= release_records(release_list(reply.content.config_records[CLIENT]), expected, whose_name(k))
    except (ModuleError, ClaimError) as e:
        got.errors.append({"node_id": node, "reason": f"release records refused: {e}"})
        log.info("node %d: release records refused: %s", node, e)
    for mid, array in reply.content.array_records[MODULES].items():
        source = f"node {node} client {k} module {mid[:40]!r}"
        try:
            # Only ids the server expects from this client: this also keeps any path out of file names.
            if mid not in expected:
                raise ModuleError(f"{source}: client {k} holds no such class in this run's partition"
                                  if isinstance(k, int) else f"{source}: site {k} reported no such class")
            data = module_bytes(array, source)
            manifest, _ = module_from_bytes(data, source, expected=module_spec)
            if manifest["module_id"] != mid:
                raise ModuleError(f"{source}: its manifest says {manifest['module_id']}")
            if reason := module_count_reason(manifest, counts.get(manifest["class_id"]), whose):
                raise ModuleError(f"{source}: {reason}")
            if reason := trained_as_asked(manifest, cfg):
                raise ModuleError(f"{source}: {reason}")
        except ModuleError as e:
            got.rejected.append({"node_id": node, "client_id": k, "module_id": mid[:40], "reason": str(e)})
            log.info("rejected: %s", e)
            continue
        path = modules_dir / module_filename(mid)
        if path.exists() and path.read_bytes() != data:
            set_aside(path, modules_dir, got)
        atomic_write_bytes(path, data)
        got.accepted[k].append(mid)
        got.module_bytes[k] += len(data)


def whose_name(k: int | str) -> str:
    return f"client {k}" if isinstance(k, int) else f"site {k}"


def identified(replies: list[Message], node_of: dict[str, int], got: Collected, identify):
    """(node, reply, sender) for every train reply that is no error and whose sender `identify` accepts; the others
    are recorded in got.errors. Each accepted sender's bookkeeping starts here, once for clients and sites alike."""
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            got.errors.append({"node_id": node, "reason": reply.error.reason})
            log.info("node %d failed: %s", node, reply.error.reason)
            continue
        try:
            sender = identify(reply, node)
        except (ReplyError, ClaimError) as e:
            got.errors.append({"node_id": node, "reason": str(e)})
            log.info("node %d: reply refused: %s", node, e)
            continue
        got.accepted[sender], got.node_of[sender], got.module_bytes[sender] = [], node, 0
        got.wire_bytes[sender] = wire_bytes(reply)
        seconds = reply.content.config_records[CLIENT].get("train-seconds")
        got.train_seconds[sender] = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        yield node, reply, sender


def collect(replies: list[Message], node_of: dict[str, int], cfg: Config, expected: dict[int, list[str]],
            modules_dir: Path, histogram: np.ndarray) -> Collected:
    """Validate every module in the replies with the registry's loader; write the good ones, report the rest.

    `histogram` (clients, classes): the partition's images per cell, which every module's num_samples must equal.
    """
    got = Collected()
    for node, reply, k in identified(replies, node_of, got, lambda reply, node: _client_of(reply, cfg, got)):
        cells = {c: int(n) for c, n in enumerate(histogram[k])}
        take_modules(reply, node, k, expected.get(k, ()), cfg, modules_dir, got, cells, "the partition holds")
        log.info("client %d (node %d): %d modules accepted, %d module bytes, %d bytes on the wire", k, node,
                 len(got.accepted[k]), got.module_bytes[k], got.wire_bytes[k])
    return got


def failure_report(got: Collected, expected: dict[int, list[str]], present: set[str], nodes: list[int]) -> dict:
    """The metrics.json keys that say which clients and modules are missing and what crossed the wire."""
    failed = [k for k in sorted(expected) if k not in got.accepted]
    missing = sorted(mid for mids in expected.values() for mid in mids if mid not in present)
    return {
        "failed_clients": failed,
        "missing_modules": missing,
        "flower": {
            "nodes": nodes,
            "node_of_client": {str(k): n for k, n in sorted(got.node_of.items())},
            "errors": got.errors,
            "rejected_modules": got.rejected,
            "bytes_on_wire": {str(k): b for k, b in sorted(got.wire_bytes.items())},
            "module_bytes_received": {str(k): b for k, b in sorted(got.module_bytes.items())},
        },
    }


def _site_of(reply: Message, node: int, cfg: Config, classes: tuple[str, ...], got: Collected) -> SiteClaim:
    """The site a deployment reply answers for and what it claims, after checking the claim (intake)."""
    claim = check_site_claim(dict(train_reply_info(reply)), node, config_hash=config_hash(cfg), classes=classes,
                             answered=got.node_of | {s: None for s in got.site_errors}, pins=got.pins)
    if claim.error is not None:
        got.site_errors[claim.site] = claim.error  # a site's text goes into the log and metrics.json
        raise ReplyError(f"site {claim.site} failed: {claim.error}")
    return claim


def collect_sites(replies: list[Message], node_of: dict[str, int], cfg: Config, classes: tuple[str, ...],
                  modules_dir: Path, pins: Pins | None = None) -> Collected:
    """A deployment's train replies: each site's counts (validated, against the pins if any) and the modules they
    imply, checked and written as `collect` does."""
    got = Collected(pins=pins)

    def claim(reply: Message, node: int) -> str:
        accepted = _site_of(reply, node, cfg, classes, got)
        got.claims[accepted.site] = accepted
        return accepted.site

    for node, reply, site in identified(replies, node_of, got, claim):
        held = got.claims[site].counts
        got.counts[site] = {classes[c]: n for c, n in sorted(held.items())}
        hist = np.zeros(len(classes), dtype=np.int64)
        hist[list(held)] = list(held.values())
        got.expected[site] = [module_id(site, c) for _, c in implied_cells(hist, cfg.generator.min_samples)]
        take_modules(reply, node, site, got.expected[site], cfg, modules_dir, got, held, "the site reported")
        log.info("site %s (node %d): %d images of %d classes, %d modules accepted, %d module bytes, %d bytes on "
                 "the wire", site, node, sum(held.values()), len(held), len(got.accepted[site]),
                 got.module_bytes[site], got.wire_bytes[site])
    return got


def site_counts(reply: Message, site: str, num_classes: int, declared: int | None = None,
                pins: Pins | None = None) -> dict[str, np.ndarray]:
    """The counts an evaluate reply carries, after checking them (intake.check_scored): what metrics.check_counts
    accepts, over no more test images than the site declared in its train reply nor its pin allows."""
    if reply.has_error():
        raise ReplyError(reply.error.reason)
    info, arrays = reply.content.config_records.get(CLIENT), reply.content.array_records.get(COUNTS)
    if info is None or arrays is None or info.get("site") != site:
        raise ReplyError(f"evaluate reply is not from site {site} or carries no {COUNTS!r} ArrayRecord")
    counts = {}
    for key, array in arrays.items():
        if not isinstance(array, Array) or array.stype != "numpy.ndarray":
            raise ReplyError(f"site {site}: counts {key[:40]!r} is not a numpy array")
        if reason := oversized(len(array.data), counts_limit(num_classes), f"site {site}: counts {key[:40]!r}"):
            raise ReplyError(reason)
        try:
            counts[key] = array.numpy()  # np.load without pickle; the declared shape is not trusted
        except (ValueError, OSError, EOFError) as e:
            raise ReplyError(f"site {site}: counts {key[:40]!r} do not decode ({e})") from None
    pin = pins.of(site) if pins is not None else None
    try:
        return check_scored(counts, num_classes, site, MAX_SITE_IMAGES if declared is None else declared, pin)
    except ClaimError as e:
        raise ReplyError(str(e)) from None


def site_round(grid: Grid, fl: FlowerConfig, got: Collected,
               messages: list[Message]) -> tuple[list[tuple[str, Message]], dict[str, str]]:
    """One message to each site that trained: (site, reply) for every reply, and site -> reason for the sites that
    never answered. A reply's site is its destination node's (error replies come from the SuperLink, node 0)."""
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    site_of_node = {node: site for site, node in got.node_of.items()}
    answered = []
    for r in replies:
        site = site_of_node.get(node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
        if site is None:  # answers no message of this round: not attributable, so not used
            log.info("a reply from node %d answers no message of this round; ignored", r.metadata.src_node_id)
        else:
            answered.append((site, r))
    return answered, {site_of_node[node]: f"no reply within flower.train_timeout={fl.train_timeout}s"
                      for node in silent}


def evaluate_at_sites(grid: Grid, cfg: Config, fl: FlowerConfig, got: Collected, classes: tuple[str, ...],
                      weights: dict[str, bytes], blur: float, report: dict) -> dict:
    """Send the classifier (or local mode's experts, combined at the site by classifier.combine) to every site
    that trained, sum the counts they return and compute the metrics from the sums. Records per site what was
    scored and the bytes in report["evaluation"]."""
    sites = sorted(got.node_of)
    # Local mode's experts travel with the counts of real images they trained on (the sites' reports), which the
    # holders rule of combine_experts weighs by; the server's one classifier, or the product, needs none.
    held = ({k: [got.counts[k].get(c, 0) for c in classes] for k in weights}
            if cfg.classifier.mode == "local" and cfg.classifier.combine == "holders" else None)
    messages = [Message(classifier_content(weights, config_hash(cfg), blur, held), dst_node_id=got.node_of[site],
                        message_type=EVALUATE, ttl=fl.train_timeout) for site in sites]
    down = {site: wire_bytes(m) for site, m in zip(sites, messages, strict=True)}
    answered, failed = site_round(grid, fl, got, messages)
    total = None
    scored, up, per_site = {}, {}, {}
    for site, reply in answered:
        try:
            counts = site_counts(reply, site, len(classes), got.claims[site].test_images, got.pins)
        except ReplyError as e:
            failed[site] = str(e)
            log.info("site %s: evaluation failed: %s", site, e)
            continue
        up[site] = wire_bytes(reply)
        scored[site] = int(counts["confusion"].sum())
        # Each site's own metrics beside the pooled ones: a site that sways the headline shows here.
        per_site[site] = metrics_from_counts(**counts, class_names=classes)
        total = counts if total is None else {k: total[k] + v for k, v in counts.items()}
        log.info("site %s scored %d test images", site, scored[site])
    if total is None:
        raise RuntimeError(f"no site returned evaluation counts; failures: {failed}")
    report["evaluation"] = {"sites": dict(sorted(scored.items())), "failed_sites": dict(sorted(failed.items())),
                            "declared_test_images": {s: got.claims[s].test_images for s in sites},
                            "per_site": dict(sorted(per_site.items())),
                            "bytes_down": down, "bytes_up": dict(sorted(up.items()))}
    return metrics_from_counts(**total, class_names=classes)


def score_at_sites(grid: Grid, cfg: Config, fl: FlowerConfig, got: Collected, classes: tuple[str, ...],
                   report: dict) -> Score:
    """The server's Score in a deployment: the sites score the classifier on their test folders (counts only)."""

    def score(model: torch.nn.Module, blur: float) -> dict:
        weights = tensors_to_bytes(model.state_dict())
        metrics = evaluate_at_sites(grid, cfg, fl, got, classes, {"classifier": weights}, blur, report)
        if cfg.data.test_root:
            # A public test set the server itself owns, scored here as well.
            public = read_class_folders(cfg.data.test_root, classes, cfg.data.image_size)
            report["public_test"] = test_set_score(public, model_device(model))(model, blur)
        return metrics

    return score


def expert_modules(site: str, modules: list[Module], cfg: Config) -> list[str]:
    """The module ids local mode's second round sends a site: every other site's, and its own of the classes it
    gets synthetic images of (synthesis.local_synthetic). A ClientApp keeps nothing between messages (a SuperNode
    may run each in a fresh process), so a site's own modules come back from the server, and count as bytes down."""
    spc, fill = cfg.synthesis.samples_per_class, cfg.synthesis.local_synthetic
    return [m["module_id"] for m, _ in modules
            if m["client_id"] != site or local_synthetic_count(m["num_samples"], spc, fill) > 0]


def expert_round(grid: Grid, cfg: Config, fl: FlowerConfig, got: Collected, modules: list[Module], blur: float,
                 out: Path, report: dict) -> dict[str, bytes]:
    """Local mode's second round: each site receives the modules expert_modules names and returns its expert, which
    is checked to load into the run's classifier and written to experts/<site>.safetensors. Returns site -> weights."""
    sites = sorted(got.node_of)
    files = {m["module_id"]: (out / "modules" / module_filename(m["module_id"])).read_bytes() for m, _ in modules}
    messages = [Message(expert_task_content(config_hash(cfg), blur, {
        mid: files[mid] for mid in expert_modules(site, modules, cfg)}),
        dst_node_id=got.node_of[site], message_type=TRAIN, ttl=fl.train_timeout) for site in sites]
    down = {site: wire_bytes(m) for site, m in zip(sites, messages, strict=True)}
    answered, failed = site_round(grid, fl, got, messages)
    channels, experts, up = modules[0].manifest["image_shape"][0], {}, {}
    (out / "experts").mkdir(exist_ok=True)
    for site, reply in answered:
        try:
            if reply.has_error():
                raise ReplyError(reply.error.reason)
            info = reply.content.config_records.get(CLIENT)
            if info is None or info.get("site") != site or isinstance(info.get("error"), str):
                raise ReplyError(str(info.get("error"))[:MAX_ERROR_CHARS] if info else f"reply is not from site {site}")
            payload = classifier_bytes(reply.content.array_records.get(CLASSIFIER, ArrayRecord()))
            if list(payload) != [site]:
                raise ReplyError(f"expected one expert named {site}, got {sorted(payload)[:3]}")
            # Loads without unpickling, and must fit the run's classifier exactly.
            classifier_from_state(load(payload[site]), channels, len(class_list(cfg.data.classes)), cfg.classifier,
                                  blur)
        except (ReplyError, ValueError, SafetensorError, FedFactoryError) as e:
            failed[site] = str(e)
            log.info("site %s: expert refused: %s", site, e)
            continue
        atomic_write_bytes(out / "experts" / f"{site}.safetensors", payload[site])
        experts[site], up[site] = payload[site], wire_bytes(reply)
        log.info("site %s: expert received (%d bytes on the wire)", site, up[site])
    report["expert_round"] = {"sites": sorted(experts), "failed_sites": dict(sorted(failed.items())),
                              "bytes_down": down, "bytes_up": dict(sorted(up.items()))}
    if not experts:
        raise RuntimeError(f"no site returned an expert; failures: {failed}")
    return experts


def local_sites_stage(grid: Grid, cfg: Config, fl: FlowerConfig, got: Collected, modules: list[Module],
                      classes: tuple[str, ...], out: Path, device: torch.device, timer: Timer, report: dict) -> dict:
    """Local mode in a deployment: experts trained at the sites, combined at the sites by classifier.combine."""
    blur = input_blur(cfg, modules)
    t0 = time.perf_counter()
    experts = expert_round(grid, cfg, fl, got, modules, blur, out, report)
    timer.add("experts_round_trip", time.perf_counter() - t0)
    t0 = time.perf_counter()
    metrics = evaluate_at_sites(grid, cfg, fl, got, classes, experts, blur, report)
    timer.add("evaluation", time.perf_counter() - t0)
    timer.add("end_to_end", time.perf_counter() - timer.start)
    sizes = {p.stem: p.stat().st_size for p in sorted((out / "modules").glob("*.safetensors"))}
    present = {m["class_id"] for m, _ in modules}
    down = {site: sum(sizes[mid] for mid in expert_modules(site, modules, cfg)) for site in sorted(experts)}
    metrics |= {
        "mode": "local",
        "timings": timer.timings,
        "bytes": bytes_per_client([m for m, _ in modules], sizes) | {"down_per_client": down,
                                                                      "total_down": sum(down.values())},
        "experts": sorted(experts),
        "modules": sorted(sizes),
        "missing_classes": [classes[c] for c in range(len(classes)) if c not in present],
    }
    table = write_metrics(cfg, metrics, [("factory-local", metrics)], out, device, blur)
    log.info("results (the sites' test folders, %d test images, product of %d experts):\n%s", metrics["num_test"],
             len(experts), table)
    return metrics


def set_aside_stale_modules(modules_dir: Path, got: Collected) -> list[str]:
    """Move earlier attempts' modules that a site's accepted claim no longer backs (intake.stale_modules) to
    modules/stale/: they would stand for data the site does not have, and the claim may not be the site's own."""
    kept = {p: load_registry_file(p).manifest for p in sorted(modules_dir.glob("*.safetensors"))}
    stale = {s.module_id: s for s in stale_modules(list(kept.values()), got.counts, got.expected)}
    for path, m in kept.items():
        if m["module_id"] in stale:
            log.info("setting %s aside in %s/: %s", path.name, STALE_DIR, stale[m["module_id"]].reason)
            set_aside(path, modules_dir, got)
    return sorted(stale)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def serve_sites(grid: Grid, cfg: Config, fl: FlowerConfig) -> dict:
    """The server of a deployment: it holds no data; the sites send modules and their counts, then score the
    classifier (or, in local mode, the product of their experts) on their own test folders and send counts back."""
    if cfg.reference.centralized:
        raise ConfigError("reference.centralized=true pools the sites' real training data, which a deployment's "
                          "server never holds; set reference.centralized=false")
    classes = class_list(cfg.data.classes)
    pins = load_pins(fl.pins) if fl.pins else None  # refused before anything is written
    check_run_dir(cfg)
    device, timer = select_device(cfg.run.device, cfg.run.threads), Timer()
    out = prepare_run_dir(cfg).resolve()
    setup_logging(out)
    log.info("flower deployment %s on %s, config %s, classes %s", out, device, config_hash(cfg)[:12],
             ",".join(classes))
    have = {p.stem: load_registry_file(p).manifest["num_samples"]
            for p in sorted((out / "modules").glob("*.safetensors")) if reusable_module(p, cfg)}
    if have:
        log.info("%d modules from an earlier attempt (hash checked); sites whose data is unchanged skip them",
                 len(have))

    t0 = time.perf_counter()
    nodes = connected_nodes(grid, cfg.data.num_clients, fl.wait_nodes)
    messages = [Message(task_content(config_hash(cfg), list(have), list(have.values())), dst_node_id=n,
                        message_type=TRAIN, ttl=fl.train_timeout) for n in nodes]
    train_down = wire_bytes(messages[0])
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    timer.add("clients_round_trip", time.perf_counter() - t0)
    got = collect_sites(replies, node_of, cfg, classes, out / "modules", pins)
    record_release(out, list(got.release.values()))
    stale = set_aside_stale_modules(out / "modules", got)
    for node in silent:
        got.errors.append({"node_id": node, "reason": f"no reply within flower.train_timeout={fl.train_timeout}s"})
    if got.train_seconds:
        timer.add("client_training", sum(got.train_seconds.values()))
    sites = sorted(got.node_of)
    # What the server knows of the data: the counts the sites reported, nothing else.
    atomic_write_json(out / "partition.json", {
        "scheme": "sites", "num_clients": len(sites), "class_names": list(classes), "sites": sites,
        "histogram": [[got.counts[s].get(c, 0) for c in classes] for s in sites]})

    modules = load_registry(out / "modules")
    if not modules:
        raise RuntimeError(f"no site delivered a module, nothing to synthesize from; errors: {got.errors}")
    present = {m["module_id"] for m, _ in modules}
    report = {
        "sites": sites,
        "failed_sites": dict(sorted(got.site_errors.items())),
        "missing_modules": sorted(mid for mids in got.expected.values() for mid in mids if mid not in present),
        "flower": {
            "nodes": nodes,
            "node_of_site": {s: got.node_of[s] for s in sites},
            "errors": got.errors,
            "rejected_modules": got.rejected,
            "bytes_on_wire": {s: got.wire_bytes[s] for s in sites},
            "bytes_down_on_wire": {s: train_down for s in sites},
            "module_bytes_received": {s: got.module_bytes[s] for s in sites},
            "site_counts": {s: got.counts[s] for s in sites},
            # Removed from the registry, not deleted: the files are under modules/stale/ (stale_modules_set_aside).
            "stale_modules_removed": stale,
            "stale_modules_set_aside": got.set_aside,
        },
        "trust": trust_record(pins, sites),
    }
    for site, reason in report["failed_sites"].items():
        log.info("site %s delivered no modules: %s", site, reason)
    if cfg.classifier.mode == "local":
        metrics = local_sites_stage(grid, cfg, fl, got, modules, classes, out, device, timer, report)
    else:
        score = score_at_sites(grid, cfg, fl, got, classes, report)
        metrics = server_stage(cfg, modules, classes, score, out, device, timer, test_name="the sites' test folders")
    metrics |= report
    metrics["release"] = release_summary(read_release(out), [[got.counts[s].get(c, 0) for c in classes] for s in sites],
                                         sites, classes, cfg.generator.min_samples, cfg.release.max_copy_fraction)
    metrics["site_shares"] = class_shares(got.counts, flat_plan(metrics.get("synthesis_plan", {})),
                                          [m for m, _ in modules], classes)
    atomic_write_json(out / "metrics.json", metrics)
    log.info("report: %s", write_report(out, device=device))
    return metrics


def serve(grid: Grid, cfg: Config, fl: FlowerConfig) -> dict:
    """The whole server side of a Flower run; returns the metrics written to metrics.json."""
    if fl.deployment:
        return serve_sites(grid, cfg, fl)
    if fl.pins:
        raise ConfigError("flower.pins binds deployment sites to SuperNodes; a simulation checks every module against "
                          "the partition instead: set flower.deployment=true or leave flower.pins empty")
    if cfg.classifier.mode != "server":
        # "local" mode's second round (expert_round) is implemented for a deployment's sites only.
        raise ConfigError(f"classifier.mode={cfg.classifier.mode!r} runs with `fedfactory run` or in a deployment "
                          "(flower.deployment=true); a simulation over Flower runs classifier.mode=server")
    if cfg.data.dataset == "imagefolder" and not cfg.data.root:
        # A deployment's run config (image folders at the sites, none at the server) without its switch.
        raise ConfigError("this run config names data.dataset=imagefolder with no data.root, as a deployment's does; "
                          "add flower.deployment = true to its [flower] section (a simulation needs data.root)")
    # The data and the partition give partition.json, the modules to expect and the evaluation.
    out, device, timer, train, test, parts = start_run(cfg, kind="flower run")
    expected = expected_modules(train, parts, cfg.generator.min_samples)
    histogram = class_histogram(train.labels, parts, train.num_classes)
    # A kept module is reused only if it was trained on its cell's images (intake.module_count_reason).
    have = [module_id(k, c) for k, c in implied_cells(histogram, cfg.generator.min_samples)
            if reusable_module(out / "modules" / module_filename(module_id(k, c)), cfg, int(histogram[k, c]))]
    if have:
        log.info("reusing %d modules from an earlier attempt (hash checked); clients skip them", len(have))

    # Wait for the SuperNodes, then one train message each; a TTL long enough for generator training.
    t0 = time.perf_counter()
    nodes = connected_nodes(grid, cfg.data.num_clients, fl.wait_nodes)
    messages = [Message(task_content(config_hash(cfg), have), dst_node_id=n, message_type=TRAIN,
                        ttl=fl.train_timeout) for n in nodes]
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    timer.add("clients_round_trip", time.perf_counter() - t0)
    got = collect(replies, node_of, cfg, expected, out / "modules", histogram)
    record_release(out, list(got.release.values()))
    for node in silent:
        got.errors.append({"node_id": node, "reason": f"no reply within flower.train_timeout={fl.train_timeout}s"})
        log.info("node %d: no reply within %.0fs", node, fl.train_timeout)
    if got.train_seconds:
        timer.add("client_training", sum(got.train_seconds.values()))

    # Server: the registry is the directory, loaded and validated as in `fedfactory run`.
    modules = check_against_partition(load_registry(out / "modules"), train, parts)
    if not modules:
        raise RuntimeError(f"no client delivered a module, nothing to synthesize from; errors: {got.errors}")
    report = failure_report(got, expected, {m["module_id"] for m, _ in modules}, nodes)
    for k in report["failed_clients"]:
        lost = [mid for mid in report["missing_modules"] if client_of(mid) == client_name(k)]
        log.info("client %d delivered no modules; missing: %s", k, ", ".join(lost) or "none (all reused)")
    metrics = factory_stage(cfg, modules, parts, train, test, out, device, timer)
    # server_stage has written metrics.json; this atomic rewrite adds the keys only a federated run has.
    metrics |= report
    atomic_write_json(out / "metrics.json", metrics)
    log.info("report: %s", write_report(out, device=device))
    return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fl = parse_run_config(context.run_config)
    serve(grid, cfg, fl)
