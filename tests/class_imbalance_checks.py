"""Checks shared by the unit tests of the DHC-zoo class-imbalance trainers (CReST, SimiS, CLD, Basak): a few
train_steps on tests/tiny_trainer.py, the logged keys, and the registered state through a checkpoint round trip."""

from __future__ import annotations

import math

import tiny_trainer as tiny
import torch

COMMON_KEYS = {"loss", "loss_supervised", "loss_unsupervised", "unsupervised_weight", "pseudo_label_confidence",
               "fraction_above_threshold"}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def steps_and_checkpoint(trainer_class, trainer, state_name: str, extra_keys: set[str], steps: int = 3) -> list:
    """Run ``steps`` train_steps, check the logged keys (the common ones, then ``extra_keys``) and that the
    registered state ``state_name`` and every extra network survive ``ssl_state_dict`` -> a fresh trainer."""
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(s))) for s in range(steps)]
    for output in outputs:
        assert set(output) == COMMON_KEYS | extra_keys
        assert all(math.isfinite(float(v)) for v in output.values())
    assert trainer.global_iteration == steps
    state = trainer.ssl_state_dict()
    assert state_name in state["extra_state"]
    fresh = trainer_class(tiny.tiny_plans(), "2d", 0, tiny.DATASET_JSON, torch.device("cpu"))
    fresh.initialize()
    fresh.load_ssl_state_dict(state)
    assert _equal(fresh.ssl_state_dict()["extra_state"], state["extra_state"])
    for name, net in trainer.extra_networks.items():
        restored = fresh.extra_networks[name].state_dict()
        assert all(torch.equal(restored[k], v) for k, v in net.state_dict().items()), name
    return outputs
