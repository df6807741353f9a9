"""What the server accepts from the clients and sites, and why: pure functions over plain records, so the rules are
tested without the transport (tests/test_intake.py plays the dishonest site).

flower/wire.py decodes each reply into one of the frozen records of federation/records.py (TrainReply, ExpertReply,
CountsReply); the functions here decide from those records alone which replies, counts and modules are accepted, and
which kept modules a round leaves stale. The server_app does the round trips and the file writes. A site's name, its
images per class and its test images are claims. Without a pin file they are trusted as reported, within
MAX_SITE_IMAGES; with one (flower.pins, `load_pins`), each site's name is bound to the SuperNode id the SuperLink
authenticated, and its counts to the operator's ceilings. The in-process runner calls `partition_mismatches` and
`reusable_modules`.
"""

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load

from fedfactory.classifier import classifier_from_state
from fedfactory.config import Config, ConfigError
from fedfactory.data.partition import implied_cells
from fedfactory.errors import FedFactoryError
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.plan import manifest_plan
from fedfactory.federation.records import (
    Arrival,
    Claim,
    CountsReply,
    ExpertReply,
    Payload,
    Pin,
    Pins,
    Roster,
    Sender,
    Stale,
    TrainIntake,
    TrainReply,
)
from fedfactory.metrics import NUM_BINS, check_counts
from fedfactory.modules.files import module_from_bytes
from fedfactory.modules.ids import is_site_name, module_id
from fedfactory.modules.refusal import ModuleError
from fedfactory.privacy.accounting import PrivacyBudgetError
from fedfactory.registry import module_spec

# A site's images of one class or of its test set, as it reports them: far beyond any real site, and small enough
# that sums of counts (class histograms, mixture weights, confusion matrices) stay exact in int64.
MAX_SITE_IMAGES = 1 << 31
MAX_ERROR_CHARS = 2000  # of the error text a site sends, kept in the log and metrics.json
NPY_HEADER_BYTES = 4096  # an .npy header is 128 bytes for these arrays; anything far larger is not a counts array
TRUSTED_NOTE = ("no pin file (flower.pins): site names, images per class and test images were trusted as reported, "
                f"within {MAX_SITE_IMAGES} each")
PIN_KEYS = {"name": str, "node_id": int, "max_images_per_class": int, "max_test_images": int}
PIN_FIX = ("write one [[site]] table per site with name = \"hospital-a\", node_id = <the id `flwr supernode ls` "
           "shows for its registered key>, optional max_images_per_class and max_test_images (positive integers)")


class ReplyError(FedFactoryError, ValueError):
    """A reply the server does not use (malformed, an error, or from no sender of this round); the reason is kept."""


class ClaimError(ReplyError):
    """A reply claims what the server does not accept; none of it is used."""


class PinError(ConfigError):
    """A pin file the server cannot use."""


def parse_pins(doc: object, source: str) -> Pins:
    """The pins of a parsed pin file; PinError naming the file, the key and the fix."""
    if not isinstance(doc, dict) or set(doc) != {"site"} or not isinstance(doc["site"], list) or not doc["site"]:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise PinError(f"{source}: expected only [[site]] tables, got {keys}; {PIN_FIX}")
    pins = []
    for i, table in enumerate(doc["site"]):
        where = f"{source}: site {i + 1}"
        if not isinstance(table, dict):
            raise PinError(f"{where} is not a table; {PIN_FIX}")
        unknown = sorted(set(table) - set(PIN_KEYS))
        if unknown:
            raise PinError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(PIN_KEYS)}")
        for key in ("name", "node_id"):
            if key not in table:
                raise PinError(f"{where}: missing key {key!r}; {PIN_FIX}")
        for key, kind in PIN_KEYS.items():
            value = table.get(key)
            if value is not None and (type(value) is not kind or (kind is int and value <= 0)):
                raise PinError(f"{where}: {key}={value!r} must be a {'positive integer' if kind is int else 'string'}")
        if not is_site_name(table["name"]):
            raise PinError(f"{where}: name={table['name']!r} is not a site name (lowercase letters, digits, dashes, "
                           "starting with a letter); use the SuperNode's --node-config site")
        for key in ("max_images_per_class", "max_test_images"):
            if table.get(key, 0) > MAX_SITE_IMAGES:
                raise PinError(f"{where}: {key}={table[key]} is over {MAX_SITE_IMAGES}; give a real ceiling")
        pins.append(Pin(**table))
    for key in ("name", "node_id"):
        seen = [getattr(p, key) for p in pins]
        twice = sorted({v for v in seen if seen.count(v) > 1}, key=str)
        if twice:
            raise PinError(f"{source}: {key} {twice[0]!r} is pinned twice; every site has its own name and node_id")
    return Pins(source, tuple(pins))


