"""Unit tests of nnUNetTrainerDHC on a tiny hand-made 2D preprocessed dataset (CPU, no nnU-Net CLI): DistDW from
the labeled training cases only, DiffDW through the trainer's update path, the NaN guards of docs/methods/dhc.md, the
weighted deep-supervised DC+CE against nnU-Net's own loss, the per-epoch ramp and the checkpoint state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnssl.class_weight_diagnostics import plot_class_weights, record_epoch, save_class_weights
from nnssl.debiasing import distribution_aware_weights
from nnssl.losses.weighted_dc_ce import ClassWeightedDCandCELoss
from nnssl.ramps import sigmoid_rampup
from nnssl.training.base import UnsupportedByTrainer
from nnssl_trainers.dhc import DISTDW_LOG, nnUNetTrainerDHC

K = tiny.K
PATCH = tiny.PATCH
DATASET_JSON = tiny.DATASET_JSON
_plans = tiny.tiny_plans
_seg_with_counts = tiny.seg_with_counts


def _make_trainer(tmp_path, monkeypatch, train_segs, val_segs=None) -> nnUNetTrainerDHC:
    return tiny.make_trainer(nnUNetTrainerDHC, tmp_path, monkeypatch, train_segs, val_segs)


@pytest.fixture
def trainer(tmp_path, monkeypatch) -> nnUNetTrainerDHC:
    # training cases: 'tiny' (2) rarer than 'big' (1); the validation case is mostly 'tiny' and must be ignored
    train = {"case_a": _seg_with_counts({0: 80, 1: 40, 2: 4}), "case_b": _seg_with_counts({0: 90, 1: 30, 2: 2})}
    val = {"case_c": _seg_with_counts({0: 8, 2: 100})}
    return _make_trainer(tmp_path, monkeypatch, train, val)


def _batch(generator: torch.Generator) -> dict:
    labels = torch.randint(0, K, (2, 1, PATCH, PATCH), generator=generator).float()
    return {"data": torch.randn(2, 1, PATCH, PATCH, generator=generator),
            "target": [labels, labels[:, :, ::2, ::2], labels[:, :, ::4, ::4]], "keys": ["a", "b"],
            "unlabeled_data": torch.randn(2, 1, PATCH, PATCH, generator=generator), "unlabeled_keys": ["u", "v"]}


def _one_hot_logits(labels: torch.Tensor, margin: float = 10.0) -> torch.Tensor:
    return torch.movedim(F.one_hot(labels, K).float(), -1, 1) * margin


def test_two_kaiming_networks_with_different_draws(trainer):
    a, b = trainer.network.state_dict(), trainer.network2.state_dict()
    assert a.keys() == b.keys()
    conv = [k for k in a if k.endswith("weight") and a[k].ndim == 4]
    assert conv and all(not torch.equal(a[k], b[k]) for k in conv)
    assert set(trainer.extra_optimizers) == {"network2"}
    assert trainer.extra_optimizers["network2"].param_groups[0]["params"][0] is next(trainer.network2.parameters())


def test_distdw_initialised_from_labeled_training_cases_of_the_fold_only(trainer):
    weights = trainer.class_weights.distribution.weights
    # case_c (validation, mostly 'tiny') is not counted; each case has 8 x 16 = 128 voxels
    assert trainer.class_weights.labeled_class_counts.tolist() == [2 * 128 - 70 - 6, 40 + 30, 4 + 2]
    assert torch.allclose(weights, distribution_aware_weights(torch.tensor([180.0, 70.0, 6.0])))
    assert weights[0] == 0 and weights[2] == pytest.approx(K) and 0 < weights[1] < weights[2]


def test_negative_labels_count_as_background(tmp_path, monkeypatch):
    seg = _seg_with_counts({0: 100, 1: 20, 2: 8})
    seg[seg == 0] = -1  # nnU-Net marks voxels outside the nonzero mask with -1
    trainer = _make_trainer(tmp_path, monkeypatch, {"case_a": seg})
    _ = trainer.class_weights.distribution
    assert trainer.class_weights.labeled_class_counts.tolist() == [100, 20, 8]


def test_distdw_update_path_gives_rarer_pseudo_label_classes_larger_weights(trainer):
    # B's unlabeled argmax: class 1 rare (8 voxels), class 2 frequent (128): the opposite of the labeled data
    pseudo = torch.zeros(2, PATCH, PATCH, dtype=torch.long)
    pseudo[0, :4, :] = 2
    pseudo[1, :4, :] = 2
    pseudo[0, 8, :8] = 1
    logits_b = _one_hot_logits(pseudo)
    labels = torch.randint(0, K, (2, 1, PATCH, PATCH), generator=torch.Generator().manual_seed(0))
    logits_a = _one_hot_logits(labels[:, 0])
    before = trainer.class_weights.distribution.weights.clone()
    assert before[2] > before[1]
    for _ in range(600):  # momentum 0.99: the labeled initialisation fades out
        _, weights_b = trainer.class_weights.update(logits_a, labels, logits_b)
    current = distribution_aware_weights(torch.tensor([512.0 - 136, 8.0, 128.0]))
    assert torch.allclose(weights_b, 0.99 ** 600 * before + (1 - 0.99 ** 600) * current, atol=1e-4)
    assert weights_b[1] > weights_b[2] > weights_b[0]


def test_diffdw_class_with_stagnating_dice_gains_weight(trainer):
    """Class 1's Dice rises steadily; class 2's Dice is higher but stagnates (oscillates on a plateau), so its
    unlearn/learn ratio grows: DiffDW ends up weighting class 2 above class 1 although 1 - d is smaller."""
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, :5] = 1  # 100 voxels
    target[0, 5:10] = 2  # 100 voxels
    ratios = []
    for step in range(200):
        prediction = target.clone()
        missed_1 = round(60 - 40 * step / 199)  # Dice 0.57 -> 0.89
        missed_2 = 10 if step % 2 else 14  # Dice 0.95 / 0.92
        prediction[0, :5].view(-1)[:missed_1] = 0
        prediction[0, 5:10].view(-1)[:missed_2] = 0
        weights_a, _ = trainer.class_weights.update(_one_hot_logits(prediction), target[:, None],
                                                    _one_hot_logits(target))
        ratios.append(float(weights_a[2] / weights_a[1]))
    assert weights_a.max() == pytest.approx(K) and weights_a.min() >= 0
    # at first (dice_weight ~ 1 - d dominates) the lower-Dice class 1 weighs more; then the plateau of class 2
    # turns into 'unlearning' and class 2 takes the maximum weight K although its Dice stays higher
    assert ratios[0] < 1 and ratios[1] < 1
    assert min(ratios[10:]) > 2 and weights_a[2] == pytest.approx(K)
    state = trainer.class_weights.difficulty.state_dict()
    assert state["cls_unlearn"][2] > 10 * state["cls_unlearn"][1]


def test_uniform_frequencies_give_finite_weights_through_the_trainer(tmp_path, monkeypatch):
    seg = (np.arange(6 * PATCH) % K).astype(np.int8).reshape(1, 1, 6, PATCH)  # exactly 32 voxels per class
    trainer = _make_trainer(tmp_path, monkeypatch, {"case_a": seg})
    assert torch.equal(trainer.class_weights.distribution.weights, torch.full((K,), float(K)))
    uniform = (torch.arange(2 * 15 * PATCH) % K).reshape(2, 15, PATCH)
    weights_a, weights_b = trainer.class_weights.update(_one_hot_logits(uniform), uniform[:, None],
                                                        _one_hot_logits(uniform))
    assert torch.equal(weights_b, torch.full((K,), float(K)))
    assert torch.isfinite(weights_a).all()
    output = trainer.train_step(_batch(torch.Generator().manual_seed(3)))
    assert all(math.isfinite(float(v)) for v in output.values())


def _force_background(network: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in network.decoder.seg_layers:
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))


def test_all_background_pseudo_labels_give_finite_cps_loss_and_gradients(trainer):
    _ = trainer.class_weights.distribution
    assert trainer.class_weights.distribution.weights[0] == 0  # background is the most frequent labeled class
    _force_background(trainer.network)
    _force_background(trainer.network2)
    batch = _batch(torch.Generator().manual_seed(1))
    output = trainer.train_step(batch)
    # every pseudo-label is background and DistDW still gives background weight 0: CE_{w_B}(z^B, y^A) has
    # sum(w) = 0, which is 0/0 = NaN without the guard
    assert trainer.class_weights.distribution.weights[0] == 0
    assert output["agreement"] == 1.0
    assert math.isfinite(output["loss_unsupervised"]) and output["loss_unsupervised"] >= 0
    assert math.isfinite(float(output["loss"]))
    for net in (trainer.network, trainer.network2):
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(p).all() for p in net.parameters())


def test_weighted_deep_supervised_loss_equals_nnunet_loss_with_unit_weights(trainer):
    generator = torch.Generator().manual_seed(2)
    batch = _batch(generator)
    outputs = [torch.randn(2, K, PATCH // s, PATCH // s, generator=generator) for s in (1, 2, 4)]
    ours = trainer.weighted_supervised_loss_of(outputs, batch["target"], torch.ones(K))
    nnunet = trainer.loss(outputs, batch["target"])  # nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss)
    assert ours.item() == pytest.approx(nnunet.item(), rel=1e-5)
    # the lowest-resolution output has deep-supervision weight 0 in nnU-Net, and here too
    changed = outputs[:2] + [outputs[2] * 5]
    again = trainer.weighted_supervised_loss_of(changed, batch["target"], torch.ones(K))
    assert again.item() == pytest.approx(ours.item())


@pytest.mark.parametrize("batch_dice", [True, False])
def test_weighted_dcce_matches_nnunet_and_hand_computed_weights(batch_dice):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, K, 6, 7, generator=generator)
    target = torch.randint(0, K, (2, 1, 6, 7), generator=generator).float()
    loss = ClassWeightedDCandCELoss(batch_dice=batch_dice)
    nnunet = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                            dice_class=MemoryEfficientSoftDiceLoss)
    assert loss(logits, target, None).item() == pytest.approx(nnunet(logits, target).item(), rel=1e-6)
    weights = torch.tensor([0.0, 1.0, 3.0])
    probs = logits.softmax(1)
    onehot = F.one_hot(target[:, 0].long(), K).movedim(-1, 1).float()
    axes = (0, 2, 3) if batch_dice else (2, 3)
    intersect, total = (probs * onehot).sum(axes), (probs + onehot).sum(axes)
    dice = (2 * intersect + 1e-5) / (total + 1e-5)
    expected = F.cross_entropy(logits, target[:, 0].long(), weight=weights) - (dice * weights)[..., 1:].mean()
    assert loss(logits, target, weights).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cps_weight_ramps_per_epoch_like_dhc(trainer):
    trainer.num_epochs = 10
    values = []
    for epoch in range(12):
        trainer.current_epoch = epoch
        values.append(trainer.current_unsupervised_weight())
    assert values[0] == values[1] == pytest.approx(0.1 * math.exp(-5))  # DHC: r(0) before training, r(0) after ep 0
    assert values[4] == pytest.approx(0.1 * sigmoid_rampup(3, 10))
    assert values[11] == pytest.approx(0.1) and values == sorted(values)


def test_train_step_logs_and_class_statistics_survive_a_checkpoint(trainer, tmp_path, monkeypatch):
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(_batch(torch.Generator().manual_seed(s))) for s in range(2)]
    assert set(outputs[0]) == {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight", "agreement",
                               "pseudo_label_confidence", "fraction_above_threshold", "dhc_loss_supervised_a",
                               "dhc_loss_supervised_b"}
    assert outputs[0]["loss_supervised"] == pytest.approx(outputs[0]["dhc_loss_supervised_a"]
                                                          + outputs[0]["dhc_loss_supervised_b"], rel=1e-5)
    assert 0.0 <= outputs[0]["agreement"] <= 1.0 and trainer.global_iteration == 2
    assert 0.0 <= outputs[0]["fraction_above_threshold"] <= 1.0
    assert 1.0 / K <= outputs[0]["pseudo_label_confidence"] <= 1.0  # a max softmax over K classes
    trainer.on_train_epoch_end(outputs)
    distdw_log = trainer.class_weights.log.log[DISTDW_LOG]
    assert len(distdw_log) == 1 and len(distdw_log[0]) == K

    state = trainer.ssl_state_dict()
    fresh = nnUNetTrainerDHC(_plans(), "2d", 0, DATASET_JSON, torch.device("cpu"))
    fresh.initialize()
    fresh.load_ssl_state_dict(state)
    saved, restored = state["extra_state"]["dhc"], fresh.ssl_state_dict()["extra_state"]["dhc"]
    for key, value in saved["diffdw"].items():
        assert torch.equal(restored["diffdw"][key], value), key
    assert torch.equal(restored["distdw"]["weights"], saved["distdw"]["weights"])
    assert torch.equal(restored["labeled_class_counts"], trainer.class_weights.labeled_class_counts)
    assert fresh.class_weights.log.log == trainer.class_weights.log.log
    for key, value in trainer.network2.state_dict().items():
        assert torch.equal(fresh.network2.state_dict()[key], value), key
    # a checkpoint of an earlier nnssl kept the statistics beside extra_state: it loads the same
    legacy = {**state, "dhc": saved, "extra_state": {}}
    older = nnUNetTrainerDHC(_plans(), "2d", 0, DATASET_JSON, torch.device("cpu"))
    older.initialize()
    older.load_ssl_state_dict(legacy)
    assert torch.equal(older.class_weights.distribution.weights, saved["distdw"]["weights"])
    assert older.class_weights.log.log == trainer.class_weights.log.log
    with pytest.raises(RuntimeError, match=r"no state for \['dhc'\]"):
        fresh.load_ssl_state_dict({**state, "extra_state": {}})


def test_class_weight_log_resume_json_and_figure(tmp_path):
    log: dict[str, list[list[float]]] = {}
    record_epoch(log, "distdw", 0, [0.0, 1.0, 3.0])
    record_epoch(log, "distdw", 2, [0.0, 2.0, 3.0])
    record_epoch(log, "distdw", 1, [0.0, 1.5, 3.0])  # a resumed run redoes epoch 1: epoch 2 is dropped
    assert log["distdw"] == [[0.0, 1.0, 3.0], [0.0, 1.5, 3.0]]
    record_epoch(log, "diffdw", 1, [3.0, 1.0, 2.0])
    assert all(math.isnan(v) for v in log["diffdw"][0])
    save_class_weights(log, ["background", "big", "tiny"], tmp_path / "w.json")
    saved = json.loads((tmp_path / "w.json").read_text(encoding="utf-8"))
    assert saved["weights"]["diffdw"][0] == [None, None, None] and saved["class_names"][2] == "tiny"
    plot_class_weights(log, ["background", "big", "tiny"], tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


def test_region_or_ignore_label_datasets_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pp"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    dataset_json = {**DATASET_JSON, "labels": {**DATASET_JSON["labels"], "ignore": 3}}
    with pytest.raises(UnsupportedByTrainer, match="nnUNetTrainerDHC does not support an ignore label .*"
                                                   "DiffDW/DistDW weight plain label classes"):
        nnUNetTrainerDHC(_plans(), "2d", 0, dataset_json, torch.device("cpu"))
