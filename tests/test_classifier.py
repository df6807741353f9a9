from dataclasses import replace

import numpy as np
import pytest
import torch

from fedfactory.classifier import (
    GaussianBlur,
    TrainingError,
    augment,
    mix_batch,
    predict_proba,
    random_blur,
    train_classifier,
)
from fedfactory.config import ClassifierConfig, ConfigError, load_config
from fedfactory.errors import FedFactoryError

TINY = replace(ClassifierConfig(), width=4, epochs=2, batch_size=8)


def tiny_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return images, np.arange(n) % 2


def test_random_blur_gives_each_image_its_own_gaussian():
    x = torch.randn(6, 3, 10, 10)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(6, generator=torch.Generator().manual_seed(0)) * 1.5
    out = random_blur(x, gen)
    # Each image equals the fixed filter at its own sigma: the grouped convolution mixes no images or channels.
    for i in range(6):
        expected = GaussianBlur(3, float(sigma[i]))(x[i:i + 1])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5)


def test_augment_is_seeded_and_composes():
    x = torch.rand(8, 1, 12, 12) * 2 - 1
    a = augment(x, "crop+flip+blur+noise", torch.Generator().manual_seed(1))
    b = augment(x, "crop+flip+blur+noise", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    noisy = augment(x, "noise", torch.Generator().manual_seed(2)) - x
    assert 0 < noisy.std() < 0.2


@pytest.mark.parametrize("kind", ["blur+blur", "crop+rotate", "", "none+flip"])
def test_unknown_or_repeated_augmentations_are_refused(kind):
    with pytest.raises(ConfigError, match="classifier.augment"):
        load_config("tiny", [f"classifier.augment={kind}"])


def test_fewer_images_than_a_batch_is_a_training_error():
    images, labels = tiny_images(5)
    with pytest.raises(TrainingError, match="5 training images, fewer than classifier.batch_size=8; lower") as info:
        train_classifier(images, labels, 2, TINY, 0, torch.device("cpu"), progress=False)
    assert isinstance(info.value, FedFactoryError)  # so the command line prints it as one line


def test_non_finite_loss_stops_training_at_its_step():
    # AdamW moves every weight by about lr on the first step, so lr=1e30 makes the second step's loss NaN.
    images, labels = tiny_images(16)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1/2, step 2/2; lower classifier.lr \(now 1e\+30\)"):
        train_classifier(images, labels, 2, replace(TINY, lr=1e30), 0, torch.device("cpu"), progress=False)


@pytest.mark.parametrize("override, message", [
    ("classifier.noise_std=-0.1", "classifier.noise_std=-0.1: must be >= 0"),
    ("classifier.mix=blend", "classifier.mix='blend': valid values are none, mixup, cutmix"),
    ("classifier.mix_alpha=0", "classifier.mix_alpha=0.0: must be > 0"),
    ("generator.adversarial=-1", "generator.adversarial=-1.0: must be >= 0"),
    ("generator.adversarial_start=2", "generator.adversarial_start=2.0: must lie in [0, 1]"),
    ("generator.steps_per_image=-0.5", "generator.steps_per_image=-0.5: must be >= 0"),
])
def test_augmentation_and_generator_budget_keys_refuse_bad_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert str(e.value).startswith(message)


def test_mixup_blends_images_by_lambda_with_a_seeded_partner():
    x = torch.rand(16, 1, 8, 8)
    mixed, partner, lam = mix_batch(x, "mixup", 0.4, torch.Generator().manual_seed(3))
    again = mix_batch(x, "mixup", 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again[0]) and torch.equal(partner, again[1]) and lam == again[2]
    assert 0 < lam < 1 and sorted(partner.tolist()) == list(range(16))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])


def test_cutmix_lambda_is_the_share_of_pixels_each_image_keeps():
    # Distinct images (each a constant of its own) show which pixels came from the partner.
    x = torch.arange(16, dtype=torch.float32)[:, None, None, None].expand(16, 1, 10, 10).clone()
    for seed in range(20):
        mixed, partner, lam = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(seed))
        own = (mixed == x).float().mean(dim=(1, 2, 3))
        moved = partner != torch.arange(16)  # an image paired with itself keeps every pixel
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
        assert torch.equal(mixed[~(mixed == x)], x[partner].expand_as(x)[~(mixed == x)])


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_classifier_trained_on_mixed_pairs_still_learns_a_separable_task(mix):
    # Class 1 is bright, class 0 dark: mixing blurs the pairs, not the rule.
    rng = np.random.default_rng(0)
    labels = np.arange(256) % 2
    images = (rng.integers(0, 90, (256, 8, 8, 1)) + 160 * labels[:, None, None, None]).astype(np.uint8)
    cfg = replace(TINY, epochs=4, mix=mix)
    model = train_classifier(images, labels, 2, cfg, 0, torch.device("cpu"), progress=False)
    assert (predict_proba(model, images, torch.device("cpu")).argmax(1) == labels).mean() > 0.95