def load_pins(path: str | Path) -> Pins:
    """Read and check a pin file (TOML)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PinError(f"flower.pins={str(path)!r}: no such file; write the pin file or leave flower.pins empty")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PinError(f"{path}: not valid TOML ({e}); {PIN_FIX}") from None
    return parse_pins(doc, str(path))


def check_identity(site: str, node_id: int, pins: Pins | None) -> Pin | None:
    """The pin of a site speaking from node_id; ClaimError if the pin file names another node or not this site."""
    if pins is None:
        return None
    pin = pins.of(site)
    if pin is None:
        raise ClaimError(f"site {site} (node {node_id}) is not in the pin file {pins.path}; add a [[site]] table "
                         "for it or stop that SuperNode")
    if pin.node_id != node_id:
        raise ClaimError(f"site {site} is pinned to node {pin.node_id} in {pins.path}, node {node_id} may not speak "
                         "for it; an impostor, or the site re-registered its key: update its node_id")
    return pin


def check_site_claim(reply: TrainReply, node_id: int, *, config_hash: str, classes: tuple[str, ...],
                     answered: Mapping[str, int | None], pins: Pins | None = None) -> Claim:
    """A deployment site's train reply, checked against the run and the pins.

    `answered`: site -> node of the sites already accepted (or failed) in this round.
    """
    site = reply.sender
    if not is_site_name(site):
        raise ClaimError(f"site {str(site)[:40]!r} is not a site name (lowercase letters, digits, dashes)")
    pin = check_identity(site, node_id, pins)
    if site in answered:
        raise ClaimError(f"site {site} already answered from node {answered[site]}; two SuperNodes share a site "
                         "name: give every SuperNode its own --node-config site")
    if reply.config_hash != config_hash:
        raise ClaimError(f"site {site} ran with a different config (hash {str(reply.config_hash)[:12]})")
    if reply.error is not None:
        return Claim(site, {}, 0, reply.error[:MAX_ERROR_CHARS])
    names, counts = list(reply.classes), list(reply.counts)
    if len(names) != len(counts) or not names:
        raise ClaimError(f"site {site} sent no class counts (classes and counts must be equal-length lists)")
    unknown = [str(n)[:40] for n in names if n not in classes]
    if unknown:
        raise ClaimError(f"site {site} reports classes {unknown} outside data.classes={','.join(classes)!r}")
    if len(set(names)) != len(names):
        raise ClaimError(f"site {site} reports a class twice: {names}")
    if any(type(n) is not int or n <= 0 for n in counts):
        raise ClaimError(f"site {site} reports counts {counts[:10]}: each must be a positive integer")
    ceiling = pin.max_images_per_class if pin and pin.max_images_per_class else MAX_SITE_IMAGES
    if max(counts) > ceiling:
        cls = names[counts.index(max(counts))]
        where = f"its pinned max_images_per_class in {pins.path}" if ceiling != MAX_SITE_IMAGES else "the limit"
        raise ClaimError(f"site {site} reports {max(counts)} images of class {cls}, more than {where} ({ceiling}); "
                         "its counts weight the synthesis mixture, so they are bounded")
    test = reply.test_images
    test_ceiling = pin.max_test_images if pin and pin.max_test_images else MAX_SITE_IMAGES
    if type(test) is not int or test < 0:
        raise ClaimError(f"site {site} declares test-images={str(test)[:20]}: expected a non-negative integer")
    if test > test_ceiling:
        where = f"its pinned max_test_images in {pins.path}" if test_ceiling != MAX_SITE_IMAGES else "the limit"
        raise ClaimError(f"site {site} declares {test} test images, more than {where} ({test_ceiling}); its "
                         "evaluation counts add to the pooled metrics, so they are bounded")
    return Claim(site, {classes.index(n): c for n, c in zip(names, counts, strict=True)}, test)


def check_client_claim(reply: TrainReply, *, num_clients: int, config_hash: str,
                       answered: Mapping[int, int]) -> int:
    """A simulation client's train reply: the client id it answers for, first for that client, same config."""
    k = reply.sender
    if type(k) is not int or not 0 <= k < num_clients:
        what = f"site {str(k)[:40]!r}" if isinstance(k, str) else f"client-id {k!r}"
        raise ClaimError(f"{what} is not a client of this run (0..{num_clients - 1})")
    if k in answered:
        raise ClaimError(f"client {k} already answered from node {answered[k]}; two SuperNodes share a partition-id")
    if reply.config_hash != config_hash:
        raise ClaimError(f"client {k} ran with a different config (hash {str(reply.config_hash)[:12]})")
    return k


