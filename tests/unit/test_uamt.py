"""UA-MT (docs/methods/uamt.md): the uncertainty-masked consistency and the Monte-Carlo teacher entropy against a
numpy transcription of DHC's ``train_uamt.py``, its properties, and nnUNetTrainerUAMT on the tiny CPU trainer (the
epoch-stepped EMA, the logged keys, the teacher in the checkpoint)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
from dhc_zoo_checks import np_softmax, reload_from_checkpoint

from nnssl.losses.uamt import UncertaintyAwareConsistency, predictive_entropy, uncertainty_threshold
from nnssl.ramps import sigmoid_rampup
from nnssl_trainers.uamt import nnUNetTrainerUAMT

K = 4


def _dhc_consistency(student: np.ndarray, teacher: np.ndarray, uncertainty: np.ndarray, threshold: float) -> float:
    # train_uamt.py: consistency_dist = softmax_mse_loss(outputs[tmp_bs:], ema_output); mask = (uncertainty <
    # threshold).float(); consistency_loss = torch.sum(mask*consistency_dist)/(2*torch.sum(mask)+1e-16)
    dist = (np_softmax(student) - np_softmax(teacher)) ** 2
    mask = (uncertainty < threshold).astype(np.float64)
    return float((mask * dist).sum() / (2 * mask.sum() + 1e-16))


def test_masked_consistency_matches_dhc_transcription_and_is_zero_when_predictions_agree():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, K, 5, 6, generator=g), torch.randn(2, K, 5, 6, generator=g)
    uncertainty = torch.rand(2, 1, 5, 6, generator=g) * math.log(2)
    threshold = 0.8 * math.log(2)
    loss, certain = UncertaintyAwareConsistency()(student, teacher, uncertainty, threshold)
    expected = _dhc_consistency(student.double().numpy(), teacher.double().numpy(), uncertainty.numpy(), threshold)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert certain.item() == pytest.approx(float((uncertainty < threshold).float().mean()))
    same, _ = UncertaintyAwareConsistency()(student, student.clone(), uncertainty, threshold)
    assert same.item() == 0.0
    nothing_certain, certain = UncertaintyAwareConsistency()(student, teacher, uncertainty, -1.0)
    assert nothing_certain.item() == 0.0 and certain.item() == 0.0  # 0 / 1e-16, not NaN


def _dhc_uncertainty(teacher, image_u: torch.Tensor, num_cls: int) -> np.ndarray:
    # train_uamt.py: T = 8; volume_batch_r = image_u.repeat(2, 1, 1, 1, 1); T//2 noisy forwards of it;
    # preds = softmax(preds).reshape(T, stride, C, ...).mean(0); uncertainty = -sum(preds*log(preds + 1e-6), dim=1)
    t = 8
    batch_r = image_u.repeat(2, 1, 1, 1)
    stride = batch_r.shape[0] // 2
    preds = torch.zeros([stride * t, num_cls, *image_u.shape[2:]])
    for i in range(t // 2):
        inputs = batch_r + torch.clamp(torch.randn_like(batch_r) * 0.1, -0.2, 0.2)
        preds[2 * stride * i:2 * stride * (i + 1)] = teacher(inputs)
    preds = np_softmax(preds.double().numpy()).reshape(t, stride, num_cls, *image_u.shape[2:]).mean(0)
    return -(preds * np.log(preds + 1e-6)).sum(1, keepdims=True)


def test_monte_carlo_uncertainty_matches_dhc_loop_with_the_same_noise():
    conv = torch.nn.Conv2d(1, K, 3, padding=1)
    x = torch.randn(3, 1, 6, 7, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    ours = UncertaintyAwareConsistency().uncertainty(conv, x)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = _dhc_uncertainty(conv, x, K)
    assert ours.shape == (3, 1, 6, 7)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_uncertainty_of_an_input_independent_teacher_is_its_entropy():
    logits = torch.randn(1, K, 4, 4)
    teacher = lambda x: logits.expand(x.shape[0], -1, -1, -1)  # noqa: E731
    u = UncertaintyAwareConsistency(passes=4, batch_repeat=1).uncertainty(teacher, torch.zeros(2, 1, 4, 4))
    expected = predictive_entropy(logits.softmax(1)).expand(2, -1, -1, -1)
    assert torch.allclose(u, expected, atol=1e-6)
    assert (u >= 0).all() and (u <= math.log(K) + 1e-5).all()


def test_threshold_ramps_from_three_quarters_to_ln2():
    values = [uncertainty_threshold(e, 10) for e in range(12)]
    assert values[0] == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert values[4] == pytest.approx((0.75 + 0.25 * sigmoid_rampup(4, 10)) * math.log(2))
    assert values[-1] == pytest.approx(math.log(2)) and values == sorted(values)
    assert all(0.75 * math.log(2) <= v <= math.log(2) for v in values)


@pytest.mark.parametrize("kwargs", [{"passes": 0}, {"passes": 8, "batch_repeat": 3}, {"noise_std": -1.0},
                                    {"class_normaliser": 0.0}])
def test_arguments_validated_at_construction(kwargs):
    with pytest.raises(ValueError):
        UncertaintyAwareConsistency(**kwargs)


def test_gradient_reaches_the_student_only_and_bf16_autocast_works():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, K, 5, 5, generator=g).requires_grad_()
    teacher = torch.randn(2, K, 5, 5, generator=g).requires_grad_()
    uncertainty = torch.zeros(2, 1, 5, 5)
    uncertainty[0] = 1.0  # sample 0 uncertain everywhere: no gradient there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = UncertaintyAwareConsistency()(student.bfloat16(), teacher.bfloat16(), uncertainty, 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert teacher.grad is None
    assert student.grad[0].abs().max() == 0 and student.grad[1].abs().max() > 0


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerUAMT:
    return tiny.two_case_trainer(nnUNetTrainerUAMT, tmp_path, monkeypatch)


def test_ema_steps_with_the_epoch_like_dhc(trainer):
    trainer.on_train_epoch_start()
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(0)))
    for key, value in trainer.network.state_dict().items():  # epoch 0: alpha = 0, the teacher copies the student
        assert torch.equal(trainer.teacher.state_dict()[key], value), key
    trainer.current_epoch = 3
    before = {k: v.clone() for k, v in trainer.teacher.named_parameters()}
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(1)))
    student = dict(trainer.network.named_parameters())
    for name, old in before.items():  # alpha = min(1 - 1/4, 0.99) = 0.75
        assert torch.allclose(trainer.teacher.get_parameter(name), 0.75 * old + 0.25 * student[name], atol=1e-6)


def test_weight_ramps_per_epoch_like_dhc(trainer):
    trainer.num_epochs = 10
    trainer.current_epoch = 0
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * math.exp(-5))
    trainer.current_epoch = 4
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * sigmoid_rampup(3, 10))


def test_train_step_logs_and_teacher_survives_a_checkpoint(trainer, tmp_path, monkeypatch):
    trainer.on_train_epoch_start()
    trainer.current_epoch = 2
    outputs = [trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(s))) for s in range(2)]
    assert set(outputs[0]) == {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight",
                               "pseudo_label_confidence", "fraction_above_threshold", "uamt_threshold",
                               "uamt_certain_fraction", "uamt_mean_uncertainty"}
    assert all(math.isfinite(float(v)) for v in outputs[1].values())
    assert outputs[0]["uamt_threshold"] == pytest.approx(uncertainty_threshold(2, trainer.num_epochs))
    assert 0.0 <= outputs[0]["uamt_certain_fraction"] <= 1.0 and trainer.global_iteration == 2
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)  # nnU-Net's checkpoint file, as --c reads it
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(fresh.teacher.state_dict()[key], value), key
    assert fresh.global_iteration == 2
