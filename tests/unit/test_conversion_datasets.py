"""Every dataset converter through the real ``nnssl_convert`` console script, on synthetic look-alikes of the raw
layouts (tests/conversion_fakes.py): counts, label dicts, geometry, split roles, no leakage, one bad input each."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_fakes import (
    FLIPPED,
    assert_consistent_dataset,
    assert_nothing_written,
    convert,
    label_map,
    make_acdc,
    make_amos,
    make_busi,
    make_flare22,
    make_la,
    make_pancreas,
    make_synapse,
    read_json,
    run_cli,
    volume,
    write_image,
    write_list,
)
from PIL import Image


def only_dataset(nnraw: Path) -> Path:
    (folder,) = [p for p in nnraw.iterdir()]
    return folder


def assert_failed_cleanly(result, nnraw: Path, *fragments: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert_nothing_written(nnraw)


# ----------------------------------------------------------------------------------------------- help


def test_help_lists_datasets_and_options():
    top = run_cli("nnssl_convert", ["--help"], Path("."))
    assert top.returncode == 0
    for name in ("flare22", "amos", "acdc", "la", "busi", "synapse", "pancreas"):
        assert name in top.stdout
    sub = run_cli("nnssl_convert", ["acdc", "--help"], Path("."))
    assert sub.returncode == 0
    for option in ("--labeled-count", "--labeled-fraction", "--split", "--split-file", "--splits-dir", "--overwrite",
                   "-np", "patients"):
        assert option in sub.stdout


# ----------------------------------------------------------------------------------------------- FLARE22


def test_flare22_zipped_half_variant_folder_and_withheld_labels(raw, nnraw):
    cases = make_flare22(raw, n_labeled=4, n_unlabeled=3, n_tuning=2, zipped_unlabeled=True,
                         labeled_folder="FLARE_LabeledCase50")
    convert("flare22", raw, nnraw, "--labeled-count", 2, "--seed", 1)
    folder = nnraw / "Dataset501_FLARE22"
    split = assert_consistent_dataset(folder)
    dj = read_json(folder / "dataset.json")
    assert dj["labels"]["liver"] == 1 and dj["labels"]["left kidney"] == 13 and len(dj["labels"]) == 14
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 2
    assert len(split["labeled"]) == 2 and all(i.startswith("FLARE22_Tr_") for i in split["labeled"])
    withheld = sorted(set(cases) - set(split["labeled"]) - {c for c in cases if not c.startswith("FLARE22_Tr")})
    assert sorted(i for i in split["unlabeled"] if i.startswith("FLARE22_Tr")) == withheld
    assert sorted(i for i in split["unlabeled"] if i.startswith("Case_")) == ["Case_00001", "Case_00002", "Case_00003"]
    assert split["test"] == ["FLARETs_0001", "FLARETs_0002"]  # Tuning with labels; Testing/ not converted
    assert (folder / "labelsTs" / "FLARETs_0001.nii.gz").is_file()
    for w in withheld:
        assert (folder / "labelsUnlabeled" / f"{w}.nii.gz").is_file()
    # geometry preserved: the image is a byte copy, the label keeps the flipped direction and its values
    cid = split["labeled"][0]
    assert filecmp.cmp(cases[cid][0], folder / "imagesTr" / f"{cid}_0000.nii.gz", shallow=False)
    lab = sitk.ReadImage(str(folder / "labelsTr" / f"{cid}.nii.gz"))
    assert np.allclose(lab.GetDirection(), FLIPPED)
    assert np.array_equal(sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(sitk.ReadImage(str(cases[cid][1]))))
    # deterministic: the same seed gives the same split
    convert("flare22", raw, nnraw, "--labeled-count", 2, "--seed", 1, "--overwrite")
    assert read_json(folder / "ssl_split.json")["labeled"] == split["labeled"]


def test_flare22_image_without_label_fails_cleanly(raw, nnraw):
    make_flare22(raw, n_labeled=3, n_unlabeled=1, n_tuning=0)
    (raw / "Training" / "FLARE22_LabeledCase50" / "labels" / "FLARE22_Tr_0002.nii.gz").unlink()
    result = convert("flare22", raw, nnraw, ok=False)
    assert_failed_cleanly(result, nnraw, "image without label", "FLARE22_Tr_0002_0000.nii.gz")


# ----------------------------------------------------------------------------------------------- AMOS


def test_amos_ct_default_unlabeled_release_and_validation_as_test(raw, nnraw):
    make_amos(raw, tr_ids=(1, 4, 5, 6, 507), va_ids=(8, 13, 544), unlabeled_ids=(5000, 5001))
    convert("amos", raw, nnraw, "--labeled-fraction", 0.5)
    folder = only_dataset(nnraw)
    assert folder.name == "Dataset501_AMOS22"
    split = assert_consistent_dataset(folder)
    dj = read_json(folder / "dataset.json")
    assert dj["labels"]["aorta"] == 8 and dj["labels"]["inferior vena cava"] == 9 and "arota" not in dj["labels"]
    assert dj["channel_names"] == {"0": "CT"}
    assert len(split["labeled"]) == 2
    assert set(split["labeled"]) | {i for i in split["unlabeled"] if int(i[5:]) < 5000} == {
        "amos_0001", "amos_0004", "amos_0005", "amos_0006"}  # MRI 0507 left out
    assert {"amos_5000", "amos_5001"} <= set(split["unlabeled"])
    assert split["test"] == ["amos_0008", "amos_0013"]


def test_amos_all_modalities_and_bad_label_value(raw, nnraw):
    cases = make_amos(raw, tr_ids=(1, 507), va_ids=(544,), unlabeled_ids=())
    convert("amos", raw, nnraw, "--modality", "all")
    split = assert_consistent_dataset(nnraw / "Dataset501_AMOS22")
    assert split["labeled"] == ["amos_0001", "amos_0507"] and split["test"] == ["amos_0544"]
    assert read_json(nnraw / "Dataset501_AMOS22" / "dataset.json")["channel_names"] == {"0": "CT_or_MRI"}
    bad = cases["amos_0001"][1]
    write_image(bad, label_map(1, [1, 16]))
    result = convert("amos", raw, tmp := nnraw.parent / "other_raw", "--modality", "all", ok=False)
    assert_failed_cleanly(result, tmp, "unexpected label values [16]", str(bad))


# ----------------------------------------------------------------------------------------------- ACDC


def test_acdc_patient_level_split_and_info_cfg_frames(raw, nnraw):
    cases = make_acdc(raw, n_patients=6, n_testing=2)
    convert("acdc", raw, nnraw, "--labeled-count", 2)
    folder = nnraw / "Dataset501_ACDC"
    split = assert_consistent_dataset(folder)
    assert read_json(folder / "dataset.json")["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert len(split["labeled"]) == 4 and split["labeled_patients"] == sorted({i[:10] for i in split["labeled"]})
    assert len(split["unlabeled"]) == 8
    assert split["test"] == ["patient007_ED", "patient007_ES", "patient008_ED", "patient008_ES"]  # testing/ with GT
    roles = {i: r for r in ("labeled", "unlabeled", "test") for i in split[r]}
    for p in range(1, 9):
        assert roles[f"patient{p:03d}_ED"] == roles[f"patient{p:03d}_ES"]
    # ES comes from Info.cfg (frame 8 + p % 5), not from a fixed frame number
    case = "patient002_ES"
    sub = {"labeled": "imagesTr", "unlabeled": "imagesUnlabeled", "test": "imagesTs"}[roles[case]]
    assert cases[case][0].name == "patient002_frame10.nii.gz"
    assert filecmp.cmp(cases[case][0], folder / sub / f"{case}_0000.nii.gz", shallow=False)
    assert sitk.ReadImage(str(folder / sub / f"{case}_0000.nii.gz")).GetSpacing() == (1.5, 1.5, 10.0)


def test_acdc_paper_split_from_published_style_lists(raw, nnraw, tmp_path):
    make_acdc(raw, n_patients=6, n_testing=2)
    lists = tmp_path / "splits" / "SSL4MIS" / "acdc"
    frames = lambda *ps: [f"patient{p:03d}_frame0{f}" for p in ps for f in (1, 2)]  # noqa: E731
    write_list(lists / "train.list", frames(3, 1, 5), crlf=True, final_newline=False)
    write_list(lists / "val.list", frames(2))
    write_list(lists / "test.list", frames(4, 6))
    convert("acdc", raw, nnraw, "--split", "paper", "--splits-dir", tmp_path / "splits", "--labeled-count", 1)
    folder = nnraw / "Dataset501_ACDC"
    split = assert_consistent_dataset(folder)
    assert split["labeled"] == ["patient003_ED", "patient003_ES"]  # the first patient of train.list, file order
    assert split["unlabeled"] == ["patient001_ED", "patient001_ES", "patient005_ED", "patient005_ES"]
    assert split["test"] == ["patient004_ED", "patient004_ES", "patient006_ED", "patient006_ES"]
    assert split["val"] == ["patient002_ED", "patient002_ES"] and split["origin"] == "paper:SSL4MIS/acdc"
    assert (folder / "labelsVal" / "patient002_ES.nii.gz").is_file()
    assert set(split["not_converted"]) == {f"patient00{p}_{ph}" for p in (7, 8) for ph in ("ED", "ES")}


def test_acdc_shape_mismatch_and_too_many_labeled(raw, nnraw):
    cases = make_acdc(raw, n_patients=3)
    too_many = convert("acdc", raw, nnraw, "--labeled-count", 5, ok=False)
    assert_failed_cleanly(too_many, nnraw, "cannot label 5 patients")
    image, label = cases["patient002_ED"]
    write_image(label, label_map(2, [1])[:, :, :12], spacing=(1.5, 1.5, 10.0))
    result = convert("acdc", raw, nnraw, ok=False)
    assert_failed_cleanly(result, nnraw, "do not share one voxel grid", str(image), str(label))


# ----------------------------------------------------------------------------------------------- LA


def test_la_nrrd_label_255_to_1_with_held_out_test(raw, nnraw):
    cases = make_la(raw, folder="Training Set")
    convert("la", raw, nnraw, "--labeled-count", 2)
    folder = nnraw / "Dataset501_LA"
    split = assert_consistent_dataset(folder)
    assert (len(split["labeled"]), len(split["unlabeled"]), len(split["test"])) == (2, 4, 1)  # 20 % held out
    cid = split["labeled"][0]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{cid}.nii.gz")))
    raw_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[cid][1])))
    assert set(np.unique(raw_lab)) == {0, 255} and np.array_equal(lab, (raw_lab == 255).astype(np.uint8))
    assert np.allclose(sitk.ReadImage(str(folder / "imagesTr" / f"{cid}_0000.nii.gz")).GetSpacing(), 0.625)


def test_la_h5_layout_with_uamt_paper_split(raw, nnraw, tmp_path):
    cases = make_la(raw, folder="2018LA_Seg_Training Set", h5=True)
    ids = list(cases)
    write_list(tmp_path / "splits" / "UA-MT" / "la" / "train.list", ids[:5])
    write_list(tmp_path / "splits" / "UA-MT" / "la" / "test.list", ids[5:])
    convert("la", raw, nnraw, "--split", "paper", "--splits-dir", tmp_path / "splits", "--labeled-count", 2)
    folder = nnraw / "Dataset501_LA"
    split = assert_consistent_dataset(folder)
    assert split["labeled"] == ids[:2] and split["unlabeled"] == ids[2:5] and split["test"] == ids[5:]
    img = sitk.ReadImage(str(folder / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
    assert img.GetSize() == (16, 16, 8) and img.GetSpacing() == (0.625, 0.625, 0.625)
    expected = volume(0).astype(np.float32) / 100.0  # the h5 (x, y, z) array, back in (z, y, x)
    assert np.allclose(sitk.GetArrayFromImage(img), expected)


def test_la_corrupt_file_fails_cleanly(raw, nnraw):
    cases = make_la(raw)
    bad = cases[list(cases)[3]][0]
    bad.write_bytes(bad.read_bytes()[:200])
    result = convert("la", raw, nnraw, ok=False)
    assert_failed_cleanly(result, nnraw, "unreadable or corrupt", str(bad))


# ----------------------------------------------------------------------------------------------- BUSI


def test_busi_kaggle_rgb_merged_masks_and_normal_cases(raw, nnraw):
    make_busi(raw, {"benign": 3, "malignant": 2, "normal": 2})
    convert("busi", raw, nnraw, "--test-fraction", 0)
    folder = nnraw / "Dataset501_BUSI"
    split = assert_consistent_dataset(folder)
    dj = read_json(folder / "dataset.json")
    assert dj["file_ending"] == ".png" and dj["labels"] == {"background": 0, "lesion": 1} and dj["numTraining"] == 7
    assert "normal_1" in split["labeled"] and "benign_2" in split["labeled"]
    img = np.asarray(Image.open(folder / "imagesTr" / "benign_1_0000.png"))
    assert img.ndim == 2 and img.dtype == np.uint8  # RGB converted to one grey channel
    raw_rgb = np.asarray(Image.open(raw / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"))
    assert np.array_equal(img, raw_rgb[..., 0])  # grey content unchanged
    merged = np.asarray(Image.open(folder / "labelsTr" / "benign_2.png"))
    assert set(np.unique(merged)) == {0, 1} and merged.sum() == 4 * 6 + 4 * 10  # _mask OR _mask_1
    assert np.asarray(Image.open(folder / "labelsTr" / "normal_1.png")).sum() == 0


def test_busi_mgcc_layout_with_published_fold(raw, nnraw, tmp_path):
    make_busi(raw, {"benign": 3, "malignant": 2, "normal": 1}, layout="mgcc")
    lists = tmp_path / "splits" / "MGCC" / "busi"
    write_list(lists / "busi_train1.txt", ["malignant (2)", "benign (3)", "benign (1)", "malignant (1)"], crlf=True)
    write_list(lists / "busi_val1.txt", ["benign (2)"], crlf=True, final_newline=False)
    convert("busi", raw, nnraw, "--split", "paper", "--paper", "mgcc1", "--splits-dir", tmp_path / "splits")
    split = assert_consistent_dataset(nnraw / "Dataset501_BUSI")
    assert split["labeled"] == ["malignant_2", "benign_3"]  # first half of the train list, in file order
    assert split["unlabeled"] == ["benign_1", "malignant_1"] and split["test"] == ["benign_2"]
    assert split["not_converted"] == ["normal_1"]


def test_busi_mask_size_mismatch_fails_cleanly(raw, nnraw):
    make_busi(raw, {"benign": 2, "normal": 1})
    mask = raw / "Dataset_BUSI_with_GT" / "normal" / "normal (1)_mask.png"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(mask)
    result = convert("busi", raw, nnraw, ok=False)
    assert_failed_cleanly(result, nnraw, "do not share one voxel grid", "normal (1)_mask.png")


# ----------------------------------------------------------------------------------------------- Synapse


@pytest.mark.parametrize("layout", ["rawdata", "dhc"])
def test_synapse_layouts(raw, nnraw, layout):
    make_synapse(raw, ids=(1, 2, 3, 4, 5, 21), layout=layout)
    convert("synapse", raw, nnraw, "--labeled-count", 2)
    folder = nnraw / "Dataset501_Synapse"
    split = assert_consistent_dataset(folder)
    dj = read_json(folder / "dataset.json")
    assert dj["labels"]["portal vein and splenic vein"] == 10 and dj["labels"]["left adrenal gland"] == 13
    assert (len(split["labeled"]), len(split["unlabeled"]), len(split["test"])) == (2, 3, 1)
    assert "synapse_0061" not in split["unlabeled"] + split["test"]  # Testing/img has no labels: not converted


def test_synapse_genericssl_paper_split_and_4d_image(raw, nnraw, tmp_path):
    cases = make_synapse(raw, ids=(1, 2, 3, 4, 5, 21))
    lists = tmp_path / "splits" / "GenericSSL" / "synapse"
    write_list(lists / "train.txt", ["0001", "0002", "0003", "0004"])
    write_list(lists / "labeled_0.2.txt", ["0003"])
    write_list(lists / "unlabeled_0.2.txt", ["0001", "0002", "0004"])
    write_list(lists / "eval.txt", ["0021"])
    write_list(lists / "test.txt", ["0005"])
    convert("synapse", raw, nnraw, "--split", "paper", "--splits-dir", tmp_path / "splits")
    split = assert_consistent_dataset(nnraw / "Dataset501_Synapse")
    assert split["labeled"] == ["synapse_0003"] and split["val"] == ["synapse_0021"]
    assert split["test"] == ["synapse_0005"] and split["labeled_fraction"] == 0.2
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(volume(2))] * 2)
    sitk.WriteImage(four_d, str(cases["synapse_0002"][0]))
    result = convert("synapse", raw, other := tmp_path / "other", ok=False)
    assert_failed_cleanly(result, other, "is 4D", "img0002.nii.gz")


# ----------------------------------------------------------------------------------------------- Pancreas-CT


def test_pancreas_dicom_with_reoriented_tcia_labels(raw, nnraw):
    cases = make_pancreas(raw, ids=(1, 2, 3, 4, 5), dicom=True, label_orientation="LPI")
    convert("pancreas", raw, nnraw, "--labeled-count", 2, "-np", 2)
    folder = nnraw / "Dataset501_PancreasCT"
    split = assert_consistent_dataset(folder)
    assert (len(split["labeled"]), len(split["unlabeled"]), len(split["test"])) == (2, 2, 1)
    cid = split["labeled"][0]
    img = sitk.ReadImage(str(folder / "imagesTr" / f"{cid}_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (0.7, 0.7, 1.5)) and np.allclose(img.GetOrigin(), (-100, -120, 30))
    assert np.array_equal(sitk.GetArrayFromImage(img), volume(int(cid[-4:])))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{cid}.nii.gz")))
    assert np.array_equal(lab, label_map(int(cid[-4:]), [1]))  # permuted back exactly, not resampled
    assert sitk.ReadImage(str(cases[cid][1])).GetDirection()[8] == -1  # the raw label really was flipped


def test_pancreas_nifti_paper_split_and_spacing_mismatch(raw, nnraw, tmp_path):
    cases = make_pancreas(raw, ids=(1, 2, 3, 4), dicom=False, label_orientation="LPS")
    lists = tmp_path / "splits" / "SDCL" / "pancreas"
    write_list(lists / "train_lab.txt", ["data0002"])
    write_list(lists / "train_unlab.txt", ["data0001", "data0003"])
    write_list(lists / "test.txt", ["data0004"], final_newline=False)
    convert("pancreas", raw, nnraw, "--split", "paper", "--splits-dir", tmp_path / "splits")
    split = assert_consistent_dataset(nnraw / "Dataset501_PancreasCT")
    assert split["labeled"] == ["pancreas_0002"] and split["test"] == ["pancreas_0004"]
    label = cases["pancreas_0003"][1]
    write_image(label, label_map(3, [1]), spacing=(0.8, 0.75, 3.0))
    result = convert("pancreas", raw, other := tmp_path / "other", ok=False)
    assert_failed_cleanly(result, other, "spacing", str(label))
