"""Where a benchmark row's training writes: nnU-Net's fold folder under the row's own ``nnUNet_results`` (each seed of
a benchmark has its own, so ``nnunetv2.paths``, fixed at import, cannot be used), and the check that a row which
builds on another row's run (pseudo-label stage 1, ensemble prediction) finds that run finished."""

from __future__ import annotations

from pathlib import Path


def fold_folder(env: dict[str, str], dataset: str, trainer: str, configuration: str, fold: str) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__nnUNetPlans__<configuration>/fold_<fold>`` of ``env``."""
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"


def finished_fold(env: dict[str, str], dataset: str, trainer: str, configuration: str, fold: str,
                  needed_by: str) -> Path:
    """:func:`fold_folder` of ``trainer``'s finished run (``checkpoint_final.pth`` there), or a ValueError saying that
    ``needed_by`` needs it and which row must come first."""
    folder = fold_folder(env, dataset, trainer, configuration, fold)
    if not (folder / "checkpoint_final.pth").is_file():
        raise ValueError(f"{needed_by} needs the finished run of {trainer} in this output ({folder}): put {trainer} "
                         f"before it in --trainers (a row reused from another output has no run here)")
    return folder
