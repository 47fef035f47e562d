"""DePL on DHC's CPS base (nnssl/losses/depl.py, nnssl/losses/masked_ce.py, nnssl_trainers/depl.py;
docs/methods/depl.md): the debiased pseudo-labels and q̂ against a numpy transcription of DHC ``train_depl.py``,
the loss's properties, and the trainer on the tiny 2D dataset."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from dhc_zoo_checks import np_softmax, reload_from_checkpoint, train_steps

from nnssl.losses.depl import DebiasedPseudoLabels
from nnssl.losses.masked_ce import masked_cps_loss, masked_cross_entropy
from nnssl_trainers.depl import nnUNetTrainerDePL

K = 3
SPATIAL = (4, 5)


def _np_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    log_p = np.log(np_softmax(logits))
    return -np.take_along_axis(log_p, target[:, None], axis=1)[:, 0]


def _dhc_step(z_a: np.ndarray, z_b: np.ndarray, q_a: np.ndarray, q_b: np.ndarray, n_l: int):
    """One step of train_depl.py's CPS part in numpy (float64): causal_inference (tau 1), ge(0.9) masks, update_qhat
    (momentum 0.99, unlabeled half) and WeightedCrossEntropyLoss (mean of CE · mask over all voxels)."""
    qt_a, qt_b = np_softmax(z_a - np.log(q_a)), np_softmax(z_b - np.log(q_b))
    t_a, t_b = qt_a.argmax(1), qt_b.argmax(1)
    m_a, m_b = (qt_a.max(1) >= 0.9).astype(float), (qt_b.max(1) >= 0.9).astype(float)
    q_a = 0.99 * q_a + 0.01 * np_softmax(z_a[n_l:]).mean(0, keepdims=True)
    q_b = 0.99 * q_b + 0.01 * np_softmax(z_b[n_l:]).mean(0, keepdims=True)
    loss = (_np_ce(z_a, t_b) * m_b).mean() + (_np_ce(z_b, t_a) * m_a).mean()
    return loss, q_a, q_b


def _step(prior_a, prior_b, z_a, z_b, n_l):
    t_a, m_a = prior_a.pseudo_labels(z_a)
    t_b, m_b = prior_b.pseudo_labels(z_b)
    prior_a.update(z_a[n_l:])
    prior_b.update(z_b[n_l:])
    return masked_cps_loss(z_a, z_b, t_a, t_b, m_a, m_b)


def test_three_steps_match_a_numpy_transcription_of_train_depl():
    g = torch.Generator().manual_seed(0)
    prior_a, prior_b = DebiasedPseudoLabels(K, SPATIAL), DebiasedPseudoLabels(K, SPATIAL)
    q_a = q_b = np.full((1, K, *SPATIAL), 1 / K)
    for _ in range(3):
        z_a, z_b = torch.randn(4, K, *SPATIAL, generator=g) * 3, torch.randn(4, K, *SPATIAL, generator=g) * 3
        expected, q_a, q_b = _dhc_step(z_a.double().numpy(), z_b.double().numpy(), q_a, q_b, n_l=2)
        loss = _step(prior_a, prior_b, z_a, z_b, n_l=2)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(prior_a.qhat.numpy(), q_a, rtol=1e-5)
        np.testing.assert_allclose(prior_b.qhat.numpy(), q_b, rtol=1e-5)
    assert 0 < loss.item()


def test_uniform_prior_keeps_the_argmax_and_a_biased_prior_moves_it():
    prior = DebiasedPseudoLabels(K, SPATIAL)
    z = torch.randn(2, K, *SPATIAL, generator=torch.Generator().manual_seed(1))
    target, mask = prior.pseudo_labels(z)
    assert torch.equal(target, z.argmax(1))
    assert torch.equal(mask, (z.softmax(1).max(1).values >= 0.9).float())
    prior.qhat[:, 0] = 0.98  # class 0 is predicted everywhere: debiasing lowers it by log(0.98 / 0.01)
    prior.qhat[:, 1:] = 0.01
    z = torch.zeros(1, K, *SPATIAL)
    z[:, 0] = 2.0  # argmax 0 before debiasing, but 2 < log(98)
    assert (prior.pseudo_labels(z)[0] != 0).all()


def test_a_prior_that_underflowed_to_zero_gives_finite_pseudo_labels():
    prior = DebiasedPseudoLabels(K, SPATIAL)
    prior.qhat[:, 1] = 0.0  # DHC: log(0) = -inf, z + inf = inf, softmax NaN
    target, mask = prior.pseudo_labels(torch.randn(2, K, *SPATIAL))
    assert (target == 1).all() and mask.eq(1).all()


def test_threshold_is_inclusive_like_ge():
    prior = DebiasedPseudoLabels(2, (1,), threshold=0.5)
    _, mask = prior.pseudo_labels(torch.zeros(1, 2, 1))  # q̃ = (0.5, 0.5): max == threshold
    assert mask.item() == 1.0


def test_zero_when_networks_agree_confidently_and_gradients_only_where_the_mask_keeps():
    labels = torch.randint(0, K, (3, *SPATIAL), generator=torch.Generator().manual_seed(2))
    agree = F.one_hot(labels, K).movedim(-1, 1).float() * 100
    assert masked_cps_loss(agree, agree.clone(), labels, labels, torch.ones_like(labels).float(),
                           torch.ones_like(labels).float()).item() == 0.0
    z_a = torch.randn(3, K, *SPATIAL, requires_grad=True)
    z_b = torch.randn(3, K, *SPATIAL, requires_grad=True)
    mask_b = (torch.rand(3, *SPATIAL, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    target_b = z_b.detach().argmax(1)
    masked_cross_entropy(z_a, target_b, mask_b).backward()
    voxel_grad = z_a.grad.abs().sum(1)
    assert (voxel_grad[mask_b == 0] == 0).all() and (voxel_grad[mask_b == 1] > 0).all()
    assert z_b.grad is None  # the pseudo-label side is detached


def test_bf16_autocast_on_cpu_gives_finite_float32_loss():
    prior_a, prior_b = DebiasedPseudoLabels(K, SPATIAL), DebiasedPseudoLabels(K, SPATIAL)
    z_a = torch.randn(4, K, *SPATIAL, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = z_a * 2.0
        loss = _step(prior_a, prior_b, logits, logits.detach() + 0.1, n_l=2)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(z_a.grad).all()
    assert prior_a.qhat.dtype == torch.float32 and torch.allclose(prior_a.qhat.sum(1), torch.ones(1, *SPATIAL))


def test_state_dict_round_trip_and_argument_checks():
    prior = DebiasedPseudoLabels(K, SPATIAL)
    prior.update(torch.randn(2, K, *SPATIAL))
    other = DebiasedPseudoLabels(K, SPATIAL)
    other.load_state_dict(prior.state_dict())
    assert torch.equal(other.qhat, prior.qhat)
    for kwargs in ({"momentum": 1.0}, {"tau": -1.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            DebiasedPseudoLabels(K, SPATIAL, **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        DebiasedPseudoLabels(1, SPATIAL)
    with pytest.raises(ValueError, match="do not match"):
        prior.pseudo_labels(torch.randn(1, K, 4, 4))
    with pytest.raises(ValueError, match="target labels"):
        masked_cross_entropy(torch.randn(1, K, 2), torch.tensor([[0, K]]))


def test_trainer_steps_log_and_restore_q_hat(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerDePL, tmp_path, monkeypatch)
    assert trainer.second_network == "xavier" and trainer.debiasing["a"].qhat.shape == (1, K, tiny.PATCH, tiny.PATCH)
    outputs = train_steps(trainer)
    assert {"depl_mask_fraction_a", "depl_mask_fraction_b"} <= set(outputs[0])
    qhat = trainer.debiasing["a"].qhat
    assert not torch.allclose(qhat, torch.full_like(qhat, 1 / K)) and torch.allclose(qhat.sum(1), torch.ones(1))
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)
    assert torch.equal(fresh.debiasing["b"].qhat, trainer.debiasing["b"].qhat)
