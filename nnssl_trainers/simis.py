from nnssl.losses.class_rebalancing import SimiSWeights
from nnssl.training.class_weighted_cps import RebalancedCPSTrainer
from nnssl.training.passes import PAIR_PASSES


class nnUNetTrainerSimiS(RebalancedCPSTrainer):
    """SimiS frequency-gap class weights (Chen et al., "An Embarrassingly Simple Baseline for Imbalanced
    Semi-Supervised Learning", 2022) on DHC's CPS base, as DHC's method zoo runs it (``xmed-lab/DHC
    code/train_simis.py``; docs/methods/simis.md). Per iteration, on ``x = [x_l; x_u]``::

        P_k = (n_k + 1e-8)/(Σ n + 1e-8),   n = hist(argmax z) of the network's own WHOLE batch
        w_A ← 0.99 w_A + 0.01 · K (max P^A − P^A),   w_B likewise from n^B
        w_A = w_B = 0.99 · K + 0.01 · K (max P_l − P_l) at the start (P_l: the labeled training histogram)
        L = DCCE_{w_A}(z_l^A, y) + DCCE_{w_B}(z_l^B, y) + λ(e) [CE_{w_A}(z^A, ŷ^B) + CE_{w_B}(z^B, ŷ^A)]
        λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    Everything else is CReST's (the same loss, CE_w a weighted mean; the step:
    :class:`nnssl.training.class_weighted_cps.RebalancedCPSTrainer`).
    The most frequent class (background) gets 0 from every update, so its weight decays to 0; the weighted CE of an
    all-background pseudo-label, 0/0 in DHC, is 0 here (:func:`nnssl.losses.cps.weighted_cross_entropy`).
    Network A (kaiming) predicts; B is xavier-normal. State: ``extra_state['simis']``.
    """

    log_prefix = "simis"
    network_passes = PAIR_PASSES
    weights_class = SimiSWeights
    weights_from_whole_batch = True
