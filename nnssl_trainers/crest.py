import torch

from nnssl.losses.class_rebalancing import CReSTWeights
from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl.training.class_weighted_cps import ClassWeightedCPSTrainer
from nnssl.training.step import SSLTerms


class nnUNetTrainerCReST(ClassWeightedCPSTrainer):
    """CReST class-rebalancing weights (Wei et al., CVPR 2021, Eq. 1) on DHC's CPS base, as DHC's method zoo runs it
    (``xmed-lab/DHC code/train_crest.py``; docs/methods/crest.md). Per iteration, on ``x = [x_l; x_u]``::

        μ_k = ((n_k + 1e-8)/(n_max + 1e-8))^(1/3),  n = hist(argmax z_u) of the network's own unlabeled half
        rule(n)_k = μ of the class at the reverse rank of k      (the most frequent class gets the smallest μ)
        w_A ← 0.99 w_A + 0.01 rule(n^A),   w_B ← 0.99 w_B + 0.01 rule(n^B),   both start at rule(n_labeled)
        L = DCCE_{w_A}(z_l^A, y) + DCCE_{w_B}(z_l^B, y) + λ(e) [CE_{w_A}(z^A, ŷ^B) + CE_{w_B}(z^B, ŷ^A)]
        λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    ``CE_w`` is the weighted mean ``Σ w[ŷ] ce / Σ w[ŷ]`` (DHC ``wce``), on the whole batch; ``DCCE_w`` nnU-Net's
    Dice + CE with the same class weights (DHC ``w_ce+dice``) and deep supervision. Network A = ``self.network``
    (kaiming, used for inference), B = ``network2`` (xavier-normal, as DHC). The weights are registered state
    (``extra_state['crest']``, restored by ``--c``). Weight rule: :mod:`nnssl.losses.class_rebalancing`.
    """

    log_prefix = "crest"
    weights_class = CReSTWeights
    momentum: float = 0.99
    # which rows count for the weight update: the unlabeled half (CReST) or the whole batch (SimiS)
    weights_from_whole_batch: bool = False

    def make_class_state(self) -> CReSTWeights:
        return self.weights_class(self.num_classes, self.momentum)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        self.initialise_class_state()
        n_l = data.shape[0]
        outputs_a, outputs_b = self.forward_pair(data, unlabeled)
        full_a, full_b = outputs_a[0], outputs_b[0]
        start = 0 if self.weights_from_whole_batch else n_l
        weights_a, weights_b = self.class_state.update(full_a[start:], full_b[start:])
        supervised_a = self.class_weighted_supervised_loss(outputs_a, target, n_l, weights_a)
        supervised_b = self.class_weighted_supervised_loss(outputs_b, target, n_l, weights_b)
        cps = cross_pseudo_supervision_loss(full_a, full_b, weights_a, weights_b)
        return self.pair_terms(full_a, full_b, n_l, supervised_a, supervised_b, cps,
                               weight_min_a=weights_a.min(), weight_max_a=weights_a.max())
