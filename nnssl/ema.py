"""Exponential moving average ("Mean Teacher") of a student network (docs/methods/mean_teacher.md, sdcl.md).

SSL4MIS rule, applied after every optimiser step with ``step`` = the iteration counter starting at 0::

    α_t = min(1 - 1/(step + 1), decay)            (SSL4MIS update_ema_variables)
    θ'  ← α_t θ' + (1 - α_t) θ

so the first call (step 0, α = 0) turns the teacher into an exact copy of the student.
Only parameters are averaged by default (SSL4MIS, SDCL LA/Pancreas); BatchNorm running statistics of the
teacher then stay at the values they had when it was copied. ``include_buffers=True`` also averages floating
point buffers and copies integer ones (SDCL ACDC ``update_model_ema`` averages the whole state_dict).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnssl.tensors import unwrap


def make_ema_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student whose parameters have ``requires_grad=False``.

    The copy keeps the student's train/eval mode; SSL4MIS runs the teacher forward in train mode under no_grad.
    """
    teacher = copy.deepcopy(unwrap(student))
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def ema_alpha(decay: float, step: int) -> float:
    """``α_t = min(1 - 1/(step + 1), decay)`` (SSL4MIS warm-up of the EMA decay)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")
    if step < 0:
        raise ValueError(f"EMA step must be >= 0, got {step!r}")
    return min(1.0 - 1.0 / (step + 1), float(decay))


def _paired(teacher_items: list[tuple[str, torch.Tensor]], student_items: list[tuple[str, torch.Tensor]], kind: str):
    teacher_names = [name for name, _ in teacher_items]
    student_names = [name for name, _ in student_items]
    if teacher_names != student_names:
        missing = sorted(set(student_names) ^ set(teacher_names))
        raise ValueError(
            f"update_ema_: teacher and student {kind} differ (not the same architecture?); "
            f"names in only one of them: {missing[:5]}" + (" (order differs)" if not missing else "")
        )
    for (name, t), (_, s) in zip(teacher_items, student_items):
        if t.shape != s.shape:
            raise ValueError(f"update_ema_: {kind[:-1]} {name!r} has shape {tuple(t.shape)} in the teacher "
                             f"but {tuple(s.shape)} in the student")
    return [(t, s) for (_, t), (_, s) in zip(teacher_items, student_items)]


@torch.no_grad()
def update_ema_(teacher: nn.Module, student: nn.Module, decay: float, step: int,
                include_buffers: bool = False) -> float:
    """In place ``θ' ← α_t θ' + (1 - α_t) θ`` with ``α_t = min(1 - 1/(step+1), decay)``; returns ``α_t``.

    Both modules may be wrapped by ``torch.compile`` or DDP. ``lerp_`` is used so that a teacher equal to the
    student stays bit-identical (``θ' + (1-α)(θ - θ')`` with ``θ = θ'`` adds exactly 0).
    """
    alpha = ema_alpha(decay, step)
    teacher, student = unwrap(teacher), unwrap(student)
    pairs = _paired(list(teacher.named_parameters()), list(student.named_parameters()), "parameters")
    if include_buffers:
        pairs += _paired(list(teacher.named_buffers()), list(student.named_buffers()), "buffers")
    for teacher_tensor, student_tensor in pairs:
        source = student_tensor.detach().to(device=teacher_tensor.device, dtype=teacher_tensor.dtype)
        if alpha == 0.0 or not teacher_tensor.is_floating_point():
            # exact copy on the first step (also clears a NaN/inf teacher), and integer buffers
            # (BatchNorm num_batches_tracked) cannot be averaged
            teacher_tensor.copy_(source)
        else:
            teacher_tensor.lerp_(source, 1.0 - alpha)
    return alpha


# update_ema_ warms the decay up as min(1 - 1/(step+1), decay); BCP/SDCL use the constant decay from the first
# step, which this step value reaches for any decay below 1 - 1e-9
CONSTANT_DECAY_STEP = 10**9


@torch.no_grad()
def update_teacher_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``θ_T ← decay · θ_T + (1 − decay) · θ_S`` with a constant decay (BCP/SDCL ``update_ema_variables``)."""
    update_ema_(teacher, student, decay, CONSTANT_DECAY_STEP)
