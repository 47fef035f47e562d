"""Basak et al. as DHC's zoo runs it (nnssl.losses.class_sampling.FuzzyRankSamplingRates, nnssl_trainers/basak.py):
the per-class statistics, fuzzy ranks, consensus and sampling rates against a transcription of DHC
``train_acisis.py`` (``ConfidenceArray.record_data``, ``fuzzy_rank``, ``CFS_func``, ``cal_sampling_rate``) where
DHC's code runs (one labeled sample, K >= 12), the intended computation where it breaks, the loss, the EMA with the
epoch as step counter, and the trainer's steps and checkpointed state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from class_imbalance_checks import steps_and_checkpoint

from nnssl.losses.class_sampling import FuzzyRankSamplingRates, class_sampling_map, sampled_cross_entropy
from nnssl_trainers.basak import nnUNetTrainerBasak


class DHCConfidenceArray:
    """DHC ConfidenceArray (record_data / fuzzy_rank / CFS_func / cal_sampling_rate), transcribed on CPU."""

    def __init__(self, num_cls, update_iter, top_m=12):
        self.num_cls, self.tot_iter, self.cur_iter, self.top_m = num_cls, update_iter, 0, top_m
        self.entropy, self.confidence, self.variance = torch.zeros(num_cls), torch.zeros(num_cls), torch.zeros(num_cls)
        self.CC, self.sam_rate = torch.zeros(num_cls), torch.ones(num_cls)

    def record_data(self, output, gt):
        scores = F.softmax(output, dim=1)
        scores_max, _ = torch.max(scores, dim=1)
        for ind in range(self.num_cls):
            conf = scores[:, ind, ...]
            voxels = (gt == ind).sum() + 1e-12
            self.entropy[ind] += torch.sum(conf.unsqueeze(1) * torch.log(scores + 1e-12)
                                           * (gt == ind).unsqueeze(1)) / voxels
            self.confidence[ind] += torch.sum(conf * (gt == ind)) / voxels
            self.variance[ind] += torch.sum((scores_max - conf) * (gt == ind)) / voxels
        self.cur_iter += 1

    def fuzzy_rank(self, cf, top):
        ranks = np.zeros(cf.shape)
        for i in range(cf.shape[0]):
            for k in range(cf.shape[1]):
                ranks[i][k] = 1 - math.exp(-math.exp(-2.0 * cf[i][k]))
        kept = 0.632 * np.ones(shape=ranks.shape)
        for i in range(ranks.shape[0]):
            for k in range(top):
                idx = np.where(ranks[i] == np.partition(ranks[i], k)[k])
                kept[i][idx] = ranks[i][idx]
        return kept

    def cal_sampling_rate(self, top=None):
        if self.cur_iter == self.tot_iter:
            arr = torch.stack([self.entropy, self.confidence, self.variance], dim=0)
            r_norm = F.softmax(arr / self.cur_iter, dim=1).numpy().astype(np.float64)
            ranks = self.fuzzy_rank(r_norm, self.top_m if top is None else top)
            fr = ranks.sum(0)
            r_norm[ranks == 0.632] = 0
            ccf = 1 - np.sum(r_norm, axis=0) / 3
            cur = torch.FloatTensor(ccf * fr)
            self.CC = 0.99 * self.CC + 0.01 * (cur / cur.max())
            self.entropy, self.confidence, self.variance = (torch.zeros(self.num_cls) for _ in range(3))
            self.cur_iter = 0
            rate = 1 - self.CC
            self.sam_rate = (rate / (rate.max() + 1e-12)) ** 2.5
        return self.sam_rate


def _batches(k, n, batch=1, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, k, size, size, generator=generator) * 2,
             torch.randint(0, k, (batch, 1, size, size), generator=generator)) for _ in range(n)]


def test_matches_dhc_for_one_labeled_sample_and_13_classes():
    k = 13  # DHC's code runs for K >= 12; with 13 classes one rank per row gets the 0.632 penalty
    ours, dhc = FuzzyRankSamplingRates(k, update_every=3), DHCConfidenceArray(k, 3)
    assert torch.equal(ours.rates, torch.ones(k))
    for step, (logits, labels) in enumerate(_batches(k, 9), start=1):
        rates = ours.record(logits, labels)
        dhc.record_data(logits, labels)
        expected = dhc.cal_sampling_rate()
        assert torch.allclose(rates, expected, rtol=1e-5, atol=1e-6), step
    assert torch.allclose(ours.consensus, dhc.CC, rtol=1e-5)
    assert (ours.rates >= 0).all() and (ours.rates <= 1).all() and ours.rates.max() == pytest.approx(1.0)


def test_fewer_than_12_classes_keep_every_rank_where_dhc_breaks():
    k = 3
    dhc = DHCConfidenceArray(k, 2)
    ours = FuzzyRankSamplingRates(k, update_every=2)
    for logits, labels in _batches(k, 2, seed=1):
        dhc.record_data(logits, labels)
        ours.record(logits, labels)
    with pytest.raises(ValueError):  # np.partition(a, k) for k >= K: "kth(=3) out of bounds"
        DHCConfidenceArray(k, 2).fuzzy_rank(np.full((3, k), 0.3), 12)
    # the intended computation: DHC's loop over the min(12, K) smallest ranks, i.e. every rank kept
    assert torch.allclose(ours.rates, dhc.cal_sampling_rate(top=k), rtol=1e-5, atol=1e-6)


def test_each_sample_mask_meets_its_own_scores():
    """DHC multiplies (B, 1, ...) masks by (B, ...) scores: with B = 2 it sums every mask against every sample. The
    intended statistic equals DHC's on the two samples laid side by side as one sample."""
    k = 3
    (a, ya), (b, yb) = _batches(k, 2, seed=2)
    ours = FuzzyRankSamplingRates(k, update_every=1)
    ours.record(torch.cat((a, b)), torch.cat((ya, yb)))
    side_by_side = DHCConfidenceArray(k, 1)
    side_by_side.record_data(torch.cat((a, b), dim=3), torch.cat((ya, yb), dim=3))
    expected = torch.stack([side_by_side.entropy, side_by_side.confidence, side_by_side.variance])
    dhc_broadcast = DHCConfidenceArray(k, 1)
    dhc_broadcast.record_data(torch.cat((a, b)), torch.cat((ya, yb)))
    assert not torch.allclose(dhc_broadcast.confidence, side_by_side.confidence)
    ours_stats = FuzzyRankSamplingRates(k, update_every=5)
    ours_stats.record(torch.cat((a, b)), torch.cat((ya, yb)))
    assert torch.allclose(ours_stats.statistics.float(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours.rates).all() and ours.records == 0


def test_absent_classes_and_bf16_autocast_stay_finite():
    rates = FuzzyRankSamplingRates(4, update_every=1)
    logits = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rates.record(logits.bfloat16(), torch.zeros(2, 1, 5, 5))  # only class 0 in the labels
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    with pytest.raises(ValueError):
        FuzzyRankSamplingRates(1, update_every=1)
    with pytest.raises(ValueError):
        FuzzyRankSamplingRates(3, update_every=0)


def test_loss_weights_sampled_voxels_by_confidence_and_is_zero_when_teacher_agrees():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, generator=generator)
    rates, noise = torch.tensor([0.3, 1.0, 0.5]), torch.rand(2, 4, 4, generator=generator)
    probs = student.detach().softmax(1)
    sample_map = class_sampling_map(student, rates, noise) * probs.amax(1) ** 1.5
    # DHC: WeightedCrossEntropyLoss()(output_u, pseudo_label, sample_map), no class weights
    expected = (F.cross_entropy(student, teacher.argmax(1), reduction="none") * sample_map).mean()
    loss = sampled_cross_entropy(student, teacher.argmax(1), sample_map)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0
    confident = F.one_hot(teacher.argmax(1), 3).movedim(-1, 1).float() * 30
    assert sampled_cross_entropy(confident, teacher.argmax(1), torch.ones(2, 4, 4)).item() < 1e-6


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerBasak:
    return tiny.two_case_trainer(nnUNetTrainerBasak, tmp_path, monkeypatch)


