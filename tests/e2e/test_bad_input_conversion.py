"""Bad inputs of ``nnssl_convert`` and ``nnssl_add_unlabeled`` (issue 13), each fed through the console script in a
subprocess: exit 1, one error line naming the file/id/option and the problem, no traceback, and nothing written or
deleted in the raw input or the output location (``tree_snapshot`` before and after)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bad_input import assert_unchanged, assert_user_error, run_script, tree_snapshot
from conversion_fakes import (
    make_busi,
    make_flare22,
    make_pancreas,
    read_json,
    script,
    volume,
    write_image,
    zip_folder,
)
from PIL import Image

DATASET = "Dataset501_FLARE22"


def env_for(nnraw: Path) -> dict[str, str]:
    env = {**os.environ, "nnUNet_raw": str(nnraw)}
    env.pop("NNSSL_SPLITS_DIR", None)
    env.pop("NNSSL_DEBUG", None)
    return env


def convert(nnraw: Path, *args) -> subprocess.CompletedProcess:
    return run_script([script("nnssl_convert"), *map(str, args), "--no-progress"], env=env_for(nnraw))


def add(nnraw: Path, *args) -> subprocess.CompletedProcess:
    return run_script([script("nnssl_add_unlabeled"), *map(str, args), "--no-progress"], env=env_for(nnraw))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def flare_dataset(raw: Path, nnraw: Path) -> Path:
    """A converted FLARE22 look-alike (1 channel, .nii.gz) to add unlabeled images to."""
    make_flare22(raw, n_labeled=3, n_unlabeled=1, n_tuning=0)
    assert convert(nnraw, "flare22", raw, "-d", 501, "-np", 1).returncode == 0
    return nnraw / DATASET


# ----------------------------------------------------------------------------------------------- 1. corrupt images


@pytest.mark.parametrize("what", ["image", "label"])
def test_convert_refuses_a_nifti_cut_to_half(raw, nnraw, what):
    cases = make_flare22(raw, n_labeled=3, n_unlabeled=0, n_tuning=0)
    bad = truncate(cases["FLARE22_Tr_0002"][0 if what == "image" else 1])
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "flare22", raw, "-d", 501, "-np", 2)
    line = assert_user_error(proc, f"{bad}: ")
    # SimpleITK reads the half image (with zeros); the tiny label is cut inside its header and not read at all
    assert "truncated file" in line or (what == "label" and "unreadable or corrupt image file" in line), line
    assert_unchanged(before, raw, nnraw)


def test_convert_refuses_a_truncated_nifti_inside_a_zip_and_names_the_member(raw, nnraw):
    make_flare22(raw, n_labeled=2, n_unlabeled=2, n_tuning=0)
    half = raw / "Training" / "FLARE22_UnlabeledCase1-1000"
    truncate(half / "Case_00002_0000.nii.gz")
    archive = zip_folder(half, raw / "Training" / "FLARE22_UnlabeledCase1-1000.zip")
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "flare22", raw, "-d", 501, "-np", 1)
    assert_user_error(proc, f"{archive}!FLARE22_UnlabeledCase1-1000/Case_00002_0000.nii.gz: truncated file")
    assert_unchanged(before, raw, nnraw)


def test_convert_refuses_a_truncated_png(raw, nnraw):
    cases = make_busi(raw, {"benign": 2, "malignant": 2})
    bad = truncate(cases["benign_1"][0])
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "busi", raw, "-d", 501, "-np", 1)
    assert_user_error(proc, str(bad), "truncated")
    assert_unchanged(before, raw, nnraw)


def test_convert_refuses_a_truncated_dicom_slice(raw, nnraw):
    """GDCM silently leaves a truncated slice out of the series (the volume just lacks a slice): it must be named."""
    cases = make_pancreas(raw, ids=(1, 2, 3, 4))
    bad = sorted(cases["pancreas_0002"][0].glob("*.dcm"))[3]
    bad.write_bytes(bad.read_bytes()[:-64])
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "pancreas", raw, "-d", 501, "-np", 1, "--test-fraction", 0)
    assert_user_error(proc, f"{bad}: corrupt or truncated DICOM file")
    assert_unchanged(before, raw, nnraw)


def test_add_unlabeled_refuses_a_nifti_cut_to_half(flare_dataset, nnraw, tmp_path):
    folder = tmp_path / "extra"
    write_image(folder / "good.nii.gz", volume(5))
    bad = truncate(write_image(folder / "scan_b.nii.gz", volume(6)))
    before = tree_snapshot(nnraw, folder)
    proc = add(nnraw, 501, folder, "-np", 2)
    assert_user_error(proc, f"{bad}: truncated file")
    assert_unchanged(before, nnraw, folder)


def test_add_unlabeled_refuses_a_png_without_its_end(raw, nnraw, tmp_path):
    """A PNG cut before its IEND chunk decodes with PIL's load(); only the complete check sees it."""
    make_busi(raw, {"benign": 2, "malignant": 2})
    assert convert(nnraw, "busi", raw, "-d", 502, "--labeled-count", 2, "--test-fraction", 0).returncode == 0
    folder = tmp_path / "generated"
    folder.mkdir()
    Image.fromarray(volume(3, (32, 32)).astype("uint8")).save(folder / "gen_a.png")
    bad = folder / "gen_b.png"
    Image.fromarray(volume(4, (32, 32)).astype("uint8")).save(bad)
    bad.write_bytes(bad.read_bytes()[:-12])
    before = tree_snapshot(nnraw, folder)
    proc = add(nnraw, 502, folder)
    assert_user_error(proc, f"{bad}: corrupt or truncated image")
    assert_unchanged(before, nnraw, folder)


