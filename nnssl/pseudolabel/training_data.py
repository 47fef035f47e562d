"""The data side of the pseudo-label fine-tuning trainer (stage 2 of docs/methods/pseudolabel.md): folds of the real
labeled cases with every pseudo-labeled case in every training fold, and nnU-Net's loaders with the sampling
probabilities and the augmentation made settable. Both take the trainer, as :mod:`nnssl.training.unlabeled_data`."""

from __future__ import annotations

import os

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnssl.io import atomic_write_json
from nnssl.pseudolabel.dataset import is_pseudo_id
from nnssl.pseudolabel.weighting import pseudo_sampling_probabilities
from nnssl.training.folds import MIN_CASES_FOR_CROSS_VALIDATION


def write_split_of_real_cases(trainer) -> None:
    """Without ``splits_final.json``: nnU-Net's 5-fold split (seed 12345) of the *real* labeled ids, every ``pl_``
    case added to every training fold (pseudo-labeled cases are never validated on)."""
    splits_file = os.path.join(trainer.preprocessed_dataset_folder_base, "splits_final.json")
    if os.path.isfile(splits_file):
        return
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    keys = sorted(trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder))
    real = [k for k in keys if not is_pseudo_id(k)]
    pseudo = [k for k in keys if is_pseudo_id(k)]
    if len(real) < MIN_CASES_FOR_CROSS_VALIDATION:  # scikit-learn's KFold would fail with a traceback
        raise SystemExit(
            f"fold {trainer.fold}: {trainer.plans_manager.dataset_name} has only {len(real)} real labeled case(s) and "
            f"the 5-fold split of the real cases needs at least {MIN_CASES_FOR_CROSS_VALIDATION}. Fine-tune fold "
            f"'all', or write your own folds to {splits_file} ([{{\"train\": [...], \"val\": [...]}}, ...])")
    splits = generate_crossval_split(real, seed=12345, n_splits=5)
    for split in splits:
        split["train"] = list(split["train"]) + pseudo
    trainer.print_to_log_file(f"Creating 5-fold split of the {len(real)} real labeled cases, with the "
                              f"{len(pseudo)} pseudo-labeled cases in every training fold")
    atomic_write_json(splits_file, splits)


def pseudo_label_dataloaders(trainer, use_data_augmentation: bool, pseudo_sampling_weight: float):
    """``(train, val)`` loaders as ``nnUNetTrainer.get_dataloaders`` builds them, with pseudo-labeled cases drawn
    ``pseudo_sampling_weight`` times as often as real ones and nnU-Net's augmentation only if asked for.

    Written out because nnU-Net builds both loaders inside that one method with uniform sampling and its augmentation
    fixed; it is the same construction otherwise."""
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    patch_size = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    label_manager = trainer.label_manager
    labels = dict(foreground_labels=label_manager.foreground_labels,
                  regions=label_manager.foreground_regions if label_manager.has_regions else None,
                  ignore_label=label_manager.ignore_label)
    if use_data_augmentation:
        tr_transforms = trainer.get_training_transforms(
            patch_size, rotation, scales, mirror_axes, dummy_2d,
            use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
            **labels)
    else:  # as nnUNetTrainerNoDA, but test-time mirroring stays allowed: stage 1 was trained with mirroring
        tr_transforms = trainer.get_validation_transforms(scales, is_cascaded=trainer.is_cascaded, **labels)
        initial_patch_size = patch_size
    val_transforms = trainer.get_validation_transforms(scales, is_cascaded=trainer.is_cascaded, **labels)

    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    probabilities = pseudo_sampling_probabilities(dataset_tr.identifiers, pseudo_sampling_weight)
    if probabilities is not None:
        pseudo_share = sum(p for k, p in zip(dataset_tr.identifiers, probabilities) if is_pseudo_id(k))
        trainer.print_to_log_file(f"sampling: pseudo-labeled cases drawn with total probability {pseudo_share:.3f}")
    common = dict(oversample_foreground_percent=trainer.oversample_foreground_percent, pad_sides=None,
                  probabilistic_oversampling=trainer.probabilistic_oversampling)
    dl_tr = nnUNetDataLoader(dataset_tr, trainer.batch_size, initial_patch_size, patch_size, label_manager,
                             sampling_probabilities=probabilities, transforms=tr_transforms, **common)
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, patch_size, patch_size, label_manager,
                              sampling_probabilities=None, transforms=val_transforms, **common)
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        train_loader, val_loader = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        pin = trainer.device.type == "cuda"
        train_loader = NonDetMultiThreadedAugmenter(dl_tr, None, num_processes=n_proc, num_cached=max(6, n_proc // 2),
                                                    seeds=None, pin_memory=pin, wait_time=0.002)
        val_loader = NonDetMultiThreadedAugmenter(dl_val, None, num_processes=max(1, n_proc // 2),
                                                  num_cached=max(3, n_proc // 4), seeds=None, pin_memory=pin,
                                                  wait_time=0.002)
    next(train_loader)  # start the workers now, as nnU-Net does
    next(val_loader)
    return train_loader, val_loader
