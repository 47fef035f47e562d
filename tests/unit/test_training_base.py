"""The base every SSL trainer builds on (nnssl.training): the template step (loss = L_sup + w L_unsup, one host
synchronisation, EMA after the step, the same logged keys for every method), declared networks and state in the
checkpoint, capability checks with one error, and the worked example trainer of the README."""

from __future__ import annotations

import math

import pytest
import tiny_trainer as tiny
import torch

from nnssl.losses.entropy import softmax_entropy
from nnssl.training.base import UnsupportedByTrainer
from nnssl_trainers.cld import nnUNetTrainerCLD
from nnssl_trainers.cps import nnUNetTrainerCPS
from nnssl_trainers.crest import nnUNetTrainerCReST
from nnssl_trainers.dhc import nnUNetTrainerDHC
from nnssl_trainers.entropy_min import nnUNetTrainerEntropyMin
from nnssl_trainers.guidednet import nnUNetTrainerGuidedNet
from nnssl_trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnssl_trainers.mgcc import nnUNetTrainerMGCC
from nnssl_trainers.simis import nnUNetTrainerSimiS

COMMON_KEYS = {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight", "pseudo_label_confidence",
               "fraction_above_threshold"}


class HostSyncCounter:
    """Counts the tensor -> host reads (``.cpu()``, ``.item()``, ``.tolist()``, ``bool()``/``int()``/``float()`` of a
    tensor) made while it is active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("cpu", "item", "tolist", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.calls += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize(("trainer_class", "extra_keys"), [
    (nnUNetTrainerEntropyMin, set()),
    (nnUNetTrainerMeanTeacher, set()),
    (nnUNetTrainerCPS, {"agreement", "cps_loss_supervised_1", "cps_loss_supervised_2"}),
    (nnUNetTrainerMGCC, {"agreement", "mgcc_loss_supervised_main"}),
])
def test_template_step_loss_log_and_one_host_sync(trainer_class, extra_keys, tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    trainer.global_iteration = 7
    weight = trainer.current_unsupervised_weight()
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()} \
        if trainer.teacher_ema_decay is not None else None
    batch = tiny.tiny_batch(torch.Generator().manual_seed(0))
    counter = HostSyncCounter(monkeypatch)
    out = trainer.train_step(batch)
    monkeypatch.undo()
    assert counter.calls == 1, "one host synchronisation per step (the logging one)"
    assert set(out) == COMMON_KEYS | extra_keys
    assert all(math.isfinite(float(v)) for v in out.values())
    assert out["unsupervised_weight"] == weight and trainer.global_iteration == 8
    assert float(out["loss"]) == pytest.approx(out["loss_supervised"] + weight * out["loss_unsupervised"], rel=1e-5)
    assert 1 / tiny.K <= out["pseudo_label_confidence"] <= 1 and 0 <= out["fraction_above_threshold"] <= 1
    if teacher_before is not None:  # the declared EMA teacher followed the student after the step
        assert any(not torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())


def test_declared_networks_state_and_legacy_checkpoint_names(tmp_path, monkeypatch):
    trainer = tiny.two_case_trainer(nnUNetTrainerDHC, tmp_path, monkeypatch)
    assert set(trainer.extra_networks) == set(trainer.extra_optimizers) == {"network2"}
    state = trainer.ssl_state_dict()
    # one recursion restores everything: DHC's class statistics are registered state, not a key of their own
    assert set(state) == {"extra_networks", "extra_optimizers", "extra_state", "global_iteration", "ssl_log"}
    assert set(state["extra_state"]) == {"dhc"}
    # a checkpoint of nnssl 0.1 named DHC's second network network_b: it still loads
    legacy = {**state, "extra_networks": {"network_b": state["extra_networks"]["network2"]},
              "extra_optimizers": {"network_b": state["extra_optimizers"]["network2"]}}
    fresh = tiny.two_case_trainer(nnUNetTrainerDHC, tmp_path / "fresh", monkeypatch)
    fresh.load_ssl_state_dict(legacy)
    for key, value in trainer.network2.state_dict().items():
        assert torch.equal(fresh.network2.state_dict()[key], value), key
    # a checkpoint without a declared network says which and why
    mt = tiny.two_case_trainer(nnUNetTrainerMeanTeacher, tmp_path / "mt", monkeypatch)
    with pytest.raises(RuntimeError, match=r"nnUNetTrainerMeanTeacher: the checkpoint has no state for \['teacher'\]"):
        mt.load_ssl_state_dict({**state, "extra_networks": {}, "extra_optimizers": {}})


def test_capabilities_are_checked_once_with_one_error(tmp_path, monkeypatch):
    regions = {**tiny.DATASET_JSON, "labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [1, 2]}
    for trainer_class in (nnUNetTrainerCPS, nnUNetTrainerEntropyMin):
        with pytest.raises(UnsupportedByTrainer, match=f"{trainer_class.__name__} does not support region-based "
                                                       f"labels .*Dataset990_TrainerUnit, 2d"):
            tiny.two_case_trainer(trainer_class, tmp_path / trainer_class.__name__, monkeypatch, regions)
    assert issubclass(UnsupportedByTrainer, SystemExit)  # nnUNetv2_train prints the line, no traceback
    mgcc = tiny.two_case_trainer(nnUNetTrainerMGCC, tmp_path / "mgcc", monkeypatch, regions)  # MGCC supports them
    assert mgcc.label_manager.has_regions


def test_softmax_entropy_properties():
    k = 4
    confident = torch.nn.functional.one_hot(torch.randint(0, k, (2, 5, 6)), k).movedim(-1, 1).float() * 100
    assert softmax_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)
    assert softmax_entropy(torch.zeros(2, k, 5, 6)).item() == pytest.approx(math.log(k))
    logits = torch.randn(2, k, 5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = softmax_entropy(logits.to(torch.bfloat16))
    assert value.dtype == torch.float32 and 0 < value.item() < math.log(k)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logits"):
        softmax_entropy(torch.zeros(2, k))


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerDHC, nnUNetTrainerGuidedNet, nnUNetTrainerCReST,
                                           nnUNetTrainerSimiS, nnUNetTrainerCLD])
def test_class_weighted_steps_keep_one_host_sync(trainer_class, tmp_path, monkeypatch):
    """The value checks of the weighting functions (label range, finite weights, Dice range) are off inside the
    step (nnssl.validation.trusted_inputs): they were a dozen host synchronisations a step."""
    trainer = tiny.two_case_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    trainer.global_iteration = 7
    trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(1)))  # first-step initialisation
    counter = HostSyncCounter(monkeypatch)
    out = trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(0)))
    monkeypatch.undo()
    assert counter.calls == 1, "one host synchronisation per step (the logging one)"
    assert all(math.isfinite(float(v)) for v in out.values())


def test_augmentation_workers_share_the_budget_in_proportion_to_the_patches():
    from nnssl.training.unlabeled_data import augmentation_workers

    assert augmentation_workers(0, 2, 2) == (0, 0)  # nnU-Net's main-process mode stays that
    assert augmentation_workers(1, 2, 2) == (1, 1)  # a stream in the main process would stall every step
    for total in range(2, 17):
        for labeled, unlabeled in ((2, 2), (2, 6), (8, 1), (1, 1)):
            n_l, n_u = augmentation_workers(total, labeled, unlabeled)
            assert n_l + n_u == total and n_l >= 1 and n_u >= 1
            assert abs(n_u / total - unlabeled / (labeled + unlabeled)) <= 0.5 / total + 1 / total
    assert augmentation_workers(12, 2, 6) == (3, 9)
    with pytest.raises(ValueError, match="batch sizes"):
        augmentation_workers(4, 0, 2)


def test_n_proc_da_is_set_for_the_block_only(monkeypatch):
    import os

    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from nnssl.training.unlabeled_data import n_proc_da

    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    with n_proc_da(1):  # nnU-Net caps the value at the CPU count
        assert get_allowed_n_proc_DA() == 1
    assert "nnUNet_n_proc_DA" not in os.environ
    monkeypatch.setenv("nnUNet_n_proc_DA", "7")
    with pytest.raises(RuntimeError), n_proc_da(2):
        raise RuntimeError("nnU-Net failed inside")
    assert os.environ["nnUNet_n_proc_DA"] == "7"
