"""Tests for nnssl.perturbations and nnssl.losses.mgcc (docs/methods/mgcc.md)."""

from __future__ import annotations

import pytest
import torch

from nnssl.losses.mgcc import multi_decoder_consistency
from nnssl.perturbations import feature_dropout, feature_noise, multi_level_perturbations, spatial_dropout


def _relu_features(shape, seed=0):
    return torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(seed))) + 0.01


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 4, 6, 6)])
def test_perturbations_change_features_and_keep_shape_dtype(shape):
    x = _relu_features(shape)
    g = torch.Generator().manual_seed(1)
    for out in (feature_dropout(x, generator=g), feature_noise(x, generator=g), spatial_dropout(x, generator=g)):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert not torch.equal(out, x)
    xb = x.to(torch.bfloat16)
    assert feature_noise(xb).dtype == torch.bfloat16 and feature_dropout(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (3, 5, 4, 5, 6)])
def test_feature_dropout_drops_argmax_and_never_low_attention(shape):
    for seed in range(10):
        x = _relu_features(shape, seed)
        x[1] *= 10.0  # a sample on another scale still uses its own max
        out = feature_dropout(x, generator=torch.Generator().manual_seed(seed))
        a = x.mean(1)  # (N, *spatial)
        dropped = (out == 0).all(1) & (x != 0).any(1)
        for i in range(x.shape[0]):
            a_i, d_i = a[i].flatten(), dropped[i].flatten()
            assert d_i[a_i.argmax()]
            assert not d_i[a_i < 0.7 * a_i.max()].any()
            assert d_i[a_i >= 0.9 * a_i.max()].all()
        # dropped locations are zero in every channel, kept ones untouched
        keep = ~dropped.unsqueeze(1).expand_as(x)
        assert torch.equal(out[keep], x[keep])


def test_feature_dropout_fixed_gamma_threshold_is_exact():
    x = torch.tensor([[[1.0, 2.0, 4.0, 3.0, 2.99]]])  # (N=1, C=1, W=5), max 4, 0.75 * max = 3 (exact in binary)
    out = feature_dropout(x, gamma_range=(0.75, 0.75))
    assert torch.equal(out, torch.tensor([[[1.0, 2.0, 0.0, 0.0, 2.99]]]))


def test_feature_dropout_gradient_flows_through_kept_locations():
    x = _relu_features((2, 3, 5, 5)).requires_grad_()
    out = feature_dropout(x, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float())


def test_feature_noise_shared_across_batch_and_bounded():
    one = _relu_features((1, 3, 6, 6))
    x = one.expand(4, -1, -1, -1).clone()
    out = feature_noise(x, magnitude=0.3, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(out[0], out[i]) for i in range(1, 4))
    rel = (out - x) / x
    assert rel.abs().max() <= 0.3 + 1e-6 and rel.abs().max() > 0.2  # U(-0.3, 0.3), not a constant
    # noise is per (channel, location): the relative change differs across channels and locations
    assert rel[0].flatten().unique().numel() > 50
    # magnitude 0 leaves the features unchanged
    assert torch.equal(feature_noise(x, magnitude=0.0), x)


def test_feature_noise_reproducible_with_generator():
    x = _relu_features((2, 3, 4, 4))
    a = feature_noise(x, generator=torch.Generator().manual_seed(5))
    b = feature_noise(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_spatial_dropout_rate_and_scaling():
    x = torch.ones(4, 8, 16, 16)
    out = spatial_dropout(x, p=0.3, generator=torch.Generator().manual_seed(3))
    zero_frac = (out == 0).float().mean().item()
    assert 0.27 < zero_frac < 0.33
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    assert torch.equal(spatial_dropout(x, p=0.0), x)
    no_gen = spatial_dropout(x, p=0.3)  # torch's own dropout path
    assert 0.25 < (no_gen == 0).float().mean().item() < 0.35
    with pytest.raises(ValueError, match="p"):
        spatial_dropout(x, p=1.0)


def test_multi_level_perturbations_apply_to_every_level():
    levels = [_relu_features((2, c, s, s), seed=c) for c, s in [(4, 16), (8, 8), (16, 4)]]
    for name in ("feature_dropout", "feature_noise", "spatial_dropout", "dropout"):
        out = multi_level_perturbations(levels, name, generator=torch.Generator().manual_seed(0))
        assert len(out) == 3
        assert all(o.shape == lv.shape and not torch.equal(o, lv) for o, lv in zip(out, levels))
    same = multi_level_perturbations(levels, "none")
    assert all(o is lv for o, lv in zip(same, levels))
    out = multi_level_perturbations(levels, "feature_noise", magnitude=0.0)
    assert all(torch.equal(o, lv) for o, lv in zip(out, levels))
    with pytest.raises(ValueError, match="perturbation"):
        multi_level_perturbations(levels, "cutout")


# ---------------------------------------------------------------- consistency


def test_consistency_zero_when_decoders_agree_positive_otherwise():
    g = torch.Generator().manual_seed(4)
    main = torch.randn(2, 3, 4, 5, 5, generator=g)
    assert multi_decoder_consistency(main, [main.clone(), main.clone(), main.clone()]).item() == 0.0
    # softmax: a per-voxel constant shift is agreement too
    assert multi_decoder_consistency(main, [main + 2.0]).item() == pytest.approx(0.0, abs=1e-12)
    aux = [main.clone(), main.clone(), torch.randn(2, 3, 4, 5, 5, generator=g)]
    assert multi_decoder_consistency(main, aux).item() > 0


def test_consistency_hand_value_binary_sigmoid_and_softmax():
    main = torch.zeros(1, 1, 2, 2)  # sigmoid 0.5
    aux_far = torch.full((1, 1, 2, 2), 100.0)  # sigmoid 1
    # (1/2) * [(0.5 - 1)^2 + 0]
    assert multi_decoder_consistency(main, [aux_far, main.clone()]).item() == pytest.approx(0.125)
    main2 = torch.zeros(1, 2, 1, 1)  # softmax (0.5, 0.5)
    aux2 = torch.tensor([100.0, 0.0]).reshape(1, 2, 1, 1)  # softmax (1, 0)
    assert multi_decoder_consistency(main2, [aux2]).item() == pytest.approx(0.25)


def test_consistency_gradients_reach_main_and_aux_unless_detach_main():
    g = torch.Generator().manual_seed(6)
    main = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    aux = [torch.randn(2, 3, 6, 6, generator=g, requires_grad=True) for _ in range(3)]
    multi_decoder_consistency(main, aux).backward()
    assert main.grad.abs().sum() > 0 and all(a.grad.abs().sum() > 0 for a in aux)

    main.grad = None
    for a in aux:
        a.grad = None
    multi_decoder_consistency(main, aux, detach_main=True).backward()
    assert main.grad is None and all(a.grad.abs().sum() > 0 for a in aux)


def test_consistency_bf16_and_errors():
    g = torch.Generator().manual_seed(7)
    main = (10 * torch.randn(2, 4, 8, 8, generator=g)).to(torch.bfloat16).requires_grad_()
    aux = [(10 * torch.randn(2, 4, 8, 8, generator=g)).to(torch.bfloat16) for _ in range(3)]
    loss = multi_decoder_consistency(main, aux)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(main.grad.float()).all()
    with pytest.raises(ValueError, match="aux_logits"):
        multi_decoder_consistency(main, [])
    with pytest.raises(ValueError, match=r"aux_logits\[1\]"):
        multi_decoder_consistency(main, [aux[0], aux[1][:, :2]])
