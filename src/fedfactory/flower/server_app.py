"""The ServerApp: the round trips of one `serve`, for a simulation and a deployment alike.

One train message per SuperNode; every reply is decoded by flower.wire and decided by federation.intake (which
senders, modules and release records are accepted, and why); the accepted modules are written to the registry, which
is then validated as `fedfactory run` validates it. The two ways to federate differ in two places only:

- where the expected modules come from: a simulation's server partitions the dataset itself, so it knows every
  client's cells before the round (and checks each module against them); a deployment's server holds no data and
  learns each site's cells from its reported counts (validated, against a pin file if any), writes partition.json
  from them, and sets aside kept modules those counts no longer back;
- how scoring runs: a simulation runs the same server stage as `fedfactory run` on the test set it holds; a
  deployment sends the classifier to the sites, which return counts only (metrics.score_counts), and in local mode
  first sends each site the others' modules (expert_modules) so it returns its expert.

A client that raises, or whose node is gone, does not sink the run: the server finishes with the modules it has
and names the clients and modules that are missing, in metrics.json and the log.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedfactory.config import Config, ConfigError, class_list, config_hash
from fedfactory.data.folders import read_class_folders
from fedfactory.data.partition import class_histogram
from fedfactory.device import select_device
from fedfactory.federation.factory import bytes_per_client, local_synthetic_count
from fedfactory.federation.intake import (
    MAX_SITE_IMAGES,
    ReplyError,
    accept_train,
    check_counts_reply,
    check_expert,
    class_shares,
    expected_modules,
    flat_plan,
    load_pins,
    release_summary,
    reusable_modules,
    stale_modules,
    trust_record,
)
from fedfactory.federation.records import Arrival, Pins, Roster, TrainIntake
from fedfactory.federation.runner import (
    RunContext,
    Score,
    check_against_partition,
    factory_stage,
    input_blur,
    kept_modules,
    read_release,
    record_release,
    server_stage,
    start_run,
    test_set_score,
    write_metrics,
)
from fedfactory.flower.run_config import FlowerConfig, parse_run_config
from fedfactory.flower.wire import (
    EVALUATE,
    TRAIN,
    WireError,
    classifier_content,
    expert_task_content,
    parse_counts_reply,
    parse_expert_reply,
    parse_train_reply,
    task_content,
    wire_bytes,
)
from fedfactory.metrics import metrics_from_counts
from fedfactory.modules.files import tensors_to_bytes
from fedfactory.modules.ids import client_name, client_of, implied_modules, module_filename
from fedfactory.registry import Module, load_registry, load_registry_file
from fedfactory.report import write_report
from fedfactory.runs import Timer, atomic_write_bytes, atomic_write_json, check_run_dir, prepare_run_dir, setup_logging

log = logging.getLogger("fedfactory")

app = ServerApp()

STALE_DIR = "stale"  # under modules/: kept modules a site's claim no longer backs, set aside, never deleted


@dataclass(frozen=True)
class Opened:
    """A Flower run before its train round: the run's context (a simulation's holds its data, a deployment's none);
    the roster (who may answer, and where the expected modules come from); the kept modules the nodes may skip
    (module id -> images trained on)."""

    ctx: RunContext
    roster: Roster
    skip: dict[str, int]


@dataclass(frozen=True)
class TrainRound:
    """A train round done: its replies decided, the kept files set aside, the nodes it went to, and the bytes of one
    train message on the wire (every node gets the same)."""

    got: TrainIntake
    moved: list[str]
    nodes: list[int]
    bytes_down: int


# Round trips.


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


def site_round(grid: Grid, fl: FlowerConfig, node_of_site: dict[str, int],
               messages: list[Message]) -> tuple[list[tuple[str, Message]], dict[str, str]]:
    """One message to each site that trained: (site, reply) for every reply, and site -> reason for the sites that
    never answered. A reply's site is its destination node's (error replies come from the SuperLink, node 0)."""
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    site_of_node = {node: site for site, node in node_of_site.items()}
    answered = []
    for r in replies:
        site = site_of_node.get(node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
        if site is None:  # answers no message of this round: not attributable, so not used
            log.info("a reply from node %d answers no message of this round; ignored", r.metadata.src_node_id)
        else:
            answered.append((site, r))
    return answered, {site_of_node[node]: f"no reply within flower.train_timeout={fl.train_timeout}s"
                      for node in silent}


# The train round: replies decoded (wire), decided (intake), the accepted modules written.


def arrival(reply: Message, node_of: dict[str, int]) -> Arrival:
    """A train reply as intake takes it: its node, and its decoded content or why it has none."""
    node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    if reply.has_error():
        return Arrival(node, error=reply.error.reason)
    if not reply.has_content():
        return Arrival(node, error="reply has no content")
    try:
        return Arrival(node, parse_train_reply(reply.content), wire_bytes(reply))
    except WireError as e:
        return Arrival(node, error=str(e))


def set_aside(path: Path, modules_dir: Path) -> str:
    """Move a kept module out of the registry to modules/stale/, under its file's hash, so nothing written is lost
    on a claim the server cannot authenticate (a file that no longer validates is kept as well). Returns its new
    path under modules/."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    (modules_dir / STALE_DIR).mkdir(exist_ok=True)
    target = modules_dir / STALE_DIR / f"{path.stem}.{digest}{path.suffix}"
    path.replace(target)
    return str(target.relative_to(modules_dir))


