import torch

from nnssl.losses.class_sampling import CLDStatistics, class_sampling_map, sampled_cross_entropy
from nnssl.losses.cps import hard_pseudo_label
from nnssl.training.class_weighted_cps import ClassWeightedCPSTrainer
from nnssl.training.passes import PAIR_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerCLD(ClassWeightedCPSTrainer):
    """CLD, calibrating label distribution (Lin et al., MICCAI 2022) on DHC's CPS base, as DHC's method zoo runs it
    (``xmed-lab/DHC code/train_cld.py``; docs/methods/cld.md). Per iteration, on ``x = [x_l; x_u]``::

        s^A ← EMA_0.999 of mean_{y = c} softmax(z_l^A)_c  every 8 iterations (first update replaces; start: rand)
        sr^A_c = ((1 − s^A_c) / (max(1 − s^A) + 1e-12))^0.5,  M^A(v) = [u(v) > 1 − sr^A_{ŷ^A(v)}],  u ~ U[0, 1)
        w_c = (n_max / n_c)^(1/3)   fixed, from the labeled training histogram
        L = DCCE_w(z_l^A, y) + DCCE_w(z_l^B, y)
            + λ(e) [mean_v w_{ŷ^B} CE(z^A, ŷ^B) M^A + mean_v w_{ŷ^A} CE(z^B, ŷ^A) M^B]
        λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    Each network's own prediction and confidences draw its own map, which gates its own loss; the CE is weighted
    per voxel and averaged over all voxels (not normalised by weights or map). The whole batch; A = ``self.network``
    (kaiming, predicts), B = ``network2`` (xavier-normal). Weights and both banks are registered state
    (``extra_state['cld']``). Library: :mod:`nnssl.losses.class_sampling`. Deviation: a class absent from the labeled
    cases counts as one voxel (DHC: infinite weight).
    """

    log_prefix = "cld"
    network_passes = PAIR_PASSES
    confidence_momentum: float = 0.999
    confidence_update_every: int = 8  # DHC --confs_iter
    sampling_gamma: float = 0.5

    def make_class_state(self) -> CLDStatistics:
        return CLDStatistics(self.num_classes, self.confidence_momentum, self.confidence_update_every,
                             self.sampling_gamma)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        self.initialise_class_state()
        n_l = data.shape[0]
        outputs_a, outputs_b = self.forward_pair(torch.cat((data, unlabeled)))
        full_a, full_b = outputs_a[0], outputs_b[0]
        rates_a, rates_b = self.class_state.record(full_a[:n_l], full_b[:n_l], target[0] if isinstance(target, list)
                                                  else target)
        weights = self.class_state.class_weights.to(full_a.device)
        supervised_a = self.class_weighted_supervised_loss(outputs_a, target, n_l, weights)
        supervised_b = self.class_weighted_supervised_loss(outputs_b, target, n_l, weights)
        map_a, map_b = class_sampling_map(full_a, rates_a), class_sampling_map(full_b, rates_b)
        cps = (sampled_cross_entropy(full_a, hard_pseudo_label(full_b), map_a, weights)
               + sampled_cross_entropy(full_b, hard_pseudo_label(full_a), map_b, weights))
        return self.pair_terms(full_a, full_b, n_l, supervised_a, supervised_b, cps,
                               sampled_fraction=(map_a.mean() + map_b.mean()) / 2)
