"""``nnssl_demo``: does unlabeled data help? One semi-supervised trainer against both references, explained.

A thin layer over ``nnssl_benchmark --synthetic --preset cardiac2d`` (:mod:`nnssl.benchmark.cli`, run in this
process): the 2D cardiac-MRI-like label-efficiency preset (RV, MYO, LV; 3 labeled slices from one acquisition style,
40 unlabeled whose labels are withheld, 20 test and 10 validation slices; 30 epochs x 40 iterations, lr 0.03) is
generated, planned and preprocessed, and three models are trained with the same plans and schedule and scored on
the test slices:

- labeled-only: ``nnUNetTrainerSupervised`` (nnU-Net) on the 3 labeled slices;
- one SSL trainer (``--trainer``, default ``nnUNetTrainerWeakStrongMT``, nnssl's recommended trainer) on the 3
  labeled + 40 unlabeled slices;
- fully supervised: the same nnU-Net on all 43 slices with their true labels (the benchmark's reference row).

It then prints per-class Dice and gap closed = (Dice SSL - Dice labeled-only) / (Dice full - Dice labeled-only)
in a short table with a few sentences on what they mean. Everything the benchmark writes (benchmark.md/csv/json,
learning curves, the gap plot, logs, data, models) is in ``--work-dir``; a rerun with the same folder and options
reuses the finished rows (``--overwrite`` starts over). Expected run time with the preset's schedule: about 10
minutes on 2 idle CPU cores (:data:`CPU_SECONDS_PER_ITERATION`), far less on a GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import threading
import time
from pathlib import Path

from nnssl.errors import InputError, report_user_errors

PRESET = "cardiac2d"
DEFAULT_TRAINER = "nnUNetTrainerWeakStrongMT"  # the README's trainer to try first
# Rough cost on 2 idle CPU cores (cardiac2d plans, narrowed network): labeled-only and the fully supervised reference
# ~0.05-0.08 s per iteration, an SSL trainer 2-3x that; plus data generation, planning, preprocessing, prediction.
CPU_SECONDS_PER_ITERATION = 0.065
SSL_COST_FACTOR = 2.5
CPU_OVERHEAD_SECONDS = 120


def short_name(trainer: str) -> str:
    return trainer.replace("nnUNetTrainer", "") or trainer


def _preset():
    from nnssl.benchmark.presets import PRESETS

    return PRESETS[PRESET]


def estimated_cpu_minutes(epochs: int, iterations: int) -> float:
    """Minutes on 2 idle CPU cores for the three rows on ``epochs`` x ``iterations``."""
    return (epochs * iterations * CPU_SECONDS_PER_ITERATION * (2 + SSL_COST_FACTOR) + CPU_OVERHEAD_SECONDS) / 60


def demo_rows(rows: list[dict], trainer: str) -> list[tuple[str, dict | None]]:
    """(label, benchmark row or None) of labeled-only, ``trainer`` and the fully supervised reference, from the
    ``rows`` of benchmark.json."""
    from nnssl.benchmark.cli import BASELINE, FULL_REFERENCE

    p = _preset()
    by_trainer = {r["trainer"]: r for r in rows if r.get("budget", "iterations") in ("iterations", "both")}
    return [(f"labeled-only ({p.n_labeled} labeled)", by_trainer.get(BASELINE)),
            (f"{short_name(trainer)} ({p.n_labeled} labeled + {p.n_unlabeled} unlabeled)", by_trainer.get(trainer)),
            (f"fully supervised ({p.n_labeled + p.n_unlabeled} labeled)", by_trainer.get(FULL_REFERENCE))]


def _percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.0f} %"


def format_dice_table(rows: list[dict], trainer: str) -> str:
    """Rows = the three models, columns = per-class Dice, their mean and gap closed (references: 0 % and 100 % by
    definition)."""
    picked = demo_rows(rows, trainer)
    classes = list(dict.fromkeys(k[5:] for _, r in picked if r for k in r
                                 if k.startswith("dice_") and k not in ("dice_mean", "dice_seed_spread")))
    head = ["model", *classes, "mean", "gap closed"]
    table = []
    for i, (label, r) in enumerate(picked):
        if r is None or "dice_mean" not in r:
            why = "skipped" if r and r.get("skipped") else "failed (see its log)" if r else "missing"
            table.append([label, *([""] * len(classes)), why, ""])
            continue
        gap = {0: "0 % (reference)", 2: "100 % (reference)"}.get(i, _percent(r.get("gap_closed")))
        table.append([label, *(f"{r[f'dice_{c}']:.3f}" for c in classes), f"{r['dice_mean']:.3f}", gap])
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in table)])


def explanation(rows: list[dict], trainer: str, work: Path, more_seeds_command: str) -> str:
    """The sentences under the table: what each row is, what gap closed means, how noisy one seed is, where the
    rest is."""
    from nnssl.benchmark.gap import GAP_MIN_DENOMINATOR

    p = _preset()
    (_, base), (_, mine), (_, full) = demo_rows(rows, trainer)
    name = short_name(trainer)
    dice = {k: r.get("dice_mean") if r else None for k, r in (("base", base), ("mine", mine), ("full", full))}
    lines = [
        f"Labeled-only is nnU-Net trained on the {p.n_labeled} labeled slices alone; fully supervised is the same "
        f"nnU-Net trained on all {p.n_labeled + p.n_unlabeled} slices with their true labels, i.e. what labeling the "
        f"{p.n_unlabeled} unlabeled slices would give.",
    ]
    gap = mine.get("gap_closed") if mine else None
    if gap is not None and gap == gap:
        lines.append(
            f"Gap closed is the share of the difference between the two ({dice['base']:.3f} -> {dice['full']:.3f}) "
            f"that {name} recovers from the {p.n_unlabeled} unlabeled slices without their labels: 0 % = no better "
            f"than labeled-only, 100 % = as good as labeling everything, below 0 = worse than labeled-only; here "
            f"{_percent(gap)}.")
    elif None in dice.values():
        lines.append(f"Gap closed (the share of the difference between the two references that {name} recovers "
                     f"from unlabeled slices) is n/a here because a row failed; its log is in {work}.")
    else:
        lines.append(
            f"Gap closed (the share of the difference between the two references that {name} recovers from "
            f"unlabeled slices) is n/a here: the fully supervised model is not at least {GAP_MIN_DENOMINATOR} Dice "
            f"above labeled-only, so there is no gap to close (a schedule this short cannot use the labels).")
    lines += [
        f"This is one seed (one draw of the data and one initialisation), so it is noisy, as seeds move these "
        f"numbers by several Dice points; for a 95 % confidence interval over seeds run `{more_seeds_command}` (it "
        f"reuses this seed's rows).",
        f"The full tables (NSD, paired test, seconds per iteration, memory) are in {work / 'benchmark.md'} (and "
        f".csv, .json), the learning curves in {work}/learning_curves_*.png, the gap plot in "
        f"{work / 'benchmark_gap.png'}, the training logs in {work}/*.log.",
    ]
    return "\n".join(lines)


class _HideTable(io.TextIOBase):
    """Forwards whole lines to ``stream`` until the benchmark's own wide markdown table starts (``### ...``)."""

    def __init__(self, stream):
        self.stream, self.hiding, self.pending = stream, False, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.hiding = self.hiding or line.startswith("### ")
            if not self.hiding:
                self.stream.write(line + "\n")
                self.stream.flush()
        return len(text)


