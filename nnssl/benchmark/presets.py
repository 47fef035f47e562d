"""The synthetic presets of ``nnssl_benchmark --synthetic``: what data each generates and the schedule it trains.

A label-efficiency preset must let the fully supervised reference converge (its validation Dice moves by less than
1 point over the last quarter of the schedule) while labeled-only stays clearly below it (at least 8 Dice points),
and one seed of every trainer must fit about 25 minutes on 2 CPU cores (:mod:`nnssl.benchmark.curves` checks the
first two on every run; the learning curves that chose each schedule are under ``benchmarks/``). Presets with
``n_val`` train fold 0, which validates on the ``val`` cases (never on test cases), so the curves exist for every
row; the test set is only predicted at the end.

The dataset ids are fixed per preset (every seed has its own ``nnUNet_raw``, so the rows of the seeds average
together); the pseudo-labeled and fully labeled datasets derived from preset ``id`` are ``id + PL_OFFSET`` and
``id + FULL_OFFSET``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PL_OFFSET = 2
FULL_OFFSET = 4


@dataclass(frozen=True)
class SyntheticPreset:
    """One generated dataset and its CPU schedule (``lr`` None: nnU-Net's 0.01)."""

    name: str
    dataset_id: int
    kind: str  # nnssl.synthetic kind: "3d", "2d", "cardiac"
    configuration: str
    n_labeled: int
    n_unlabeled: int
    n_test: int
    epochs: int
    iterations: int
    lr: float | None = None
    n_val: int = 0
    voxel_scale: float = 1.0
    val_iterations: int = 2
    description: str = ""

    @property
    def fold(self) -> str:
        """Fold 0 validates on the ``val`` cases; without them every labeled case trains (fold ``all``)."""
        return "0" if self.n_val else "all"

    def data_text(self, seed: int) -> str:
        """What the generated data is, for the benchmark's row keys (the generator is deterministic in it)."""
        fields = asdict(self)
        data = {k: fields[k] for k in ("kind", "dataset_id", "n_labeled", "n_unlabeled", "n_test", "n_val",
                                       "voxel_scale")}
        return f"synthetic preset {self.name} {data} seed {seed}"


PRESETS: dict[str, SyntheticPreset] = {p.name: p for p in (
    # Converged label-efficiency preset (learning curves: benchmarks/curves_cardiac2d.png): 3 labeled of 43 slices
    # from three scanner-like styles; the full reference plateaus at ~0.88 validation Dice while labeled-only
    # stays near 0.6.
    SyntheticPreset("cardiac2d", 970, "cardiac", "2d", n_labeled=3, n_unlabeled=40, n_test=20, n_val=10,
                    epochs=25, iterations=40, val_iterations=5,
                    description="cardiac-MRI-like 2D (RV/MYO/LV), 3 labeled / 40 unlabeled / 20 test / 10 val"),
    # The earlier 200-iteration presets: they measure how fast a method leaves nnU-Net's all-background phase,
    # not label efficiency (the fully supervised reference is far from converged); kept as the quick presets.
    SyntheticPreset("quick3d", 960, "3d", "3d_fullres", n_labeled=4, n_unlabeled=16, n_test=6, epochs=5,
                    iterations=40, lr=0.05, voxel_scale=1.75,
                    description="CT-like 3D organs at 1.75x voxel size, 200 iterations (not converged)"),
    SyntheticPreset("quick2d", 961, "2d", "2d", n_labeled=6, n_unlabeled=24, n_test=10, epochs=4, iterations=50,
                    description="ultrasound-like 2D lesion, 200 iterations (not converged)"),
)}
DEFAULT_PRESETS = ("cardiac2d",)
SMOKE_PRESET = SyntheticPreset("smoke", 960, "3d", "3d_fullres", n_labeled=5, n_unlabeled=3, n_test=1, epochs=1,
                               iterations=2, voxel_scale=1.75, val_iterations=1,
                               description="seconds: the test suite's run")
