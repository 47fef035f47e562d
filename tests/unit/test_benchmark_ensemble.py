"""Ensemble rows of the benchmark (nnssl.benchmark.ensemble): which names, which trainers, which run they need."""

from __future__ import annotations

import pytest

from nnssl.benchmark.ensemble import check_ensemble_trainer, ensemble_base
from nnssl.benchmark.generated import split_row_name
from nnssl.benchmark.runs import finished_fold


def test_names():
    assert ensemble_base("nnUNetTrainerDHC[ensemble]") == "nnUNetTrainerDHC"
    assert ensemble_base("nnUNetTrainerDHC") is None and ensemble_base("nnUNetTrainerMGCC[generated]") is None
    assert split_row_name("nnUNetTrainerDHC[ensemble]") == ("nnUNetTrainerDHC[ensemble]", None)  # not a generated row


def test_only_trainers_with_a_second_network_of_the_plans_architecture():
    from nnssl_trainers.dhc import nnUNetTrainerDHC
    from nnssl_trainers.mean_teacher import nnUNetTrainerMeanTeacher
    from nnssl_trainers.sdcl import nnUNetTrainerSDCL

    check_ensemble_trainer("nnUNetTrainerDHC", nnUNetTrainerDHC)
    for name, cls in (("nnUNetTrainerMeanTeacher", nnUNetTrainerMeanTeacher), ("nnUNetTrainerSDCL", nnUNetTrainerSDCL)):
        with pytest.raises(ValueError, match=rf"{name}\[ensemble\]: needs a trainer whose second network"):
            check_ensemble_trainer(name, cls)


def test_the_base_run_must_be_finished_in_this_output(tmp_path):
    env = {"nnUNet_results": str(tmp_path)}
    with pytest.raises(ValueError, match=r"DHC\[ensemble\] needs .* put nnUNetTrainerDHC before it"):
        finished_fold(env, "Dataset1_X", "nnUNetTrainerDHC", "2d", "0", needed_by="nnUNetTrainerDHC[ensemble]")
    fold = tmp_path / "Dataset1_X" / "nnUNetTrainerDHC__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert finished_fold(env, "Dataset1_X", "nnUNetTrainerDHC", "2d", "0", needed_by="x") == fold


def test_the_cli_refuses_an_ensemble_of_a_one_network_trainer_in_one_line(monkeypatch):
    from nnssl.benchmark.cli import check_trainers
    from nnssl.cli.trainer_path import trainer_folder
    from nnssl.errors import InputError

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())  # as the benchmark's CLI sets it

    with pytest.raises(InputError, match=r"nnUNetTrainerMeanTeacher\[ensemble\]"):
        check_trainers(["nnUNetTrainerMeanTeacher[ensemble]"])
    assert check_trainers(["nnUNetTrainerCPS[ensemble]"]) == ["nnUNetTrainerCPS[ensemble]"]
