import math

import pytest
import torch
import torch.nn.functional as F

from nnssl.debiasing import (
    DifficultyAwareWeighting,
    DistributionAwareWeighting,
    KnowledgeTransferWeighting,
    class_histogram,
    distribution_aware_weights,
    per_class_hard_dice,
    weighted_soft_dice_loss,
)


def _labels_with_counts(counts: list[int]) -> torch.Tensor:
    """A (1, n) label map whose class histogram is ``counts``, in shuffled voxel order."""
    labels = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))][None]


def _one_hot_logits(labels: torch.Tensor, num_classes: int, margin: float = 10.0) -> torch.Tensor:
    return torch.movedim(F.one_hot(labels, num_classes).float(), -1, 1) * margin


def test_distdw_reference_values_and_scale_invariance():
    weights = distribution_aware_weights(torch.tensor([1000.0, 100.0, 10.0]))
    assert torch.allclose(weights, torch.tensor([0.0, 1.5, 3.0]), atol=1e-6)  # [0, K/2, K]
    assert torch.allclose(distribution_aware_weights(torch.tensor([7000.0, 700.0, 70.0])), weights, atol=1e-6)
    assert weights.dtype == torch.float32


def test_distdw_rarer_classes_get_larger_weights():
    counts = torch.tensor([50_000.0, 3.0, 800.0, 12.0, 800.0, 0.0])
    weights = distribution_aware_weights(counts)
    order = torch.argsort(counts, descending=True)
    assert torch.all(weights[order][1:] >= weights[order][:-1])
    assert weights[0] == 0 and weights[5] == pytest.approx(6.0)  # absent class takes the max weight K
    assert weights[2] == weights[4]
    assert weights.min() >= 0 and weights.max() == pytest.approx(6.0)


def test_distdw_uniform_and_empty_counts_are_finite():
    assert torch.equal(distribution_aware_weights(torch.full((4,), 25.0)), torch.full((4,), 4.0))
    assert torch.equal(distribution_aware_weights(torch.zeros(3)), torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="class_counts"):
        distribution_aware_weights(torch.tensor([1.0, -2.0]))


def test_class_histogram_counts_and_range_check():
    assert torch.equal(class_histogram(torch.tensor([[0, 2], [2, 2]]), 4), torch.tensor([1, 0, 3, 0]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        class_histogram(torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError):
        class_histogram(torch.tensor([0.0, 1.0]), 3)


def test_distribution_aware_weighting_ema_hand_computed():
    distdw = DistributionAwareWeighting([1000, 100, 10], momentum=0.99)
    assert torch.allclose(distdw.weights, torch.tensor([0.0, 1.5, 3.0]), atol=1e-6)
    weights = distdw.update(_labels_with_counts([10, 100, 1000]))  # current = [3, 1.5, 0]
    assert torch.allclose(weights, torch.tensor([0.03, 1.5, 2.97]), atol=1e-5)
    weights[0] = 123.0  # update returns a copy, not the state
    assert distdw.weights[0] != 123.0
    # all pseudo-labels background -> finite, background 0, absent classes K
    assert torch.isfinite(distdw.update(torch.zeros(2, 4, 4, dtype=torch.long))).all()


def test_distribution_aware_weighting_fixed_point_and_state_dict():
    distdw = DistributionAwareWeighting([600, 300, 100])
    initial = distdw.weights.clone()
    for _ in range(5):
        distdw.update(_labels_with_counts([60, 30, 10]))  # same histogram up to scale
    assert torch.allclose(distdw.weights, initial, atol=1e-5)
    distdw.update(_labels_with_counts([10, 30, 60]))
    restored = DistributionAwareWeighting([1, 1, 1])
    restored.load_state_dict(distdw.state_dict())
    assert torch.equal(restored.weights, distdw.weights)
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"weights": torch.ones(4)})


def test_per_class_hard_dice_hand_computed_with_absent_class_rule():
    prediction = torch.tensor([[0, 0, 1, 1, 1, 0]])
    target = torch.tensor([[0, 0, 1, 1, 0, 0]])
    dice = per_class_hard_dice(prediction, target, num_classes=3)
    # bg: tp 3, |pred| 3, |gt| 4 -> 6/7; class 1: tp 2, |pred| 3, |gt| 2 -> 4/5; class 2 absent in both -> 0.5
    assert torch.allclose(dice, torch.tensor([6 / 7, 4 / 5, 0.5], dtype=torch.float64))
    missed = per_class_hard_dice(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 0]]), 2)
    assert 0 < missed[1] < 1e-8  # never predicted: tiny but positive, so log(d) stays finite


def test_diffdw_start_state_and_weight_range():
    diffdw = DifficultyAwareWeighting(num_classes=4)
    assert diffdw.beta == pytest.approx(0.98)
    assert torch.equal(diffdw.weights, torch.full((4,), 4.0))
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 3, 6, 6))  # class 3 absent from the target
    for _ in range(3):
        weights = diffdw.update(torch.randn(2, 4, 3, 6, 6), target[:, None])
        assert weights.max().item() == pytest.approx(4.0)
        assert weights.min() >= 0 and torch.isfinite(weights).all()


