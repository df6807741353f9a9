"""Module artifact: one safetensors file per client module with a JSON manifest, loaded without pickle."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from fedfactory import __version__
from fedfactory.privacy.accounting import KINDS, PrivacyBudgetError, mechanism_from_dict
from fedfactory.runs import atomic_write_bytes

# 2: the manifest carries manifest_sha256, a hash over its own canonical JSON (which includes weights_sha256).
# Format 1 modules are refused rather than read: their manifest has no hash, so an edit of it cannot be told apart.
FORMAT_VERSION = 2
MANIFEST_KEY = "fedfactory.manifest"  # safetensors metadata key holding the manifest JSON string
MAX_HEADER_BYTES = 1 << 20  # refuse larger safetensors headers before parsing JSON
MAX_FILE_BYTES = 256 << 20

Expected = Callable[[dict], dict[str, tuple[tuple[int, ...], str]]]

# [0-9] rather than \d: \d also matches non-ASCII digits, which would smuggle odd names into paths.
# A deployment's module ids carry the site name instead of a partition index: "hospital-a_class-002".
_SITE_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")
_MODULE_ID_RE = re.compile(r"(?:client-[0-9]{3,6}|(?!client-[0-9]+_)[a-z][a-z0-9-]{0,39})_class-[0-9]{3,6}")
_FAMILY_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_ID = 999_999  # the widest id the six-digit module id pattern can hold
_MAX_RANK = 8
_MAX_NAME_CHARS = 200
_MAX_CONFIG_KEYS = 256
_MAX_VERSION_CHARS = 64
# safetensors dtype code -> (torch dtype, bytes per element). Only what modules need: no object or bool data.
_DTYPES = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
}
_CODE_OF = {dtype: code for code, (dtype, _) in _DTYPES.items()}
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
_RESAVE = "re-save the module with fedfactory.generative.artifact.save_module"
_NOT_A_MODULE = "send the .safetensors file written by save_module"


class ModuleError(ValueError):
    """A module file or payload was refused; the message names the file and the rule it broke."""


def _refuse(source: str, rule: str, fix: str = _RESAVE) -> ModuleError:
    return ModuleError(f"{source}: {rule}; {fix}")


def _show(value: object, limit: int = 60) -> str:
    """Short repr of an untrusted value that cannot break a one-line message or take long to build."""
    if isinstance(value, str):
        text = repr(value[:limit])
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    else:
        # Containers parsed from a hostile header can be huge or deeply nested; name the type only.
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is never a valid count or id.
    return type(value) is int


def is_site_name(name: object) -> bool:
    """A deployment site's name: lowercase letters, digits and dashes, up to 40, not of the simulation's form."""
    return isinstance(name, str) and bool(_SITE_RE.fullmatch(name)) and not re.fullmatch(r"client-[0-9]+", name)


def module_id(client_id: int | str, class_id: int) -> str:
    """Module id for a client (a partition index, or a deployment's site name) and class, e.g.
    "client-003_class-007" or "hospital-a_class-007"."""
    if isinstance(client_id, str) and not is_site_name(client_id):
        raise ValueError(f"site name {_show(client_id)} must be 1 to 40 lowercase letters, digits and dashes, "
                         "starting with a letter (e.g. hospital-a), and not client-<number>")
    for label, value in (("client_id", client_id), ("class_id", class_id)):
        if isinstance(value, str) and label == "client_id":
            continue
        if not _is_int(value) or not 0 <= value <= _MAX_ID:
            raise ValueError(f"{label} must be an int in [0, {_MAX_ID}], got {_show(value)}")
    client = client_id if isinstance(client_id, str) else f"client-{client_id:03d}"
    return f"{client}_class-{class_id:03d}"


def module_filename(mid: str) -> str:
    """File name of a module; refuses anything that is not a module id, so no path can be smuggled in."""
    if not isinstance(mid, str) or not _MODULE_ID_RE.fullmatch(mid):
        raise ValueError(f"module id must look like 'client-003_class-007' or 'hospital-a_class-007', got {_show(mid)}")
    return mid + ".safetensors"


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


def _canonical_json(value: object) -> str:
    """The one JSON text of a manifest: sorted keys, ASCII only, no NaN; what is stored and what is hashed."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def manifest_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its manifest_sha256 field."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(_canonical_json(rest).encode("ascii")).hexdigest()


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # Python keeps the last duplicate while other parsers may keep the first; refusing removes the ambiguity.
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text: str | bytes, source: str, what: str) -> object:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # RecursionError: a header of a million "[" is valid UTF-8 but nests past the parser's stack.
        raise _refuse(source, f"{what} is not valid JSON ({_show(str(err), 80)})", _NOT_A_MODULE) from err


