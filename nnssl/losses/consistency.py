"""Mean Teacher consistency loss and teacher input noise (docs/methods/mean_teacher.md;
SSL4MIS ``train_mean_teacher_3D``).

Works for 2D ``(N, K, H, W)`` and 3D ``(N, K, D, H, W)`` logits. Softmax and the mean are computed in float32,
so fp16/bf16 logits from CUDA autocast are safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 3:
        raise ValueError(f"{name} must have shape (N, K, *spatial) with at least one spatial axis, "
                         f"got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point logits, got dtype {logits.dtype}")


def softmax_mse_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``L_cons = mean_{n,k,v} (softmax(z_s)_k − softmax(sg(z_t))_k)²`` (docs/methods/mean_teacher.md;
    SSL4MIS ``softmax_mse_loss`` followed by ``torch.mean``).

    The mean runs over all elements (N·K·voxels). The teacher is detached: gradients reach the student only.
    Returns a float32 scalar.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    student_probs = F.softmax(student_logits.float(), dim=1)
    teacher_probs = F.softmax(teacher_logits.detach().float(), dim=1)
    return torch.mean((student_probs - teacher_probs) ** 2)


def gaussian_input_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + clamp(N(0, std²), −clip, clip)`` elementwise: the teacher's input perturbation
    (docs/methods/mean_teacher.md).

    Returns a new tensor with the dtype and device of ``x``; ``x`` is not modified.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("gaussian_input_noise: x must be a floating point torch.Tensor")
    if std < 0:
        raise ValueError(f"gaussian_input_noise: std must be >= 0, got {std!r}")
    if clip < 0:
        raise ValueError(f"gaussian_input_noise: clip must be >= 0, got {clip!r}")
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    noise = torch.clamp(noise * std, -clip, clip)
    return x + noise.to(x.dtype)