def test_teacher_ema_counts_epochs(trainer):
    assert trainer.sampling.update_every == trainer.num_iterations_per_epoch
    batch = tiny.tiny_batch(torch.Generator().manual_seed(0))
    trainer.current_epoch = 0
    trainer.train_step(batch)
    trainer.train_step(batch)  # global iteration 1, but epoch 0: alpha = 0, the teacher is the student
    for name, value in trainer.network.state_dict().items():
        assert torch.equal(trainer.teacher.state_dict()[name], value), name
    trainer.current_epoch = 2
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train_step(batch)
    name = next(k for k, v in trainer.network.state_dict().items() if v.is_floating_point() and v.ndim == 4)
    expected = 2 / 3 * teacher_before[name] + 1 / 3 * trainer.network.state_dict()[name]
    assert torch.allclose(trainer.teacher.state_dict()[name], expected, atol=1e-6)


def test_rates_update_once_an_epoch_and_ramp(trainer):
    trainer.sampling.update_every = 3
    for step in range(3):
        trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(step)))
        assert torch.equal(trainer.sampling.rates, torch.ones(tiny.K)) == (step < 2)
    trainer.num_epochs, trainer.current_epoch = 10, 1
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * math.exp(-5))


def test_trainer_steps_log_and_checkpoint(trainer):
    trainer.sampling.update_every = 2
    outputs = steps_and_checkpoint(nnUNetTrainerBasak, trainer, "basak", {"agreement", "basak_sampled_fraction"})
    assert all(0.0 <= o["basak_sampled_fraction"] <= 1.0 for o in outputs)
