"""The unlabeled stream: preprocessed unlabeled cases through nnU-Net's own loader, augmentation and background
workers, and the loader that hands a trainer one labeled and one unlabeled batch per step."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

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


def augmentation_workers(total: int, labeled_batch: int, unlabeled_batch: int) -> tuple[int, int]:
    """nnU-Net's augmentation budget per GPU (``nnUNet_n_proc_DA`` = ``total``) shared by the labeled and the
    unlabeled stream in proportion to the patches each augments per step: ``(n_labeled, n_unlabeled)`` with
    ``n_labeled + n_unlabeled = total`` and each at least 1 when ``total >= 2``; ``total = 1`` gives each stream one
    worker (two in all: a stream in the main process would stall every step); ``total = 0`` none (both in the main
    process, nnU-Net's debugging mode)."""
    if labeled_batch < 1 or unlabeled_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {labeled_batch} labeled, {unlabeled_batch} unlabeled")
    if total <= 0:
        return 0, 0
    if total == 1:
        return 1, 1
    n_unlabeled = min(total - 1, max(1, round(total * unlabeled_batch / (labeled_batch + unlabeled_batch))))
    return total - n_unlabeled, n_unlabeled


@contextlib.contextmanager
def n_proc_da(n: int) -> Iterator[None]:
    """``nnUNet_n_proc_DA = n`` for the duration of the block, then as before. nnU-Net's ``get_dataloaders`` reads its
    worker counts from this variable (its documented override); setting it around the call gives the labeled stream
    its share without copying nnU-Net's method."""
    previous = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(n)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["nnUNet_n_proc_DA"]
        else:
            os.environ["nnUNet_n_proc_DA"] = previous


def unlabeled_dataloader(trainer, batch_size: int, num_workers: int):
    """nnU-Net's training pipeline of ``trainer`` on its unlabeled cases, ``batch_size`` patches per batch.

    The labeled pipeline without deep-supervision target downsampling (the 'segmentation' of an unlabeled case is
    only its nonzero mask and is dropped after augmentation), uniformly random crops, ``num_workers`` background
    augmentation workers (:func:`augmentation_workers`; 0: in the main process).
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
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, num_processes=num_workers, num_cached=max(3, num_workers),
                                        seeds=None,
                                        pin_memory=trainer.device.type == "cuda", wait_time=0.002)
