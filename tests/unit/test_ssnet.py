"""SS-Net (docs/methods/ssnet.md): the Dice with background, the VAT term, the class-memory contrastive loss and
the memory update against transcriptions of DHC's ``train_ssnet.py``, their properties (DHC's quirks included), and
nnUNetTrainerSSNet on the tiny CPU trainer (logged keys, memory and heads in the checkpoint)."""

from __future__ import annotations

import contextlib
import math

import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from dhc_zoo_checks import reload_from_checkpoint
from torch import nn

from nnssl.losses.ssnet import (
    FeatureMemory,
    VirtualAdversarialDice,
    class_memory_contrastive_loss,
    correct_foreground,
    soft_dice_with_background,
    ssnet_contrastive_terms,
)
from nnssl.networks.ssnet_heads import SSNetHeads
from nnssl.training.base import UnsupportedByTrainer
from nnssl_trainers.ssnet import nnUNetTrainerSSNet

K = 3


def _dhc_dice_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # utils/loss.py SoftDiceLoss(smooth=1e-8, do_bg=True), batch_dice, y soft/one-hot of x's shape:
    # tp = x*y, fp = x*(1-y), fn = (1-x)*y summed over [0, 2, ...];
    # dc = (2tp + s) / (2tp + fp + fn + s + 1e-8); return -dc.mean()
    axes = [0, *range(2, x.ndim)]
    tp, fp, fn = (x * y).sum(axes), (x * (1 - y)).sum(axes), ((1 - x) * y).sum(axes)
    return -((2 * tp + 1e-8) / (2 * tp + fp + fn + 1e-8 + 1e-8)).mean()


def test_dice_with_background_is_dhc_dice_loss_plus_one():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, K, 5, 6, generator=g).softmax(1), torch.randn(2, K, 5, 6, generator=g).softmax(1)
    assert soft_dice_with_background(p, q).item() == pytest.approx(_dhc_dice_loss(p, q).item() + 1, rel=1e-6)
    onehot = F.one_hot(q.argmax(1), K).movedim(-1, 1).float()
    assert soft_dice_with_background(onehot, onehot).item() == pytest.approx(0.0, abs=1e-6)


