"""``nnssl_generate_unlabeled`` end to end on a copy of the planned 2D PNG dataset, tiny preset on the CPU: a
training killed after its first checkpoint resumes, the images become unlabeled cases (raw PNG, ssl_split.json
with provenance, preprocessed), a rerun adds more with new ids and keeps an image a killed sampling run finished,
nothing under imagesTs is ever opened, and a 3D configuration is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from e2e_utils import nnunet_env, run_cli
from PIL import Image

# every file the command opens from Python (PIL, nnU-Net's readers, json) goes through the audit hook
WRAPPER = """
import sys
def hook(event, args, log=sys.argv.pop(1)):
    if event == "open" and isinstance(args[0], str) and "/imagesTs/" in args[0]:
        with open(log, "a") as f:
            f.write(args[0] + "\\n")
sys.addaudithook(hook)
from nnssl.generative.cli import main
sys.exit(main())
"""
PRESET = ["--preset", "tiny", "-device", "cpu", "--no-progress"]


def _command(leak_log: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, str(leak_log), *args]


def _copy_dataset(dataset, root: Path) -> dict[str, str]:
    """A private copy: the session fixture stays as other tests expect it."""
    for kind, source in (("raw", dataset.raw), ("preprocessed", dataset.preprocessed)):
        shutil.copytree(source, root / kind / source.name)
    (root / "results").mkdir()
    return nnunet_env(root, OMP_NUM_THREADS="1")  # tiny networks: one thread is fastest on shared cores


def _generated(raw: Path) -> dict[str, dict]:
    split = json.loads((raw / "ssl_split.json").read_text(encoding="utf-8"))
    generated = {k: v for k, v in split.get("provenance", {}).items() if v.get("source") == "generated"}
    assert set(generated) <= set(split["unlabeled"])
    return generated


def test_generate_unlabeled(synthetic2d, tmp_path):
    env = _copy_dataset(synthetic2d, tmp_path)
    raw = tmp_path / "raw" / synthetic2d.name
    leaks = tmp_path / "imagesTs_reads.txt"
    model = tmp_path / "results" / synthetic2d.name / "nnssl_generative" / "2d__tiny__seed0"
    args = ["-d", str(synthetic2d.dataset_id), "-c", "2d", *PRESET]

    # 1. killed after the first autoencoder checkpoint
    proc = subprocess.Popen(_command(leaks, *args, "-n", "4"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (model / "autoencoder_latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (model / "autoencoder_latest.pt").exists() and not (model / "autoencoder_final.pt").exists()
    assert _generated(raw) == {}

    # 2. resumed: trains to the end, adds 4 images, preprocesses them, writes the report
    out = run_cli(_command(leaks, *args, "-n", "4"), env).stdout
    assert "autoencoder: resuming from" in out and "added 4 generated unlabeled case(s)" in out
    generated = _generated(raw)
    assert sorted(generated) == [f"gen_ldm_tiny_s0_{i:05d}" for i in range(4)]
    assert {v["model"] for v in generated.values()} == {"nnssl_generative/2d__tiny__seed0"}
    assert [v["seed"] for v in generated.values()] == [0] * 4
    image = np.asarray(Image.open(raw / "imagesUnlabeled" / "gen_ldm_tiny_s0_00000_0000.png"))
    assert image.dtype == np.uint8 and image.shape == (64, 64) and image.std() > 5
    pp = tmp_path / "preprocessed" / synthetic2d.name / "nnUNetPlans_2d_unlabeled"
    assert all((pp / f"{k}.pkl").is_file() for k in generated)
    report = json.loads((model / "report" / "report.json").read_text(encoding="utf-8"))
    assert report["n_generated"] == 4 and report["sizes"]["generated"] == [64, 64]
    assert (model / "report" / "real_vs_generated.png").is_file()
    assert not list((model / "samples").glob("*.png"))  # added cases leave the staging area

    # 3. a rerun adds more with new ids; an image a killed sampling run had finished is kept as it was
    planted = np.full((64, 64), 77, dtype=np.uint8)
    Image.fromarray(planted).save(model / "samples" / "gen_ldm_tiny_s0_00004_0000.png")
    np.save(model / "samples" / "gen_ldm_tiny_s0_00004.npy", np.zeros((1, 64, 64), np.float16))
    out = run_cli(_command(leaks, *args, "-n", "2"), env).stdout
    assert "autoencoder: finished earlier" in out and "1 image(s) finished by an earlier run are kept" in out
    assert sorted(_generated(raw)) == [f"gen_ldm_tiny_s0_{i:05d}" for i in range(6)]
    kept = np.asarray(Image.open(raw / "imagesUnlabeled" / "gen_ldm_tiny_s0_00004_0000.png"))
    assert np.array_equal(kept, planted)

    assert not leaks.exists(), f"imagesTs was read: {leaks.read_text(encoding='utf-8')}"


def test_generate_unlabeled_refuses_a_3d_configuration(synthetic2d, tmp_path):
    env = {**synthetic2d.env, "nnUNet_results": str(tmp_path)}
    proc = run_cli(["nnssl_generate_unlabeled", "-d", str(synthetic2d.dataset_id), "-c", "3d_fullres", "-n", "1",
                    "-device", "cpu"], env, expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nnssl_generate_unlabeled: error: -c 3d_fullres: not in the plans")
