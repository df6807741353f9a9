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

The round trips themselves are flower.transport's; a deployment's rounds at its sites after the train round
(evaluation by counts, local mode's experts, its server stage) are flower.site_rounds'.

A client that raises, or whose node is gone, does not sink the run: the server finishes with the modules it has
and names the clients and modules that are missing, in metrics.json and the log.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedfactory.config import Config, ConfigError, class_list, config_hash
from fedfactory.data.partition import class_histogram
from fedfactory.device import select_device
from fedfactory.federation.intake import (
    accept_train,
    expected_modules,
    load_pins,
    reusable_modules,
    stale_modules,
    trust_record,
)
from fedfactory.federation.records import Arrival, Roster, TrainIntake
from fedfactory.federation.runner import (
    RunContext,
    check_against_partition,
    factory_stage,
    kept_modules,
    record_release,
    start_run,
)
from fedfactory.flower.run_config import FlowerConfig, parse_run_config
from fedfactory.flower.site_rounds import score_deployment, site_histogram
from fedfactory.flower.transport import connected_nodes, exchange
from fedfactory.flower.wire import TRAIN, WireError, parse_train_reply, task_content, wire_bytes
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
        metrics = score_deployment(grid, fl, ctx, opened.roster, got, modules, report)
    else:
        metrics = score_simulation(ctx, modules, client_report(opened.roster, got, present, train.nodes))
    atomic_write_json(ctx.out / "metrics.json", metrics)
    log.info("report: %s", write_report(ctx.out, device=ctx.device))
    return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fl = parse_run_config(context.run_config)
    serve(grid, cfg, fl)
