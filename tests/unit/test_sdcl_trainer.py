"""Unit tests of the SDCL trainer's pieces (nnssl_trainers/sdcl.py): the second student built from the plans, the
batch pairing, the copy-paste with deep-supervision targets, the per-student loss, the teacher and the two stages of
``train_step`` run in process on tiny networks (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnssl.ema import update_teacher_
from nnssl.losses.sdcl import (
    SDCLStages,
    deep_supervised_mix_loss,
    mixed_region_loss,
    pretrain_epoch_count,
    sdcl_student_loss,
    teacher_pseudo_labels,
)
from nnssl.mixing import bcp_mask, bidirectional_copy_paste_ds, downsample_nearest, labeled_copy_paste, rolled_pairs
from nnssl.networks.second_student import RESENC_M_BLOCKS, build_second_student, second_student_architecture
from nnssl.training.base import UnsupportedByTrainer

K = 3
# full-resolution patch and deep-supervision output shapes of the networks built by _students
OUTPUT_SHAPES = {3: [(8, 16, 16), (8, 8, 8), (4, 4, 4)], 2: [(16, 16), (8, 8), (4, 4)]}


def _configuration(dim: int, features=(4, 8, 16, 16), patch=None) -> dict:
    """A plans configuration entry as nnU-Net writes it (PlainConvUNet, anisotropic first stage in 3D)."""
    n = len(features)
    if dim == 3:
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1)
        strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2)
        conv, norm = "torch.nn.modules.conv.Conv3d", "torch.nn.modules.instancenorm.InstanceNorm3d"
        patch = patch or [8, 16, 16]
    else:
        kernels, strides = [[3, 3]] * n, [[1, 1]] + [[2, 2]] * (n - 1)
        conv, norm = "torch.nn.modules.conv.Conv2d", "torch.nn.modules.instancenorm.InstanceNorm2d"
        patch = patch or [16, 16]
    return {
        "data_identifier": f"nnUNetPlans_{dim}d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": conv, "kernel_sizes": kernels,
                "strides": strides, "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }


def _students(dim: int, deep_supervision: bool = True, seed: int = 0):
    cm = ConfigurationManager(_configuration(dim))
    torch.manual_seed(seed)
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, 1, K, deep_supervision=deep_supervision)
    residual = build_second_student(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                    cm.network_arch_init_kwargs_req_import, 1, K, deep_supervision)
    return cm, plain, residual


def _ds_targets(labels: torch.Tensor, output_shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """nnU-Net's deep-supervision targets (N, 1, *sp_i), float as its loader delivers them."""
    full = labels[:, None].float()
    return [downsample_nearest(full, s) for s in output_shapes]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run fastest single-threaded on a shared 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("dim", [2, 3])
def test_residual_student_builds_from_plans_with_the_plain_outputs(dim):
    cm, plain, residual = _students(dim)
    assert isinstance(plain, PlainConvUNet) and isinstance(residual, ResidualEncoderUNet)
    enc = residual.encoder
    assert len(enc.stages) == cm.network_arch_init_kwargs["n_stages"]
    assert all(len(stage.blocks) == 1 for stage in enc.stages)  # one residual block per stage by default
    assert [tuple(s) for s in enc.strides] == [tuple(s) for s in cm.network_arch_init_kwargs["strides"]]
    x = torch.randn(2, 1, *cm.patch_size)
    with torch.no_grad():
        out_p, out_r = plain(x), residual(x)
    assert isinstance(out_p, list) and len(out_p) == len(out_r) == cm.network_arch_init_kwargs["n_stages"] - 1
    assert [o.shape for o in out_p] == [o.shape for o in out_r]
    assert [tuple(o.shape[2:]) for o in out_p] == OUTPUT_SHAPES[dim]
    assert sum(p.numel() for p in plain.parameters()) != sum(p.numel() for p in residual.parameters())
    _, plain1, residual1 = _students(dim, deep_supervision=False)
    with torch.no_grad():
        assert plain1(x).shape == residual1(x).shape == (2, K, *cm.patch_size)