def write_modules(got: TrainIntake, modules_dir: Path) -> list[str]:
    """Write every accepted module to the registry; a kept file with other bytes is set aside first. Returns the
    files set aside."""
    moved = []
    for sender in got.senders.values():
        for mid, data in sender.modules.items():
            path = modules_dir / module_filename(mid)
            if path.exists() and path.read_bytes() != data:
                moved.append(set_aside(path, modules_dir))
            atomic_write_bytes(path, data)
    return moved


def log_intake(got: TrainIntake) -> None:
    """A train round's decision in log.txt: each refusal with its reason, then each sender and what it sent."""
    for e in got.errors:
        log.info("node %d: reply refused: %s", e["node_id"], e["reason"])
    for r in got.rejected:
        log.info("rejected: %s", r["reason"])
    for k, s in got.senders.items():
        held = (f"{sum(s.counts.values())} images of {len(s.counts)} classes, " if isinstance(k, str) else "")
        log.info("%s %s (node %d): %s%d modules accepted, %d module bytes, %d bytes on the wire",
                 "site" if isinstance(k, str) else "client", k, s.node_id, held, len(s.modules), s.module_bytes,
                 s.wire_bytes)


def collect(replies: list[Message], node_of: dict[str, int], roster: Roster, cfg: Config, modules_dir: Path,
            missing: list[Arrival] = ()) -> tuple[TrainIntake, list[str]]:
    """A train round's replies (and `missing`, the nodes that sent none), decided by intake.accept_train; the
    accepted modules are written to modules_dir. Returns the decision and the kept files set aside."""
    got = accept_train([arrival(r, node_of) for r in replies] + list(missing), roster, cfg)
    log_intake(got)
    return got, write_modules(got, modules_dir)


def train_round(grid: Grid, fl: FlowerConfig, opened: Opened) -> TrainRound:
    """One train message to every SuperNode that connects; the replies decided, the accepted modules written."""
    ctx, skip = opened.ctx, opened.skip
    t0 = time.perf_counter()
    nodes = connected_nodes(grid, ctx.cfg.data.num_clients, fl.wait_nodes)
    # A simulation's clients skip what the server chose by the partition; a site only a module trained on as many
    # images as it holds now, which only it knows (hence the counts).
    counts = None if opened.roster.simulation else list(skip.values())
    # A TTL long enough for generator training.
    messages = [Message(task_content(config_hash(ctx.cfg), list(skip), counts), dst_node_id=n, message_type=TRAIN,
                        ttl=fl.train_timeout) for n in nodes]
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    ctx.timer.add("clients_round_trip", time.perf_counter() - t0)
    missing = [Arrival(n, error=f"no reply within flower.train_timeout={fl.train_timeout}s") for n in silent]
    got, moved = collect(replies, node_of, opened.roster, ctx.cfg, ctx.out / "modules", missing)
    record_release(ctx.out, list(got.release.values()))
    if got.senders:
        ctx.timer.add("client_training", sum(s.train_seconds for s in got.senders.values()))
    return TrainRound(got, moved, nodes, wire_bytes(messages[0]))


