"""nnssl_benchmark: table maths on hand-made results, and a --smoke run through the real CLIs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from e2e_utils import run_cli

from nnssl.benchmark.cli import (
    BASELINE,
    RunResult,
    markdown_table,
    predict_with_mirroring,
    seconds_per_iteration,
    summarize,
)


def _result(trainer, seed, liver, kidney, sec, mem, wall=60.0):
    return RunResult(trainer, "Dataset1_X", seed, dice={"liver": liver, "kidney": kidney},
                     nsd={"liver": liver, "kidney": kidney}, seconds_per_iteration=sec, max_rss_mb=mem,
                     wall_seconds=wall)


def test_summary_gain_spread_and_relative_cost():
    results = [_result(BASELINE, 0, 0.8, 0.4, 1.0, 1000), _result(BASELINE, 1, 0.6, 0.4, 1.0, 1000),
               _result("nnUNetTrainerMeanTeacher", 0, 0.9, 0.5, 1.5, 1200),
               _result("nnUNetTrainerMeanTeacher", 1, 0.8, 0.4, 2.5, 1400, wall=100.0)]
    rows = {r["trainer"]: r for r in summarize(results)}
    base, mt = rows[BASELINE], rows["nnUNetTrainerMeanTeacher"]
    assert base["dice_mean"] == pytest.approx(0.55) and base["gain_vs_supervised"] == pytest.approx(0)
    assert mt["dice_mean"] == pytest.approx(0.65) and mt["gain_vs_supervised"] == pytest.approx(0.10)
    assert mt["dice_seed_spread"] == pytest.approx(0.10)  # seed means 0.70 and 0.60
    assert mt["time_rel"] == pytest.approx(2.0) and mt["memory_rel"] == pytest.approx(1.3)
    table = markdown_table(list(rows.values()))
    assert "| nnUNetTrainerMeanTeacher | 0.850 | 0.450 | 0.650 |" in table and "+0.100" in table
    assert mt["wall_seconds"] == pytest.approx(80.0)  # mean over seeds of the whole row's seconds
    (mt_line,) = [line for line in table.splitlines() if line.startswith("| nnUNetTrainerMeanTeacher")]
    assert mt_line.endswith("| 80 |")


def test_mirroring_off_only_for_the_synthetic_presets_unless_asked():
    assert predict_with_mirroring(None, synthetic=False) is True  # nnU-Net's default on a real dataset
    assert predict_with_mirroring(None, synthetic=True) is False
    assert predict_with_mirroring(True, synthetic=True) is True and predict_with_mirroring(False, False) is False


def test_failed_run_keeps_a_row():
    failed = RunResult("nnUNetTrainerCPS", "Dataset1_X", 0, error="boom")
    rows = summarize([_result(BASELINE, 0, 0.8, 0.4, 1.0, 1000), failed])
    assert rows[1]["failed"] == 1 and "dice_mean" not in rows[1]
    assert "| nnUNetTrainerCPS | failed |" in markdown_table(rows)


def test_launch_splits_train_then_predict_and_refuses_other_scripts():
    from nnssl.benchmark.launch import THEN, split_commands

    train = ["nnUNetv2_train", "1", "3d_fullres", "0", "-tr", "X"]
    predict = ["nnUNetv2_predict", "-i", "in", "-o", "out"]
    assert split_commands([*train, THEN, *predict]) == [train, predict]
    assert split_commands(train) == [train]
    for bad in (["rm", "-rf"], [*train, THEN], [THEN, *predict]):
        with pytest.raises(SystemExit, match="expected one of"):
            split_commands(bad)


def test_seconds_per_iteration_drops_warmup_epoch():
    log = "x train seconds/iteration: 9.0\ny train seconds/iteration: 1.0\nz train seconds/iteration: 3.0\n"
    assert seconds_per_iteration(log) == pytest.approx(2.0)
    assert seconds_per_iteration("train seconds/iteration: 4.5") == pytest.approx(4.5)


@pytest.mark.slow
def test_benchmark_smoke_on_planned_dataset(synthetic3d, tmp_path):
    """--smoke through the real CLIs, with the two-stage pseudo-label row: the baseline is put first (it is stage 1),
    nnssl_pseudolabel writes a free dataset id (every unlabeled case kept with --pl-min-voxels 0), the fine-tuned
    model predicts the source's test set. The fully supervised reference (the dataset has withheld labels) comes
    second, on its own free id with the source's plans; gap closed is in the tables; a rerun with the same -o reuses
    every finished row and trains nothing."""
    from nnssl.benchmark.cli import (
        FULL_REFERENCE,
        FULL_REFERENCE_REGISTRY,
        PSEUDO_LABEL_REGISTRY,
        PSEUDO_LABEL_TRAINER,
    )
    from nnssl.pseudolabel.dataset import REPORT_JSON

    ds = synthetic3d
    out = tmp_path / "bench"
    env = {**ds.env, "nnUNet_results": str(tmp_path / "results")}
    command = ["nnssl_benchmark", "-d", str(ds.dataset_id), "-c", "3d_fullres", "-f", "0", "--smoke", "-device",
               "cpu", "-o", str(out), "--trainers", "nnUNetTrainerMeanTeacher", PSEUDO_LABEL_TRAINER,
               "--pl-min-voxels", "0"]
    proc = run_cli(command, env)
    data = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    trainers = [BASELINE, FULL_REFERENCE, "nnUNetTrainerMeanTeacher", PSEUDO_LABEL_TRAINER]
    assert [r["trainer"] for r in data["rows"]] == trainers
    for run in data["runs"]:
        assert run["error"] is None, run
        assert set(run["dice"]) == {"liver", "spleen", "kidney", "adrenal"}
        assert run["seconds_per_iteration"] > 0 and run["max_rss_mb"] > 100
        assert run["dataset"] == ds.name  # the pseudo-label row is scored in the source dataset's table
        assert len(run["per_case_dice"]) == 2  # both test cases, for the paired test
        assert set(run["volume_ratio"]) == set(run["dice"])  # predicted / true volume per class, from the evaluation
        assert all(v >= 0 or v != v for v in run["volume_ratio"].values())  # NaN: class absent from the references

    registry = json.loads((out / PSEUDO_LABEL_REGISTRY).read_text(encoding="utf-8"))
    (new_id,) = registry.values()
    assert 900 <= new_id <= 999 and new_id != ds.dataset_id
    (new_raw,) = (ds.raw.parent).glob(f"Dataset{new_id}_*")
    report = json.loads((new_raw / REPORT_JSON).read_text(encoding="utf-8"))
    n_unlabeled = len(list((ds.raw / "imagesUnlabeled").glob("*.nii.gz")))
    assert report["num_selected"] == report["num_predicted"] == n_unlabeled
    assert len(list((new_raw / "labelsTr").glob("pl_*.nii.gz"))) == n_unlabeled
    pl_run = data["runs"][3]
    assert f"{n_unlabeled} of {n_unlabeled} unlabeled cases selected" in pl_run["notes"]
    finetuned = (tmp_path / "results" / new_raw.name / f"{PSEUDO_LABEL_TRAINER}__nnUNetPlans__3d_fullres" / "fold_0")
    assert (finetuned / "checkpoint_final.pth").is_file()
    # stage 2 started from the stage-1 model (-pretrained_weights given, heads copied from it)
    log = "".join(p.read_text(encoding="utf-8") for p in finetuned.glob("training_log_*.txt"))
    assert "segmentation heads" in log and "now equals the source model" in log

    # the fully supervised reference: its own dataset (labeled + unlabeled with withheld labels), the source's plans
    (full_id,) = json.loads((out / FULL_REFERENCE_REGISTRY).read_text(encoding="utf-8")).values()
    assert 900 <= full_id <= 999 and full_id not in (ds.dataset_id, new_id)
    (full_raw,) = (ds.raw.parent).glob(f"Dataset{full_id}_*")
    assert len(list((full_raw / "labelsTr").iterdir())) == len(list((ds.raw / "labelsTr").iterdir())) + n_unlabeled
    full_plans = ds.preprocessed.parent / full_raw.name / "nnUNetPlans.json"
    source_plans = json.loads((ds.preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    source_cfg = source_plans["configurations"]["3d_fullres"]
    full_cfg = json.loads(full_plans.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    for key in ("patch_size", "architecture", "normalization_schemes", "spacing"):
        assert full_cfg[key] == source_cfg[key], key
    full_run = data["runs"][1]
    assert full_run["trainer"] == FULL_REFERENCE and np.isfinite(np.mean(list(full_run["dice"].values())))
    assert f"{n_unlabeled} unlabeled cases with their withheld labels" in full_run["notes"]
    # the SSL row carries its own per-epoch diagnostics; the supervised rows log none
    mt_run = data["runs"][2]
    assert {"pseudo_label_dice", "unsupervised_weight", "loss_unsupervised"} <= set(mt_run["ssl_progress"])
    assert data["runs"][0]["ssl_progress"] is None
    diagnostics = (out / "benchmark.md").read_text(encoding="utf-8").split("## What the SSL rows did")[1]
    assert "| nnUNetTrainerMeanTeacher |" in diagnostics.split("## Predicted / true volume")[0]
    assert BASELINE not in diagnostics.split("## Predicted / true volume")[0]
    volume = diagnostics.split("## Predicted / true volume")[1]
    assert f"| {BASELINE} |" in volume and "| nnUNetTrainerMeanTeacher |" in volume

    with open(out / "benchmark.csv", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and {"gap_closed", "gap_closed_ci_low", "wilcoxon_p"} <= set(csv_rows[0])
    assert (out / "benchmark.png").stat().st_size > 0 and (out / "benchmark_gap.png").stat().st_size > 0
    table = (out / "benchmark.md").read_text(encoding="utf-8")
    assert "Dice mean" in table and f"- {PSEUDO_LABEL_TRAINER}: stage 1 = the {BASELINE} row" in table
    assert "gap closed [95 % CI]" in table and "Wilcoxon signed-rank" in table
    assert "nnUNetTrainerMeanTeacher" in proc.stdout
    assert len(list((out / "rows").glob("*.json"))) == 4

    # the same command again: every row is reused, nothing is trained
    checkpoint = finetuned / "checkpoint_final.pth"
    mtime = checkpoint.stat().st_mtime
    again = run_cli(command, env)
    assert again.stdout.count("reusing finished row") == 4, again.stdout
    assert checkpoint.stat().st_mtime == mtime
    rerun = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert [r["trainer"] for r in rerun["rows"]] == trainers and json.dumps(rerun["runs"]) == json.dumps(data["runs"])

    # --tables-only with one more trainer: the finished rows are shown, the new one is listed as not computed
    tables = run_cli([*command, "--trainers", "nnUNetTrainerMeanTeacher", PSEUDO_LABEL_TRAINER, "nnUNetTrainerCPS",
                      "--tables-only"], env)
    assert tables.stdout.count("reusing finished row") == 4 and "nnUNetTrainerCPS" in tables.stdout
    assert checkpoint.stat().st_mtime == mtime and len(list((out / "rows").glob("*.json"))) == 4
    assert not (tmp_path / "results" / ds.name / "nnUNetTrainerCPS__nnUNetPlans__3d_fullres").exists()
    runs = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["runs"]
    cps = [r for r in runs if r["trainer"] == "nnUNetTrainerCPS"]
    assert len(cps) == 1 and cps[0]["skipped"].startswith("not computed yet") and cps[0]["error"] is None

    # --reference-repeats 2: the labeled-only reference trained a second time (its own results folder and training
    # seed), every other row reused, and the table's reference is the mean of the two trainings
    from nnssl.benchmark.cli import REPEAT_RESULTS

    repeated = run_cli([*command, "--reference-repeats", "2"], env)
    assert repeated.stdout.count("reusing finished row") == 4 and f"{BASELINE}#2" in repeated.stdout
    second = tmp_path / "results" / f"{REPEAT_RESULTS}2"
    assert (second / ds.name / f"{BASELINE}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file()
    data2 = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert [r["trainer"] for r in data2["rows"]] == trainers  # still one reference row
    assert [r["trainer"] for r in data2["runs"]][:2] == [BASELINE, f"{BASELINE}#2"]
    assert data2["runs"][1]["error"] is None and "training seed 1000" in data2["runs"][1]["notes"]
    per_class = np.mean([list(r["dice"].values()) for r in data2["runs"][:2]], axis=0)  # class by class
    assert data2["rows"][0]["dice_mean"] == pytest.approx(np.nanmean(per_class))
    assert "mean of 2 trainings of the labeled-only reference" in data2["rows"][0]["notes"]


@pytest.mark.slow
def test_benchmark_smoke_equal_time_budget(synthetic3d, tmp_path):
    """--budget both through the real CLIs: a speed calibration of both trainers (saved), the labeled-only row once,
    Mean Teacher at the schedule and at equal time with fewer iterations per epoch, both in every output; a rerun
    reuses the calibration and every row."""
    from nnssl.benchmark.budget import calibration_file

    ds = synthetic3d
    out = tmp_path / "bench"
    env = {**ds.env, "nnUNet_results": str(tmp_path / "results")}
    mt = "nnUNetTrainerMeanTeacher"
    command = ["nnssl_benchmark", "-d", str(ds.dataset_id), "-c", "3d_fullres", "-f", "0", "--smoke", "-device",
               "cpu", "-o", str(out), "--budget", "both", "--trainers", BASELINE, mt, "--no-full-reference"]
    proc = run_cli(command, env)
    assert proc.stdout.count("nnssl_benchmark: speed calibration") == 2, proc.stdout
    data = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert [(r["trainer"], r["budget"]) for r in data["rows"]] == [(BASELINE, "both"), (mt, "iterations"),
                                                                   (mt, "time")]
    runs = {(r["trainer"], r["budget"]): r for r in data["runs"]}
    for run in runs.values():
        assert run["error"] is None, run
    seconds = json.loads(calibration_file(out, ds.dataset_id, "3d_fullres", 0, "cpu").read_text(encoding="utf-8"))
    assert set(seconds["seconds_per_iteration"]) == {BASELINE, mt}
    # --smoke: 1 epoch x 2 iterations; Mean Teacher is slower per iteration, so it gets fewer at equal time
    assert runs[(mt, "iterations")]["schedule"] == "1 epochs x 2 iterations"
    assert runs[(mt, "time")]["schedule"] == "1 epochs x 1 iterations", seconds
    assert runs[(mt, "time")]["time_scale"] == pytest.approx(0.5)
    assert "equal time: 1 instead of 2 iterations per epoch" in runs[(mt, "time")]["notes"]
    assert (tmp_path / "results" / "equal_time").is_dir()  # its own model; the equal-iteration one stays
    with open(out / "benchmark.csv", encoding="utf-8") as f:
        assert [r["budget"] for r in csv.DictReader(f)] == ["both", "iterations", "time"]
    table = (out / "benchmark.md").read_text(encoding="utf-8")
    assert f"| {mt} @ equal time |" in table and f"| {mt} |" in table
    assert (out / "benchmark_gap.png").stat().st_size > 0 and len(list((out / "rows").glob("*.json"))) == 3

    again = run_cli(command, env)
    assert "nnssl_benchmark: speed calibration" not in again.stdout, again.stdout
    assert again.stdout.count("reusing finished row") == 3, again.stdout


def test_launch_seeds_every_generator_from_the_environment(monkeypatch, tmp_path):
    """NNSSL_BENCHMARK_SEED makes the draws of a launched training repeat: two launches with the same seed see the
    same random numbers from Python, numpy and torch; another seed other numbers."""
    import random

    import torch

    from nnssl.benchmark import launch

    def draws(seed: str) -> list:
        seen = []
        monkeypatch.setattr(launch, "run_entry_point",
                            lambda command: seen.append((random.random(), np.random.rand(), torch.rand(1).item())))
        monkeypatch.setenv(launch.ENV_SEED, seed)
        monkeypatch.setattr("sys.argv", ["launch", str(tmp_path / "m.json"), "nnUNetv2_train", "1", "2d", "0"])
        launch.main()
        return seen

    assert draws("3") == draws("3") != draws("4")
