"""Strong views of an unlabeled batch (nnssl.strong_views): geometry kept, perturbations per sample, CutMix of
images and per-voxel targets with one box."""

from __future__ import annotations

import random

import pytest
import torch

from nnssl.strong_views import cutmix, gaussian_blur, intensity_strong_view


@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 5)])
def test_no_perturbation_is_the_identity_and_shape_dtype_are_kept(shape):
    x = torch.randn(shape)
    same = intensity_strong_view(x, p_jitter=0.0, p_noise=0.0, p_blur=0.0)
    assert torch.equal(same, x)
    strong = intensity_strong_view(x.to(torch.bfloat16), p_jitter=1.0, p_noise=1.0, p_blur=1.0)
    assert strong.shape == x.shape and strong.dtype == torch.bfloat16 and not torch.equal(strong.float(), x)


def test_contrast_keeps_each_samples_mean_and_scales_its_spread():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(4, 1, 1, 1) + 5
    y = intensity_strong_view(x, contrast=(0.5, 0.5), brightness=(0.0, 0.0), p_jitter=1.0, p_noise=0.0, p_blur=0.0)
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-4)
    assert torch.allclose(y.std((1, 2, 3)), 0.5 * x.std((1, 2, 3)), rtol=1e-4)


def test_brightness_is_in_units_of_the_samples_std():
    x = torch.randn(2, 1, 16, 16) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    y = intensity_strong_view(x, contrast=(1.0, 1.0), brightness=(0.25, 0.25), p_jitter=1.0, p_noise=0.0, p_blur=0.0)
    assert torch.allclose(y - x, 0.25 * x.std((1, 2, 3)).view(2, 1, 1, 1).expand_as(x), atol=1e-5)


@pytest.mark.parametrize("spatial", [(9, 11), (5, 7, 6)])
def test_blur_keeps_constant_images_and_smooths_noise(spatial):
    constant = torch.full((2, 1, *spatial), 3.0)
    assert torch.allclose(gaussian_blur(constant, torch.tensor([0.5, 2.0]), 2.0), constant, atol=1e-5)  # borders too
    noise = torch.randn(2, 1, *spatial)
    blurred = gaussian_blur(noise, torch.tensor([1e-3, 1.5]), 1.5)
    assert torch.allclose(blurred[0], noise[0], atol=1e-5)  # a tiny sigma is the identity
    assert blurred[1].std() < 0.8 * noise[1].std()


def test_cutmix_mixes_images_and_targets_with_one_box():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 1, 8, 8)
    labels = x[:, 0].long()  # a target equal to the image: mixed alike iff the values still agree
    mixed = cutmix(x, (labels, x[:, 0] * 2), p=1.0, box_ratio=(0.5, 0.5), rng=random.Random(0))
    assert torch.equal(mixed.images[:, 0].long(), mixed.targets[0]) and torch.equal(mixed.images[:, 0] * 2,
                                                                                    mixed.targets[1])
    inside = mixed.box_mask == 0
    assert int(inside.sum()) == 16  # a 4 x 4 box
    assert torch.equal(mixed.images[1, 0][inside], x[0, 0][inside])  # sample 1 got sample 0's box
    assert torch.equal(mixed.images[0, 0][inside], x[2, 0][inside])  # rolled: sample 0 got the last one's
    assert torch.equal(mixed.images[:, 0][:, ~inside], x[:, 0][:, ~inside])


def test_cutmix_without_a_paste_or_with_one_sample_returns_the_inputs():
    x, t = torch.randn(2, 1, 6, 6), torch.zeros(2, 6, 6)
    kept = cutmix(x, (t,), p=0.0)
    assert kept.images is x and kept.targets[0] is t and bool((kept.box_mask == 1).all())
    assert cutmix(x[:1], (t[:1],), p=1.0).images is not None and torch.equal(cutmix(x[:1], (t[:1],), p=1.0).images,
                                                                             x[:1])


def test_arguments_are_validated():
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ValueError, match="contrast"):
        intensity_strong_view(x, contrast=(1.5, 0.5))
    with pytest.raises(ValueError, match="p_blur"):
        intensity_strong_view(x, p_blur=2.0)
    with pytest.raises(ValueError, match="box_ratio"):
        cutmix(x, (), box_ratio=(0.8, 0.2))