# ----------------------------------------------------------------------------------------------- 2. output = input


@pytest.mark.parametrize("where", ["raw", "parent", "inside", "symlink"])
def test_convert_refuses_an_output_that_is_contains_or_lies_inside_the_raw_input(raw, nnraw, tmp_path, where):
    make_flare22(raw, n_labeled=2, n_unlabeled=0, n_tuning=0)
    (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    output, relation = {"raw": (raw, "is the raw input folder"), "parent": (tmp_path, "contains the raw input"),
                        "inside": (raw / "Training", "lies inside the raw input"),
                        "symlink": (tmp_path / "link", "is the raw input folder")}[where]
    before = tree_snapshot(tmp_path)
    proc = convert(nnraw, "flare22", raw, "-o", output, "--overwrite")
    assert_user_error(proc, f"output folder {output} {relation}")
    assert_unchanged(before, tmp_path)


def test_overwrite_refuses_a_folder_nnssl_did_not_write(raw, nnraw, tmp_path):
    make_flare22(raw, n_labeled=2, n_unlabeled=0, n_tuning=0)
    mine = tmp_path / "my_results"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "notes.txt").write_text("precious")
    (mine / "dataset.json").write_text("{}")  # one marker is not enough
    before = tree_snapshot(tmp_path)
    proc = convert(nnraw, "flare22", raw, "-o", mine, "--overwrite")
    assert_user_error(proc, f"{mine} exists and is not a dataset written by nnssl (no ssl_split.json)")
    assert_unchanged(before, tmp_path)
    # a dataset nnssl wrote is still replaced
    assert convert(nnraw, "flare22", raw, "-d", 501).returncode == 0
    again = convert(nnraw, "flare22", raw, "-d", 501, "--labeled-count", 1, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert len(read_json(nnraw / DATASET / "ssl_split.json")["labeled"]) == 1


# ----------------------------------------------------------------------------------------------- 3. path traversal


@pytest.mark.parametrize("prefix", ["../../../../outside_", "a/b_", ".hidden_", "-x"])
def test_add_unlabeled_refuses_an_unsafe_prefix(flare_dataset, nnraw, tmp_path, prefix):
    folder = tmp_path / "extra"
    write_image(folder / "scan.nii.gz", volume(5))
    before = tree_snapshot(tmp_path)
    proc = add(nnraw, 501, folder, f"--prefix={prefix}")
    assert_user_error(proc, f"--prefix {prefix!r}")
    assert_unchanged(before, tmp_path)
    assert not any(".." in i for i in read_json(flare_dataset / "ssl_split.json")["unlabeled"])


def test_add_unlabeled_names_a_hidden_file_and_ignores_os_junk_with_a_note(flare_dataset, nnraw, tmp_path):
    folder = tmp_path / "extra"
    write_image(folder / "scan.nii.gz", volume(5))
    hidden = write_image(folder / ".hidden_0000.nii.gz", volume(6))
    before = tree_snapshot(tmp_path)
    proc = add(nnraw, 501, folder)
    assert_user_error(proc, f"{hidden}: hidden file")
    assert_unchanged(before, tmp_path)

    hidden.unlink()
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    ok = add(nnraw, 501, folder)
    assert ok.returncode == 0, ok.stderr
    assert f"ignored: {folder / '.DS_Store'}" in ok.stdout
    assert "scan" in read_json(flare_dataset / "ssl_split.json")["unlabeled"]


# ---------------------------------------------------------------------------------------------- 7. read-only nnUNet_raw


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_convert_with_nnunet_raw_that_cannot_be_written(raw, tmp_path, where):
    """Root ignores permission bits, so an unwritable $nnUNet_raw is made with a regular file in the way."""
    make_flare22(raw, n_labeled=2, n_unlabeled=0, n_tuning=0)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    nnraw = blocker if where == "file" else blocker / "nnUNet_raw"
    before = tree_snapshot(tmp_path)
    proc = convert(nnraw, "flare22", raw, "-d", 501)
    assert_user_error(proc, "nnssl_convert flare22: error:", str(blocker), "not a folder")
    assert_unchanged(before, tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders; the 'file in the way' test covers this case")
def test_convert_with_a_read_only_nnunet_raw(raw, nnraw, tmp_path):
    make_flare22(raw, n_labeled=2, n_unlabeled=0, n_tuning=0)
    nnraw.mkdir()
    nnraw.chmod(0o555)
    try:
        before = tree_snapshot(tmp_path)
        proc = convert(nnraw, "flare22", raw, "-d", 501)
        assert_user_error(proc, str(nnraw), "not writable")
        assert_unchanged(before, tmp_path)
    finally:
        nnraw.chmod(0o755)


# ----------------------------------------------------------------------------------------------- 9. killed conversion


def test_next_conversion_removes_partial_folders_of_a_killed_one(raw, nnraw):
    make_flare22(raw, n_labeled=3, n_unlabeled=30, n_tuning=0)
    cmd = [script("nnssl_convert"), "flare22", str(raw), "-d", "501", "-np", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env_for(nnraw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partials: list[Path] = []
    while not partials and proc.poll() is None and time.monotonic() < deadline:
        partials = list(nnraw.glob(f".{DATASET}.partial.*")) if nnraw.is_dir() else []
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not partials:
        pytest.skip("the conversion finished before it could be killed")
    legacy = nnraw / f".{DATASET}.partial.k2j4_x9a"  # the name before partial folders carried the pid
    legacy.mkdir()
    unrelated = [nnraw / ".my_hidden_folder", nnraw / ".Dataset502_Other.partial.123.abcd", nnraw / f".{DATASET}.old"]
    for folder in unrelated:
        folder.mkdir()
        (folder / "keep.txt").write_text("keep")
    assert all(p.is_dir() for p in partials)

    again = convert(nnraw, "flare22", raw, "-d", 501, "-np", 1)
    assert again.returncode == 0, again.stderr
    assert not list(nnraw.glob(f".{DATASET}.partial.*"))
    assert all((folder / "keep.txt").is_file() for folder in unrelated)
    assert (nnraw / DATASET / "ssl_split.json").is_file()


# ----------------------------------------------------------------------------------------------- 11. smaller ones


def test_pancreas_image_without_label_names_the_missing_label_and_its_folder(raw, nnraw):
    cases = make_pancreas(raw, ids=(1, 2, 3), dicom=False)
    label_dir = cases["pancreas_0002"][1].parent
    cases["pancreas_0002"][1].unlink()
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "pancreas", raw, "-d", 501)
    assert_user_error(proc, f"image without label: {cases['pancreas_0002'][0]} (no label0002.nii.gz in {label_dir})")
    assert_unchanged(before, raw, nnraw)


def test_negative_seed_blames_seed(raw, nnraw):
    make_flare22(raw, n_labeled=3, n_unlabeled=0, n_tuning=0)
    before = tree_snapshot(raw, nnraw)
    proc = convert(nnraw, "flare22", raw, "-d", 501, "--labeled-count", 2, "--seed", -1)
    line = assert_user_error(proc, "--seed must be in 0..4294967295, got -1")
    assert "--labeled-count" not in line
    assert_unchanged(before, raw, nnraw)


def test_add_unlabeled_names_a_channel_suffix_the_dataset_does_not_have(flare_dataset, nnraw, tmp_path):
    folder = tmp_path / "extra"
    bad = write_image(folder / "X_0001.nii.gz", volume(5))
    before = tree_snapshot(tmp_path)
    proc = add(nnraw, 501, folder)
    assert_user_error(proc, f"{bad}: the name ends in '_0001', nnU-Net's suffix for channel 1, but the dataset has 1")
    assert_unchanged(before, tmp_path)


def test_add_unlabeled_reports_channel_suffix_mapping_and_refuses_collisions(flare_dataset, nnraw, tmp_path):
    folder = tmp_path / "extra"
    write_image(folder / "syn_0000.nii.gz", volume(5))
    plain = write_image(folder / "syn.nii.gz", volume(6))
    before = tree_snapshot(tmp_path)
    proc = add(nnraw, 501, folder)
    assert_user_error(proc, str(plain), str(folder / "syn_0000.nii.gz"), "both give case 'syn' channel 0")
    assert_unchanged(before, tmp_path)

    plain.unlink()
    ok = add(nnraw, 501, folder)
    assert ok.returncode == 0, ok.stderr
    assert "syn_0000.nii.gz -> case syn (channel 0000)" in ok.stdout
    assert "syn" in read_json(flare_dataset / "ssl_split.json")["unlabeled"]
