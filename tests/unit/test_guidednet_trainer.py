"""Unit tests of the GuidedNet trainers' building blocks (nnssl_trainers/guidednet.py): feature hook, loss assembly,
KT-CPS crossing and fixed point, guidance terms on separated clusters and with absent classes, the initial class
histogram, voxel subsets and the fitted-GMM rectification path. docs/methods/guidednet.md."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
from torch import nn

from nnssl.debiasing import KnowledgeTransferWeighting, class_histogram, distribution_aware_weights
from nnssl.gmm import DiagonalGaussianMixture, class_prototypes
from nnssl.losses.cps import weighted_cross_entropy
from nnssl.losses.guidednet import (
    assemble_guidednet_loss,
    flat_voxels,
    gmm_rectified_pseudo_labels,
    guidance_terms,
    kt_cps_class_weights,
    kt_cps_loss,
    voxel_subset,
)
from nnssl.network_pair import xavier_normal_init_
from nnssl.networks.feature_tap import DecoderFeatureTap, decoder_feature_channels
from nnssl.training.class_statistics import labeled_class_counts
from nnssl_trainers.guidednet import (
    nnUNetTrainerGuidedNet,
    nnUNetTrainerGuidedNet_FittedGMM,
    nnUNetTrainerGuidedNet_noGuidance,
    nnUNetTrainerGuidedNet_uniformKTCPS,
)


def _tiny_unet(dim: int, deep_supervision: bool, num_classes: int = 3) -> nn.Module:
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], 1, num_classes, 1, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         deep_supervision=deep_supervision)


def _one_hot_logits(labels: torch.Tensor, k: int, margin: float = 20.0) -> torch.Tensor:
    """Logits whose argmax is ``labels`` (N, *sp) with a large margin: softmax ~ one-hot."""
    return margin * torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()


# ------------------------------------------------------------------ feature hook


@pytest.mark.parametrize("dim,deep_supervision", [(3, True), (3, False), (2, True)])
def test_feature_tap_returns_pre_head_features_and_leaves_output_unchanged(dim, deep_supervision):
    net = _tiny_unet(dim, deep_supervision).eval()
    x = torch.randn(2, 1, *([8] * dim))
    with torch.no_grad():
        plain = net(x)
        tap = DecoderFeatureTap(net)
        with tap.capture():
            hooked = net(x)
        features = tap.take()
        full_res = hooked[0] if deep_supervision else hooked
        assert decoder_feature_channels(net) == 4
        assert features.shape == (2, 4, *([8] * dim))
        # the features are exactly the segmentation head's input
        assert torch.allclose(net.decoder.seg_layers[-1](features), full_res, atol=1e-6)
        if deep_supervision:
            assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
        else:
            assert torch.equal(plain, hooked)
        net(x)  # outside capture(): nothing is recorded
        with pytest.raises(RuntimeError, match="capture"):
            tap.take()
        tap.remove()
        with tap.capture():
            net(x)
        assert tap.features is None


def test_feature_tap_rejects_a_network_without_unet_decoder():
    with pytest.raises(TypeError, match="UNetDecoder"):
        DecoderFeatureTap(nn.Conv3d(1, 2, 1))


def test_second_network_gets_xavier_normal_init():
    net = xavier_normal_init_(_tiny_unet(3, True))
    conv = net.encoder.stages[1][0].convs[0].conv  # 4 -> 8 channels, 3x3x3
    fan_in, fan_out = 4 * 27, 8 * 27
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.2)
    assert all(m.bias is None or torch.all(m.bias == 0) for m in net.modules() if isinstance(m, nn.Conv3d))
    he = _tiny_unet(3, True)
    he.apply(he.initialize)  # nnU-Net's own init of the first network (kaiming-normal, a=0.01)
    assert not torch.equal(he.encoder.stages[1][0].convs[0].conv.weight, conv.weight)


# ------------------------------------------------------------------ loss assembly and KT-CPS


def test_lambda_zero_reduces_to_supervision_plus_kt_cps():
    sup = [torch.tensor(0.7), torch.tensor(0.9)]
    guidance = [torch.tensor(3.0), torch.tensor(5.0)]
    consistency, ktcps, w = torch.tensor(0.25), torch.tensor(2.0), 0.05
    plain = assemble_guidednet_loss(sup, guidance, consistency, ktcps, lam=0.0, unsup_weight=w)
    assert plain.item() == pytest.approx(0.7 + 0.9 + w * 2.0)
    full = assemble_guidednet_loss(sup, guidance, consistency, ktcps, lam=0.3, unsup_weight=w)
    # sum_m [sup + 0.3 (G^m + w C)] + w ktcps: the consistency is counted once per network (official)
    assert full.item() == pytest.approx(0.7 + 0.9 + 0.3 * (3.0 + 5.0) + 2 * 0.3 * w * 0.25 + w * 2.0)
    with pytest.raises(ValueError, match="one entry per network"):
        assemble_guidednet_loss(sup, guidance[:1], consistency, ktcps, lam=0.3, unsup_weight=w)


def test_lambda_zero_gradient_comes_only_from_supervision_and_kt_cps():
    logits1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits2 = torch.randn(2, 3, 4, 4, requires_grad=True)
    guidance_input = torch.randn(3, requires_grad=True)
    w_a, w_b = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 3.0])
    ktcps = kt_cps_loss(logits1, logits2, w_a, w_b)
    loss = assemble_guidednet_loss([logits1.mean(), logits2.mean()], [guidance_input.sum()] * 2,
                                   guidance_input.pow(2).sum(), ktcps, lam=0.0, unsup_weight=0.1)
    loss.backward()
    assert guidance_input.grad is None or torch.all(guidance_input.grad == 0)
    assert logits1.grad.abs().sum() > 0 and logits2.grad.abs().sum() > 0


def test_kt_cps_loss_crosses_the_weights():
    torch.manual_seed(1)
    z1, z2 = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    w_a, w_b = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([3.0, 0.5, 1.0])
    loss = kt_cps_loss(z1, z2, w_a, w_b)
    crossed = weighted_cross_entropy(z1, z2.argmax(1), w_b) + weighted_cross_entropy(z2, z1.argmax(1), w_a)
    own = weighted_cross_entropy(z1, z2.argmax(1), w_a) + weighted_cross_entropy(z2, z1.argmax(1), w_b)
    assert loss.item() == pytest.approx(crossed.item(), abs=1e-6)
    assert abs(loss.item() - own.item()) > 1e-3
    # explicit pseudo-labels equal to the argmax give the same value (FittedGMM path)
    explicit = kt_cps_loss(z1, z2, w_a, w_b, pseudo1=z1.argmax(1), pseudo2=z2.argmax(1))
    assert explicit.item() == pytest.approx(loss.item(), abs=1e-6)


def test_kt_cps_fixed_point_and_weight_extremes_through_the_trainer_update():
    labels = torch.zeros(2, 10, 10, dtype=torch.long)
    labels[0, :4] = 1  # 40 voxels
    labels[1, :1, :5] = 2  # 5 voxels: rarest
    counts = class_histogram(labels, 3)
    kt = KnowledgeTransferWeighting(counts, momentum=0.99)
    initial = kt.weights.clone()
    assert initial[0] == 0 and initial[2] == pytest.approx(3.0)  # most frequent 0, rarest K
    perfect = _one_hot_logits(labels, 3)
    for _ in range(3):
        w_a, w_b = kt_cps_class_weights(kt, perfect, perfect, labels.unsqueeze(1).float())
        assert torch.allclose(w_a, initial, atol=1e-5) and torch.allclose(w_b, initial, atol=1e-5)


def test_kt_cps_update_is_sequential_on_one_shared_state():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, :3] = 1
    labels[0, 9, :2] = 2
    kt = KnowledgeTransferWeighting(class_histogram(labels, 3), momentum=0.5)
    wrong = labels.clone()
    wrong[0, 9, :2] = 0  # net 2 misses class 2: its correct-voxel histogram has no class 2
    w0 = kt.weights.clone()
    w_a, w_b = kt_cps_class_weights(kt, _one_hot_logits(labels, 3), _one_hot_logits(wrong, 3), labels)
    current_b = distribution_aware_weights(class_histogram(wrong, 3))
    assert torch.allclose(w_a, w0, atol=1e-6)  # net 1 perfect: fixed point
    assert torch.allclose(w_b, 0.5 * w_a + 0.5 * current_b, atol=1e-6)  # net 2's step starts from w_A
    assert torch.equal(kt.weights, w_b)


# ------------------------------------------------------------------ guidance terms (docs/methods/guidednet.md)


def _separated_batch(n_l: int, n_u: int, k: int = 3, c: int = 4, v: int = 30, gap: float = 4.0):
    """Features equal to their class prototype exactly, prototypes pairwise ``gap`` apart in every channel."""
    centers = gap * torch.arange(k, dtype=torch.float32).unsqueeze(1).expand(k, c)  # (K, C)
    labels_l = torch.arange(n_l * v).reshape(n_l, v) % k
    labels_u = (torch.arange(n_u * v).reshape(n_u, v) + 1) % k
    features_l = centers[labels_l].permute(0, 2, 1).contiguous()  # (N, C, V)
    features_u = centers[labels_u].permute(0, 2, 1).contiguous()
    return features_l, labels_l, features_u, labels_u


def test_separated_clusters_leave_labels_unchanged_for_any_batch_sizes():
    k = 3
    features_l, labels_l, features_u, labels_u = _separated_batch(n_l=2, n_u=3, k=k)
    prototypes, present = class_prototypes(features_l, labels_l, k)
    terms = guidance_terms(prototypes, present, features_l, _one_hot_logits(labels_l, k), labels_l,
                           features_u, _one_hot_logits(labels_u, k))
    assert torch.equal(terms.responsibility_labeled.argmax(1), labels_l)
    r_l = terms.responsibility_labeled
    assert (r_l > 0).all() and (r_l <= 1).all()
    # soft targets = kernel maps ~ one-hot = GT = predictions: both GMM losses vanish up to the eps terms
    assert terms.gmm_labeled.item() < 1e-3
    assert terms.gmm_unlabeled.item() < 1e-3
    # far apart prototypes: almost no repulsion
    assert terms.prototype.item() == pytest.approx(0.0, abs=1e-6)
    # unlabeled predictions that contradict the guidance are penalised
    contradict = guidance_terms(prototypes, present, features_l, _one_hot_logits(labels_l, k), labels_l,
                                features_u, _one_hot_logits((labels_u + 1) % k, k))
    assert contradict.gmm_unlabeled.item() > 1.0


def test_prototype_repulsion_is_one_for_coinciding_prototypes_in_the_trainer_path():
    features = torch.ones(2, 4, 12)
    labels = torch.arange(24).reshape(2, 12) % 3
    prototypes, present = class_prototypes(features, labels, 3)
    terms = guidance_terms(prototypes, present, features, torch.zeros(2, 3, 12), labels, features[:1],
                           torch.zeros(1, 3, 12))
    assert terms.prototype.item() == pytest.approx(1.0, abs=1e-5)
    only_background = guidance_terms(*class_prototypes(features, torch.zeros(2, 12, dtype=torch.long), 3),
                                     features, torch.zeros(2, 3, 12), torch.zeros(2, 12, dtype=torch.long),
                                     features[:1], torch.zeros(1, 3, 12))
    assert only_background.prototype.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guidance_terms_finite_with_absent_classes_and_low_precision(dtype):
    torch.manual_seed(0)
    k, c = 5, 4
    features = (10 * torch.randn(3, c, 6, 6, 6)).to(dtype).requires_grad_()
    logits = (30 * torch.randn(3, k, 6, 6, 6)).to(dtype).requires_grad_()
    labels = torch.zeros(2, 1, 6, 6, 6)
    labels[1, 0, :2] = 3  # sample 0 only background, classes 1, 2, 4 absent everywhere
    labels[1, 0, 5, 5, 5] = 5  # nnU-Net's ignore label (= K) is skipped
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        prototypes, present = class_prototypes(features[:2], labels, k)
        index = voxel_subset((6, 6, 6), 100, "cpu")
        terms = guidance_terms(prototypes, present, flat_voxels(features[:2], 3, index),
                               flat_voxels(logits[:2], 3, index), flat_voxels(labels[:, 0], 3, index),
                               flat_voxels(features[2:], 3, index), flat_voxels(logits[2:], 3, index))
        total = terms.total
    assert present.tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 1, 0]]
    assert torch.isfinite(total) and total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(logits.grad).all()
    assert features.grad.abs().sum() > 0


def test_voxel_subset_and_flat_voxels_keep_correspondence():
    assert voxel_subset((4, 4), 16, "cpu") is None
    index = voxel_subset((4, 5, 6), 50, "cpu")
    assert index.shape == (50,) and index.unique().numel() == 50 and int(index.max()) < 120
    volume = torch.arange(2 * 120).reshape(2, 1, 4, 5, 6).float()
    labels = volume[:, 0].long()
    feats, labs = flat_voxels(volume, 3, index), flat_voxels(labels, 3, index)
    assert feats.shape == (2, 1, 50) and labs.shape == (2, 50)
    assert torch.equal(feats[:, 0].long(), labs)
    assert torch.equal(flat_voxels(volume, 3, None), volume.reshape(2, 1, 120))
    with pytest.raises(ValueError, match="max_voxels"):
        voxel_subset((4, 4), 0, "cpu")


# ------------------------------------------------------------------ initial histogram from the labeled split


def test_labeled_class_counts_reads_only_the_given_training_cases(tmp_path):
    segs = {
        "case_a": np.array([[[0, 0, 1, 2]]], dtype=np.int8),
        "case_b": np.array([[[-1, 1, 1, 3]]], dtype=np.int8),  # -1: outside the nonzero mask; 3: ignore label
        "case_val": np.array([[[2, 2, 2, 2]]], dtype=np.int8),  # a validation case: must not be counted
    }
    for name, seg in segs.items():
        nnUNetDatasetNumpy.save_case(np.zeros((1, 1, 1, 4), np.float32), seg[None], {}, str(tmp_path / name))
    counts = labeled_class_counts(nnUNetDatasetNumpy, str(tmp_path), ["case_b", "case_a"], num_classes=3)
    assert counts.tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match="no labeled training cases"):
        labeled_class_counts(nnUNetDatasetNumpy, str(tmp_path), [], num_classes=3)


# ------------------------------------------------------------------ FittedGMM rectification


def _clustered_features(n: int, v: int, k: int, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n, v), generator=g)
    centers = 5.0 * torch.eye(k, c)
    features = centers[labels] + 0.3 * torch.randn(n, v, c, generator=g)
    return features.permute(0, 2, 1).contiguous(), labels


def test_gmm_rectified_pseudo_labels_unfitted_keeps_the_network():
    gmm = DiagonalGaussianMixture(3, 3)
    logits = torch.randn(2, 3, 10)
    hard, soft = gmm_rectified_pseudo_labels(logits, torch.randn(2, 3, 10), gmm, strength=1.0)
    assert torch.equal(hard, logits.argmax(1))
    assert torch.allclose(soft, torch.softmax(logits, 1))


def test_fitted_gmm_trainer_path_fits_rectifies_and_posterior_sums_to_one():
    k = 3
    features_l, labels_l = _clustered_features(2, 300, k)
    features_u, true_u = _clustered_features(2, 300, k, seed=1)
    fake = SimpleNamespace(gmms=nn.ModuleList(DiagonalGaussianMixture(k, 3, 2) for _ in range(2)),
                           gmm_em_steps=3, gmm_momentum=0.9, gmm_voxels_per_class=4096,
                           gmm_rectify_strength=1.0, gmm_rectify_rule="product")
    features = torch.cat((features_l, features_u))
    # net 1 is uninformative on unlabeled voxels, net 2 is confidently right
    logits1 = torch.cat((_one_hot_logits(labels_l, k), torch.zeros(2, k, 300)))
    logits2 = torch.cat((_one_hot_logits(labels_l, k), _one_hot_logits(true_u, k, margin=10.0)))
    hard, logs = nnUNetTrainerGuidedNet_FittedGMM.unlabeled_pseudo_labels(
        fake, [logits1, logits2], [features, features], labels_l.unsqueeze(1).float(), 2)
    assert all(g.all_classes_fitted for g in fake.gmms)
    posterior = fake.gmms[0].class_posterior(features_u)
    assert torch.allclose(posterior.sum(1), torch.ones(2, 300), atol=1e-5)
    _, soft = gmm_rectified_pseudo_labels(logits1[2:], features_u, fake.gmms[0], 1.0)
    assert torch.allclose(soft.sum(1), torch.ones(2, 300), atol=1e-5)
    # the GMM decides where the network is uncertain and leaves a confident, correct network alone
    assert (hard[0] == true_u).float().mean() > 0.99
    assert torch.equal(hard[1], true_u)
    assert logs["gmm_fitted_classes"].item() == k
    assert 0.0 <= logs["gmm_relabeled_fraction"].item() <= 1.0


# ------------------------------------------------------------------ the trainer's train_step on tiny networks


class _TrainStepHarness:
    """Just enough of a trainer to run the real ``train_step`` of the GuidedNet trainers on CPU with tiny nets
    (no planned dataset): plain SGD, no deep supervision, nnU-Net's DC+CE."""

    train_step = nnUNetTrainerGuidedNet.train_step
    ssl_terms = nnUNetTrainerGuidedNet.ssl_terms
    after_optimizer_step = nnUNetTrainerGuidedNet.after_optimizer_step
    teacher_ema_decay = None
    current_unsupervised_weight = nnUNetTrainerGuidedNet.current_unsupervised_weight
    weight_schedule = nnUNetTrainerGuidedNet.weight_schedule
    supervised_loss = nnUNetTrainerGuidedNet.supervised_loss
    confidence_threshold = nnUNetTrainerGuidedNet.confidence_threshold
    log_prefix = nnUNetTrainerGuidedNet.log_prefix
    label_manager = SimpleNamespace(has_regions=False)
    guidance_weight = 0.3
    unsupervised_weight = 0.1
    current_epoch = 0
    prototype_batch_mean = True
    kt_class_weighting = True
    enable_deep_supervision = False

    def __init__(self, trainer_cls, max_voxels: int, num_classes: int = 3):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        self.unlabeled_pseudo_labels = trainer_cls.unlabeled_pseudo_labels.__get__(self)
        self.guidance_weight, self.kt_class_weighting = trainer_cls.guidance_weight, trainer_cls.kt_class_weighting
        self.network = _tiny_unet(3, False, num_classes)
        self.network2 = xavier_normal_init_(_tiny_unet(3, False, num_classes))
        self.feature_taps = (DecoderFeatureTap(self.network), DecoderFeatureTap(self.network2))
        self.num_classes = num_classes
        self.max_voxels_for_maps = max_voxels
        self.global_iteration = 0
        self.kt_weighting = KnowledgeTransferWeighting([1000, 100, 10], momentum=0.99)
        self.gmms = nn.ModuleList(DiagonalGaussianMixture(num_classes, 4, 2) for _ in range(2))
        self.gmm_em_steps, self.gmm_momentum, self.gmm_voxels_per_class = 2, 0.9, 512
        self.gmm_rectify_strength, self.gmm_rectify_rule = 1.0, "product"
        self.loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                                   weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
        params = [*self.network.parameters(), *self.network2.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=0.01)

    def rampup_length(self) -> int:
        return 10

    def to_device(self, batch):
        return batch["data"], batch["target"], batch["unlabeled_data"]

    def autocast(self):
        return contextlib.nullcontext()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def backward_and_step(self, loss):
        loss.backward()
        self.grads = [p.grad.abs().sum().item() for p in (next(self.network.parameters()),
                                                          next(self.network2.parameters()))]
        self.optimizer.step()


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerGuidedNet, nnUNetTrainerGuidedNet_FittedGMM])
def test_train_step_runs_with_subsampling_unequal_batches_and_absent_classes(trainer_cls):
    torch.manual_seed(0)
    harness = _TrainStepHarness(trainer_cls, max_voxels=200)  # < 8^3 voxels: the subset path is used
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, :2] = 1  # class 2 absent from the labeled batch
    batch = {"data": torch.randn(1, 1, 8, 8, 8), "target": target, "unlabeled_data": torch.randn(3, 1, 8, 8, 8)}
    w0 = harness.kt_weighting.weights.clone()
    before = [p.detach().clone() for p in (next(harness.network.parameters()), next(harness.network2.parameters()))]
    out = harness.train_step(batch)
    expected = {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight", "agreement",
                "pseudo_label_confidence", "fraction_above_threshold",
                *(f"guidednet_{k}" for k in ("loss_gmm_labeled", "loss_prototype", "loss_gmm_unlabeled",
                                             "loss_kernel_consistency", "loss_ktcps", "kt_weight_min",
                                             "kt_weight_max"))}
    if trainer_cls is nnUNetTrainerGuidedNet_FittedGMM:
        expected |= {"guidednet_gmm_relabeled_fraction", "guidednet_gmm_fitted_classes"}
        assert out["guidednet_gmm_fitted_classes"] == 2.0  # classes 0 and 1 seen; class 2 absent: not rectified yet
        assert out["guidednet_gmm_relabeled_fraction"] == 0.0
    assert set(out) == expected
    assert all(np.isfinite(float(v)) for v in out.values())
    assert 0.0 <= out["agreement"] <= 1.0 and 1 / 3 <= out["pseudo_label_confidence"] <= 1.0
    assert 0.0 <= out["fraction_above_threshold"] <= 1.0
    assert out["unsupervised_weight"] == pytest.approx(0.1 * math.exp(-5))
    # the unsupervised term is what w(t) multiplies: 2 lam C + L_ktcps
    assert out["loss_unsupervised"] == pytest.approx(2 * 0.3 * out["guidednet_loss_kernel_consistency"]
                                                     + out["guidednet_loss_ktcps"], rel=1e-5)
    assert harness.global_iteration == 1
    assert all(g > 0 for g in harness.grads), "both networks must receive gradient"
    after = [next(harness.network.parameters()), next(harness.network2.parameters())]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(harness.kt_weighting.weights, w0)


