"""SS-Net's terms (Wu et al., "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image
Segmentation", MICCAI 2022: its virtual-adversarial smoothness and class-separation losses) as DHC's method zoo
runs them (``xmed-lab/DHC code/train_ssnet.py``; docs/methods/ssnet.md)::

    L_vat = 1 - Dice_bg(softmax f(x + ε d_adv), sg softmax f(x)),   d_adv = ∇_d Dice-loss at x + ξ d, d random unit
    Dice_bg(p, q) = mean_c (2 Σ p q + s) / (2 Σ p q + Σ p(1-q) + Σ (1-p) q + s + 1e-8),  s = 1e-8, all classes
    L_c = (1/K) Σ_c mean_{i,j} (1 - cos(f_i, m_j^c)) · w_i · w'_j        f: predicted features of class c
    w_i = M_c σ(s_c(sg f_i)) / Σ_i σ(s_c(sg f_i)),   w'_j = σ(s'_c(m_j)) normalised over a size-1 axis (≡ 1)
    memory m^c ← the 32 projected correct labeled features of class c with the LOWEST σ(s_c) (ascending sort)

``L_vat`` is DHC's ``VAT3d`` loss plus 1 (DHC's Dice loss returns ``-dc``): the same gradients, a non-negative log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl.networks.ssnet_heads import SSNetHeads
from nnssl.tensors import class_argmax, full_resolution


def soft_dice_with_background(probs: Tensor, target: Tensor, smooth: float = 1e-8) -> Tensor:
    """``1 - mean_c dc_c`` over every class, background included, sums over batch and voxels (DHC
    ``SoftDiceLoss(smooth=1e-8, do_bg=True)``, batch Dice, ``+ 1``); ``target`` one-hot or soft ``(N, K, ...)``."""
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} must match")
    axes = [0, *range(2, probs.ndim)]
    probs, target = probs.float(), target.float()
    tp = (probs * target).sum(axes)
    fp = (probs * (1 - target)).sum(axes)
    fn = ((1 - probs) * target).sum(axes)
    return 1 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)).mean()


def _unit(d: Tensor) -> Tensor:
    """Each sample scaled to L2 norm 1 (DHC ``_l2_normalize``: ``d / (‖d_n‖ + 1e-8)``)."""
    return d / (d.flatten(1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1))) + 1e-8)


@contextlib.contextmanager
def frozen_batchnorm_statistics(network: nn.Module) -> Iterator[None]:
    """Batch-norm layers keep normalising with batch statistics but do not update their running statistics (DHC
    ``_disable_tracking_bn_stats``, which flips ``track_running_stats``; here only layers that track are touched,
    so instance norms without statistics are left alone)."""
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class VirtualAdversarialDice(nn.Module):
    """SS-Net's virtual adversarial smoothness term with a Dice divergence (DHC ``VAT3d(epi=10.0)``: ξ = 10, ε = 10,
    one power iteration). ``forward(network, x, clean_logits=None)`` returns ``L_vat`` of the module doc; the
    gradient reaches ``network`` through the final perturbed forward only. ``clean_logits`` (detached) replaces the
    clean forward when the caller already has it (the same network and batch)."""

    def __init__(self, xi: float = 10.0, epsilon: float = 10.0, iterations: int = 1, smooth: float = 1e-8):
        super().__init__()
        if xi <= 0 or epsilon <= 0 or smooth < 0:
            raise ValueError(f"xi and epsilon must be > 0 and smooth >= 0, got {xi!r}, {epsilon!r}, {smooth!r}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.xi, self.epsilon, self.iterations, self.smooth = float(xi), float(epsilon), int(iterations), smooth

    def forward(self, network: nn.Module, x: Tensor, clean_logits: Tensor | None = None) -> Tensor:
        def probs(inputs: Tensor) -> Tensor:
            return F.softmax(full_resolution(network(inputs)).float(), dim=1)

        with torch.no_grad():
            target = probs(x) if clean_logits is None else F.softmax(clean_logits.detach().float(), dim=1)
        d = _unit(torch.rand(x.shape, device=x.device) - 0.5)
        with frozen_batchnorm_statistics(network):
            for _ in range(self.iterations):
                d.requires_grad_(True)
                distance = soft_dice_with_background(probs(x + self.xi * d.to(x.dtype)), target, self.smooth)
                d = _unit(torch.autograd.grad(distance, d)[0].detach())
            return soft_dice_with_background(probs(x + self.epsilon * d.to(x.dtype)), target, self.smooth)


class FeatureMemory:
    """Per-class memory of projected feature vectors (DHC ``FeatureMemory.add_features_from_sample_learned``).

    :meth:`update` replaces class c's entry by the given vectors of class c (at most ``elements_per_class``: those
    with the lowest ``sigmoid(selector_c)`` score, DHC's ascending sort) whenever there are any; classes absent from
    the update keep their entry. ``state_dict`` / ``load_state_dict`` for the checkpoint.
    """

    def __init__(self, num_classes: int, elements_per_class: int = 32):
        if num_classes < 1 or elements_per_class < 1:
            raise ValueError(f"num_classes and elements_per_class must be >= 1, got {num_classes}, "
                             f"{elements_per_class}")
        self.num_classes, self.elements_per_class = int(num_classes), int(elements_per_class)
        self.memory: list[Tensor | None] = [None] * self.num_classes

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, selectors: Sequence[Callable[[Tensor], Tensor]]) -> None:
        """``features`` (M, D) projected vectors, ``labels`` (M,) their classes, ``selectors[c]`` the ranking heads
        (called in the mode they are in, as DHC calls them in train mode)."""
        features = features.detach()
        for c in range(self.num_classes):
            features_c = features[labels == c]
            if features_c.shape[0] > self.elements_per_class:
                rank = torch.sigmoid(selectors[c](features_c))[:, 0]
                features_c = features_c[torch.argsort(rank)[:self.elements_per_class]]
            if features_c.shape[0] > 0:
                self.memory[c] = features_c.float().clone()

    def filled(self) -> int:
        return sum(m is not None for m in self.memory)

    def state_dict(self) -> dict:
        return {"elements_per_class": self.elements_per_class,
                "memory": [None if m is None else m.cpu() for m in self.memory]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["memory"]) != self.num_classes:
            raise ValueError(f"memory has {len(state['memory'])} classes, expected {self.num_classes}")
        self.elements_per_class = int(state["elements_per_class"])
        self.memory = [None if m is None else m.clone() for m in state["memory"]]


def class_memory_contrastive_loss(features: Tensor, labels: Tensor, memory: Sequence[Tensor | None],
                                  selectors: Sequence[nn.Module], memory_selectors: Sequence[nn.Module]) -> Tensor:
    """``L_c`` of the module doc (DHC ``contrastive_class_to_class_learned_memory``): ``features`` (M, D) predicted
    vectors, ``labels`` (M,); a class counts when it has more than one vector and more than one memory entry, and
    the sum is divided by the number of classes ``len(memory)`` whatever the count."""
    loss = features.new_zeros((), dtype=torch.float32)
    for c, memory_c in enumerate(memory):
        features_c = features[labels == c]
        if memory_c is None or features_c.shape[0] <= 1 or memory_c.shape[0] <= 1:
            continue
        memory_c = F.normalize(memory_c.to(features.device).float(), dim=1)  # the memory selector sees it so
        distances = 1 - F.normalize(features_c.float(), dim=1) @ memory_c.T
        weights = torch.sigmoid(selectors[c](features_c.detach()).float())  # (M_c, 1)
        distances = distances * (weights.shape[0] / weights.sum(0)) * weights
        memory_weights = torch.sigmoid(memory_selectors[c](memory_c.to(features.dtype)).float()).T  # (1, N)
        distances = distances * (memory_weights.shape[0] / memory_weights.sum(0)) * memory_weights
        loss = loss + distances.mean()
    return loss / len(memory)


def correct_foreground(prediction: Tensor, labels: Tensor) -> Tensor:
    """``[ŷ = y] · [ŷ > 0]``: the labeled voxels predicted correctly as foreground (DHC's memory candidates)."""
    return (prediction == labels) & (prediction > 0)


def ssnet_contrastive_terms(heads: SSNetHeads, memory: FeatureMemory, features: Tensor, logits: Tensor,
                            labels: Tensor, n_labeled: int) -> tuple[Tensor, Tensor]:
    """One step of SS-Net's class separation as DHC's training loop runs it: ``(L_c labeled, L_c unlabeled)``.

    ``features`` (N, C, *spatial) the decoder features and ``logits`` (N, K, *spatial) of the batch ``[x_l; x_u]``,
    ``labels`` (n_labeled, *spatial). Order as DHC: the projected (eval-mode ``projection_head``, no gradient)
    correct foreground labeled features update the memory first; then the predicted features of every labeled voxel
    (true labels) and every unlabeled voxel (argmax pseudo-labels) are compared with it.
    """
    if labels.shape != (n_labeled, *logits.shape[2:]):
        raise ValueError(f"labels must be (n_labeled, *spatial) = {(n_labeled, *logits.shape[2:])}, got "
                         f"{tuple(labels.shape)}")
    vectors = features.movedim(1, -1)  # (N, *spatial, C)
    labels = labels.long()
    with torch.no_grad():
        hard = class_argmax(logits.detach())
        correct = correct_foreground(hard[:n_labeled], labels)
        if bool(correct.any()):
            was_training = heads.training
            heads.eval()
            projected = heads.projection_head(vectors[:n_labeled][correct])
            heads.train(was_training)
            memory.update(projected, labels[correct], heads.selectors)
    dim = vectors.shape[-1]
    terms = []
    for rows, rows_labels in ((slice(None, n_labeled), labels), (slice(n_labeled, None), hard[n_labeled:])):
        predicted = heads.predict(vectors[rows].reshape(-1, dim))
        terms.append(class_memory_contrastive_loss(predicted, rows_labels.reshape(-1), memory.memory,
                                                   heads.selectors, heads.memory_selectors))
    return terms[0], terms[1]
