"""Module artifact: round trips, each refusal rule, and a fuzz that mutates a valid module's bytes."""

import hashlib
import json
import os
import pickle
from collections import Counter

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fedfactory
from fedfactory.modules import files as artifact
from fedfactory.modules.files import (
    MAX_HEADER_BYTES,
    load_module,
    module_from_bytes,
    module_to_bytes,
    read_manifest,
    save_module,
)
from fedfactory.modules.ids import is_site_name, module_filename, module_id
from fedfactory.modules.manifest import FORMAT_VERSION, MANIFEST_KEY, manifest_sha256, weights_sha256
from fedfactory.modules.refusal import ModuleError


def make_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "net.conv.weight": torch.randn(4, 1, 3, 3, generator=g),  # F32
        "net.conv.bias": torch.randn(4, generator=g).half(),  # F16
        "net.norm.scale": torch.randn(2, 2, generator=g).bfloat16(),  # BF16
        "ema.num_updates": torch.tensor(17),  # I64, zero-dim
    }


def make_manifest(**overrides):
    manifest = {
        "module_id": "client-003_class-007",
        "client_id": 3,
        "class_id": 7,
        "class_name": "cat",
        "num_samples": 120,
        "image_shape": [1, 16, 16],
        "family": "unet",
        "network": {"channels": 8, "channel_mult": [1, 2], "dropout": 0.0, "attention": False, "act": "silu"},
        "diffusion": {"sigma_data": 0.5, "p_mean": -1.2},
        "training": {"steps": 100, "seed": 7, "lr": 1e-3},
    }
    manifest.update(overrides)
    return manifest


def expected_for(tensors):
    """An `expected` callable declaring exactly the given tensors."""
    spec = {name: (tuple(t.shape), artifact._CODE_OF[t.dtype]) for name, t in tensors.items()}
    return lambda manifest: spec