def _check_config(value: object, key: str, source: str) -> None:
    if not isinstance(value, dict) or len(value) > _MAX_CONFIG_KEYS:
        raise _refuse(source, f"manifest {key} must be a JSON object of at most {_MAX_CONFIG_KEYS} keys")
    for name, item in value.items():
        if not name or len(name) > _MAX_NAME_CHARS:
            raise _refuse(source, f"manifest {key} has an empty or overlong key {_show(name)}")
        ok = (
            isinstance(item, (str, bool))
            or _is_int(item)
            or (type(item) is float and math.isfinite(item))
            or (isinstance(item, list) and all(_is_int(x) for x in item))
        )
        if not ok:
            raise _refuse(
                source,
                f"manifest {key}.{name} is {_show(item)}; values must be str, int, finite float, bool "
                "or a list of ints",
            )


def _check_privacy(privacy: object, source: str) -> None:
    """A private module's guarantee: {epsilon > 0, delta in (0, 1), adjacency, accountant, mechanisms: [{name, kind,
    sensitivity, noise_std, steps, sampling_rate}], notes: short strings}. Whether the mechanisms give the stated
    epsilon is the server's check (privacy.accounting.guarantee_problem), not the schema's."""
    if not isinstance(privacy, dict) or privacy.keys() != _PRIVACY_KEYS:
        raise _refuse(source, f"manifest privacy must be an object with exactly {', '.join(sorted(_PRIVACY_KEYS))}")
    eps, delta = privacy["epsilon"], privacy["delta"]
    if type(eps) not in (int, float) or not math.isfinite(eps) or eps <= 0:
        raise _refuse(source, f"privacy.epsilon must be a finite number > 0, got {_show(eps)}")
    if type(delta) is not float or not 0 < delta < 1:
        raise _refuse(source, f"privacy.delta must be a number in (0, 1), got {_show(delta)}")
    if privacy["adjacency"] not in _ADJACENCIES:
        raise _refuse(source, f"privacy.adjacency must be one of {', '.join(_ADJACENCIES)}, got "
                      f"{_show(privacy['adjacency'])}")
    mechanisms, notes = privacy["mechanisms"], privacy["notes"]
    if not isinstance(mechanisms, list) or not 1 <= len(mechanisms) <= _MAX_MECHANISMS:
        raise _refuse(source, f"privacy.mechanisms must be a list of 1 to {_MAX_MECHANISMS} mechanisms")
    for m in mechanisms:
        try:
            mechanism_from_dict(m)
        except PrivacyBudgetError as e:
            raise _refuse(source, f"privacy.mechanisms: {e} (kinds: {', '.join(KINDS)})") from None
    texts = [privacy["accountant"]] + [m["name"] for m in mechanisms] + (notes if isinstance(notes, list) else [None])
    if len(texts) > 2 * _MAX_MECHANISMS + 1 or not all(
            isinstance(t, str) and 1 <= len(t) <= _MAX_MECHANISM_CHARS and t.isprintable() for t in texts):
        raise _refuse(source, f"privacy.accountant, the mechanisms' names and privacy.notes must be printable "
                      f"strings of at most {_MAX_MECHANISM_CHARS} characters, at most {_MAX_MECHANISMS} notes")


