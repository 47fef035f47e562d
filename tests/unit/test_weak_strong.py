"""Weak-to-strong loss (nnssl.losses.weak_strong) and nnUNetTrainerWeakStrongMT with its ablation variants."""

from __future__ import annotations

import math

import pytest
import tiny_trainer as tiny
import torch
from dhc_zoo_checks import COMMON_KEYS, reload_from_checkpoint
from test_training_base import HostSyncCounter

from nnssl.debiasing import DistributionAwareWeighting
from nnssl.losses.weak_strong import balanced_voxel_weights, weak_pseudo_labels, weak_to_strong_loss


def test_pseudo_labels_and_the_confidence_mask():
    logits = torch.tensor([[[5.0, 0.0]], [[0.0, 0.2]], [[0.0, 0.0]]]).permute(1, 0, 2)  # (1, K=3, 2 voxels)
    pseudo, kept = weak_pseudo_labels(logits, 0.9)
    assert pseudo.tolist() == [[0, 1]] and kept.tolist() == [[1.0, 0.0]]
    assert weak_pseudo_labels(logits, 0.0)[1].tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="threshold"):
        weak_pseudo_labels(logits, 1.5)


def test_loss_is_zero_without_kept_voxels_and_a_mean_over_all_voxels():
    strong = torch.randn(2, 3, 4, 4, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 4, 4))
    assert weak_to_strong_loss(strong, pseudo, torch.zeros(2, 4, 4)) == 0
    ce = torch.nn.functional.cross_entropy(strong, pseudo, reduction="none")
    half = torch.zeros(2, 4, 4)
    half[0] = 1
    assert torch.allclose(weak_to_strong_loss(strong, pseudo, half), ce[0].sum() / ce.numel())  # not / Σ m


def test_gradient_reaches_only_the_strong_logits():
    weak = torch.randn(2, 3, 4, 4, requires_grad=True)
    strong = torch.randn(2, 3, 4, 4, requires_grad=True)
    pseudo, kept = weak_pseudo_labels(weak, 0.0)
    weak_to_strong_loss(strong, pseudo, kept * torch.ones_like(kept, requires_grad=True)).backward()
    assert weak.grad is None and strong.grad is not None and strong.grad.abs().sum() > 0


def test_balanced_weights_keep_the_frequent_class_at_one_and_raise_the_rare_ones():
    pseudo = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 2]])
    assert torch.equal(balanced_voxel_weights(pseudo, None), torch.ones(1, 9))
    weighting = DistributionAwareWeighting(torch.tensor([60, 20, 10]), momentum=0.0)  # the batch alone decides
    weights = balanced_voxel_weights(pseudo, weighting)
    assert torch.all(weights[pseudo == 0] == 1) and torch.all(weights[pseudo == 2] == 1 + 3)  # DistDW: 0 ... K
    assert 1 < float(weights[0, 6]) < 4


# ------------------------------------------------------------------------------------------------ the trainers
def _trainer(cls_name, tmp_path, monkeypatch):
    import nnssl_trainers.weak_strong as ws

    return tiny.two_case_trainer(getattr(ws, cls_name), tmp_path, monkeypatch)


@pytest.mark.parametrize("name", ["nnUNetTrainerWeakStrongMT", "nnUNetTrainerWeakStrongMT_noTeacher",
                                  "nnUNetTrainerWeakStrongMT_noStrongIntensity", "nnUNetTrainerWeakStrongMT_noCutMix",
                                  "nnUNetTrainerWeakStrongMT_noThreshold", "nnUNetTrainerWeakStrongMT_noClassBalance",
                                  "nnUNetTrainerWeakStrongMT_unlabeledBatch2x"])
def test_each_variant_steps_with_one_host_sync_and_the_common_keys(name, tmp_path, monkeypatch):
    trainer = _trainer(name, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    n_unlabeled = trainer.unlabeled_batch_size_per_rank
    assert n_unlabeled == trainer.batch_size * (2 if name.endswith("unlabeledBatch2x") else 1)
    for step in range(2):
        batch = tiny.tiny_batch(torch.Generator().manual_seed(step), n_labeled=trainer.batch_size,
                                n_unlabeled=n_unlabeled)
        with pytest.MonkeyPatch.context() as patch:
            counter = HostSyncCounter(patch)
            out = trainer.train_step(batch)
        assert counter.calls == 1, f"{name}: {counter.calls} host synchronisations"
        assert COMMON_KEYS - {"agreement"} <= set(out) and all(math.isfinite(float(v)) for v in out.values()), out
        assert ("ws_class_weight_max" in out) == trainer.class_balance
    assert ("teacher" in trainer.extra_networks) == trainer.pseudo_labels_from_teacher
    if name.endswith("noThreshold"):
        assert out["fraction_above_threshold"] == 1.0


def test_teacher_follows_the_student_and_class_weights_survive_a_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer("nnUNetTrainerWeakStrongMT", tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    initial = trainer.class_weighting.weights.clone()
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(0)))
    # Mean Teacher's decay min(1 - 1/(t+1), 0.99) is 0 at the first step: the teacher becomes the student
    student = dict(trainer.network.named_parameters())
    assert all(torch.equal(p, student[k]) for k, p in trainer.teacher.named_parameters())
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(1)))
    student = dict(trainer.network.named_parameters())
    assert not all(torch.equal(p, student[k]) for k, p in trainer.teacher.named_parameters())  # 0.5 / 0.5 now
    assert not torch.equal(trainer.class_weighting.weights, initial)  # one DistDW step on the pseudo-labels
    fresh = reload_from_checkpoint(trainer, tmp_path, monkeypatch)
    assert torch.equal(fresh.class_weighting.weights, trainer.class_weighting.weights)


def test_the_unlabeled_batch_factor_yields_to_an_explicit_size_and_must_be_a_positive_integer(tmp_path, monkeypatch):
    import nnssl_trainers.weak_strong as ws

    monkeypatch.setattr(ws.nnUNetTrainerWeakStrongMT_unlabeledBatch2x, "unlabeled_batch_size", 3)
    assert _trainer("nnUNetTrainerWeakStrongMT_unlabeledBatch2x", tmp_path / "a", monkeypatch
                    ).unlabeled_batch_size_per_rank == 3
    monkeypatch.setattr(ws.nnUNetTrainerWeakStrongMT_unlabeledBatch2x, "unlabeled_batch_size", None)
    monkeypatch.setattr(ws.nnUNetTrainerWeakStrongMT_unlabeledBatch2x, "unlabeled_batch_factor", 0)
    with pytest.raises(ValueError, match="unlabeled_batch_factor"):
        _trainer("nnUNetTrainerWeakStrongMT_unlabeledBatch2x", tmp_path / "b", monkeypatch)