def test_ablation_variants_drop_the_guidance_or_the_kt_class_weights():
    batch = {"data": torch.randn(1, 1, 8, 8, 8), "target": torch.randint(0, 3, (1, 1, 8, 8, 8)).float(),
             "unlabeled_data": torch.randn(2, 1, 8, 8, 8)}
    out = {}
    for cls in (nnUNetTrainerGuidedNet, nnUNetTrainerGuidedNet_noGuidance, nnUNetTrainerGuidedNet_uniformKTCPS):
        torch.manual_seed(0)
        harness = _TrainStepHarness(cls, max_voxels=200)
        w0 = harness.kt_weighting.weights.clone()
        out[cls] = harness.train_step(batch)
        assert not torch.equal(harness.kt_weighting.weights, w0)  # the KT-CPS state updates in every variant
    base, no_guidance, uniform = out.values()
    assert base["guidednet_kt_weight_min"] == 0.0  # DistDW: the most frequent class gets weight 0
    assert uniform["guidednet_kt_weight_min"] == uniform["guidednet_kt_weight_max"] == 1.0
    # same initialisation and batch: the guidance terms are computed alike; only their weight in the loss differs
    assert no_guidance["guidednet_loss_gmm_labeled"] == pytest.approx(base["guidednet_loss_gmm_labeled"])
    assert no_guidance["loss_unsupervised"] == pytest.approx(no_guidance["guidednet_loss_ktcps"])
    assert no_guidance["loss"] == pytest.approx(no_guidance["loss_supervised"] + no_guidance["unsupervised_weight"]
                                                * no_guidance["guidednet_loss_ktcps"], rel=1e-5)
    assert base["loss"] > no_guidance["loss"]
