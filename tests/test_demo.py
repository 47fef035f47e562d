"""nnssl_demo end to end on a tiny schedule: every step runs through the real CLIs and the table is printed."""

from __future__ import annotations

import pytest
from e2e_utils import nnunet_env, run_cli

from nnssl.cli.demo import format_dice_table


def test_dice_table_has_gain_column():
    table = format_dice_table({"A": {"liver": 0.5, "mean": 0.5}, "B": {"liver": 0.75, "mean": 0.75}}, ["liver"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "A", "B", "gain"]
    assert lines[2].split() == ["liver", "0.500", "0.750", "+0.250"]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = nnunet_env(tmp_path)
    proc = run_cli(["nnssl_demo", "--work-dir", str(tmp_path / "demo"), "--device", "cpu", "--epochs", "1",
                    "--iterations-per-epoch", "2", "--labeled", "5", "--unlabeled", "2", "--test", "1"], env)
    assert "nnUNetTrainerSupervised" in proc.stdout and "nnUNetTrainerMeanTeacher" in proc.stdout
    table = proc.stdout.split("Per-class Dice")[1]
    for name in ("liver", "spleen", "kidney", "adrenal", "mean"):
        assert name in table
    assert len(list((tmp_path / "demo" / "predictions" / "nnUNetTrainerMeanTeacher").glob("*.nii.gz"))) == 1
