"""Shared converter machinery (dataset_conversion's raw_files, readers, cases, writing, options, published, roles
and dataset modules): raw-file discovery, checks, role assignment, atomic parallel writing, the published-lists
folder, and the CLI's output-folder rules."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_fakes import assert_nothing_written, label_map, make_flare22, run_cli, volume, write_image, write_list

from dataset_conversion import published
from dataset_conversion.cases import Case, DatasetFormat, align_label, check_image, label_to_uint8
from dataset_conversion.dataset import convert_dataset
from dataset_conversion.errors import ConversionError
from dataset_conversion.options import ConversionOptions, SplitOptions
from dataset_conversion.published import find_splits_dir, read_published_list
from dataset_conversion.raw_files import FileRef, match_files, walk_raw_tree
from dataset_conversion.readers import PngMaskUnion, SitkFile
from dataset_conversion.roles import Catalogue, DatasetRules, assign_roles

FMT = DatasetFormat(name="Toy", channel_names={"0": "CT"}, labels={"background": 0, "a": 1, "b": 2},
                    label_remap={255: 1})


def toy_cases(tmp_path: Path, n: int, group_size: int = 1) -> dict[str, Case]:
    cases = {}
    for i in range(n):
        cid = f"g{i // group_size:02d}_{i % group_size}"
        img = write_image(tmp_path / "src" / f"{cid}_img.nii.gz", volume(i))
        lab = write_image(tmp_path / "src" / f"{cid}_lab.nii.gz", label_map(i, [1, 2]))
        cases[cid] = Case(cid, (SitkFile(FileRef(img)),), SitkFile(FileRef(lab)), cid.split("_")[0])
    return cases


def rules(group: bool = False, **kw) -> DatasetRules:
    return DatasetRules(fmt=FMT, group_of=(lambda i: i.split("_")[0]) if group else None,
                        unit="patients" if group else "cases", **kw)


# ----------------------------------------------------------------------------------------------- raw files


def test_walk_raw_tree_reads_zip_members_and_prefers_extracted_copies(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "Case_00001_0000.nii.gz").write_bytes(b"x")
    (tmp_path / ".hidden").write_text("ignored")
    with zipfile.ZipFile(tmp_path / "Unlabeled1-1000.zip", "w") as zf:
        zf.writestr("inner/Case_00001_0000.nii.gz", b"zipped")
        zf.writestr("inner/Case_00002_0000.nii.gz", b"zipped")
        zf.writestr("__MACOSX/inner/._Case_00002_0000.nii.gz", b"junk")
    refs = walk_raw_tree(tmp_path)
    assert len(refs) == 3
    zipped = [r for r in refs if r.member]
    assert zipped[0].folders == ("Unlabeled1-1000", "inner") and zipped[0].in_folder("unlabeled.*")
    found = match_files(refs, r"(Case_\d{5})_0000\.nii\.gz")
    assert found["Case_00001"].member is None and found["Case_00002"].member == "inner/Case_00002_0000.nii.gz"
    with found["Case_00002"].local_path() as p:
        assert p.read_bytes() == b"zipped"


def test_same_case_twice_and_empty_or_missing_folder_are_errors(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "img0001.nii.gz").write_bytes(b"x")
    with pytest.raises(ConversionError, match="two raw files for the same case '0001'"):
        match_files(walk_raw_tree(tmp_path), r"img(\d{4})\.nii\.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty"):
        walk_raw_tree(tmp_path / "empty")
    with pytest.raises(ConversionError, match="does not exist"):
        walk_raw_tree(tmp_path / "nope")


def test_bad_zip_is_named(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match=r"images\.zip: not a readable zip"):
        walk_raw_tree(tmp_path)


# ----------------------------------------------------------------------------------------------- checks


def test_label_values_are_remapped_and_checked():
    lab = sitk.GetImageFromArray(np.array([[0, 255], [2, 0]], dtype=np.uint8))
    assert label_to_uint8(lab, FMT, "x").tolist() == [[0, 1], [2, 0]]
    with pytest.raises(ConversionError, match=r"lab\.nii\.gz: unexpected label values \[7\]"):
        label_to_uint8(sitk.GetImageFromArray(np.array([[0, 7]], dtype=np.uint8)), FMT, "lab.nii.gz")
    with pytest.raises(ConversionError, match="non-integer"):
        label_to_uint8(sitk.GetImageFromArray(np.array([[0, 0.5]], dtype=np.float32)), FMT, "f")
    floats = sitk.GetImageFromArray(np.array([[0.0, 2.0000001]], dtype=np.float32))
    assert label_to_uint8(floats, FMT, "f").dtype == np.uint8


def test_check_image_refuses_4d_vector_and_nan():
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(volume(0))] * 2)
    with pytest.raises(ConversionError, match="src: image is 4D"):
        check_image(four_d, FMT, "src")
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), isVector=True)
    with pytest.raises(ConversionError, match="3 components"):
        check_image(rgb, FMT, "src")
    nan = np.zeros((4, 5, 6), dtype=np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(ConversionError, match="NaN"):
        check_image(sitk.GetImageFromArray(nan), FMT, "src")


def test_align_label_permutes_a_reoriented_label_exactly_and_refuses_other_mismatches():
    image = sitk.GetImageFromArray(volume(1))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((5.0, -3.0, 10.0))
    label = sitk.GetImageFromArray(label_map(1, [1, 2]))
    label.CopyInformation(image)
    stored = sitk.DICOMOrient(label, "RAI")  # same physical grid, other axis order/sign
    assert stored.GetDirection() != image.GetDirection()
    back = align_label(image, stored, "img", "lab")
    assert np.array_equal(sitk.GetArrayFromImage(back), label_map(1, [1, 2]))
    shifted = sitk.Image(label)
    shifted.SetOrigin((5.0, -3.0, 12.0))
    with pytest.raises(ConversionError, match=r"origin .* img and lab"):
        align_label(image, shifted, "img", "lab")


def test_png_masks_are_thresholded_and_or_merged(tmp_path):
    from PIL import Image

    a = np.zeros((4, 6), dtype=np.uint8)
    a[0, 0] = 255
    a[3, 5] = 100  # below the threshold: anti-aliasing noise, not lesion
    b = np.zeros((4, 6, 4), dtype=np.uint8)
    b[1, 2] = (255, 255, 255, 255)
    Image.fromarray(a).save(tmp_path / "m.png")
    Image.fromarray(b, mode="RGBA").save(tmp_path / "m_1.png")
    merged = sitk.GetArrayFromImage(PngMaskUnion((FileRef(tmp_path / "m.png"), FileRef(tmp_path / "m_1.png"))).read())
    expected = np.zeros((4, 6), dtype=np.uint8)
    expected[0, 0] = expected[1, 2] = 1
    assert np.array_equal(merged, expected)


# ----------------------------------------------------------------------------------------------- roles


def test_random_roles_are_seeded_and_the_test_set_does_not_depend_on_the_seed(tmp_path):
    catalogue = Catalogue(labeled=toy_cases(tmp_path, 10))
    a = assign_roles(catalogue, rules(), SplitOptions(labeled_count=3, seed=0, test_fraction=0.2))
    b = assign_roles(catalogue, rules(), SplitOptions(labeled_count=3, seed=0, test_fraction=0.2))
    c = assign_roles(catalogue, rules(), SplitOptions(labeled_count=3, seed=5, test_fraction=0.2))
    assert (a.labeled, a.unlabeled, a.test) == (b.labeled, b.unlabeled, b.test)
    assert len(a.labeled) == 3 and len(a.test) == 2 and len(a.unlabeled) == 5
    assert a.test == c.test and a.labeled != c.labeled
    assert set(a.labeled) | set(a.unlabeled) | set(a.test) == set(catalogue.labeled)


def test_group_roles_keep_patients_together(tmp_path):
    catalogue = Catalogue(labeled=toy_cases(tmp_path, 12, group_size=2))
    a = assign_roles(catalogue, rules(group=True), SplitOptions(labeled_count=2, test_fraction=0.34))
    group = {i: i.split("_")[0] for i in catalogue.labeled}
    roles = {group[i]: r for r in ("labeled", "unlabeled", "test") for i in getattr(a, r)}
    assert len({group[i] for i in a.labeled}) == 2 and len(a.labeled) == 4
    for r in ("labeled", "unlabeled", "test"):
        assert all(roles[group[i]] == r for i in getattr(a, r))
    with pytest.raises(ConversionError, match="cannot label 9 patients"):
        assign_roles(catalogue, rules(group=True), SplitOptions(labeled_count=9))


def test_split_file_json_and_text(tmp_path):
    catalogue = Catalogue(labeled=toy_cases(tmp_path, 6, group_size=2))
    js = tmp_path / "split.json"
    js.write_text(json.dumps({"labeled": ["g00_0", "g00_1"], "unlabeled": ["g01_0", "g01_1"], "test": ["g02_0"],
                              "val": ["g02_1"]}))
    with pytest.raises(ConversionError, match="patient 'g02' has cases in both 'test' and 'val'"):
        assign_roles(catalogue, rules(group=True), SplitOptions(split="file", split_file=js))
    a = assign_roles(catalogue, rules(), SplitOptions(split="file", split_file=js))
    assert a.val == ["g02_1"] and a.not_converted == [] and a.origin == f"file:{js}"
    txt = write_list(tmp_path / "labeled.txt", ["g01_0"], crlf=True)
    b = assign_roles(catalogue, rules(group=True), SplitOptions(split="file", split_file=txt, test_fraction=0.5))
    assert b.labeled == ["g01_0", "g01_1"]  # a listed case brings its whole patient
    assert len(b.test) == 2 and len(b.unlabeled) == 2
    missing = write_list(tmp_path / "missing.txt", ["g09_0"])
    with pytest.raises(ConversionError, match=r"g09_0"):
        assign_roles(catalogue, rules(), SplitOptions(split="file", split_file=missing))


def test_paper_split_ids_must_exist(tmp_path):
    catalogue = Catalogue(labeled=toy_cases(tmp_path, 3))

    def paper(splits_dir, options):
        return published.PaperSplit(labeled=["g00_0"], unlabeled=["g01_0", "g07_0"], test=["g02_0"], origin="paper:X")

    with pytest.raises(ConversionError, match=r"paper:X: listed cases not found .*unlabeled: 1 e\.g\. \['g07_0'\]"):
        assign_roles(catalogue, rules(paper_split=paper), SplitOptions(split="paper", splits_dir=tmp_path))
    with pytest.raises(ConversionError, match="no published split"):
        assign_roles(catalogue, rules(), SplitOptions(split="paper", splits_dir=tmp_path))


def test_unlabeled_count_keeps_a_seeded_subset(tmp_path):
    cases = toy_cases(tmp_path, 8)
    catalogue = Catalogue(labeled=dict(list(cases.items())[:2]),
                          unlabeled={k: Case(k, v.images) for k, v in list(cases.items())[2:]})
    a = assign_roles(catalogue, rules(), SplitOptions(unlabeled_count=3, seed=1))
    assert len(a.unlabeled) == 3 and set(a.unlabeled) <= set(catalogue.unlabeled)
    assert a.unlabeled == assign_roles(catalogue, rules(), SplitOptions(unlabeled_count=3, seed=1)).unlabeled


def test_option_conflicts_are_refused():
    with pytest.raises(ConversionError, match="only one of"):
        SplitOptions(labeled_count=2, labeled_fraction=0.5)
    with pytest.raises(ConversionError, match="labeled-fraction"):
        SplitOptions(labeled_fraction=1.5)
    with pytest.raises(ConversionError, match="split-file"):
        SplitOptions(split="file")


# ----------------------------------------------------------------------------------------------- writing


def test_failed_case_leaves_no_output_and_existing_output_is_kept(tmp_path):
    cases = toy_cases(tmp_path, 4)
    out = tmp_path / "out" / "Dataset900_Toy"
    split = convert_dataset(Catalogue(labeled=cases), rules(), out, ConversionOptions(progress=False))
    assert sorted(split.labeled) == sorted(cases)
    with pytest.raises(ConversionError, match="already exists"):
        convert_dataset(Catalogue(labeled=cases), rules(), out, ConversionOptions(progress=False))
    bad = cases["g02_0"].label.ref.path
    bad.write_bytes(b"garbage")
    for np_ in (1, 2):
        with pytest.raises(ConversionError, match=f"{bad}: unreadable or corrupt"):
            convert_dataset(Catalogue(labeled=cases), rules(), out,
                            ConversionOptions(overwrite=True, num_processes=np_, progress=False))
        assert sorted(p.name for p in out.parent.iterdir()) == ["Dataset900_Toy"]  # old one intact, no partials
        assert (out / "labelsTr" / "g02_0.nii.gz").is_file()


def test_find_splits_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv(published.SPLITS_DIR_ENV, str(tmp_path))
    assert find_splits_dir() == tmp_path
    assert find_splits_dir(tmp_path / ".") == tmp_path / "."
    with pytest.raises(ConversionError, match="--splits-dir .*nope: folder not found"):
        find_splits_dir(tmp_path / "nope")
    monkeypatch.setenv(published.SPLITS_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match="NNSSL_SPLITS_DIR"):
        find_splits_dir()
    monkeypatch.delenv(published.SPLITS_DIR_ENV)
    packaged = find_splits_dir()  # the lists that ship with the package
    assert packaged.parts[-3:] == ("nnssl", "data", "paper_splits") and (packaged / "PROVENANCE.md").is_file()
    assert len(read_published_list(packaged, "DHC/amos/labeled_2p.txt")) == 4
    monkeypatch.setattr(published, "PACKAGED_SPLITS", "missing_folder")
    with pytest.raises(ConversionError, match="missing from this installation"):
        find_splits_dir()


# ----------------------------------------------------------------------------------------------- CLI rules


def test_cli_refuses_existing_output_missing_raw_and_reused_id(tmp_path):
    raw, nnraw = tmp_path / "raw", tmp_path / "nnUNet_raw"
    make_flare22(raw, n_labeled=2, n_unlabeled=0, n_tuning=0)
    missing = run_cli("nnssl_convert", ["flare22", tmp_path / "missing", "-d", 7], nnraw)
    assert missing.returncode == 1 and "missing: raw data folder does not exist" in missing.stderr
    assert_nothing_written(nnraw)
    assert run_cli("nnssl_convert", ["flare22", raw, "-d", 7], nnraw).returncode == 0
    again = run_cli("nnssl_convert", ["flare22", raw, "-d", 7], nnraw)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    clash = run_cli("nnssl_convert", ["flare22", raw, "-d", 7, "--name", "Other"], nnraw)
    assert clash.returncode == 1 and "dataset id 7 is already used by" in clash.stderr
    paper = run_cli("nnssl_convert", ["flare22", raw, "-d", 8, "--split", "paper"], nnraw)
    assert paper.returncode == 1 and "renamed ids" in paper.stderr
    explicit = run_cli("nnssl_convert", ["flare22", raw, "-o", tmp_path / "elsewhere"], nnraw)
    assert explicit.returncode == 0 and (tmp_path / "elsewhere" / "ssl_split.json").is_file()
    assert sorted(p.name for p in nnraw.iterdir()) == ["Dataset007_FLARE22"]


def test_walk_raw_tree_reports_what_it_skips(tmp_path, capsys):
    """Hidden files and OS junk are not cases, but skipping them is said, never silent."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "case_0000.nii.gz").write_bytes(b"x")
    (tmp_path / "imagesTr" / ".case_0001.nii.gz").write_bytes(b"x")
    (tmp_path / "__MACOSX").mkdir()
    refs = walk_raw_tree(tmp_path)
    assert [r.name for r in refs] == ["case_0000.nii.gz"]
    out = capsys.readouterr().out
    assert "skipped 2 hidden or system" in out and ".case_0001.nii.gz" in out and "__MACOSX" in out