def check_claim(reply: TrainReply, node_id: int, roster: Roster, answered: Mapping) -> Claim:
    """Who a train reply is from and what it holds: a client of the partition, whose counts are the partition's row
    (simulation), or a site checked against the class list and the pins, whose counts are its claim (deployment)."""
    if roster.simulation:
        k = check_client_claim(reply, num_clients=len(roster.histogram), config_hash=roster.config_hash,
                               answered=answered)
        return Claim(k, {c: int(n) for c, n in enumerate(roster.histogram[k]) if n})
    return check_site_claim(reply, node_id, config_hash=roster.config_hash, classes=roster.classes,
                            answered=answered, pins=roster.pins)


def check_module(payload: Payload, cells: Mapping[str, int], cfg: Config, source: str, whose: str,
                 unexpected: str) -> dict:
    """The manifest of a module its sender may send (`cells`: module id -> images of the sender's cells), validated
    as the registry's loader validates a file and trained as the run asks; ModuleError naming the reason otherwise.
    `whose` names where the cell counts come from, `unexpected` why a module id outside `cells` is refused."""
    # Only ids the server expects from this sender: this also keeps any path out of file names.
    if payload.module_id not in cells:
        raise ModuleError(f"{source}: {unexpected}")
    if payload.problem is not None:
        raise ModuleError(f"{source}: {payload.problem}")
    manifest, _ = module_from_bytes(payload.data, source, expected=module_spec)
    if manifest["module_id"] != payload.module_id:
        raise ModuleError(f"{source}: its manifest says {manifest['module_id']}")
    if reason := module_count_reason(manifest, cells[payload.module_id], whose):
        raise ModuleError(f"{source}: {reason}")
    try:
        plan = manifest_plan(cfg, manifest)
    except PrivacyBudgetError as e:  # a count no private module can be trained on under this run's budget
        raise ModuleError(f"{source}: {e}") from None
    if reason := trained_as_asked(manifest, plan, cfg.generator):
        raise ModuleError(f"{source}: {reason}")
    return manifest


