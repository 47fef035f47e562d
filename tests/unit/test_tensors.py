"""Helpers of ``nnssl.tensors`` that the hot path relies on."""

from __future__ import annotations

import pytest
import torch

from nnssl.tensors import class_argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 3, 4, 8, 8)])
def test_class_argmax_equals_torch_argmax_including_ties(dtype, shape):
    g = torch.Generator().manual_seed(0)
    # few distinct values, so most voxels have tied maxima: the first maximal class must win, as in torch.argmax
    scores = torch.randint(0, 3, shape, generator=g).to(dtype)
    assert (scores.max(1).values.unsqueeze(1) == scores).sum(1).gt(1).any()  # ties are really there
    labels = class_argmax(scores)
    assert labels.dtype == torch.long and labels.shape == shape[:1] + shape[2:]
    assert torch.equal(labels, torch.argmax(scores, dim=1))
    assert torch.equal(class_argmax(scores[0], dim=0), torch.argmax(scores[0], dim=0))


def test_class_argmax_of_continuous_logits_and_no_graph():
    logits = torch.randn(3, 5, 7, 9, requires_grad=True)
    labels = class_argmax(logits)
    assert torch.equal(labels, logits.argmax(1)) and not labels.requires_grad
