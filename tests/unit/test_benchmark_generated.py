"""nnssl.benchmark.generated: row names of the generated rows, their keys and notes."""

from __future__ import annotations

import argparse

import pytest

from nnssl.benchmark.cli import DatasetRun, budget_trainers, generation_settings, row_key_of
from nnssl.benchmark.generated import GenerationSettings, note_for, split_row_name


def test_row_names_split_into_trainer_and_unlabeled_set():
    assert split_row_name("nnUNetTrainerMGCC[generated]") == ("nnUNetTrainerMGCC", "generated")
    assert split_row_name("nnUNetTrainerCPS[real+generated]") == ("nnUNetTrainerCPS", "real+generated")
    assert split_row_name("nnUNetTrainerMGCC") == ("nnUNetTrainerMGCC", None)
    with pytest.raises(ValueError, match=r"\[fake\].*\[generated\]"):
        split_row_name("nnUNetTrainerMGCC[fake]")


def test_generated_rows_run_at_equal_iterations_only():
    trainers = ["nnUNetTrainerSupervised", "nnUNetTrainerMGCC", "nnUNetTrainerMGCC[generated]"]
    assert budget_trainers(trainers, "iterations") == trainers
    assert budget_trainers(trainers, "time") == ["nnUNetTrainerMGCC"]


def test_generation_settings_default_to_as_many_images_as_real_unlabeled_cases():
    args = argparse.Namespace(generated_images=None, ldm_preset="tiny", ldm_epochs=None)
    assert generation_settings(args, 40, 2) == GenerationSettings(40, "tiny", None, None, 2)
    args = argparse.Namespace(generated_images=7, ldm_preset="monai2d", ldm_epochs=[3, 4])
    assert generation_settings(args, 40, 0) == GenerationSettings(7, "monai2d", 3, 4, 0)


def test_the_generation_is_part_of_a_generated_row_key_only():
    run = DatasetRun(970, "2d", "0", {"NNSSL_NUM_EPOCHS": "30"}, 0, "data", generated_ids=(976, 978),
                     generation=GenerationSettings(40, seed=0))
    plain = row_key_of(run, "nnUNetTrainerMGCC", "cpu", True)
    generated = row_key_of(run, "nnUNetTrainerMGCC[generated]", "cpu", True)
    assert "generation" not in plain and generated["generation"]["n_images"] == 40
    other = DatasetRun(970, "2d", "0", {"NNSSL_NUM_EPOCHS": "30"}, 0, "data", generated_ids=(976, 978),
                       generation=GenerationSettings(40, ldm_epochs=50, seed=0))
    assert row_key_of(other, "nnUNetTrainerMGCC[generated]", "cpu", True) != generated


def test_note_says_the_unlabeled_set_its_size_and_stage_1():
    made = {"settings": GenerationSettings(40, "tiny", None, 30, 1).to_dict(), "generated": 40, "real_unlabeled": 40,
            "stage1_seconds": 321.4, "histogram_distance": [[0.31, 0.02]]}
    both, only = note_for(made, "real+generated"), note_for(made, "generated")
    assert "(80 cases)" in both and "(40 cases)" in only
    assert "ldm_epochs 30" in only and "321 s" in only and "0.310 (real half vs half 0.020)" in only
