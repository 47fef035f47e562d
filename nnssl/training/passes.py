"""The network passes a method needs per training step: its compute floor, declared by every trainer as the class
attribute ``network_passes`` and read by ``nnssl_speed`` (:mod:`nnssl.benchmark.speed`).

A pass is one call of a registered network (``self.network`` or an extra network such as ``teacher``,
``network2``, ``auxiliary_decoders``) on the labeled, the unlabeled or the whole batch ``[x_l; x_u]``, with or
without a backward. ``nnssl_speed`` times each distinct pass kind (rows, backward) once as nnU-Net's own network
forward (and backward) on those rows and sums them into the floor; a module cheaper or dearer than the plans'
network (decoder-only heads, a pair of networks in one module) says so with ``scale``. The trainer's real passes are
counted with forward hooks and shown next to the declared ones, so a forward computed twice shows up.

This module is deliberately tiny (no torch): the plugin imports it, and so does the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

BATCHES = ("labeled", "unlabeled", "both")


@dataclass(frozen=True)
class NetworkPass:
    """One network call a step needs.

    ``batch``: the rows it sees ("labeled", "unlabeled" or "both" = ``[x_l; x_u]``), times ``batch_factor`` (e.g.
    UA-MT's teacher on the unlabeled batch repeated twice); ``backward``: whether a backward goes through it (its
    forward runs with autograd); ``network``: the trainer's name of the module (``network`` or a key of
    ``extra_networks``); ``scale``: its cost relative to the plans' network (1: the same architecture; 0.5: a
    decoder without the encoder; 2: two networks in one module); ``note``: why, for the reader.
    """

    batch: str
    backward: bool
    network: str = "network"
    batch_factor: int = 1
    scale: float = 1.0
    note: str = ""

    def __post_init__(self):
        if self.batch not in BATCHES:
            raise ValueError(f"NetworkPass.batch must be one of {BATCHES}, got {self.batch!r}")
        if not isinstance(self.backward, bool):
            raise ValueError(f"NetworkPass.backward must be a bool, got {self.backward!r}")
        if not self.network or not isinstance(self.network, str):
            raise ValueError(f"NetworkPass.network must be a non-empty name, got {self.network!r}")
        if int(self.batch_factor) != self.batch_factor or self.batch_factor < 1:
            raise ValueError(f"NetworkPass.batch_factor must be an integer >= 1, got {self.batch_factor!r}")
        if not self.scale >= 0:
            raise ValueError(f"NetworkPass.scale must be >= 0, got {self.scale!r}")

    def rows(self, n_labeled: int, n_unlabeled: int) -> int:
        """The batch size of this pass for ``n_labeled`` labeled and ``n_unlabeled`` unlabeled patches per step."""
        base = {"labeled": n_labeled, "unlabeled": n_unlabeled, "both": n_labeled + n_unlabeled}[self.batch]
        return base * int(self.batch_factor)


# nnU-Net's own training step (nnUNetTrainer and anything that trains one network on labeled batches only)
SUPERVISED_PASSES: tuple[NetworkPass, ...] = (NetworkPass("labeled", True),)


def declared_passes(trainer_class: type) -> tuple[NetworkPass, ...] | None:
    """The ``network_passes`` a trainer class declares (or inherits); ``None`` when it declares none."""
    passes = getattr(trainer_class, "network_passes", None)
    return tuple(passes) if passes is not None else None


def check_passes(passes, owner: str = "network_passes") -> tuple[NetworkPass, ...]:
    """``passes`` as a tuple, or a ``ValueError`` saying what is wrong (empty, not NetworkPass, no backward)."""
    if passes is None or isinstance(passes, (str, NetworkPass)):
        raise ValueError(f"{owner} must be a non-empty tuple of NetworkPass, got {passes!r}")
    passes = tuple(passes)
    if not passes or not all(isinstance(p, NetworkPass) for p in passes):
        raise ValueError(f"{owner} must be a non-empty tuple of NetworkPass, got {passes!r}")
    if not any(p.backward and p.network == "network" for p in passes):
        raise ValueError(f"{owner}: no pass trains the inference network ('network' with backward)")
    return passes
# one network on the whole batch [x_l; x_u] (entropy minimisation, URPC)
ONE_NETWORK_PASSES: tuple[NetworkPass, ...] = (NetworkPass("both", True),)
# a student on the whole batch and its EMA teacher on the unlabeled patches, no grad (Mean Teacher, Basak)
TEACHER_PASSES: tuple[NetworkPass, ...] = (NetworkPass("both", True), NetworkPass("unlabeled", False, "teacher"))
# two networks, each on the whole batch (CPS, DHC and DHC's CPS-based zoo, GuidedNet)
PAIR_PASSES: tuple[NetworkPass, ...] = (NetworkPass("both", True), NetworkPass("both", True, "network2"))
