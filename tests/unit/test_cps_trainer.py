"""Unit tests of nnUNetTrainerCPS's parts (docs/methods/cps.md): the CPS terms of a step, the second network's init and
the softmax-averaging network pair used by nnUNetTrainerCPS_ensemble."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnssl.cps_ensemble import cps_checkpoint_as_ensemble, export_cps_ensemble
from nnssl.losses.cps import cps_loss_on_batch
from nnssl.network_pair import NetworkPair, average_softmax_as_logits, xavier_normal_init_
from nnssl.tensors import argmax_agreement
from nnssl.training.step import SSLTerms, step_log
from nnssl_trainers.cps import nnUNetTrainerCPS, nnUNetTrainerCPS_ensemble

K = 4


def _one_hot_logits(labels: torch.Tensor, margin: float) -> torch.Tensor:
    return torch.movedim(F.one_hot(labels, K).float(), -1, 1) * margin


def _tiny_configuration(residual: bool = False) -> ConfigurationManager:
    kwargs = {
        "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if residual:
        kwargs["n_blocks_per_stage"] = [1, 1, 1]
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        kwargs["n_conv_per_stage"] = [2, 2, 2]
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return ConfigurationManager({"architecture": {"network_class_name": name, "arch_kwargs": kwargs,
                                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                          "nonlin"]}})


def _build_pair(deep_supervision: bool = True, residual: bool = False) -> NetworkPair:
    return nnUNetTrainerCPS_ensemble.build_network_architecture(None, _tiny_configuration(residual), 1, K,
                                                                deep_supervision)


# ---------------------------------------------------------------------------------------------- CPS step terms
def test_no_gradient_for_a_network_already_matching_the_others_pseudo_label():
    torch.manual_seed(0)
    labels = torch.randint(0, K, (3, 4, 5, 6))
    # net 1: confidence 1 on `labels`; net 2: same argmax, but unsure
    confident = _one_hot_logits(labels, 200.0).requires_grad_()
    unsure = (torch.rand(3, K, 4, 5, 6) * 0.5 + _one_hot_logits(labels, 1.0)).requires_grad_()
    loss = cps_loss_on_batch(confident, unsure, n_labeled=1)
    loss.backward()
    assert argmax_agreement(confident[1:], unsure[1:]).item() == 1.0
    assert confident.grad.abs().max().item() == 0.0  # CE(z1, ŷ2) saturated, CE(z2, ŷ1) does not reach z1
    assert unsure.grad[1:].abs().sum().item() > 1e-2  # net 2 is still pushed towards net 1's pseudo-label
    assert unsure.grad[:1].abs().max().item() == 0.0  # labeled sample: no CPS in the SSL4MIS variant
    expected = F.cross_entropy(unsure[1:], labels[1:])  # only net 2's term is left
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_gradient_reaches_a_confident_network_through_its_parameters():
    """The same property for real modules: net 1's parameters get no gradient from the CPS loss."""
    torch.manual_seed(1)
    net1, net2 = nn.Conv3d(1, K, 1), nn.Conv3d(1, K, 1)
    with torch.no_grad():
        net1.weight.zero_()
        net1.bias.copy_(torch.tensor([0.0, 0.0, 300.0, 0.0]))  # class 2 everywhere, confidence 1
        net2.weight.mul_(0.1)
        net2.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # class 2 everywhere, unsure
    x = torch.randn(2, 1, 3, 4, 5)
    loss = cps_loss_on_batch(net1(x), net2(x), n_labeled=0)
    loss.backward()
    assert net1.weight.grad.abs().max().item() == 0.0 and net1.bias.grad.abs().max().item() == 0.0
    assert net2.bias.grad.abs().sum().item() > 1e-2


@pytest.mark.parametrize("cps_on_labeled", [False, True])
def test_cps_terms_are_symmetric_under_swapping_the_networks(cps_on_labeled):
    torch.manual_seed(2)
    logits_1, logits_2 = torch.randn(4, K, 3, 5, 6), torch.randn(4, K, 3, 5, 6)
    forward = cps_loss_on_batch(logits_1, logits_2, 2, cps_on_labeled)
    swapped = cps_loss_on_batch(logits_2, logits_1, 2, cps_on_labeled)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-6)
    # and the loss is the two detached-target cross-entropies
    start = 0 if cps_on_labeled else 2
    expected = (F.cross_entropy(logits_1[start:], logits_2[start:].argmax(1))
                + F.cross_entropy(logits_2[start:], logits_1[start:].argmax(1)))
    assert forward.item() == pytest.approx(expected.item(), rel=1e-6)