def _check_manifest(manifest: object, source: str) -> None:
    """Refuse a manifest that breaks the schema (exact keys, types and ranges) or its own hash."""
    if not isinstance(manifest, dict):
        raise _refuse(source, f"manifest is {_show(manifest)}, not a JSON object")
    # The version first: an older module then says it is older, not that it lacks a newer field.
    fmt = manifest.get("format_version")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise _refuse(
            source,
            f"format_version is {_show(fmt)}, this fedfactory reads only {FORMAT_VERSION}",
            f"retrain the module with fedfactory {__version__} (a run directory retrains it when rerun)",
        )
    missing = sorted(_MANIFEST_KEYS - manifest.keys())
    unknown = sorted(manifest.keys() - _MANIFEST_KEYS - _OPTIONAL_KEYS)
    if missing:
        raise _refuse(source, f"manifest lacks {', '.join(missing)}")
    if unknown:
        raise _refuse(source, f"manifest has unknown keys {', '.join(_show(k) for k in unknown[:5])}")
    m = manifest
    if not (_is_int(m["client_id"]) and m["client_id"] >= 0) and not is_site_name(m["client_id"]):
        raise _refuse(source, f"client_id must be an int >= 0 or a site name, got {_show(m['client_id'])}")
    if not _is_int(m["class_id"]) or m["class_id"] < 0:
        raise _refuse(source, f"class_id must be an int >= 0, got {_show(m['class_id'])}")
    mid = m["module_id"]
    if not isinstance(mid, str) or not _MODULE_ID_RE.fullmatch(mid):
        raise _refuse(source, f"module_id {_show(mid)} does not look like 'client-003_class-007'")
    # Formatted directly: ids past six digits must be refused here, not raise from module_id().
    client = m["client_id"] if isinstance(m["client_id"], str) else f"client-{m['client_id']:03d}"
    if mid != f"{client}_class-{m['class_id']:03d}":
        raise _refuse(
            source,
            f"module_id {_show(mid)} does not match client_id {m['client_id']}, class_id {m['class_id']}",
        )
    name = m["class_name"]
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME_CHARS or not name.isprintable():
        raise _refuse(
            source, f"class_name must be 1 to {_MAX_NAME_CHARS} printable characters, got {_show(name)}"
        )
    if not _is_int(m["num_samples"]) or m["num_samples"] < 1:
        raise _refuse(source, f"num_samples must be an int >= 1, got {_show(m['num_samples'])}")
    shape = m["image_shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(_is_int(x) for x in shape)
        and shape[0] in (1, 3)
        and all(1 <= x <= 1024 for x in shape[1:])
    ):
        raise _refuse(
            source, f"image_shape must be [C, H, W] with C in {{1, 3}}, 1 <= H, W <= 1024, got {_show(shape)}"
        )
    family = m["family"]
    if not isinstance(family, str) or not _FAMILY_RE.fullmatch(family):
        raise _refuse(source, f"family {_show(family)} must match {_FAMILY_RE.pattern}")
    for key in ("network", "diffusion", "training"):
        _check_config(m[key], key, source)
    training = m["training"]
    if not _is_int(training.get("steps")) or training["steps"] < 1:
        raise _refuse(source, f"training.steps must be an int >= 1, got {_show(training.get('steps'))}")
    if not _is_int(training.get("seed")) or training["seed"] < 0:
        raise _refuse(source, f"training.seed must be an int >= 0, got {_show(training.get('seed'))}")
    if "privacy" in m:
        _check_privacy(m["privacy"], source)
    for key in ("weights_sha256", "manifest_sha256"):
        if not isinstance(m[key], str) or not _SHA256_RE.fullmatch(m[key]):
            raise _refuse(source, f"{key} must be 64 lowercase hex digits, got {_show(m[key])}")
    version = m["library_version"]
    if (
        not isinstance(version, str)
        or not 1 <= len(version) <= _MAX_VERSION_CHARS
        or not version.isprintable()
    ):
        raise _refuse(source, f"library_version must be a short printable string, got {_show(version)}")
    # Last, so a schema break is named as such. The hash finds edits and corruption; it is no signature, and
    # whoever rewrites the manifest and its hash together is caught only by the checks above and the weights hash.
    actual = manifest_sha256(m)
    if actual != m["manifest_sha256"]:
        raise _refuse(
            source,
            f"manifest hash {actual[:12]}... differs from its manifest_sha256 {m['manifest_sha256'][:12]}..., "
            "so the manifest was edited or corrupted after saving",
            "fetch the original file or retrain the module",
        )


