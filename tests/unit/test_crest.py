"""CReST on DHC's CPS base (nnssl.losses.class_rebalancing, nnssl_trainers/crest.py): the reverse-rank weights
against a numpy transcription of DHC ``train_crest.py`` (``CReST._weight_wbg``), the EMA update from the unlabeled
half, the weighted CPS loss, and the trainer's steps, ramp and checkpointed state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from class_imbalance_checks import steps_and_checkpoint

from nnssl.losses.class_rebalancing import CReSTWeights, crest_weights
from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl.ramps import sigmoid_rampup
from nnssl_trainers.crest import nnUNetTrainerCReST


def dhc_crest_weights(counts) -> np.ndarray:
    """DHC train_crest.py CReST._weight_wbg, transcribed: mu, a descending sorted dict, reverse-rank assignment."""
    counts = np.asarray(counts, dtype=np.float32)
    k = len(counts)
    mu = np.power((counts + 1e-8) / (np.amax(counts) + 1e-8), 1 / 3)
    ordered = sorted(dict(zip(range(k), list(mu))).items(), key=lambda s: s[1], reverse=True)
    weight = np.zeros(k)
    for rank in range(k):
        weight[ordered[rank][0]] = ordered[k - 1 - rank][1]
    return weight


@pytest.mark.parametrize("counts", [[900, 80, 20], [5, 500, 50, 0], [100, 0, 0, 7], [10, 10, 10], [0, 3, 3, 1]])
def test_reverse_rank_matches_dhc(counts):
    ours = crest_weights(torch.tensor(counts))
    assert np.allclose(ours.numpy(), dhc_crest_weights(counts), rtol=1e-5, atol=1e-9)
    assert torch.isfinite(ours).all() and (ours > 0).all() and ours.max() <= 1.0


def test_most_frequent_class_gets_the_smallest_weight():
    weights = crest_weights(torch.tensor([1000.0, 100.0, 1.0]))
    assert weights.argmin() == 0 and weights.argmax() == 2 and weights[2] == pytest.approx(1.0)
    assert weights[0] == pytest.approx((1 / 1000) ** (1 / 3), rel=1e-5)  # the rarest class's mu


def test_invalid_counts_and_settings_are_refused():
    with pytest.raises(ValueError):
        crest_weights(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        crest_weights(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError):
        CReSTWeights(1)
    with pytest.raises(ValueError):
        CReSTWeights(3, momentum=1.5)
    with pytest.raises(RuntimeError):
        CReSTWeights(3).update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def _logits_of(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels, k).movedim(-1, 1).float() * 5


def test_ema_update_from_each_networks_own_prediction():
    state = CReSTWeights(3, momentum=0.99)
    state.initialise(torch.tensor([900, 80, 20]))
    start = torch.tensor(dhc_crest_weights([900, 80, 20]), dtype=torch.float32)
    assert torch.allclose(state.weights, start.repeat(2, 1))
    labels_a = torch.tensor([[[0, 0, 0, 1]]])  # A predicts no class 2, B only class 2
    labels_b = torch.full((1, 1, 4), 2)
    w_a, w_b = state.update(_logits_of(labels_a, 3), _logits_of(labels_b, 3))
    # DHC: EMA(cur, past, 0.99) = 0.99 past + 0.01 cur, cur from the network's own argmax histogram
    assert torch.allclose(w_a, 0.99 * start + 0.01 * torch.tensor(dhc_crest_weights([3, 1, 0])).float())
    assert torch.allclose(w_b, 0.99 * start + 0.01 * torch.tensor(dhc_crest_weights([0, 0, 4])).float())
    assert torch.isfinite(w_a).all() and torch.isfinite(w_b).all()


def test_weighted_cps_loss_is_dhcs_weighted_mean_and_zero_when_networks_agree():
    generator = torch.Generator().manual_seed(0)
    za, zb = torch.randn(2, 3, 4, 5, generator=generator), torch.randn(2, 3, 4, 5, generator=generator)
    wa, wb = torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.2, 0.7, 0.9])
    # DHC: RobustCrossEntropyLoss(weight=w) = nn.CrossEntropyLoss(weight) with mean reduction
    expected = F.cross_entropy(za, zb.argmax(1), weight=wa) + F.cross_entropy(zb, za.argmax(1), weight=wb)
    assert cross_pseudo_supervision_loss(za, zb, wa, wb).item() == pytest.approx(expected.item(), rel=1e-6)
    confident = _logits_of(za.argmax(1), 3) * 20
    assert cross_pseudo_supervision_loss(confident, confident, wa, wb).item() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = cross_pseudo_supervision_loss(za.bfloat16(), zb.bfloat16(), wa, wb)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected.item(), rel=2e-2)


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerCReST:
    return tiny.two_case_trainer(nnUNetTrainerCReST, tmp_path, monkeypatch)


def test_trainer_networks_ramp_and_initial_weights(trainer):
    assert trainer.network2 is not None and set(trainer.extra_optimizers) == {"network2"}
    norm_weights = [m.weight for m in trainer.network2.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norm_weights and all(torch.all(w == 1) for w in norm_weights)  # xavier re-initialisation (DHC's B)
    trainer.num_epochs = 10
    values = []
    for epoch in range(12):
        trainer.current_epoch = epoch
        values.append(trainer.current_unsupervised_weight())
    assert values[0] == values[1] == pytest.approx(0.1 * math.exp(-5))
    assert values[4] == pytest.approx(0.1 * sigmoid_rampup(3, 10)) and values[11] == pytest.approx(0.1)
    trainer.initialise_class_state()
    counts = [2 * 128 - 70 - 6, 70, 6]  # the two training cases of the fold, not the validation case
    assert torch.allclose(trainer.class_state.weights[0], torch.tensor(dhc_crest_weights(counts)).float())


def test_trainer_steps_log_and_checkpoint(trainer):
    outputs = steps_and_checkpoint(nnUNetTrainerCReST, trainer, "crest",
                                   {"agreement", "crest_loss_supervised_a", "crest_loss_supervised_b",
                                    "crest_weight_min_a", "crest_weight_max_a"})
    assert outputs[0]["loss_supervised"] == pytest.approx(
        outputs[0]["crest_loss_supervised_a"] + outputs[0]["crest_loss_supervised_b"], rel=1e-5)
    assert 0 < outputs[-1]["crest_weight_min_a"] <= outputs[-1]["crest_weight_max_a"] <= 1.0
