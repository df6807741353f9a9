"""Choose the torch device once, at the entry point, and make CPU runs reproducible."""

import os

import torch

from fedfactory.config import ConfigError


def select_device(name: str = "auto", threads: int = 0) -> torch.device:
    """Resolve run.device (auto | cpu | cuda) and fix CPU threads and deterministic kernels."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available; use run.device=auto or cpu")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    # run.threads=0 means OMP_NUM_THREADS when set, else every core this process may use.
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0)))
    # Deterministic kernels make the same seed give the same bits (needed for exact unlearning checks).
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
    return device
