"""Cross pseudo supervision trainers (docs/methods/cps.md): ``nnUNetTrainerCPS``, ``nnUNetTrainerCPS_wholeBatch``,
``nnUNetTrainerCPS_ensemble`` (predicts with both networks' averaged softmax) and ``export_cps_ensemble`` (turns a
finished CPS run into an ensemble model folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl.network_pair import NetworkPair, xavier_normal_init_
from nnssl.ramps import sigmoid_rampup
from nnssl_trainers.base import nnUNetTrainerSSLBase, unwrap


def argmax_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``mean_v [argmax_k z_a[v] == argmax_k z_b[v]]``: fraction of voxels where both hard pseudo-labels agree
    (CPS diagnostic, docs/methods/cps.md). Logits ``(N, K, *spatial)``; returns a float32 scalar without a graph."""
    return (logits_a.detach().argmax(1) == logits_b.detach().argmax(1)).float().mean()


def mean_pseudo_label_confidence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``(mean_v max_k softmax(z_a)[v] + mean_v max_k softmax(z_b)[v]) / 2``: mean probability of the pseudo-label
    class over both networks (CPS diagnostic, docs/methods/cps.md). Returns a float32 scalar without a graph."""
    conf_a = torch.softmax(logits_a.detach().float(), 1).amax(1).mean()
    conf_b = torch.softmax(logits_b.detach().float(), 1).amax(1).mean()
    return 0.5 * (conf_a + conf_b)


def cps_terms(logits_1: torch.Tensor, logits_2: torch.Tensor, n_labeled: int, cps_on_labeled: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unsupervised part of one CPS step on full-resolution logits of the batch ``[labeled; unlabeled]``.

    Returns ``(L_cps, agreement, confidence)`` with ``L_cps = CE(z_1, ŷ_2) + CE(z_2, ŷ_1)``, ``ŷ = argmax sg(z)``
    (docs/methods/cps.md) over the unlabeled samples ``[n_labeled:]`` (SSL4MIS) or the whole batch
    (``cps_on_labeled``, DHC ``train_cps.py``); the diagnostics are always over the unlabeled samples.
    """
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"logits_1 {tuple(logits_1.shape)} and logits_2 {tuple(logits_2.shape)} must match")
    if not 0 <= n_labeled < logits_1.shape[0]:
        raise ValueError(f"n_labeled={n_labeled} must leave at least one unlabeled sample in a batch of "
                         f"{logits_1.shape[0]}")
    start = 0 if cps_on_labeled else n_labeled
    loss_cps = cross_pseudo_supervision_loss(logits_1[start:], logits_2[start:])
    unlabeled_1, unlabeled_2 = logits_1[n_labeled:], logits_2[n_labeled:]
    return loss_cps, argmax_agreement(unlabeled_1, unlabeled_2), mean_pseudo_label_confidence(unlabeled_1,
                                                                                                 unlabeled_2)


ENSEMBLE_TRAINER_NAME = "nnUNetTrainerCPS_ensemble"


def cps_checkpoint_as_ensemble(checkpoint: dict) -> dict:
    """A copy of an ``nnUNetTrainerCPS`` (or ``_wholeBatch``) checkpoint that ``nnUNetTrainerCPS_ensemble`` can
    predict with: ``network_weights`` = ``{"net1.*": network 1, "net2.*": network 2}``, ``trainer_name`` set to the
    ensemble trainer. For inference only (the optimizer state still belongs to network 1)."""
    try:
        net1 = checkpoint["network_weights"]
        net2 = checkpoint["nnssl_state"]["extra_networks"]["network2"]
    except (KeyError, TypeError):
        raise ValueError(f"not a CPS checkpoint (needs network_weights and nnssl_state/extra_networks/network2); "
                         f"trainer_name={checkpoint.get('trainer_name') if isinstance(checkpoint, dict) else None!r}"
                         ) from None
    weights = {**{f"net1.{k}": v for k, v in net1.items()}, **{f"net2.{k}": v for k, v in net2.items()}}
    return {**checkpoint, "network_weights": weights, "trainer_name": ENSEMBLE_TRAINER_NAME}


