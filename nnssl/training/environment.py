"""The ``NNSSL_*`` environment contract: schedule overrides for smoke runs and benchmarks, read by every nnssl
trainer (and by ``nnssl_benchmark``, which sets them), and the per-iteration timer the benchmark reads.

This is the one place the variables are named; the library sets them, the trainers read them.
"""

from __future__ import annotations

import os
import time

from nnssl.training.folds import FoldsFromSplitFile

ENV_NUM_EPOCHS = "NNSSL_NUM_EPOCHS"
ENV_ITERATIONS = "NNSSL_ITERATIONS_PER_EPOCH"
ENV_VAL_ITERATIONS = "NNSSL_VAL_ITERATIONS_PER_EPOCH"
ENV_SAVE_EVERY = "NNSSL_SAVE_EVERY"
ENV_LABELED_BS = "NNSSL_LABELED_BATCH_SIZE"
ENV_UNLABELED_BS = "NNSSL_UNLABELED_BATCH_SIZE"
ENV_SKIP_FINAL_VALIDATION = "NNSSL_SKIP_FINAL_VALIDATION"
ENV_INITIAL_LR = "NNSSL_INITIAL_LR"


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer") from None
    if parsed < 1:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer")
    return parsed


class IterationTimer:
    """Mixin: logs the wall time per training iteration of every epoch (``train seconds/iteration: X``), which
    the benchmark reads. ``train_step`` returns a CPU copy of the loss, so CUDA work is finished when timed."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._train_epoch_started = time.perf_counter()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        elapsed = time.perf_counter() - self._train_epoch_started
        self.print_to_log_file(f"train seconds/iteration: {elapsed / max(1, len(train_outputs)):.4f}")
        super().on_train_epoch_end(train_outputs)


class ScheduleFromEnvironment(FoldsFromSplitFile, IterationTimer):
    """Mixin: ``NNSSL_NUM_EPOCHS``, ``NNSSL_ITERATIONS_PER_EPOCH``, ``NNSSL_VAL_ITERATIONS_PER_EPOCH`` and
    ``NNSSL_SAVE_EVERY`` override the schedule at ``initialize()`` (after every subclass ``__init__`` has set
    its own defaults and before the lr scheduler is built from ``num_epochs``).

    ``NNSSL_INITIAL_LR`` replaces nnU-Net's initial learning rate (0.01, SGD with poly decay) of trainers that use
    nnU-Net's optimiser (``uses_nnunet_optimizer``); trainers with a paper-specific optimiser (the pseudo-label
    fine-tuning's Adam 5e-5, SDCL's ``_adam``) keep theirs and log that the variable was ignored.

    ``NNSSL_SKIP_FINAL_VALIDATION=1`` skips the sliding-window prediction of the validation cases after training
    (``nnUNetv2_train --val`` can still run it later): ``nnssl_benchmark`` scores the test set instead, and on a
    CPU this prediction costs as much as a short schedule."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(ENV_SKIP_FINAL_VALIDATION, "") not in ("", "0"):
            self.print_to_log_file(f"{ENV_SKIP_FINAL_VALIDATION} is set: final validation skipped")
            return
        super().perform_actual_validation(save_probabilities)

    uses_nnunet_optimizer: bool = True

    def apply_schedule_from_environment(self) -> None:
        lr = os.environ.get(ENV_INITIAL_LR, "")
        if lr:
            try:
                value = float(lr)
            except ValueError:
                raise ValueError(f"environment variable {ENV_INITIAL_LR}={lr!r} must be a positive number") from None
            if not value > 0:
                raise ValueError(f"environment variable {ENV_INITIAL_LR}={lr!r} must be a positive number")
            if self.uses_nnunet_optimizer:
                self.initial_lr = value
                self.print_to_log_file(f"{ENV_INITIAL_LR}={lr}: initial_lr set to {value}")
            else:
                self.print_to_log_file(f"{ENV_INITIAL_LR}={lr} ignored: this trainer keeps its own optimiser "
                                       f"(initial_lr {self.initial_lr})")
        for env, attr in ((ENV_NUM_EPOCHS, "num_epochs"), (ENV_ITERATIONS, "num_iterations_per_epoch"),
                          (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch"), (ENV_SAVE_EVERY, "save_every")):
            value = env_int(env)
            if value is not None:
                setattr(self, attr, value)
                self.print_to_log_file(f"{env}={value}: {attr} set to {value}")

    def initialize(self):
        if not self.was_initialized:
            self.apply_schedule_from_environment()
        super().initialize()