def assert_identical(loaded, original):
    assert list(sorted(loaded)) == list(sorted(original))
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def split(data):
    """(header dict, tensor data buffer) of a safetensors byte string."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, buffer):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(raw).to_bytes(8, "little") + raw + buffer


def edit_header(data, edit):
    header, buffer = split(data)
    edit(header)
    return join(header, buffer)


def edit_manifest(data, edit, reseal=True):
    """Edit the manifest; `reseal` recomputes its hash, so a later rule (not the manifest hash) must refuse it."""

    def apply(header):
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
        edit(manifest)
        if reseal:
            manifest["manifest_sha256"] = manifest_sha256(manifest)
        header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest, sort_keys=reseal)

    return edit_header(data, apply)


def raw_module(tensors, **overrides):
    """Module bytes that bypass save-side checks, with correct hashes unless overridden."""
    manifest = make_manifest(
        format_version=FORMAT_VERSION,
        weights_sha256=weights_sha256(tensors),
        library_version=fedfactory.__version__,
    )
    manifest.update(overrides)
    manifest.setdefault("manifest_sha256", manifest_sha256(manifest))
    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})


def refused(data, match, expected=None, source="client 3 upload"):
    """Assert module_from_bytes refuses with a one-line message naming the source and the rule."""
    with pytest.raises(ModuleError, match=match) as info:
        module_from_bytes(data, source, expected)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ") and "; " in message
    return message


BASE_TENSORS = make_tensors()
BASE_BYTES, BASE_MANIFEST = module_to_bytes(BASE_TENSORS, make_manifest())


# Naming.


def test_module_id_and_filename():
    assert module_id(3, 7) == "client-003_class-007"
    assert module_id(123456, 0) == "client-123456_class-000"
    assert module_filename("client-003_class-007") == "client-003_class-007.safetensors"
    for bad in [(-1, 0), (0, 1_000_000), (True, 0), (1.0, 2)]:
        with pytest.raises(ValueError, match="must be an int"):
            module_id(*bad)
    for bad in [
        "../x",
        "client-003_class-007/../../etc",
        "client-3_class-7",
        "client-003_class-007\n",
        "client-٠٠٣_class-007",
    ]:
        with pytest.raises(ValueError, match="module id"):
            module_filename(bad)


def test_site_names_are_one_safe_path_component():
    # A deployment's module ids carry the site name, which ends up in a file name: only [a-z][a-z0-9-]{0,39}.
    assert module_id("hospital-a", 2) == "hospital-a_class-002" and is_site_name("site-0")
    assert module_filename("hospital-a_class-002") == "hospital-a_class-002.safetensors"
    for bad in ["hospital/a", "..", "../x", "hospital a", "h\u00f4pital", "Hospital-A", "-a", "", "a" * 41,
                "hospital-a\n", "client-3", "client-003", 3.0, None]:
        assert not is_site_name(bad)
        if isinstance(bad, str):
            with pytest.raises(ValueError, match="site name"):
                module_id(bad, 2)
    for bad in ["../hospital-a_class-002", "hospital a_class-002", "h\u00f4pital_class-002", "a/b_class-002",
                "client-3_class-002", "hospital-a_class-2"]:
        with pytest.raises(ValueError, match="module id"):
            module_filename(bad)


# Round trips and atomic writes.


def test_round_trip_file(tmp_path):
    path = tmp_path / module_filename(BASE_MANIFEST["module_id"])
    full = save_module(path, BASE_TENSORS, make_manifest())
    assert full == BASE_MANIFEST
    assert full["format_version"] == FORMAT_VERSION
    assert full["library_version"] == fedfactory.__version__
    assert full["weights_sha256"] == weights_sha256(BASE_TENSORS)
    assert full["manifest_sha256"] == manifest_sha256(full)
    manifest, tensors = load_module(path, expected=expected_for(BASE_TENSORS))
    assert manifest == full
    assert_identical(tensors, BASE_TENSORS)
    assert read_manifest(path) == full
    assert path.read_bytes() == BASE_BYTES  # serialization is deterministic
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp file left behind


def test_round_trip_bytes_normalizes_tuples_and_keeps_caller_manifest():
    caller = make_manifest(image_shape=(1, 16, 16), network={"channel_mult": (1, 2)})
    data, full = module_to_bytes(BASE_TENSORS, caller)
    assert "weights_sha256" not in caller and "manifest_sha256" not in caller  # the caller's dict is not mutated
    assert full["image_shape"] == [1, 16, 16] and full["network"] == {"channel_mult": [1, 2]}
    manifest, tensors = module_from_bytes(data, "bytes")
    assert manifest == full
    assert_identical(tensors, BASE_TENSORS)


def test_round_trip_saves_views_and_shared_storage():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "same": base}  # non-contiguous and storage-sharing
    data, _ = module_to_bytes(tensors, make_manifest())
    _, loaded = module_from_bytes(data, "bytes")
    assert_identical(loaded, {k: v.contiguous() for k, v in tensors.items()})


def test_resaving_a_loaded_module_gives_the_same_bytes():
    # A loaded manifest carries both hashes and the version; saving it again recomputes them, to the same values.
    manifest, tensors = module_from_bytes(BASE_BYTES, "bytes")
    assert module_to_bytes(tensors, manifest) == (BASE_BYTES, BASE_MANIFEST)
    stale = dict(manifest, manifest_sha256="0" * 64)
    assert module_to_bytes(tensors, stale)[0] == BASE_BYTES


def test_failed_save_keeps_previous_module(tmp_path, monkeypatch):
    path = tmp_path / "client-003_class-007.safetensors"
    save_module(path, BASE_TENSORS, make_manifest())

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_module(path, make_tensors(seed=1), make_manifest(num_samples=5))
    monkeypatch.undo()
    assert path.read_bytes() == BASE_BYTES
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle():
    # A header length of 128 mod 256 puts 0x80 (the pickle protocol marker) in the first byte.
    for pad in range(1, 300):
        data, full = module_to_bytes(BASE_TENSORS, make_manifest(diffusion={"pad": "x" * pad}))
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    manifest, tensors = module_from_bytes(data, "bytes")
    assert manifest == full
    assert_identical(tensors, BASE_TENSORS)


def test_weights_sha256_is_canonical():
    reordered = dict(reversed(list(BASE_TENSORS.items())))
    assert weights_sha256(reordered) == weights_sha256(BASE_TENSORS)
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert weights_sha256({"a": base.t()}) == weights_sha256({"a": base.t().contiguous()})
    # Same bytes, different shape, dtype or name must hash differently.
    hashes = {
        weights_sha256({"a": base}),
        weights_sha256({"a": base.reshape(3, 2)}),
        weights_sha256({"a": base.view(torch.int32)}),
        weights_sha256({"b": base}),
        # Name/shape boundaries cannot be shifted between fields.
        weights_sha256({"a": base[:, :1].contiguous(), "b": base[:, 1:].contiguous()}),
    }
    assert len(hashes) == 5


def test_weights_sha256_known_answer():
    # Pinned: the hash is part of the file format, so any change to its encoding must be deliberate.
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2]),
        "c": torch.tensor([0.5], dtype=torch.bfloat16),
    }
    assert weights_sha256(tensors) == "4339cfcb17cdb001041225fc6d4fffdd3c69323664fda9b51c771e18e41b317f"


def test_manifest_sha256_covers_every_value_but_its_own():
    manifest = dict(BASE_MANIFEST)
    assert manifest_sha256(dict(reversed(list(manifest.items())))) == manifest_sha256(manifest)
    assert manifest_sha256(dict(manifest, manifest_sha256="0" * 64)) == manifest_sha256(manifest)
    # Values a Python comparison calls equal (120 == 120.0, 1 == True) still hash differently.
    hashes = {
        manifest_sha256(manifest),
        manifest_sha256(dict(manifest, num_samples=121)),
        manifest_sha256(dict(manifest, num_samples=120.0)),
        manifest_sha256(dict(manifest, training=dict(manifest["training"], seed=True))),
        manifest_sha256(dict(manifest, weights_sha256="0" * 64)),
    }
    assert len(hashes) == 5


def test_manifest_sha256_known_answer():
    # Pinned like the weights hash: sorted keys, ", " and ": " separators, ASCII escapes, then SHA-256.
    manifest = {"b": [1, 2], "a": "\u00e9", "c": 0.5, "manifest_sha256": "not hashed"}
    canonical = b'{"a": "\\u00e9", "b": [1, 2], "c": 0.5}'
    pinned = "6a1ca1e4d89297d3989983b6e3d4c08e5f483a840128992a6d2de1996d9d9e0b"
    assert manifest_sha256(manifest) == hashlib.sha256(canonical).hexdigest() == pinned


# Save-side refusals: save refuses what load would refuse.


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"module_id": "../x"}, "does not look like"),
        ({"module_id": "client-004_class-007"}, "does not match client_id"),
        ({"client_id": -3}, "client_id must be an int >= 0"),
        ({"class_id": True}, "class_id must be an int"),
        ({"class_name": "cat\n"}, "class_name"),
        ({"class_name": "x" * 201}, "class_name"),
        ({"num_samples": 0}, "num_samples"),
        ({"image_shape": [2, 16, 16]}, "image_shape"),
        ({"image_shape": [1, 0, 16]}, "image_shape"),
        ({"image_shape": [1, 16]}, "image_shape"),
        ({"family": "UNet"}, "family"),
        ({"family": "unet/../x"}, "family"),
        ({"network": {"nested": {"a": 1}}}, "network.nested"),
        ({"network": {"mult": [1, 2.5]}}, "network.mult"),
        ({"network": {"dropout": float("nan")}}, "not plain JSON"),
        ({"diffusion": []}, "diffusion must be a JSON object"),
        ({"training": {"steps": 10}}, "training.seed"),
        ({"training": {"steps": 0, "seed": 1}}, "training.steps"),
        ({"network": {"x": object()}}, "not plain JSON"),
        ({"surprise": 1}, "unknown keys 'surprise'"),
    ],
)
def test_save_refuses_bad_manifest(overrides, match):
    with pytest.raises(ModuleError, match=match):
        module_to_bytes(BASE_TENSORS, make_manifest(**overrides))


def test_save_refuses_missing_manifest_key():
    manifest = make_manifest()
    del manifest["num_samples"]
    with pytest.raises(ModuleError, match="manifest lacks num_samples"):
        module_to_bytes(BASE_TENSORS, manifest)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({}, "non-empty dict"),
        ({"w": torch.zeros(2, dtype=torch.float64)}, "dtype torch.float64"),
        ({"w": torch.tensor([1.0, float("nan")])}, "NaN or Inf"),
        ({"w": torch.tensor([float("inf")], dtype=torch.bfloat16)}, "NaN or Inf"),
        ({"__metadata__": torch.zeros(1)}, "not allowed"),
        ({"w": torch.zeros([1] * 9)}, "9 dims"),
        ({"w": [1.0, 2.0]}, "not a dense torch.Tensor"),
    ],
)
def test_save_refuses_bad_tensors(tensors, match):
    with pytest.raises(ModuleError, match=match):
        module_to_bytes(tensors, make_manifest())


# Load-side refusals, in the order the loader checks them.


class _CreatesMarker:
    """Pickles to a call of open(marker, "w"): unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_renamed_to_safetensors_is_refused_without_running(tmp_path, monkeypatch, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "client-003_class-007.safetensors"
    path.write_bytes(pickle.dumps(_CreatesMarker(str(marker)), protocol=protocol))
    # Refused on magic and length alone: the header JSON is never even parsed.
    monkeypatch.setattr(artifact, "_parse_json", lambda *a: pytest.fail("parsed a pickle"))
    match = "Python pickle" if protocol >= 2 else "header length"
    with pytest.raises(ModuleError, match=match):
        load_module(path)
    with pytest.raises(ModuleError, match=match):
        read_manifest(path)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_save_file_is_refused(tmp_path, monkeypatch, zipped):
    path = tmp_path / "client-003_class-007.safetensors"
    torch.save(BASE_TENSORS, path, _use_new_zipfile_serialization=zipped)
    monkeypatch.setattr(artifact, "_parse_json", lambda *a: pytest.fail("parsed a torch.save file"))
    with pytest.raises(ModuleError, match="zip archive" if zipped else "Python pickle"):
        load_module(path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{" + b" " * 64, "outside"),
        ((2**64 - 1).to_bytes(8, "little") + BASE_BYTES[8:], "outside"),
        ((1).to_bytes(8, "little") + b"{}", "outside"),
        ((MAX_HEADER_BYTES + 8).to_bytes(8, "little") + b'{"a":' + b" " * (MAX_HEADER_BYTES + 8), "outside"),
        (BASE_BYTES[:8] + b"[" + BASE_BYTES[9:], "does not start with"),
        (b"", "too short"),
        (BASE_BYTES[:5], "too short"),
        (BASE_BYTES[:9], "runs past"),
        (BASE_BYTES[:200], "runs past"),
    ],
)
def test_header_length_rules_refuse_before_parsing(monkeypatch, data, match):
    monkeypatch.setattr(artifact, "_parse_json", lambda *a: pytest.fail("parsed JSON"))
    refused(data, match)


def test_truncated_or_padded_data_is_refused():
    refused(BASE_BYTES[:-1], "fall outside")
    refused(BASE_BYTES + b"\x00", "bytes after the last tensor")


def test_file_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(BASE_BYTES)
    monkeypatch.setattr(artifact, "MAX_FILE_BYTES", len(BASE_BYTES) - 1)
    for call in (load_module, read_manifest):
        with pytest.raises(ModuleError, match="over the"):
            call(path)
    refused(BASE_BYTES, "over the")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ModuleError, match="not a regular file"):
        load_module(tmp_path)


