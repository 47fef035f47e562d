"""Tests for nnssl.mixing (BCP copy-paste) and nnssl.losses.sdcl (docs/methods/sdcl.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnssl.losses.sdcl import (
    discrepancy_mask,
    discrepancy_mse_loss,
    discrepancy_uniform_ce_loss,
    mixed_region_loss,
)
from nnssl.mixing import bcp_mask, bcp_mix, bcp_mix_targets, bidirectional_copy_paste

# ---------------------------------------------------------------- mask and mixing


@pytest.mark.parametrize("shape", [(12, 9), (6, 9, 12)])
def test_bcp_mask_is_one_box_of_the_right_size(shape):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = bcp_mask(shape, ratio=2 / 3, generator=g)
        assert m.shape == shape and m.dtype == torch.float32
        assert set(m.unique().tolist()) == {0.0, 1.0}
        zeros = (m == 0).nonzero()
        lo, hi = zeros.min(0).values, zeros.max(0).values
        box = [int(s * 2 / 3) for s in shape]
        assert (hi - lo + 1).tolist() == box  # one axis-aligned box of int(size * ratio) per dim ...
        assert len(zeros) == math.prod(box)  # ... that is completely filled


def test_bcp_mask_reproducible_and_edge_ratios():
    a = bcp_mask((8, 8, 8), generator=torch.Generator().manual_seed(3))
    b = bcp_mask((8, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (bcp_mask((5, 7), ratio=1.0) == 0).all()
    assert (bcp_mask((5, 7), ratio=0.0) == 1).all()
    with pytest.raises(ValueError, match="ratio"):
        bcp_mask((5, 7), ratio=1.5)


def test_box_start_covers_the_far_border():
    g = torch.Generator().manual_seed(0)
    # box of 3 in 6: start in {0, 1, 2, 3}; the official exclusive bound would never reach the last column
    last_col_zero = [bool((bcp_mask((6, 6), ratio=0.5, generator=g)[:, -1] == 0).any()) for _ in range(60)]
    assert any(last_col_zero) and not all(last_col_zero)


def test_bcp_mix_all_ones_and_all_zeros_masks_are_exact():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    la, lb = torch.randint(0, 4, (2, 4, 5, 6), generator=g), torch.randint(0, 4, (2, 4, 5, 6), generator=g)
    ones, zeros = torch.ones(4, 5, 6), torch.zeros(4, 5, 6)
    assert torch.equal(bcp_mix(a, b, ones), a) and torch.equal(bcp_mix(a, b, zeros), b)
    assert torch.equal(bcp_mix_targets(la, lb, ones), la) and torch.equal(bcp_mix_targets(la, lb, zeros), lb)
    assert bcp_mix_targets(la, lb, ones).dtype == torch.long


def test_bcp_mix_selects_by_region():
    m = bcp_mask((6, 6), generator=torch.Generator().manual_seed(2))
    a, b = torch.full((2, 1, 6, 6), 1.0), torch.full((2, 1, 6, 6), 2.0)
    mixed = bcp_mix(a, b, m)
    assert torch.equal(mixed[:, 0] == 1.0, (m == 1).expand(2, 6, 6))


def test_bcp_mix_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="img_b"):
        bcp_mix(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), torch.ones(4, 4))
    with pytest.raises(ValueError, match="img_a"):
        bcp_mix(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(4, 5))


def _four_sources(spatial=(4, 6, 6)):
    """Images that are constant per source (1: L_a, 2: L_b, 3: U_a, 4: U_b) and labels 0/1/2/3 likewise."""
    imgs = [torch.full((2, 1, *spatial), float(v)) for v in (1, 2, 3, 4)]
    labs = [torch.full((2, *spatial), v, dtype=torch.long) for v in (0, 1, 2, 3)]  # GT_a, GT_b, PL_a, PL_b
    return imgs, labs


def test_bidirectional_copy_paste_layout_and_weights():
    (la, lb, ua, ub), (gta, gtb, pla, plb) = _four_sources()
    m = bcp_mask((4, 6, 6), generator=torch.Generator().manual_seed(4))
    out = bidirectional_copy_paste(la, lb, ua, ub, gta, gtb, pla, plb, m)
    x_l, x_u, y_l, y_u, w_l, w_u = out
    inside = (m == 1).expand(2, 4, 6, 6)  # M = 1
    # X_l = U_a on M, L_b elsewhere; X_u = L_a on M, U_b elsewhere
    assert torch.equal(x_l[:, 0], torch.where(inside, 3.0, 2.0))
    assert torch.equal(x_u[:, 0], torch.where(inside, 1.0, 4.0))
    # Y_l = PL_a on M, GT_b elsewhere; Y_u = GT_a on M, PL_b elsewhere
    assert torch.equal(y_l, torch.where(inside, 2, 1)) and torch.equal(y_u, torch.where(inside, 0, 3))
    # omega: 0.5 on pseudo-labelled voxels, 1.0 on ground-truth voxels
    assert torch.equal(w_l, torch.where(inside, 0.5, 1.0)) and torch.equal(w_u, torch.where(inside, 1.0, 0.5))
    # complementary: the unlabelled content of X_l and of X_u occupy disjoint regions that cover the volume
    unl_in_l = x_l[:, 0] >= 3
    unl_in_u = x_u[:, 0] >= 3
    assert not (unl_in_l & unl_in_u).any() and (unl_in_l | unl_in_u).all()


def test_bidirectional_copy_paste_with_full_masks():
    (la, lb, ua, ub), (gta, gtb, pla, plb) = _four_sources((5, 5))
    out = bidirectional_copy_paste(la, lb, ua, ub, gta, gtb, pla, plb, torch.ones(5, 5))
    assert torch.equal(out.x_l, ua) and torch.equal(out.x_u, la)
    assert torch.equal(out.y_l, pla) and torch.equal(out.y_u, gta)
    out = bidirectional_copy_paste(la, lb, ua, ub, gta, gtb, pla, plb, torch.zeros(5, 5))
    assert torch.equal(out.x_l, lb) and torch.equal(out.x_u, ub)
    assert torch.equal(out.y_l, gtb) and torch.equal(out.y_u, plb)


def test_bidirectional_copy_paste_rejects_mismatched_batches():
    (la, lb, ua, ub), (gta, gtb, pla, plb) = _four_sources((5, 5))
    with pytest.raises(ValueError, match="unl_b"):
        bidirectional_copy_paste(la, lb, ua, ub[:1], gta, gtb, pla, plb, torch.ones(5, 5))


# ---------------------------------------------------------------- mix_loss


def _reference_mix_loss(logits, img_l, patch_l, mask, image_weight, patch_weight):
    """Straight transcription of the docs/methods/sdcl.md formula (masked Dice per region + masked CE, /2)."""
    n, k = logits.shape[:2]
    p = torch.softmax(logits, 1).reshape(n, k, -1)

    def dice(t, msk):
        oh = F.one_hot(t.reshape(n, -1), k).permute(0, 2, 1).float()
        msk = msk.reshape(n, 1, -1)
        inter = (p * oh * msk).sum(2)
        union = ((p + oh) * msk).sum(2)
        return 1 - ((2 * inter + 1e-5) / (union + 1e-5)).mean()

    def ce(t, msk):
        return (F.cross_entropy(logits, t, reduction="none") * msk).sum() / (msk.sum() + 1e-16)

    pm = 1 - mask
    total = dice(img_l, mask) * image_weight + dice(patch_l, pm) * patch_weight
    total = total + image_weight * ce(img_l, mask) + patch_weight * ce(patch_l, pm)
    return total / 2


def test_mixed_region_loss_matches_reference_formula():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 6, 6, generator=g)
    pl_a, gt_b = torch.randint(0, 3, (2, 4, 6, 6), generator=g), torch.randint(0, 3, (2, 4, 6, 6), generator=g)
    m = bcp_mask((4, 6, 6), generator=g)
    y_l = bcp_mix_targets(pl_a, gt_b, m)
    w_l = torch.where(m == 1, 0.5, 1.0).expand(2, 4, 6, 6)
    ref = _reference_mix_loss(logits, pl_a, gt_b, m.expand(2, 4, 6, 6), image_weight=0.5, patch_weight=1.0)
    assert mixed_region_loss(logits, y_l, w_l, region_mask=m).item() == pytest.approx(ref.item(), rel=1e-5)
    assert mixed_region_loss(logits, y_l, w_l).item() == pytest.approx(ref.item(), rel=1e-5)  # regions from omega
    # equal weights: regions only from the mask
    ref_eq = _reference_mix_loss(logits, pl_a, gt_b, m.expand(2, 4, 6, 6), image_weight=1.0, patch_weight=1.0)
    ones = torch.ones(2, 4, 6, 6)
    assert mixed_region_loss(logits, y_l, ones, region_mask=m).item() == pytest.approx(ref_eq.item(), rel=1e-5)


def test_mixed_region_loss_hand_value_and_perfect_prediction():
    logits = torch.zeros(1, 2, 4, 4)  # p = 0.5 everywhere
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    full = torch.ones(4, 4)
    v = 16
    dice_bg = (2 * 0.5 * v + 1e-5) / (1.5 * v + 1e-5)
    dice_fg = 1e-5 / (0.5 * v + 1e-5)
    expected = ((1 - (dice_bg + dice_fg) / 2) + math.log(2)) / 2
    assert mixed_region_loss(logits, target, full, region_mask=full).item() == pytest.approx(expected, rel=1e-5)

    target = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(6))
    perfect = 50.0 * F.one_hot(target, 3).movedim(-1, 1).float()
    assert mixed_region_loss(perfect, target, torch.ones(5, 5)).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- discrepancy losses


def test_discrepancy_mask():
    z1 = torch.tensor([[[2.0, 0.0, 1.0], [1.0, 3.0, 1.5]]], requires_grad=True)  # argmax 0, 1, 1
    z2 = torch.tensor([[[0.0, 0.0, 5.0], [1.0, 3.0, 0.0]]])  # argmax 1, 1, 0
    d = discrepancy_mask(z1, z2)
    assert d.dtype == torch.bool and not d.requires_grad
    assert d.tolist() == [[True, False, True]]
    assert not discrepancy_mask(z1, z1.detach().clone()).any()


def test_empty_discrepancy_gives_exact_zero_and_zero_grad():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    omega = torch.full((2, 4, 5), 0.5)
    empty = torch.zeros(2, 4, 5, dtype=torch.bool)
    mse = discrepancy_mse_loss(logits, target, omega, empty)
    kl = discrepancy_uniform_ce_loss(logits, target, omega, empty)
    assert mse.item() == 0.0 and kl.item() == 0.0
    (mse + kl).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mse_zero_when_prediction_is_the_one_hot_target_on_discrepant_voxels():
    g = torch.Generator().manual_seed(8)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    disc = torch.rand(2, 6, 6, generator=g) > 0.5
    # on discrepant voxels the softmax is exactly one-hot (margin 1e4 underflows exp), elsewhere arbitrary
    one_hot_logits = 1e4 * F.one_hot(target, 3).movedim(-1, 1).float()
    logits = torch.where(disc.unsqueeze(1), one_hot_logits, logits)
    assert discrepancy_mse_loss(logits, target, torch.ones(2, 6, 6), disc).item() == 0.0
    assert discrepancy_mse_loss(torch.randn(2, 3, 6, 6), target, torch.ones(2, 6, 6), disc).item() > 0


def test_mse_hand_value():
    logits = torch.zeros(1, 2, 2)  # p = (0.5, 0.5) at both voxels
    target = torch.tensor([[0, 1]])
    omega = torch.tensor([[0.5, 1.0]])
    disc = torch.tensor([[True, False]])
    # voxel 0: 0.5 * mean((0.5 - 1)^2, 0.5^2) = 0.125; divided by sum D = 1
    assert discrepancy_mse_loss(logits, target, omega, disc).item() == pytest.approx(0.125)


def test_uniform_ce_hand_value_and_unweighted_denominator():
    logits = torch.tensor([[[3.0, 0.0, 2.0], [0.0, 2.0, 0.0]]])  # argmax 0, 1, 0
    target = torch.tensor([[1, 1, 1]])  # voxel 1 is correct
    omega = torch.tensor([[0.5, 1.0, 1.0]])
    disc = torch.tensor([[True, True, True]])
    lp = torch.log_softmax(logits, 1)
    g0, g2 = -lp[0, :, 0].mean(), -lp[0, :, 2].mean()
    expected = (0.5 * g0 + 1.0 * g2) / 2  # denominator: sum D*W = 2, not weighted by omega
    assert discrepancy_uniform_ce_loss(logits, target, omega, disc).item() == pytest.approx(expected.item())


def test_uniform_ce_ignores_correct_voxels():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 5, 5), generator=g)
    disc = torch.ones(2, 5, 5, dtype=torch.bool)
    omega = torch.ones(2, 5, 5)
    correct = logits.argmax(1) == target
    assert correct.any() and (~correct).any()
    # change the logits on correct voxels while keeping their argmax: loss unchanged, zero gradient there
    changed = logits.clone()
    changed[correct.unsqueeze(1).expand_as(logits)] *= 3.0
    assert torch.equal(changed.argmax(1), logits.argmax(1))
    base = discrepancy_uniform_ce_loss(logits, target, omega, disc)
    assert discrepancy_uniform_ce_loss(changed, target, omega, disc).item() == pytest.approx(base.item(), rel=1e-6)
    leaf = logits.clone().requires_grad_()
    discrepancy_uniform_ce_loss(leaf, target, omega, disc).backward()
    assert (leaf.grad.movedim(1, -1)[correct] == 0).all()
    assert (leaf.grad.movedim(1, -1)[~correct].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_ce_is_at_least_log_k_with_equality_iff_uniform(k):
    target = torch.tensor([[1]])  # uniform logits have argmax 0, so this voxel counts as wrong
    one = torch.ones(1, 1)
    disc = torch.ones(1, 1, dtype=torch.bool)
    uniform = discrepancy_uniform_ce_loss(torch.zeros(1, k, 1), target, one, disc)
    assert uniform.item() == pytest.approx(math.log(k), rel=1e-6)
    g = torch.Generator().manual_seed(k)
    for _ in range(20):
        z = torch.randn(1, k, 1, generator=g)
        z[0, 0, 0] = z[0].max() + 0.1  # keep the voxel wrong (argmax 0 != target 1)
        assert discrepancy_uniform_ce_loss(z, target, one, disc).item() > math.log(k) + 1e-6


def test_uniform_ce_gradient_equals_kl_uniform_to_p():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    omega = torch.where(torch.rand(2, 4, 4, generator=g) > 0.5, 0.5, 1.0)
    disc = torch.rand(2, 4, 4, generator=g) > 0.3

    a = logits.clone().requires_grad_()
    discrepancy_uniform_ce_loss(a, target, omega, disc).backward()

    b = logits.clone().requires_grad_()
    log_p = torch.log_softmax(b, 1)
    kl = F.kl_div(log_p, torch.full_like(log_p, 1 / 3), reduction="none").sum(1)  # KL(u || p) per voxel
    wrong = (logits.argmax(1) != target).float()
    d = disc.float()
    (((d * omega * wrong * kl).sum()) / ((d * wrong).sum() + 1e-16)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_losses_finite_under_bf16_and_3d():
    g = torch.Generator().manual_seed(11)
    z1 = (8 * torch.randn(2, 3, 4, 6, 6, generator=g)).to(torch.bfloat16).requires_grad_()
    z2 = (8 * torch.randn(2, 3, 4, 6, 6, generator=g)).to(torch.bfloat16)
    target = torch.randint(0, 3, (2, 4, 6, 6), generator=g)
    m = bcp_mask((4, 6, 6), generator=g)
    omega = torch.where(m == 1, 0.5, 1.0)  # spatial-only weight maps broadcast over the batch
    disc = discrepancy_mask(z1, z2)
    losses = [
        mixed_region_loss(z1, target, omega),
        discrepancy_mse_loss(z1, target, omega, disc),
        discrepancy_uniform_ce_loss(z1, target, omega, disc),
    ]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses).backward()
    assert torch.isfinite(z1.grad.float()).all() and z1.grad.abs().sum() > 0


def test_bad_target_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="target"):
        discrepancy_mse_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5), torch.ones(4, 4), torch.ones(1, 4, 4))