def test_labeled_samples_enter_the_cps_loss_only_in_the_whole_batch_variant():
    torch.manual_seed(3)
    logits_1, logits_2 = torch.randn(4, K, 3, 5), torch.randn(4, K, 3, 5)
    changed_1 = logits_1.clone()
    changed_1[:2] = torch.randn(2, K, 3, 5) * 5  # only the 2 labeled samples differ
    for on_labeled, same in ((False, True), (True, False)):
        before = cps_loss_on_batch(logits_1, logits_2, 2, on_labeled)
        after = cps_loss_on_batch(changed_1, logits_2, 2, on_labeled)
        assert (before.item() == pytest.approx(after.item())) is same


def test_agreement_and_confidence_hand_computed():
    # 4 voxels (2D 1x4): labels of a = 0 0 1 1, b = 0 1 1 0 -> agreement 0.5
    probs_a = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    probs_b = torch.tensor([[0.5, 0.5 - 1e-3], [0.1, 0.9], [0.25, 0.75], [0.8, 0.2]])
    logits_a = torch.log(probs_a).T.reshape(1, 2, 1, 4)
    logits_b = torch.log(probs_b / probs_b.sum(1, keepdim=True)).T.reshape(1, 2, 1, 4)
    assert argmax_agreement(logits_a, logits_b).item() == 0.5
    conf_a = (0.9 + 0.6 + 0.8 + 0.7) / 4
    conf_b = (0.5 / (1 - 1e-3) + 0.9 + 0.75 + 0.8) / 4
    # what the base logs for CPS: confidence averaged over both networks, agreement of their argmaxes
    logged = step_log(torch.tensor(1.0), 0.1, SSLTerms(torch.tensor(0.5), torch.tensor(0.25),
                                                       pseudo_label_logits=(logits_a, logits_b),
                                                       agreement=argmax_agreement(logits_a, logits_b)),
                      "cps", threshold=0.85)
    assert logged["pseudo_label_confidence"] == pytest.approx((conf_a + conf_b) / 2, rel=1e-5)
    assert logged["agreement"] == 0.5 and logged["unsupervised_weight"] == 0.1
    assert logged["fraction_above_threshold"] == pytest.approx(0.25)  # one voxel of each network >= 0.85
    assert (logged["loss_supervised"], logged["loss_unsupervised"]) == (0.5, 0.25)


def test_cps_terms_reject_bad_input():
    with pytest.raises(ValueError, match="must match"):
        cps_loss_on_batch(torch.zeros(2, K, 3, 3), torch.zeros(2, K, 3, 4), 1)
    with pytest.raises(ValueError, match="at least one unlabeled"):
        cps_loss_on_batch(torch.zeros(2, K, 3, 3), torch.zeros(2, K, 3, 3), 2)


def test_cps_weight_ramps_from_sigmoid_start_to_lambda():
    trainer = object.__new__(nnUNetTrainerCPS)  # only the schedule attributes are needed
    trainer.num_epochs, trainer.num_iterations_per_epoch = 10, 25  # ramp = 40 % of 250 iterations = 100
    trainer.global_iteration, trainer.current_epoch = 0, 0
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * math.exp(-5))
    trainer.global_iteration = 50
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * math.exp(-5 * 0.25))
    trainer.global_iteration = 100
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- initialisation
def _conv_weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]


def test_the_two_networks_start_with_different_weights_and_init_schemes():
    torch.manual_seed(4)
    pair = _build_pair()
    w1, w2 = _conv_weights(pair.net1), _conv_weights(pair.net2)
    assert len(w1) == len(w2) > 0
    assert all(not torch.equal(a, b) for a, b in zip(w1, w2))
    checked = 0
    for m1, m2 in zip(pair.net1.modules(), pair.net2.modules()):
        if isinstance(m1, nn.Conv3d) and m1.weight.numel() >= 4096:
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m1.weight)
            he_std = math.sqrt(2.0 / (1 + 0.01 ** 2) / fan_in)  # nnU-Net InitWeights_He(1e-2)
            xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
            assert m1.weight.std().item() == pytest.approx(he_std, rel=0.06)
            assert m2.weight.std().item() == pytest.approx(xavier_std, rel=0.06)
            checked += 1
        if isinstance(m2, (nn.Conv3d, nn.ConvTranspose3d)) and m2.bias is not None:
            assert torch.count_nonzero(m2.bias) == 0
        if isinstance(m2, nn.InstanceNorm3d):
            assert torch.all(m2.weight == 1) and torch.all(m2.bias == 0)
    assert checked >= 2


def test_xavier_init_keeps_residual_zero_init_and_rejects_non_modules():
    pair = _build_pair(residual=True)
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    blocks = [m for m in pair.net2.modules() if isinstance(m, BasicBlockD)]
    assert blocks and all(torch.count_nonzero(b.conv2.norm.weight) == 0 for b in blocks)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        xavier_normal_init_("not a network")


