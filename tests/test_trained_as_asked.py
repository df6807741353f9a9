import numpy as np
import pytest
import torch

from fedfactory.config import load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.client import train_client_module
from fedfactory.federation.factory import trained_as_asked
from fedfactory.federation.plan import manifest_plan, plan_module, plan_modules
from fedfactory.federation.runner import kept_modules
from fedfactory.generative.train import train_module
from fedfactory.modules.files import save_module
from fedfactory.modules.ids import module_filename, module_id


def test_a_module_is_reused_only_if_every_recorded_choice_matches():
    """Steps that follow the data, the network and the adversarial recipe all decide reuse, not just steps."""
    train, _ = load_dataset("digits", image_size=8)
    images = train.images[train.labels == 3][:40]
    asked = ["generator.steps=400", "generator.steps_per_image=0.5", "generator.channels=4", "generator.latent_dim=4",
             "generator.mixture_components=2", "generator.batch_size=8", "generator.adversarial=0.2"]
    cfg = load_config("tiny", asked)
    plan = plan_module(cfg, 0, 3, len(images))
    tensors, fields = train_module(images, cfg.generator, plan.training, torch.device("cpu"), progress=False)
    manifest = {"module_id": module_id(0, 3), "client_id": 0, "class_id": 3, "num_samples": len(images)} | fields
    assert fields["training"]["steps"] == 200  # 40 images x 0.5 is below the floor
    # Reuse reads the plan training read; a server, which did not plan the module, plans its manifest's cell alike.
    assert trained_as_asked(manifest, plan, cfg.generator) is None
    assert manifest_plan(cfg, manifest) == plan

    def reason(*overrides: str) -> str | None:
        other = load_config("tiny", asked + list(overrides))
        return trained_as_asked(manifest, manifest_plan(other, manifest), other.generator)

    assert "200 steps" in reason("generator.steps_per_image=10")
    assert reason("generator.batch_size=16").endswith("the run asks aegmm, 200 steps, batch 16")
    # Another family: the message names that family's planned steps (steps_per_image), not generator.steps.
    assert reason("generator.family=edm").endswith("the run asks edm, 200 steps, batch 8")
    assert "network" in reason("generator.channels=8")
    assert "adversarial=0.2" in reason("generator.adversarial=0.3")
    assert "seed" in reason("run.seed=1")
    with pytest.raises(ValueError, match="cannot judge"):
        trained_as_asked(manifest, plan_module(cfg, 0, 4, len(images)), cfg.generator)


def test_kept_modules_are_judged_by_the_plan_of_the_images_they_were_trained_on(tmp_path):
    """The run's plan of the cell where it is for the module's images; else the plan of the manifest's own cell, so
    a module of another count is kept here and reusable_modules says why it retrains. A count the run's budget
    cannot train on retrains too, instead of stopping the run."""
    cfg = load_config("tiny", ["generator.steps=2"])
    train, _ = load_dataset("digits", image_size=8)
    data = train.subset(np.flatnonzero(train.labels == 3)[:30])
    plans = plan_modules(cfg, {(0, 3): 30})
    mid = module_id(0, 3)
    manifest, tensors = train_client_module(data, plans[mid], cfg.generator, torch.device("cpu"), progress=False)
    save_module(tmp_path / module_filename(mid), tensors, manifest)
    assert kept_modules(tmp_path, cfg, plans) == {mid: 30}
    assert kept_modules(tmp_path, cfg, plan_modules(cfg, {(0, 3): 29})) == {mid: 30}
    assert kept_modules(tmp_path, cfg) == {mid: 30}
    assert kept_modules(tmp_path, load_config("tiny", ["generator.steps=3"])) == {}
    private = load_config("tiny", ["generator.steps=2", "privacy.epsilon=8", "privacy.delta=0.05"])
    assert kept_modules(tmp_path, private) == {}
