"""URPC (docs/methods/urpc.md): the rectified pyramid consistency against a transcription of DHC's ``train_urpc.py``
(values and gradients), its properties, the upsampling of nnU-Net's deep-supervision outputs, and
nnUNetTrainerURPC on the tiny CPU trainer."""

from __future__ import annotations

import math

import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from dhc_zoo_checks import reload_from_checkpoint
from torch import nn

from nnssl.losses.urpc import upsample_logits, urpc_consistency
from nnssl.training.base import UnsupportedByTrainer
from nnssl_trainers.uamt import nnUNetTrainerUAMT
from nnssl_trainers.urpc import nnUNetTrainerURPC

K = 3


def _dhc_urpc(outputs: list[torch.Tensor]) -> torch.Tensor:
    # train_urpc.py on the unlabeled half: preds = (soft1 + soft2 + soft3 + soft4) / 4;
    # variance_i = sum(kl_distance(log(soft_i), preds), dim=1, keepdim=True); exp_variance_i = exp(-variance_i);
    # loss_i = mean((preds - soft_i)**2 * exp_variance_i) / (mean(exp_variance_i) + 1e-8) + mean(variance_i)
    kl_distance = nn.KLDivLoss(reduction="none")
    soft = [torch.softmax(o, dim=1) for o in outputs]
    preds = sum(soft) / len(soft)
    losses = []
    for s in soft:
        variance = torch.sum(kl_distance(torch.log(s), preds), dim=1, keepdim=True)
        exp_variance = torch.exp(-variance)
        losses.append(torch.mean((preds - s) ** 2 * exp_variance) / (torch.mean(exp_variance) + 1e-8)
                      + torch.mean(variance))
    return sum(losses) / len(losses)


def test_matches_dhc_transcription_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = [(2 * torch.randn(2, K, 4, 5, 6, generator=g)).requires_grad_() for _ in range(4)]
    ours = urpc_consistency(logits)
    ours_grads = torch.autograd.grad(ours, logits)
    expected = _dhc_urpc(logits)
    expected_grads = torch.autograd.grad(expected, logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(ours_grads, expected_grads):  # P is not detached: gradients through the mean as in DHC
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_zero_when_all_levels_agree_and_positive_otherwise():
    z = torch.randn(2, K, 6, 6)
    assert urpc_consistency([z, z.clone(), z + 3.0]).abs().item() < 1e-7  # same softmax (shift invariance)
    assert urpc_consistency([z, -z]).item() > 0


def test_rectification_weight_is_exp_minus_kl():
    # two levels, one voxel: hand-computed L = mean_i [ mean_c (P - p_i)^2 e^-v_i / e^-v_i + v_i ]
    p1, p2 = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])
    mean = (p1 + p2) / 2
    expected = sum(float(((mean - p) ** 2).mean() + (mean * (mean / p).log()).sum()) for p in (p1, p2)) / 2
    loss = urpc_consistency([p1.log().reshape(1, K, 1, 1), p2.log().reshape(1, K, 1, 1)])
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_bf16_autocast_and_arguments():
    logits = [torch.randn(1, K, 4, 4, dtype=torch.bfloat16) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = urpc_consistency(logits)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least two"):
        urpc_consistency(logits[:1])
    with pytest.raises(ValueError, match="share one shape"):
        urpc_consistency([logits[0], logits[1][:, :, :2]])


def test_upsampling_of_deep_supervision_outputs():
    outputs = [torch.randn(2, K, 8, 8, 8), torch.randn(2, K, 4, 4, 4), torch.randn(2, K, 2, 2, 2)]
    up = upsample_logits(outputs)
    assert up[0] is outputs[0] and all(u.shape == (2, K, 8, 8, 8) for u in up)
    dhc = nn.Upsample(scale_factor=2, mode="trilinear")  # DHC's UnetDsv3 upsampling of dsv2
    assert torch.allclose(up[1], dhc(outputs[1]), atol=1e-6)
    low = torch.randn(1, K, 4, 4)
    anisotropic = upsample_logits([torch.randn(1, K, 4, 8), low])
    assert torch.allclose(anisotropic[1], F.interpolate(low, size=(4, 8), mode="bilinear"))

# ---------------------------------------------------------------------------------------------- the trainer
def test_train_step_uses_the_deep_supervision_pyramid_and_checkpoint(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerURPC, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(s))) for s in range(2)]
    assert set(outputs[0]) == {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight",
                               "pseudo_label_confidence", "fraction_above_threshold", "urpc_pyramid_levels"}
    assert outputs[0]["urpc_pyramid_levels"] == 3.0  # the tiny plans have three deep-supervision outputs
    assert all(math.isfinite(float(v)) for o in outputs for v in o.values())
    assert outputs[0]["loss_unsupervised"] > 0
    trainer.num_epochs, trainer.current_epoch = 10, 4
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * math.exp(-5 * (1 - 3 / 10) ** 2))
    assert reload_from_checkpoint(trainer, tmp_path, monkeypatch).global_iteration == 2


def test_refused_without_deep_supervision(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerURPC, tmp_path, monkeypatch)
    trainer.enable_deep_supervision = False  # as a subclass switching it off in __init__ would
    with pytest.raises(UnsupportedByTrainer, match="needs deep supervision"):
        trainer.build_extra_networks()



@pytest.mark.parametrize("trainer_class", [nnUNetTrainerURPC, nnUNetTrainerUAMT])
def test_one_host_synchronisation_per_step(trainer_class, tmp_path, monkeypatch):
    """URPC and UA-MT (whose test file this would repeat) keep the base's single host synchronisation."""
    from test_training_base import HostSyncCounter

    trainer = tiny.two_case_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    batch = tiny.tiny_batch(torch.Generator().manual_seed(0))
    counter = HostSyncCounter(monkeypatch)
    trainer.train_step(batch)
    monkeypatch.undo()
    assert counter.calls == 1
