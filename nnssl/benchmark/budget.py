"""Equal compute, not only equal iterations: the ``--budget`` of ``nnssl_benchmark``.

SSL trainers cost 2-7x more per training iteration than labeled-only nnU-Net (a second network, a teacher, an
unlabeled batch), so a table at equal iterations gives them 2-7x the compute. A user with a fixed GPU budget asks
another question: what does the method give in the time nnU-Net on the labeled cases alone needs? Budgets:

- ``iterations`` (default): every row trains the schedule (``NNSSL_NUM_EPOCHS`` x ``NNSSL_ITERATIONS_PER_EPOCH``).
- ``time``: every SSL row gets the wall-clock training time of the labeled-only reference (``nnUNetTrainerSupervised``)
  on the schedule. A short speed calibration trains each trainer (and the reference) ``CALIBRATION_SCHEDULE`` epochs
  x iterations with the run's other ``NNSSL_*`` settings, on the same data and device, into a scratch results folder,
  and reads the fastest epoch's ``train seconds/iteration`` after the first (warm-up) epoch: other load on the machine
  only ever adds time (on a shared 2-core machine one epoch of the same run took 2.3 s/iter and the next 5.1), so the
  fastest epoch is the closest to the trainer's own cost, and both sides of the ratio are measured the same way.
  The row's iterations per epoch are the schedule's times ``s/iter labeled-only / s/iter trainer``, rounded down
  (the row never gets more time than the reference), never below 1 and never above the schedule (every SSL trainer
  does the labeled-only step and more, so a ratio above 1 is measurement noise). The number of epochs stays, so
  nnU-Net's poly lr decay and the SSL ramps (relative to the schedule's length) keep their shape over the shorter
  run. The factor is in the row (``time_scale``) and its notes. The row's model is trained into
  ``$nnUNet_results/equal_time`` (its logs and predictions are tagged ``_equal_time``), so the trainer's
  equal-iteration model stays where it was.
- ``both``: the two sets of rows side by side (``X @ equal time`` in benchmark.md, a ``budget`` column in
  benchmark.csv/json, paired bars in benchmark_gap.png).

The references are the same rows under both budgets: labeled-only defines the budget (ratio 1) and the fully
supervised reference trains the same network with the same batch, so it costs the same per iteration.

The pseudo-label fine-tuning row (``nnUNetTrainerPseudoLabelFinetune``) is not run under the time budget. Its cost is
stage 1 + pseudo-labeling + stage 2, and its stage 1 *is* the labeled-only row: stage 1 alone uses the whole equal-time
budget, so within that budget the recipe is the labeled-only model itself (gap closed 0 by construction) and stage 2
has no time left. Training a shorter stage 1 to leave time for stage 2 would be another recipe (how to split the
budget is a choice of its own) and would make its stage 1 differ from the reference; the row says so in the table
instead of a number. At equal iterations it keeps its meaning (what fine-tuning on pseudo-labels adds after the
labeled-only schedule, at about twice the compute).

The calibration is saved per dataset, configuration, seed and device as ``calibration/<id>_<cfg>_seed<s>_<device>.json``
in the output folder, with a key of its data, fold and the ``NNSSL_*`` settings other than the schedule's length; a
rerun with the same key reuses it (and measures only trainers it lacks), so the scaled schedules and with them the
keys of the finished time-budget rows stay the same.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

BUDGETS = ("iterations", "time", "both")
ITERATIONS, TIME = "iterations", "time"
BUDGET_LABEL = {ITERATIONS: "equal iterations", TIME: "equal time"}
# (epochs, iterations per epoch) of the speed calibration; the first epoch is warm-up (dropped by the median)
CALIBRATION_SCHEDULE = (3, 10)
SMOKE_CALIBRATION_SCHEDULE = (4, 2)
CALIBRATION_FOLDER = "calibration"
# nnUNetTrainer's own iterations per epoch, the schedule when NNSSL_ITERATIONS_PER_EPOCH is not set
NNUNET_DEFAULT_ITERATIONS = 250
# keys of the schedule's length: the calibration sets its own, so they are not part of its key
LENGTH_VARIABLES = ("NNSSL_NUM_EPOCHS", "NNSSL_ITERATIONS_PER_EPOCH", "NNSSL_VAL_ITERATIONS_PER_EPOCH",
                    "NNSSL_SAVE_EVERY")


def budgets_of(mode: str) -> list[str]:
    """The budgets a ``--budget`` mode runs, in table order."""
    if mode not in BUDGETS:
        raise ValueError(f"--budget {mode!r}: expected one of {', '.join(BUDGETS)}")
    return [ITERATIONS, TIME] if mode == "both" else [mode]


def calibration_seconds_per_iteration(log_text: str) -> float:
    """The fastest epoch's ``train seconds/iteration`` of a calibration log, the first (warm-up) epoch dropped when
    there are more; NaN without any."""
    values = [float(v) for v in re.findall(r"train seconds/iteration: ([0-9.]+)", log_text)]
    if len(values) > 1:
        values = values[1:]
    return min(values) if values else float("nan")


def speed_ratio(reference_seconds: float, trainer_seconds: float) -> float:
    """Seconds per iteration of the labeled-only reference / of the trainer (< 1: the trainer is slower); NaN when
    either is not a positive number."""
    if not (reference_seconds > 0 and trainer_seconds > 0) or math.isinf(reference_seconds + trainer_seconds):
        return float("nan")
    return reference_seconds / trainer_seconds


def time_scaled_iterations(iterations: int, ratio: float) -> int:
    """Iterations per epoch under equal time: ``floor(iterations * ratio)``, at least 1, at most ``iterations``."""
    if not ratio == ratio:
        raise ValueError("no speed ratio (calibration failed?)")
    scaled = math.floor(iterations * min(ratio, 1.0) + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996
    return max(1, min(iterations, scaled))


def schedule_iterations(env: Mapping[str, str]) -> int:
    """The schedule's iterations per epoch: ``NNSSL_ITERATIONS_PER_EPOCH``, else nnU-Net's 250."""
    value = env.get("NNSSL_ITERATIONS_PER_EPOCH")
    return int(value) if value else NNUNET_DEFAULT_ITERATIONS


def time_budget_env(env: Mapping[str, str], ratio: float) -> tuple[dict[str, str], int, int]:
    """(``env`` with the equal-time iterations per epoch, the schedule's iterations, the scaled ones); the epochs
    and everything else unchanged."""
    iterations = schedule_iterations(env)
    scaled = time_scaled_iterations(iterations, ratio)
    return {**env, "NNSSL_ITERATIONS_PER_EPOCH": str(scaled)}, iterations, scaled


def calibration_file(out: Path, dataset_id: int, configuration: str, seed: int, device: str) -> Path:
    return out / CALIBRATION_FOLDER / f"{dataset_id}_{configuration}_seed{seed}_{device}.json"


def calibration_key(data: str, configuration: str, fold: str, device: str, env: Mapping[str, str],
                    schedule: tuple[int, int]) -> dict[str, Any]:
    """What the measured speeds depend on: the data, configuration, fold, device, calibration schedule and every
    ``NNSSL_*`` setting except the schedule's length (batch sizes, lr, ...)."""
    settings = {k: env[k] for k in sorted(env) if k.startswith("NNSSL_") and k not in LENGTH_VARIABLES}
    return {"data": data, "configuration": configuration, "fold": str(fold), "device": device,
            "settings": settings, "calibration_schedule": list(schedule)}


def load_calibration(path: Path, key: Mapping[str, Any]) -> dict[str, float]:
    """trainer -> seconds per iteration of an earlier calibration with the same key; {} when none or another key."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if stored.get("key") != json.loads(json.dumps(dict(key))):
        return {}
    return {t: float(s) for t, s in stored.get("seconds_per_iteration", {}).items() if float(s) > 0}


def save_calibration(path: Path, key: Mapping[str, Any], seconds: Mapping[str, float]) -> None:
    from nnssl.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": dict(key), "seconds_per_iteration": dict(seconds)})