# Where the expected modules come from.


def open_simulation(cfg: Config) -> Opened:
    """A simulation: the data and the partition give partition.json, the modules to expect and the evaluation."""
    ctx = start_run(cfg, kind="flower run")
    train = ctx.train
    histogram = class_histogram(train.labels, ctx.parts, train.num_classes)
    roster = Roster(config_hash(cfg), train.class_names, cfg.generator.min_samples, histogram=histogram)
    # A kept module is reused only if it was trained on its cell's images.
    cells = implied_modules(histogram, range(len(ctx.parts)), cfg.generator.min_samples)
    kept = kept_modules(ctx.out / "modules", cfg)
    skip = {mid: kept[mid] for mid in reusable_modules(kept, cells)}
    if skip:
        log.info("reusing %d modules from an earlier attempt (hash checked); clients skip them", len(skip))
    return Opened(ctx, roster, skip)


def open_deployment(cfg: Config, fl: FlowerConfig) -> Opened:
    """A deployment: no data at the server; the class list, the pins, and the modules kept from an earlier attempt,
    which a site skips where its data is unchanged."""
    classes = class_list(cfg.data.classes)
    pins = load_pins(fl.pins) if fl.pins else None  # refused before anything is written
    check_run_dir(cfg)
    device, timer = select_device(cfg.run.device, cfg.run.threads), Timer()
    out = prepare_run_dir(cfg).resolve()
    setup_logging(out)
    log.info("flower deployment %s on %s, config %s, classes %s", out, device, config_hash(cfg)[:12],
             ",".join(classes))
    kept = kept_modules(out / "modules", cfg)
    if kept:
        log.info("%d modules from an earlier attempt (hash checked); sites whose data is unchanged skip them",
                 len(kept))
    roster = Roster(config_hash(cfg), classes, cfg.generator.min_samples, pins=pins)
    return Opened(RunContext(cfg, out, device, timer), roster, kept)


def set_aside_stale_modules(modules_dir: Path, got: TrainIntake) -> tuple[list[str], list[str]]:
    """Move earlier attempts' modules that a site's accepted claim no longer backs (intake.stale_modules) to
    modules/stale/: they would stand for data the site does not have, and the claim may not be the site's own.
    Returns their ids and the files set aside."""
    kept = {p: load_registry_file(p).manifest for p in sorted(modules_dir.glob("*.safetensors"))}
    stale = {s.module_id: s for s in stale_modules(list(kept.values()), got.senders)}
    moved = []
    for path, m in kept.items():
        if m["module_id"] in stale:
            log.info("setting %s aside in %s/: %s", path.name, STALE_DIR, stale[m["module_id"]].reason)
            moved.append(set_aside(path, modules_dir))
    return sorted(stale), moved


def site_histogram(got: TrainIntake, classes: tuple[str, ...]) -> list[list[int]]:
    """What the server knows of a deployment's data: the counts the sites reported, one row per site (sorted)."""
    return [[got.senders[s].counts.get(c, 0) for c in classes] for s in sorted(got.senders)]


def settle_sites(opened: Opened, got: TrainIntake) -> tuple[list[str], list[str]]:
    """After a deployment's train round: set aside the kept modules the sites' counts no longer back, and write
    partition.json from those counts, which are all the server knows of the data. Returns the stale module ids and
    the files set aside."""
    out, classes = opened.ctx.out, opened.roster.classes
    stale, moved = set_aside_stale_modules(out / "modules", got)
    atomic_write_json(out / "partition.json", {
        "scheme": "sites", "num_clients": len(got.senders), "class_names": list(classes),
        "sites": sorted(got.senders), "histogram": site_histogram(got, classes)})
    return stale, moved


# How scoring runs: the sites score by counts (a simulation's server holds its test set: runner.factory_stage).


def site_counts(reply: Message, site: str, num_classes: int, declared: int | None = None,
                pins: Pins | None = None) -> dict[str, np.ndarray]:
    """The counts an evaluate reply carries, decoded (wire) and checked (intake.check_counts_reply): what
    metrics.check_counts accepts, over no more test images than the site declared in its train reply nor its pin
    allows. ReplyError otherwise."""
    if reply.has_error():
        raise ReplyError(reply.error.reason)
    pin = pins.of(site) if pins is not None else None
    return check_counts_reply(parse_counts_reply(reply.content, num_classes, f"site {site}"), site, num_classes,
                              MAX_SITE_IMAGES if declared is None else declared, pin)