def test_second_student_architecture_choices():
    kwargs = _configuration(3, features=(4, 8, 16, 32, 32))["architecture"]["arch_kwargs"]
    name, res = second_student_architecture("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                            kwargs, RESENC_M_BLOCKS)
    assert name.endswith("ResidualEncoderUNet") and res["n_blocks_per_stage"] == [1, 3, 4, 6, 6]
    assert "n_conv_per_stage" not in res and res["strides"] == kwargs["strides"]
    long = {**kwargs, "n_stages": 9}
    assert second_student_architecture("PlainConvUNet", long, (1, 2))[1]["n_blocks_per_stage"] == [1] + [2] * 8
    name, plain = second_student_architecture("ResidualEncoderUNet", res, convs_per_stage=2)
    assert name.endswith("PlainConvUNet") and plain["n_conv_per_stage"] == [2] * 5
    assert "n_blocks_per_stage" not in plain
    with pytest.raises(ValueError, match="neither PlainConvUNet nor ResidualEncoderUNet"):
        second_student_architecture("my.UNETR", kwargs)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        second_student_architecture("PlainConvUNet", kwargs, 0)


def test_teacher_update_uses_the_constant_decay_from_the_first_step():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    update_teacher_(teacher, student, 0.99)  # SSL4MIS's warm-up would copy the student here
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.01))
    update_teacher_(teacher, student, 0.99)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.99 * 0.01 + 0.01))


# ------------------------------------------------------------------------------------------------ pairing, mixing
def test_rolled_pairs_use_every_sample_as_a_and_b():
    a, b = rolled_pairs(3, 3)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [2, 0, 1]
    a, b = rolled_pairs(1, 1)
    assert a.tolist() == b.tolist() == [0]  # a batch of one is mixed with itself
    a, b = rolled_pairs(5, 2)  # the shorter batch repeats cyclically
    assert a.tolist() == [0, 1, 0, 1, 0] and b.tolist() == [1, 0, 1, 0, 1]
    assert bool((a != b).all())
    with pytest.raises(ValueError, match="rolled_pairs"):
        rolled_pairs(0, 2)


