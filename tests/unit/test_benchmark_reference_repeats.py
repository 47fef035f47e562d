"""nnssl_benchmark --reference-repeats: the labeled-only reference trained several times per seed and averaged per
test case, so one noisy nnU-Net training does not decide every gain and gap of its seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnssl.benchmark import cli
from nnssl.benchmark.cli import (
    BASELINE,
    FULL_REFERENCE,
    REPEAT_RESULTS,
    RunResult,
    budget_trainers,
    is_reference,
    merge_reference_repeats,
    order_rows,
    reference_repeat,
    reference_repeat_rows,
    summarize,
)
from nnssl.benchmark.gap import gap_closed

MT = "nnUNetTrainerMeanTeacher"
R2, R3 = f"{BASELINE}#2", f"{BASELINE}#3"


def _result(trainer, seed, per_case, **kw):
    """A finished row whose classes a and b score each test case's value; its Dice is the mean over cases."""
    mean = sum(per_case.values()) / len(per_case)
    return RunResult(trainer, "Dataset1_X", seed, dice={"a": mean, "b": mean}, nsd={"a": mean, "b": mean},
                     seconds_per_iteration=1.0, max_rss_mb=1000.0, wall_seconds=10.0,
                     per_case_dice={c: {"a": v, "b": v} for c, v in per_case.items()}, **kw)


def test_repeat_names_order_and_roles():
    assert reference_repeat_rows(1) == [] and reference_repeat_rows(3) == [R2, R3]
    assert [reference_repeat(t) for t in (BASELINE, R2, R3, MT, f"{MT}#2", f"{BASELINE}#1", f"{BASELINE}#x")] == \
        [1, 2, 3, 0, 0, 0, 0]
    assert order_rows([MT, BASELINE], full_reference=True, reference_repeats=3) == [BASELINE, R2, R3, FULL_REFERENCE,
                                                                                   MT]
    assert order_rows([MT, BASELINE], full_reference=True) == [BASELINE, FULL_REFERENCE, MT]  # default: as before
    assert all(is_reference(t) for t in (BASELINE, R2, FULL_REFERENCE)) and not is_reference(MT)
    # the repeated trainings are references: no row of theirs at equal time, where the time is the first's
    assert budget_trainers([BASELINE, R2, FULL_REFERENCE, MT], "time") == [MT]


def test_trainings_of_a_seed_become_one_reference_averaged_per_test_case():
    cases = ("c0", "c1", "c2", "c3")
    first = _result(BASELINE, 0, dict(zip(cases, (0.5, 0.6, 0.7, 0.6))), volume_ratio={"a": 1.2})
    second = _result(R2, 0, dict(zip(cases, (0.7, 0.6, 0.9, 0.8))), volume_ratio={"a": 1.0})
    failed = RunResult(R3, "Dataset1_X", 0, error="killed")
    other_seed = _result(BASELINE, 1, dict(zip(cases, (0.4, 0.4, 0.4, 0.4))))
    method = _result(MT, 0, dict(zip(cases, (0.7, 0.7, 0.7, 0.7))))
    merged = merge_reference_repeats([first, second, failed, other_seed, method])
    assert [(r.trainer, r.seed) for r in merged] == [(BASELINE, 0), (BASELINE, 1), (MT, 0)]
    ref = merged[0]
    assert ref.per_case_dice["c0"] == {"a": pytest.approx(0.6), "b": pytest.approx(0.6)}
    assert ref.per_case_dice["c2"]["a"] == pytest.approx(0.8)
    assert ref.dice["a"] == pytest.approx(0.675) and ref.volume_ratio == {"a": pytest.approx(1.1)}
    assert "mean of 2 trainings" in ref.notes and "0.600, 0.750" in ref.notes and "1 training(s) failed" in ref.notes
    assert merged[1] is other_seed and merged[2] is method  # a seed without repeats is left as it was

    full = _result(FULL_REFERENCE, 0, dict(zip(cases, (0.9,) * 4)))
    rows = {r["trainer"]: r for r in summarize([first, second, failed, full, method])}
    assert set(rows) == {BASELINE, FULL_REFERENCE, MT} and rows[BASELINE]["seeds"] == 1
    # gain and gap closed are measured against the mean of the two trainings (0.675), not the first alone (0.6)
    assert rows[MT]["gain_vs_supervised"] == pytest.approx(0.7 - 0.675)
    assert rows[MT]["gap_closed"] == pytest.approx(gap_closed(0.7, 0.675, 0.9))


def test_repeated_trainings_train_the_baseline_with_another_seed_into_their_own_results_folder(tmp_path,
                                                                                               monkeypatch):
    calls = []

    def fake_train_and_predict(trainer, dataset_id, raw, configuration, fold, env, out, device, tag, result,
                               disable_tta=False, train_args=(), training_seed=None):
        calls.append((trainer, env["nnUNet_results"], training_seed, tag))
        return tmp_path / "pred"

    monkeypatch.setattr(cli, "_train_and_predict", fake_train_and_predict)
    monkeypatch.setattr(cli, "_evaluate", lambda pred, raw, result: None)
    monkeypatch.setattr("nnunetv2.utilities.dataset_name_id_conversion.maybe_convert_to_dataset_name",
                        lambda i: "Dataset1_X")
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pp"),
           "nnUNet_results": str(tmp_path / "results")}
    first = cli.run_trainer(BASELINE, 1, "2d", "0", env, tmp_path, "cpu", 7)
    third = cli.run_trainer(R3, 1, "2d", "0", env, tmp_path, "cpu", 7)
    assert first.error is None and third.error is None and third.trainer == R3
    assert calls[0][:3] == (BASELINE, str(tmp_path / "results"), None)  # the first: the row's seed, as before
    assert calls[1][:3] == (BASELINE, str(Path(tmp_path / "results") / f"{REPEAT_RESULTS}3"), 7 + 2000)
    assert calls[0][3] != calls[1][3]  # their own logs and predictions
    assert "training seed 2007" in third.notes


def test_run_rows_computes_each_training_once_and_reuses_them(tmp_path, monkeypatch):
    calls = []

    def fake_run_trainer(trainer, dataset_id, configuration, fold, env, out, device, seed, *args):
        calls.append(trainer)
        value = {BASELINE: 0.6, R2: 0.7, FULL_REFERENCE: 0.9}.get(trainer, 0.75)
        return _result(trainer, seed, {"c0": value, "c1": value})

    monkeypatch.setattr(cli, "run_trainer", fake_run_trainer)
    trainers = order_rows([BASELINE, MT], full_reference=True, reference_repeats=2)
    for _ in range(2):
        run = cli.DatasetRun(1, "2d", "0", {"NNSSL_NUM_EPOCHS": "3"}, 0, "synthetic", full_id=5, label="seed 0")
        cli.run_rows(run, trainers, tmp_path, "cpu", True, [], 0.0)
    assert calls == [BASELINE, R2, FULL_REFERENCE, MT]  # the second run reuses all four rows
    rows = {r["trainer"]: r for r in json.loads((tmp_path / "benchmark.json").read_text(encoding="utf-8"))["rows"]}
    assert rows[BASELINE]["dice_mean"] == pytest.approx(0.65)
    assert rows[MT]["gap_closed"] == pytest.approx((0.75 - 0.65) / (0.9 - 0.65))


def test_the_cli_refuses_zero_repeats(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--synthetic", "--reference-repeats", "0", "-o", "unused"])
    assert "--reference-repeats: at least 1" in capsys.readouterr().err