def _check_tensors_for_save(tensors: object, source: str) -> None:
    if not isinstance(tensors, dict) or not tensors:
        raise _refuse(
            source, "tensors must be a non-empty dict of name -> torch.Tensor", "pass the EMA state dict"
        )
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise _refuse(
                source, f"tensor name {_show(name)} is not allowed", "use the state dict's own names"
            )
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise _refuse(source, f"tensor {name!r} is not a dense torch.Tensor", "pass dense tensors")
        if tensor.dtype not in _CODE_OF:
            raise _refuse(
                source,
                f"tensor {name!r} has dtype {tensor.dtype}; modules hold only {', '.join(_DTYPES)}",
                "cast it (float32 or float16) before saving",
            )
        if tensor.dim() > _MAX_RANK:
            raise _refuse(
                source, f"tensor {name!r} has {tensor.dim()} dims, more than {_MAX_RANK}", "reshape it"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _refuse(source, f"tensor {name!r} has NaN or Inf values", "fix training before exporting")


def module_to_bytes(tensors: dict[str, torch.Tensor], manifest: dict) -> tuple[bytes, dict]:
    """Serialize a module and the completed manifest (version, both hashes, library version filled in)."""
    source = f"module {_show(manifest.get('module_id'))}" if isinstance(manifest, dict) else "module"
    _check_tensors_for_save(tensors, source)
    if not isinstance(manifest, dict):
        raise _refuse(source, f"manifest is {_show(manifest)}, not a dict", "pass a dict")
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "weights_sha256": weights_sha256(tensors),
        "library_version": __version__,
    }
    full.pop("manifest_sha256", None)  # a loaded manifest being re-saved carries its old one
    try:
        text = _canonical_json(full)
    except (TypeError, ValueError) as err:
        raise _refuse(
            source,
            f"manifest is not plain JSON ({_show(str(err), 80)})",
            "use str, int, finite float, bool and lists",
        ) from err
    # Hash and validate the JSON round trip, i.e. exactly what a loader will see (tuples become lists, for one).
    full = json.loads(text)
    full["manifest_sha256"] = manifest_sha256(full)
    text = _canonical_json(full)
    _check_manifest(full, source)
    # Private contiguous CPU copies: safetensors refuses views and tensors that share storage.
    cpu = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}
    data = safetensors.torch.save(cpu, metadata={MANIFEST_KEY: text})
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise _refuse(source, f"header is {header_len} bytes, over {MAX_HEADER_BYTES}", "shrink the manifest")
    if len(data) > MAX_FILE_BYTES:
        raise _refuse(source, f"module is {len(data)} bytes, over {MAX_FILE_BYTES}", "use a smaller network")
    return data, full


def save_module(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict) -> dict:
    """Atomically write a module file; returns the full manifest."""
    data, full = module_to_bytes(tensors, manifest)
    atomic_write_bytes(path, data)
    return full


