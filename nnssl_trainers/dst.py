import torch
from torch import distributed as dist

from nnssl.losses.dst import (
    gradient_reversal,
    pseudo_head_labels,
    warm_start_grl_coefficient,
    worst_case_estimation_loss,
)
from nnssl.losses.masked_ce import masked_cps_loss
from nnssl.network_pair import xavier_normal_init_
from nnssl.networks.dst_heads import EncoderSkipsTap, encoder_free_decoder
from nnssl.tensors import as_list
from nnssl.training.dhc_zoo import DHCZooTrainerBase
from nnssl.training.passes import PAIR_PASSES, NetworkPass


class nnUNetTrainerDST(DHCZooTrainerBase):
    """DST, debiased self-training (Chen et al., "Debiased Self-Training for Semi-Supervised Learning", NeurIPS 2022)
    on DHC's CPS base, as ``xmed-lab/DHC code/train_dst.py`` runs it with ``VNet_Decoupled`` (docs/methods/dst.md).

    Each network X ∈ {A, B} has three heads on its encoder: the main head ``z_X`` (the plans' U-Net decoder), a pseudo
    head ``z̃_X`` and a worst-case head ``w_X`` (further decoders of the same architecture reading the encoder's skips,
    the worst one through a gradient-reversal layer GRL_λ)::

        t_X, m_X = argmax softmax(z̃_X), [max softmax(z̃_X) > 0.95]                       whole batch
        L_cps = mean(CE(z_A, t_B)·m_B) + mean(CE(z_B, t_A)·m_A)
        L_wc  = Σ_X 2·CE(w_X,l, argmax z_X,l) + mean −log(min(1 − softmax(w_X,u)[argmax z_X,u] + 1e-6, 1))
        L = DC+CE(z_l^A, y) + DC+CE(z_l^B, y) + λ(e) · (L_cps + L_wc),   λ(e) = 0.1 · r(max(e − 1, 0))
        GRL_λ: identity forward, −λ_i · grad backward,  λ_i = 0.2/(1 + exp(−i/500)) − 0.1  (i: iteration)

    As in the script, nothing trains the pseudo heads (their outputs only give targets and masks): they keep their
    initialisation and are registered frozen. A is ``self.network`` (inference; nnU-Net's kaiming init, so are its
    heads), B the declared second network, re-initialised xavier-normal with its heads, as the script does. Heads:
    ``extra_networks['pseudo_head_a' / 'worst_head_a' / '..._b']``; worst heads have their own optimizers.
    """

    log_prefix = "dst"
    # both networks, then per network a frozen pseudo head (no grad) and a worst-case head on its encoder's skips
    # (decoders without an encoder: about half a network each)
    network_passes = (*PAIR_PASSES, *(NetworkPass("both", backward, f"{role}_head_{name}", scale=0.5)
                                      for name in ("a", "b") for role, backward in (("pseudo", False),
                                                                                  ("worst", True))))
    dst_threshold: float = 0.95
    confidence_threshold = 0.95
    worst_labeled_weight: float = 2.0
    grl_alpha: float = 1.0
    grl_lo: float = 0.0
    grl_hi: float = 0.1
    grl_max_iters: int = 500

    def build_extra_networks(self) -> None:
        for name in ("a", "b"):
            for role, trainable in (("pseudo", False), ("worst", True)):
                head = encoder_free_decoder(self.new_network(deep_supervision=False))
                if name == "b":
                    xavier_normal_init_(head)
                if self.is_ddp and not trainable:  # frozen: every rank must hold rank 0's draw (no DDP broadcast)
                    for tensor in head.state_dict().values():
                        dist.broadcast(tensor, 0)
                self.register_extra_network(f"{role}_head_{name}", head, trainable=trainable)
        self.encoder_taps = (EncoderSkipsTap(self.network), EncoderSkipsTap(self.network2))
        self._skips: list[list[torch.Tensor]] = []

    def forward_pair(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outputs, self._skips = [], []
        for network, tap in zip((self.network, self.network2), self.encoder_taps):
            with tap.capture():
                outputs.append(as_list(network(inputs)))
            self._skips.append(list(tap.take()))
        return outputs[0], outputs[1]

    def grl_coefficient(self) -> float:
        return warm_start_grl_coefficient(self.global_iteration, self.grl_alpha, self.grl_lo, self.grl_hi,
                                          self.grl_max_iters)

    def unsupervised_terms(self, logits_a: torch.Tensor, logits_b: torch.Tensor, n_labeled: int):
        coeff, n = self.grl_coefficient(), n_labeled
        pseudo, targets, masks, worst_case = [], [], [], []
        for name, main, skips in zip(("a", "b"), (logits_a, logits_b), self._skips):
            with torch.no_grad():  # the pseudo heads get no gradient (DHC: targets and masks only)
                pseudo.append(self.extra_networks[f"pseudo_head_{name}"](skips))
            target, mask = pseudo_head_labels(pseudo[-1], self.dst_threshold)
            targets.append(target)
            masks.append(mask)
            worst = self.extra_networks[f"worst_head_{name}"]([gradient_reversal(s, coeff) for s in skips])
            worst_case.append(worst_case_estimation_loss(main[:n], worst[:n], main[n:], worst[n:],
                                                         self.worst_labeled_weight))
        self._skips = []
        cps = masked_cps_loss(logits_a, logits_b, *targets, *masks)
        loss_wc = worst_case[0] + worst_case[1]
        return cps + loss_wc, (pseudo[0][n:], pseudo[1][n:]), {
            "loss_cps": cps, "loss_worst_case": loss_wc, "grl_coefficient": coeff,
            "mask_fraction_a": masks[0][n:].mean(), "mask_fraction_b": masks[1][n:].mean()}