def accept_train(arrivals: Iterable[Arrival], roster: Roster, cfg: Config) -> TrainIntake:
    """Decide a train round: each reply's sender against the roster (the first answer per sender only), its release
    records, and every module it sends against the cells its counts imply. Nothing is written here."""
    senders: dict[int | str, Sender] = {}
    errors, rejected, site_errors, release = [], [], {}, {}
    whose = "the partition holds" if roster.simulation else "the site reported"
    for a in arrivals:
        if a.reply is None:
            errors.append({"node_id": a.node_id, "reason": a.error})
            continue
        answered = {k: s.node_id for k, s in senders.items()} | {s: None for s in site_errors}
        try:
            claim = check_claim(a.reply, a.node_id, roster, answered)
        except ClaimError as e:
            errors.append({"node_id": a.node_id, "reason": str(e)})
            continue
        k = claim.sender
        if claim.error is not None:
            site_errors[k] = claim.error  # the site's own text, for the log and metrics.json
            errors.append({"node_id": a.node_id, "reason": f"site {k} failed: {claim.error}"})
            continue
        cells = roster.cells(k, claim.counts)
        try:
            if a.reply.release_problem is not None:
                raise ClaimError(a.reply.release_problem)
            release |= release_records(a.reply.release, list(cells), f"client {k}" if roster.simulation else
                                       f"site {k}")
        except ClaimError as e:
            errors.append({"node_id": a.node_id, "reason": f"release records refused: {e}"})
        unexpected = (f"client {k} holds no such class in this run's partition" if roster.simulation else
                      f"site {k} reported no such class")
        modules = {}
        for payload in a.reply.modules:
            source = f"node {a.node_id} client {k} module {payload.module_id[:40]!r}"
            try:
                check_module(payload, cells, cfg, source, whose, unexpected)
            except ModuleError as e:
                rejected.append({"node_id": a.node_id, "client_id": k, "module_id": payload.module_id[:40],
                                 "reason": str(e)})
                continue
            modules[payload.module_id] = payload.data
        counts = {roster.classes[c]: n for c, n in sorted(claim.counts.items())}
        senders[k] = Sender(k, a.node_id, counts, cells, modules, a.wire_bytes, a.reply.train_seconds,
                            claim.test_images)
    return TrainIntake(senders, tuple(errors), tuple(rejected), site_errors, release)


def expected_modules(roster: Roster, intake: TrainIntake) -> dict[int | str, list[str]]:
    """Sender -> the module ids the server expected of it: every client of the partition (simulation, known before
    the round), every site that answered (deployment, from its counts)."""
    if roster.simulation:
        return {k: list(roster.cells(k, dict(enumerate(row.tolist())))) for k, row in enumerate(roster.histogram)}
    return {k: list(s.cells) for k, s in intake.senders.items()}


def reusable_modules(kept: Mapping[str, int], cells: Mapping[str, int]) -> list[str]:
    """The kept modules (module id -> images it was trained on) that a holder may skip: the module of a cell it holds
    now (cells: module id -> images), trained on exactly as many images. Its other kept modules are stale."""
    return [mid for mid, n in cells.items() if kept.get(mid) == n]


def check_expert(reply: ExpertReply, site: str, channels: int, num_classes: int, classifier_cfg,
                 input_blur: float) -> bytes:
    """The expert weights of a site's second-round reply, after checking the reply is the site's and the weights
    load, without unpickling, into the run's classifier exactly; ClaimError otherwise."""
    if reply.site != site:
        raise ClaimError(f"reply is not from site {site}")
    if reply.error is not None:
        raise ClaimError(reply.error[:MAX_ERROR_CHARS])
    if list(reply.weights) != [site]:
        raise ClaimError(f"expected one expert named {site}, got {sorted(reply.weights)[:3]}")
    try:
        classifier_from_state(load(reply.weights[site]), channels, num_classes, classifier_cfg, input_blur)
    except (ValueError, SafetensorError, FedFactoryError) as e:
        raise ClaimError(str(e)) from None
    return reply.weights[site]


def check_counts_reply(reply: CountsReply, site: str, num_classes: int, declared: int,
                       pin: Pin | None = None) -> dict[str, np.ndarray]:
    """The counts of a site's evaluate reply, after checking the reply is the site's (check_scored for the rest)."""
    if reply.site != site:
        raise ClaimError(f"evaluate reply is not from site {site}")
    return check_scored(reply.counts, num_classes, site, declared, pin)


def check_scored(counts: dict, num_classes: int, site: str, declared: int, pin: Pin | None = None) -> dict:
    """A site's evaluation counts: what metrics.check_counts accepts, over no more test images than the site declared
    before scoring (its train reply) nor its pinned max_test_images."""
    try:
        counts = check_counts(counts, num_classes)
    except ValueError as e:
        raise ClaimError(f"site {site}: {e}") from None
    total = int(counts["confusion"].sum())
    if total > declared:
        raise ClaimError(f"site {site} scored {total} test images but declared {declared} before scoring; its counts "
                         "are not used")
    if pin is not None and pin.max_test_images is not None and total > pin.max_test_images:
        raise ClaimError(f"site {site} scored {total} test images, more than its pinned max_test_images "
                         f"({pin.max_test_images}); its counts are not used")
    return counts


