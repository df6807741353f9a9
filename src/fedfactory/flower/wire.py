"""What crosses the wire: every protocol key, and for each message a writer and, beside it, its parser.

A parser turns a message's RecordDict into a small frozen record (the server's in federation.records, from which
alone federation.intake decides; the client's here) or raises WireError naming what is malformed. Nothing else
reads a record key.

A module travels as the exact bytes of its safetensors file, in one Array. Why bytes rather than one Array per
tensor plus a manifest ConfigRecord: the file is the unit the registry stores, hashes and validates, so carrying it
unchanged makes the server's check the same `module_from_bytes` that guards the registry, keeps the manifest and the
weights it hashes in one piece, and leaves nothing to re-serialize (the bytes a client sends are the bytes the server
writes). An Array rather than a `bytes` entry in a ConfigRecord, because Flower splits Arrays into chunks of
FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), so large modules stream; the custom stype keeps Flower from ever calling
`np.load` on them.
"""

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedfactory.federation.intake import ReplyError, counts_limit, oversized, too_large
from fedfactory.federation.records import CountsReply, ExpertReply, Payload, TrainReply
from fedfactory.modules.files import MAX_FILE_BYTES
from fedfactory.modules.refusal import ModuleError

MODULE_STYPE = "fedfactory.safetensors"
TRAIN = "train"  # message type: train every module this node holds (or, stage "expert", local mode's expert)
TASK = "fedfactory-task"  # ConfigRecord of a server message: config-hash, skip, skip-counts, stage, input-blur, held-*
MODULES = "modules"  # ArrayRecord: module id -> Array holding the module file's bytes
CLIENT = "fedfactory-client"  # ConfigRecord of a reply: client-id or site, config-hash, and what the reply claims
EVALUATE = "evaluate"  # message type: score this classifier on the site's test folder, reply with counts only
CLASSIFIER = "classifier"  # ArrayRecord: name -> the classifier's (or an expert's) safetensors bytes
CLASSIFIER_STYPE = "fedfactory.classifier"
COUNTS = "counts"  # ArrayRecord of an evaluate reply: confusion, positive, negative (metrics.score_counts)
RELEASE = "release"  # train reply's CLIENT entry: JSON list of the release check's records (audit.release_check)
MAX_RELEASE_CHARS = 1 << 20  # of that JSON: a record is about 400 characters
EXPERT_STAGE = "expert"  # TASK "stage" of local mode's second round
HELD = "held-"  # TASK key prefix: held-<expert> -> the real images per class that expert trained on
NUMPY_STYPE = "numpy.ndarray"  # Flower's stype for Array.from_numpy_ndarray


class WireError(ReplyError):
    """A message that does not follow the protocol: a record or key missing, or a value of the wrong type."""


@dataclass(frozen=True)
class TrainTask:
    """A train message, decoded: skip the modules the server holds; in a deployment only those trained on as many
    images as the site now holds (skip_counts, parallel to skip)."""

    config_hash: str
    skip: tuple[str, ...] = ()
    skip_counts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExpertTask:
    """Local mode's second-round message, decoded: the modules a site synthesizes from, and the classifier's blur."""

    config_hash: str
    input_blur: float
    modules: tuple[Payload, ...]


@dataclass(frozen=True)
class EvaluateTask:
    """An evaluate message, decoded: the classifiers to score by name, their blur, and for local mode's experts the
    real images per class each trained on (as sent: the site checks them, since only it knows when it needs them)."""

    config_hash: str
    input_blur: float
    classifiers: dict[str, bytes]
    held: dict[str, object]


# Typed access to a record's entries.

_MISSING = object()


def _entry(record, key: str, kind: type, default=_MISSING, what: str = "the message"):
    """record[key], checked to be a `kind` (int and float exclude bool; float accepts int), or `default` if absent."""
    value = record.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise WireError(f"{what} lacks the {key!r} entry")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise WireError(f"{what}'s {key!r} entry must be {kind.__name__}, got {type(value).__name__}")
    return float(value) if kind is float else value


