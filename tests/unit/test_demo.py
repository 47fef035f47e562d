"""nnssl_demo: the newcomer's table and sentences, and (slow) the whole demo on a tiny schedule, then its rerun."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from e2e_utils import nnunet_env, run_cli

from nnssl.cli.demo import _HideTable, explanation, format_dice_table


def _row(trainer: str, rv: float, myo: float, lv: float, gap: float) -> dict:
    return {"dataset": "Dataset970_SyntheticCardiac", "trainer": trainer, "dice_RV": rv, "dice_MYO": myo,
            "dice_LV": lv, "dice_mean": (rv + myo + lv) / 3, "dice_seed_spread": 0.0, "gap_closed": gap}


ROWS = [_row("nnUNetTrainerSupervised", 0.4, 0.5, 0.6, 0.0), _row("FullySupervised", 0.8, 0.8, 0.9, 1.0),
        _row("nnUNetTrainerMeanTeacher", 0.6, 0.6, 0.75, 0.5)]


def test_table_has_the_three_models_and_gap_closed():
    lines = format_dice_table(ROWS, "nnUNetTrainerMeanTeacher").splitlines()
    assert lines[0].split() == ["model", "RV", "MYO", "LV", "mean", "gap", "closed"]
    assert lines[2].startswith("labeled-only (3 labeled)") and "0 % (reference)" in lines[2]
    assert lines[2].split()[3:7] == ["0.400", "0.500", "0.600", "0.500"]
    assert lines[3].startswith("MeanTeacher (3 labeled + 40 unlabeled)") and lines[3].rstrip().endswith("50 %")
    assert "0.650" in lines[3]  # mean of 0.6, 0.6, 0.75
    assert lines[4].startswith("fully supervised (43 labeled)") and "100 % (reference)" in lines[4]


def test_table_marks_a_failed_row():
    rows = [ROWS[0], ROWS[1], {"trainer": "nnUNetTrainerCPS", "failed": 1}]
    assert "failed" in format_dice_table(rows, "nnUNetTrainerCPS").splitlines()[3]


def test_explanation_says_what_the_numbers_mean(tmp_path):
    text = explanation(ROWS, "nnUNetTrainerMeanTeacher", tmp_path, "nnssl_benchmark --seeds 0 1 2")
    assert "gap closed" in text.lower() and "here 50 %" in text
    assert "3 labeled slices" in text and "all 43 slices" in text
    assert "one seed" in text and "nnssl_benchmark --seeds 0 1 2" in text
    for name in ("benchmark.md", "learning_curves_", "benchmark_gap.png"):
        assert name in text
    assert 3 <= len(text.splitlines()) <= 5  # a few sentences, one a line, not a report
    # a schedule too short for all labels to help: gap closed n/a, and why
    tiny = [{**r, "gap_closed": float("nan"), "dice_mean": 0.1} for r in ROWS]
    assert "n/a" in explanation(tiny, "nnUNetTrainerMeanTeacher", tmp_path, "x")


def test_the_benchmark_table_is_hidden_but_progress_is_not():
    out = io.StringIO()
    hide = _HideTable(out)
    print("nnssl_benchmark: reusing finished row", file=hide)
    print("[3 s] seed 0 cardiac2d: nnUNetTrainerSupervised", file=hide)
    print("### Dataset970 (wide table)\n| a | b |", file=hide)
    print("on cpu: 3 s in all", file=hide)
    assert out.getvalue().splitlines() == ["nnssl_benchmark: reusing finished row",
                                           "[3 s] seed 0 cardiac2d: nnUNetTrainerSupervised"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_rows(tmp_path):
    env = nnunet_env(tmp_path)
    work = tmp_path / "demo"
    cmd = ["nnssl_demo", "--work-dir", str(work), "--device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2"]
    first = run_cli(cmd, env)
    table = first.stdout.split("Dice (overlap")[1]
    for row in ("labeled-only (3 labeled)", "WeakStrongMT (3 labeled + 40 unlabeled)", "fully supervised (43 labeled)"):
        assert row in table
    assert "gap closed" in table and "epoch 1/1" in first.stdout
    assert "| nnUNetTrainerSupervised |" not in first.stdout  # the benchmark's wide table stays in benchmark.md
    assert (work / "benchmark.md").is_file() and (work / "benchmark_gap.png").is_file()
    assert list(work.glob("learning_curves_*.png"))

    second = run_cli(cmd, env)
    assert second.stdout.count("reusing finished row") == 3, second.stdout
    assert "epoch 1/1" not in second.stdout  # nothing trained again
    assert second.stdout.split("\nmodel ")[1] == first.stdout.split("\nmodel ")[1]  # the same table and sentences
    assert Path(work / "benchmark.json").is_file()