def _set_entry(name, key, value):
    def edit(header):
        header[name][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set_entry("net.conv.weight", "shape", [4, 1, 3, 4]), "does not fill"),
        (_set_entry("net.conv.weight", "shape", [4, -1, 3, 3]), "not a short list"),
        (_set_entry("net.conv.weight", "shape", [1] * 9), "not a short list"),
        (_set_entry("net.conv.weight", "shape", "4,1,3,3"), "not a short list"),
        (_set_entry("net.conv.weight", "dtype", "F64"), "dtype 'F64'"),
        (_set_entry("net.conv.weight", "dtype", "U8"), "dtype 'U8'"),
        (_set_entry("net.conv.weight", "data_offsets", [0, 10**6]), "fall outside"),
        (_set_entry("net.conv.weight", "data_offsets", [-4, 140]), "fall outside"),
        (_set_entry("net.conv.weight", "data_offsets", [0, 144]), "starts at byte 0, expected 8 .overlap"),
        (_set_entry("net.conv.weight", "data_offsets", [0.0, 144.0]), "fall outside"),
        (_set_entry("net.conv.weight", "extra", 1), "exactly dtype, shape, data_offsets"),
        (lambda h: h["net.conv.bias"].update(data_offsets=h["net.norm.scale"]["data_offsets"]), "overlap"),
        (lambda h: h.pop("ema.num_updates"), "starts at byte 8, expected 0 .overlap or gap"),
        (lambda h: h.pop("net.conv.bias"), "8 bytes after the last tensor"),
        (lambda h: h.pop("__metadata__"), "no __metadata__"),
        (lambda h: h.update(__metadata__={MANIFEST_KEY: 1}), "no __metadata__"),
        (lambda h: h["__metadata__"].pop(MANIFEST_KEY), "manifest missing"),
        (lambda h: h["__metadata__"].update(extra="1"), "unknown keys 'extra'"),
        (lambda h: h["__metadata__"].update({MANIFEST_KEY: "{not json"}), "manifest is not valid JSON"),
        (lambda h: h["__metadata__"].update({MANIFEST_KEY: "[1, 2]"}), "not a JSON object"),
        (lambda h: h["__metadata__"].update({MANIFEST_KEY: '{"a": NaN}'}), "NaN is not valid JSON"),
        (lambda h: [h.pop(k) for k in list(h) if k != "__metadata__"], "no tensors"),
    ],
)
def test_header_edits_are_refused(edit, match):
    refused(edit_header(BASE_BYTES, edit), match)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"{" + b"[" * 100_000, "not valid JSON"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"\xff": 1}', "not valid JSON"),
        (b'{"__metadata__": {}} x', "not valid JSON"),
    ],
)
def test_malformed_header_json_is_refused(raw, match):
    refused(join(raw, b""), match)


