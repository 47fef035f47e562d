"""nnssl_benchmark phase 1 of the label-efficiency benchmark: gap closed with its interval, the paired test, the fully
labeled reference dataset and per-row resume, on hand-made results and a tiny generated raw dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnssl.benchmark import cli
from nnssl.benchmark.cli import BASELINE, FULL_REFERENCE, RunResult, markdown_table, order_rows, summarize
from nnssl.benchmark.gap import GAP_MIN_DENOMINATOR, gap_closed, mean_ci, paired_cases, wilcoxon_p
from nnssl.benchmark.resume import load_row, row_file, row_key, save_row

MT = "nnUNetTrainerMeanTeacher"


def _result(trainer, seed, dice, per_case=None, dataset="Dataset1_X", **kw):
    """A finished row whose two classes both score ``dice`` (so its mean foreground Dice is ``dice``)."""
    per_case = per_case if per_case is not None else {f"c{i}": dice for i in range(4)}
    return RunResult(trainer, dataset, seed, dice={"a": dice, "b": dice}, nsd={"a": dice, "b": dice},
                     seconds_per_iteration=1.0, max_rss_mb=1000.0, wall_seconds=10.0,
                     per_case_dice={c: {"a": v, "b": v} for c, v in per_case.items()}, **kw)


def _three_rows(seed, base, full, method, shift=0.0):
    cases = {f"c{i}": base + 0.01 * i for i in range(6)}
    return [_result(BASELINE, seed, base, cases), _result(FULL_REFERENCE, seed, full),
            _result(MT, seed, method, {c: v + shift + 0.001 * i for i, (c, v) in enumerate(cases.items())})]


# ---- the maths -----------------------------------------------------------------------------------------------------

def test_gap_closed_is_0_for_labeled_only_1_for_full_and_scales_between():
    assert gap_closed(0.6, 0.6, 0.9) == 0.0
    assert gap_closed(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert gap_closed(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)  # worse than labeled-only: negative, reported as is


@pytest.mark.parametrize("full", [0.6 + GAP_MIN_DENOMINATOR / 2, 0.6, 0.4, float("nan")])
def test_gap_closed_undefined_when_the_full_reference_is_not_clearly_above(full):
    assert math.isnan(gap_closed(0.9, 0.6, full))  # not (0.9 - 0.6) / 0.01 = 30


def test_mean_ci_is_the_student_t_interval_and_nan_with_one_seed():
    mean, low, high = mean_ci([0.2, 0.4])
    half = 12.7062047 * np.std([0.2, 0.4], ddof=1) / math.sqrt(2)  # t_{0.975, 1}
    assert (mean, low, high) == pytest.approx((0.3, 0.3 - half, 0.3 + half))
    assert mean_ci([0.5])[0] == 0.5 and all(math.isnan(v) for v in mean_ci([0.5])[1:])
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([0.2, float("nan"), 0.4]) == pytest.approx((mean, low, high))  # undefined seeds left out


def test_mean_ci_shrinks_with_more_seeds_of_the_same_spread():
    widths = [(lambda m: m[2] - m[1])(mean_ci([0.2, 0.4] * k)) for k in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert mean_ci([0.3, 0.3, 0.3])[1:] == pytest.approx((0.3, 0.3))  # no spread, no width


def test_wilcoxon_pairs_by_seed_and_case():
    method = {0: {"x": {"a": 0.9}, "y": {"a": 0.8}}, 1: {"x": {"a": 0.7}}}
    reference = {0: {"x": {"a": 0.5}, "y": {"a": 0.6}, "z": {"a": 0.1}}, 2: {"x": {"a": 0.0}}}
    assert paired_cases(method, reference) == ([0.9, 0.8], [0.5, 0.6])  # seed 0, cases x and y only
    assert wilcoxon_p([0.5, 0.6], [0.5, 0.6]) == 1.0  # no difference at all
    assert math.isnan(wilcoxon_p([], []))
    rng = np.random.default_rng(0)
    y = rng.uniform(0.3, 0.7, 30)
    assert wilcoxon_p(list(y + 0.1), list(y)) < 1e-4 and wilcoxon_p(list(y + rng.normal(0, 0.05, 30)), list(y)) > 0.01


# ---- the table -----------------------------------------------------------------------------------------------------

def test_summary_gap_closed_over_seeds_with_interval_and_paired_test():
    results = [*_three_rows(0, 0.6, 0.9, 0.75, shift=0.15), *_three_rows(1, 0.5, 0.9, 0.7, shift=0.2)]
    rows = {r["trainer"]: r for r in summarize(results)}
    assert rows[BASELINE]["gap_closed"] == 0.0 and rows[FULL_REFERENCE]["gap_closed"] == pytest.approx(1.0)
    mt = rows[MT]
    assert mt["gap_closed_per_seed"] == pytest.approx({"0": 0.5, "1": 0.5})
    assert mt["gap_closed"] == pytest.approx(0.5) and mt["gap_closed_seeds"] == 2
    assert mt["gap_closed_ci_low"] == pytest.approx(0.5) and mt["gap_closed_ci_high"] == pytest.approx(0.5)
    assert mt["wilcoxon_pairs"] == 12 and mt["wilcoxon_p"] < 0.01  # every case of both seeds is better
    table = markdown_table(list(rows.values()))
    assert "gap closed [95 % CI]" in table and "Wilcoxon signed-rank" in table and "seeds × test cases" in table
    (mt_line,) = [line for line in table.splitlines() if line.startswith(f"| {MT}")]
    assert "| +0.50 [+0.50, +0.50] |" in mt_line and "(n=12)" in mt_line
    assert "| 0.725 | 0.725 | 0.725 |" in mt_line  # absolute Dice per class and mean stay next to it


def test_a_seed_whose_reference_failed_is_left_out_of_gain_and_gap_and_named():
    """Seed 1's labeled-only row failed and seed 2 has no full reference: the gain pairs seeds, gap closed uses only
    seed 0, and the table says which seeds were left out of what (the Dice columns keep every seed)."""
    results = [*_three_rows(0, 0.6, 0.9, 0.75),
               RunResult(BASELINE, "Dataset1_X", 1, error="killed"), _result(FULL_REFERENCE, 1, 0.9),
               _result(MT, 1, 0.9),
               _result(BASELINE, 2, 0.7), _result(MT, 2, 0.72)]
    mt = next(r for r in summarize(results) if r["trainer"] == MT)
    assert mt["dice_mean"] == pytest.approx((0.75 + 0.9 + 0.72) / 3)
    assert mt["gain_vs_supervised"] == pytest.approx((0.15 + 0.02) / 2) and mt["gain_seeds"] == 2
    assert mt["gap_closed_per_seed"] == pytest.approx({"0": 0.5}) and mt["gap_closed_seeds"] == 1
    assert "seed(s) 1 without a finished nnUNetTrainerSupervised row" in mt["unpaired_note"]
    assert "seed(s) 2 without a finished FullySupervised row: left out of gap closed" in mt["unpaired_note"]
    assert f"- {MT}: seed(s) 1 without" in markdown_table(summarize(results))


def test_one_seed_gap_has_no_interval():
    rows = {r["trainer"]: r for r in summarize(_three_rows(0, 0.6, 0.9, 0.66))}
    assert rows[MT]["gap_closed"] == pytest.approx(0.2) and math.isnan(rows[MT]["gap_closed_ci_low"])
    assert "| +0.20 [n/a, n/a] |" in markdown_table(list(rows.values()))


def test_tiny_gap_is_undefined_with_a_note_not_a_huge_number():
    rows = summarize(_three_rows(0, 0.6, 0.61, 0.9))
    mt = next(r for r in rows if r["trainer"] == MT)
    assert math.isnan(mt["gap_closed"])
    table = markdown_table(rows)
    assert "gap closed undefined where the fully supervised reference is less than 0.02" in table
    assert "seed 0: +0.010" in table and "| n/a |" in table


def test_without_withheld_labels_the_table_says_why():
    reason = "no labelsUnlabeled: the fully supervised reference needs the withheld labels"
    results = [_result(BASELINE, 0, 0.6), RunResult(FULL_REFERENCE, "Dataset1_X", 0, skipped=reason),
               _result(MT, 0, 0.7)]
    rows = summarize(results)
    assert [r["trainer"] for r in rows] == [BASELINE, FULL_REFERENCE, MT]
    assert math.isnan(rows[2]["gap_closed"]) and rows[2]["gain_vs_supervised"] == pytest.approx(0.1)
    table = markdown_table(rows)
    assert f"| {FULL_REFERENCE} | skipped: {reason} |" in table
    assert f"gap closed n/a: no fully supervised reference ({reason})" in table


def test_gap_plot_with_and_without_gap(tmp_path):
    rows = summarize([*_three_rows(0, 0.6, 0.9, 0.75), *_three_rows(1, 0.5, 0.9, 0.7),
                      _result(BASELINE, 0, 0.6, dataset="Dataset2_Y"), _result(MT, 0, 0.7, dataset="Dataset2_Y")])
    cli.gap_plot(rows, tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 0


def test_references_run_first():
    assert order_rows([MT, BASELINE], full_reference=True) == [BASELINE, FULL_REFERENCE, MT]
    assert order_rows([MT], full_reference=True) == [FULL_REFERENCE, MT]
    assert order_rows([MT, BASELINE], full_reference=False) == [BASELINE, MT]


# ---- resume --------------------------------------------------------------------------------------------------------

def test_row_round_trip_and_schedule_in_the_key(tmp_path):
    env = {"NNSSL_NUM_EPOCHS": "5", "NNSSL_ITERATIONS_PER_EPOCH": "40", "PATH": "/x"}
    key = row_key(960, "3d_fullres", "all", MT, 0, env, "synthetic", device="cpu")
    assert key["schedule"] == {"NNSSL_ITERATIONS_PER_EPOCH": "40", "NNSSL_NUM_EPOCHS": "5"}  # PATH is no schedule
    result = _result(MT, 0, 0.7)
    save_row(tmp_path, key, result)
    assert row_file(tmp_path, key).parent == tmp_path / "rows"
    assert load_row(tmp_path, key, RunResult) == result
    longer = row_key(960, "3d_fullres", "all", MT, 0, {**env, "NNSSL_NUM_EPOCHS": "30"}, "synthetic", device="cpu")
    assert load_row(tmp_path, longer, RunResult) is None
    failed = row_key(960, "3d_fullres", "all", "nnUNetTrainerCPS", 0, env, "synthetic", device="cpu")
    save_row(tmp_path, failed, RunResult("nnUNetTrainerCPS", "D", 0, error="boom"))
    assert load_row(tmp_path, failed, RunResult) is None  # a failed row is recomputed


def test_rerun_reuses_finished_rows_and_recomputes_under_another_schedule(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_trainer(trainer, dataset_id, configuration, fold, env, out, device, seed, *args):
        calls.append((trainer, env["NNSSL_NUM_EPOCHS"]))
        if trainer == "nnUNetTrainerCPS" and len(calls) <= 3:
            return RunResult(trainer, "Dataset960_X", seed, error="killed")
        return _result(trainer, seed, {BASELINE: 0.6, FULL_REFERENCE: 0.9}.get(trainer, 0.7), dataset="Dataset960_X")

    monkeypatch.setattr(cli, "run_trainer", fake_run_trainer)
    trainers = [BASELINE, FULL_REFERENCE, "nnUNetTrainerCPS"]

    def run(epochs):
        run_ = cli.DatasetRun(960, "3d_fullres", "all", {"NNSSL_NUM_EPOCHS": epochs}, 0, "synthetic", full_id=964,
                              label="seed 0")
        results = []
        cli.run_rows(run_, trainers, tmp_path, "cpu", True, results, 0.0)
        return results

    run("5")
    assert calls == [(BASELINE, "5"), (FULL_REFERENCE, "5"), ("nnUNetTrainerCPS", "5")]
    capsys.readouterr()
    results = run("5")  # the same schedule: only the failed row runs again
    assert calls[3:] == [("nnUNetTrainerCPS", "5")]
    assert capsys.readouterr().out.count("reusing finished row") == 2 and len(results) == 3
    run("6")  # another schedule: nothing is reused
    assert calls[4:] == [(t, "6") for t in trainers]
    rows = json.loads((tmp_path / "benchmark.json").read_text(encoding="utf-8"))["rows"]
    assert rows[2]["gap_closed"] == pytest.approx(1 / 3)


# ---- the fully labeled dataset -------------------------------------------------------------------------------------

@pytest.fixture
def tiny_raw(tmp_path):
    from nnssl.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "raw", 7, "2d", n_labeled=2, n_unlabeled=3, n_test=1, seed=0)


def test_full_label_dataset_holds_every_withheld_label_and_leaves_the_source_alone(tiny_raw, tmp_path):
    from nnssl.benchmark.full_reference import missing_withheld_labels, write_full_label_dataset
    from nnssl.pseudolabel.dataset import RawDataset
    from nnssl.split import load_and_validate, load_split

    assert missing_withheld_labels(tiny_raw) is None
    before = sorted(p.name for p in tiny_raw.rglob("*"))
    source = RawDataset(tiny_raw, tiny_raw.name, json.loads((tiny_raw / "dataset.json").read_text(encoding="utf-8")),
                        load_and_validate(tiny_raw))
    dest = tmp_path / "raw" / "Dataset964_XFull"
    split = write_full_label_dataset(source, dest)
    assert sorted(split.labeled) == sorted(source.split.labeled + source.split.unlabeled) and split.unlabeled == []
    assert split.test == source.split.test and split.extra["withheld_labels_used"] == source.split.unlabeled
    ending = source.file_ending
    for case in source.split.unlabeled:  # the withheld label, byte for byte, is now a training label
        assert (dest / "labelsTr" / f"{case}{ending}").read_bytes() == \
            (tiny_raw / "labelsUnlabeled" / f"{case}{ending}").read_bytes()
    assert not (dest / "labelsUnlabeled").exists() and load_split(dest / "ssl_split.json").labeled == split.labeled
    assert json.loads((dest / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 5
    assert sorted(p.name for p in tiny_raw.rglob("*")) == before
    write_full_label_dataset(source, dest)  # a rerun replaces its own dataset


def test_missing_withheld_labels_says_why(tiny_raw):
    from nnssl.benchmark.full_reference import missing_withheld_labels

    (first,) = sorted((tiny_raw / "labelsUnlabeled").iterdir())[:1]
    first.unlink()
    assert "lacks 1 of 3 withheld labels" in missing_withheld_labels(tiny_raw)
    for p in (tiny_raw / "labelsUnlabeled").iterdir():
        p.unlink()
    (tiny_raw / "labelsUnlabeled").rmdir()
    assert missing_withheld_labels(tiny_raw) == \
        "no labelsUnlabeled: the fully supervised reference needs the withheld labels"


def test_numbered_fold_keeps_its_validation_cases(tmp_path):
    from nnssl.benchmark.full_reference import derive_splits

    src, new = tmp_path / "src", tmp_path / "new"
    src.mkdir()
    new.mkdir()
    assert derive_splits(src, new, ["u1"]) is False
    (src / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]},
                                                       {"train": ["a", "c"], "val": ["b"]}]))
    assert derive_splits(src, new, ["u1", "u2"]) is True
    assert json.loads((new / "splits_final.json").read_text(encoding="utf-8")) == [
        {"train": ["a", "b", "u1", "u2"], "val": ["c"]}, {"train": ["a", "c", "u1", "u2"], "val": ["b"]}]


def test_full_label_dataset_of_a_multichannel_mri_dataset(tmp_path):
    """Any dataset in the raw contract, not only the presets: two MRI channels, every channel of every case copied."""
    import numpy as np
    import SimpleITK as sitk

    from nnssl.benchmark.full_reference import write_full_label_dataset
    from nnssl.pseudolabel.dataset import RawDataset
    from nnssl.split import SSLSplit, load_and_validate, save_split

    raw = tmp_path / "Dataset123_Prostate"
    roles = {"labeled": ["p0", "p1"], "unlabeled": ["p2", "p3"], "test": ["p4"]}
    folders = {"labeled": ("imagesTr", "labelsTr"), "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
               "test": ("imagesTs", "labelsTs")}
    for role, cases in roles.items():
        img_dir, lab_dir = (raw / f for f in folders[role])
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        for i, case in enumerate(cases):
            for channel in range(2):
                image = np.random.RandomState(i + channel).rand(4, 8, 8).astype(np.float32)
                sitk.WriteImage(sitk.GetImageFromArray(image), str(img_dir / f"{case}_{channel:04d}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray((image > 0.5).astype(np.uint8)), str(lab_dir / f"{case}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                  "labels": {"background": 0, "prostate": 1}, "numTraining": 2,
                                                  "file_ending": ".nii.gz"}))
    save_split(SSLSplit(**roles), raw / "ssl_split.json")
    dataset_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    source = RawDataset(raw, raw.name, dataset_json, load_and_validate(raw))
    dest = tmp_path / "Dataset124_ProstateFull"
    split = write_full_label_dataset(source, dest)
    assert sorted(split.labeled) == ["p0", "p1", "p2", "p3"]
    assert sorted(p.name for p in (dest / "imagesTr").iterdir()) == [
        f"{c}_{k:04d}.nii.gz" for c in ("p0", "p1", "p2", "p3") for k in (0, 1)]
    assert load_and_validate(dest).labeled == split.labeled
