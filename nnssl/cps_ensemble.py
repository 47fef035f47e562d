"""Turn a finished CPS run into a model folder that ``nnUNetv2_predict -tr nnUNetTrainerCPS_ensemble`` predicts with
(the average of both networks' softmax), without retraining (docs/methods/cps.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

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


def export_cps_ensemble(cps_fold_dir: str | os.PathLike, checkpoint_name: str = "checkpoint_final.pth",
                        results_dir: str | os.PathLike | None = None) -> Path:
    """Write the ensemble of an ``nnUNetTrainerCPS`` run next to it, so that ``nnUNetv2_predict -tr
    nnUNetTrainerCPS_ensemble`` averages both networks without retraining.

    ``cps_fold_dir`` is ``.../<TRAINER>__<PLANS>__<CONFIG>/fold_X``; the result is
    ``.../nnUNetTrainerCPS_ensemble__<PLANS>__<CONFIG>/fold_X/<checkpoint_name>`` plus the plans.json and
    dataset.json nnU-Net's predictor reads; with ``results_dir`` under ``results_dir/<Dataset>/`` instead (an
    nnUNet_results of its own, so that an ensemble trained as such is never overwritten). Any trainer whose
    ``network2`` has the plans' architecture (DHC, GuidedNet, the zoo's CPS-based trainers) exports the same way.
    Usage::

        python -c "from nnssl.cps_ensemble import export_cps_ensemble as e; e('$nnUNet_results/Dataset.../fold_0')"
    """
    fold = Path(cps_fold_dir)
    source = fold / checkpoint_name
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint (cps_fold_dir must be a CPS run's fold_X folder)")
    trainer, sep, rest = fold.parent.name.partition("__")
    if not sep or not fold.name.startswith("fold_"):
        raise ValueError(f"{fold}: expected <TRAINER>__<PLANS>__<CONFIG>/fold_X as nnU-Net writes it")
    checkpoint = cps_checkpoint_as_ensemble(torch.load(source, map_location="cpu", weights_only=False))
    dataset_dir = fold.parent.parent if results_dir is None else Path(results_dir) / fold.parent.parent.name
    target_model = dataset_dir / f"{ENSEMBLE_TRAINER_NAME}__{rest}"
    (target_model / fold.name).mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(fold.parent / name, target_model / name)
    target = target_model / fold.name / checkpoint_name
    torch.save(checkpoint, f"{target}.tmp")
    os.replace(f"{target}.tmp", target)  # atomic: never a half-written checkpoint under the final name
    return target