def test_lone_surrogate_name_is_refused_by_the_safetensors_backstop():
    header, buffer = split(BASE_BYTES)
    header["\ud800"] = header.pop("ema.num_updates")
    refused(join(header, buffer), "safetensors refused")


def test_same_size_shape_or_dtype_edit_is_caught_by_hash_or_expected():
    permuted = edit_header(BASE_BYTES, _set_entry("net.conv.weight", "shape", [1, 4, 3, 3]))
    refused(permuted, "weights hash")
    refused(
        permuted, r"is F32 \[1, 4, 3, 3\].* needs F32 \[4, 1, 3, 3\]", expected=expected_for(BASE_TENSORS)
    )
    retyped = edit_header(BASE_BYTES, _set_entry("net.conv.bias", "dtype", "BF16"))
    refused(retyped, "weights hash")
    refused(retyped, "is BF16 .* needs F16", expected=expected_for(BASE_TENSORS))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=3), "format_version is 3, this fedfactory reads only 2"),
        (lambda m: m.update(format_version="2"), "format_version is '2'"),
        (lambda m: m.update(format_version=True), "format_version is True"),
        (lambda m: m.update(module_id="../x"), "module_id '../x' does not look like"),
        (lambda m: m.update(module_id="client-003_class-007/../../x"), "does not look like"),
        (lambda m: m.update(module_id="client-003_class-008"), "does not match"),
        (lambda m: m.update(client_id=10**7, module_id="client-10000000_class-007"), "does not look like"),
        (lambda m: m.update(weights_sha256="A" * 64), "weights_sha256 must be 64 lowercase hex"),
        (lambda m: m.update(library_version=""), "library_version"),
        (lambda m: m.pop("family"), "manifest lacks family"),
        (lambda m: m.update(extra=None), "unknown keys 'extra'"),
        (lambda m: m["training"].update(seed=-1), "training.seed"),
    ],
)
def test_manifest_edits_are_refused(edit, match):
    refused(edit_manifest(BASE_BYTES, edit), match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(num_samples=121), "manifest hash .* differs from its manifest_sha256"),
        (lambda m: m.update(class_name="dog"), "edited or corrupted after saving; fetch the original file or retrain"),
        (lambda m: m["training"].update(steps=101), "manifest was edited or corrupted"),
        (lambda m: m.update(weights_sha256=weights_sha256(make_tensors(seed=1))), "manifest was edited"),
        (lambda m: m.update(manifest_sha256="0" * 64), "manifest was edited"),
        (lambda m: m.update(manifest_sha256="A" * 64), "manifest_sha256 must be 64 lowercase hex"),
        (lambda m: m.pop("manifest_sha256"), "manifest lacks manifest_sha256"),
    ],
)
def test_manifest_edits_without_a_new_hash_are_refused(edit, match):
    refused(edit_manifest(BASE_BYTES, edit, reseal=False), match)


