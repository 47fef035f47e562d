"""The unlabeled stream: preprocessed unlabeled cases through nnU-Net's own loader, augmentation and background
workers, and the loader that hands a trainer one labeled and one unlabeled batch per step."""

from __future__ import annotations

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnssl.preprocessing.unlabeled import completed_cases, unlabeled_folder


class JointBatchLoader:
    """Draws one labeled and one unlabeled batch per ``next()``; both come from nnU-Net's background workers."""

    def __init__(self, labeled, unlabeled):
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.labeled)
        unlabeled = next(self.unlabeled)
        batch["unlabeled_data"] = unlabeled["data"]
        batch["unlabeled_keys"] = unlabeled["keys"]
        return batch

    def _finish(self):
        for loader in (self.labeled, self.unlabeled):
            if hasattr(loader, "_finish"):
                loader._finish()


def unlabeled_identifiers(trainer) -> list[str]:
    """The completely preprocessed unlabeled cases of ``trainer``'s configuration; stops with one line (no
    traceback: ``SystemExit``) naming the command to run when there are none."""
    folder = unlabeled_folder(trainer.preprocessed_dataset_folder_base, trainer.configuration_manager.data_identifier)
    cases = completed_cases(folder)
    if not cases:
        name, config = trainer.plans_manager.dataset_name, trainer.configuration_name
        raise SystemExit(
            f"No preprocessed unlabeled cases in {folder}: run nnssl_plan_and_preprocess -d {name} -c {config} (or, "
            f"if nnU-Net's preprocessing is already done: nnssl_preprocess_unlabeled -d {name} -c {config})")
    return cases


def unlabeled_dataloader(trainer, batch_size: int):
    """nnU-Net's training pipeline of ``trainer`` on its unlabeled cases, ``batch_size`` patches per batch.

    The labeled pipeline without deep-supervision target downsampling (the 'segmentation' of an unlabeled case is
    only its nonzero mask and is dropped after augmentation), uniformly random crops, and half of nnU-Net's
    augmentation workers (``nnUNet_n_proc_DA``; none: in the main process).
    """
    folder = unlabeled_folder(trainer.preprocessed_dataset_folder_base, trainer.configuration_manager.data_identifier)
    dataset = nnUNetDatasetBlosc2(str(folder), unlabeled_identifiers(trainer))
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels = trainer.label_manager
    transforms = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=labels.foreground_labels,
        regions=labels.foreground_regions if labels.has_regions else None, ignore_label=labels.ignore_label)
    loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, trainer.configuration_manager.patch_size,
                              labels, oversample_foreground_percent=0.0, transforms=transforms)
    loader.has_ignore = False  # no annotation at all: crops are uniformly random
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, num_processes=max(1, n_proc // 2),
                                        num_cached=max(3, n_proc // 2), seeds=None,
                                        pin_memory=trainer.device.type == "cuda", wait_time=0.002)
