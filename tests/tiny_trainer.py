"""A tiny 2d plans and a preprocessed folder, so that nnssl trainers can be built and stepped on CPU in a unit test
(no planning, no CLI). Shared by the trainer unit tests."""

from __future__ import annotations

import json

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

DATASET = "Dataset990_TrainerUnit"
PATCH = 16
K = 3


def tiny_plans() -> dict:
    arch = {
        "n_stages": 4, "features_per_stage": [4, 8, 8, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
        "n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [PATCH, PATCH], "median_image_size_in_voxels": [PATCH, PATCH], "spacing": [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resampling,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True,
    }
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, PATCH, PATCH], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                              "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                              "std": 1.0}},
        "continue_training": False,
    }


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "big": 1, "tiny": 2}, "numTraining": 3,
                "file_ending": ".nii.gz"}


def seg_with_counts(counts: dict[int, int], shape=(1, 1, 8, PATCH)) -> np.ndarray:
    seg = np.zeros(int(np.prod(shape)), dtype=np.int8)
    start = 0
    for label, count in counts.items():
        seg[start:start + count] = label
        start += count
    return seg.reshape(shape)


def make_trainer(trainer_class, tmp_path, monkeypatch, train_segs: dict[str, np.ndarray],
                 val_segs: dict[str, np.ndarray] | None = None, dataset_json: dict | None = None):
    """An initialised ``trainer_class`` on CPU over a preprocessed folder with the given segmentations; fold 0
    trains on ``train_segs`` and validates on ``val_segs``."""
    val_segs = val_segs or {}
    preprocessed = tmp_path / "preprocessed"
    folder = preprocessed / DATASET / "nnUNetPlans_2d"
    folder.mkdir(parents=True)
    for key, seg in {**train_segs, **val_segs}.items():
        data = np.random.default_rng(0).normal(size=seg.shape).astype(np.float32)
        nnUNetDatasetNumpy.save_case(data, seg, {"spacing": [1.0, 1.0, 1.0]}, str(folder / key))
    (preprocessed / DATASET / "splits_final.json").write_text(
        json.dumps([{"train": sorted(train_segs), "val": sorted(val_segs) or sorted(train_segs)[:1]}]))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_compile", "false")
    for name in ("NNSSL_NUM_EPOCHS", "NNSSL_ITERATIONS_PER_EPOCH", "NNSSL_LABELED_BATCH_SIZE",
                 "NNSSL_UNLABELED_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    trainer = trainer_class(tiny_plans(), "2d", 0, dataset_json or DATASET_JSON, torch.device("cpu"))
    trainer.initialize()
    return trainer




def two_case_trainer(trainer_class, tmp_path, monkeypatch, dataset_json: dict | None = None):
    """``make_trainer`` with two training cases and one validation case."""
    train = {"case_a": seg_with_counts({0: 80, 1: 40, 2: 4}), "case_b": seg_with_counts({0: 90, 1: 30, 2: 2})}
    return make_trainer(trainer_class, tmp_path, monkeypatch, train, {"case_c": seg_with_counts({0: 8, 2: 100})},
                        dataset_json)


def tiny_batch(generator: torch.Generator, n_labeled: int = 2, n_unlabeled: int = 2) -> dict:
    """A joint batch as the base's loader delivers it (labels with nnU-Net's three deep-supervision scales)."""
    labels = torch.randint(0, K, (n_labeled, 1, PATCH, PATCH), generator=generator).float()
    return {"data": torch.randn(n_labeled, 1, PATCH, PATCH, generator=generator),
            "target": [labels, labels[:, :, ::2, ::2], labels[:, :, ::4, ::4]],
            "keys": [f"l{i}" for i in range(n_labeled)],
            "unlabeled_data": torch.randn(n_unlabeled, 1, PATCH, PATCH, generator=generator),
            "unlabeled_keys": [f"u{i}" for i in range(n_unlabeled)]}