def test_manifest_text_must_be_canonical():
    # Same values, other text: refused too, so a module's bytes stay a function of its contents.
    def rewrite(text):
        return lambda h: h["__metadata__"].update({MANIFEST_KEY: text})

    indented = json.dumps(BASE_MANIFEST, sort_keys=True, indent=1)
    unsorted = json.dumps(dict(reversed(list(BASE_MANIFEST.items()))))
    zero = json.dumps(BASE_MANIFEST, sort_keys=True).replace('"dropout": 0.0', '"dropout": 0e0')
    assert json.loads(zero) == BASE_MANIFEST and zero != json.dumps(BASE_MANIFEST, sort_keys=True)
    for text in (indented, unsorted, zero):
        refused(edit_header(BASE_BYTES, rewrite(text)), "not the canonical JSON save_module writes")


def test_format_1_module_is_refused_with_the_fix():
    # A format-1 manifest had no manifest_sha256; the version is named before the missing field.
    old = {k: v for k, v in BASE_MANIFEST.items() if k != "manifest_sha256"} | {"format_version": 1}
    data = safetensors.torch.save(BASE_TENSORS, metadata={MANIFEST_KEY: json.dumps(old, sort_keys=True)})
    message = refused(data, "format_version is 1, this fedfactory reads only 2")
    assert "retrain the module" in message