def _list(record, key: str, kind: type, what: str) -> tuple:
    """record[key] as a tuple of `kind` (empty if absent)."""
    values = _entry(record, key, list, [], what)
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        raise WireError(f"{what}'s {key!r} entry must be a list of {kind.__name__}")
    return tuple(values)


def _records(content: RecordDict, what: str, config: str, arrays: str | None = None):
    """The ConfigRecord `config` and the ArrayRecord `arrays` of a message's content; WireError if one is missing."""
    info = content.config_records.get(config)
    found = None if arrays is None else content.array_records.get(arrays)
    if info is None or (arrays is not None and found is None):
        need = f"the {config!r} ConfigRecord" + ("" if arrays is None else f" or the {arrays!r} ArrayRecord")
        raise WireError(f"{what} lacks {need}")
    return info, found


# Modules and classifiers as Arrays of file bytes.


def module_array(data: bytes) -> Array:
    """Wrap a module file's bytes for a message."""
    return Array(dtype="uint8", shape=(len(data),), stype=MODULE_STYPE, data=data)


def module_payload(module_id: str, array: object) -> Payload:
    """The module bytes an Array claims to carry, or why it is not a module payload (then its bytes are not kept)."""
    fix = "; send module_to_bytes output"
    if not isinstance(array, Array) or array.stype != MODULE_STYPE or array.dtype != "uint8":
        what = f"stype {array.stype!r}" if isinstance(array, Array) else type(array).__name__
        return Payload(module_id, problem=f"payload is {what}, not {MODULE_STYPE!r}{fix}")
    # The size is checked before a byte is parsed: module_from_bytes reads the header of whatever it is given.
    if reason := too_large(len(array.data), MAX_FILE_BYTES):
        return Payload(module_id, problem=reason + fix)
    if tuple(array.shape) != (len(array.data),):
        return Payload(module_id, problem=f"payload shape {tuple(array.shape)} does not describe its "
                                          f"{len(array.data)} bytes{fix}")
    return Payload(module_id, bytes(array.data))


def _payloads(record: ArrayRecord) -> tuple[Payload, ...]:
    return tuple(module_payload(mid, array) for mid, array in record.items())


def _modules_record(modules: dict[str, bytes]) -> ArrayRecord:
    return ArrayRecord({mid: module_array(data) for mid, data in modules.items()})


def classifier_array(weights: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(weights),), stype=CLASSIFIER_STYPE, data=weights)


def _classifiers(record: ArrayRecord) -> dict[str, bytes]:
    """Name -> safetensors bytes of every classifier in a record; WireError for any other payload."""
    out = {}
    for name, array in record.items():
        if not isinstance(array, Array) or array.stype != CLASSIFIER_STYPE:
            raise WireError(f"{name[:40]!r} is not a {CLASSIFIER_STYPE!r} payload")
        # A classifier is bounded as a module file is, before safetensors reads its header.
        if reason := oversized(len(array.data), MAX_FILE_BYTES, f"classifier {name[:40]!r}"):
            raise WireError(reason)
        out[name] = bytes(array.data)
    return out


# Server to node: the train task, local mode's expert task, the evaluate task.


def task_content(config_hash: str, skip: list[str], skip_counts: list[int] | None = None) -> RecordDict:
    """A train message: skip the modules the server holds; in a deployment, only those trained on as many images
    as the site now holds (skip-counts), so a site whose data changed retrains them."""
    task = {"config-hash": config_hash, "skip": list(skip)}
    return RecordDict({TASK: ConfigRecord(task | ({} if skip_counts is None else {"skip-counts": list(skip_counts)}))})


def expert_task_content(config_hash: str, input_blur: float, modules: dict[str, bytes]) -> RecordDict:
    """Local mode's second round: the modules a site synthesizes from (site_rounds.expert_modules); the site trains
    its expert on real + synthetic data."""
    return RecordDict({TASK: ConfigRecord({"config-hash": config_hash, "stage": EXPERT_STAGE,
                                           "input-blur": input_blur}),
                       MODULES: _modules_record(modules)})


