import pytest
import torch

from fedfactory.classifier import GaussianBlur, augment, random_blur
from fedfactory.config import ConfigError, load_config


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