def test_expected_names_shapes_and_dtypes():
    spec = expected_for(BASE_TENSORS)(None)
    missing = dict(spec, **{"net.extra": ((2,), "F32")})
    message = refused(BASE_BYTES, "missing 'net.extra', unexpected none", expected=lambda m: missing)
    assert "declared network" in message
    fewer = {k: v for k, v in spec.items() if k != "ema.num_updates"}
    refused(BASE_BYTES, "missing none, unexpected 'ema.num_updates'", expected=lambda m: fewer)
    wrong_shape = dict(spec, **{"net.conv.bias": ((5,), "F16")})
    refused(BASE_BYTES, r"is F16 \[4\].* needs F16 \[5\]", expected=lambda m: wrong_shape)
    wrong_dtype = dict(spec, **{"ema.num_updates": ((), "F32")})
    refused(BASE_BYTES, r"is I64 \[\].* needs F32 \[\]", expected=lambda m: wrong_dtype)
    # Every dtype spelling a caller may hold is accepted.
    for spelling in ["F32", "float32", "torch.float32", torch.float32]:
        ok = dict(spec, **{"net.conv.weight": ((4, 1, 3, 3), spelling)})
        module_from_bytes(BASE_BYTES, "x", expected=lambda m, ok=ok: ok)


def test_expected_sees_the_manifest_and_its_failures_become_refusals():
    seen = []

    def build(manifest):
        seen.append(manifest)
        raise KeyError("channels_per_head")

    refused(BASE_BYTES, "network config is not usable", expected=build)
    assert seen == [BASE_MANIFEST]


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([float("nan")]),
        torch.tensor([float("inf")]),
        torch.tensor([float("-inf")], dtype=torch.float16),
        torch.tensor([float("nan")], dtype=torch.bfloat16),
    ],
)
def test_non_finite_weights_are_refused(bad):
    tensors = dict(BASE_TENSORS)
    tensors["net.conv.bias"] = torch.cat([tensors["net.conv.bias"][:3].to(bad.dtype), bad])
    # The hash in raw_module matches these weights, so only finiteness can fail.
    refused(raw_module(tensors), "has 1 NaN or Inf values")


