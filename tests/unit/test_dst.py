"""DST on DHC's CPS base (nnssl/losses/dst.py, nnssl/networks/dst_heads.py, nnssl_trainers/dst.py;
docs/methods/dst.md): the warm-start gradient reversal, the worst-case estimation loss against a numpy transcription of
DHC ``train_dst.py`` / ``vnet_dst.py``, where gradients flow, and the trainer on the tiny 2D dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
from dhc_zoo_checks import np_softmax, reload_from_checkpoint, train_steps
from torch import nn

from nnssl.losses.dst import (
    gradient_reversal,
    pseudo_head_labels,
    warm_start_grl_coefficient,
    worst_case_estimation_loss,
)
from nnssl.networks.dst_heads import EncoderSkipsTap, encoder_free_decoder
from nnssl_trainers.dst import nnUNetTrainerDST

K = 3
SPATIAL = (4, 5)


@pytest.mark.parametrize("iteration", [0, 1, 250, 500, 5000])
def test_grl_coefficient_is_dhc_warm_start_schedule(iteration):
    # WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=0.1, max_iters=500).forward
    expected = 2.0 * (0.1 - 0.0) / (1.0 + np.exp(-1.0 * iteration / 500)) - (0.1 - 0.0) + 0.0
    assert warm_start_grl_coefficient(iteration) == pytest.approx(expected, abs=1e-15)
    assert 0.0 <= warm_start_grl_coefficient(iteration) < 0.1
    with pytest.raises(ValueError):
        warm_start_grl_coefficient(-1)


def test_gradient_reversal_is_identity_forward_and_scaled_negation_backward():
    x = torch.randn(2, 3, requires_grad=True)
    y = gradient_reversal(x, 0.05)
    assert torch.equal(y, x)
    (y * torch.arange(6.0).view(2, 3)).sum().backward()
    assert torch.allclose(x.grad, -0.05 * torch.arange(6.0).view(2, 3))


def test_worst_case_loss_matches_dhc_transcription():
    g = torch.Generator().manual_seed(0)
    main_l, worst_l, main_u, worst_u = (torch.randn(2, K, *SPATIAL, generator=g) * 2 for _ in range(4))
    loss = worst_case_estimation_loss(main_l, worst_l, main_u, worst_u)
    ml, wl, mu, wu = (t.double().numpy() for t in (main_l, worst_l, main_u, worst_u))
    # WorstCaseEstimationLoss: 2 * cross_entropy(y_l_adv, argmax y_l) + nll_loss(shift_log(1 - softmax(y_u_adv)), ...)
    loss_l = -np.take_along_axis(np.log(np_softmax(wl)), ml.argmax(1)[:, None], 1).mean()
    shift_log = np.log(np.minimum(1.0 - np_softmax(wu) + 1e-6, 1.0))
    loss_u = -np.take_along_axis(shift_log, mu.argmax(1)[:, None], 1).mean()
    assert loss.item() == pytest.approx(2 * loss_l + loss_u, rel=1e-5)


def test_worst_case_loss_is_small_when_the_worst_head_agrees_on_labeled_and_avoids_unlabeled_targets():
    labels = torch.randint(0, K, (2, *SPATIAL), generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(labels, K).movedim(-1, 1).float()
    agree, avoid = one_hot * 50, (1 - one_hot) * 50  # labeled: same argmax; unlabeled: p[target] ~ 0
    assert worst_case_estimation_loss(one_hot * 5, agree, one_hot * 5, avoid).item() < 1e-5
    # predicting the unlabeled target with certainty: -log(1e-6) per voxel
    assert worst_case_estimation_loss(one_hot, agree, one_hot, agree).item() == pytest.approx(-math.log(1e-6), 1e-3)


def test_gradients_worst_head_minimises_encoder_gets_reversed_main_head_detached():
    torch.manual_seed(2)
    encoder, worst_head = nn.Conv2d(1, 4, 1), nn.Conv2d(4, K, 1)
    x = torch.randn(4, 1, *SPATIAL)
    main = torch.randn(4, K, *SPATIAL, requires_grad=True)

    def loss_and_grads(coeff: float | None):
        encoder.zero_grad()
        worst_head.zero_grad()
        features = encoder(x)
        features = features if coeff is None else gradient_reversal(features, coeff)
        worst = worst_head(features)
        worst_case_estimation_loss(main[:2], worst[:2], main[2:], worst[2:]).backward()
        return encoder.weight.grad.clone(), worst_head.weight.grad.clone()

    plain_enc, plain_head = loss_and_grads(None)
    rev_enc, rev_head = loss_and_grads(0.1)
    assert torch.allclose(rev_head, plain_head)  # the head itself minimises the loss
    assert torch.allclose(rev_enc, -0.1 * plain_enc, atol=1e-7)  # the encoder maximises it, scaled by λ
    assert main.grad is None  # the main head's argmax is only a target


def test_pseudo_head_labels_use_a_strict_threshold_and_bf16_autocast_works():
    z = torch.zeros(1, 2, 3)
    z[0, 0, 0] = math.log(0.95 / 0.05)  # p ≈ 0.95 at voxel 0, 0.5 elsewhere
    target, mask = pseudo_head_labels(z, threshold=float(torch.softmax(z, 1)[0, 0, 0]))  # p == threshold: not kept
    assert target.tolist() == [[0, 0, 0]] and mask.tolist() == [[0.0, 0.0, 0.0]]
    main = torch.randn(4, K, *SPATIAL)
    worst = torch.randn(4, K, *SPATIAL, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = gradient_reversal(worst * 2.0, 0.1)
        loss = worst_case_estimation_loss(main[:2], w[:2], main[2:], w[2:])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(worst.grad).all()


def test_heads_decode_the_tapped_encoder_skips(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerDST, tmp_path, monkeypatch)
    head = encoder_free_decoder(trainer.new_network(deep_supervision=False))
    assert not hasattr(head, "encoder") and head.deep_supervision is False
    tap = EncoderSkipsTap(trainer.network)
    x = torch.randn(2, 1, tiny.PATCH, tiny.PATCH)
    with tap.capture():
        out = trainer.network(x)
    skips = tap.take()
    assert torch.equal(skips[-1], trainer.network.encoder(x)[-1])
    assert head(skips).shape == out[0].shape
    trainer.network(x)  # outside capture(): nothing recorded
    with pytest.raises(RuntimeError):
        tap.take()
    tap.remove()
    with pytest.raises(TypeError):
        EncoderSkipsTap(nn.Conv2d(1, 1, 1))


def test_trainer_steps_log_freeze_pseudo_heads_and_restore(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerDST, tmp_path, monkeypatch)
    assert trainer.second_network == "xavier"
    assert set(trainer.extra_optimizers) == {"network2", "worst_head_a", "worst_head_b"}
    pseudo_before = {k: v.clone() for k, v in trainer.extra_networks["pseudo_head_a"].state_dict().items()}
    worst_before = {k: v.clone() for k, v in trainer.extra_networks["worst_head_b"].state_dict().items()}
    outputs = train_steps(trainer, steps=3)
    assert outputs[0]["dst_grl_coefficient"] == 0.0 and outputs[2]["dst_grl_coefficient"] > 0.0
    for out in outputs:
        assert out["loss_unsupervised"] == pytest.approx(out["dst_loss_cps"] + out["dst_loss_worst_case"], rel=1e-5)
        assert {"dst_mask_fraction_a", "dst_mask_fraction_b"} <= set(out)
    pseudo_head = trainer.extra_networks["pseudo_head_a"]
    assert all(torch.equal(v, pseudo_before[k]) for k, v in pseudo_head.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in pseudo_head.parameters())
    worst_after = trainer.extra_networks["worst_head_b"].state_dict()
    assert any(not torch.equal(v, worst_before[k]) for k, v in worst_after.items())
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)
    assert fresh.global_iteration == 3 and fresh.grl_coefficient() == pytest.approx(warm_start_grl_coefficient(3))