def too_large(nbytes: int, limit: int) -> str | None:
    """Why a payload of nbytes is refused before it is decoded, or None."""
    return f"payload of {nbytes} bytes is over the limit of {limit} bytes" if nbytes > limit else None


def oversized(nbytes: int, limit: int, source: str) -> str | None:
    """too_large, naming the payload's source."""
    return f"{source}: {reason}" if (reason := too_large(nbytes, limit)) else None


def counts_limit(num_classes: int, num_bins: int = NUM_BINS) -> int:
    """The largest .npy payload one evaluation counts array may be: int64 (C, max(C, bins)) plus its header."""
    return 8 * num_classes * max(num_classes, num_bins) + NPY_HEADER_BYTES


def module_count_reason(manifest: dict, expected: int | None, whose: str) -> str | None:
    """Why a module's num_samples disagrees with the images `whose` (the site's report, the partition) gives its
    cell, or None."""
    if manifest["num_samples"] != expected:
        return f"trained on {manifest['num_samples']} images, {whose} {expected}"
    return None


def partition_mismatches(manifests: list[dict], histogram: np.ndarray) -> list[str]:
    """Simulation: the modules whose num_samples is not the partition's count of their cell (client, class)."""
    bad = []
    for m in manifests:
        k, c = m["client_id"], m["class_id"]
        inside = type(k) is int and 0 <= k < histogram.shape[0] and 0 <= c < histogram.shape[1]
        expected = int(histogram[k, c]) if inside else None
        if reason := module_count_reason(m, expected, "the partition holds"):
            bad.append(f"{m['module_id']}: {reason}")
    return bad


def stale_modules(kept: list[dict], senders: Mapping[int | str, Sender]) -> list[Stale]:
    """Kept modules (manifests) that an accepted claim no longer backs (reusable_modules): the class is gone from the
    site's report, or it reports a different number of images now. The server sets them aside, never deletes them:
    without pins the claim is unauthenticated, and with pins only the pinned node's claim is accepted at all
    (check_site_claim). A site that did not answer makes none of its modules stale."""
    stale = []
    for m in kept:
        sender = senders.get(m["client_id"])
        if sender is not None and not reusable_modules({m["module_id"]: m["num_samples"]}, sender.cells):
            reason = (f"site {sender.name} now reports {sender.counts.get(m['class_name'], 0)} images of class "
                      f"{m['class_name']}, the module was trained on {m['num_samples']}")
            stale.append(Stale(m["module_id"], sender.name, reason))
    return stale