def test_hash_mismatch_is_refused():
    # A manifest rewritten with its hash recomputed passes its own check; the weights hash still refuses it.
    other = weights_sha256(make_tensors(seed=1))
    refused(edit_manifest(BASE_BYTES, lambda m: m.update(weights_sha256=other)), "weights hash")
    flipped = bytearray(BASE_BYTES)
    flipped[-20] ^= 0x01  # inside the F32 conv weight data
    refused(bytes(flipped), "weights hash")


def test_read_manifest_reads_only_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    flipped = bytearray(BASE_BYTES)
    flipped[-20] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert read_manifest(path) == BASE_MANIFEST  # the tensor data is not read, so not hashed
    with pytest.raises(ModuleError, match="weights hash"):
        load_module(path)
    path.write_bytes(BASE_BYTES[:-1])
    with pytest.raises(ModuleError, match="fall outside"):
        read_manifest(path)


# Fuzz: every mutant of a valid module is refused with a one-line ModuleError.

_TENSOR_NAMES = sorted(BASE_TENSORS)
# Byte span of the manifest string inside the header; mutants confined to it are drawn by a test of their own, so
# edits of the manifest alone (caught by its hash and canonical text) are not crowded out by the other kinds.
_MANIFEST_TEXT = json.dumps(BASE_MANIFEST, sort_keys=True)
_MANIFEST_START = BASE_BYTES.index(json.dumps(_MANIFEST_TEXT)[1:-1].encode())
_MANIFEST_END = _MANIFEST_START + len(json.dumps(_MANIFEST_TEXT)) - 2

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
_positions = st.integers(0, len(BASE_BYTES) - 1)
_mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(_positions, st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE_BYTES))),
    st.tuples(st.just("insert"), st.integers(0, len(BASE_BYTES)), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("header_length"), st.integers(0, 2**64 - 1)),
    st.tuples(
        st.just("tensor_entry"),
        st.sampled_from(_TENSOR_NAMES),
        st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop_field", "drop_tensor"]),
        _json_values,
    ),
    st.tuples(
        st.just("swap_offsets"), st.lists(st.sampled_from(_TENSOR_NAMES), min_size=2, max_size=2, unique=True)
    ),
    st.tuples(st.just("manifest_value"), st.sampled_from([*sorted(BASE_MANIFEST), "extra"]), _json_values),
    st.tuples(st.just("metadata"), _json_values),
    st.tuples(st.just("whole_header"), _json_values),
    st.tuples(st.just("random_bytes"), st.binary(max_size=64)),
)