# ---------------------------------------------------------------------------------------------- ensemble module
class _FixedOutput(nn.Module):
    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = [o * self.scale for o in self.outputs]
        return out if len(out) > 1 else out[0]


def test_network_pair_averages_softmax_per_deep_supervision_scale():
    torch.manual_seed(5)
    z1 = [torch.randn(2, K, 4, 4, 4), torch.randn(2, K, 2, 2, 2)]
    z2 = [torch.randn(2, K, 4, 4, 4) * 3, torch.randn(2, K, 2, 2, 2)]
    pair = NetworkPair(_FixedOutput(z1), _FixedOutput(z2))
    averaged = pair(torch.zeros(1))
    assert len(averaged) == 2
    for out, a, b in zip(averaged, z1, z2):
        expected = (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2
        assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
        assert torch.allclose(out.exp().sum(1), torch.ones(()), atol=1e-5)  # log-probabilities
    both = pair(torch.zeros(1), return_both=True)
    assert all(torch.equal(o, r) for o, r in zip(both[0], z1)) and all(torch.equal(o, r) for o, r in zip(both[1], z2))
    # the ensemble of two identical networks predicts what each one does
    same = NetworkPair(_FixedOutput(z1[:1]), _FixedOutput(z1[:1]))(torch.zeros(1))
    assert torch.allclose(torch.softmax(same, 1), torch.softmax(z1[0], 1), atol=1e-6)


def test_average_softmax_is_finite_for_saturated_logits_and_checks_shapes():
    z = torch.tensor([1000.0, -1000.0]).reshape(1, 2, 1)
    out = average_softmax_as_logits(z, z)
    assert torch.isfinite(out).all() and out.argmax(1).item() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        average_softmax_as_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_ensemble_architecture_holds_both_networks_and_toggles_deep_supervision():
    torch.manual_seed(6)
    pair = _build_pair(deep_supervision=True)
    keys = pair.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"net1", "net2"}
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        out = pair(x)
        assert isinstance(out, list) and out[0].shape == (1, K, 8, 8, 8)
        pair.set_deep_supervision(False)
        single = pair(x)
        o1, o2 = pair(x, return_both=True)
    assert isinstance(single, torch.Tensor) and torch.allclose(single, out[0], atol=1e-5)
    assert torch.allclose(torch.softmax(single, 1), (torch.softmax(o1, 1) + torch.softmax(o2, 1)) / 2, atol=1e-6)
    # inference rebuilds the architecture and loads network_weights: a fresh pair must accept the state dict
    fresh = _build_pair(deep_supervision=False)
    fresh.load_state_dict(pair.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), single, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ensemble export
def test_export_turns_a_cps_run_into_an_ensemble_model_folder(tmp_path):
    torch.manual_seed(7)
    source_pair = _build_pair(deep_supervision=False)
    fold = tmp_path / "Dataset001_X" / "nnUNetTrainerCPS__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (fold.parent / name).write_text(json.dumps({"file": name}))
    checkpoint = {"network_weights": source_pair.net1.state_dict(), "trainer_name": "nnUNetTrainerCPS",
                  "init_args": {"configuration": "3d_fullres"}, "current_epoch": 3,
                  "nnssl_state": {"extra_networks": {"network2": source_pair.net2.state_dict()}}}
    torch.save(checkpoint, fold / "checkpoint_final.pth")

    written = export_cps_ensemble(fold)
    model = tmp_path / "Dataset001_X" / "nnUNetTrainerCPS_ensemble__nnUNetPlans__3d_fullres"
    assert written == model / "fold_0" / "checkpoint_final.pth"
    assert json.loads((model / "plans.json").read_text(encoding="utf-8")) == {"file": "plans.json"}
    exported = torch.load(written, map_location="cpu", weights_only=False)
    assert exported["trainer_name"] == "nnUNetTrainerCPS_ensemble" and exported["current_epoch"] == 3
    # what nnUNetv2_predict does: rebuild the ensemble trainer's architecture and load network_weights strictly
    fresh = _build_pair(deep_supervision=False)
    fresh.load_state_dict(exported["network_weights"])
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), source_pair(x), atol=1e-6)
        assert torch.allclose(fresh.net2(x), source_pair.net2(x), atol=1e-6)


def test_export_rejects_what_is_not_a_cps_run(tmp_path):
    with pytest.raises(ValueError, match="not a CPS checkpoint"):
        cps_checkpoint_as_ensemble({"network_weights": {}, "trainer_name": "nnUNetTrainer"})
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_cps_ensemble(tmp_path / "nnUNetTrainerCPS__nnUNetPlans__2d" / "fold_0")
    odd = tmp_path / "not_a_model_folder" / "fold_0"
    odd.mkdir(parents=True)
    torch.save({}, odd / "checkpoint_final.pth")
    with pytest.raises(ValueError, match="TRAINER"):
        export_cps_ensemble(odd)
