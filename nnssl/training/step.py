"""What a method's step returns to the base (:class:`SSLTerms`), and the step's log: the same keys for every
method, copied to the host once per step.

Logged keys (one name per role, so ``ssl_progress.png`` and the benchmark put methods side by side):

=========================  ===================================================================================
``loss_supervised``        the supervised term (summed over the networks that have one)
``loss_unsupervised``      the method's unsupervised term, before its weight
``unsupervised_weight``    the weight of that term at this step (the method's ramp)
``pseudo_label_confidence`` mean probability of the hard pseudo-label on unlabeled voxels
``fraction_above_threshold`` fraction of those voxels at or above the trainer's ``confidence_threshold``
``agreement``              fraction of unlabeled voxels where the argmaxes of the method's two predictions agree
``pseudo_label_dice``      (per epoch, from the base) Dice of the pseudo-labels against withheld labels
``<prefix>_<name>``        the method's own extras, under its ``log_prefix`` (``cps_``, ``dhc_``, ...)
=========================  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nnssl.diagnostics import pseudo_label_confidence_stats


@dataclass
class SSLTerms:
    """The loss terms of one step and the logits the diagnostics come from.

    ``loss = loss_supervised + weight * loss_unsupervised``; ``pseudo_label_logits``: the unlabeled logits whose
    argmax is the method's pseudo-label (one tensor per network; their confidence statistics are averaged);
    ``agreement``: the fraction of voxels where the method's predictions agree (e.g.
    :func:`nnssl.tensors.argmax_agreement` of its two networks; ``None``: not logged); ``extras``: the method's own
    scalars (tensors or floats), logged under its prefix. ``loss``: the method's total, for a method whose loss is
    not the one sum ``L_sup + w L_unsup`` (GuidedNet weights parts of its guidance term inside; SDCL's weights are
    inside its correction terms); the logged terms must still be its supervised and weighted parts.
    """

    loss_supervised: torch.Tensor
    loss_unsupervised: torch.Tensor
    pseudo_label_logits: Sequence[torch.Tensor] = ()
    agreement: torch.Tensor | None = None
    extras: Mapping[str, torch.Tensor | float] = field(default_factory=dict)
    loss: torch.Tensor | None = None


@torch.no_grad()
def step_log(loss: torch.Tensor, weight: float, terms: SSLTerms, prefix: str, threshold: float,
             regions: bool = False) -> dict:
    """The dict a ``train_step`` returns: nnU-Net's ``loss`` plus the keys of this module's table, with every
    tensor copied to the host in one transfer (one synchronisation per step)."""
    names = ["loss", "loss_supervised", "loss_unsupervised"]
    values = [loss, terms.loss_supervised, terms.loss_unsupervised]
    if terms.pseudo_label_logits:
        stats = torch.stack([pseudo_label_confidence_stats(z, threshold, regions)
                             for z in terms.pseudo_label_logits]).mean(0)
        names += ["pseudo_label_confidence", "fraction_above_threshold"]
        values += [stats[0], stats[1]]
    if terms.agreement is not None:
        names.append("agreement")
        values.append(terms.agreement)
    floats = {}
    for key, value in terms.extras.items():
        name = f"{prefix}_{key}"
        if isinstance(value, torch.Tensor):
            names.append(name)
            values.append(value)
        else:
            floats[name] = float(value)
    host = torch.stack([v.detach().float().reshape(()) for v in values]).cpu().numpy()
    logged = {name: float(v) for name, v in zip(names, host)}
    logged["loss"] = host[0]  # nnU-Net averages outputs['loss'] over the epoch
    return {**logged, "unsupervised_weight": float(weight), **floats}
