"""Checks shared by the unit tests of the trainers grafted on DHC's CPS base (nnssl/training/dhc_zoo.py): a few
train steps on the tiny 2D dataset of tiny_trainer.py, the logged keys, and the trainer state through a real
checkpoint file (nnU-Net's save_checkpoint / load_checkpoint, as ``--c`` reads it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_trainer as tiny
import torch
from e2e_utils import assert_nested_equal
from test_training_base import HostSyncCounter

COMMON_KEYS = {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight", "pseudo_label_confidence",
               "fraction_above_threshold", "agreement"}


def train_steps(trainer, steps: int = 3, seed: int = 0, host_syncs: list[int] | None = None) -> list[dict]:
    """``steps`` train steps on tiny joint batches, each with one host synchronisation (the step log's) unless
    ``host_syncs`` says how many step by step; every logged value finite, the common keys and the method's own
    ``<prefix>_loss_supervised_a/_b`` present."""
    host_syncs = host_syncs or [1] * steps
    trainer.on_train_epoch_start()
    outputs = []
    for s in range(steps):
        batch = tiny.tiny_batch(torch.Generator().manual_seed(seed + s))
        with pytest.MonkeyPatch.context() as patch:
            counter = HostSyncCounter(patch)
            outputs.append(trainer.train_step(batch))
        assert counter.calls == host_syncs[s], f"step {s}: {counter.calls} host synchronisations"
    prefix = trainer.log_prefix
    for out in outputs:
        assert COMMON_KEYS | {f"{prefix}_loss_supervised_a", f"{prefix}_loss_supervised_b"} <= set(out)
        assert all(k in COMMON_KEYS or k.startswith(f"{prefix}_") for k in out), sorted(out)
        assert all(math.isfinite(float(v)) for v in out.values()), out
        assert out["loss_supervised"] == pytest.approx(out[f"{prefix}_loss_supervised_a"]
                                                       + out[f"{prefix}_loss_supervised_b"], rel=1e-5)
    assert trainer.global_iteration == steps
    return outputs


def reload_from_checkpoint(trainer, tmp_path, monkeypatch):
    """Write ``trainer``'s checkpoint with nnU-Net's save_checkpoint, load it into a fresh trainer of the same class
    and check that networks, optimizers and registered state are restored exactly; returns the fresh trainer."""
    path = str(tmp_path / "checkpoint_test.pth")
    trainer.save_checkpoint(path)
    fresh = trainer.__class__(tiny.tiny_plans(), "2d", 0, tiny.DATASET_JSON, torch.device("cpu"))
    fresh.initialize()
    fresh.load_checkpoint(path)
    saved, restored = trainer.ssl_state_dict(), fresh.ssl_state_dict()
    for part in ("extra_networks", "extra_optimizers", "extra_state", "global_iteration"):
        assert_nested_equal(restored[part], saved[part], part)
    return fresh


def np_softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 in numpy (the tests' transcriptions of DHC's scripts)."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
