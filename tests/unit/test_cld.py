"""CLD on DHC's CPS base (nnssl.losses.class_sampling, nnssl_trainers/cld.py): sampling rates, sampling map,
confidence bank and the per-voxel weighted CE against a transcription of DHC ``train_cld.py``
(``cal_sampling_rate``, ``cal_sampling_mask``, ``ConfidenceBank.record_data``, ``WeightedCrossEntropyLoss``), their
properties, and the trainer's steps and checkpointed state."""

from __future__ import annotations

import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from class_imbalance_checks import steps_and_checkpoint

from nnssl.losses.class_sampling import (
    CLDStatistics,
    ConfidenceBank,
    class_sampling_map,
    inverse_frequency_weights,
    sampled_cross_entropy,
    sampling_rates,
)
from nnssl_trainers.cld import nnUNetTrainerCLD


def dhc_sampling_rate(confs, gamma=0.5):
    rate = 1 - confs
    return (rate / (torch.max(rate) + 1e-12)) ** gamma


def dhc_sampling_mask(output, sam_rate, rand_maps):
    """DHC cal_sampling_mask with its per-class torch.rand maps given (min_sr = 0)."""
    pred_map = torch.argmax(output, dim=1).float()
    sample_map = torch.zeros_like(pred_map)
    for idx in range(output.shape[1]):
        sample_map += ((rand_maps[idx] * (pred_map == idx)) > (1 - sam_rate[idx])) * 1.0
    return sample_map


def test_sampling_rates_match_dhc_and_stay_in_range():
    confs = torch.tensor([0.95, 0.4, 0.7, 0.1])
    for gamma in (0.5, 2.5):
        ours = sampling_rates(confs, gamma)
        assert torch.allclose(ours, dhc_sampling_rate(confs, gamma))
        assert ours.max() == pytest.approx(1.0) and (ours >= 0).all() and (ours <= 1).all()
    assert sampling_rates(torch.tensor([0.9, 0.9]), 0.5).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError):
        sampling_rates(confs, 0.0)


def test_sampling_map_matches_dhc_with_the_same_draws_and_samples_at_the_rates():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=generator)
    rates = torch.tensor([0.2, 1.0, 0.6])
    noise = torch.rand(2, 5, 6, generator=generator)
    assert torch.equal(class_sampling_map(logits, rates, noise), dhc_sampling_mask(logits, rates, [noise] * 3))
    big = torch.randn(1, 3, 300, 300, generator=generator)
    sampled, predicted = class_sampling_map(big, rates), big.argmax(1)
    for c, rate in enumerate(rates.tolist()):
        assert sampled[predicted == c].mean().item() == pytest.approx(rate, abs=0.02)
    assert class_sampling_map(big, torch.zeros(3)).sum() == 0


def test_inverse_frequency_weights_match_dhc_and_stay_finite_for_absent_classes():
    counts = torch.tensor([1000.0, 64.0, 8.0])
    assert torch.allclose(inverse_frequency_weights(counts), (counts.max() / counts) ** (1 / 3))
    absent = inverse_frequency_weights(torch.tensor([1000.0, 0.0, 8.0]))  # DHC: inf for class 1
    assert torch.isfinite(absent).all() and absent[1] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        inverse_frequency_weights(torch.zeros(3))


def test_sampled_ce_is_dhcs_unnormalised_weighted_mean_with_gradients_to_logits_only():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4), generator=generator)
    weights = torch.tensor([1.0, 2.5, 4.0])
    sample_map = (torch.rand(2, 4, 4, generator=generator) > 0.5).float().requires_grad_(True)
    # DHC WeightedCrossEntropyLoss(weight): CE(reduction='none', weight) * weight_map.detach(), then mean
    expected = (F.cross_entropy(logits, target[:, 0], weight=weights, reduction="none") * sample_map).mean()
    loss = sampled_cross_entropy(logits, target, sample_map, weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and sample_map.grad is None
    confident = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 30
    assert sampled_cross_entropy(confident, target, torch.ones(2, 4, 4), weights).item() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sampled_cross_entropy(logits.detach().bfloat16(), target, sample_map.detach(), weights)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected.item(), rel=2e-2)


def test_confidence_bank_matches_dhc_record_data():
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 4, 4, generator=generator),
                torch.randint(0, 2, (2, 1, 4, 4), generator=generator).float()) for _ in range(6)]
    initial = torch.tensor([0.3, 0.6, 0.9])
    bank = ConfidenceBank(3, momentum=0.9, update_every=2, initial=initial)
    # DHC ConfidenceBank, transcribed (class 2 never in the labels: its new confidence is 0)
    confs, sums, counts = initial.clone(), torch.zeros(3), torch.zeros(3)
    for step, (logits, label) in enumerate(batches, start=1):
        scores = F.softmax(logits, dim=1)
        for c in range(3):
            mask = (label == c).squeeze(1)
            sums[c] += torch.sum(scores[:, c] * mask)
            counts[c] += torch.sum(mask).float()
        if step % 2 == 0:
            new = sums / (counts + 1e-12)
            confs = new if step <= 2 else confs * 0.9 + new * 0.1
            sums, counts = torch.zeros(3), torch.zeros(3)
        ours = bank.record(logits, label)
        assert torch.allclose(ours, confs, atol=1e-6), step
    assert bank.confidences[2] == 0 and torch.isfinite(bank.confidences).all()


def test_cld_statistics_second_bank_starts_from_the_first():
    torch.manual_seed(0)
    stats = CLDStatistics(4)
    assert torch.equal(stats.bank_a.confidences, stats.bank_b.confidences)
    assert stats.bank_a.confidences is not stats.bank_b.confidences
    with pytest.raises(ValueError):
        ConfidenceBank(3, update_every=0)


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerCLD:
    return tiny.two_case_trainer(nnUNetTrainerCLD, tmp_path, monkeypatch)


def test_trainer_weights_from_the_fold_and_banks_updated_every_8_steps(trainer):
    trainer.initialise_class_state()
    counts = torch.tensor([2 * 128 - 70 - 6, 70, 6], dtype=torch.float64)
    assert torch.allclose(trainer.class_state.class_weights, ((counts.max() / counts) ** (1 / 3)).float())
    start = trainer.class_state.bank_a.confidences.clone()
    for step in range(8):
        trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(step)))
        assert torch.equal(trainer.class_state.bank_a.confidences, start) == (step < 7)
    assert trainer.class_state.bank_a.records == 8


def test_trainer_steps_log_and_checkpoint(trainer):
    outputs = steps_and_checkpoint(nnUNetTrainerCLD, trainer, "cld",
                                   {"agreement", "cld_loss_supervised_a", "cld_loss_supervised_b",
                                    "cld_sampled_fraction"})
    assert all(0.0 <= o["cld_sampled_fraction"] <= 1.0 for o in outputs)