def _mix_inputs(dim: int, n_l: int = 2, n_u: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = OUTPUT_SHAPES[dim]
    sp = shapes[0]
    lab = torch.randn(n_l, 2, *sp, generator=g)
    unl = torch.randn(n_u, 2, *sp, generator=g) + 10.0
    gt = torch.randint(0, K, (n_l, *sp), generator=g)
    pl = torch.randint(0, K, (n_u, *sp), generator=g)
    n = max(n_l, n_u)
    return lab, _ds_targets(gt, shapes), unl, pl, shapes, rolled_pairs(n, n_l), rolled_pairs(n, n_u)


@pytest.mark.parametrize("dim", [2, 3])
def test_full_masks_return_the_source_images_and_labels_exactly(dim):
    lab, targets, unl, pl, shapes, (la, lb), (ua, ub) = _mix_inputs(dim)
    pls = [downsample_nearest(pl[:, None], s)[:, 0] for s in shapes]
    ones, zeros = torch.ones(shapes[0]), torch.zeros(shapes[0])
    # M = 1 everywhere: the "a" images fill the whole patch
    x_l, x_u = bidirectional_copy_paste_ds(lab, targets, unl, pl, ones, (la, lb), (ua, ub))
    assert torch.equal(x_l.images, unl[ua]) and torch.equal(x_u.images, lab[la])
    for i in range(len(shapes)):
        assert torch.equal(x_l.targets[i][:, 0], pls[i][ua])
        assert torch.equal(x_u.targets[i], targets[i][la].long())
        assert bool((x_l.weights[i] == 0.5).all()) and bool((x_u.weights[i] == 1.0).all())
    # M = 0 everywhere: the box covers the patch, the pasted "b" images and labels are returned
    x_l, x_u = bidirectional_copy_paste_ds(lab, targets, unl, pl, zeros, (la, lb), (ua, ub))
    assert torch.equal(x_l.images, lab[lb]) and torch.equal(x_u.images, unl[ub])
    for i in range(len(shapes)):
        assert torch.equal(x_l.targets[i], targets[i][lb].long())
        assert torch.equal(x_u.targets[i][:, 0], pls[i][ub])
    # stage 1
    pairs = rolled_pairs(2, 2)
    assert torch.equal(labeled_copy_paste(lab, targets, ones, pairs).images, lab[pairs[0]])
    pasted = labeled_copy_paste(lab, targets, zeros, pairs)
    assert torch.equal(pasted.images, lab[pairs[1]])
    assert all(torch.equal(t, targets[i][pairs[1]].long()) for i, t in enumerate(pasted.targets))


@pytest.mark.parametrize("dim", [2, 3])
def test_deep_supervision_targets_are_the_downsampled_mixed_target(dim):
    lab, targets, unl, pl, shapes, pairs_l, pairs_u = _mix_inputs(dim)
    mask = bcp_mask(shapes[0], generator=torch.Generator().manual_seed(3))
    x_l, x_u = bidirectional_copy_paste_ds(lab, targets, unl, pl, mask, pairs_l, pairs_u)
    for mixed in (x_l, x_u):
        for i, s in enumerate(shapes):
            assert mixed.targets[i].shape[2:] == s and mixed.weights[i].shape[1:] == s
            assert torch.equal(mixed.targets[i], downsample_nearest(mixed.targets[0], s))
            assert torch.equal(mixed.weights[i], downsample_nearest(mixed.weights[0][:, None], s)[:, 0])
    for i in range(len(shapes)):
        # docs/methods/sdcl.md: the pseudo-labelled region of X_l is the ground-truth region of X_u and vice versa
        assert torch.equal(x_l.masks[i], x_u.masks[i])
        assert bool(((x_l.weights[i] + x_u.weights[i]) == 1.5).all())
        assert bool((x_l.weights[i][:, x_l.masks[i] > 0.5] == 0.5).all())
    # the unlabelled images sit on M in X_l and on 1 - M in X_u
    inside = mask > 0.5
    assert bool((x_l.images[..., inside] > 5).all()) and bool((x_u.images[..., ~inside] > 5).all())
    assert bool((x_l.images[..., ~inside] < 5).all()) and bool((x_u.images[..., inside] < 5).all())


def test_mixing_rejects_mismatched_inputs():
    lab, targets, unl, pl, shapes, pairs_l, pairs_u = _mix_inputs(3)
    mask = torch.ones(shapes[0])
    with pytest.raises(ValueError, match="unlabeled_pairs"):
        bidirectional_copy_paste_ds(lab, targets, unl, pl, mask, pairs_l, rolled_pairs(2, 3))
    with pytest.raises(ValueError, match="pseudo_labels"):
        bidirectional_copy_paste_ds(lab, targets, unl, pl[..., :8], mask, pairs_l, pairs_u)


# ------------------------------------------------------------------------------------------------ losses
def test_pseudo_labels_argmax_confidence_and_largest_component():
    logits = torch.zeros(1, 2, 12, 12)
    logits[0, 1, 1:6, 1:6] = 4.0  # large blob
    logits[0, 1, 9:11, 9:11] = 4.0  # small blob
    labels, confidence = teacher_pseudo_labels(logits)
    assert torch.equal(labels, logits.argmax(1)) and labels[0, 10, 10] == 1
    p = torch.softmax(logits, 1).max(1)[0].mean()
    assert torch.isclose(confidence, p) and 0.5 <= float(confidence) <= 1.0
    filtered, _ = teacher_pseudo_labels(logits, keep_largest_component=True)
    assert filtered[0, 10, 10] == 0 and bool((filtered[0, 1:6, 1:6] == 1).all()) and int(filtered.sum()) == 25


def test_deep_supervised_mix_loss_uses_nnunet_weights():
    lab, targets, unl, pl, shapes, pairs_l, pairs_u = _mix_inputs(2)
    mask = bcp_mask(shapes[0], generator=torch.Generator().manual_seed(0))
    x_l, _ = bidirectional_copy_paste_ds(lab, targets, unl, pl, mask, pairs_l, pairs_u)
    outputs = [torch.randn(3, K, *s) for s in shapes]
    full_only = deep_supervised_mix_loss(outputs, x_l, (1.0, 0.0, 0.0))
    assert torch.allclose(full_only, mixed_region_loss(outputs[0], x_l.targets[0], x_l.weights[0], mask))
    outputs[2] = torch.full_like(outputs[2], float("nan"))  # an output with weight 0 is never evaluated
    weights = (0.6, 0.4, 0.0)
    expected = sum(w * mixed_region_loss(outputs[i], x_l.targets[i], x_l.weights[i], x_l.masks[i])
                   for i, w in enumerate(weights[:2]))
    assert torch.allclose(deep_supervised_mix_loss(outputs, x_l, weights), expected)
    with pytest.raises(ValueError, match="deep-supervision outputs"):
        deep_supervised_mix_loss(outputs[:2], x_l, weights)


def _student_outputs(dim: int, seed: int = 0):
    lab, targets, unl, pl, shapes, pairs_l, pairs_u = _mix_inputs(dim, n_l=2, n_u=2, seed=seed)
    lab, unl = lab[:, :1], unl[:, :1]
    mask = bcp_mask(shapes[0], generator=torch.Generator().manual_seed(seed))
    mixes = bidirectional_copy_paste_ds(lab, targets, unl, pl, mask, pairs_l, pairs_u)
    return mixes, torch.cat([m.images for m in mixes])


def test_identical_students_give_zero_correction_losses():
    mixes, _ = _student_outputs(3)
    g = torch.Generator().manual_seed(1)
    outputs = [torch.randn(4, K, *t.shape[2:], generator=g, requires_grad=True) for t in mixes[0].targets]
    disc = torch.zeros(4, *mixes[0].targets[0].shape[2:], dtype=torch.bool)  # students agree everywhere
    loss = sdcl_student_loss(outputs, mixes, disc, (0.5, 0.3, 0.2), 0.5, 0.05)
    assert loss.mse.item() == 0.0 and loss.kl.item() == 0.0
    assert torch.equal(loss.total, loss.mix) and loss.mix.item() > 0
    mix_grad = torch.autograd.grad(loss.mix, outputs[0], retain_graph=True)[0]
    total_grad = torch.autograd.grad(loss.total, outputs[0])[0]
    assert torch.equal(mix_grad, total_grad)


def test_student_loss_components_and_weights():
    mixes, _ = _student_outputs(2)
    g = torch.Generator().manual_seed(2)
    outputs = [torch.randn(4, K, *t.shape[2:], generator=g) for t in mixes[0].targets]
    disc = torch.rand(outputs[0].shape[0], *outputs[0].shape[2:], generator=g) > 0.5
    a = sdcl_student_loss(outputs, mixes, disc, (1.0, 0.0, 0.0), 0.5, 0.05)
    b = sdcl_student_loss(outputs, mixes, disc, (1.0, 0.0, 0.0), 0.3, 0.1)
    assert a.mse.item() > 0 and a.kl.item() > math.log(K) * 0.5 * 0.99  # ω ≥ 0.5 and CE-to-uniform ≥ log K
    assert torch.equal(a.mix, b.mix) and torch.equal(a.mse, b.mse)
    assert torch.allclose(a.total, a.mix + 0.5 * a.mse + 0.05 * a.kl)
    assert torch.allclose(b.total, b.mix + 0.3 * b.mse + 0.1 * b.kl)
    with pytest.raises(ValueError, match="mixed images"):
        sdcl_student_loss([o[:3] for o in outputs], mixes[:1], disc[:3], (1.0, 0.0, 0.0), 0.5, 0.05)


def test_each_student_gets_only_its_own_gradient():
    _, plain, residual = _students(3)
    mixes, images = _student_outputs(3)
    out1, out2 = plain(images), residual(images)
    from nnssl.losses.sdcl import discrepancy_mask

    disc = discrepancy_mask(out1[0], out2[0])
    assert not disc.requires_grad and 0 < disc.float().mean() < 1  # two random students disagree somewhere
    weights = tuple([1.0 / len(out1)] * len(out1))
    loss1 = sdcl_student_loss(out1, mixes, disc, weights, 0.5, 0.05)
    loss1.total.backward()
    assert all(p.grad is None for p in residual.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in plain.parameters() if p.requires_grad)


@pytest.mark.parametrize(("dim", "dtype"), [(3, torch.bfloat16), (2, torch.float16)])
def test_losses_are_finite_under_cpu_autocast(dim, dtype):
    _, plain, residual = _students(dim)
    mixes, images = _student_outputs(dim, seed=4)
    with torch.autocast("cpu", dtype=dtype):
        out1, out2 = plain(images), residual(images)
        assert out1[0].dtype == dtype
        from nnssl.losses.sdcl import discrepancy_mask

        disc = discrepancy_mask(out1[0], out2[0])
        weights = (0.5, 0.3, 0.2)
        losses = [sdcl_student_loss(o, mixes, disc, weights, 0.5, 0.05) for o in (out1, out2)]
        total = losses[0].total + losses[1].total
    for loss in losses:
        for part in loss:
            assert part.dtype == torch.float32 and torch.isfinite(part)
    total.backward()
    for net in (plain, residual):
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------ schedule
def test_pretrain_epoch_count():
    assert pretrain_epoch_count(1000, 0.2) == 200
    assert pretrain_epoch_count(2, 0.2) == 1  # short runs still run both stages
    assert pretrain_epoch_count(10, 0.99) == 9
    assert pretrain_epoch_count(1, 0.2) == 0
    assert pretrain_epoch_count(5, 0.0) == 0 and pretrain_epoch_count(5, 1.0) == 5
    assert pretrain_epoch_count(5, 0.2, explicit=3) == 3
    with pytest.raises(ValueError, match="pretrain_fraction"):
        pretrain_epoch_count(5, 1.5)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        pretrain_epoch_count(5, 0.2, explicit=-1)


def test_stages_switch_once_at_the_start_epoch_and_report_it():
    messages = []
    stages = SDCLStages.for_schedule(10, 0.2, report=messages.append)
    assert stages.stage == 1 and stages.self_training_start_epoch == 2 and "[0, 2)" in messages[0]
    assert [stages.begin_self_training_if_due(e) for e in range(5)] == [False, False, True, False, False]
    assert stages.stage == 2 and "from epoch 2" in messages[1] and len(messages) == 2
    resumed = SDCLStages(2, report=messages.append)
    assert resumed.begin_self_training_if_due(7) and resumed.stage == 2  # a resume past the start switches at once


# ------------------------------------------------------------------------------------------------ trainer, in process
def _trainer(tmp_path, monkeypatch, trainer_cls=None, labels=None, seed: int = 0, **dataset_extra):
    """An SDCL trainer on a tiny 3D plan (no data on disk: batches are passed to ``train_step`` directly)."""
    from nnssl_trainers.sdcl import nnUNetTrainerSDCL

    dataset = "Dataset990_SDCLUnit"
    folder = tmp_path / "preprocessed" / dataset / "nnUNetPlans_3d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.b2nd").touch()  # nnU-Net infers its dataset class from the file endings
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_compile", "false")
    for var in ("NNSSL_NUM_EPOCHS", "NNSSL_LABELED_BATCH_SIZE", "NNSSL_UNLABELED_BATCH_SIZE"):
        monkeypatch.delenv(var, raising=False)
    plans = {"dataset_name": dataset, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [8, 16, 16], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": _configuration(3)}, "experiment_planner_used": "unit",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "continue_training": False}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "a": 1, "b": 2},
                    "numTraining": 2, "file_ending": ".nii.gz", **dataset_extra}
    torch.manual_seed(seed)
    trainer = (trainer_cls or nnUNetTrainerSDCL)(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 2
    trainer.print_to_console = False
    return trainer


def _batch(seed: int = 0, n_l: int = 2, n_u: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, K, (n_l, *OUTPUT_SHAPES[3][0]), generator=g)
    patch = OUTPUT_SHAPES[3][0]
    return {"data": torch.randn(n_l, 1, *patch, generator=g), "target": _ds_targets(gt, OUTPUT_SHAPES[3]),
            "keys": [f"l{i}" for i in range(n_l)], "unlabeled_data": torch.randn(n_u, 1, *patch, generator=g),
            "unlabeled_keys": [f"u{i}" for i in range(n_u)]}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trainer_runs_both_stages_and_restores_its_state(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch)
    trainer.initialize()
    assert isinstance(trainer.network2, ResidualEncoderUNet) and isinstance(trainer.network, PlainConvUNet)
    assert trainer.network2.decoder.deep_supervision and not trainer.teacher.decoder.deep_supervision
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.stages.stage == 1 and trainer.stages.self_training_start_epoch == 1
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}

    trainer.on_train_epoch_start()  # epoch 0: BCP pre-training
    out = trainer.train_step(_batch(0))
    assert out["sdcl_stage"] == 1.0 and math.isfinite(out["loss_supervised"]) and 0 <= out["agreement"] <= 1
    assert out["loss_unsupervised"] == 0.0 and out["unsupervised_weight"] == 0.0
    assert "sdcl_loss_mse" not in out and "pseudo_label_confidence" not in out
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())

    trainer.current_epoch = 1
    trainer.on_train_epoch_start()  # the switch: the teacher becomes student 1
    assert trainer.stages.stage == 2 and _same(trainer.teacher, trainer.network)
    old_teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    out = trainer.train_step(_batch(1))
    for key in ("loss", "loss_supervised", "loss_unsupervised", "sdcl_loss_mse", "sdcl_loss_kl", "agreement",
                "pseudo_label_confidence", "fraction_above_threshold"):
        assert math.isfinite(float(out[key])), key
    assert out["sdcl_stage"] == 2.0 and 1 / K <= out["pseudo_label_confidence"] <= 1
    # the unsupervised part is the corrections of both students: loss = mix + corrections
    assert out["loss_supervised"] + out["loss_unsupervised"] == pytest.approx(float(out["loss"]), rel=1e-5)
    student = trainer.network.state_dict()
    for k, v in trainer.teacher.state_dict().items():  # θ_T = 0.99 θ_T + 0.01 θ_1 after the step
        assert torch.allclose(v, 0.99 * old_teacher[k] + 0.01 * student[k], atol=1e-6), k
    assert trainer.global_iteration == 2

    state = trainer.ssl_state_dict()
    assert state["extra_state"]["sdcl"] == {"sdcl_stage": 2, "sdcl_self_training_start_epoch": 1}
    restored = _trainer(tmp_path, monkeypatch, seed=1)
    restored.num_epochs = 10  # a changed schedule keeps the saved switch epoch
    restored.initialize()
    assert not _same(restored.network2, trainer.network2)
    restored.load_ssl_state_dict(state)
    assert restored.stages.stage == 2 and restored.stages.self_training_start_epoch == 1
    assert restored.global_iteration == 2
    assert _same(restored.network2, trainer.network2) and _same(restored.teacher, trainer.teacher)
    restored.current_epoch = 2
    restored.on_train_epoch_start()  # already in stage 2: the teacher is not reset to student 1
    assert _same(restored.teacher, trainer.teacher)
    # a checkpoint of an earlier nnssl kept the two keys beside extra_state: it loads the same
    older = _trainer(tmp_path, monkeypatch, seed=2)
    older.initialize()
    older.load_ssl_state_dict({**state, **state["extra_state"]["sdcl"], "extra_state": {}})
    assert older.stages.stage == 2 and older.stages.self_training_start_epoch == 1