def _follow_training(work: Path, since: float, epochs: int, stream, stop: threading.Event) -> None:
    """Every fifth of the schedule, the epoch and the validation Dice of the row now training (from its log)."""
    step, seen = max(1, epochs // 5), {}
    while True:
        stopping = stop.wait(2.0)
        for log in sorted(work.glob("*.log"), key=lambda f: f.stat().st_mtime):
            if log.stat().st_mtime < since:
                continue
            text = log.read_text(errors="replace")
            done = len(re.findall(r": Epoch time:", text))
            dice = [re.sub(r"np\.float\d+\(|\)", "", line.split("Pseudo dice", 1)[1])
                    for line in text.splitlines() if "Pseudo dice" in line]
            for epoch in range(seen.get(log, 0) + 1, done + 1):
                if epoch % step and epoch != epochs:
                    continue
                values = [float(v) for v in re.findall(r"nan|-?\d+(?:\.\d+)?(?:e-?\d+)?", dice[epoch - 1])] \
                    if epoch <= len(dice) else []
                values = [v for v in values if v == v]
                val = f", validation Dice {sum(values) / len(values):.3f}" if values else ""
                stream.write(f"    epoch {epoch}/{epochs}{val}\n")
                stream.flush()
            seen[log] = done
        if stopping:
            return


@report_user_errors("nnssl_demo")
def main(argv: list[str] | None = None) -> None:
    p = _preset()
    parser = argparse.ArgumentParser(
        description=f"Does unlabeled data help? Trains nnU-Net on the {p.n_labeled} labeled slices of a synthetic "
                    f"cardiac MRI set, one semi-supervised trainer on them + {p.n_unlabeled} unlabeled slices, and "
                    f"nnU-Net with all {p.n_labeled + p.n_unlabeled} labels, then explains the Dice table "
                    f"(nnssl_benchmark --synthetic --preset {PRESET}). About 10 minutes on 2 CPU cores.")
    parser.add_argument("--work-dir", default="nnssl_demo_work",
                        help="output folder (default: ./nnssl_demo_work); a rerun reuses its finished rows")
    parser.add_argument("--overwrite", action="store_true", help="delete the work dir first and start over")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER,
                        help=f"the semi-supervised trainer (default: {DEFAULT_TRAINER}; any nnssl_benchmark "
                             f"trainer, e.g. nnUNetTrainerCPS)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: the preset's {p.epochs}")
    parser.add_argument("--iterations-per-epoch", type=int, default=None,
                        help=f"default: the preset's {p.iterations}")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: 0)")
    args = parser.parse_args(argv)

    import contextlib
    import shutil

    import torch

    from nnssl.benchmark.cli import BASELINE, FULL_REFERENCE
    from nnssl.benchmark.cli import main as benchmark

    if args.trainer in (BASELINE, FULL_REFERENCE):
        parser.error(f"--trainer: choose a semi-supervised trainer; {BASELINE} and {FULL_REFERENCE} always run")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    epochs, iterations = args.epochs or p.epochs, args.iterations_per_epoch or p.iterations
    work = Path(args.work_dir).resolve()
    written_by_demo = (work / "benchmark.json").is_file() or (work / "rows").is_dir()
    if work.exists() and any(work.iterdir()) and not written_by_demo:
        # only a folder the demo (the benchmark) wrote is reused or deleted, never a user's own folder
        raise InputError(f"--work-dir {work} exists and is not a folder nnssl_demo wrote (no benchmark.json or rows/); "
                         "choose another --work-dir")
    if args.overwrite and work.exists():
        shutil.rmtree(work)
    reuse = work.exists()
    work.mkdir(parents=True, exist_ok=True)

    schedule = [*(["--epochs", str(args.epochs)] if args.epochs else []),
                *(["--iterations", str(args.iterations_per_epoch)] if args.iterations_per_epoch else [])]
    bench = ["--synthetic", "--preset", PRESET, "--seeds", str(args.seed), "-o", str(work), "-device", device,
             "--trainers", BASELINE, args.trainer, *schedule]
    cost = f"; about {estimated_cpu_minutes(epochs, iterations):.0f} minutes on 2 idle CPU cores" \
        if device == "cpu" else ""
    print(f"nnssl_demo: {p.description}; 3 models ({short_name(BASELINE)} = labeled-only, "
          f"{short_name(args.trainer)}, {FULL_REFERENCE}), {epochs} epochs x {iterations} iterations each, on "
          f"{device}{cost}.\nnnssl_demo: the same as `nnssl_benchmark {' '.join(bench)}`; everything goes to {work}"
          + (" (finished rows are reused; --overwrite starts over)" if reuse else ""))
    if epochs * iterations < p.epochs * p.iterations:
        print(f"nnssl_demo: note: the preset converges in {p.epochs} x {p.iterations} iterations; numbers from a "
              f"shorter schedule say little")

    start = time.time()
    stop = threading.Event()
    follower = threading.Thread(target=_follow_training, args=(work, start, epochs, sys.stdout, stop), daemon=True)
    follower.start()
    try:
        with contextlib.redirect_stdout(_HideTable(sys.stdout)):
            benchmark(bench)
    finally:
        stop.set()
        follower.join()

    rows = json.loads((work / "benchmark.json").read_text(encoding="utf-8"))["rows"]
    seeds = " ".join(map(str, sorted({args.seed, 0, 1, 2})))
    more = f"nnssl_benchmark {' '.join(bench).replace(f'--seeds {args.seed}', f'--seeds {seeds}')}"
    print(f"\nDice (overlap of the predicted and the true structure: 0 = none, 1 = perfect) on the {p.n_test} test "
          f"slices; seed {args.seed}, {epochs} epochs x {iterations} iterations per model; this run took "
          f"{time.time() - start:.0f} s.\n")
    print(format_dice_table(rows, args.trainer))
    print()
    print(explanation(rows, args.trainer, work, more))


if __name__ == "__main__":
    main(sys.argv[1:])
