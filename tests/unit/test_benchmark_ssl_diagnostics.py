"""The per-trainer summary of the SSL rows' own diagnostics (nnssl.benchmark.ssl_diagnostics)."""

from __future__ import annotations

import json
import math

import pytest

from nnssl.benchmark.ssl_diagnostics import (
    diagnostics_markdown,
    quarter_mean,
    read_ssl_progress,
    run_summary,
    trainer_summaries,
)


def test_quarter_means_take_the_ends_and_skip_missing_values():
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, None]  # 8 epochs: quarters of 2
    assert quarter_mean(values) == 6.0  # the last quarter is (6, None): None is an epoch without the key
    assert quarter_mean(values, first=True) == 0.5
    assert quarter_mean([2.0]) == 2.0 and math.isnan(quarter_mean([None, float("nan")]))


def test_run_summary_weights_the_unsupervised_loss_epoch_by_epoch():
    progress = {"unsupervised_weight": [0.0, 0.0, 1.0, 3.0], "loss_unsupervised": [5.0, 5.0, 2.0, 1.0],
                "pseudo_label_dice": [0.1, 0.2, 0.3, 0.8], "loss_supervised": [1.0, 0.5, 0.2, -0.4]}
    s = run_summary(progress)
    assert s["weighted_unsupervised"] == pytest.approx(3.0)  # w · L of the last epoch, not mean(w) · mean(L)
    assert s["pseudo_label_dice_start"] == pytest.approx(0.1) and s["pseudo_label_dice"] == pytest.approx(0.8)
    assert "agreement" not in s  # a trainer of one network logs none


def test_trainer_summaries_average_seeds_and_leave_out_rows_without_logs():
    a = {"agreement": [0.5, 0.9], "pseudo_label_dice": [0.2, 0.6]}
    b = {"agreement": [0.5, 0.7], "pseudo_label_dice": [0.2, 0.4]}
    summaries = trainer_summaries([("MT", a), ("MT", b), ("nnUNetTrainerSupervised", None)])
    assert list(summaries) == ["MT"]
    assert summaries["MT"]["agreement"] == pytest.approx(0.8) and summaries["MT"]["pseudo_label_dice"] == 0.5
    table = diagnostics_markdown(summaries)
    assert "| MT | 0.200 → 0.500 |" in table and table.count("\n") == 2
    assert diagnostics_markdown({}) == ""


def test_read_ssl_progress(tmp_path):
    assert read_ssl_progress(tmp_path) is None
    (tmp_path / "ssl_progress.json").write_text(json.dumps({"agreement": [0.5, None]}), encoding="utf-8")
    assert read_ssl_progress(tmp_path) == {"agreement": [0.5, None]}


def test_a_reused_row_gains_the_diagnostics_of_its_runs_fold(tmp_path):
    from nnssl.benchmark.cli import DatasetRun, RunResult, _backfill_ssl_progress

    run = DatasetRun(970, "2d", "0", {"nnUNet_results": str(tmp_path)}, 0, "synthetic")
    fold = tmp_path / "Dataset970_X" / "nnUNetTrainerMeanTeacher__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "ssl_progress.json").write_text(json.dumps({"agreement": [0.5]}), encoding="utf-8")
    row = RunResult("nnUNetTrainerMeanTeacher", "Dataset970_X", 0)
    assert not _backfill_ssl_progress(row, run)  # no final checkpoint: not a finished run's folder
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert _backfill_ssl_progress(row, run) and row.ssl_progress == {"agreement": [0.5]}
    assert not _backfill_ssl_progress(row, run)  # already there
    failed = RunResult("nnUNetTrainerMeanTeacher", "Dataset970_X", 0, error="boom")
    assert not _backfill_ssl_progress(failed, run) and failed.ssl_progress is None
