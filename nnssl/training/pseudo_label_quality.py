"""Diagnostic: Dice of a network's pseudo-labels against the withheld labels of a few unlabeled cases."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from nnssl.tensors import class_argmax, full_resolution, unwrap


@torch.no_grad()
def pseudo_label_dice(network: nn.Module, unlabeled_folder: Path, withheld_folder: Path, patch_size: Sequence[int],
                      foreground_labels: Sequence[int], device: torch.device, n_cases: int,
                      autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """``{"pseudo_label_dice": mean foreground Dice}`` of ``argmax network(x)`` on the central patch of the first
    ``n_cases`` unlabeled cases that have a withheld label (``labelsUnlabeled``, a simulated labeled fraction), or
    ``{}`` without withheld labels. The labels are read here, after an epoch's training, and nowhere else; a 2d
    configuration scores the central slice. Voxels labeled -1 (outside nnU-Net's nonzero mask) are ignored."""
    if not withheld_folder.is_dir():
        return {}
    import blosc2
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    cases = sorted(p.stem for p in withheld_folder.glob("*.npy"))[:n_cases]
    net = unwrap(network)
    was_training = net.training
    net.eval()
    patch = list(patch_size)
    counts = np.zeros((len(foreground_labels), 3))  # tp, fp, fn
    for case in cases:
        data = blosc2.open(str(unlabeled_folder / f"{case}.b2nd"), mode="r")[:]
        label = np.load(withheld_folder / f"{case}.npy")
        if len(patch) == 2:  # 2d configuration: the central slice
            data, label = data[:, data.shape[1] // 2], label[:, label.shape[1] // 2]
        bbox = [[(s - p) // 2, (s - p) // 2 + p] for s, p in zip(data.shape[1:], patch)]
        x = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0))).float()[None]
        y = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(label, bbox, -1)))[0].to(device)
        with autocast():
            out = net(x.to(device))
        pred = class_argmax(full_resolution(out)[0], dim=0)
        valid = y >= 0
        for i, c in enumerate(foreground_labels):
            p, t = (pred == c) & valid, (y == c) & valid
            counts[i] += [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
    net.train(was_training)
    denom = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
    dice = np.where(denom > 0, 2 * counts[:, 0] / np.maximum(denom, 1), np.nan)
    return {"pseudo_label_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")}
