"""What crosses the wire: a module travels as the exact bytes of its safetensors file, in one Array.

Why bytes rather than one Array per tensor plus a manifest ConfigRecord: the file is the unit the registry
stores, hashes and validates, so carrying it unchanged makes the server's check the same `module_from_bytes`
that guards the registry, keeps the manifest and the weights it hashes in one piece, and leaves nothing to
re-serialize (the bytes a client sends are the bytes the server writes). An Array rather than a `bytes` entry
in a ConfigRecord, because Flower splits Arrays into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), so
large modules stream; the custom stype keeps Flower from ever calling `np.load` on them.
"""

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedfactory.federation.intake import oversized
from fedfactory.modules.files import MAX_FILE_BYTES
from fedfactory.modules.refusal import ModuleError

MODULE_STYPE = "fedfactory.safetensors"
TRAIN = "train"  # message type: train every module this node holds
TASK = "fedfactory-task"  # ConfigRecord of the instruction: config-hash, skip (module ids the server has)
MODULES = "modules"  # ArrayRecord of the reply: module id -> Array holding the module file's bytes
CLIENT = "fedfactory-client"  # ConfigRecord of the reply: client-id (or site, classes, counts), config-hash, ...
EVALUATE = "evaluate"  # message type: score this classifier on the site's test folder, reply with counts only
CLASSIFIER = "classifier"  # ArrayRecord of an evaluate message: "weights" -> the classifier's safetensors bytes
CLASSIFIER_STYPE = "fedfactory.classifier"
COUNTS = "counts"  # ArrayRecord of an evaluate reply: confusion, positive, negative (metrics.score_counts)
RELEASE = "release"  # train reply's CLIENT entry: JSON list of the release check's records (audit.release_check)
MAX_RELEASE_CHARS = 1 << 20  # of that JSON: a record is about 400 characters


def release_list(info) -> list | None:
    """The release records a train reply's ConfigRecord carries, decoded (bounded before json.loads); None if none."""
    raw = info.get(RELEASE)
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > MAX_RELEASE_CHARS:
        raise ModuleError(f"the reply's {RELEASE!r} entry must be a JSON string of at most {MAX_RELEASE_CHARS} "
                          "characters")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModuleError(f"the reply's {RELEASE!r} entry is not JSON ({e})") from None


def module_array(data: bytes) -> Array:
    """Wrap a module file's bytes for a reply."""
    return Array(dtype="uint8", shape=(len(data),), stype=MODULE_STYPE, data=data)


def module_bytes(array: object, source: str) -> bytes:
    """The module bytes an Array claims to carry; refuses anything that is not a module payload."""
    if not isinstance(array, Array) or array.stype != MODULE_STYPE or array.dtype != "uint8":
        what = f"stype {array.stype!r}" if isinstance(array, Array) else type(array).__name__
        raise ModuleError(f"{source}: payload is {what}, not {MODULE_STYPE!r}; send module_to_bytes output")
    # The size is checked before a byte is parsed: module_from_bytes reads the header of whatever it is given.
    if reason := oversized(len(array.data), MAX_FILE_BYTES, source):
        raise ModuleError(f"{reason}; send module_to_bytes output")
    if tuple(array.shape) != (len(array.data),):
        raise ModuleError(f"{source}: payload shape {tuple(array.shape)} does not describe its {len(array.data)} "
                          "bytes; send module_to_bytes output")
    return bytes(array.data)


def classifier_array(weights: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(weights),), stype=CLASSIFIER_STYPE, data=weights)


def classifier_content(weights: dict[str, bytes], config_hash: str, input_blur: float,
                       held: dict[str, list[int]] | None = None) -> RecordDict:
    """An evaluate message: classifiers as safetensors bytes (one, or local mode's experts, by name), what a site
    needs to rebuild them, and for experts the real images per class each trained on (held, for
    federation.factory.combine_experts), under "held-<name>"."""
    task = {"config-hash": config_hash, "input-blur": input_blur} | {f"held-{k}": v for k, v in (held or {}).items()}
    return RecordDict({CLASSIFIER: ArrayRecord({name: classifier_array(w) for name, w in weights.items()}),
                       TASK: ConfigRecord(task)})