def _check_prefix(head: bytes, size: int, source: str) -> int:
    """Check size and the 8-byte header length before any parsing; returns the header length."""
    if size > MAX_FILE_BYTES:
        raise _refuse(source, f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit", _NOT_A_MODULE)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    if 2 <= header_len <= MAX_HEADER_BYTES and 8 + header_len <= size and head[8:9] == b"{":
        return header_len
    # Passing the test above rules out every pickle of protocol >= 2: its third byte is an opcode >= 0x28, so
    # its "header length" would exceed MAX_HEADER_BYTES. Testing 0x80 first would instead refuse real files
    # whose header length happens to be 128 mod 256. Either way nothing here is ever unpickled.
    if head[:1] == b"\x80":
        raise _refuse(
            source, "file is a Python pickle, which is never loaded (it can run code)", _NOT_A_MODULE
        )
    if head[:4] == b"PK\x03\x04":
        raise _refuse(
            source, "file is a zip archive (torch.save output), which is never loaded", _NOT_A_MODULE
        )
    if len(head) < 9:
        raise _refuse(source, f"file is {size} bytes, too short for a safetensors header", _NOT_A_MODULE)
    if not 2 <= header_len <= MAX_HEADER_BYTES:
        raise _refuse(source, f"header length {header_len} is outside [2, {MAX_HEADER_BYTES}]", _NOT_A_MODULE)
    if 8 + header_len > size:
        raise _refuse(
            source, f"header length {header_len} runs past the {size}-byte file (truncated?)", _NOT_A_MODULE
        )
    raise _refuse(source, "header does not start with '{'", _NOT_A_MODULE)


def _parse_header(raw: bytes, buffer_len: int, source: str) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """Check the header JSON against a `buffer_len`-byte data buffer; returns (tensor specs, metadata)."""
    header = _parse_json(raw, source, "header")
    if not isinstance(header, dict):
        raise _refuse(source, "header is not a JSON object", _NOT_A_MODULE)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(source, "header has no __metadata__ object of strings, so no manifest", _RESAVE)
    if not header:
        raise _refuse(source, "file holds no tensors", _RESAVE)
    specs, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or info.keys() != {"dtype", "shape", "data_offsets"}:
            raise _refuse(source, f"tensor {_show(name)} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _refuse(
                source, f"tensor {_show(name)} has dtype {_show(dtype)}, allowed: {', '.join(_DTYPES)}"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_RANK
            and all(_is_int(d) and 0 <= d <= MAX_FILE_BYTES for d in shape)
        ):
            raise _refuse(source, f"tensor {_show(name)} has shape {_show(shape)}, not a short list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(x) for x in offsets)
            and 0 <= offsets[0] <= offsets[1] <= buffer_len
        ):
            raise _refuse(
                source,
                f"tensor {_show(name)} data_offsets {_show(offsets)} fall outside the {buffer_len}-byte data",
            )
        begin, end = offsets
        if math.prod(shape) * _DTYPES[dtype][1] != end - begin:
            raise _refuse(
                source, f"tensor {_show(name)} shape {shape} {dtype} does not fill its {end - begin} bytes"
            )
        specs[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    # Sorted spans must tile the buffer exactly: no overlap (aliased tensors), no gap, no trailing bytes.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _refuse(
                source, f"tensor {_show(name)} starts at byte {begin}, expected {position} (overlap or gap)"
            )
        position = end
    if position != buffer_len:
        raise _refuse(source, f"file has {buffer_len - position} bytes after the last tensor")
    return specs, metadata


def _manifest_from_metadata(metadata: dict, source: str) -> dict:
    if MANIFEST_KEY not in metadata:
        raise _refuse(source, f"header metadata has no {MANIFEST_KEY!r} entry (manifest missing)")
    unknown = sorted(metadata.keys() - {MANIFEST_KEY})
    if unknown:
        raise _refuse(source, f"header metadata has unknown keys {', '.join(_show(k) for k in unknown[:5])}")
    text = metadata[MANIFEST_KEY]
    manifest = _parse_json(text, source, "manifest")
    _check_manifest(manifest, source)
    # The hash covers the parsed values; this covers the text, so "0e0" for 0.0 or reordered keys is an edit too
    # and a module's bytes stay a function of its contents.
    if text != _canonical_json(manifest):
        raise _refuse(
            source,
            "manifest text is not the canonical JSON save_module writes, so it was edited after saving",
            "fetch the original file or retrain the module",
        )
    return manifest


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept "F32", "float32", "torch.float32" or a torch.dtype, as callers of `expected` find handy."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype][0]
    for known in _CODE_OF:
        if dtype in (str(known), str(known).removeprefix("torch.")):
            return known
    raise ValueError(f"expected() returned dtype {dtype!r}; use one of {', '.join(_DTYPES)}")


def _names(names: list[str]) -> str:
    shown = ", ".join(_show(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"


def _check_expected(
    tensors: dict[str, torch.Tensor], manifest: dict, expected: Expected, source: str
) -> None:
    try:
        spec = expected(manifest)
    except (ValueError, TypeError, KeyError) as err:
        # The manifest passed the schema, so a failure here means its config describes no valid network.
        raise _refuse(source, f"manifest's network config is not usable ({_show(str(err), 80)})") from err
    missing = sorted(spec.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - spec.keys())
    if missing or unexpected:
        raise _refuse(
            source,
            f"tensor names differ from the declared network: missing {_names(missing)}, "
            f"unexpected {_names(unexpected)}",
        )
    for name in sorted(spec):
        shape, dtype = spec[name]
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != _torch_dtype(dtype):
            raise _refuse(
                source,
                f"tensor {_show(name)} is {_CODE_OF[tensor.dtype]} {list(tensor.shape)}, the network "
                f"declared in the manifest needs {_CODE_OF.get(_torch_dtype(dtype), dtype)} {list(shape)}",
            )


def module_from_bytes(
    data: bytes, source: str, expected: Expected | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate untrusted module bytes and return (manifest, tensors); refuses with ModuleError."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"module data must be bytes, got {type(data).__name__}")
    # 1. Size and magic, before any parsing.
    header_len = _check_prefix(data[:9], len(data), source)
    # 2. Our own header check, so safetensors only ever sees a structurally sound file.
    specs, metadata = _parse_header(data[8 : 8 + header_len], len(data) - 8 - header_len, source)
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as err:
        # Backstop for rules safetensors enforces beyond ours (e.g. its stricter JSON string rules).
        raise _refuse(source, f"safetensors refused the file ({_show(str(err), 80)})", _NOT_A_MODULE) from err
    if {n: (_CODE_OF.get(t.dtype), tuple(t.shape)) for n, t in tensors.items()} != specs:
        raise _refuse(source, "safetensors read tensors that differ from the header", _NOT_A_MODULE)
    # 3. Manifest.
    manifest = _manifest_from_metadata(metadata, source)
    # 4. Names, shapes and dtypes against the network the manifest declares.
    if expected is not None:
        _check_expected(tensors, manifest, expected, source)
    # 5. Finiteness: one NaN would poison every image the module synthesizes.
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise _refuse(
                    source, f"tensor {_show(name)} has {bad} NaN or Inf values", "retrain the module"
                )
    # 6. Hash last: it is the most expensive check and the one a corrupted copy fails.
    actual = weights_sha256(tensors)
    if actual != manifest["weights_sha256"]:
        raise _refuse(
            source,
            f"weights hash {actual[:12]}... differs from the manifest's {manifest['weights_sha256'][:12]}...",
            "the file was corrupted or edited; fetch or re-save it",
        )
    return manifest, tensors


def _stat_module_file(path: Path, source: str) -> int:
    # Checked before open(): opening a FIFO or device would block or stream without end.
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(source, "not a regular file", "pass a module .safetensors file")
    if info.st_size > MAX_FILE_BYTES:
        raise _refuse(
            source, f"file is {info.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit", _NOT_A_MODULE
        )
    return info.st_size


def load_module(
    path: str | os.PathLike, expected: Expected | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a module file; returns (manifest, tensors)."""
    path = Path(path)
    _stat_module_file(path, str(path))
    with open(path, "rb") as f:
        # One byte past the limit, so a file that grew after stat() is still caught by the size rule.
        data = f.read(MAX_FILE_BYTES + 1)
    return module_from_bytes(data, str(path), expected)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate only a module's header and manifest, without loading tensors."""
    path = Path(path)
    source = str(path)
    size = _stat_module_file(path, source)
    with open(path, "rb") as f:
        head = f.read(9)
        header_len = _check_prefix(head, size, source)
        raw = head[8:] + f.read(header_len - 1)
    if len(raw) != header_len:
        raise _refuse(source, "file shrank while being read", "retry once the writer is done")
    _, metadata = _parse_header(raw, size - 8 - header_len, source)
    return _manifest_from_metadata(metadata, source)
