"""The segmentation heads of a fine-tuning started from a stage-1 model.

nnU-Net's ``-pretrained_weights`` loads everything but the segmentation heads (``load_pretrained_weights`` is meant
for transfer to other labels). Fine-tuning on pseudo-labels keeps the labels, so the heads are copied too, from the
stage-1 model that the pseudo-labeled dataset's ``ssl_split.json`` names, but only if the rest of the network equals
that checkpoint (i.e. ``-pretrained_weights`` was given that model).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch
from torch import nn

SEG_LAYER_KEY = ".seg_layers."  # the keys nnU-Net's load_pretrained_weights leaves out


def source_checkpoints(split_files: Sequence[str | os.PathLike | None]) -> list[str]:
    """Checkpoint file(s) of the model that made the newest pseudo-labels (``pseudo_label_rounds[-1]``), from the
    first of ``split_files`` that exists and has a round; ``[]`` if none."""
    for path in split_files:
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                rounds = json.load(f).get("pseudo_label_rounds", [])
            if rounds:
                return list(rounds[-1]["model"].get("checkpoint_files", []))
    return []


def restore_segmentation_heads(network: nn.Module, checkpoints: Sequence[str], log: Callable[[str], None]) -> bool:
    """Copy the segmentation heads of the first of ``checkpoints`` whose other weights ``network`` already holds
    (the unwrapped network is changed in place). Returns whether heads were copied; ``log`` says what happened."""
    state = network.state_dict()
    body = [k for k in state if SEG_LAYER_KEY not in k]
    for path in checkpoints:
        if not os.path.isfile(path):
            log(f"source model {path} (from ssl_split.json) not found")
            continue
        weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
        if all(k in weights and weights[k].shape == state[k].shape and torch.equal(weights[k], state[k].cpu())
               for k in body):
            heads = {k: weights[k] for k in state if SEG_LAYER_KEY in k}
            network.load_state_dict({**state, **heads})
            log(f"segmentation heads ({len(heads)} tensors) restored from {path}: the network now equals the source "
                f"model")
            return True
    log("note: the network does not hold the source model's weights (no -pretrained_weights, or another "
        "checkpoint): segmentation heads left as initialised")
    return False