def evaluate_at_sites(grid: Grid, cfg: Config, fl: FlowerConfig, got: TrainIntake, pins: Pins | None,
                      classes: tuple[str, ...], weights: dict[str, bytes], blur: float) -> tuple[dict, dict]:
    """Send the classifier (or local mode's experts, combined at the site by classifier.combine) to every site
    that trained, sum the counts they return and compute the metrics from the sums. Returns the metrics, and
    metrics.json's evaluation: per site what was scored, its own metrics, and the bytes."""
    sites = sorted(got.senders)
    # Local mode's experts travel with the counts of real images they trained on (the sites' reports), which the
    # holders rule of combine_experts weighs by; the server's one classifier, or the product, needs none.
    held = ({k: [got.senders[k].counts.get(c, 0) for c in classes] for k in weights}
            if cfg.classifier.mode == "local" and cfg.classifier.combine == "holders" else None)
    messages = [Message(classifier_content(weights, config_hash(cfg), blur, held),
                        dst_node_id=got.senders[site].node_id, message_type=EVALUATE, ttl=fl.train_timeout)
                for site in sites]
    down = {site: wire_bytes(m) for site, m in zip(sites, messages, strict=True)}
    answered, failed = site_round(grid, fl, got.node_of, messages)
    total = None
    scored, up, per_site = {}, {}, {}
    for site, reply in answered:
        try:
            counts = site_counts(reply, site, len(classes), got.senders[site].test_images, pins)
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
    evaluation = {"sites": dict(sorted(scored.items())), "failed_sites": dict(sorted(failed.items())),
                  "declared_test_images": {s: got.senders[s].test_images for s in sites},
                  "per_site": dict(sorted(per_site.items())), "bytes_down": down, "bytes_up": dict(sorted(up.items()))}
    return metrics_from_counts(**total, class_names=classes), evaluation


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_at_sites(grid: Grid, cfg: Config, fl: FlowerConfig, got: TrainIntake, pins: Pins | None,
                   classes: tuple[str, ...]) -> Score:
    """The server's Score in a deployment: the sites score the classifier on their test folders (counts only); the
    metrics carry the evaluation record, and public_test where the server owns a test set (data.test_root)."""

    def score(model: torch.nn.Module, blur: float) -> dict:
        weights = tensors_to_bytes(model.state_dict())
        metrics, evaluation = evaluate_at_sites(grid, cfg, fl, got, pins, classes, {"classifier": weights}, blur)
        metrics["evaluation"] = evaluation
        if cfg.data.test_root:
            # A public test set the server itself owns, scored here as well.
            public = read_class_folders(cfg.data.test_root, classes, cfg.data.image_size)
            metrics["public_test"] = test_set_score(public, model_device(model))(model, blur)
        return metrics

    return score


def expert_modules(site: str, modules: list[Module], cfg: Config) -> list[str]:
    """The module ids local mode's second round sends a site: every other site's, and its own of the classes it
    gets synthetic images of (synthesis.local_synthetic). A ClientApp keeps nothing between messages (a SuperNode
    may run each in a fresh process), so a site's own modules come back from the server, and count as bytes down."""
    spc, fill = cfg.synthesis.samples_per_class, cfg.synthesis.local_synthetic
    return [m["module_id"] for m, _ in modules
            if m["client_id"] != site or local_synthetic_count(m["num_samples"], spc, fill) > 0]


