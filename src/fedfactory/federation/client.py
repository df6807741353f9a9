"""What a client does: train one generative module per class it holds, from scratch, on its own data."""

import numpy as np
import torch

from fedfactory.config import GeneratorConfig
from fedfactory.data.datasets import ImageDataset
from fedfactory.generative.artifact import module_id
from fedfactory.generative.train import train_module
from fedfactory.seeding import derive_seed


def held_classes(data: ImageDataset, min_samples: int = 1) -> dict[int, int]:
    """Class id -> number of real samples, for the classes this client holds at least min_samples of."""
    counts = np.bincount(data.labels, minlength=data.num_classes)
    return {int(c): int(n) for c, n in enumerate(counts) if n >= min_samples}


def train_client_module(data: ImageDataset, client_id: int, class_id: int, cfg: GeneratorConfig, root_seed: int,
                        device: torch.device, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the module G_{k,c} on the client's images of class c; returns (tensors, manifest)."""
    images = data.images[data.labels == class_id]
    mid = module_id(client_id, class_id)
    seed = derive_seed(root_seed, "train", client_id, class_id)
    tensors, fields = train_module(images, cfg, seed, device, desc=mid, progress=progress)
    manifest = {"module_id": mid, "client_id": client_id, "class_id": class_id,
                "class_name": data.class_names[class_id], "num_samples": int(len(images))} | fields
    return tensors, manifest
