"""Helpers for end-to-end tests that drive the real console scripts (nnssl_*, nnUNetv2_*) in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

# a schedule that exercises every code path (two epochs, checkpoint each epoch) in seconds on 2 CPU cores
SMOKE_SCHEDULE = {
    "NNSSL_NUM_EPOCHS": "2",
    "NNSSL_ITERATIONS_PER_EPOCH": "2",
    "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1",
    "NNSSL_SAVE_EVERY": "1",
}


def nnunet_env(root: Path, **extra: str) -> dict[str, str]:
    from nnssl.cli.trainer_path import trainer_folder

    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_extTrainer": trainer_folder(),
        "nnUNet_n_proc_DA": "0",  # augmentation in the main process: deterministic and light on 2 cores
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 900, expect_ok: bool = True
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def fold_dir(env: dict[str, str], dataset: str, trainer: str, configuration: str, fold: str) -> Path:
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"


def train_interrupt_resume(env: dict[str, str], dataset_id: int, dataset: str, configuration: str, trainer: str,
                           fold: str = "0", extra_env: dict[str, str] | None = None) -> Path:
    """Start a training, kill it once ``checkpoint_latest.pth`` exists, then finish it with ``--c``.

    Returns the fold folder. The run uses ``SMOKE_SCHEDULE`` (two epochs, a checkpoint after the first).
    """
    env = {**env, **SMOKE_SCHEDULE, **(extra_env or {})}
    out = fold_dir(env, dataset, trainer, configuration, fold)
    cmd = ["nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-device", "cpu"]
    log_file = out.parent.parent / f"{trainer}_{configuration}_first.log"
    log = open(log_file, "w", encoding="utf-8") if out.parent.parent.exists() \
        else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 600
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # kill soon after epoch 0 is saved, well before epoch 1 can finish
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # an interruption, not a clean stop
        proc.wait()
    assert latest.exists(), f"{trainer}: no checkpoint_latest.pth before the first run ended (rc {proc.returncode})"
    assert not (out / "checkpoint_final.pth").exists(), "the first run was meant to be interrupted"
    run_cli(cmd + ["--c"], env)
    assert (out / "checkpoint_final.pth").exists()
    return out


def predict(env: dict[str, str], dataset_id: int, configuration: str, trainer: str, input_dir: Path,
            output_dir: Path, fold: str = "0") -> Path:
    run_cli(["nnUNetv2_predict", "-i", str(input_dir), "-o", str(output_dir), "-d", str(dataset_id), "-c",
             configuration, "-f", fold, "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
             "--disable_tta"], env)
    return output_dir


def ssl_progress(fold: Path) -> dict[str, list]:
    return json.loads((fold / "ssl_progress.json").read_text(encoding="utf-8"))


def assert_finite_progress(fold: Path, keys: list[str]) -> None:
    log = ssl_progress(fold)
    for key in keys:
        assert key in log, f"{key} not logged; logged: {sorted(log)}"
        values = np.array(log[key], dtype=float)
        assert len(values) == 2 and np.all(np.isfinite(values)), f"{key}: {values}"


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def restore_trainer(env: dict[str, str], fold: Path, checkpoint: str = "checkpoint_final.pth"):
    """Rebuild the trainer from a checkpoint the way ``--c`` does (same env), in this process."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ckpt = load_checkpoint(fold / checkpoint)
        trainer_cls = recursive_find_trainer_class_by_name(ckpt["trainer_name"])
        args = dict(ckpt["init_args"])
        args["plans"] = {**args["plans"], "continue_training": True}
        args["device"] = torch.device("cpu")
        trainer = trainer_cls(**args)
        trainer.load_checkpoint(str(fold / checkpoint))
        return trainer, ckpt
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), f"tensor {k} differs"


def mean_foreground_dice(pred_dir: Path, gt_dir: Path, labels: list[int]) -> dict[int, float]:
    import SimpleITK as sitk

    dice = {lab: [] for lab in labels}
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
        pr = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / gt_file.name)))
        for lab in labels:
            g, p = gt == lab, pr == lab
            if g.sum() + p.sum():
                dice[lab].append(2 * np.logical_and(g, p).sum() / (g.sum() + p.sum()))
    return {lab: float(np.mean(v)) if v else float("nan") for lab, v in dice.items()}


def assert_nested_equal(a, b, where: str = "") -> None:
    """Equality of nested state (optimizer or registered state dicts, case properties: dicts / lists of tensors,
    arrays and numbers)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), f"tensor {where} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), f"array {where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys of {where} differ"
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"length of {where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here
