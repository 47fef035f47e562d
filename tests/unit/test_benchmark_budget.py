"""nnssl_benchmark --budget: the equal-time scaling, the speed calibration and its reuse, the row keys per budget and
the tables of both budgets, on hand-made results (no training)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from nnssl.benchmark import cli
from nnssl.benchmark.budget import (
    NNUNET_DEFAULT_ITERATIONS,
    budgets_of,
    calibration_file,
    calibration_seconds_per_iteration,
    speed_ratio,
    time_budget_env,
    time_scaled_iterations,
)
from nnssl.benchmark.cli import BASELINE, FULL_REFERENCE, PSEUDO_LABEL_TRAINER, RunResult, markdown_table, summarize
from nnssl.benchmark.resume import row_file

MT, CPS = "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS"
SCHEDULE = {"NNSSL_NUM_EPOCHS": "5", "NNSSL_ITERATIONS_PER_EPOCH": "40", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "2"}


# ---- the scaling ---------------------------------------------------------------------------------------------------

def test_iterations_scale_by_the_speed_ratio_rounded_down():
    assert speed_ratio(0.1, 0.25) == pytest.approx(0.4)  # the trainer is 2.5x slower per iteration
    assert time_scaled_iterations(40, 0.4) == 16
    assert time_scaled_iterations(40, 0.43) == 17  # 17.2: rounded down, never more time than the reference
    assert time_scaled_iterations(100, 0.29) == 29  # not 28 (0.29 * 100 = 28.999999999999996)


def test_never_below_one_iteration_never_above_the_schedule():
    assert time_scaled_iterations(40, 0.001) == 1
    assert time_scaled_iterations(2, 0.3) == 1
    assert time_scaled_iterations(40, 1.3) == 40  # faster than labeled-only is noise: the schedule, not more
    with pytest.raises(ValueError, match="calibration"):
        time_scaled_iterations(40, float("nan"))
    assert math.isnan(speed_ratio(0.1, 0.0)) and math.isnan(speed_ratio(float("nan"), 0.1))


def test_only_iterations_per_epoch_change():
    env, iterations, scaled = time_budget_env({**SCHEDULE, "PATH": "/x"}, 0.5)
    assert (iterations, scaled) == (40, 20)
    assert env == {**SCHEDULE, "PATH": "/x", "NNSSL_ITERATIONS_PER_EPOCH": "20"}  # epochs, val, the rest kept
    env, iterations, scaled = time_budget_env({}, 0.5)  # the trainer's own schedule: nnU-Net's 250 per epoch
    assert iterations == NNUNET_DEFAULT_ITERATIONS and env == {"NNSSL_ITERATIONS_PER_EPOCH": "125"}


def test_calibration_reads_the_fastest_epoch_after_warm_up():
    log = "train seconds/iteration: 0.9\ntrain seconds/iteration: 0.23\ntrain seconds/iteration: 0.51\n"
    assert calibration_seconds_per_iteration(log) == pytest.approx(0.23)  # load only adds time; warm-up 0.9 dropped
    assert calibration_seconds_per_iteration("train seconds/iteration: 0.4") == pytest.approx(0.4)
    assert math.isnan(calibration_seconds_per_iteration("no epoch finished"))


def test_budget_modes():
    assert budgets_of("iterations") == ["iterations"] and budgets_of("time") == ["time"]
    assert budgets_of("both") == ["iterations", "time"]
    with pytest.raises(ValueError):
        budgets_of("flops")


def test_references_are_the_same_rows_under_both_budgets():
    trainers = [BASELINE, FULL_REFERENCE, MT, PSEUDO_LABEL_TRAINER]
    assert cli.budget_trainers(trainers, "iterations", ["iterations", "time"]) == trainers
    assert cli.budget_trainers(trainers, "time", ["iterations", "time"]) == [MT, PSEUDO_LABEL_TRAINER]
    # the time budget alone still runs the references (at the schedule: they are its references)
    assert cli.budget_trainers(trainers, "iterations", ["time"]) == [BASELINE, FULL_REFERENCE]


# ---- calibration and row keys --------------------------------------------------------------------------------------

def _run(env=None, seed=0):
    return cli.DatasetRun(960, "3d_fullres", "all", dict(env or SCHEDULE), seed, "synthetic 3d", full_id=964,
                          label=f"seed {seed}", calibration_schedule=(2, 3), dataset_name="Dataset960_X")


SPEED = {BASELINE: 0.1, MT: 0.2, CPS: 0.35, FULL_REFERENCE: 0.1}


@pytest.fixture
def fake_calibration(monkeypatch):
    measured = []

    def fake(run, trainer, out, device):
        measured.append((trainer, run.seed))
        return SPEED[trainer]

    monkeypatch.setattr(cli, "_calibrate_one", fake)
    return measured


def test_calibration_is_saved_and_reused(tmp_path, fake_calibration):
    seconds = cli.calibrate(_run(), [MT], tmp_path, "cpu")
    assert seconds == {BASELINE: 0.1, MT: 0.2} and fake_calibration == [(BASELINE, 0), (MT, 0)]
    path = calibration_file(tmp_path, 960, "3d_fullres", 0, "cpu")
    assert json.loads(path.read_text(encoding="utf-8"))["seconds_per_iteration"] == seconds
    assert cli.calibrate(_run(), [MT], tmp_path, "cpu") == seconds and len(fake_calibration) == 2  # reused
    cli.calibrate(_run(), [MT, CPS], tmp_path, "cpu")
    assert fake_calibration[2:] == [(CPS, 0)]  # only the trainer it lacked
    # another schedule length is the same calibration; another batch size or seed is not
    cli.calibrate(_run({**SCHEDULE, "NNSSL_NUM_EPOCHS": "50"}), [MT], tmp_path, "cpu")
    assert len(fake_calibration) == 3
    cli.calibrate(_run({**SCHEDULE, "NNSSL_LABELED_BATCH_SIZE": "4"}), [MT], tmp_path, "cpu")
    assert fake_calibration[3:] == [(BASELINE, 0), (MT, 0)]
    cli.calibrate(_run(seed=1), [MT], tmp_path, "cpu")
    assert fake_calibration[5:] == [(BASELINE, 1), (MT, 1)]
    assert calibration_file(tmp_path, 960, "3d_fullres", 1, "cpu").is_file()


def test_row_keys_differ_by_budget_and_keep_the_equal_iteration_key(tmp_path):
    run = _run()
    iterations = cli.row_key_of(run, MT, "cpu", True)
    assert "budget" not in iterations  # as before the budgets: earlier rows stay reusable
    timed_run, scale, note = cli.time_budget_run(run, MT, {BASELINE: 0.1, MT: 0.2})
    assert scale == pytest.approx(0.5) and "20 instead of 40 iterations per epoch" in note
    timed = cli.row_key_of(timed_run, MT, "cpu", True, "time")
    assert timed["budget"] == "time" and timed["schedule"]["NNSSL_ITERATIONS_PER_EPOCH"] == "20"
    assert row_file(tmp_path, timed) != row_file(tmp_path, iterations)
    # the same budget on the unscaled schedule (a trainer as fast as labeled-only) is still its own row
    assert row_file(tmp_path, cli.row_key_of(run, MT, "cpu", True, "time")) != row_file(tmp_path, iterations)
    with pytest.raises(ValueError, match="no speed calibration"):
        cli.time_budget_run(run, CPS, {BASELINE: 0.1})


# ---- rows of both budgets ------------------------------------------------------------------------------------------

def _result(trainer, seed, dice, **kw):
    return RunResult(trainer, "Dataset960_X", seed, dice={"a": dice, "b": dice}, nsd={"a": dice, "b": dice},
                     seconds_per_iteration=SPEED.get(trainer, 0.1), max_rss_mb=1000.0, wall_seconds=10.0,
                     per_case_dice={f"c{i}": {"a": dice, "b": dice} for i in range(3)}, **kw)


def test_both_budgets_scale_the_ssl_rows_reuse_everything_on_rerun(tmp_path, monkeypatch, fake_calibration, capsys):
    calls = []

    def fake_run_trainer(trainer, dataset_id, configuration, fold, env, out, device, seed, *args):
        calls.append((trainer, env["NNSSL_ITERATIONS_PER_EPOCH"], env["NNSSL_NUM_EPOCHS"]))
        scaled = env["NNSSL_ITERATIONS_PER_EPOCH"] != "40"
        dice = {BASELINE: 0.6, FULL_REFERENCE: 0.9}.get(trainer, 0.66 if scaled else 0.75)
        return _result(trainer, seed, dice, schedule=cli.schedule_text(env))

    monkeypatch.setattr(cli, "run_trainer", fake_run_trainer)
    # no nnUNet_raw here: the skipped rows take the run's dataset name (a rerun that reuses every row of a seed
    # never generates its data)
    trainers = [BASELINE, FULL_REFERENCE, MT, CPS, PSEUDO_LABEL_TRAINER]
    budgets = ["iterations", "time"]

    def run_all():
        results = []
        for budget in budgets:
            cli.run_rows(_run(), cli.budget_trainers(trainers, budget, budgets), tmp_path, "cpu", True, results, 0.0,
                         budget=budget)
        return results

    results = run_all()
    # equal time: MT 2x and CPS 3.5x slower than labeled-only -> 20 and 11 of 40 iterations per epoch, 5 epochs kept
    assert calls == [(t, "40", "5") for t in trainers] + [(MT, "20", "5"), (CPS, "11", "5")]
    timed = {r.trainer: r for r in results if r.budget == "time"}
    assert timed[MT].time_scale == pytest.approx(0.5) and timed[CPS].time_scale == pytest.approx(11 / 40)
    assert "equal time: 11 instead of 40 iterations per epoch" in timed[CPS].notes
    assert timed[PSEUDO_LABEL_TRAINER].skipped and "stage 1" in timed[PSEUDO_LABEL_TRAINER].skipped

    rows = json.loads((tmp_path / "benchmark.json").read_text(encoding="utf-8"))["rows"]
    labels = [(r["trainer"], r["budget"]) for r in rows]
    assert labels == [(BASELINE, "both"), (FULL_REFERENCE, "both"), (MT, "iterations"), (CPS, "iterations"),
                      (PSEUDO_LABEL_TRAINER, "iterations"), (MT, "time"), (CPS, "time"), (PSEUDO_LABEL_TRAINER, "time")]
    gaps = {(r["trainer"], r["budget"]): r.get("gap_closed") for r in rows}
    assert gaps[(MT, "iterations")] == pytest.approx(0.5) and gaps[(MT, "time")] == pytest.approx(0.2)
    assert rows[5]["time_scale"] == pytest.approx(0.5) and rows[5]["schedule"] == "5 epochs x 20 iterations"
    with open(tmp_path / "benchmark.csv", encoding="utf-8") as f:
        assert [r["budget"] for r in csv.DictReader(f)][-3:] == ["time"] * 3
    table = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert f"| {MT} @ equal time |" in table and f"| {PSEUDO_LABEL_TRAINER} @ equal time | skipped: not run" in table
    assert "(5 epochs x 40 iterations per trainer)" in table  # the title has the schedule, not the scaled ones
    assert (tmp_path / "benchmark_gap.png").stat().st_size > 0

    capsys.readouterr()
    again = run_all()  # a rerun: every row (both budgets) and the calibration reused, nothing trained or measured
    assert len(calls) == 7 and len(fake_calibration) == 3
    assert capsys.readouterr().out.count("reusing finished row") == 7
    assert [(r.trainer, r.budget, r.time_scale) for r in again] == [(r.trainer, r.budget, r.time_scale)
                                                                     for r in results]


def test_synthetic_dataset_name_is_the_generated_folder(tmp_path):
    from nnssl.benchmark.presets import SMOKE_PRESET
    from nnssl.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(tmp_path, SMOKE_PRESET.dataset_id, SMOKE_PRESET.kind, n_labeled=1, n_unlabeled=0,
                                 n_test=0, voxel_scale=SMOKE_PRESET.voxel_scale)
    assert raw.name == cli.synthetic_dataset_name(SMOKE_PRESET)


def test_equal_iteration_tables_unchanged_without_the_time_budget():
    rows = summarize([_result(BASELINE, 0, 0.6), _result(FULL_REFERENCE, 0, 0.9), _result(MT, 0, 0.75)])
    assert all("budget" not in r and "time_scale" not in r for r in rows)
    assert "@ equal" not in markdown_table(rows)


def test_gap_plot_pairs_the_budgets(tmp_path):
    rows = summarize([_result(BASELINE, 0, 0.6), _result(FULL_REFERENCE, 0, 0.9), _result(MT, 0, 0.75),
                      _result(CPS, 0, 0.7), _result(MT, 0, 0.66, budget="time", time_scale=0.5)])
    cli.gap_plot(rows, tmp_path / "gap.png")
    cli.bar_plot(rows, tmp_path / "bar.png")
    assert (tmp_path / "gap.png").stat().st_size > 0 and (tmp_path / "bar.png").stat().st_size > 0