def expert_round(grid: Grid, fl: FlowerConfig, ctx: RunContext, got: TrainIntake, modules: list[Module],
                 blur: float) -> tuple[dict[str, bytes], dict]:
    """Local mode's second round: each site receives the modules expert_modules names and returns its expert, which
    is checked to load into the run's classifier (intake.check_expert) and written to experts/<site>.safetensors.
    Returns site -> weights, and metrics.json's expert_round."""
    cfg, out = ctx.cfg, ctx.out
    sites = sorted(got.senders)
    files = {m["module_id"]: (out / "modules" / module_filename(m["module_id"])).read_bytes() for m, _ in modules}
    messages = [Message(expert_task_content(config_hash(cfg), blur, {
        mid: files[mid] for mid in expert_modules(site, modules, cfg)}),
        dst_node_id=got.senders[site].node_id, message_type=TRAIN, ttl=fl.train_timeout) for site in sites]
    down = {site: wire_bytes(m) for site, m in zip(sites, messages, strict=True)}
    answered, failed = site_round(grid, fl, got.node_of, messages)
    channels, num_classes = modules[0].manifest["image_shape"][0], len(class_list(cfg.data.classes))
    experts, up = {}, {}
    (out / "experts").mkdir(exist_ok=True)
    for site, reply in answered:
        try:
            if reply.has_error():
                raise ReplyError(reply.error.reason)
            weights = check_expert(parse_expert_reply(reply.content), site, channels, num_classes, cfg.classifier,
                                   blur)
        except ReplyError as e:
            failed[site] = str(e)
            log.info("site %s: expert refused: %s", site, e)
            continue
        atomic_write_bytes(out / "experts" / f"{site}.safetensors", weights)
        experts[site], up[site] = weights, wire_bytes(reply)
        log.info("site %s: expert received (%d bytes on the wire)", site, up[site])
    if not experts:
        raise RuntimeError(f"no site returned an expert; failures: {failed}")
    return experts, {"sites": sorted(experts), "failed_sites": dict(sorted(failed.items())), "bytes_down": down,
                     "bytes_up": dict(sorted(up.items()))}


def local_sites_stage(grid: Grid, fl: FlowerConfig, opened: Opened, got: TrainIntake, modules: list[Module]) -> dict:
    """Local mode in a deployment: experts trained at the sites, combined at the sites by classifier.combine."""
    ctx, classes = opened.ctx, opened.roster.classes
    cfg, out, timer = ctx.cfg, ctx.out, ctx.timer
    blur = input_blur(cfg, modules)
    t0 = time.perf_counter()
    experts, expert_record = expert_round(grid, fl, ctx, got, modules, blur)
    timer.add("experts_round_trip", time.perf_counter() - t0)
    t0 = time.perf_counter()
    metrics, evaluation = evaluate_at_sites(grid, cfg, fl, got, opened.roster.pins, classes, experts, blur)
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
        "evaluation": evaluation,
        "expert_round": expert_record,
    }
    table = write_metrics(ctx, metrics, [("factory-local", metrics)], blur=blur)
    log.info("results (the sites' test folders, %d test images, product of %d experts):\n%s", metrics["num_test"],
             len(experts), table)
    return metrics


# metrics.json's record of the round: a simulation's by client id, a deployment's by site (tests and benchmarks read
# these keys).


def client_report(roster: Roster, got: TrainIntake, present: set[str], nodes: list[int]) -> dict:
    """The keys that say which clients and modules are missing and what crossed the wire."""
    expected = expected_modules(roster, got)
    return {
        "failed_clients": [k for k in sorted(expected) if k not in got.senders],
        "missing_modules": sorted(mid for mids in expected.values() for mid in mids if mid not in present),
        "flower": {
            "nodes": nodes,
            "node_of_client": {str(k): s.node_id for k, s in sorted(got.senders.items())},
            "errors": list(got.errors),
            "rejected_modules": list(got.rejected),
            "bytes_on_wire": {str(k): s.wire_bytes for k, s in sorted(got.senders.items())},
            "module_bytes_received": {str(k): s.module_bytes for k, s in sorted(got.senders.items())},
        },
    }


