"""The ServerApp: send one train message per SuperNode, validate the module bytes that come back exactly as the
registry validates files, then run the same server stage as `fedfactory run` into the same run directory.

A client that raises, or whose node is gone, does not sink the run: the server finishes with the modules it has
and names the clients and modules that are missing, in metrics.json and the log.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedfactory.config import Config, ConfigError, config_hash
from fedfactory.data.datasets import ImageDataset
from fedfactory.data.partition import class_histogram, implied_cells
from fedfactory.errors import FedFactoryError
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.runner import factory_stage, reusable_module, start_run
from fedfactory.flower.run_config import FlowerConfig, parse_run_config
from fedfactory.flower.wire import CLIENT, MODULES, TRAIN, module_bytes, task_content, wire_bytes
from fedfactory.generative.artifact import ModuleError, module_filename, module_from_bytes, module_id
from fedfactory.registry import load_registry, module_spec
from fedfactory.report import write_report
from fedfactory.runs import atomic_write_bytes, atomic_write_json

log = logging.getLogger("fedfactory")

app = ServerApp()


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


def _client_of(reply: Message, cfg: Config, got: Collected) -> int:
    """The client id a reply answers for, after checking it belongs to this run and is the first for that client."""
    if not reply.has_content():
        raise ReplyError("reply has no content")
    info, modules = reply.content.config_records.get(CLIENT), reply.content.array_records.get(MODULES)
    if info is None or modules is None:
        raise ReplyError(f"reply lacks the {CLIENT!r} ConfigRecord or the {MODULES!r} ArrayRecord")
    k = info.get("client-id")
    if type(k) is not int or not 0 <= k < cfg.data.num_clients:
        raise ReplyError(f"client-id {k!r} is not a client of this run (0..{cfg.data.num_clients - 1})")
    if k in got.accepted:
        raise ReplyError(f"client {k} already answered from node {got.node_of[k]}; "
                         "two SuperNodes share a partition-id")
    if info.get("config-hash") != config_hash(cfg):
        raise ReplyError(f"client {k} ran with a different config (hash {str(info.get('config-hash'))[:12]})")
    return k


def collect(replies: list[Message], node_of: dict[str, int], cfg: Config, expected: dict[int, list[str]],
            modules_dir: Path) -> Collected:
    """Validate every module in the replies with the registry's loader; write the good ones, report the rest."""
    got = Collected()
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            got.errors.append({"node_id": node, "reason": reply.error.reason})
            log.info("node %d failed: %s", node, reply.error.reason)
            continue
        try:
            k = _client_of(reply, cfg, got)
        except ReplyError as e:
            got.errors.append({"node_id": node, "reason": str(e)})
            log.info("node %d: reply refused: %s", node, e)
            continue
        got.accepted[k], got.node_of[k], got.module_bytes[k] = [], node, 0
        got.wire_bytes[k] = wire_bytes(reply)
        seconds = reply.content.config_records[CLIENT].get("train-seconds")
        got.train_seconds[k] = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        for mid, array in reply.content.array_records[MODULES].items():
            source = f"node {node} client {k} module {mid[:40]!r}"
            try:
                # Only ids the server expects from this client: this also keeps any path out of file names.
                if mid not in expected.get(k, ()):
                    raise ModuleError(f"{source}: client {k} holds no such class in this run's partition")
                data = module_bytes(array, source)
                manifest, _ = module_from_bytes(data, source, expected=module_spec)
                if manifest["module_id"] != mid:
                    raise ModuleError(f"{source}: its manifest says {manifest['module_id']}")
                if reason := trained_as_asked(manifest, cfg):
                    raise ModuleError(f"{source}: {reason}")
            except ModuleError as e:
                got.rejected.append({"node_id": node, "client_id": k, "module_id": mid[:40], "reason": str(e)})
                log.info("rejected: %s", e)
                continue
            atomic_write_bytes(modules_dir / module_filename(mid), data)
            got.accepted[k].append(mid)
            got.module_bytes[k] += len(data)
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


def serve(grid: Grid, cfg: Config, fl: FlowerConfig) -> dict:
    """The whole server side of a Flower run; returns the metrics written to metrics.json."""
    if cfg.classifier.mode != "server":
        # "local" mode sends every client the others' modules: a second round these apps do not implement yet.
        raise ConfigError(f"classifier.mode={cfg.classifier.mode!r} runs only with `fedfactory run`; use server")
    # The data and the partition give partition.json, the modules to expect and the evaluation.
    out, device, timer, train, test, parts = start_run(cfg, kind="flower run")
    expected = expected_modules(train, parts, cfg.generator.min_samples)
    have = [mid for mids in expected.values() for mid in mids
            if reusable_module(out / "modules" / module_filename(mid), cfg)]
    if have:
        log.info("reusing %d modules from an earlier attempt (hash checked); clients skip them", len(have))

    # Wait for the SuperNodes, then one train message each; a TTL long enough for generator training.
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, cfg.data.num_clients, fl.wait_nodes)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within flower.wait_nodes={fl.wait_nodes}s")
    if len(nodes) < cfg.data.num_clients:
        log.info("only %d of %d SuperNodes connected within %.0fs; going on without the others", len(nodes),
                 cfg.data.num_clients, fl.wait_nodes)
    messages = [Message(task_content(config_hash(cfg), have), dst_node_id=n, message_type=TRAIN,
                        ttl=fl.train_timeout) for n in nodes]
    replies, node_of, silent = exchange(grid, messages, fl.train_timeout)
    timer.add("clients_round_trip", time.perf_counter() - t0)
    got = collect(replies, node_of, cfg, expected, out / "modules")
    for node in silent:
        got.errors.append({"node_id": node, "reason": f"no reply within flower.train_timeout={fl.train_timeout}s"})
        log.info("node %d: no reply within %.0fs", node, fl.train_timeout)
    if got.train_seconds:
        timer.add("client_training", sum(got.train_seconds.values()))

    # Server: the registry is the directory, loaded and validated as in `fedfactory run`.
    modules = load_registry(out / "modules")
    if not modules:
        raise RuntimeError(f"no client delivered a module, nothing to synthesize from; errors: {got.errors}")
    report = failure_report(got, expected, {m["module_id"] for m, _ in modules}, nodes)
    for k in report["failed_clients"]:
        lost = [mid for mid in report["missing_modules"] if mid.startswith(f"client-{k:03d}_")]
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
