"""pseudo_label_confidence_stats: the confidence and confident-fraction diagnostics every SSL trainer logs."""

import math

import pytest
import torch

from nnssl.diagnostics import pseudo_label_confidence_stats


def _logits_with_confidence(confidences: list[float], n_classes: int = 3) -> torch.Tensor:
    """(1, K, V) logits whose max softmax at voxel v is confidences[v] (the rest spread evenly)."""
    columns = []
    for c in confidences:
        rest = (1 - c) / (n_classes - 1)
        columns.append(torch.log(torch.tensor([c] + [rest] * (n_classes - 1))))
    return torch.stack(columns, 1)[None]


def test_mean_and_fraction_match_hand_computed_values():
    logits = _logits_with_confidence([0.99, 0.96, 0.5, 0.94])
    mean, fraction = pseudo_label_confidence_stats(logits, threshold=0.95).tolist()
    assert mean == pytest.approx((0.99 + 0.96 + 0.5 + 0.94) / 4, abs=1e-6)
    assert fraction == pytest.approx(0.5)


def test_fraction_is_monotone_in_the_threshold_and_spans_zero_to_one():
    logits = torch.randn(2, 4, 6, 7, 5) * 3
    thresholds = [0.0, 0.3, 0.6, 0.9, 0.999, 1.0]
    fractions = [pseudo_label_confidence_stats(logits, t)[1].item() for t in thresholds]
    assert fractions[0] == 1.0  # every max-softmax is >= 1/K > 0
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 0.0  # softmax of finite logits never reaches exactly 1 in float32 here


def test_uniform_logits_give_confidence_one_over_k():
    mean, fraction = pseudo_label_confidence_stats(torch.zeros(1, 4, 3, 3), threshold=0.5).tolist()
    assert mean == pytest.approx(0.25) and fraction == 0.0


def test_regions_use_the_sigmoid_decision_confidence():
    logits = torch.tensor([math.log(9.0), -math.log(9.0), 0.0]).reshape(1, 3, 1)  # p = 0.9, 0.1, 0.5
    mean, fraction = pseudo_label_confidence_stats(logits, threshold=0.9, regions=True).tolist()
    assert mean == pytest.approx((0.9 + 0.9 + 0.5) / 3, abs=1e-6)
    assert fraction == pytest.approx(2 / 3)


def test_no_graph_and_finite_under_half_precision():
    logits = (torch.randn(1, 3, 8, 8) * 20).half().requires_grad_()
    stats = pseudo_label_confidence_stats(logits)
    assert not stats.requires_grad and stats.dtype == torch.float32 and torch.isfinite(stats).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        pseudo_label_confidence_stats(torch.zeros(1, 2, 3), threshold=1.5)
    with pytest.raises(ValueError, match="spatial"):
        pseudo_label_confidence_stats(torch.zeros(2, 3))
