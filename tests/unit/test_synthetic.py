import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

from nnssl.split import SplitError, load_and_validate, load_split, validate_split_against_raw
from nnssl.synthetic import main, make_synthetic_dataset

SMALL = {"n_labeled": 3, "n_unlabeled": 4, "n_test": 2}


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing()


def _all_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every image/label array of a dataset folder, keyed by relative path."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.name.endswith(".nii.gz"):
            out[str(f.relative_to(folder))] = _read_nifti(f)[0]
        elif f.suffix == ".png":
            out[str(f.relative_to(folder))] = NaturalImage2DIO().read_images([str(f)])[0]
    return out


@pytest.fixture(scope="module")
def ds3d(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw3d"), 501, kind="3d", seed=3, **SMALL)


@pytest.fixture(scope="module")
def ds2d(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw2d"), 502, kind="2d", n_labeled=6, n_unlabeled=12,
                                  n_test=4, seed=1)


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_same_seed_same_arrays_different_seed_different(tmp_path, kind):
    a = make_synthetic_dataset(tmp_path / "a", 11, kind=kind, seed=5, **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", 11, kind=kind, seed=5, **SMALL)
    c = make_synthetic_dataset(tmp_path / "c", 11, kind=kind, seed=6, **SMALL)
    arr_a, arr_b, arr_c = _all_arrays(a), _all_arrays(b), _all_arrays(c)
    assert len(arr_a) == 2 * sum(SMALL.values())
    assert arr_a.keys() == arr_b.keys()
    for key in arr_a:
        assert arr_a[key].tobytes() == arr_b[key].tobytes(), key
    assert (a / "ssl_split.json").read_text(encoding="utf-8") == (b / "ssl_split.json").read_text(encoding="utf-8")
    images_a = {k: v for k, v in arr_a.items() if k.startswith("images")}
    images_c = {k: v for k, v in arr_c.items() if k.startswith("images")}
    assert not any(k in images_c and images_a[k].tobytes() == images_c[k].tobytes() for k in images_a)


def test_3d_split_matches_contract(ds3d):
    split = load_and_validate(ds3d, strict=True)
    assert (len(split.labeled), len(split.unlabeled), len(split.test)) == (3, 4, 2)
    assert split.origin == "synthetic" and split.seed == 3
    assert split.labeled_fraction == pytest.approx(3 / 7)
    all_ids = split.labeled + split.unlabeled + split.test
    assert sorted(all_ids) == [f"syn_{i:04d}" for i in range(9)]
    dj = json.loads((ds3d / "dataset.json").read_text(encoding="utf-8"))
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz" and dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "adrenal": 4}
    labels_tr = {p.name[: -len(".nii.gz")] for p in (ds3d / "labelsTr").iterdir()}
    labels_unl = {p.name[: -len(".nii.gz")] for p in (ds3d / "labelsUnlabeled").iterdir()}
    labels_ts = {p.name[: -len(".nii.gz")] for p in (ds3d / "labelsTs").iterdir()}
    assert labels_tr == set(split.labeled)  # unlabeled ground truth never reaches labelsTr
    assert labels_unl == set(split.unlabeled)
    assert labels_ts == set(split.test)
    assert not any(p.name.startswith(".") for p in ds3d.parent.iterdir())  # no leftover temp folder


def test_validation_notices_a_moved_unlabeled_label(ds3d, tmp_path):
    broken = tmp_path / ds3d.name
    shutil.copytree(ds3d, broken)
    split = load_split(broken / "ssl_split.json")
    case = split.unlabeled[0]
    shutil.copy(broken / "imagesUnlabeled" / f"{case}_0000.nii.gz", broken / "imagesTr" / f"{case}_0000.nii.gz")
    with pytest.raises(SplitError, match=case):
        validate_split_against_raw(split, broken)


def test_3d_values_dtype_and_geometry(ds3d):
    split = load_split(ds3d / "ssl_split.json")
    for case in split.labeled + split.test:
        folder = "Tr" if case in split.labeled else "Ts"
        image, img_spacing = _read_nifti(ds3d / f"images{folder}" / f"{case}_0000.nii.gz")
        label, lab_spacing = _read_nifti(ds3d / f"labels{folder}" / f"{case}.nii.gz")
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape == (32, 48, 48)
        assert img_spacing == lab_spacing
        sx, sy, sz = img_spacing  # SimpleITK order; z is the coarse axis
        assert 2.8 < sz < 3.2 and 1.4 < sy < 1.6 and 1.4 < sx < 1.6
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        # CT-like: air outside the body, organs in soft-tissue HU range
        assert image[0, 0, 0] < -900 and image[:, 0, :].mean() < -900
        liver_hu = np.median(image[label == 1])
        assert 20 < liver_hu < 150
        assert np.median(image[label == 0]) < liver_hu  # background is mostly air and fat
    spacings = {_read_nifti(ds3d / "imagesTr" / f"{c}_0000.nii.gz")[1] for c in split.labeled}
    assert len(spacings) == len(split.labeled)  # per-case spacing jitter


def _class_voxels(dataset: Path) -> np.ndarray:
    counts = np.zeros(5)
    for f in sorted((dataset / "labelsTr").iterdir()):
        counts += np.bincount(_read_nifti(f)[0].ravel(), minlength=5)
    return counts


def test_3d_imbalance_switch(ds3d, tmp_path):
    imbalanced = _class_voxels(ds3d)
    assert (imbalanced[1:] > 0).all()
    assert imbalanced[4] / imbalanced[1] < 0.03  # adrenal: a few dozen voxels against thousands of liver
    assert imbalanced[4] / len(list((ds3d / "labelsTr").iterdir())) < 150
    balanced = _class_voxels(make_synthetic_dataset(tmp_path, 503, seed=3, imbalanced=False, **SMALL))
    assert balanced[4] / balanced[3] > 0.2  # comparable to the kidneys
    assert balanced[4] > 4 * imbalanced[4]


def test_2d_readable_by_nnunet_natural_image_io(ds2d):
    split = load_and_validate(ds2d)
    dj = json.loads((ds2d / "dataset.json").read_text(encoding="utf-8"))
    assert dj["file_ending"] == ".png" and dj["labels"] == {"background": 0, "lesion": 1}
    io = NaturalImage2DIO()
    lesion_fractions = []
    for case in split.labeled + split.unlabeled + split.test:
        role = "Tr" if case in split.labeled else ("Unlabeled" if case in split.unlabeled else "Ts")
        image, props = io.read_images([str(ds2d / f"images{role}" / f"{case}_0000.png")])
        seg, _ = io.read_seg(str(ds2d / f"labels{role}" / f"{case}.png"))
        assert image.shape == seg.shape == (1, 1, 64, 64)
        assert props["spacing"] == (999, 1, 1)
        assert set(np.unique(seg)) <= {0.0, 1.0}
        assert 0 <= image.min() and image.max() <= 255 and image.std() > 10  # speckle, not a flat image
        lesion_fractions.append(seg.mean())
        if seg.any():  # hypoechoic: lesion darker than its surroundings
            assert image[seg == 1].mean() < image[seg == 0].mean() - 10
    normal = set(split.extra["normal_cases"])
    assert len(normal) == 2  # ~10% of 22
    assert {c for c, f in zip(split.labeled + split.unlabeled + split.test, lesion_fractions) if f == 0} == normal
    assert not set(split.labeled).issubset(normal)


def test_refuses_existing_folder_without_overwrite(tmp_path):
    ds = make_synthetic_dataset(tmp_path, 7, kind="2d", seed=0, **SMALL)
    marker = ds / "user_file.txt"
    marker.write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_dataset(tmp_path, 7, kind="2d", seed=1, **SMALL)
    assert marker.read_text(encoding="utf-8") == "keep me"
    make_synthetic_dataset(tmp_path, 7, kind="2d", seed=1, overwrite=True, **SMALL)
    assert not marker.exists()
    assert load_split(ds / "ssl_split.json").seed == 1


def test_refuses_second_dataset_with_same_id(tmp_path):
    make_synthetic_dataset(tmp_path, 8, kind="2d", **SMALL)
    with pytest.raises(FileExistsError, match="Dataset008_Synthetic2D"):
        make_synthetic_dataset(tmp_path, 8, kind="2d", name="Other", **SMALL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset_id": 0}, "dataset_id"),
        ({"kind": "4d"}, "kind"),
        ({"n_labeled": 0}, "n_labeled"),
        ({"n_unlabeled": -1}, "n_unlabeled"),
        ({"name": "bad name"}, "name"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    args = {"dataset_id": 9, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path, **args)
    assert not any(tmp_path.iterdir())


def test_cli_uses_nnunet_raw_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    main(["-d", "12", "--kind", "2d", "--labeled", "2", "--unlabeled", "3", "--test", "1", "--seed", "4"])
    split = load_and_validate(tmp_path / "Dataset012_Synthetic2D")
    assert (len(split.labeled), len(split.unlabeled), len(split.test), split.seed) == (2, 3, 1, 4)
    assert "Dataset012_Synthetic2D" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists"):
        main(["-d", "12", "--kind", "2d"])


def test_3d_voxel_scale_resamples_the_same_anatomy(tmp_path):
    """voxel_scale 1.5: the same cases on a 3.4x coarser grid; organ volumes in mm^3 agree with the default grid."""
    fine = make_synthetic_dataset(tmp_path / "fine", 505, seed=4, n_labeled=2, n_unlabeled=1, n_test=1)
    coarse = make_synthetic_dataset(tmp_path / "coarse", 505, seed=4, n_labeled=2, n_unlabeled=1, n_test=1,
                                    voxel_scale=1.5)
    for f in sorted((fine / "labelsTr").iterdir()):
        label_f, spacing_f = _read_nifti(f)
        label_c, spacing_c = _read_nifti(coarse / "labelsTr" / f.name)
        assert label_c.shape == (21, 32, 32) and label_f.shape == (32, 48, 48)
        assert np.allclose(np.array(spacing_c), 1.5 * np.array(spacing_f))
        volume_f = np.bincount(label_f.ravel(), minlength=5)[1:] * np.prod(spacing_f)
        volume_c = np.bincount(label_c.ravel(), minlength=5)[1:] * np.prod(spacing_c)
        assert np.all(volume_c > 0)
        assert np.allclose(volume_c[:3], volume_f[:3], rtol=0.15)  # liver, spleen, kidney; the adrenal is tiny
    assert load_split(coarse / "ssl_split.json").extra["voxel_scale"] == 1.5
    with pytest.raises(ValueError, match="voxel_scale"):
        make_synthetic_dataset(tmp_path / "bad", 506, kind="2d", voxel_scale=2.0, **SMALL)


def test_cardiac_kind_acdc_labels_scanners_and_a_validation_set(tmp_path):
    ds = make_synthetic_dataset(tmp_path, 510, kind="cardiac", n_labeled=3, n_unlabeled=9, n_test=4, n_val=3, seed=2)
    split = load_and_validate(ds)
    dataset_json = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dataset_json["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    val = split.extra["val"]
    assert len(val) == 3 and not set(val) & set(split.labeled + split.unlabeled + split.test)
    assert sorted(p.name for p in (ds / "labelsVal").iterdir()) == sorted(f"{c}.png" for c in val)
    scanners = split.extra["scanner_of_case"]
    assert set(scanners) == set(split.labeled + split.unlabeled + split.test + val)
    assert len(set(scanners.values())) > 1  # several acquisition styles in 19 cases
    for case in split.test:
        seg = NaturalImage2DIO().read_seg(str(ds / "labelsTs" / f"{case}.png"))[0][0, 0]
        image = NaturalImage2DIO().read_images([str(ds / "imagesTs" / f"{case}_0000.png")])[0][0, 0]
        counts = [(seg == c).sum() for c in range(4)]
        assert all(n > 0 for n in counts), counts  # every structure in every slice
        assert counts[2] < counts[0]  # the myocardium is a thin ring
        # bright blood pool in a darker myocardial ring, whatever the scanner
        assert image[seg == 3].mean() > image[seg == 2].mean()


def test_validation_cases_leave_the_other_roles_unchanged(tmp_path):
    plain = load_split(make_synthetic_dataset(tmp_path / "a", 511, kind="cardiac", seed=4, **SMALL) / "ssl_split.json")
    with_val = load_split(make_synthetic_dataset(tmp_path / "b", 511, kind="cardiac", seed=4, n_val=2, **SMALL)
                          / "ssl_split.json")
    assert (plain.labeled, plain.unlabeled, plain.test) == (with_val.labeled, with_val.unlabeled, with_val.test)
    with pytest.raises(ValueError, match="n_val"):
        make_synthetic_dataset(tmp_path / "c", 512, kind="cardiac", n_val=-1, **SMALL)


def test_labeled_cases_from_one_site_keep_anatomy_and_roles(tmp_path):
    mixed = make_synthetic_dataset(tmp_path / "a", 513, kind="cardiac", n_labeled=4, n_unlabeled=8, n_test=3, seed=5)
    one_site = make_synthetic_dataset(tmp_path / "b", 513, kind="cardiac", n_labeled=4, n_unlabeled=8, n_test=3,
                                      seed=5, labeled_scanner=1)
    split_m, split_o = load_split(mixed / "ssl_split.json"), load_split(one_site / "ssl_split.json")
    assert (split_m.labeled, split_m.unlabeled, split_m.test) == (split_o.labeled, split_o.unlabeled, split_o.test)
    scanners = split_o.extra["scanner_of_case"]
    assert {scanners[c] for c in split_o.labeled} == {1} and split_o.extra["labeled_scanner"] == 1
    assert len({scanners[c] for c in split_o.unlabeled + split_o.test}) > 1
    for case in split_o.labeled:  # same anatomy (label), only the acquisition style is forced
        assert (mixed / "labelsTr" / f"{case}.png").read_bytes() == (one_site / "labelsTr" / f"{case}.png").read_bytes()
    for case in split_o.unlabeled:  # the other roles are untouched
        assert ((mixed / "imagesUnlabeled" / f"{case}_0000.png").read_bytes()
                == (one_site / "imagesUnlabeled" / f"{case}_0000.png").read_bytes())
    with pytest.raises(ValueError, match="labeled_scanner"):
        make_synthetic_dataset(tmp_path / "c", 514, kind="2d", labeled_scanner=0, **SMALL)
    with pytest.raises(ValueError, match="scanner"):
        make_synthetic_dataset(tmp_path / "d", 515, kind="cardiac", labeled_scanner=7, **SMALL)


def test_cardiac3d_kind_coherent_stacks_one_site_labels(tmp_path):
    import SimpleITK as sitk

    from nnssl.synthetic_cardiac3d import N_SLICES

    ds = make_synthetic_dataset(tmp_path, 516, kind="cardiac3d", n_labeled=2, n_unlabeled=4, n_test=2, n_val=1,
                                seed=3, labeled_scanner=0)
    split = load_and_validate(ds)
    dataset_json = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dataset_json["file_ending"] == ".nii.gz" and "overwrite_image_reader_writer" not in dataset_json
    assert {split.extra["scanner_of_case"][c] for c in split.labeled} == {0}
    for case in split.test:
        seg_img = sitk.ReadImage(str(ds / "labelsTs" / f"{case}.nii.gz"))
        seg = sitk.GetArrayFromImage(seg_img)
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTs" / f"{case}_0000.nii.gz")))
        assert seg.shape == image.shape and seg.shape[0] == N_SLICES
        assert seg_img.GetSpacing()[2] > 3 * seg_img.GetSpacing()[0]  # thick short-axis slices
        per_slice = [[(seg[k] == c).sum() for c in range(4)] for k in range(N_SLICES)]
        lv_slices = [k for k in range(N_SLICES) if per_slice[k][3]]
        rv_slices = [k for k in range(N_SLICES) if per_slice[k][1]]
        # a contiguous ventricle from the base down, whose cavity narrows towards the apex, where the RV has ended
        assert lv_slices == list(range(lv_slices[0], lv_slices[-1] + 1)) and len(lv_slices) >= N_SLICES // 2
        assert per_slice[lv_slices[0]][3] > per_slice[lv_slices[-1]][3]
        assert rv_slices and rv_slices[-1] < lv_slices[-1]
        assert per_slice[0][1:] == [0, 0, 0] or per_slice[-1][1:] == [0, 0, 0]  # slices beyond the heart
        assert image[seg == 3].mean() > image[seg == 2].mean()  # bright blood, darker myocardium


def test_cardiac3d_forced_scanner_keeps_the_anatomy():
    import numpy as np

    from nnssl.synthetic_cardiac3d import make_case

    image_a, label_a, _, spacing_a = make_case(np.random.default_rng([7, 1]), scanner=0)
    image_b, label_b, scanner_b, spacing_b = make_case(np.random.default_rng([7, 1]), scanner=1)
    assert scanner_b == 1 and np.array_equal(label_a, label_b) and spacing_a == spacing_b
    assert not np.array_equal(image_a, image_b)
    with pytest.raises(ValueError, match="scanner"):
        make_case(np.random.default_rng(0), scanner=3)
