"""Rows ``<trainer>[ensemble]``: a two-network trainer's finished run predicting with both networks' averaged softmax
instead of network 1 alone (issue 16's "which network predicts"). Nothing is trained: the run of ``<trainer>`` in the
same output (its row comes first) is exported with :func:`nnssl.cps_ensemble.export_cps_ensemble` into an
nnUNet_results of its own and predicted with ``nnUNetTrainerCPS_ensemble``, whose network is the pair of the plans'
networks. Trainers whose second network has another architecture (SDCL) or that have none are refused."""

from __future__ import annotations

import re

SUFFIX = "[ensemble]"
_ROW = re.compile(r"(?P<trainer>[A-Za-z0-9_]+)\[ensemble\]")


def ensemble_base(name: str) -> str | None:
    """``nnUNetTrainerDHC[ensemble]`` -> ``nnUNetTrainerDHC``; any other name -> None."""
    match = _ROW.fullmatch(name)
    return match["trainer"] if match else None


def check_ensemble_trainer(name: str, trainer_class: type) -> None:
    """ValueError unless ``trainer_class`` declares a second network of the plans' architecture."""
    if getattr(trainer_class, "second_network", None) is None:
        raise ValueError(f"{name}{SUFFIX}: needs a trainer whose second network has the plans' architecture "
                         f"(CPS, DHC, GuidedNet, DHC's CPS-based zoo); {name} declares none")

