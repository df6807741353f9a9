"""Seeds derived from one root seed by hashing tuples, so every random stream is named and reproducible."""

import hashlib

import numpy as np
import torch


def derive_seed(root_seed: int, *names: object) -> int:
    """Return a 63-bit seed that depends only on the root seed and the tuple of names."""
    text = repr((int(root_seed),) + tuple(names)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def numpy_rng(root_seed: int, *names: object) -> np.random.Generator:
    """A numpy generator for the stream named by (root_seed, *names)."""
    return np.random.default_rng(derive_seed(root_seed, *names))


def torch_generator(root_seed: int, *names: object) -> torch.Generator:
    """A CPU torch generator for the stream named by (root_seed, *names)."""
    return torch.Generator().manual_seed(derive_seed(root_seed, *names))
