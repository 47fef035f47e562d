"""DST, debiased self-training (B. Chen, J. Jiang, X. Wang, P. Wan, J. Wang, M. Long, "Debiased Self-Training for
Semi-Supervised Learning", NeurIPS 2022: pseudo-labels from a separate pseudo head, and a worst-case head trained
adversarially through a gradient-reversal layer), as DHC's zoo runs it on its CPS base (``xmed-lab/DHC
code/train_dst.py`` and ``code/models/vnet_dst.py``; docs/methods/dst.md)::

    t_X, m_X = argmax softmax(z_X^pseudo), [max softmax(z_X^pseudo) > 0.95]           X ∈ {A, B}
    L_cps = mean(CE(z_A, t_B)·m_B) + mean(CE(z_B, t_A)·m_A)             (nnssl.losses.masked_ce.masked_cps_loss)
    L_wc(X) = 2·CE(w_l, argmax sg(z_l)) + mean_v −log(min(1 − softmax(w_u)[argmax sg(z_u)] + 1e-6, 1))
    w = worst head(GRL_λ(encoder skips)),   λ_i = 2(hi − lo)/(1 + exp(−α i/N)) − (hi − lo) + lo

with ``z`` the main head, ``w`` the worst-case head, ``l`` / ``u`` the labeled / unlabeled rows and ``i`` the
iteration (DHC ``WarmStartGradientReverseLayer(alpha=1, lo=0, hi=0.1, max_iters=500)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from nnssl.losses.masked_ce import check_logits, check_same_shape, confident_argmax
from nnssl.tensors import class_argmax


def warm_start_grl_coefficient(iteration: int, alpha: float = 1.0, lo: float = 0.0, hi: float = 0.1,
                               max_iters: int = 500) -> float:
    """``λ_i = 2(hi − lo) / (1 + exp(−α i / N)) − (hi − lo) + lo``: ``lo`` at ``i = 0``, rising to ``hi`` (DHC
    ``WarmStartGradientReverseLayer``, stepped once per iteration)."""
    if iteration < 0 or max_iters <= 0 or not all(math.isfinite(v) for v in (alpha, lo, hi)):
        raise ValueError(f"need iteration >= 0, max_iters > 0 and finite alpha/lo/hi, got {iteration}, {max_iters}, "
                         f"{alpha}, {lo}, {hi}")
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * iteration / max_iters)) - (hi - lo) + lo)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coeff, None


def gradient_reversal(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """``R(x) = x`` forward, ``dR/dx = −coeff · I`` backward (DHC ``GradientReverseFunction``)."""
    if not math.isfinite(coeff):
        raise ValueError(f"coeff must be finite, got {coeff!r}")
    return _ReverseGradient.apply(x, float(coeff))


def worst_case_estimation_loss(main_labeled: torch.Tensor, worst_labeled: torch.Tensor, main_unlabeled: torch.Tensor,
                               worst_unlabeled: torch.Tensor, labeled_weight: float = 2.0) -> torch.Tensor:
    """``labeled_weight · CE(w_l, argmax sg(z_l)) + mean_v −log(min(1 − softmax(w_u)[argmax sg(z_u)] + 1e-6, 1))``
    (DHC ``WorstCaseEstimationLoss``): the worst head agrees with the main head on labeled rows and disagrees on
    unlabeled ones. The main head's logits are detached (its argmax is the target)."""
    check_same_shape(main_labeled, worst_labeled)
    check_same_shape(main_unlabeled, worst_unlabeled)
    loss_l = F.cross_entropy(worst_labeled.float(), class_argmax(main_labeled.detach()))
    not_predicted = 1.0 - torch.softmax(worst_unlabeled.float(), dim=1)
    loss_u = F.nll_loss(torch.log(torch.clamp(not_predicted + 1e-6, max=1.0)), class_argmax(main_unlabeled.detach()))
    return labeled_weight * loss_l + loss_u


@torch.no_grad()
def pseudo_head_labels(pseudo_logits: torch.Tensor, threshold: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax p, [max p > threshold])`` of the pseudo head, ``p = softmax(z^pseudo)`` (strict, as DHC)."""
    check_logits(pseudo_logits, "pseudo_logits")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return confident_argmax(torch.softmax(pseudo_logits.detach().float(), dim=1), threshold, strict=True)
