"""A module file: safetensors bytes with the manifest in their metadata, written atomically and read back without
pickle, checking the header ourselves before safetensors parses it (docs/architecture.md, "The module file")."""

import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from fedfactory.modules.manifest import MANIFEST_KEY, canonical_json, check_manifest, complete_manifest, weights_sha256
from fedfactory.modules.refusal import NOT_A_MODULE, RESAVE, is_int, refuse, show
from fedfactory.runs import atomic_write_bytes

MAX_HEADER_BYTES = 1 << 20  # refuse larger safetensors headers before parsing JSON
MAX_FILE_BYTES = 256 << 20

Expected = Callable[[dict], dict[str, tuple[tuple[int, ...], str]]]

_MAX_RANK = 8
# safetensors dtype code -> (torch dtype, bytes per element). Only what modules need: no object or bool data.
_DTYPES = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
}
_CODE_OF = {dtype: code for code, (dtype, _) in _DTYPES.items()}


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # Python keeps the last duplicate while other parsers may keep the first; refusing removes the ambiguity.
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {show(key)}")
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
        raise refuse(source, f"{what} is not valid JSON ({show(str(err), 80)})", NOT_A_MODULE) from err


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of a state dict on any device: the one serializer of modules, classifiers and payloads."""
    # Private contiguous CPU copies (one copy, from any device): safetensors refuses views and shared storage.
    cpu = {name: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for name, t in tensors.items()}
    return safetensors.torch.save(cpu, metadata=metadata)


def _check_tensors_for_save(tensors: object, source: str) -> None:
    if not isinstance(tensors, dict) or not tensors:
        raise refuse(
            source, "tensors must be a non-empty dict of name -> torch.Tensor", "pass the EMA state dict"
        )
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise refuse(
                source, f"tensor name {show(name)} is not allowed", "use the state dict's own names"
            )
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise refuse(source, f"tensor {name!r} is not a dense torch.Tensor", "pass dense tensors")
        if tensor.dtype not in _CODE_OF:
            raise refuse(
                source,
                f"tensor {name!r} has dtype {tensor.dtype}; modules hold only {', '.join(_DTYPES)}",
                "cast it (float32 or float16) before saving",
            )
        if tensor.dim() > _MAX_RANK:
            raise refuse(
                source, f"tensor {name!r} has {tensor.dim()} dims, more than {_MAX_RANK}", "reshape it"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise refuse(source, f"tensor {name!r} has NaN or Inf values", "fix training before exporting")


def module_to_bytes(tensors: dict[str, torch.Tensor], manifest: dict) -> tuple[bytes, dict]:
    """Serialize a module and the completed manifest (version, both hashes, library version filled in)."""
    source = f"module {show(manifest.get('module_id'))}" if isinstance(manifest, dict) else "module"
    _check_tensors_for_save(tensors, source)
    text, full = complete_manifest(manifest, tensors, source)
    data = tensors_to_bytes(tensors, metadata={MANIFEST_KEY: text})
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise refuse(source, f"header is {header_len} bytes, over {MAX_HEADER_BYTES}", "shrink the manifest")
    if len(data) > MAX_FILE_BYTES:
        raise refuse(source, f"module is {len(data)} bytes, over {MAX_FILE_BYTES}", "use a smaller network")
    return data, full


def save_module(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict) -> dict:
    """Atomically write a module file; returns the full manifest."""
    data, full = module_to_bytes(tensors, manifest)
    atomic_write_bytes(path, data)
    return full


def _check_prefix(head: bytes, size: int, source: str) -> int:
    """Check size and the 8-byte header length before any parsing; returns the header length."""
    if size > MAX_FILE_BYTES:
        raise refuse(source, f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit", NOT_A_MODULE)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    if 2 <= header_len <= MAX_HEADER_BYTES and 8 + header_len <= size and head[8:9] == b"{":
        return header_len
    # Passing the test above rules out every pickle of protocol >= 2: its third byte is an opcode >= 0x28, so
    # its "header length" would exceed MAX_HEADER_BYTES. Testing 0x80 first would instead refuse real files
    # whose header length happens to be 128 mod 256. Either way nothing here is ever unpickled.
    if head[:1] == b"\x80":
        raise refuse(
            source, "file is a Python pickle, which is never loaded (it can run code)", NOT_A_MODULE
        )
    if head[:4] == b"PK\x03\x04":
        raise refuse(
            source, "file is a zip archive (torch.save output), which is never loaded", NOT_A_MODULE
        )
    if len(head) < 9:
        raise refuse(source, f"file is {size} bytes, too short for a safetensors header", NOT_A_MODULE)
    if not 2 <= header_len <= MAX_HEADER_BYTES:
        raise refuse(source, f"header length {header_len} is outside [2, {MAX_HEADER_BYTES}]", NOT_A_MODULE)
    if 8 + header_len > size:
        raise refuse(
            source, f"header length {header_len} runs past the {size}-byte file (truncated?)", NOT_A_MODULE
        )
    raise refuse(source, "header does not start with '{'", NOT_A_MODULE)


def _parse_header(raw: bytes, buffer_len: int, source: str) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """Check the header JSON against a `buffer_len`-byte data buffer; returns (tensor specs, metadata)."""
    header = _parse_json(raw, source, "header")
    if not isinstance(header, dict):
        raise refuse(source, "header is not a JSON object", NOT_A_MODULE)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse(source, "header has no __metadata__ object of strings, so no manifest", RESAVE)
    if not header:
        raise refuse(source, "file holds no tensors", RESAVE)
    specs, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or info.keys() != {"dtype", "shape", "data_offsets"}:
            raise refuse(source, f"tensor {show(name)} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise refuse(
                source, f"tensor {show(name)} has dtype {show(dtype)}, allowed: {', '.join(_DTYPES)}"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_RANK
            and all(is_int(d) and 0 <= d <= MAX_FILE_BYTES for d in shape)
        ):
            raise refuse(source, f"tensor {show(name)} has shape {show(shape)}, not a short list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(x) for x in offsets)
            and 0 <= offsets[0] <= offsets[1] <= buffer_len
        ):
            raise refuse(
                source,
                f"tensor {show(name)} data_offsets {show(offsets)} fall outside the {buffer_len}-byte data",
            )
        begin, end = offsets
        if math.prod(shape) * _DTYPES[dtype][1] != end - begin:
            raise refuse(
                source, f"tensor {show(name)} shape {shape} {dtype} does not fill its {end - begin} bytes"
            )
        specs[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    # Sorted spans must tile the buffer exactly: no overlap (aliased tensors), no gap, no trailing bytes.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise refuse(
                source, f"tensor {show(name)} starts at byte {begin}, expected {position} (overlap or gap)"
            )
        position = end
    if position != buffer_len:
        raise refuse(source, f"file has {buffer_len - position} bytes after the last tensor")
    return specs, metadata


def _manifest_from_metadata(metadata: dict, source: str) -> dict:
    if MANIFEST_KEY not in metadata:
        raise refuse(source, f"header metadata has no {MANIFEST_KEY!r} entry (manifest missing)")
    unknown = sorted(metadata.keys() - {MANIFEST_KEY})
    if unknown:
        raise refuse(source, f"header metadata has unknown keys {', '.join(show(k) for k in unknown[:5])}")
    text = metadata[MANIFEST_KEY]
    manifest = _parse_json(text, source, "manifest")
    check_manifest(manifest, source)
    # The hash covers the parsed values; this covers the text, so "0e0" for 0.0 or reordered keys is an edit too
    # and a module's bytes stay a function of its contents.
    if text != canonical_json(manifest):
        raise refuse(
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
    shown = ", ".join(show(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"


def _check_expected(
    tensors: dict[str, torch.Tensor], manifest: dict, expected: Expected, source: str
) -> None:
    try:
        spec = expected(manifest)
    except (ValueError, TypeError, KeyError) as err:
        # The manifest passed the schema, so a failure here means its config describes no valid network.
        raise refuse(source, f"manifest's network config is not usable ({show(str(err), 80)})") from err
    missing = sorted(spec.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - spec.keys())
    if missing or unexpected:
        raise refuse(
            source,
            f"tensor names differ from the declared network: missing {_names(missing)}, "
            f"unexpected {_names(unexpected)}",
        )
    for name in sorted(spec):
        shape, dtype = spec[name]
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != _torch_dtype(dtype):
            raise refuse(
                source,
                f"tensor {show(name)} is {_CODE_OF[tensor.dtype]} {list(tensor.shape)}, the network "
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
        raise refuse(source, f"safetensors refused the file ({show(str(err), 80)})", NOT_A_MODULE) from err
    if {n: (_CODE_OF.get(t.dtype), tuple(t.shape)) for n, t in tensors.items()} != specs:
        raise refuse(source, "safetensors read tensors that differ from the header", NOT_A_MODULE)
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
                raise refuse(
                    source, f"tensor {show(name)} has {bad} NaN or Inf values", "retrain the module"
                )
    # 6. Hash last: it is the most expensive check and the one a corrupted copy fails.
    actual = weights_sha256(tensors)
    if actual != manifest["weights_sha256"]:
        raise refuse(
            source,
            f"weights hash {actual[:12]}... differs from the manifest's {manifest['weights_sha256'][:12]}...",
            "the file was corrupted or edited; fetch or re-save it",
        )
    return manifest, tensors


def _stat_module_file(path: Path, source: str) -> int:
    # Checked before open(): opening a FIFO or device would block or stream without end.
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise refuse(source, "not a regular file", "pass a module .safetensors file")
    if info.st_size > MAX_FILE_BYTES:
        raise refuse(
            source, f"file is {info.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit", NOT_A_MODULE
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
        raise refuse(source, "file shrank while being read", "retry once the writer is done")
    _, metadata = _parse_header(raw, size - 8 - header_len, source)
    return _manifest_from_metadata(metadata, source)
