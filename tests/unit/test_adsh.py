"""Adsh on DHC's CPS base (nnssl/losses/adsh.py, nnssl_trainers/adsh.py; docs/methods/adsh.md): thresholds, bank
cadence and loss against a numpy transcription of DHC ``train_adsh.py`` (class ``ADSH``), the loss's properties, and
the trainer on the tiny 2D dataset."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from dhc_zoo_checks import np_softmax, reload_from_checkpoint, train_steps

from nnssl.losses.adsh import (
    AdaptiveThresholds,
    adsh_cps_loss,
    adsh_thresholds,
    class_sampling_mask,
    masked_logit_cross_entropy,
)
from nnssl_trainers.adsh import nnUNetTrainerAdsh

K = 3
SPATIAL = (4, 5)


class _DHCBank:
    """numpy transcription of DHC ``ADSH`` (get_thresholds with thresh_major 0.9, float32 counts and ρ)."""

    def __init__(self, tot_iter: int):
        self.scores = np.zeros((tot_iter, K, *SPATIAL), dtype=np.float32)
        self.cur_iter, self.tot_iter, self.thresholds = 0, tot_iter, np.zeros(K, dtype=np.float32)

    def get_thresholds(self, output: np.ndarray) -> np.ndarray:
        bsz = output.shape[0]
        if self.cur_iter < self.tot_iter - 1:
            self.scores[self.cur_iter:self.cur_iter + bsz] = np_softmax(output)
            self.cur_iter += bsz
            return self.thresholds.copy()
        scores = self.scores.reshape(self.tot_iter, K, -1)
        voxel_num = np.histogram(scores.argmax(1).reshape(-1), range(K + 1))[0].astype(np.float32)
        major = voxel_num.argmax()
        rho = np.float32(np.float32((scores[:, major] > 0.9).sum()) + np.float32(1e-8)) / \
            np.float32(voxel_num[major] + np.float32(1e-8))
        stacked = np.concatenate(list(scores), axis=-1)
        for i in range(K):
            self.thresholds[i] = np.sort(stacked[i])[::-1][int(np.float32(rho * voxel_num[i]))]
        self.cur_iter = 0
        return self.thresholds.copy()


def _bank_logits(generator: torch.Generator, n: int = 2) -> torch.Tensor:
    z = torch.randn(n, K, *SPATIAL, generator=generator) * 2
    z[:, 0] += 1.5  # background-like majority class
    return z


def test_bank_cadence_and_thresholds_match_dhc_adsh():
    g = torch.Generator().manual_seed(0)
    ours, dhc = AdaptiveThresholds(K, 4, SPATIAL), _DHCBank(tot_iter=4)
    recomputed = 0
    for step in range(7):  # bank of 4 patches, 2 per step: store, store, recompute, store, store, recompute, store
        z = _bank_logits(g)
        expected = dhc.get_thresholds(z.numpy())
        got = ours.step(z)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
        recomputed += int(step in (2, 5))
        assert ours.filled == dhc.cur_iter
    assert recomputed == 2 and (got > 0).all() and (got <= 1).all()


def test_thresholds_of_a_bank_match_the_transcription_and_stay_in_range():
    scores = torch.softmax(_bank_logits(torch.Generator().manual_seed(1), n=3) * 2, dim=1)
    dhc = _DHCBank(tot_iter=3)
    dhc.scores[:] = scores.numpy()
    dhc.cur_iter = 2
    expected = dhc.get_thresholds(np.zeros((1, K, *SPATIAL), dtype=np.float32))
    got = adsh_thresholds(scores)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()


def test_one_class_everywhere_does_not_index_past_the_bank():
    scores = torch.zeros(2, K, *SPATIAL)
    scores[:, 0] = 1.0  # every voxel class 0 with p = 1 > 0.9: ρ = 1 and int(ρ n_0) = every voxel
    thresholds = adsh_thresholds(scores)
    assert thresholds.tolist() == [1.0, 0.0, 0.0]


def test_mask_is_strict_and_zero_thresholds_keep_every_logit():
    z = torch.randn(2, K, *SPATIAL, generator=torch.Generator().manual_seed(2))
    assert class_sampling_mask(z, torch.zeros(K)).all()
    probs = z.softmax(1)
    thresholds = probs[0, :, 0, 0].clone()  # the voxel (0, 0, 0) sits exactly at every threshold
    mask = class_sampling_mask(z, thresholds)
    assert not mask[0, :, 0, 0].any()
    assert torch.equal(mask, (probs > thresholds.view(1, K, 1, 1)).float())


def test_loss_matches_dhc_and_gradients_reach_only_kept_logits():
    g = torch.Generator().manual_seed(3)
    z_a = torch.randn(2, K, *SPATIAL, generator=g).requires_grad_()
    z_b = torch.randn(2, K, *SPATIAL, generator=g).requires_grad_()
    mask_a = (torch.rand(2, K, *SPATIAL, generator=g) > 0.3).float()
    mask_b = (torch.rand(2, K, *SPATIAL, generator=g) > 0.3).float()
    loss = adsh_cps_loss(z_a, z_b, mask_a, mask_b)
    a, b, ma, mb = (t.detach().double().numpy() for t in (z_a, z_b, mask_a, mask_b))

    def ce(z, t):  # ClassDependent_WeightedCrossEntropyLoss: CE(input * weight_map, target), mean over voxels
        return -np.take_along_axis(np.log(np_softmax(z)), t[:, None], 1).mean()

    expected = ce(a * mb, b.argmax(1)) + ce(b * ma, a.argmax(1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (z_a.grad[mask_b == 0] == 0).all() and (z_a.grad[mask_b == 1] != 0).any()
    assert (z_b.grad[mask_a == 0] == 0).all()


def test_zero_loss_when_networks_agree_confidently():
    labels = torch.randint(0, K, (2, *SPATIAL), generator=torch.Generator().manual_seed(4))
    z = F.one_hot(labels, K).movedim(-1, 1).float() * 100
    mask = class_sampling_mask(z, torch.full((K,), 0.5))
    assert adsh_cps_loss(z, z.clone(), mask, mask).item() == 0.0


def test_bf16_autocast_on_cpu_and_state_round_trip():
    bank = AdaptiveThresholds(K, 2, SPATIAL)
    z = torch.randn(2, K, *SPATIAL, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = z * 2.0
        thresholds = bank.step(logits)
        mask = class_sampling_mask(logits, thresholds)
        loss = adsh_cps_loss(logits, logits.detach() + 0.1, mask, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert bank.scores.dtype == torch.float32 and bank.filled == 2
    bank.step(logits.detach())  # recompute
    other = AdaptiveThresholds(K, 2, SPATIAL)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.thresholds, bank.thresholds) and torch.equal(other.scores, bank.scores)
    assert other.filled == bank.filled == 0


def test_argument_checks():
    for args in ((1, 2, SPATIAL), (K, 0, SPATIAL), (K, 2, ())):
        with pytest.raises(ValueError):
            AdaptiveThresholds(*args)
    with pytest.raises(ValueError, match="thresh_major"):
        AdaptiveThresholds(K, 2, SPATIAL, thresh_major=2.0)
    with pytest.raises(ValueError, match="do not match"):
        AdaptiveThresholds(K, 2, SPATIAL).step(torch.randn(1, K, 3, 3))
    with pytest.raises(ValueError, match="thresholds"):
        class_sampling_mask(torch.randn(1, K, 2), torch.zeros(K + 1))
    with pytest.raises(ValueError, match="logit_mask"):
        masked_logit_cross_entropy(torch.randn(1, K, 2), torch.zeros(1, 2), torch.ones(1, K, 3))


def test_trainer_bank_size_steps_log_and_restore(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerAdsh, tmp_path, monkeypatch)
    assert trainer.second_network == "xavier"
    assert trainer.bank_size() == 1  # no preprocessed unlabeled cases here: max(1, 0 // 4)
    bank = trainer.adaptive_thresholds["a"]
    assert bank.scores.shape == (1, K, tiny.PATCH, tiny.PATCH)
    # store, recompute, store; the recompute reads each network's majority class and K k-th-value ranks on the host
    # (Adsh's thresholds by design, docs/methods/adsh.md)
    outputs = train_steps(trainer, steps=3, host_syncs=[1, 1 + 2 * (1 + tiny.K), 1])
    assert outputs[0]["adsh_threshold_mean_a"] == 0.0 and outputs[0]["adsh_kept_logits_a"] == 1.0
    assert outputs[1]["adsh_threshold_mean_a"] > 0.0 and bank.filled == 1
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)
    assert fresh.adaptive_thresholds["b"].filled == 1
    assert torch.equal(fresh.adaptive_thresholds["b"].thresholds, trainer.adaptive_thresholds["b"].thresholds)
