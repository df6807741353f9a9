import torch

from fedfactory.config import load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.plan import plan_module
from fedfactory.generative.train import train_module
from fedfactory.modules.ids import module_id


def test_a_module_is_reused_only_if_every_recorded_choice_matches():
    """Steps that follow the data, the network and the adversarial recipe all decide reuse, not just steps."""
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3][:40]
    asked = ["generator.steps=400", "generator.steps_per_image=0.5", "generator.channels=4", "generator.latent_dim=4",
             "generator.mixture_components=2", "generator.batch_size=8", "generator.adversarial=0.2"]
    cfg = load_config("tiny", asked)
    tensors, fields = train_module(images, cfg.generator, plan_module(cfg, 0, 3, len(images)).training,
                                   torch.device("cpu"), progress=False)
    manifest = {"module_id": module_id(0, 3), "client_id": 0, "class_id": 3, "num_samples": len(images)} | fields
    assert fields["training"]["steps"] == 200  # 40 images x 0.5 is below the floor
    assert trained_as_asked(manifest, cfg) is None
    assert "200 steps" in trained_as_asked(manifest, load_config("tiny", asked + ["generator.steps_per_image=10"]))
    assert "network" in trained_as_asked(manifest, load_config("tiny", asked + ["generator.channels=8"]))
    assert "adversarial=0.2" in trained_as_asked(manifest, load_config("tiny", asked + ["generator.adversarial=0.3"]))
    assert "seed" in trained_as_asked(manifest, load_config("tiny", asked + ["run.seed=1"]))
