import math

import pytest
import torch
import torch.nn.functional as F

from nnssl.debiasing import weighted_soft_dice_loss
from nnssl.losses.consistency import gaussian_input_noise, softmax_mse_consistency
from nnssl.losses.cps import cross_pseudo_supervision_loss, hard_pseudo_label, weighted_cross_entropy

SHAPES = [(2, 3, 5, 6), (2, 4, 3, 5, 6)]  # 2D and 3D logits


def _one_hot_logits(labels: torch.Tensor, num_classes: int, margin: float) -> torch.Tensor:
    return torch.movedim(F.one_hot(labels, num_classes).float(), -1, 1) * margin


@pytest.mark.parametrize("shape", SHAPES)
def test_consistency_is_zero_when_outputs_agree(shape):
    logits = torch.randn(shape)
    assert softmax_mse_consistency(logits, logits.clone()) == 0
    assert softmax_mse_consistency(logits, logits + 3.0) < 1e-12  # softmax is shift invariant
    assert softmax_mse_consistency(logits, torch.randn(shape)) > 0


def test_consistency_hand_computed_and_teacher_detached():
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1).requires_grad_()
    loss = softmax_mse_consistency(student, teacher)  # p_s = (.5, .5), p_t = (.75, .25)
    assert loss.item() == pytest.approx(0.0625)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_consistency_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        softmax_mse_consistency(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def test_gaussian_input_noise_is_clipped_and_reproducible():
    x = torch.zeros(4, 1, 8, 8, 8)
    noisy = gaussian_input_noise(x, std=1.0, clip=0.2, generator=torch.Generator().manual_seed(1))
    again = gaussian_input_noise(x, std=1.0, clip=0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    assert noisy.abs().max() <= 0.2 and noisy.abs().max() == pytest.approx(0.2)
    assert torch.equal(x, torch.zeros_like(x))
    assert torch.equal(gaussian_input_noise(x + 1, std=0.0), x + 1)
    small = gaussian_input_noise(torch.zeros(100_000), std=0.1, clip=0.2)
    assert small.std().item() == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("shape", SHAPES)
def test_hard_pseudo_label_is_detached_argmax(shape):
    logits = torch.randn(shape, requires_grad=True)
    labels = hard_pseudo_label(logits)
    assert labels.dtype == torch.long and labels.shape == (shape[0], *shape[2:])
    assert not labels.requires_grad
    assert torch.equal(labels, logits.softmax(1).argmax(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_cross_entropy_matches_pytorch(shape):
    torch.manual_seed(0)
    logits = torch.randn(shape)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    weights = torch.rand(shape[1]) + 0.1
    assert torch.allclose(weighted_cross_entropy(logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(weighted_cross_entropy(logits, target, weights),
                          F.cross_entropy(logits, target, weight=weights))
    # nnU-Net style (N, 1, *spatial) float target is accepted
    assert torch.allclose(weighted_cross_entropy(logits, target[:, None].float(), weights),
                          F.cross_entropy(logits, target, weight=weights))


def test_weighted_cross_entropy_hand_computed():
    # voxel 0: uniform over 2 classes, label 0 (ce = log 2); voxel 1: logits (0, log 3), label 1 (ce = log 4/3)
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 2, 1)
    target = torch.tensor([0, 1]).reshape(1, 2, 1)
    weights = torch.tensor([1.0, 3.0])
    expected = (1 * math.log(2) + 3 * math.log(4 / 3)) / 4
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_zero_total_weight_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.zeros(2, 4, 4, dtype=torch.long)  # every (pseudo-)label is the class with weight 0
    weights = torch.tensor([0.0, 1.5, 3.0])
    assert torch.isnan(F.cross_entropy(logits, target, weight=weights))  # the PyTorch behaviour we guard
    loss = weighted_cross_entropy(logits, target, weights)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert weighted_cross_entropy(logits, torch.randint(0, 3, (2, 4, 4)), torch.zeros(3)).item() == 0.0


def test_weighted_cross_entropy_ignore_mask_equals_subset():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 1)
    target = torch.tensor([0, 1, 2, 2, 99, 99]).reshape(1, 6, 1)  # 99 = an ignore label, masked out
    ignore = target == 99
    weights = torch.tensor([1.0, 2.0, 0.5])
    expected = F.cross_entropy(logits[:, :, :4], target[:, :4], weight=weights)
    assert torch.allclose(weighted_cross_entropy(logits, target, weights, ignore_mask=ignore), expected)


def test_weighted_cross_entropy_rejects_bad_input():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 2\]"):
        weighted_cross_entropy(logits, torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="shape"):
        weighted_cross_entropy(logits, torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="class_weights"):
        weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="class_weights"):
        weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_cps_vanishes_for_confident_agreeing_networks(shape):
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    logits = _one_hot_logits(labels, shape[1], margin=50.0)
    assert cross_pseudo_supervision_loss(logits, logits.clone()).item() < 1e-12
    weights = torch.linspace(0.5, 2.0, shape[1])
    assert cross_pseudo_supervision_loss(logits, logits.clone(), weights, weights).item() < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_cps_equals_sum_of_cross_terms_and_is_symmetric(shape):
    torch.manual_seed(2)
    a, b = torch.randn(shape), torch.randn(shape)
    wa, wb = torch.rand(shape[1]) + 0.1, torch.rand(shape[1]) + 0.1
    loss = cross_pseudo_supervision_loss(a, b, wa, wb)
    expected = F.cross_entropy(a, b.argmax(1), weight=wa) + F.cross_entropy(b, a.argmax(1), weight=wb)
    assert torch.allclose(loss, expected)
    assert torch.allclose(cross_pseudo_supervision_loss(b, a, wb, wa), loss)


def test_cps_gradient_reaches_each_net_only_through_its_own_prediction():
    torch.manual_seed(3)
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    # the term of net a: the pseudo-label from b is detached, so b gets nothing from it
    term_a = weighted_cross_entropy(a, hard_pseudo_label(b))
    term_a.backward()
    assert b.grad is None and a.grad.abs().sum() > 0
    a.grad = None
    cross_pseudo_supervision_loss(a, b).backward()
    b_only = b.detach().clone().requires_grad_()
    F.cross_entropy(b_only, a.detach().argmax(1)).backward()
    assert torch.allclose(b.grad, b_only.grad)


def test_cps_zero_gradient_for_a_net_that_already_matches_the_other_pseudo_label():
    labels = torch.randint(0, 3, (2, 4, 4))
    confident = _one_hot_logits(labels, 3, margin=60.0).requires_grad_()
    # an uncertain net with the same argmax: its CE term still pushes it, the confident net gets ~0 gradient
    uncertain = (_one_hot_logits(labels, 3, margin=0.5) + 0.01 * torch.rand(2, 3, 4, 4)).requires_grad_()
    cross_pseudo_supervision_loss(confident, uncertain).backward()
    assert confident.grad.abs().max() < 1e-20
    assert uncertain.grad.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_are_finite_for_low_precision_logits(dtype):
    torch.manual_seed(4)
    a = (torch.randn(2, 4, 3, 6, 6) * 20).to(dtype).requires_grad_()
    b = (torch.randn(2, 4, 3, 6, 6) * 20).to(dtype)
    target = torch.randint(0, 4, (2, 3, 6, 6))
    weights = torch.tensor([0.0, 1.0, 2.0, 4.0])
    losses = [
        softmax_mse_consistency(a, b),
        cross_pseudo_supervision_loss(a, b, weights, weights),
        weighted_cross_entropy(a, target, weights),
        weighted_soft_dice_loss(a, target, weights),
    ]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses).backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()