def parse_task(content: RecordDict) -> TrainTask | ExpertTask:
    """A train message, decoded: the train task, or local mode's expert task (its TASK stage says which)."""
    what = "the train message"
    task, _ = _records(content, what, TASK)
    config = _entry(task, "config-hash", str, what=what)
    if _entry(task, "stage", str, "", what) == EXPERT_STAGE:
        modules = content.array_records.get(MODULES, ArrayRecord())
        return ExpertTask(config, _entry(task, "input-blur", float, 0.0, what), _payloads(modules))
    skip = _list(task, "skip", str, what)
    counts = _list(task, "skip-counts", int, what) if "skip-counts" in task else None
    return TrainTask(config, skip, counts)


def classifier_content(weights: dict[str, bytes], config_hash: str, input_blur: float,
                       held: dict[str, list[int]] | None = None) -> RecordDict:
    """An evaluate message: classifiers as safetensors bytes (one, or local mode's experts, by name), what a site
    needs to rebuild them, and for experts the real images per class each trained on (held, for
    federation.factory.combine_experts), under "held-<name>"."""
    task = {"config-hash": config_hash, "input-blur": input_blur} | {f"{HELD}{k}": v for k, v in (held or {}).items()}
    return RecordDict({CLASSIFIER: ArrayRecord({name: classifier_array(w) for name, w in weights.items()}),
                       TASK: ConfigRecord(task)})


def parse_evaluate_task(content: RecordDict) -> EvaluateTask:
    what = "the evaluate message"
    task, classifiers = _records(content, what, TASK, CLASSIFIER)
    held = {key.removeprefix(HELD): value for key, value in task.items() if key.startswith(HELD)}
    return EvaluateTask(_entry(task, "config-hash", str, what=what), _entry(task, "input-blur", float, 0.0, what),
                        _classifiers(classifiers), held)


# Node to server: the train reply (a simulation client's, a site's, a site's error), the expert reply, the counts.


def reply_content(client_id: int, config_hash: str, modules: dict[str, bytes], train_seconds: float,
                  release: list[dict] = ()) -> RecordDict:
    """A simulation client's train reply: its client id, its modules, and the release check's record of each."""
    info = ConfigRecord({"client-id": client_id, "config-hash": config_hash, "train-seconds": train_seconds,
                         RELEASE: json.dumps(list(release))})
    return RecordDict({MODULES: _modules_record(modules), CLIENT: info})


def site_reply_content(site: str, config_hash: str, counts: dict[str, int], modules: dict[str, bytes],
                       train_seconds: float, test_images: int = 0, release: list[dict] = ()) -> RecordDict:
    """A deployment site's train reply: its name, its images per class (class name -> count), its modules, the
    test images it will score (declared before scoring, so the server can bound its evaluation counts), and the
    release check's record of every module it trained (withheld ones included)."""
    info = ConfigRecord({"site": site, "config-hash": config_hash, "train-seconds": train_seconds,
                         "classes": list(counts), "counts": list(counts.values()), "test-images": test_images,
                         RELEASE: json.dumps(list(release))})
    return RecordDict({MODULES: _modules_record(modules), CLIENT: info})


def site_error_content(site: str, config_hash: str, error: str) -> RecordDict:
    """A deployment site's reply when its own data is at fault: its name and what to fix, no modules."""
    return RecordDict({MODULES: ArrayRecord(), CLIENT: ConfigRecord({"site": site, "config-hash": config_hash,
                                                                     "error": error})})


def _sender(info, what: str) -> int | str:
    """The client id or the site name a reply answers for."""
    if ("site" in info) == ("client-id" in info):
        raise WireError(f"{what} must name exactly one of 'client-id' (simulation) and 'site' (deployment)")
    return _entry(info, "site", str, what=what) if "site" in info else _entry(info, "client-id", int, what=what)