def class_shares(counts: dict[str, dict[str, int]], plan: dict[str, int], manifests: list[dict],
                 classes: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """Site -> class -> its reported images, its share of the class's images, the synthetic images its modules
    contributed and their share of the class's synthetic images: how much each site weighs in each class."""
    owner = {m["module_id"]: (str(m["client_id"]), m["class_name"]) for m in manifests}
    synthetic: dict[tuple[str, str], int] = {}
    for mid, n in plan.items():
        if mid in owner:
            synthetic[owner[mid]] = synthetic.get(owner[mid], 0) + int(n)
    real_total = {c: sum(site.get(c, 0) for site in counts.values()) for c in classes}
    synth_total = {c: sum(n for (_, cls), n in synthetic.items() if cls == c) for c in classes}
    out = {}
    for site in sorted(counts):
        rows = {}
        for c in classes:
            images, made = counts[site].get(c, 0), synthetic.get((site, c), 0)
            if images or made:
                rows[c] = {"images": images, "image_share": images / real_total[c] if real_total[c] else 0.0,
                           "synthetic": made, "synthetic_share": made / synth_total[c] if synth_total[c] else 0.0}
        out[site] = rows
    return out


def flat_plan(plan: dict) -> dict[str, int]:
    """A synthesis plan as module id -> images: server mode's as is, local mode's (receiver -> plan) summed."""
    if all(isinstance(v, dict) for v in plan.values()):
        total: dict[str, int] = {}
        for part in plan.values():
            for mid, n in part.items():
                total[mid] = total.get(mid, 0) + n
        return total
    return dict(plan)


def trust_record(pins: Pins | None, sites: list[str], simulation: bool = False) -> dict:
    """metrics.json's trust: whether names and counts were pinned, and which sites."""
    if simulation:
        return {"pinned": False, "note": "simulation: every module's num_samples was checked against the partition "
                                         "the server computed; client ids were trusted as reported"}
    if pins is None:
        return {"pinned": False, "note": TRUSTED_NOTE}
    return {"pinned": True, "pin_file": pins.path, "sites": {s: pins.of(s).node_id for s in sites if pins.of(s)},
            "note": f"names bound to the SuperLink-authenticated node ids in {pins.path}, counts to its ceilings"}


RELEASE_KEYS = {"module_id": str, "num_samples": int, "copy_fraction": float, "max_copy_fraction": float,
                "released": bool, "ratio_quantiles": dict, "reference": str, "num_synthetic": int}


def release_records(raw: object, expected: list[str] | tuple, whose: str) -> dict[str, dict]:
    """The release-check records a reply carries (module id -> record), each for a module the server expects from
    this sender and of the shape fedfactory.audit.release_check writes; ClaimError otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > len(expected):
        raise ClaimError(f"{whose}: release records must be a list of at most {len(expected)} (one per module)")
    out = {}
    for r in raw:
        if not isinstance(r, dict) or r.keys() != RELEASE_KEYS.keys() or r.get("module_id") not in expected:
            raise ClaimError(f"{whose}: a release record must have exactly {', '.join(sorted(RELEASE_KEYS))}, for "
                             "a module this sender holds")
        bad = [k for k, kind in RELEASE_KEYS.items() if not isinstance(r[k], kind) or (kind is int and
                                                                                      isinstance(r[k], bool))]
        if bad or not 0 <= r["copy_fraction"] <= 1 or len(r["reference"]) > MAX_ERROR_CHARS:
            raise ClaimError(f"{whose}: release record of {r['module_id']} has bad {bad or ['copy_fraction']}")
        out[r["module_id"]] = r
    return out


def release_summary(records: dict[str, dict], histogram: np.ndarray, clients: list, class_names: tuple[str, ...],
                    min_samples: int, max_copy_fraction: float) -> dict:
    """metrics.json's release: the modules the release check withheld (with its numbers), the cells too small for a
    module (generator.min_samples), and the classes that lost every module that way.

    A class without any module gets no synthetic images: the server's classifier never sees it (it is listed in
    missing_classes), and in local mode only its holders' experts, trained on their real images, know it.
    """
    hist = np.atleast_2d(np.asarray(histogram, dtype=np.int64))
    cells = implied_cells(hist, min_samples)
    ids = {module_id(clients[k], c): (k, c) for k, c in cells}
    checked = {mid: r for mid, r in records.items() if mid in ids}
    withheld = {mid: {"num_samples": r["num_samples"], "copy_fraction": r["copy_fraction"],
                      "reference": r["reference"], "ratio_median": r["ratio_quantiles"].get("0.5")}
                for mid, r in sorted(checked.items()) if not r["released"]}
    covered = {c for mid, (_, c) in ids.items() if mid not in withheld}
    small = [{"client": clients[k], "class": class_names[c], "images": int(hist[k, c])}
             for k, c in zip(*np.nonzero((hist > 0) & (hist < min_samples)), strict=True)]
    held = {int(c) for c in np.flatnonzero(hist.sum(0) > 0)}
    return {"max_copy_fraction": max_copy_fraction, "min_samples": min_samples, "checked": len(checked),
            "withheld": withheld, "below_min_samples": small,
            "classes_without_module": [class_names[c] for c in sorted(held - covered)]}
