"""`fedfactory inspect`: the manifest and the server's verdict on untrusted module files and registries."""

import json
import pickle
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedfactory.cli import main
from fedfactory.config import GeneratorConfig, load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.client import client_plans, train_client_module
from fedfactory.modules.files import load_module, read_manifest, save_module
from fedfactory.modules.ids import module_filename
from fedfactory.modules.refusal import ModuleError
from fedfactory.registry import load_registry, module_spec


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry directory with two real (briefly trained) modules of client 0."""
    folder = tmp_path_factory.mktemp("registry")
    train, _ = load_dataset("digits", None, 8)
    gen = GeneratorConfig(steps=2, batch_size=8, channels=8, latent_dim=4, mixture_components=2)
    cfg = replace(load_config("tiny"), generator=gen)
    client = train.subset(np.flatnonzero(train.labels < 2))
    for plan in client_plans(client, 0, cfg).values():
        manifest, tensors = train_client_module(client, plan, gen, torch.device("cpu"), progress=False)
        save_module(folder / module_filename(manifest["module_id"]), tensors, manifest)
    return folder


@pytest.fixture
def module(registry, tmp_path):
    """A private copy of one valid module file."""
    path = tmp_path / "client-000_class-000.safetensors"
    shutil.copyfile(registry / path.name, path)
    return path


def run_inspect(capsys, path):
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines(), err


def flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_valid_module_prints_its_manifest_and_exits_0(capsys, module):
    code, lines, err = run_inspect(capsys, module)
    assert code == 0 and err == ""
    assert lines[-1] == "valid"
    assert json.loads("\n".join(lines[:-1])) == read_manifest(module)


@pytest.mark.parametrize("where, offset, rule", [
    ("weights", -1, "weights hash .* differs from the manifest's"),
    ("header length", 7, "file is .* bytes, over the|header length .* is outside"),
    ("header", 8, "header does not start with '{'"),
])
def test_bit_flip_is_refused_in_one_line_naming_the_rule(capsys, module, where, offset, rule):
    flip_bit(module, offset if offset >= 0 else module.stat().st_size + offset, bit=6)
    code, lines, err = run_inspect(capsys, module)
    assert code == 2 and err == ""
    verdict = lines[-1]
    assert verdict.startswith(f"refused: {module}: ")
    assert re.search(rule, verdict), verdict
    # The verdict is the registry's own: load_module with module_spec refuses with the same line.
    with pytest.raises(ModuleError) as refused:
        load_module(module, expected=module_spec)
    assert verdict == f"refused: {refused.value}"
    # A flip in the weights leaves the header readable, so the claimed manifest is still shown.
    if where == "weights":
        assert json.loads("\n".join(lines[:-1]))["module_id"] == "client-000_class-000"
    else:
        assert len(lines) == 1


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        # Unpickling would call open(marker, "w"), creating the marker file.
        return open, (self.marker, "w")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_renamed_to_safetensors_is_refused_and_never_run(capsys, tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "client-000_class-000.safetensors"
    path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker), protocol=protocol))
    code, lines, err = run_inspect(capsys, path)
    assert code == 2 and err == "" and len(lines) == 1
    assert lines[0].startswith(f"refused: {path}: ")
    if protocol >= 2:
        assert "Python pickle" in lines[0]
    assert not marker.exists()


def test_registry_directory_gives_a_table_and_the_registry_verdict(capsys, registry, tmp_path):
    folder = tmp_path / "modules"
    shutil.copytree(registry, folder)
    code, lines, _ = run_inspect(capsys, folder)
    assert code == 0
    assert lines[0].split() == ["file", "verdict", "client", "class", "class", "name", "samples", "family", "bytes"]
    assert [line.split()[:2] for line in lines[1:3]] == [
        ["client-000_class-000.safetensors", "valid"], ["client-000_class-001.safetensors", "valid"]]
    assert lines[-1] == "registry valid: 2 modules"

    # One tampered module, one module under another module's name, a pickle, and a stale temp file.
    flip_bit(folder / "client-000_class-001.safetensors", -1)
    shutil.copyfile(registry / "client-000_class-000.safetensors", folder / "client-007_class-000.safetensors")
    (folder / "zz.safetensors").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    (folder / ".client-000_class-002.safetensors.0123456789abcdef.tmp").write_bytes(b"half")
    code, lines, _ = run_inspect(capsys, folder)
    assert code == 2
    verdicts = {line.split()[0]: line for line in lines[1:5]}
    assert verdicts["client-000_class-000.safetensors"].split()[1] == "valid"
    assert "weights hash" in verdicts["client-000_class-001.safetensors"]
    assert "file name does not match module id client-000_class-000" in verdicts["client-007_class-000.safetensors"]
    assert "Python pickle" in verdicts["zz.safetensors"]
    # The temp file is not a module: the registry's glob skips it, and inspect says so.
    assert lines[5] == "ignored (not *.safetensors): .client-000_class-002.safetensors.0123456789abcdef.tmp"
    with pytest.raises(ModuleError) as refused:
        load_registry(folder)
    assert lines[6] == f"registry refused: {refused.value}"


def test_empty_directory_and_missing_path(capsys, tmp_path):
    code, lines, _ = run_inspect(capsys, tmp_path)
    assert code == 2 and lines == [f"refused: {tmp_path} holds no module files (*.safetensors)"]
    code, lines, err = run_inspect(capsys, tmp_path / "nope.safetensors")
    assert code == 2 and lines == []
    assert err.strip() == f"fedfactory: error: {tmp_path / 'nope.safetensors'}: no such module file or directory"
