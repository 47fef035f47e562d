"""``nnssl_evaluate`` (``python -m nnssl.evaluation.cli``) end to end in a fresh interpreter with worker processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from evaluation_cases import LABELS, make_nifti_cases

from nnssl.evaluation.evaluate import evaluate_folders


def test_cli_end_to_end_with_dataset_id(tmp_path):
    """The real entry point in a fresh interpreter, two worker processes; -d resolves $nnUNet_raw/Dataset123_*."""
    raw = tmp_path / "raw"
    dataset = raw / "Dataset123_Tiny"
    dataset.mkdir(parents=True)
    pred_dir, gt_dir, _ = make_nifti_cases(tmp_path)
    (dataset / "dataset.json").write_text(
        json.dumps({"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 3})
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("nnUNet_")}
    env["nnUNet_raw"] = str(raw)
    result = subprocess.run(
        [sys.executable, "-m", "nnssl.evaluation.cli", str(pred_dir), str(gt_dir), "-d", "123", "-np", "2"],
        capture_output=True,
        encoding="utf-8", errors="replace",
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "liver" in result.stdout and "spleen" in result.stdout and "foreground mean" in result.stdout
    assert "3/3" in result.stderr  # the tqdm progress bar
    summary = json.loads((pred_dir / "nnssl_evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["num_cases"] == 3 and summary["tolerance_mm"] == 1.0
    assert summary["per_class"]["liver"]["hd95"]["mean"] == pytest.approx(2.0 / 3)
    assert summary["per_class"]["spleen"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert len((pred_dir / "nnssl_evaluation" / "per_case.csv").read_text(encoding="utf-8").splitlines()) == 1 + 6
    # the two worker processes give exactly what the in-process sequential path gives
    sequential = evaluate_folders(pred_dir, gt_dir, LABELS, num_processes=1, progress=False)
    assert [r["case"] for r in summary["per_case"]] == [r["case"] for r in sequential["per_case"]]
    for record_parallel, record_sequential in zip(summary["per_case"], sequential["per_case"]):
        for name in ("liver", "spleen"):
            expected = {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in record_sequential["metrics"][name].items()
            }
            assert record_parallel["metrics"][name] == pytest.approx(expected)
