"""The registry of modules: one validated safetensors file per module in a directory, and the Module type.

Below the federation layer, so the report and `fedfactory inspect` load modules exactly as the server does.
"""

from pathlib import Path
from typing import NamedTuple

import torch

from fedfactory.generative.train import expected_tensors
from fedfactory.modules.files import load_module
from fedfactory.modules.ids import module_filename
from fedfactory.modules.refusal import ModuleError


class Module(NamedTuple):
    """One generative module G_{k,c}: its manifest and its tensors, in this order everywhere."""

    manifest: dict
    tensors: dict[str, torch.Tensor]


def module_spec(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The `expected` callback for artifact validation: a bad network config is a refused module."""
    try:
        return expected_tensors(manifest)
    except (ValueError, KeyError, TypeError) as e:
        raise ModuleError(f"module {manifest.get('module_id')}: network config does not define a valid network "
                          f"({e})") from None


def load_registry_file(path: Path) -> Module:
    """Load and validate one module file of a registry, whose name must be its module id's file name."""
    manifest, tensors = load_module(path, expected=module_spec)
    if Path(path).name != module_filename(manifest["module_id"]):
        raise ModuleError(f"{path}: file name does not match module id {manifest['module_id']}; rename or remove it")
    return Module(manifest, tensors)


def load_registry(modules_dir: Path) -> list[Module]:
    """Load and validate every module in a directory (the registry is the directory), sorted by module id."""
    return [load_registry_file(path) for path in sorted(Path(modules_dir).glob("*.safetensors"))]