def test_trainer_with_a_single_labeled_patch_and_the_pancreas_weights(tmp_path, monkeypatch):
    from nnssl_trainers.sdcl import nnUNetTrainerSDCL_pancreas

    trainer = _trainer(tmp_path, monkeypatch, nnUNetTrainerSDCL_pancreas)
    trainer.initialize()
    assert (trainer.mse_weight, trainer.kl_weight) == (0.3, 0.1)
    trainer.on_train_epoch_start()
    assert math.isfinite(float(trainer.train_step(_batch(2, n_l=1, n_u=1))["loss"]))
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    out = trainer.train_step(_batch(3, n_l=1, n_u=2))
    assert math.isfinite(out["sdcl_loss_kl"]) and math.isfinite(out["sdcl_loss_mse"])


def test_trainer_refuses_region_labels(tmp_path, monkeypatch):
    with pytest.raises(UnsupportedByTrainer, match="nnUNetTrainerSDCL does not support region-based labels"):
        _trainer(tmp_path, monkeypatch, labels={"background": 0, "a": [1, 2], "b": 2}, regions_class_order=[1, 2])


def test_variants_adam_resenc_and_largest_component(tmp_path, monkeypatch):
    from nnssl_trainers.sdcl import nnUNetTrainerSDCL_adam, nnUNetTrainerSDCL_lcc, nnUNetTrainerSDCL_resencM

    adam = _trainer(tmp_path, monkeypatch, nnUNetTrainerSDCL_adam)
    adam.initialize()
    for epoch in (0, 1):
        adam.current_epoch = epoch
        adam.on_train_epoch_start()
        for opt in adam.all_optimizers():
            assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3  # constant
    assert math.isfinite(adam.train_step(_batch(4))["loss_supervised"])

    resenc = _trainer(tmp_path, monkeypatch, nnUNetTrainerSDCL_resencM)
    resenc.initialize()
    assert [len(s.blocks) for s in resenc.network2.encoder.stages] == [1, 3, 4, 6]

    lcc = _trainer(tmp_path, monkeypatch, nnUNetTrainerSDCL_lcc)
    lcc.initialize()
    lcc.current_epoch = 1
    lcc.on_train_epoch_start()
    out = lcc.train_step(_batch(5))
    assert lcc.stages.stage == 2 and math.isfinite(out["sdcl_loss_kl"])


def test_initial_lr_from_environment_only_for_nnunet_sgd_trainers(tmp_path, monkeypatch):
    """NNSSL_INITIAL_LR (benchmark presets) replaces nnU-Net's 0.01; SDCL's official-Adam variant keeps 1e-3."""
    from nnssl_trainers.sdcl import nnUNetTrainerSDCL_adam

    monkeypatch.setenv("NNSSL_INITIAL_LR", "0.05")
    sgd = _trainer(tmp_path, monkeypatch)
    assert sgd.initial_lr == pytest.approx(1e-2)
    sgd.apply_schedule_from_environment()
    assert sgd.initial_lr == pytest.approx(0.05)
    adam = _trainer(tmp_path, monkeypatch, trainer_cls=nnUNetTrainerSDCL_adam)
    adam.apply_schedule_from_environment()
    assert adam.initial_lr == pytest.approx(1e-3)
    monkeypatch.setenv("NNSSL_INITIAL_LR", "-1")
    with pytest.raises(ValueError, match="NNSSL_INITIAL_LR"):
        _trainer(tmp_path, monkeypatch).apply_schedule_from_environment()
