"""Predicted / true volume per class (nnssl.benchmark.volume_bias) and its section in benchmark.md."""

from __future__ import annotations

import math

from nnssl.benchmark.cli import RunResult, write_outputs
from nnssl.benchmark.volume_bias import volume_bias_markdown, volume_ratios


def _case(name, **classes):
    return {"case": name, "metrics": {c: {"n_pred_voxels": p, "n_ref_voxels": r} for c, (p, r) in classes.items()}}


def test_ratio_sums_voxels_over_cases_before_dividing_and_is_nan_without_reference():
    cases = [_case("a", MYO=(30, 10), LV=(5, 10), RV=(4, 0)), _case("b", MYO=(10, 30), LV=(15, 10), RV=(0, 0))]
    ratios = volume_ratios(cases)
    assert ratios["MYO"] == 1.0  # 40 / 40: not the mean of the per-case ratios (3 and 1/3)
    assert ratios["LV"] == 1.0 and math.isnan(ratios["RV"])


def test_table_gives_the_mean_over_seeds_and_each_seed_and_skips_rows_without_ratios():
    text = volume_bias_markdown([("GuidedNet", 1, {"MYO": 1.5}), ("GuidedNet", 0, {"MYO": 3.0}),
                                 ("Supervised", 0, {"MYO": 1.2}), ("Old", 0, None)])
    lines = text.splitlines()
    assert lines[0] == "| trainer | MYO | seeds |"
    assert "| GuidedNet | 2.25 (3.00, 1.50) | 0, 1 |" in lines and "| Supervised | 1.20 | 0 |" in lines
    assert not any("Old" in line for line in lines)
    assert volume_bias_markdown([("Old", 0, None)]) == ""


def test_benchmark_md_has_the_volume_section_only_when_a_row_has_ratios(tmp_path):
    def result(trainer, seed, dice, ratio):
        return RunResult(trainer, "Dataset1_X", seed, dice={"MYO": dice}, nsd={"MYO": dice},
                         seconds_per_iteration=0.1, max_rss_mb=100.0, wall_seconds=1.0, volume_ratio=ratio)

    rows = [result("nnUNetTrainerSupervised", 0, 0.7, {"MYO": 1.1}), result("nnUNetTrainerCPS", 0, 0.6, {"MYO": 2.0})]
    write_outputs(rows, tmp_path)
    md = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "## Predicted / true volume on the test set" in md and "| nnUNetTrainerCPS | 2.00 | 0 |" in md
    (tmp_path / "old").mkdir()
    write_outputs([result("nnUNetTrainerSupervised", 0, 0.7, None)], tmp_path / "old")
    assert "Predicted / true volume" not in (tmp_path / "old" / "benchmark.md").read_text(encoding="utf-8")
