"""Small edits of an nnU-Net plans file, for CPU smoke runs, tests and the demo."""

from __future__ import annotations

import json
import os

from nnssl.io import atomic_write_json


def shrink_network(plans_file: str | os.PathLike, base_features: int = 8, max_features: int = 64) -> dict:
    """Rewrite every configuration's ``features_per_stage`` to ``min(base * 2**stage, max)``.

    Planning and preprocessing do not depend on the width of the network, so this can be applied after
    ``nnssl_plan_and_preprocess``; it makes the synthetic end-to-end runs fast enough for 2 CPU cores.
    """
    with open(plans_file, encoding="utf-8") as f:
        plans = json.load(f)
    for cfg in plans["configurations"].values():
        kwargs = cfg.get("architecture", {}).get("arch_kwargs")
        if kwargs and "features_per_stage" in kwargs:
            n = len(kwargs["features_per_stage"])
            kwargs["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n)]
    atomic_write_json(plans_file, plans)
    return plans
