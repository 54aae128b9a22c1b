import math

import pytest
import torch

from adatsq.errors import ConfigError
from adatsq.eval.metrics import accuracy, frechet_distance, psnr, ssim


def images(seed: int, batch: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_known_value_and_identical_cap():
    ref = images(0)
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4.0 / 0.01), abs=1e-6)
    assert psnr(ref, ref) == pytest.approx(100.0)  # documented cap instead of inf
    assert psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / 0.01), abs=1e-6)


def test_psnr_is_mean_of_per_image_values():
    ref = images(1, batch=2)
    x = ref.clone()
    x[0] += 0.1
    x[1] += 0.2
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert psnr(x, ref) == pytest.approx(expected, abs=1e-6)


def test_ssim_identical_is_one_and_drops_with_noise():
    ref = images(2)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    light, heavy = ssim(ref + 0.05 * noise, ref), ssim(ref + 0.5 * noise, ref)
    assert 1.0 > light > heavy
    assert ssim(ref + 0.5 * noise, ref) == pytest.approx(ssim(ref, ref + 0.5 * noise))


def test_ssim_adapts_window_to_tiny_images():
    ref = images(4, size=5)
    assert ssim(ref, ref) == pytest.approx(1.0)


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="equal shape"):
        psnr(images(0), images(0, batch=3))
    with pytest.raises(ConfigError):
        ssim(images(0)[0], images(0)[0])


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(5))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(8)
    shift[0] = 1.0
    d1 = frechet_distance(feats + shift, feats)
    d2 = frechet_distance(feats + 2 * shift, feats)
    assert d1 == pytest.approx(1.0, rel=1e-3)  # equal covariances: FD = |mean shift|²
    assert d2 == pytest.approx(4.0, rel=1e-3)


def test_frechet_distance_handles_singular_covariances():
    feats = torch.randn(5, 16, generator=torch.Generator().manual_seed(6))  # N < F: rank-deficient
    other = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    other[:, 0] = 0.0  # constant feature
    value = frechet_distance(feats, other)
    assert math.isfinite(value) and value > 0


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ConfigError):
        frechet_distance(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ConfigError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(10, 3))


def test_accuracy_from_logits_and_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.eye(3)[torch.tensor([0, 1, 1, 1])]
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert accuracy(torch.tensor([0, 1, 2, 1]), labels) == 1.0
    with pytest.raises(ConfigError):
        accuracy(torch.tensor([0, 1]), labels)
