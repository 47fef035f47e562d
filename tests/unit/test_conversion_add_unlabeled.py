"""``nnssl_add_unlabeled``: extra unlabeled images (e.g. generated BUSI images) added with checks, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conversion_fakes import assert_consistent_dataset, make_busi, make_flare22, read_json, run_cli, volume, write_image
from PIL import Image

from dataset_conversion.busi import convert_busi
from dataset_conversion.flare22 import convert_flare22
from dataset_conversion.options import ConversionOptions, SplitOptions


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generated_pngs_are_added_as_grey_unlabeled_cases(tmp_path):
    nnraw = tmp_path / "nnUNet_raw"
    make_busi(tmp_path / "raw", {"benign": 2, "malignant": 2})
    dataset = nnraw / "Dataset510_BUSI"
    convert_busi(tmp_path / "raw", dataset, ConversionOptions(SplitOptions(labeled_count=2, test_fraction=0),
                                                              progress=False))
    before = read_json(dataset / "ssl_split.json")
    gen = tmp_path / "generated"
    gen.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        grey = rng.integers(0, 256, size=(32, 32)).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(gen / f"sample {i}.png")
    result = run_cli("nnssl_add_unlabeled", [510, gen, "--prefix", "gen_"], nnraw)
    assert result.returncode == 0, result.stderr
    split = assert_consistent_dataset(dataset)
    assert split["unlabeled"] == before["unlabeled"] + ["gen_sample_0", "gen_sample_1", "gen_sample_2"]
    assert split["labeled"] == before["labeled"] and split["labeled_fraction"] == before["labeled_fraction"]
    assert split["added_unlabeled"] == {str(gen): 3}
    added = np.asarray(Image.open(dataset / "imagesUnlabeled" / "gen_sample_1_0000.png"))
    assert added.ndim == 2 and added.shape == (32, 32)
    assert not (dataset / "labelsUnlabeled" / "gen_sample_1.png").exists()
    assert not [p for p in dataset.iterdir() if p.name.startswith(".")]  # staging folder removed

    state = snapshot(dataset)
    clash = run_cli("nnssl_add_unlabeled", [510, gen, "--prefix", "gen_"], nnraw)
    assert clash.returncode == 1 and "sample 0.png: case id 'gen_sample_0' already exists" in clash.stderr
    (gen / "notes.jpg").write_bytes(b"x")
    ending = run_cli("nnssl_add_unlabeled", [510, gen, "--prefix", "new_"], nnraw)
    assert ending.returncode == 1 and "notes.jpg: file ending does not match the dataset's '.png'" in ending.stderr
    (gen / "notes.jpg").unlink()
    (gen / "broken.png").write_bytes(b"not a png")
    broken = run_cli("nnssl_add_unlabeled", [510, gen, "--prefix", "new_"], nnraw)
    assert broken.returncode == 1 and "broken.png: unreadable or corrupt PNG" in broken.stderr
    assert snapshot(dataset) == state  # failed additions changed nothing


def test_volumes_are_checked_for_dimension_and_spacing_units(tmp_path):
    from dataset_conversion.add_unlabeled import add_unlabeled
    from dataset_conversion.errors import ConversionError

    make_flare22(tmp_path / "raw", n_labeled=2, n_unlabeled=1, n_tuning=0)
    dataset = tmp_path / "Dataset511_FLARE22"
    convert_flare22(tmp_path / "raw", dataset, ConversionOptions(progress=False))
    extra = tmp_path / "extra"
    write_image(extra / "scan_a.nii.gz", volume(7))
    assert add_unlabeled(dataset, extra, progress=False) == ["scan_a"]
    assert "scan_a" in assert_consistent_dataset(dataset)["unlabeled"]
    state = snapshot(dataset)

    metres = tmp_path / "metres"
    write_image(metres / "scan_b.nii.gz", volume(8), spacing=(0.0008, 0.00075, 0.0025))
    four_d = tmp_path / "four_d"
    four_d.mkdir()
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(volume(9))] * 2), str(four_d / "scan_c.nii.gz"))
    for folder, message in ((metres, "wrong units"), (four_d, "is 4D"), (extra, "already exists")):
        try:
            add_unlabeled(dataset, folder, progress=False)
        except ConversionError as e:
            assert message in str(e) and str(folder) in str(e)
        else:
            raise AssertionError(f"{folder} was accepted")
    assert snapshot(dataset) == state
