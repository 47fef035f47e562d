"""Tests for nnssl.gmm: GuidedNet's kernel "GMM" terms (docs/methods/guidednet.md) and the literal diagonal GMM."""

from __future__ import annotations

import math

import pytest
import torch

from nnssl.gmm import (
    DiagonalGaussianMixture,
    _component_log_density,
    _em_steps,
    _GMMParams,
    class_prototypes,
    cross_network_kernel_consistency,
    kernel_responsibility,
    labeled_gmm_loss,
    pair_unlabeled_with_labeled,
    prototype_repulsion,
    rectify_pseudo_labels,
    subsample_voxels,
    unlabeled_gmm_loss,
)


def _separated_batch(spatial=(3, 4, 5), num_classes=4, channels=6, spacing=5.0, seed=0):
    """Labels and features where every voxel's feature equals its class prototype ``k * spacing * ones``.

    Sample 0 never contains the last class (an absent class).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (2, *spatial), generator=g)
    labels[0][labels[0] == num_classes - 1] = 0
    labels[1].view(-1)[:num_classes] = torch.arange(num_classes)  # sample 1 has every class
    protos = spacing * torch.arange(num_classes, dtype=torch.float32)[:, None].expand(num_classes, channels)
    features = protos[labels].movedim(-1, 1).contiguous()  # (N, C, *spatial)
    return features, labels, protos


# ---------------------------------------------------------------- prototypes and kernel maps


def test_class_prototypes_means_and_presence_2d_and_3d():
    for spatial in [(4, 5), (2, 3, 4)]:
        features, labels, protos = _separated_batch(spatial=spatial)
        features = features + 0.0  # plain float32
        p, present = class_prototypes(features, labels, num_classes=4)
        assert p.shape == (2, 4, 6) and present.shape == (2, 4)
        assert present.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
        # present classes: the mean (up to the official /(n + 1e-6)); absent: exactly 0
        assert torch.allclose(p[1], protos, atol=1e-4)
        assert torch.allclose(p[0, :3], protos[:3], atol=1e-4)
        assert torch.equal(p[0, 3], torch.zeros(6))


def test_class_prototypes_hand_values_and_ignore_label():
    features = torch.tensor([[[1.0, 3.0, 10.0, 100.0]]])  # (N=1, C=1, V=4)
    labels = torch.tensor([[1, 1, 0, 7]])  # 7 >= K: ignored
    p, present = class_prototypes(features, labels, num_classes=3)
    assert present.tolist() == [[1.0, 1.0, 0.0]]
    assert p[0, :, 0].tolist() == pytest.approx([10.0 / (1 + 1e-6), 4.0 / (2 + 1e-6), 0.0], rel=1e-6)


def test_class_prototypes_accepts_channel_dim_and_float_labels():
    features, labels, _ = _separated_batch()
    a = class_prototypes(features, labels, 4)
    b = class_prototypes(features, labels[:, None].float(), 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_class_prototypes_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="labels"):
        class_prototypes(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long), 2)


def test_kernel_map_in_unit_interval_and_one_iff_equal_to_prototype():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 5, 4, 6, generator=g)
    prototypes = torch.randn(2, 3, 5, generator=g)
    features[0, :, 1, 2] = prototypes[0, 2]  # exact hits
    features[1, :, 3, 0] = prototypes[1, 0]
    r = kernel_responsibility(features, prototypes)
    assert r.shape == (2, 3, 4, 6) and r.dtype == torch.float32
    assert (r > 0).all() and (r <= 1).all()
    ones = (r == 1).nonzero().tolist()
    assert sorted(ones) == [[0, 2, 1, 2], [1, 0, 3, 0]]
    # a small but representable perturbation drops it below 1
    features[0, 0, 1, 2] += 0.05
    assert kernel_responsibility(features, prototypes)[0, 2, 1, 2] < 1


def test_kernel_map_hand_value_and_presence_masking():
    features = torch.tensor([[[0.0], [2.0]]])  # (1, C=2, V=1)
    prototypes = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # d_0 = 1, d_1 = 1
    r = kernel_responsibility(features, prototypes)
    assert r[0, :, 0].tolist() == pytest.approx([math.exp(-1.0)] * 2)
    r = kernel_responsibility(features, prototypes, present=torch.tensor([[1.0, 0.0]]))
    assert r[0, :, 0].tolist() == pytest.approx([math.exp(-1.0), 0.0])


def test_kernel_map_matches_naive_broadcast_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    prototypes = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    weights = torch.rand(2, 3, 3, 5, generator=g)

    r = kernel_responsibility(features, prototypes)
    (r * weights).sum().backward()
    gf, gp = features.grad.clone(), prototypes.grad.clone()
    features.grad = None
    prototypes.grad = None

    d = (features[:, None] - prototypes[:, :, :, None, None]).abs().mean(2)  # (N, K, H, W)
    r_naive = torch.exp(-(d**2))
    (r_naive * weights).sum().backward()
    assert torch.allclose(r, r_naive, atol=1e-6)
    assert torch.allclose(gf, features.grad, atol=1e-5)
    assert torch.allclose(gp, prototypes.grad, atol=1e-5)


def test_mean_abs_distance_gradcheck_float64():
    from nnssl.gmm import _MeanAbsDistance

    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_MeanAbsDistance.apply, (feat, protos))


# ---------------------------------------------------------------- separated clusters


def test_separated_clusters_leave_labels_unchanged_and_loss2_vanishes():
    features, labels, _ = _separated_batch()
    protos, present = class_prototypes(features, labels, 4)
    r = kernel_responsibility(features, protos, present)
    assert torch.equal(r.argmax(1), labels)
    probs = torch.softmax(torch.randn(2, 4, *labels.shape[1:]), 1)
    loss1_only = labeled_gmm_loss(probs, r, torch.full_like(labels, 99), present)  # every voxel ignored by loss2
    loss2 = labeled_gmm_loss(probs, r, labels, present) - loss1_only
    assert abs(loss2.item()) < 1e-5  # only the 1e-6 eps terms remain
    # and the kernel map is (numerically) the one-hot label map of the present classes
    one_hot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    assert torch.allclose(r, one_hot, atol=1e-6)


def test_unlabeled_voxel_equal_to_prototype_gets_that_class():
    features, labels, protos_true = _separated_batch()
    protos, present = class_prototypes(features, labels, 4)
    g = torch.Generator().manual_seed(4)
    target_u = torch.randint(0, 4, (3, 5, 6), generator=g)  # 3 unlabelled samples, 2 labelled
    features_u = protos_true[target_u].movedim(-1, 1).contiguous()
    pair = pair_unlabeled_with_labeled(3, 2)
    r_u = kernel_responsibility(features_u, protos[pair])  # no presence masking (official GMM_predict)
    # sample 0 has no prototype for class 3 (mu = 0 coincides with class 0): only check classes it has
    has_proto = present[pair].gather(1, target_u.flatten(1)).reshape_as(target_u).bool()
    assert has_proto.any() and (~has_proto).any()
    assert torch.equal(r_u.argmax(1)[has_proto], target_u[has_proto])


# ---------------------------------------------------------------- losses


def test_labeled_gmm_loss_hand_value():
    probs = torch.full((1, 2, 2, 2), 0.5)
    r = torch.full((1, 2, 2, 2), 0.5)
    labels = torch.tensor([[[0, 1], [1, 0]]])
    present = torch.ones(1, 2)
    # BCE(t, 0.5) with the 1e-6 eps is -log(0.5 + 1e-6) for t = 0.5 and for t in {0, 1} alike
    bce = -math.log(0.5 + 1e-6)
    expected_each = 2 * (0.5 * bce) / (2 + 1e-6)  # two present classes, /(sum c + 1e-6)
    assert labeled_gmm_loss(probs, r, labels, present).item() == pytest.approx(2 * expected_each, rel=1e-6)
    assert unlabeled_gmm_loss(probs, r, present).item() == pytest.approx(expected_each, rel=1e-6)


def test_loss2_ignores_invalid_labels_and_all_ignored_gives_finite_zero():
    probs = torch.full((1, 2, 3), 0.5)
    r = torch.tensor([[[0.9, 0.5, 0.1], [0.1, 0.5, 0.9]]])
    present = torch.ones(1, 2)
    full = labeled_gmm_loss(probs, r, torch.tensor([[0, 5, 1]]), present)
    only_valid = labeled_gmm_loss(probs[..., [0, 2]], r[..., [0, 2]], torch.tensor([[0, 1]]), present)
    loss1_mid = labeled_gmm_loss(probs[..., [1]], r[..., [1]], torch.tensor([[9]]), present)
    # loss1 is a mean over all voxels, loss2 over valid ones
    loss1_valid = labeled_gmm_loss(probs[..., [0, 2]], r[..., [0, 2]], torch.tensor([[9, 9]]), present)
    loss2_valid = only_valid - loss1_valid
    assert full.item() == pytest.approx(((2 * loss1_valid + loss1_mid) / 3 + loss2_valid).item(), rel=1e-6)
    assert torch.isfinite(loss1_mid)


def test_gmm_losses_give_gradients_to_probs_and_responsibility():
    features, labels, _ = _separated_batch()
    features = (features + 0.3 * torch.randn_like(features)).requires_grad_()
    logits = torch.randn(2, 4, *labels.shape[1:], requires_grad=True)
    protos, present = class_prototypes(features, labels, 4)
    r = kernel_responsibility(features, protos, present)
    loss = labeled_gmm_loss(torch.softmax(logits, 1), r, labels, present)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


def test_prototype_repulsion_properties():
    c = torch.tensor([[1.0, 1.0, 0.0]])
    same = torch.zeros(1, 3, 4)
    assert prototype_repulsion(same, c).item() == pytest.approx(1.0, abs=1e-5)

    values = []
    for delta in [0.0, 0.3, 0.7, 1.5, 3.0]:
        protos = torch.zeros(1, 3, 4)
        protos[0, 1] = delta
        values.append(prototype_repulsion(protos, c).item())
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[2] == pytest.approx(math.exp(-(0.7**2)), rel=1e-5)

    one_class = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert prototype_repulsion(torch.randn(2, 3, 4), one_class).item() == 0.0
    assert prototype_repulsion(torch.randn(2, 3, 4), torch.zeros(2, 3)).item() == 0.0


def test_prototype_repulsion_sum_quirk_and_true_mean_option():
    protos = torch.zeros(2, 2, 1)
    protos[:, 1, 0] = 0.5  # class 1 prototype 0.5 in both samples
    c = torch.ones(2, 2)
    # official: batch "mean" is ~ the sum over samples -> distance 1.0; true mean -> 0.5
    assert prototype_repulsion(protos, c).item() == pytest.approx(math.exp(-1.0), rel=1e-5)
    assert prototype_repulsion(protos, c, batch_mean=True).item() == pytest.approx(math.exp(-0.25), rel=1e-6)


def test_pairing_for_any_sizes():
    assert pair_unlabeled_with_labeled(4, 4).tolist() == [0, 1, 2, 3]
    assert pair_unlabeled_with_labeled(5, 2).tolist() == [0, 1, 0, 1, 0]
    assert pair_unlabeled_with_labeled(2, 3).tolist() == [0, 1]
    assert pair_unlabeled_with_labeled(0, 3).tolist() == []
    assert pair_unlabeled_with_labeled(3, 2).dtype == torch.long
    with pytest.raises(ValueError, match="n_labeled"):
        pair_unlabeled_with_labeled(3, 0)


def test_cross_network_kernel_consistency():
    g = torch.Generator().manual_seed(5)
    r1 = torch.rand(2, 3, 4, 4, generator=g, requires_grad=True)
    assert cross_network_kernel_consistency(r1, r1.detach().clone()).item() == 0.0
    # softmax over classes: adding a per-voxel constant changes nothing
    assert cross_network_kernel_consistency(r1, r1.detach() + 0.7).item() == pytest.approx(0.0, abs=1e-12)
    r2 = torch.rand(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = cross_network_kernel_consistency(r1, r2)
    assert loss.item() > 0
    loss.backward()
    assert r1.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_with_absent_class(dtype):
    features, labels, _ = _separated_batch(num_classes=5)
    labels[labels == 2] = 0  # class 2 absent from the whole batch, class 4 absent from sample 0
    features = (features + 0.5 * torch.randn_like(features)).to(dtype).requires_grad_()
    logits = torch.randn(4, 5, *labels.shape[1:]).to(dtype).requires_grad_()
    protos, present = class_prototypes(features, labels, 5)
    assert present[:, 2].sum() == 0
    r_l = kernel_responsibility(features, protos, present)
    probs = torch.softmax(logits.float(), 1)
    pair = pair_unlabeled_with_labeled(2, 2)
    r_u = kernel_responsibility(features.detach() * 1.1, protos[pair])
    total = (
        labeled_gmm_loss(probs[:2], r_l, labels, present)
        + unlabeled_gmm_loss(probs[2:], r_u, present[pair])
        + prototype_repulsion(protos, present)
        + cross_network_kernel_consistency(r_l, r_l.detach() * 0.5)
    )
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(features.grad.float()).all() and torch.isfinite(logits.grad.float()).all()


def test_bce_is_safe_for_probabilities_at_the_bounds():
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    r = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    loss = unlabeled_gmm_loss(probs, r, torch.ones(1, 2))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(1e-6) / 2, rel=1e-4)


def test_subsample_voxels_keeps_correspondence():
    features, labels, protos = _separated_batch(spatial=(4, 5, 6))
    g = torch.Generator().manual_seed(6)
    f_s, l_s = subsample_voxels([features, labels], (4, 5, 6), max_voxels=50, generator=g)
    assert f_s.shape == (2, 6, 50) and l_s.shape == (2, 50)
    assert torch.equal(f_s, protos[l_s].movedim(-1, 1))  # each kept feature still matches its label
    p_s, present_s = class_prototypes(f_s, l_s, 4)
    r_s = kernel_responsibility(f_s, p_s, present_s)
    assert torch.equal(r_s.argmax(1), l_s)
    f_all, l_all = subsample_voxels([features, labels], (4, 5, 6), max_voxels=10_000)
    assert f_all.shape == (2, 6, 120) and torch.equal(l_all, labels.reshape(2, -1))


# ---------------------------------------------------------------- literal diagonal GMM


def _cluster_data(n_per_class=400, seed=0):
    """Three well separated classes in 2D; class 2 is itself bimodal."""
    g = torch.Generator().manual_seed(seed)
    centers = [[(0.0, 0.0)], [(6.0, 6.0)], [(-6.0, 6.0), (-6.0, -6.0)]]
    feats, labs = [], []
    for k, cs in enumerate(centers):
        for cx, cy in cs:
            m = n_per_class // len(cs)
            feats.append(torch.tensor([cx, cy]) + 0.4 * torch.randn(m, 2, generator=g))
            labs.append(torch.full((m,), k))
    x = torch.cat(feats)
    y = torch.cat(labs)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    # as a (N=2, C=2, V) feature map
    return x.t().reshape(2, 2, -1).transpose(0, 1).contiguous(), y.reshape(2, -1)


def test_gmm_recovers_separated_clusters_and_posterior_sums_to_one():
    features, labels = _cluster_data()
    gmm = DiagonalGaussianMixture(num_classes=3, num_features=2, num_components=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        used = gmm.fit_step(features, labels, n_em_steps=3, momentum=0.9, generator=g)
    assert used.tolist() == [400, 400, 400]
    assert gmm.all_classes_fitted
    test_f, test_y = _cluster_data(seed=1)
    post = gmm.class_posterior(test_f)
    assert post.shape == (2, 3, 600)
    assert torch.allclose(post.sum(1), torch.ones(2, 600), atol=1e-5)
    assert (post.argmax(1) == test_y).float().mean() > 0.99
    # far away features: every likelihood underflows, the log-sum-exp posterior still sums to 1
    far = gmm.class_posterior(torch.full((1, 2, 3), 1e4))
    assert torch.isfinite(far).all() and torch.allclose(far.sum(1), torch.ones(1, 3), atol=1e-5)


def test_gmm_momentum_blend_hand_value():
    gmm = DiagonalGaussianMixture(num_classes=2, num_features=1, num_components=1)
    labels = torch.tensor([[0, 0, 1, 1]])
    gmm.fit_step(torch.tensor([[[1.0, 3.0, 10.0, 10.0]]]), labels, momentum=0.9)  # first fit: taken as is
    assert gmm.means[:, 0, 0].tolist() == pytest.approx([2.0, 10.0])
    assert gmm.variances[0, 0, 0].item() == pytest.approx(1.0)
    assert gmm.variances[1, 0, 0].item() == pytest.approx(1e-3)  # zero variance hits the floor
    gmm.fit_step(torch.tensor([[[5.0, 7.0, 0.0, 0.0]]]), torch.tensor([[0, 0, 2, 2]]), momentum=0.9)
    # class 0: 0.9 * 2 + 0.1 * 6; class 1 absent from this batch: unchanged
    assert gmm.means[:, 0, 0].tolist() == pytest.approx([2.4, 10.0])


def test_gmm_state_dict_round_trip():
    features, labels = _cluster_data()
    gmm = DiagonalGaussianMixture(3, 2, num_components=2)
    gmm.fit_step(features, labels, generator=torch.Generator().manual_seed(0))
    state = gmm.state_dict()
    assert set(state) == {"means", "variances", "weights", "fitted"}
    clone = DiagonalGaussianMixture(3, 2, num_components=2)
    clone.load_state_dict(state)
    assert torch.equal(clone.class_posterior(features), gmm.class_posterior(features))
    # continuing the fit from the restored state gives the same result
    gmm.fit_step(features, labels, generator=torch.Generator().manual_seed(1))
    clone.fit_step(features, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(clone.means, gmm.means)


def test_gmm_unfitted_classes_and_bf16():
    gmm = DiagonalGaussianMixture(3, 2)
    x = torch.randn(1, 2, 4, 4)
    assert torch.allclose(gmm.class_posterior(x), torch.full((1, 3, 4, 4), 1 / 3))
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    gmm.fit_step(x.to(torch.bfloat16), labels)
    assert gmm.fitted.tolist() == [True, True, False]
    post = gmm.class_posterior(x.to(torch.bfloat16))
    assert post.dtype == torch.float32 and torch.isfinite(post).all()
    assert (post[:, 2] == 0).all() and torch.allclose(post.sum(1), torch.ones(1, 4, 4), atol=1e-5)


def test_gmm_bad_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        DiagonalGaussianMixture(2, 3).fit_step(torch.zeros(1, 4, 5), torch.zeros(1, 5, dtype=torch.long))


def test_rectify_pseudo_labels():
    probs = torch.tensor([[[0.45, 0.9], [0.55, 0.1]]])  # (1, K=2, V=2)
    post = torch.tensor([[[0.9, 0.3], [0.1, 0.7]]])
    assert rectify_pseudo_labels(probs, post, lam=0.0) is probs
    q = rectify_pseudo_labels(probs, post, lam=1.0)
    expected = probs * post / (probs * post).sum(1, keepdim=True)
    assert torch.allclose(q, expected, atol=1e-6)
    assert q.argmax(1).tolist() == [[0, 0]]  # the uncertain voxel flips, the confident one does not
    assert torch.allclose(q.sum(1), torch.ones(1, 2))
    half = rectify_pseudo_labels(probs, post, lam=0.5)
    assert torch.allclose(half, probs * post.sqrt() / (probs * post.sqrt()).sum(1, keepdim=True), atol=1e-6)
    mix = rectify_pseudo_labels(probs, post, lam=0.25, rule="mixture")
    assert torch.allclose(mix, 0.75 * probs + 0.25 * post, atol=1e-6)
    # total disagreement -> the network's own distribution is kept
    hard = rectify_pseudo_labels(torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [1.0]]]), lam=1.0)
    assert hard[0, :, 0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="lam"):
        rectify_pseudo_labels(probs, post, lam=-1.0)


def _direct_log_density(x, means, variances):
    """Reference: the exact (x - mu)^2 / var form, float64, for one class: x (V, C), means (M, C) -> (M, V)."""
    x, means, variances = x.double(), means.double(), variances.double()
    quad = ((x.unsqueeze(0) - means.unsqueeze(1)).pow(2) / variances.unsqueeze(1)).sum(-1)
    const = variances.log().sum(-1, keepdim=True) + x.shape[1] * math.log(2 * math.pi)
    return -0.5 * (quad + const)


def test_gmm_batched_density_matches_exact_form_for_large_features():
    # features far from 0 with variances near the floor: the expanded form must not cancel
    g = torch.Generator().manual_seed(0)
    means = 50.0 + torch.randn(3, 2, 4, generator=g)
    variances = 1e-2 + 0.1 * torch.rand(3, 2, 4, generator=g)
    x = means[1, 0] + 0.3 * torch.randn(200, 4, generator=g)
    got = _component_log_density(x.unsqueeze(0), means, variances)  # (K, M, V)
    for k in range(3):
        ref = _direct_log_density(x, means[k], variances[k])
        assert torch.allclose(got[k].double(), ref, rtol=1e-5, atol=1e-2), k


def test_gmm_batched_em_equals_each_class_fitted_alone():
    """All classes in one padded, masked EM == EM of each class on its own voxels (the pre-batching algorithm)."""
    g = torch.Generator().manual_seed(0)
    k, m, c, s = 3, 2, 3, 40
    x = torch.randn(k, s, c, generator=g) + torch.arange(k).view(k, 1, 1) * 4.0
    counts = [40, 17, 1]  # one full class, one padded, one with a single voxel
    valid = torch.arange(s).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    init = _GMMParams(x[:, :m].clone(), torch.ones(k, m, c), torch.full((k, m), 0.5))
    got = _em_steps(x, valid, init, n_steps=3, var_floor=1e-3)
    for j, n in enumerate(counts):
        means, variances, weights = x[j, :m].double(), torch.ones(m, c).double(), torch.full((m,), 0.5).double()
        xj = x[j, :n].double()
        for _ in range(3):
            resp = torch.softmax(_direct_log_density(xj, means, variances) + weights.log().unsqueeze(1), dim=0)
            nk = resp.sum(1)
            alive = (nk > 1e-6).unsqueeze(-1)
            new_means = resp @ xj / nk.clamp_min(1e-6).unsqueeze(-1)
            new_vars = resp @ xj.pow(2) / nk.clamp_min(1e-6).unsqueeze(-1) - new_means.pow(2)
            means = torch.where(alive, new_means, means)
            variances = torch.where(alive, new_vars, variances).clamp_min(1e-3)
            weights = nk / n
        weights = weights / weights.sum()
        assert torch.allclose(got.means[j].double(), means, atol=1e-4), j
        assert torch.allclose(got.variances[j].double(), variances, atol=1e-4), j
        assert torch.allclose(got.weights[j].double(), weights, atol=1e-5), j


def test_gmm_fit_caps_voxels_and_starts_small_classes():
    features, labels = _cluster_data()
    labels = labels.clone()
    labels[0, :2] = 3  # a class with only 2 voxels, fewer than the 3 components
    gmm = DiagonalGaussianMixture(num_classes=4, num_features=2, num_components=3)
    used = gmm.fit_step(features, labels, max_voxels_per_class=100, generator=torch.Generator().manual_seed(0))
    assert used.tolist() == [100, 100, 100, 2]
    assert gmm.all_classes_fitted
    # the two-voxel class: its components start on, and EM keeps them among, its own voxels (convex combinations)
    own = features[0, :, :2].t()  # (2 voxels, C)
    lo, hi = own.min(0).values - 1e-4, own.max(0).values + 1e-4
    assert ((gmm.means[3] >= lo) & (gmm.means[3] <= hi)).all()
    assert torch.isfinite(gmm.variances).all() and (gmm.variances >= gmm.var_floor).all()
    with pytest.raises(ValueError, match="max_voxels_per_class"):
        gmm.fit_step(features, labels, max_voxels_per_class=0)


def test_fit_and_rectified_pseudo_labels_never_wait_for_the_device(monkeypatch):
    """The FittedGMM step's extra work reads nothing back to the host (the trainer's one sync is its logging)."""
    from test_training_base import HostSyncCounter

    from nnssl.losses.guidednet import gmm_rectified_pseudo_labels

    features, labels = _cluster_data()
    gmm = DiagonalGaussianMixture(num_classes=3, num_features=2, num_components=2)
    counter = HostSyncCounter(monkeypatch)
    for _ in range(2):  # the first fit (initial parameters) and a momentum update
        gmm.fit_step(features, labels, max_voxels_per_class=100)
        hard, soft = gmm_rectified_pseudo_labels(torch.randn(2, 3, 600), features, gmm, 1.0)
    assert counter.calls == 0
    monkeypatch.undo()
    assert hard.shape == (2, 600) and torch.allclose(soft.sum(1), torch.ones(2, 600), atol=1e-5)
