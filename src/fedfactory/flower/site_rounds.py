"""A deployment's rounds at its sites after the train round: how the server scores where it holds no data.

The sites score the classifier on their own test folders and return counts only (metrics.score_counts), which the
server sums into the metrics; in local mode each site first receives the others' modules (expert_modules) and
returns its expert, and the experts are scored at the sites the same way. A simulation's server holds its test set
and scores as `fedfactory run` does (runner.factory_stage, server_app.score_simulation).
"""

import logging
import time

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedfactory.config import Config, class_list, config_hash
from fedfactory.data.folders import read_class_folders
from fedfactory.federation.factory import bytes_per_client, expert_recipe, local_synthetic_count
from fedfactory.federation.intake import (
    MAX_SITE_IMAGES,
    ReplyError,
    check_counts_reply,
    check_expert,
    class_shares,
    flat_plan,
    release_summary,
)
from fedfactory.federation.records import Pins, Roster, TrainIntake
from fedfactory.federation.runner import (
    RunContext,
    Score,
    input_blur,
    read_release,
    server_stage,
    test_set_score,
    write_metrics,
)
from fedfactory.flower.run_config import FlowerConfig
from fedfactory.flower.transport import exchange
from fedfactory.flower.wire import (
    EVALUATE,
    TRAIN,
    classifier_content,
    expert_task_content,
    parse_counts_reply,
    parse_expert_reply,
    wire_bytes,
)
from fedfactory.metrics import metrics_from_counts
from fedfactory.modules.files import tensors_to_bytes
from fedfactory.modules.ids import module_filename
from fedfactory.registry import Module
from fedfactory.runs import atomic_write_bytes

log = logging.getLogger("fedfactory")


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


def site_histogram(got: TrainIntake, classes: tuple[str, ...]) -> list[list[int]]:
    """What the server knows of a deployment's data: the counts the sites reported, one row per site (sorted)."""
    return [[got.senders[s].counts.get(c, 0) for c in classes] for s in sorted(got.senders)]


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
            weights = check_expert(parse_expert_reply(reply.content), site, channels, num_classes,
                                   expert_recipe(cfg.classifier), blur)
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


def local_sites_stage(grid: Grid, fl: FlowerConfig, ctx: RunContext, roster: Roster, got: TrainIntake,
                      modules: list[Module]) -> dict:
    """Local mode in a deployment: experts trained at the sites, combined at the sites by classifier.combine."""
    classes = roster.classes
    cfg, out, timer = ctx.cfg, ctx.out, ctx.timer
    blur = input_blur(cfg, modules)
    t0 = time.perf_counter()
    experts, expert_record = expert_round(grid, fl, ctx, got, modules, blur)
    timer.add("experts_round_trip", time.perf_counter() - t0)
    t0 = time.perf_counter()
    metrics, evaluation = evaluate_at_sites(grid, cfg, fl, got, roster.pins, classes, experts, blur)
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


def score_deployment(grid: Grid, fl: FlowerConfig, ctx: RunContext, roster: Roster, got: TrainIntake,
                     modules: list[Module], report: dict) -> dict:
    """A deployment's server stage: the classifier (or in local mode the sites' experts) scored at the sites."""
    for site, reason in report["failed_sites"].items():
        log.info("site %s delivered no modules: %s", site, reason)
    classes = roster.classes
    cfg = ctx.cfg
    if cfg.classifier.mode == "local":
        metrics = local_sites_stage(grid, fl, ctx, roster, got, modules)
    else:
        score = score_at_sites(grid, cfg, fl, got, roster.pins, classes)
        metrics = server_stage(ctx, modules, classes, score, test_name="the sites' test folders")
    metrics |= report
    sites = sorted(got.senders)
    metrics["release"] = release_summary(read_release(ctx.out), site_histogram(got, classes), sites, classes,
                                         cfg.generator.min_samples, cfg.release.max_copy_fraction)
    metrics["site_shares"] = class_shares({s: got.senders[s].counts for s in sites},
                                          flat_plan(metrics.get("synthesis_plan", {})), [m for m, _ in modules],
                                          classes)
    return metrics