def test_diffdw_hand_computed_first_step():
    diffdw = DifficultyAwareWeighting(num_classes=2, accumulate_iters=50)
    dice = torch.tensor([0.9, 0.5], dtype=torch.float64)
    weights = diffdw.update_from_dice(dice)
    learn = 0.02 * (dice - 1e-8) * torch.log(dice / 1e-8)
    dice_weight = 0.98 + 0.02 * (1 - dice)
    raw = ((0 + 1e-8) / (learn + 1e-8)) ** 0.2 * dice_weight
    assert torch.allclose(weights.double(), 2 * raw / raw.max(), atol=1e-6)
    assert torch.allclose(diffdw.cls_learn, learn)
    assert torch.equal(diffdw.cls_unlearn, torch.zeros(2, dtype=torch.float64))


def test_diffdw_falling_class_gains_weight_over_rising_class():
    diffdw = DifficultyAwareWeighting(num_classes=3)
    # both start at 0.5 (the first call's large log(d / 1e-8) learn term is then equal), then class 1 rises
    # and class 2 falls by the same amounts
    trajectory = [(0.5, 0.5), (0.55, 0.45), (0.6, 0.4), (0.65, 0.35), (0.7, 0.3)]
    for rising, falling in trajectory:
        weights = diffdw.update_from_dice(torch.tensor([0.95, rising, falling]))
    assert diffdw.cls_learn[1] > diffdw.cls_learn[2]
    assert diffdw.cls_unlearn[2] > 0 and diffdw.cls_unlearn[1] == 0
    assert weights[2] > weights[1]


def test_diffdw_state_dict_round_trip():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    original = DifficultyAwareWeighting(3)
    original.update(logits, target)
    copy = DifficultyAwareWeighting(3)
    copy.load_state_dict(original.state_dict())
    logits2 = torch.randn(2, 3, 8, 8)
    assert torch.equal(original.update(logits2, target), copy.update(logits2, target))
    with pytest.raises(KeyError, match="last_dice"):
        copy.load_state_dict({"weights": torch.ones(3)})
    with pytest.raises(ValueError, match=r"\(N, 3, \*spatial\)"):
        copy.update(torch.randn(2, 4, 8, 8), target)


def test_kt_weights_fixed_point_when_predictions_are_perfect():
    target = _labels_with_counts([500, 200, 50, 10]).reshape(1, 4, 10, 19)
    counts = class_histogram(target, 4)
    kt = KnowledgeTransferWeighting(counts, momentum=0.99)
    initial = kt.weights.clone()
    assert initial[0] == 0 and initial[3] == pytest.approx(4.0)  # most frequent 0, rarest K
    for _ in range(3):
        weights = kt.update(_one_hot_logits(target, 4), target)
    assert torch.allclose(weights, initial, atol=1e-5)


def test_kt_weights_count_wrong_voxels_as_background():
    target = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2]).reshape(1, 10, 1)
    prediction = target.clone()
    prediction[0, 5, 0] = 2  # one class-1 voxel predicted as class 2 -> counted as background
    kt = KnowledgeTransferWeighting([1, 1, 1], momentum=0.0)  # momentum 0: weights = current estimate
    weights = kt.update(_one_hot_logits(prediction, 3), target)
    assert torch.allclose(weights, distribution_aware_weights(torch.tensor([6.0, 2.0, 2.0])))
    assert torch.allclose(weights, torch.tensor([0.0, 3.0, 3.0]))
    restored = KnowledgeTransferWeighting([1, 1, 1])
    restored.load_state_dict(kt.state_dict())
    assert torch.equal(restored.weights, kt.weights)


def test_weighted_soft_dice_hand_computed():
    logits = torch.zeros(1, 2, 4, 1)  # p = 0.5 everywhere
    labels = torch.tensor([1, 1, 0, 0]).reshape(1, 4, 1)
    weights = torch.tensor([0.0, 2.0])
    # class 1: tp = 1, fp = 1, fn = 1 -> (2 + 1) / (2 + 1 + 1 + 1) = 0.6, times w_1 = 2
    loss = weighted_soft_dice_loss(logits, labels, weights)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    one_hot = torch.movedim(F.one_hot(labels, 2).float(), -1, 1)
    assert torch.allclose(weighted_soft_dice_loss(logits, one_hot, weights), loss)
    # with background: class 0 has the same statistics, weight 0 -> mean(0, 1.2)
    assert weighted_soft_dice_loss(logits, labels, weights, do_bg=True).item() == pytest.approx(-0.6, rel=1e-6)


def test_weighted_soft_dice_perfect_prediction_and_per_sample_mode():
    torch.manual_seed(2)
    labels = torch.randint(0, 3, (2, 4, 5, 5))
    logits = _one_hot_logits(labels, 3, margin=40.0)
    weights = torch.tensor([5.0, 1.0, 3.0])
    expected = -(1.0 + 3.0) / 2
    assert weighted_soft_dice_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-5)
    assert weighted_soft_dice_loss(logits, labels, weights, batch_dice=False).item() == pytest.approx(expected,
                                                                                                      rel=1e-5)
    unweighted = weighted_soft_dice_loss(torch.randn(2, 3, 4, 5, 5, requires_grad=True), labels, None)
    assert -1 <= unweighted.item() < 0
    unweighted.backward()


def test_dice_smooth_keeps_absent_class_finite():
    labels = torch.zeros(1, 3, 3, dtype=torch.long)  # foreground absent from target
    loss = weighted_soft_dice_loss(torch.randn(1, 2, 3, 3), labels, torch.tensor([1.0, 1.0]))
    assert math.isfinite(loss.item())
