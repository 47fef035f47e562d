"""Does a row over- or under-segment? Predicted over true volume per class on the test set, next to its Dice.

A method can lose Dice by growing (or shrinking) a structure everywhere: GuidedNet's KT-CPS weights, which give
background weight 0, made it predict the myocardium at 3.1x its true area on one seed of the 2D CPU preset (4.6x
with KT-CPS alone; docs/methods/guidednet.md). Dice alone does not say which way a row errs; this ratio does.
Computed from the ``n_pred_voxels`` / ``n_ref_voxels`` that :func:`nnssl.evaluation.evaluate.evaluate_folders`
reports per case.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def volume_ratios(per_case: Sequence[Mapping]) -> dict[str, float]:
    """``{class: Σ_cases n_pred / Σ_cases n_ref}`` over ``evaluate_folders``' ``per_case`` entries; NaN for a class
    absent from every reference (a ratio to nothing)."""
    predicted: dict[str, int] = {}
    reference: dict[str, int] = {}
    for case in per_case:
        for name, metrics in case["metrics"].items():
            predicted[name] = predicted.get(name, 0) + int(metrics["n_pred_voxels"])
            reference[name] = reference.get(name, 0) + int(metrics["n_ref_voxels"])
    return {name: predicted[name] / reference[name] if reference[name] else math.nan for name in predicted}


def volume_bias_markdown(runs: Sequence[tuple[str, int, Mapping[str, float] | None]]) -> str:
    """A table of ``(trainer, seed, ratios)`` runs: per class the mean ratio over seeds, then the seeds' values;
    runs without ratios (rows stored before they were computed) are left out; "" when none has them."""
    per_trainer: dict[str, list[tuple[int, Mapping[str, float]]]] = {}
    for trainer, seed, ratios in runs:
        if ratios:
            per_trainer.setdefault(trainer, []).append((seed, ratios))
    if not per_trainer:
        return ""
    classes = list(dict.fromkeys(c for runs_ in per_trainer.values() for _, r in runs_ for c in r))
    lines = ["| trainer | " + " | ".join(classes) + " | seeds |", "|" + "---|" * (len(classes) + 2)]
    for trainer, seeded in per_trainer.items():
        seeded = sorted(seeded, key=lambda x: x[0])
        cells = []
        for c in classes:
            values = [r.get(c, math.nan) for _, r in seeded]
            finite = [v for v in values if math.isfinite(v)]
            mean = f"{np.mean(finite):.2f}" if finite else "n/a"
            cells.append(mean + (f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""))
        lines.append(f"| {trainer} | " + " | ".join(cells) + f" | {', '.join(str(s) for s, _ in seeded)} |")
    return "\n".join(lines)
