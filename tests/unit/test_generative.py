"""nnssl.generative: presets, the training images and their way back to raw intensities, resumable training,
deterministic sampling into raw files, the sanity report (tiny networks, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnssl.errors import InputError
from nnssl.generative import data, report, sample, settings, train
from nnssl.generative.cli import case_id, next_index
from nnssl.split import SSLSplit


def test_presets_and_overrides():
    tiny = settings.get_settings("tiny", ae_epochs=3)
    assert tiny.ae_epochs == 3 and tiny.ldm_epochs == settings.PRESETS["tiny"].ldm_epochs
    assert settings.PRESETS["monai2d"].downsampling() == 4 * 4
    with pytest.raises(InputError, match="unknown"):
        settings.get_settings("huge")
    with pytest.raises(InputError, match="at least 1"):
        settings.get_settings("tiny", ldm_epochs=0)


def test_fit_size_crops_and_pads_with_the_minimum():
    image = np.arange(2 * 5 * 9, dtype=np.float32).reshape(2, 5, 9)
    out = data.fit_size(image, (8, 4))
    assert out.shape == (2, 8, 4)
    assert out[0, 0, 0] == image[0].min() and out[1, 0, 0] == image[1].min()  # padding rows
    assert np.array_equal(out[:, 1:6], image[:, :, 2:6])  # centred crop of the columns
    assert data.fit_size(image, (3, 3), np.random.default_rng(0)).shape == (2, 3, 3)
    assert data.work_size((64, 50), 16) == (64, 64)


def test_intensity_map_inverts_an_affine_normalisation_and_stays_in_range():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 5000).astype(np.float64)
    norm = (raw - raw.mean()) / raw.std()
    imap = data.IntensityMap.fit([norm], [raw])
    assert imap.integer
    back = imap.to_raw(norm[None, :100])
    assert np.abs(back - raw[:100]).max() <= 1
    assert imap.to_raw(np.array([[-100.0, 100.0]])).tolist() == [[raw.min(), raw.max()]]


def _raw_dataset(root: Path, n_labeled: int, n_unlabeled: int) -> tuple[Path, SSLSplit, dict]:
    dj = {"channel_names": {"0": "US"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".png",
          "numTraining": n_labeled}
    lab = [f"l{i}" for i in range(n_labeled)]
    unl = [f"u{i}" for i in range(n_unlabeled)] + ["gen_0"]
    for folder, ids in (("imagesTr", lab), ("imagesUnlabeled", unl), ("imagesTs", ["t0"])):
        (root / folder).mkdir(parents=True)
        for i in ids:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / folder / f"{i}_0000.png")
    split = SSLSplit(labeled=lab, unlabeled=unl, test=["t0"],
                     extra={"provenance": {"gen_0": {"source": "generated", "model": "m", "seed": 0}}})
    return root, split, dj


def test_training_cases_are_the_real_training_images_only(tmp_path):
    raw, split, dj = _raw_dataset(tmp_path, 3, 5)
    files = data.training_case_files(raw, split, dj)
    assert sorted(files) == ["l0", "l1", "l2", "u0", "u1", "u2", "u3", "u4"]  # no test case, no generated one
    assert all(p.parent.name in ("imagesTr", "imagesUnlabeled") for ps in files.values() for p in ps)
    data.check_enough_images(len(files), "D")
    with pytest.raises(InputError, match=f"7 training image.*at least {data.MIN_TRAINING_IMAGES}"):
        data.check_enough_images(7, "D")


def test_only_2d_configurations_of_2d_datasets():
    def plans(patch, shape):
        return {"configurations": {"c": {"patch_size": patch}}, "original_median_shape_after_transp": shape}

    with pytest.raises(InputError, match="not in the plans"):
        data.check_configuration(plans([64, 64], [1, 64, 64]), "3d_fullres", "D")
    with pytest.raises(InputError, match="3D configuration"):
        data.check_configuration(plans([32, 64, 64], [40, 64, 64]), "c", "D")
    with pytest.raises(InputError, match="holds 3D images"):
        data.check_configuration(plans([64, 64], [40, 64, 64]), "c", "D")
    data.check_configuration(plans([64, 64], [1, 64, 64]), "c", "D")


def test_a_killed_stage_resumes_to_the_same_weights(tmp_path):
    def stage(folder: Path, fail_at: int | None):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        opt = torch.optim.Adam(net.parameters(), lr=0.1)

        def epoch_fn(epoch):
            if epoch == fail_at:
                raise KeyboardInterrupt  # the kill
            gen = torch.Generator().manual_seed(epoch)
            loss = net(torch.randn(4, 3, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        history = train.run_stage("s", folder, {"net": net, "opt": opt, "extra": {}}, 4, 1, epoch_fn, False,
                                  log=lambda _: None)
        return net, history

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        stage(tmp_path / "a", fail_at=2)
    assert torch.load(tmp_path / "a" / "s_latest.pt", weights_only=False)["epoch"] == 2
    resumed, history = stage(tmp_path / "a", fail_at=None)
    straight, _ = stage(tmp_path / "b", fail_at=None)
    assert len(history) == 4 and not (tmp_path / "a" / "s_latest.pt").exists()
    assert torch.equal(resumed.weight, straight.weight)
    again, _ = stage(tmp_path / "a", fail_at=0)  # finished: loaded, epoch_fn never runs
    assert torch.equal(again.weight, straight.weight)


def test_sampling_is_per_image_deterministic_and_writes_raw_pngs(tmp_path):
    s = settings.get_settings("tiny")
    s = settings.dataclasses.replace(s, sample_steps=2)
    torch.manual_seed(0)
    ae, unet = train.build_autoencoder(s, 1).eval(), train.build_unet(s).eval()
    latent = (s.ae_latent_channels, 4, 4)
    both = sample.sample_normalised(ae, unet, 1.0, s, latent, [5, 6], torch.device("cpu"))
    alone = sample.sample_normalised(ae, unet, 1.0, s, latent, [6], torch.device("cpu"))
    assert both.shape == (2, 1, 16, 16) and np.allclose(both[1], alone[0], atol=1e-5)

    rng = np.random.default_rng(0)
    raw = rng.integers(10, 200, 4000).astype(np.float64)
    imap = data.IntensityMap.fit([(raw - 100) / 50], [raw])
    paths = sample.write_case(rng.normal(size=(1, 16, 16)) * 3, tmp_path, "g_00000", imap, ".png", (1.0, 1.0),
                              999.0, [0, 1, 2])
    png = np.asarray(Image.open(paths[0]))
    assert paths[0].name == "g_00000_0000.png" and png.dtype == np.uint8 and png.shape == (16, 16)
    assert png.min() >= 10 and png.max() <= 199  # the raw range, not 0..255
    assert sample.is_done(tmp_path, "g_00000", 1, ".png") and (tmp_path / "g_00000.npy").is_file()

    import SimpleITK as sitk

    nifti = sample.write_case(np.zeros((1, 16, 12)), tmp_path, "n_00000", imap, ".nii.gz", (0.5, 0.7), 3.0, [0, 1, 2])
    image = sitk.ReadImage(str(nifti[0]))
    assert image.GetSize() == (12, 16, 1) and np.allclose(image.GetSpacing(), (0.7, 0.5, 3.0))
    assert sitk.GetArrayFromImage(image).dtype == np.int16


def test_report_flags_a_broken_model(tmp_path):
    rng = np.random.default_rng(0)
    real = [rng.normal(size=(1, 16, 16)).astype(np.float32) for _ in range(10)]
    good = [rng.normal(size=(1, 16, 16)).astype(np.float32) for _ in range(6)]
    flat = [np.full((1, 16, 16), 3.0, np.float32) for _ in range(6)]
    assert report.image_statistics(real, good)["warnings"] == []
    warnings = report.image_statistics(real, flat)["warnings"]
    assert any("histogram distance" in w for w in warnings) and any("nearly flat" in w for w in warnings)
    assert any("near copies" in w for w in warnings)
    stats = report.write_report(real, flat, [(16, 16)] * 10, tmp_path, {"model": "m"})
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["warnings"] == stats["warnings"]
    assert (tmp_path / "real_vs_generated.png").is_file()
    assert "Warnings" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_bad_options_fail_before_anything_is_read():
    from nnssl.generative.cli import generate_unlabeled

    with pytest.raises(InputError, match="-n -1: must be 0 or more"):
        generate_unlabeled(1, "2d", -1)
    with pytest.raises(InputError, match="--preset huge: unknown"):
        generate_unlabeled(1, "2d", 1, preset="huge")


def test_ids_continue_after_the_cases_a_model_added():
    split = SSLSplit(labeled=["a"], unlabeled=["x"], extra={"provenance": {
        "x": {"source": "generated", "model": "m1", "index": 4}, "y": {"source": "generated", "model": "m2"}}})
    assert next_index(split, "m1") == 5 and next_index(split, "m3") == 0
    assert case_id("gen_", "tiny", 1, 5) == "gen_ldm_tiny_s1_00005"