def classifier_bytes(record: ArrayRecord) -> dict[str, bytes]:
    """Name -> safetensors bytes of every classifier in a record; refuses any other payload."""
    out = {}
    for name, array in record.items():
        if not isinstance(array, Array) or array.stype != CLASSIFIER_STYPE:
            raise ValueError(f"{name[:40]!r} is not a {CLASSIFIER_STYPE!r} payload")
        # A classifier is bounded as a module file is, before safetensors reads its header.
        if reason := oversized(len(array.data), MAX_FILE_BYTES, f"classifier {name[:40]!r}"):
            raise ValueError(reason)
        out[name] = bytes(array.data)
    return out


def expert_task_content(config_hash: str, input_blur: float, modules: dict[str, bytes]) -> RecordDict:
    """Local mode's second round: the modules a site synthesizes from (server_app.expert_modules); the site trains
    its expert on real + synthetic data."""
    return RecordDict({TASK: ConfigRecord({"config-hash": config_hash, "stage": "expert", "input-blur": input_blur}),
                       MODULES: ArrayRecord({mid: module_array(data) for mid, data in modules.items()})})


def expert_reply_content(site: str, config_hash: str, weights: bytes, seconds: float) -> RecordDict:
    return RecordDict({CLASSIFIER: ArrayRecord({site: classifier_array(weights)}),
                       CLIENT: ConfigRecord({"site": site, "config-hash": config_hash, "train-seconds": seconds})})


def site_reply_content(site: str, config_hash: str, counts: dict[str, int], modules: dict[str, bytes],
                       train_seconds: float, test_images: int = 0, release: list[dict] = ()) -> RecordDict:
    """A deployment site's train reply: its name, its images per class (class name -> count), its modules, the
    test images it will score (declared before scoring, so the server can bound its evaluation counts), and the
    release check's record of every module it trained (withheld ones included)."""
    info = ConfigRecord({"site": site, "config-hash": config_hash, "train-seconds": train_seconds,
                         "classes": list(counts), "counts": list(counts.values()), "test-images": test_images,
                         RELEASE: json.dumps(list(release))})
    return RecordDict({MODULES: ArrayRecord({mid: module_array(data) for mid, data in modules.items()}),
                       CLIENT: info})


def site_error_content(site: str, config_hash: str, error: str) -> RecordDict:
    """A deployment site's train reply when its own data is at fault: its name and what to fix, no modules."""
    return RecordDict({MODULES: ArrayRecord(), CLIENT: ConfigRecord({"site": site, "config-hash": config_hash,
                                                                     "error": error})})


def counts_content(site: str, config_hash: str, counts: dict[str, np.ndarray], seconds: float) -> RecordDict:
    """An evaluate reply: the counts of metrics.score_counts, and nothing about any single image."""
    return RecordDict({COUNTS: ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v))
                                            for k, v in counts.items()}),
                       CLIENT: ConfigRecord({"site": site, "config-hash": config_hash, "seconds": seconds})})


def task_content(config_hash: str, skip: list[str], skip_counts: list[int] | None = None) -> RecordDict:
    """A train message: skip the modules the server holds; in a deployment, only those trained on as many images
    as the site now holds (skip-counts), so a site whose data changed retrains them."""
    task = {"config-hash": config_hash, "skip": list(skip)}
    return RecordDict({TASK: ConfigRecord(task | ({} if skip_counts is None else {"skip-counts": list(skip_counts)}))})


def reply_content(client_id: int, config_hash: str, modules: dict[str, bytes], train_seconds: float,
                  release: list[dict] = ()) -> RecordDict:
    info = ConfigRecord({"client-id": client_id, "config-hash": config_hash, "train-seconds": train_seconds,
                         RELEASE: json.dumps(list(release))})
    return RecordDict({MODULES: ArrayRecord({mid: module_array(data) for mid, data in modules.items()}),
                       CLIENT: info})


def wire_bytes(message: Message) -> int:
    """Bytes of the objects Flower transfers for a message (metadata, records, array chunks), before gRPC framing."""
    # Private in Flower 1.42 (pinned), but it is exactly what the SuperLink stores and forwards.
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
