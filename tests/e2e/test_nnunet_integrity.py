"""nnU-Net's own dataset check (``nnUNetv2_extract_fingerprint --verify_dataset_integrity`` or its function) on
every converter's output and on the synthetic generator's: what nnssl writes is a dataset nnU-Net accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import conversion_fakes as fakes
import pytest

from nnssl.synthetic import make_synthetic_dataset


def verify_with_nnunet_cli(dataset_id: int, nnraw: Path, tmp_path: Path):
    """``nnUNetv2_extract_fingerprint -d ID --verify_dataset_integrity``; asserts that it succeeds."""
    result = fakes.run_cli("nnUNetv2_extract_fingerprint", ["-d", dataset_id, "--verify_dataset_integrity", "-np", 1],
                           nnraw, {"nnUNet_preprocessed": str(tmp_path / "pre"),
                                   "nnUNet_results": str(tmp_path / "res")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_flare22_passes_nnunet_integrity_check(raw, nnraw, tmp_path):
    fakes.make_flare22(raw, n_labeled=2, n_unlabeled=1, n_tuning=0)
    fakes.convert("flare22", raw, nnraw, dataset_id=502)
    verify_with_nnunet_cli(502, nnraw, tmp_path)
    assert (tmp_path / "pre" / "Dataset502_FLARE22" / "dataset_fingerprint.json").is_file()


def test_busi_passes_nnunet_integrity_check(raw, nnraw, tmp_path):
    fakes.make_busi(raw, {"benign": 2, "malignant": 1, "normal": 1})
    fakes.convert("busi", raw, nnraw, "--test-fraction", 0, dataset_id=503)
    result = verify_with_nnunet_cli(503, nnraw, tmp_path)
    assert "NaturalImage2DIO" in result.stdout + result.stderr
    fingerprint = fakes.read_json(tmp_path / "pre" / "Dataset503_BUSI" / "dataset_fingerprint.json")
    assert fingerprint["spacings"][0] == [999.0, 1.0, 1.0]  # nnU-Net's marker of 2D natural images


@pytest.mark.parametrize("dataset", ["amos", "acdc", "la", "synapse", "pancreas"])
def test_other_datasets_pass_nnunet_verify_dataset_integrity(raw, tmp_path, dataset):
    """The remaining datasets (FLARE22 and BUSI go through the full nnU-Net CLI above), via nnU-Net's function."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from dataset_conversion import acdc, amos, la, pancreas, synapse
    from dataset_conversion.options import ConversionOptions, SplitOptions

    make, convert_fn = {"amos": (fakes.make_amos, amos.convert_amos), "acdc": (fakes.make_acdc, acdc.convert_acdc),
                        "la": (fakes.make_la, la.convert_la), "synapse": (fakes.make_synapse, synapse.convert_synapse),
                        "pancreas": (fakes.make_pancreas, pancreas.convert_pancreas)}[dataset]
    make(raw)
    out = tmp_path / f"Dataset520_{dataset}"
    convert_fn(raw, out, ConversionOptions(SplitOptions(labeled_count=2), progress=False))
    verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem
    assert fakes.read_json(out / "dataset.json")["numTraining"] == 2 * (2 if dataset == "acdc" else 1)


def test_nnunet_verify_dataset_integrity_cli(tmp_path):
    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    make_synthetic_dataset(raw, 504, kind="3d", n_labeled=2, n_unlabeled=1, n_test=1, seed=0)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(tmp_path / "results")}
    exe = Path(sys.executable).parent / "nnUNetv2_extract_fingerprint"
    cmd = [str(exe) if exe.exists() else "nnUNetv2_extract_fingerprint", "-d", "504", "--verify_dataset_integrity",
           "-np", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fingerprint_file = preprocessed / "Dataset504_Synthetic3D" / "dataset_fingerprint.json"
    fingerprint = json.loads(fingerprint_file.read_text(encoding="utf-8"))
    assert len(fingerprint["spacings"]) == 2  # labeled cases only
    assert fingerprint["shapes_after_crop"][0] == [32, 48, 48]
