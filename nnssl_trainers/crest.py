from nnssl.losses.class_rebalancing import CReSTWeights
from nnssl.training.class_weighted_cps import RebalancedCPSTrainer
from nnssl.training.passes import PAIR_PASSES


class nnUNetTrainerCReST(RebalancedCPSTrainer):
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
    (``extra_state['crest']``, restored by ``--c``). Weight rule: :mod:`nnssl.losses.class_rebalancing`; the step:
    :class:`nnssl.training.class_weighted_cps.RebalancedCPSTrainer`.
    """

    log_prefix = "crest"
    network_passes = PAIR_PASSES
    weights_class = CReSTWeights