class _Net(nn.Module):
    """A tiny segmentation net with batch norm, returning a deep-supervision style list."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, K, 1))

    def forward(self, x):
        return [self.body(x), self.body(x)[:, :, ::2, ::2]]


def _dhc_vat(model, x, xi=10.0, epi=10.0):
    # train_ssnet.py VAT3d.forward with model(x)[0], _l2_normalize and _disable_tracking_bn_stats (ip = 1)
    def l2(d):
        return d / (torch.norm(d.view(d.shape[0], -1, *(1 for _ in range(d.dim() - 2))), dim=1, keepdim=True) + 1e-8)

    @contextlib.contextmanager
    def disable(m):
        def switch(mod):
            if hasattr(mod, "track_running_stats"):
                mod.track_running_stats ^= True
        m.apply(switch)
        yield
        m.apply(switch)

    with torch.no_grad():
        pred = F.softmax(model(x)[0], dim=1)
    d = l2(torch.rand(x.shape).sub(0.5))
    with disable(model):
        d.requires_grad_(True)
        adv_distance = _dhc_dice_loss(F.softmax(model(x + xi * d)[0], dim=1), pred)
        adv_distance.backward()
        d = l2(d.grad)
        model.zero_grad()
        return _dhc_dice_loss(F.softmax(model(x + epi * d)[0], dim=1), pred)


def test_vat_matches_dhc_transcription_and_freezes_batchnorm_statistics():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(4, 1, 8, 8)
    torch.manual_seed(7)
    ours = VirtualAdversarialDice()(net, x)
    with torch.no_grad():
        clean = net(x)[0]
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    VirtualAdversarialDice()(net, x, clean_logits=clean)  # the perturbed forwards never update running stats
    assert stats and all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())
    assert all(p.grad is None for p in net.parameters())  # the power iteration leaves no parameter gradient
    torch.manual_seed(7)
    expected = _dhc_vat(net, x)
    assert ours.item() == pytest.approx(expected.item() + 1, rel=1e-5, abs=1e-6)
    ours.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def _dhc_contrastive(heads, features, class_labels, num_classes, memory):
    # train_ssnet.py contrastive_class_to_class_learned_memory, line by line
    loss = 0
    for c in range(num_classes):
        features_c = features[class_labels == c, :]
        memory_c = memory[c]
        selector, selector_memory = heads.selectors[c], heads.memory_selectors[c]
        if memory_c is not None and features_c.shape[0] > 1 and memory_c.shape[0] > 1:
            memory_c = F.normalize(memory_c, dim=1)  # DHC normalises memory_c in place: the selector sees it
            features_c_norm = F.normalize(features_c, dim=1)
            distances = 1 - torch.mm(features_c_norm, memory_c.transpose(1, 0))
            w = torch.sigmoid(selector(features_c.detach()))
            distances = distances * ((w.shape[0] / w.sum(dim=0)) * w).repeat(1, distances.shape[1])
            wm = torch.sigmoid(selector_memory(memory_c)).permute(1, 0)
            distances = distances * ((wm.shape[0] / wm.sum(dim=0)) * wm).repeat(distances.shape[0], 1)
            loss = loss + distances.mean()
    return loss / num_classes


def test_contrastive_loss_matches_dhc_and_memory_weights_are_one():
    torch.manual_seed(1)
    heads = SSNetHeads(4, K)
    features = torch.randn(40, 8, requires_grad=True)
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 10)
    memory = [None, torch.randn(5, 8), torch.randn(1, 8)]  # class 2: one entry only -> skipped
    ours = class_memory_contrastive_loss(features, labels, memory, heads.selectors, heads.memory_selectors)
    expected = _dhc_contrastive(heads, features, labels, K, memory)
    assert ours.item() == pytest.approx(float(expected.detach()), rel=1e-5)
    ours.backward()
    # DHC's memory weights are normalised over an axis of size 1: they are all 1 and their selector learns nothing
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in heads.memory_selectors[1].parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in heads.selectors[1].parameters())
    assert features.grad[:10].abs().max() == 0 and features.grad[10:30].abs().max() > 0


def test_contrastive_loss_without_memory_is_zero_and_finite():
    heads = SSNetHeads(4, K)
    loss = class_memory_contrastive_loss(torch.randn(6, 8), torch.zeros(6, dtype=torch.long), [None] * K,
                                         heads.selectors, heads.memory_selectors)
    assert loss.item() == 0.0


def test_memory_keeps_the_lowest_ranked_features_and_never_background():
    torch.manual_seed(2)
    memory = FeatureMemory(K, elements_per_class=4)
    features = torch.randn(10, 2)
    selectors = [lambda f: f[:, :1]] * K  # rank = sigmoid(first coordinate)
    labels = torch.tensor([1] * 7 + [2] * 3)
    memory.update(features, labels, selectors)
    order = torch.argsort(features[:7, 0])[:4]  # DHC: torch.sort ascending, first elements_per_class
    assert torch.equal(memory.memory[1], features[:7][order]) and torch.equal(memory.memory[2], features[7:])
    assert memory.memory[0] is None and memory.filled() == 2
    memory.update(features[:2], torch.tensor([2, 2]), selectors)  # replaced, not appended; class 1 kept
    assert torch.equal(memory.memory[2], features[:2]) and memory.memory[1].shape == (4, 2)
    prediction, target = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1])
    assert correct_foreground(prediction, target).tolist() == [False, True, False, True]
    restored = FeatureMemory(K, 4)
    restored.load_state_dict(memory.state_dict())
    assert restored.memory[0] is None and torch.equal(restored.memory[1], memory.memory[1])


@pytest.mark.parametrize("kwargs", [{"xi": 0.0}, {"epsilon": -1.0}, {"iterations": 0}])
def test_vat_arguments_validated(kwargs):
    with pytest.raises(ValueError):
        VirtualAdversarialDice(**kwargs)


def test_contrastive_terms_of_a_step_and_bf16_autocast():
    torch.manual_seed(3)
    heads = SSNetHeads(4, K)
    memory = FeatureMemory(K, 8)
    features, logits = torch.randn(4, 4, 6, 6), torch.randn(4, K, 6, 6)
    labels = logits[:2].argmax(1)  # every labeled voxel predicted correctly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_l, loss_u = ssnet_contrastive_terms(heads, memory, features, logits, labels, 2)
    assert memory.memory[0] is None and memory.filled() >= 1 and heads.training
    assert all(m.shape[0] <= 8 for m in memory.memory if m is not None)
    assert torch.isfinite(loss_l) and torch.isfinite(loss_u) and loss_l.dtype == torch.float32
    assert float(loss_l.detach()) > 0 and float(loss_u.detach()) >= 0


# ---------------------------------------------------------------------------------------------- the trainer
def test_train_step_logs_and_memory_survives_a_checkpoint(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerSSNet, tmp_path, monkeypatch)
    assert set(trainer.extra_optimizers) == {"ssnet_heads"}
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(s))) for s in range(3)]
    assert set(outputs[0]) == {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight",
                               "pseudo_label_confidence", "fraction_above_threshold", "ssnet_loss_vat",
                               "ssnet_loss_contrastive_labeled", "ssnet_loss_contrastive_unlabeled",
                               "ssnet_memory_classes"}
    last = outputs[-1]
    assert all(math.isfinite(float(v)) for v in last.values())
    assert last["loss_unsupervised"] == pytest.approx(last["ssnet_loss_vat"] + 0.1 * (
        last["ssnet_loss_contrastive_labeled"] + last["ssnet_loss_contrastive_unlabeled"]), rel=1e-5)
    assert 0.0 <= last["ssnet_loss_vat"] <= 1.0
    trainer.memory.memory[1] = torch.randn(3, 8)  # feature dim 2 x 4 decoder channels of the tiny plans
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)  # nnU-Net's checkpoint file, as --c reads it
    assert torch.equal(fresh.memory.memory[1], trainer.memory.memory[1]) and fresh.memory.memory[0] is None
    heads = trainer.extra_networks["ssnet_heads"].state_dict()
    assert all(torch.equal(fresh.extra_networks["ssnet_heads"].state_dict()[k], v) for k, v in heads.items())


def test_ddp_is_refused(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerSSNet, tmp_path, monkeypatch)
    trainer.is_ddp = True  # as nnU-Net sets it under torchrun
    with pytest.raises(UnsupportedByTrainer, match="does not support DDP"):
        trainer.build_extra_networks()


def test_vat_under_bf16_autocast():
    torch.manual_seed(4)
    net, x = _Net(), torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = VirtualAdversarialDice()(net, x)
    loss.backward()
    assert loss.dtype == torch.float32 and 0 <= loss.item() <= 1
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
