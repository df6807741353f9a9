"""A module's manifest: the schema (exact keys, types and ranges, the privacy block), its canonical JSON, and the
hashes of the weights and of the manifest itself (docs/architecture.md, "The module file")."""

import hashlib
import json
import math
import re
import sys

import torch

from fedfactory import __version__
from fedfactory.modules.ids import is_id_of, is_module_id, is_site_name
from fedfactory.modules.refusal import is_int, refuse, show
from fedfactory.privacy.accounting import KINDS, PrivacyBudgetError, mechanism_from_dict

# 2: the manifest carries manifest_sha256, a hash over its own canonical JSON (which includes weights_sha256).
# Format 1 modules are refused rather than read: their manifest has no hash, so an edit of it cannot be told apart.
FORMAT_VERSION = 2
MANIFEST_KEY = "fedfactory.manifest"  # safetensors metadata key holding the manifest JSON string

_FAMILY_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_NAME_CHARS = 200
_MAX_CONFIG_KEYS = 256
_MAX_VERSION_CHARS = 64
_MANIFEST_KEYS = frozenset(
    {
        "format_version",
        "module_id",
        "client_id",
        "class_id",
        "class_name",
        "num_samples",
        "image_shape",
        "family",
        "network",
        "diffusion",
        "training",
        "weights_sha256",
        "manifest_sha256",
        "library_version",
    }
)
# Present only in a differentially private module: its guarantee (docs/architecture.md, "The module file").
_OPTIONAL_KEYS = frozenset({"privacy"})
_PRIVACY_KEYS = frozenset({"epsilon", "delta", "adjacency", "accountant", "mechanisms", "notes"})
_ADJACENCIES = ("add-remove", "replace-one")
_MAX_MECHANISMS = 16
_MAX_MECHANISM_CHARS = 300


def _update_field(digest, data: bytes | memoryview) -> None:
    # Length-prefixed fields, so two different modules can never feed the same byte stream.
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Canonical SHA-256 over names (sorted), dtypes, shapes and little-endian bytes of the tensors."""
    if not isinstance(tensors, dict) or not all(isinstance(name, str) for name in tensors):
        raise TypeError("tensors must be a dict with str names")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach().cpu().contiguous()
        _update_field(digest, name.encode("utf-8"))
        _update_field(digest, str(tensor.dtype).encode())
        _update_field(digest, json.dumps(list(tensor.shape)).encode())
        raw = tensor.reshape(-1).view(torch.uint8)
        if sys.byteorder == "big" and tensor.element_size() > 1:
            raw = raw.reshape(-1, tensor.element_size()).flip(-1).reshape(-1)
        _update_field(digest, memoryview(raw.numpy()))
    return digest.hexdigest()


def canonical_json(value: object) -> str:
    """The one JSON text of a manifest: sorted keys, ASCII only, no NaN; what is stored and what is hashed."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def manifest_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its manifest_sha256 field."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(canonical_json(rest).encode("ascii")).hexdigest()


def _check_config(value: object, key: str, source: str) -> None:
    if not isinstance(value, dict) or len(value) > _MAX_CONFIG_KEYS:
        raise refuse(source, f"manifest {key} must be a JSON object of at most {_MAX_CONFIG_KEYS} keys")
    for name, item in value.items():
        if not name or len(name) > _MAX_NAME_CHARS:
            raise refuse(source, f"manifest {key} has an empty or overlong key {show(name)}")
        ok = (
            isinstance(item, (str, bool))
            or is_int(item)
            or (type(item) is float and math.isfinite(item))
            or (isinstance(item, list) and all(is_int(x) for x in item))
        )
        if not ok:
            raise refuse(
                source,
                f"manifest {key}.{name} is {show(item)}; values must be str, int, finite float, bool "
                "or a list of ints",
            )


def _check_privacy(privacy: object, source: str) -> None:
    """A private module's guarantee: {epsilon > 0, delta in (0, 1), adjacency, accountant, mechanisms: [{name, kind,
    sensitivity, noise_std, steps, sampling_rate}], notes: short strings}. Whether the mechanisms give the stated
    epsilon is the server's check (privacy.accounting.guarantee_problem), not the schema's."""
    if not isinstance(privacy, dict) or privacy.keys() != _PRIVACY_KEYS:
        raise refuse(source, f"manifest privacy must be an object with exactly {', '.join(sorted(_PRIVACY_KEYS))}")
    eps, delta = privacy["epsilon"], privacy["delta"]
    if type(eps) not in (int, float) or not math.isfinite(eps) or eps <= 0:
        raise refuse(source, f"privacy.epsilon must be a finite number > 0, got {show(eps)}")
    if type(delta) is not float or not 0 < delta < 1:
        raise refuse(source, f"privacy.delta must be a number in (0, 1), got {show(delta)}")
    if privacy["adjacency"] not in _ADJACENCIES:
        raise refuse(source, f"privacy.adjacency must be one of {', '.join(_ADJACENCIES)}, got "
                     f"{show(privacy['adjacency'])}")
    mechanisms, notes = privacy["mechanisms"], privacy["notes"]
    if not isinstance(mechanisms, list) or not 1 <= len(mechanisms) <= _MAX_MECHANISMS:
        raise refuse(source, f"privacy.mechanisms must be a list of 1 to {_MAX_MECHANISMS} mechanisms")
    for m in mechanisms:
        try:
            mechanism_from_dict(m)
        except PrivacyBudgetError as e:
            raise refuse(source, f"privacy.mechanisms: {e} (kinds: {', '.join(KINDS)})") from None
    texts = [privacy["accountant"]] + [m["name"] for m in mechanisms] + (notes if isinstance(notes, list) else [None])
    if len(texts) > 2 * _MAX_MECHANISMS + 1 or not all(
            isinstance(t, str) and 1 <= len(t) <= _MAX_MECHANISM_CHARS and t.isprintable() for t in texts):
        raise refuse(source, f"privacy.accountant, the mechanisms' names and privacy.notes must be printable "
                     f"strings of at most {_MAX_MECHANISM_CHARS} characters, at most {_MAX_MECHANISMS} notes")


