"""SimiS on DHC's CPS base (nnssl.losses.class_rebalancing, nnssl_trainers/simis.py): the frequency-gap weights and
their start against a numpy transcription of DHC ``train_simis.py`` (``SimiS._weight_wbg``, ``init_weight``,
``get_weights``), the update from the whole batch, the 0/0 guard once background's weight is 0, gradients, and the
trainer's steps and checkpointed state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from class_imbalance_checks import steps_and_checkpoint

from nnssl.losses.class_rebalancing import SimiSWeights, simis_weights
from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl_trainers.simis import nnUNetTrainerSimiS


def dhc_simis_rule(counts) -> np.ndarray:
    """DHC SimiS._weight_wbg(n) * num_cls (cal_cur_weight / init_weight)."""
    counts = np.asarray(counts, dtype=np.float32)
    share = (counts + 1e-8) / (np.sum(counts) + 1e-8)
    return (np.max(share) - share) * len(counts)


@pytest.mark.parametrize("counts", [[900, 80, 20], [5, 500, 50, 0], [10, 10, 10], [0, 0, 4]])
def test_rule_matches_dhc(counts):
    ours = simis_weights(torch.tensor(counts))
    assert np.allclose(ours.numpy(), dhc_simis_rule(counts), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(ours).all() and ours[int(np.argmax(counts))] == 0 and (ours >= 0).all()


def test_start_and_update_match_dhc():
    state = SimiSWeights(3, momentum=0.99)
    state.initialise(torch.tensor([900, 80, 20]))
    # DHC init_weight: EMA(K * rule(n_l), K * ones, 0.99)
    start = 0.99 * 3 * np.ones(3) + 0.01 * dhc_simis_rule([900, 80, 20])
    assert np.allclose(state.weights[0].numpy(), start) and torch.equal(state.weights[0], state.weights[1])
    logits_a = F.one_hot(torch.tensor([[0, 0, 1, 2]]), 3).movedim(-1, 1).float()
    logits_b = F.one_hot(torch.tensor([[1, 1, 1, 1]]), 3).movedim(-1, 1).float()
    w_a, w_b = state.update(logits_a, logits_b)
    assert np.allclose(w_a.numpy(), 0.99 * start + 0.01 * dhc_simis_rule([2, 1, 1]), rtol=1e-6)
    assert np.allclose(w_b.numpy(), 0.99 * start + 0.01 * dhc_simis_rule([0, 4, 0]), rtol=1e-6)


def test_background_weight_decays_to_zero_and_the_loss_stays_finite():
    state = SimiSWeights(3, momentum=0.5)
    state.initialise(torch.tensor([100, 10, 1]))
    background = F.one_hot(torch.zeros(2, 4, 4, dtype=torch.long), 3).movedim(-1, 1).float() * 4
    for _ in range(200):
        w_a, w_b = state.update(background, background)
    assert w_a[0] == 0 and w_b[0] == 0 and torch.isfinite(w_a).all()  # 0.5^200 underflows float32
    logits = background.clone().requires_grad_(True)
    loss = cross_pseudo_supervision_loss(logits, background, w_a, w_b)  # DHC: 0/0 = NaN
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def test_gradients_flow_only_through_the_predicting_network():
    generator = torch.Generator().manual_seed(3)
    za = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    zb = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 2.0])
    cross_pseudo_supervision_loss(za, zb.detach(), weights, weights).backward()
    assert za.grad.abs().sum() > 0 and zb.grad is None  # pseudo-labels are argmax of detached logits


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerSimiS:
    return tiny.two_case_trainer(nnUNetTrainerSimiS, tmp_path, monkeypatch)


def test_trainer_counts_the_whole_batch(trainer):
    trainer.initialise_class_state()
    before = trainer.class_state.weights.clone()
    captured = {}
    update = trainer.class_state.update

    def spy(logits_a, logits_b):
        captured["rows"] = logits_a.shape[0]
        return update(logits_a, logits_b)

    trainer.class_state.update = spy
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(0), n_labeled=2, n_unlabeled=3))
    assert captured["rows"] == 5 and not torch.equal(before, trainer.class_state.weights)


def test_trainer_steps_log_and_checkpoint(trainer):
    outputs = steps_and_checkpoint(nnUNetTrainerSimiS, trainer, "simis",
                                   {"agreement", "simis_loss_supervised_a", "simis_loss_supervised_b",
                                    "simis_weight_min_a", "simis_weight_max_a"})
    assert math.isfinite(outputs[-1]["loss_unsupervised"]) and outputs[-1]["simis_weight_max_a"] <= 3.0