def export_cps_ensemble(cps_fold_dir: str | os.PathLike, checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """Write the ensemble of an ``nnUNetTrainerCPS`` run next to it, so that ``nnUNetv2_predict -tr
    nnUNetTrainerCPS_ensemble`` averages both networks without retraining.

    ``cps_fold_dir`` is ``.../<TRAINER>__<PLANS>__<CONFIG>/fold_X``; the result is
    ``.../nnUNetTrainerCPS_ensemble__<PLANS>__<CONFIG>/fold_X/<checkpoint_name>`` plus the plans.json and
    dataset.json nnU-Net's predictor reads. Usage::

        python -c "from nnssl_trainers.cps import export_cps_ensemble as e; e('$nnUNet_results/Dataset.../fold_0')"
    """
    fold = Path(cps_fold_dir)
    source = fold / checkpoint_name
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint (cps_fold_dir must be a CPS run's fold_X folder)")
    trainer, sep, rest = fold.parent.name.partition("__")
    if not sep or not fold.name.startswith("fold_"):
        raise ValueError(f"{fold}: expected <TRAINER>__<PLANS>__<CONFIG>/fold_X as nnU-Net writes it")
    checkpoint = cps_checkpoint_as_ensemble(torch.load(source, map_location="cpu", weights_only=False))
    target_model = fold.parent.parent / f"{ENSEMBLE_TRAINER_NAME}__{rest}"
    (target_model / fold.name).mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(fold.parent / name, target_model / name)
    target = target_model / fold.name / checkpoint_name
    torch.save(checkpoint, f"{target}.tmp")
    os.replace(f"{target}.tmp", target)  # atomic: never a half-written checkpoint under the final name
    return target


def _as_list(output: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


class nnUNetTrainerCPS(nnUNetTrainerSSLBase):
    """Cross pseudo supervision (Chen et al., CVPR 2021) as SSL4MIS ``train_cross_pseudo_supervision_3D.py`` runs it
    (docs/methods/cps.md).

    Two networks of the plans' architecture: network 1 is ``self.network`` with nnU-Net's kaiming-normal init
    (``InitWeights_He``), network 2 the extra trainable network ``"network2"`` re-initialised xavier-normal with
    norm weight 1 / bias 0 (:func:`nnssl.network_pair.xavier_normal_init_`), as SSL4MIS and DHC do. Each has its own
    optimizer and lr scheduler (nnU-Net's SGD + poly, from ``configure_optimizers``); both, with both optimizer
    states, are saved in every checkpoint and restored by ``--c``. One loss updates both:

        L = DC+CE(z_l^1, y) + DC+CE(z_l^2, y) + λ(t) · [CE(z_u^1, ŷ_u^2) + CE(z_u^2, ŷ_u^1)],  ŷ = argmax sg(z)
        λ(t) = 0.1 · sigmoid_rampup(t, rampup_length())

    with nnU-Net's Dice+CE and deep supervision for the supervised terms and the CPS term on the full-resolution
    output. ``nnUNetTrainerCPS_wholeBatch`` applies the CPS term to labeled + unlabeled patches (DHC
    ``train_cps.py``). Logged per epoch: ``loss_cps``, ``cps_weight``, ``loss_supervised_1/2``, ``agreement``
    (fraction of unlabeled voxels where both argmaxes agree) and ``pseudo_label_confidence`` (mean max softmax on
    unlabeled voxels, both networks).

    Inference: ``nnUNetv2_predict -tr nnUNetTrainerCPS`` uses **network 1** (``network_weights``); network 2 is in
    the checkpoint under ``nnssl_state``. To predict with both networks' averaged softmax, either train
    ``nnUNetTrainerCPS_ensemble`` (same training) and predict with ``-tr nnUNetTrainerCPS_ensemble``, or convert a
    finished CPS run with :func:`export_cps_ensemble` and predict with ``-tr nnUNetTrainerCPS_ensemble``.

    Deviations forced by nnU-Net: optimiser, poly lr, patch size, batch composition (nnU-Net's batch size of
    labeled patches plus as many unlabeled ones; SSL4MIS 2+2 patches of 96^3) and augmentation are nnU-Net's; the
    supervised loss is nnU-Net's Dice+CE (weights 1 + 1, Dice without background) with deep supervision instead of
    SSL4MIS's ``0.5 · (CE + Dice)``; the ramp is 30 000 iterations as SSL4MIS (``iter // 150`` with L=200), evaluated
    every iteration instead of in steps of 150 and capped at 40 % of the schedule so short schedules reach the full
    weight. Region-based datasets are rejected: hard pseudo-labels need mutually exclusive classes. The base's
    ``pseudo_label_dice`` diagnostic scores network 1 (the pseudo-labels network 2 learns from).
    """

    cps_weight: float = 0.1
    cps_on_labeled: bool = False

    def initialize(self):
        if not self.was_initialized and self.label_manager.has_regions:
            raise RuntimeError(f"{self.__class__.__name__}: region-based training (dataset.json 'labels' with "
                               f"regions) is not supported; cross pseudo supervision needs softmax classes")
        super().initialize()

    def build_extra_networks(self) -> None:
        self.register_extra_network("network2", xavier_normal_init_(self.new_network()), trainable=True)

    @property
    def network2(self) -> nn.Module:
        return self.extra_networks["network2"]

    def current_cps_weight(self) -> float:
        return self.cps_weight * sigmoid_rampup(self.global_iteration, self.rampup_length())

    def forward_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs of network 1 and network 2 on ``x`` (deep-supervision lists, full resolution first)."""
        return _as_list(self.network(x)), _as_list(self.network2(x))

    def supervised_loss(self, outputs: list[torch.Tensor], target, n_labeled: int) -> torch.Tensor:
        labeled = [o[:n_labeled] for o in outputs]
        return self.loss(labeled if self.enable_deep_supervision else labeled[0], target)

    def train_step(self, batch: dict) -> dict:
        data, target, unlabeled = self.to_device(batch)
        n_l = data.shape[0]
        self.zero_grad()
        weight = self.current_cps_weight()
        with self.autocast():
            out1, out2 = self.forward_both(torch.cat((data, unlabeled)))
            supervised_1 = self.supervised_loss(out1, target, n_l)
            supervised_2 = self.supervised_loss(out2, target, n_l)
            loss_cps, agreement, confidence = cps_terms(out1[0], out2[0], n_l, self.cps_on_labeled)
            loss = supervised_1 + supervised_2 + weight * loss_cps
        self.backward_and_step(loss)
        self.global_iteration += 1
        # one device sync for all logged scalars
        logged = torch.stack([t.detach().float() for t in (supervised_1, supervised_2, loss_cps, agreement,
                                                            confidence,
                                                            self.confidence_stats(out1[0][n_l:], out2[0][n_l:])[1])]
                             ).cpu().tolist()
        return {"loss": loss.detach().cpu().numpy(), "loss_supervised_1": logged[0], "loss_supervised_2": logged[1],
                "loss_cps": logged[2], "cps_weight": weight, "agreement": logged[3],
                "pseudo_label_confidence": logged[4], "fraction_above_threshold": logged[5]}


class nnUNetTrainerCPS_wholeBatch(nnUNetTrainerCPS):
    """CPS on labeled + unlabeled patches, as DHC ``train_cps.py`` (docs/methods/cps.md)."""

    cps_on_labeled = True


class nnUNetTrainerCPS_ensemble(nnUNetTrainerCPS):
    """CPS trained exactly as ``nnUNetTrainerCPS``, but ``self.network`` is a :class:`nnssl.network_pair.NetworkPair`
    holding both networks, so ``network_weights`` holds both (keys ``net1.*``, ``net2.*``) and
    ``nnUNetv2_predict -tr nnUNetTrainerCPS_ensemble`` (and nnU-Net's own validation) predicts with the **average
    of both networks' softmax** (returned as ``log`` of the mean probabilities, a valid logit tensor, so nnU-Net's
    sliding window, mirroring and fold averaging work unchanged on it).

    Training differences, none of them in the math: both networks share one SGD optimizer and lr scheduler
    (SGD with momentum and weight decay acts on each parameter alone, so one optimizer over both networks equals
    two with the same settings), gradients are still clipped to norm 12 per network, and the checkpoint is
    nnU-Net's own (both networks and the optimizer in ``network_weights`` / ``optimizer_state``; ``--c`` restores
    them through nnU-Net's ``load_checkpoint``). Network 2 gets the xavier-normal init inside
    ``build_network_architecture``. nnU-Net's validation, the final validation and ``pseudo_label_dice`` score the
    ensemble.
    """

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        def build() -> nn.Module:
            return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)

        return NetworkPair(build(), xavier_normal_init_(build()))

    def build_extra_networks(self) -> None:
        """Network 2 lives inside ``self.network`` (the pair): no extra network."""

    @property
    def network2(self) -> nn.Module:
        return unwrap(self.network).net2

    def forward_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out1, out2 = self.network(x, return_both=True)  # through the compile / DDP wrappers of the pair
        return _as_list(out1), _as_list(out2)

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net's version sets ``decoder.deep_supervision`` on self.network, which the pair does not have
        unwrap(self.network).set_deep_supervision(enabled)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """One backward, clip each network of the pair to norm 12 (as the base clips each trainable network),
        one optimizer step (GradScaler on CUDA)."""
        pair = unwrap(self.network)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        for net in (pair.net1, pair.net2):
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