def check_manifest(manifest: object, source: str) -> None:
    """Refuse a manifest that breaks the schema (exact keys, types and ranges) or its own hash."""
    if not isinstance(manifest, dict):
        raise refuse(source, f"manifest is {show(manifest)}, not a JSON object")
    # The version first: an older module then says it is older, not that it lacks a newer field.
    fmt = manifest.get("format_version")
    if not is_int(fmt) or fmt != FORMAT_VERSION:
        raise refuse(
            source,
            f"format_version is {show(fmt)}, this fedfactory reads only {FORMAT_VERSION}",
            f"retrain the module with fedfactory {__version__} (a run directory retrains it when rerun)",
        )
    missing = sorted(_MANIFEST_KEYS - manifest.keys())
    unknown = sorted(manifest.keys() - _MANIFEST_KEYS - _OPTIONAL_KEYS)
    if missing:
        raise refuse(source, f"manifest lacks {', '.join(missing)}")
    if unknown:
        raise refuse(source, f"manifest has unknown keys {', '.join(show(k) for k in unknown[:5])}")
    m = manifest
    if not (is_int(m["client_id"]) and m["client_id"] >= 0) and not is_site_name(m["client_id"]):
        raise refuse(source, f"client_id must be an int >= 0 or a site name, got {show(m['client_id'])}")
    if not is_int(m["class_id"]) or m["class_id"] < 0:
        raise refuse(source, f"class_id must be an int >= 0, got {show(m['class_id'])}")
    mid = m["module_id"]
    if not is_module_id(mid):
        raise refuse(source, f"module_id {show(mid)} does not look like 'client-003_class-007'")
    if not is_id_of(mid, m["client_id"], m["class_id"]):
        raise refuse(
            source,
            f"module_id {show(mid)} does not match client_id {m['client_id']}, class_id {m['class_id']}",
        )
    name = m["class_name"]
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME_CHARS or not name.isprintable():
        raise refuse(
            source, f"class_name must be 1 to {_MAX_NAME_CHARS} printable characters, got {show(name)}"
        )
    if not is_int(m["num_samples"]) or m["num_samples"] < 1:
        raise refuse(source, f"num_samples must be an int >= 1, got {show(m['num_samples'])}")
    shape = m["image_shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(is_int(x) for x in shape)
        and shape[0] in (1, 3)
        and all(1 <= x <= 1024 for x in shape[1:])
    ):
        raise refuse(
            source, f"image_shape must be [C, H, W] with C in {{1, 3}}, 1 <= H, W <= 1024, got {show(shape)}"
        )
    family = m["family"]
    if not isinstance(family, str) or not _FAMILY_RE.fullmatch(family):
        raise refuse(source, f"family {show(family)} must match {_FAMILY_RE.pattern}")
    for key in ("network", "diffusion", "training"):
        _check_config(m[key], key, source)
    training = m["training"]
    if not is_int(training.get("steps")) or training["steps"] < 1:
        raise refuse(source, f"training.steps must be an int >= 1, got {show(training.get('steps'))}")
    if not is_int(training.get("seed")) or training["seed"] < 0:
        raise refuse(source, f"training.seed must be an int >= 0, got {show(training.get('seed'))}")
    if "privacy" in m:
        _check_privacy(m["privacy"], source)
    for key in ("weights_sha256", "manifest_sha256"):
        if not isinstance(m[key], str) or not _SHA256_RE.fullmatch(m[key]):
            raise refuse(source, f"{key} must be 64 lowercase hex digits, got {show(m[key])}")
    version = m["library_version"]
    if (
        not isinstance(version, str)
        or not 1 <= len(version) <= _MAX_VERSION_CHARS
        or not version.isprintable()
    ):
        raise refuse(source, f"library_version must be a short printable string, got {show(version)}")
    # Last, so a schema break is named as such. The hash finds edits and corruption; it is no signature, and
    # whoever rewrites the manifest and its hash together is caught only by the checks above and the weights hash.
    actual = manifest_sha256(m)
    if actual != m["manifest_sha256"]:
        raise refuse(
            source,
            f"manifest hash {actual[:12]}... differs from its manifest_sha256 {m['manifest_sha256'][:12]}..., "
            "so the manifest was edited or corrupted after saving",
            "fetch the original file or retrain the module",
        )


def complete_manifest(manifest: object, tensors: dict[str, torch.Tensor], source: str) -> tuple[str, dict]:
    """The full manifest of `tensors` (version, both hashes and library version filled in) and its canonical JSON
    text; refuses a manifest that breaks the schema."""
    if not isinstance(manifest, dict):
        raise refuse(source, f"manifest is {show(manifest)}, not a dict", "pass a dict")
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "weights_sha256": weights_sha256(tensors),
        "library_version": __version__,
    }
    full.pop("manifest_sha256", None)  # a loaded manifest being re-saved carries its old one
    try:
        text = canonical_json(full)
    except (TypeError, ValueError) as err:
        raise refuse(
            source,
            f"manifest is not plain JSON ({show(str(err), 80)})",
            "use str, int, finite float, bool and lists",
        ) from err
    # Hash and validate the JSON round trip, i.e. exactly what a loader will see (tuples become lists, for one).
    full = json.loads(text)
    full["manifest_sha256"] = manifest_sha256(full)
    text = canonical_json(full)
    check_manifest(full, source)
    return text, full