def mutate(mutation):
    """Apply one mutation to BASE_BYTES; returns the mutant."""
    kind = mutation[0]
    if kind == "flip":
        data = bytearray(BASE_BYTES)
        for position, bit in mutation[1]:
            data[position] ^= 1 << bit
        return bytes(data)
    if kind == "truncate":
        return BASE_BYTES[: mutation[1]]
    if kind == "insert":
        _, position, extra = mutation
        return BASE_BYTES[:position] + extra + BASE_BYTES[position:]
    if kind == "header_length":
        return mutation[1].to_bytes(8, "little") + BASE_BYTES[8:]
    if kind == "tensor_entry":
        _, name, field, value = mutation

        def edit(header):
            if field == "drop_tensor":
                del header[name]
            elif field == "drop_field":
                del header[name]["dtype"]
            else:
                header[name][field] = value

        return edit_header(BASE_BYTES, edit)
    if kind == "swap_offsets":
        a, b = mutation[1]

        def edit(header):
            header[a]["data_offsets"], header[b]["data_offsets"] = (
                header[b]["data_offsets"],
                header[a]["data_offsets"],
            )

        return edit_header(BASE_BYTES, edit)
    if kind == "manifest_value":
        _, key, value = mutation
        return edit_manifest(BASE_BYTES, lambda m: m.__setitem__(key, value), reseal=False)
    if kind == "metadata":
        return edit_header(BASE_BYTES, lambda h: h.__setitem__("__metadata__", mutation[1]))
    if kind == "whole_header":
        return join(json.dumps(mutation[1]).encode(), split(BASE_BYTES)[1])
    return mutation[1]  # random_bytes


def touches_manifest_only(mutation, mutant):
    """Whether a mutation set a manifest value or changed bytes only inside the manifest string."""
    if mutation[0] == "manifest_value":
        return True
    if mutation[0] != "flip":
        return False
    changed = [i for i, (a, b) in enumerate(zip(BASE_BYTES, mutant, strict=True)) if a != b]
    return all(_MANIFEST_START <= i < _MANIFEST_END for i in changed)


def same_content(mutant: bytes) -> bool:
    """Whether a mutant holds the original header (as parsed JSON) and tensor bytes, whatever its serialization."""
    try:
        return split(mutant) == split(BASE_BYTES)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def refusing_rule(message: str) -> str:
    """Which check refused a mutant, coarsely, for the printed summary."""
    if "manifest hash" in message:
        return "manifest hash"
    if "not the canonical JSON" in message:
        return "canonical text"
    if "weights hash" in message:
        return "weights hash"
    return "other rules"


def fuzz(manifest_only: bool) -> Counter:
    """Outcome counts over 150 mutants of BASE_BYTES: the mutants that change only the manifest, or all others."""
    outcomes, rules = Counter(), Counter()

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(_mutations)
    def check(mutation):
        mutant = mutate(mutation)
        # Flipping one bit twice, or setting a header field to its own value, gives the original: not a mutant.
        assume(not same_content(mutant) and touches_manifest_only(mutation, mutant) == manifest_only)
        try:
            module_from_bytes(mutant, "fuzz")
        except ModuleError as err:
            assert "\n" not in str(err) and str(err).startswith("fuzz: ")
            outcomes["refused", mutation[0]] += 1
            rules[refusing_rule(str(err))] += 1
            return
        # Counted rather than failed here, so the summary shows every kind that got through.
        outcomes["loaded", mutation[0]] += 1

    check()
    totals = Counter()
    for (outcome, _), count in outcomes.items():
        totals[outcome] += count
    print(f"\nfuzz outcomes over {sum(totals.values())} mutants: {dict(sorted(totals.items()))}")
    for (outcome, kind), count in sorted(outcomes.items()):
        print(f"  {outcome:16s} {kind:14s} {count}")
    print(f"  refused by: {dict(rules.most_common())}")
    return totals


def test_fuzz_every_mutant_outside_the_manifest_is_refused():
    # Tensor bytes, header structure, lengths and offsets: every change is caught (hash, layout or schema checks).
    totals = fuzz(manifest_only=False)
    assert totals == {"refused": 150}, dict(totals)


def test_fuzz_every_manifest_edit_is_refused():
    # A changed value breaks the schema or the manifest hash; a changed text of the same values is not canonical.
    totals = fuzz(manifest_only=True)
    assert totals == {"refused": 150}, dict(totals)