def site_report(roster: Roster, train: TrainRound, present: set[str], stale: list[str], moved: list[str]) -> dict:
    """The keys that say which sites answered, failed and sent what, and how far their names were trusted."""
    got = train.got
    sites = sorted(got.senders)
    expected = expected_modules(roster, got)
    return {
        "sites": sites,
        "failed_sites": dict(sorted(got.site_errors.items())),
        "missing_modules": sorted(mid for mids in expected.values() for mid in mids if mid not in present),
        "flower": {
            "nodes": train.nodes,
            "node_of_site": {s: got.senders[s].node_id for s in sites},
            "errors": list(got.errors),
            "rejected_modules": list(got.rejected),
            "bytes_on_wire": {s: got.senders[s].wire_bytes for s in sites},
            "bytes_down_on_wire": {s: train.bytes_down for s in sites},
            "module_bytes_received": {s: got.senders[s].module_bytes for s in sites},
            "site_counts": {s: got.senders[s].counts for s in sites},
            # Removed from the registry, not deleted: the files are under modules/stale/ (stale_modules_set_aside).
            "stale_modules_removed": stale,
            "stale_modules_set_aside": moved,
        },
        "trust": trust_record(roster.pins, sites),
    }


def check_flower_config(cfg: Config, fl: FlowerConfig) -> None:
    """Refuse, before anything is written, a run config that mixes a simulation's and a deployment's settings."""
    if fl.deployment:
        if cfg.reference.centralized:
            raise ConfigError("reference.centralized=true pools the sites' real training data, which a deployment's "
                              "server never holds; set reference.centralized=false")
        return
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


def score_simulation(ctx: RunContext, modules: list[Module], report: dict) -> dict:
    """A simulation's server stage: the one `fedfactory run` runs, on the test set this server holds."""
    for k in report["failed_clients"]:
        lost = [mid for mid in report["missing_modules"] if client_of(mid) == client_name(k)]
        log.info("client %d delivered no modules; missing: %s", k, ", ".join(lost) or "none (all reused)")
    # factory_stage writes metrics.json; serve rewrites it with the keys only a federated run has.
    return factory_stage(ctx, modules) | report


def score_deployment(grid: Grid, fl: FlowerConfig, opened: Opened, got: TrainIntake, modules: list[Module],
                     report: dict) -> dict:
    """A deployment's server stage: the classifier (or in local mode the sites' experts) scored at the sites."""
    for site, reason in report["failed_sites"].items():
        log.info("site %s delivered no modules: %s", site, reason)
    ctx, classes = opened.ctx, opened.roster.classes
    cfg = ctx.cfg
    if cfg.classifier.mode == "local":
        metrics = local_sites_stage(grid, fl, opened, got, modules)
    else:
        score = score_at_sites(grid, cfg, fl, got, opened.roster.pins, classes)
        metrics = server_stage(ctx, modules, classes, score, test_name="the sites' test folders")
    metrics |= report
    sites = sorted(got.senders)
    metrics["release"] = release_summary(read_release(ctx.out), site_histogram(got, classes), sites, classes,
                                         cfg.generator.min_samples, cfg.release.max_copy_fraction)
    metrics["site_shares"] = class_shares({s: got.senders[s].counts for s in sites},
                                          flat_plan(metrics.get("synthesis_plan", {})), [m for m, _ in modules],
                                          classes)
    return metrics


def serve(grid: Grid, cfg: Config, fl: FlowerConfig) -> dict:
    """The whole server side of a Flower run (flower.deployment picks the way); returns the metrics written to
    metrics.json."""
    check_flower_config(cfg, fl)
    opened = open_deployment(cfg, fl) if fl.deployment else open_simulation(cfg)
    ctx = opened.ctx
    train = train_round(grid, fl, opened)
    got = train.got
    stale, moved = settle_sites(opened, got) if fl.deployment else ([], [])

    # The registry is the directory, loaded and validated as in `fedfactory run`.
    modules = load_registry(ctx.out / "modules")
    if ctx.parts is not None:
        modules = check_against_partition(modules, ctx.train, ctx.parts)
    if not modules:
        raise RuntimeError(f"no {'site' if fl.deployment else 'client'} delivered a module, nothing to synthesize "
                           f"from; errors: {list(got.errors)}")
    present = {m["module_id"] for m, _ in modules}
    if fl.deployment:
        report = site_report(opened.roster, train, present, stale, train.moved + moved)
        metrics = score_deployment(grid, fl, opened, got, modules, report)
    else:
        metrics = score_simulation(ctx, modules, client_report(opened.roster, got, present, train.nodes))
    atomic_write_json(ctx.out / "metrics.json", metrics)
    log.info("report: %s", write_report(ctx.out, device=ctx.device))
    return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fl = parse_run_config(context.run_config)
    serve(grid, cfg, fl)
