"""The owners in modules/: the id format (building, checking and splitting an id agree) and the one state-dict
serializer."""

import pytest
import safetensors.torch
import torch

from fedfactory.modules.files import tensors_to_bytes
from fedfactory.modules.ids import client_name, client_of, is_id_of, is_module_id, module_filename, module_id


@pytest.mark.parametrize("client, cls", [(0, 0), (3, 7), (123456, 999), ("hospital-a", 2), ("site-0", 12)])
def test_an_id_splits_back_into_its_client(client, cls):
    mid = module_id(client, cls)
    assert is_module_id(mid) and is_id_of(mid, client, cls) and client_of(mid) == client_name(client)
    assert client_of(module_filename(mid)) == client_name(client)  # a file name splits the same way


def test_client_names():
    assert client_name(3) == "client-003" and client_name(1234) == "client-1234" and client_name("site-b") == "site-b"


def test_is_id_of_needs_the_exact_id():
    assert not is_id_of("client-0003_class-007", 3, 7)  # the id pattern allows it, the canonical form does not
    assert not is_id_of("client-003_class-007", 10**7, 7)  # past six digits: a mismatch, not an error
    assert not is_id_of("client-003_class-007", "site-a", 7)


def test_client_of_a_string_that_is_no_id_is_empty():
    assert client_of("classifier") == "" and client_of("") == ""


def test_tensors_to_bytes_is_safetensors_of_contiguous_copies():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    tensors = {"w": base.t(), "half": base[:2].half(), "bf": base[2:].bfloat16(), "n": torch.tensor(17)}
    plain = {k: v.contiguous() for k, v in tensors.items()}
    assert tensors_to_bytes(tensors) == safetensors.torch.save(plain)
    assert tensors_to_bytes(tensors, {"k": "v"}) == safetensors.torch.save(plain, metadata={"k": "v"})
    # Views of one storage (which safetensors refuses as they are) and a model's state dict serialize too.
    assert safetensors.torch.load(tensors_to_bytes({"a": base[:2], "b": base[2:]}))["b"].equal(base[2:])
    model = torch.nn.Linear(3, 2)
    assert tensors_to_bytes(model.state_dict()) == safetensors.torch.save(dict(model.state_dict()))
