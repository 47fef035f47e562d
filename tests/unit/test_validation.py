"""nnssl.validation: value checks run when a function is called directly and are skipped in the training step."""

from __future__ import annotations

import pytest
import torch

from nnssl.debiasing import DifficultyAwareWeighting, class_histogram, distribution_aware_weights
from nnssl.losses.cps import weighted_cross_entropy
from nnssl.validation import trusted_inputs, value_checks_enabled


def test_checks_on_by_default_off_inside_and_restored_after():
    assert value_checks_enabled()
    with trusted_inputs():
        assert not value_checks_enabled()
        with trusted_inputs():
            assert not value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(RuntimeError), trusted_inputs():
        raise RuntimeError("boom")
    assert value_checks_enabled()  # restored after an exception too


def test_value_checks_raise_outside_only():
    bad = torch.tensor([0, 1, 5])
    with pytest.raises(ValueError, match="labels must be in"):
        class_histogram(bad, 3)
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DifficultyAwareWeighting(3).update_from_dice(torch.tensor([0.5, 0.0, 0.5]))
    with trusted_inputs():  # no host read: nothing checks the values
        weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.tensor([1.0, 0.5, 1.0]))
        class_histogram(torch.tensor([0, 1, 2]), 3)


def test_shape_checks_always_run():
    with trusted_inputs(), pytest.raises(ValueError, match="shape"):
        weighted_cross_entropy(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(2))


def test_weights_without_the_host_branch_are_unchanged():
    assert torch.equal(distribution_aware_weights(torch.tensor([5.0, 5.0, 5.0])), torch.full((3,), 3.0))
    weights = distribution_aware_weights(torch.tensor([1000.0, 10.0, 0.0]))
    assert weights.dtype == torch.float32 and float(weights[0]) == 0.0 and float(weights[2]) == pytest.approx(3.0)
    diffdw = DifficultyAwareWeighting(3)
    assert torch.equal(diffdw.update_from_dice(torch.ones(3)), torch.full((3,), 3.0))  # all perfect: K · ones