def _release(info) -> tuple[object, str | None]:
    """The release records a train reply carries, decoded (bounded before json.loads), and why not if they are not."""
    raw = info.get(RELEASE)
    if raw is None:
        return None, None
    if not isinstance(raw, str) or len(raw) > MAX_RELEASE_CHARS:
        return None, f"the reply's {RELEASE!r} entry must be a JSON string of at most {MAX_RELEASE_CHARS} characters"
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as e:
        return None, f"the reply's {RELEASE!r} entry is not JSON ({e})"


def parse_train_reply(content: RecordDict) -> TrainReply:
    """A train reply of any kind (reply_content, site_reply_content, site_error_content), decoded, not yet believed:
    a payload that is no module, or release records that do not decode, are kept as problems for intake to refuse."""
    what = "the train reply"
    info, modules = _records(content, what, CLIENT, MODULES)
    release, problem = _release(info)
    return TrainReply(
        sender=_sender(info, what), config_hash=_entry(info, "config-hash", str, what=what),
        modules=_payloads(modules), train_seconds=_entry(info, "train-seconds", float, 0.0, what),
        classes=_list(info, "classes", str, what), counts=_list(info, "counts", int, what),
        test_images=_entry(info, "test-images", int, 0, what), error=_entry(info, "error", str, None, what),
        release=release, release_problem=problem)


def expert_reply_content(site: str, config_hash: str, weights: bytes, seconds: float) -> RecordDict:
    """Local mode's second-round reply: the site's expert, named after the site."""
    return RecordDict({CLASSIFIER: ArrayRecord({site: classifier_array(weights)}),
                       CLIENT: ConfigRecord({"site": site, "config-hash": config_hash, "train-seconds": seconds})})


def parse_expert_reply(content: RecordDict) -> ExpertReply:
    """An expert reply (expert_reply_content), or the site's error reply (site_error_content), decoded."""
    what = "the expert reply"
    info, _ = _records(content, what, CLIENT)
    return ExpertReply(_entry(info, "site", str, what=what), _entry(info, "config-hash", str, what=what),
                       _classifiers(content.array_records.get(CLASSIFIER, ArrayRecord())),
                       _entry(info, "train-seconds", float, 0.0, what), _entry(info, "error", str, None, what))


def counts_content(site: str, config_hash: str, counts: dict[str, np.ndarray], seconds: float) -> RecordDict:
    """An evaluate reply: the counts of metrics.score_counts, and nothing about any single image."""
    return RecordDict({COUNTS: ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v))
                                            for k, v in counts.items()}),
                       CLIENT: ConfigRecord({"site": site, "config-hash": config_hash, "seconds": seconds})})


def parse_counts_reply(content: RecordDict, num_classes: int, source: str) -> CountsReply:
    """An evaluate reply, decoded: every counts array bounded in size before np.load (without pickle; the declared
    shape is not trusted). `source` names the site the server sent the classifier to, for the errors."""
    what = f"{source}: the evaluate reply"
    info, arrays = _records(content, what, CLIENT, COUNTS)
    counts = {}
    for key, array in arrays.items():
        if not isinstance(array, Array) or array.stype != NUMPY_STYPE:
            raise WireError(f"{source}: counts {key[:40]!r} is not a numpy array")
        if reason := oversized(len(array.data), counts_limit(num_classes), f"{source}: counts {key[:40]!r}"):
            raise WireError(reason)
        try:
            counts[key] = array.numpy()
        except (ValueError, OSError, EOFError) as e:
            raise WireError(f"{source}: counts {key[:40]!r} do not decode ({e})") from None
    return CountsReply(_entry(info, "site", str, what=what), _entry(info, "config-hash", str, what=what), counts,
                       _entry(info, "seconds", float, 0.0, what))


def module_bytes(payload: Payload, source: str) -> bytes:
    """A payload's module bytes for a node that needs every one (local mode's expert); ModuleError otherwise."""
    if payload.problem is not None:
        raise ModuleError(f"{source}: {payload.problem}")
    return payload.data


def wire_bytes(message: Message) -> int:
    """Bytes of the objects Flower transfers for a message (metadata, records, array chunks), before gRPC framing."""
    # Private in Flower 1.42 (pinned), but it is exactly what the SuperLink stores and forwards.
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
