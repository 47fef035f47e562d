"""Value checks of the method functions, and where the training step turns them off.

A check of tensor *values* (labels inside ``[0, K)``, class weights finite and non-negative, Dice in ``(0, 1]``) reads
the tensor on the host: one host synchronisation each, a stall of the GPU queue on every training step. Called
directly (tests, notebooks, a user's own loop) the functions check everything and fail with a clear message. Inside
:func:`trusted_inputs`, which the SSL base enters around its step's loss computation, value checks are skipped; the
inputs there come from nnU-Net's loader (labels checked by ``nnssl_plan_and_preprocess`` and nnU-Net's integrity
check) and from the method's own statistics. Shape and dtype checks read no values and always run.

This is torch.distributions' ``validate_args`` idea, scoped with a ``ContextVar`` instead of a process-wide flag.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_VALUE_CHECKS: ContextVar[bool] = ContextVar("nnssl_value_checks", default=True)


def value_checks_enabled() -> bool:
    """Whether the value checks (host synchronisations) run here."""
    return _VALUE_CHECKS.get()


@contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the value checks inside this block (the training step's hot path)."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)
