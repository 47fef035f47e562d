"""``nnssl_benchmark``: trainers side by side on one dataset, configuration, fold and schedule.

For every trainer: ``nnUNetv2_train`` and then ``nnUNetv2_predict`` on the test set (both through
:mod:`nnssl.benchmark.launch`, in one process, which records the training's peak memory) and the nnssl evaluation
(Dice, NSD). Writes ``benchmark.md``, ``benchmark.csv``, ``benchmark.json`` and ``benchmark.png`` with per-class
Dice and NSD, their means, the gain over the supervised baseline, seconds per training iteration and peak memory
relative to the baseline, and the wall seconds of each row.

The baseline is ``nnUNetTrainerSupervised``: nnU-Net's ``nnUNetTrainer`` unchanged except that it honours the
``NNSSL_*`` schedule variables, so every row trains on the same labeled cases for the same number of iterations.

``nnUNetTrainerPseudoLabelFinetune`` (and its variants) is a two-stage row, the FLARE22 recipe chained with the
same commands a user runs: the baseline's model of this benchmark is stage 1; ``nnssl_pseudolabel ... --preprocess``
writes the pseudo-labeled dataset (a free dataset id, or ``--pl-dataset-id``; reruns reuse the id this benchmark
made, recorded in ``pseudolabel_datasets.json``); ``nnUNetv2_train`` fine-tunes with ``-pretrained_weights`` for
the same schedule as every other row (so stage 1 + 2 train twice as many iterations); the test set is the source's.
Its seconds per iteration and memory are the fine-tuning stage's; the pseudo-labeling time, the number of selected
cases and their Dice against withheld labels are in the row's notes.

``--synthetic`` generates a class-imbalanced 3D multi-organ set (few labeled, many unlabeled with withheld labels,
a labeled test set) and a 2D ultrasound-like set, and runs every seed in ``--seeds`` (default: seed 0) with the CPU
presets of ``SYNTHETIC_SCHEDULES``, predicting without mirroring; ``--smoke`` shrinks everything to seconds (used by
the test suite).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnssl.errors import InputError, report_user_errors

BASELINE = "nnUNetTrainerSupervised"
SSL_TRAINERS = (
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerCPS",
    "nnUNetTrainerGuidedNet",
    "nnUNetTrainerGuidedNet_FittedGMM",
    "nnUNetTrainerSDCL",
    "nnUNetTrainerDHC",
    "nnUNetTrainerMGCC",
    "nnUNetTrainerPseudoLabelFinetune",
)
PSEUDO_LABEL_TRAINER = "nnUNetTrainerPseudoLabelFinetune"
PSEUDO_LABEL_REGISTRY = "pseudolabel_datasets.json"
# The FLARE22 rule (every organ >= 2000 voxels) is meant for CT volumes of ~10^7 voxels. On the synthetic 3D set
# (adrenal 4-12 voxels) a stage-1 model trained for the CPU preset never predicts the adrenal, so any positive
# threshold selects no case (measured at 1.5x voxel size: 0 of 16 at 20 voxels); the synthetic preset keeps every case.
SYNTHETIC_PL_MIN_VOXELS = 0
# The synthetic 3D set is sampled at 1.75x the default voxel size (18x27x27 voxels, patch 18x28x28) so that every
# trainer fits the CPU time budget: at 1.5x (21x32x32, patch 24x32x32) the 3D half of one seed took 16 min on 2
# cores, its training iterations 11 min; 1.75x halves the seconds per iteration of the two-network trainers (CPS
# 0.365 -> 0.153 in one run), and one seed of both sets takes about 18 min.
# Per synthetic set unless --epochs / --iterations / --lr are given: (epochs, iterations per epoch, initial lr of
# the trainers on nnU-Net's SGD). With nnU-Net's lr 0.01 the narrow CPU network predicts only background for the
# first ~250 3D iterations; at 0.05 the liver appears after 120-200 (measured, seed 0; when is random: one
# baseline run was still all-background after 160).
SYNTHETIC_3D_VOXEL_SCALE = 1.75
SYNTHETIC_SCHEDULES = {"3d_fullres": (5, 40, 0.05), "2d": (4, 50, None)}


@dataclass
class RunResult:
    trainer: str
    dataset: str
    seed: int
    dice: dict[str, float] = field(default_factory=dict)
    nsd: dict[str, float] = field(default_factory=dict)
    seconds_per_iteration: float = float("nan")
    max_rss_mb: float = float("nan")
    cuda_max_allocated_mb: float | None = None
    error: str | None = None
    notes: str | None = None
    schedule: str | None = None  # "E epochs x I iterations"
    wall_seconds: float = float("nan")  # the whole row: pseudo-labeling stage, training, prediction, evaluation


def check_trainers(names: list[str]) -> list[str]:
    """``names`` if nnU-Net resolves every one (its own trainers and, via nnUNet_extTrainer, nnssl's); otherwise
    an :class:`InputError` naming the unknown ones, raised before anything runs or is written."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    unknown = []
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search module by module
                recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            unknown.append(name)
    if unknown:
        raise InputError(f"--trainers: unknown trainer(s) {', '.join(unknown)}; nnssl trainers: "
                         f"{', '.join((BASELINE, *SSL_TRAINERS))} (variants: see the README; nnssl_doctor lists all)")
    return list(names)


def check_planned_dataset(dataset_id: int, configuration: str, env: dict[str, str]) -> None:
    """The nnU-Net folders are set and dataset ``dataset_id`` is planned for ``configuration``; else an
    :class:`InputError` that says what to run."""
    missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not env.get(k)]
    if missing:
        raise InputError(f"-d {dataset_id}: the environment variable(s) {', '.join(missing)} are not set")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset_id)  # nnU-Net's "could not find a dataset" is a user error
    plans = Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans.json"
    if not plans.is_file():
        raise InputError(f"-d {dataset_id}: {plans} not found; run nnssl_plan_and_preprocess -d {dataset_id} "
                         f"-c {configuration} first")
    if configuration not in json.loads(plans.read_text()).get("configurations", {}):
        raise InputError(f"-c {configuration}: not a configuration of {plans}")


def seconds_per_iteration(log_text: str) -> float:
    """Median of the per-epoch ``train seconds/iteration`` lines; the first epoch (warm-up) is dropped when
    there are more."""
    values = [float(v) for v in re.findall(r"train seconds/iteration: ([0-9.]+)", log_text)]
    if len(values) > 1:
        values = values[1:]
    return float(np.median(values)) if values else float("nan")


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc} (log {log}):\n{tail}")


def is_pseudo_label_row(trainer: str) -> bool:
    return trainer.startswith(PSEUDO_LABEL_TRAINER)


@dataclass
class PseudoLabelRound:
    """How the two-stage pseudo-label row makes its dataset: the new id and the selection rule."""

    new_dataset_id: int
    min_voxels: int


def _train_and_predict(trainer: str, dataset_id: int, raw: Path, configuration: str, fold: str,
                       env: dict[str, str], out: Path, device: str, tag: str, result: RunResult,
                       disable_tta: bool = False, train_args: tuple[str, ...] = ()) -> Path:
    """``nnUNetv2_train`` on ``dataset_id``, then ``nnUNetv2_predict`` of ``raw``'s imagesTs with that model, both
    through :mod:`nnssl.benchmark.launch` in one process; fills the cost fields of ``result`` (training only) and
    returns the prediction folder. The log of both is ``{tag}.log``."""
    mem_file = out / f"{tag}_memory.json"
    log = out / f"{tag}.log"
    pred = out / "predictions" / tag
    tta = ["--disable_tta"] if disable_tta else []
    # on a CPU, nnU-Net's sequential mode (no worker processes, which cost more than a small test set's inference)
    workers = "0" if device == "cpu" else "1"
    from nnssl.benchmark.launch import THEN

    _run([sys.executable, "-m", "nnssl.benchmark.launch", str(mem_file),
          "nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-device", device, *train_args,
          THEN, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(dataset_id), "-c",
          configuration, "-f", fold, "-tr", trainer, "-device", device, "-npp", workers, "-nps", workers, *tta],
         env, log)
    memory = json.loads(mem_file.read_text())
    result.max_rss_mb = memory["max_rss_mb"]
    result.cuda_max_allocated_mb = memory["cuda_max_allocated_mb"]
    result.seconds_per_iteration = seconds_per_iteration(log.read_text())
    return pred


def _evaluate(pred: Path, raw: Path, result: RunResult) -> None:
    """Score the predictions against ``raw``'s labelsTs (per-class mean Dice and NSD into ``result``)."""
    from nnssl.evaluation.evaluate import evaluate_folders

    dataset_json = json.loads((raw / "dataset.json").read_text())
    summary = evaluate_folders(pred, raw / "labelsTs", dataset_json["labels"],
                               file_ending=dataset_json["file_ending"], progress=False)
    result.dice = {n: s["dice"]["mean"] for n, s in summary["per_class"].items()}
    result.nsd = {n: s["nsd"]["mean"] for n, s in summary["per_class"].items()}


def _pseudo_label_stage(dataset_id: int, configuration: str, fold: str, env: dict[str, str], out: Path,
                        device: str, tag: str, round_: PseudoLabelRound) -> tuple[Path, str]:
    """Stage 1 -> pseudo-labeled dataset: ``nnssl_pseudolabel`` with the baseline's model of this benchmark.

    Returns the stage-1 checkpoint and a note (selected cases, their Dice against withheld labels, seconds)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    stage1 = (Path(env["nnUNet_results"]) / maybe_convert_to_dataset_name(dataset_id)
              / f"{BASELINE}__nnUNetPlans__{configuration}" / f"fold_{fold}" / "checkpoint_final.pth")
    if not stage1.is_file():
        raise RuntimeError(f"stage 1 of the pseudo-label row is the {BASELINE} model, and {stage1} does not exist: "
                           f"run {BASELINE} first (nnssl_benchmark puts it first in --trainers)")
    start = time.time()
    _run(["nnssl_pseudolabel", "-d", str(dataset_id), "-c", configuration, "-f", fold, "-tr", BASELINE,
          "-o", str(round_.new_dataset_id), "--min-voxels", str(round_.min_voxels), "--preprocess", "--overwrite",
          "-device", device, "-npp", "1", "-nps", "1", "--no-progress"], env, out / f"{tag}_pseudolabel.log")
    seconds = time.time() - start
    from nnssl.pseudolabel.dataset import REPORT_JSON

    new_raw = Path(env["nnUNet_raw"]) / maybe_convert_to_dataset_name(round_.new_dataset_id)
    report = json.loads((new_raw / REPORT_JSON).read_text())
    # per selected case, the mean over classes of its pseudo-label Dice (None: class absent from both)
    dice = [np.mean(values) for c in report["cases"] if c["selected"]
            if (values := [d for d in c.get("dice_vs_withheld_label", {}).values() if d is not None])]
    note = (f"stage 1 = the {BASELINE} row; {report['num_selected']} of {report['num_predicted']} unlabeled cases "
            f"selected (every class >= {round_.min_voxels} voxels)")
    if dice:
        note += f", their mean pseudo-label Dice vs withheld labels {np.mean(dice):.3f}"
    note += f"; pseudo-labeling + preprocessing {seconds:.0f} s; stage 2 trains the same schedule as every row"
    return stage1, note


def run_trainer(trainer: str, dataset_id: int, configuration: str, fold: str, env: dict[str, str], out: Path,
                device: str, seed: int, pseudo_label_round: PseudoLabelRound | None = None,
                disable_tta: bool = False) -> RunResult:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    dataset = maybe_convert_to_dataset_name(dataset_id)
    raw = Path(env["nnUNet_raw"]) / dataset
    result = RunResult(trainer, dataset, seed, schedule=schedule_text(env))
    tag = f"{dataset}_{configuration}_{trainer}_seed{seed}"
    start = time.time()
    try:
        if is_pseudo_label_row(trainer):
            if pseudo_label_round is None:
                raise ValueError(f"{trainer} needs a pseudo-label round (new dataset id, selection rule)")
            stage1, result.notes = _pseudo_label_stage(dataset_id, configuration, fold, env, out, device, tag,
                                                       pseudo_label_round)
            # stage 2 trains on the pseudo-labeled dataset and predicts the source's test set
            pred = _train_and_predict(trainer, pseudo_label_round.new_dataset_id, raw, configuration, fold, env, out,
                                      device, tag, result, disable_tta, ("-pretrained_weights", str(stage1)))
        else:
            pred = _train_and_predict(trainer, dataset_id, raw, configuration, fold, env, out, device, tag, result,
                                      disable_tta)
        _evaluate(pred, raw, result)
    except Exception as e:  # one failing trainer must not lose the others' rows
        result.error = str(e).splitlines()[0][:300]
        print(f"nnssl_benchmark: {trainer} on {dataset} failed: {e}", file=sys.stderr)
    result.wall_seconds = time.time() - start
    return result


def pseudo_label_dataset_id(out: Path, source_id: int, configuration: str, fold: str, env: dict[str, str],
                            requested: int | None) -> int:
    """The id of the pseudo-labeled dataset made from ``source_id``: ``requested``, else the one an earlier run
    of this benchmark (same output folder) made, else the highest id in 900..999 that no dataset uses.

    The dataset is replaced on every run (``--overwrite``), so an id that this benchmark did not make itself is
    only used when the user asked for it."""
    from nnssl.io import atomic_write_json

    registry_file = out / PSEUDO_LABEL_REGISTRY
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else {}
    key = f"{env['nnUNet_raw']}|{source_id}|{configuration}|{fold}"
    if requested is not None:
        new_id = requested
    elif key in registry:
        new_id = registry[key]
    else:
        used = {int(m.group(1)) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                if Path(env[k]).is_dir() for p in Path(env[k]).iterdir() if (m := re.match(r"Dataset(\d{3})_", p.name))}
        used |= set(registry.values())
        free = [i for i in range(999, 899, -1) if i not in used and i != source_id]
        if not free:
            raise SystemExit("nnssl_benchmark: no free dataset id in 900..999 for the pseudo-labeled dataset; "
                             "pass --pl-dataset-id")
        new_id = free[0]
    if new_id == source_id:
        raise SystemExit(f"nnssl_benchmark: --pl-dataset-id {new_id} is the source dataset")
    registry[key] = new_id
    atomic_write_json(registry_file, registry)
    return new_id


def predict_with_mirroring(tta: bool | None, synthetic: bool) -> bool:
    """Whether the test set is predicted with nnU-Net's mirroring: as asked (``--tta`` / ``--disable-tta``), else
    nnU-Net's default (on) for a real dataset and off for the synthetic CPU presets.

    Mirroring multiplies 3D inference by 8; on the CPU presets that is minutes of the time budget, the same for every
    row, and the comparison of the trainers does not need it."""
    return tta if tta is not None else not synthetic


def schedule_env(epochs: int | None, iterations: int | None, val_iterations: int | None,
                 initial_lr: float | None = None) -> dict[str, str]:
    """The ``NNSSL_*`` schedule variables for the given values (None: the trainer's own)."""
    from nnssl_trainers.base import ENV_INITIAL_LR, ENV_ITERATIONS, ENV_NUM_EPOCHS, ENV_VAL_ITERATIONS

    values = {ENV_NUM_EPOCHS: epochs, ENV_ITERATIONS: iterations, ENV_VAL_ITERATIONS: val_iterations,
              ENV_INITIAL_LR: initial_lr}
    return {k: str(v) for k, v in values.items() if v is not None}


def schedule_text(env: dict[str, str]) -> str:
    from nnssl_trainers.base import ENV_INITIAL_LR, ENV_ITERATIONS, ENV_NUM_EPOCHS

    epochs, iterations = env.get(ENV_NUM_EPOCHS, "trainer's"), env.get(ENV_ITERATIONS, "trainer's")
    lr = f", SGD lr {env[ENV_INITIAL_LR]}" if env.get(ENV_INITIAL_LR) else ""
    return f"{epochs} epochs x {iterations} iterations{lr}"


def _mean(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(results: list[RunResult]) -> list[dict]:
    """One row per (dataset, trainer): means over seeds, and over seeds the spread (max - min) of mean Dice."""
    rows = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        runs = [r for r in results if r.dataset == dataset]
        base = [r for r in runs if r.trainer == BASELINE and r.error is None]
        base_dice = np.mean([_mean(r.dice) for r in base]) if base else float("nan")
        base_sec = np.mean([r.seconds_per_iteration for r in base]) if base else float("nan")
        base_mem = np.mean([r.cuda_max_allocated_mb if r.cuda_max_allocated_mb is not None else r.max_rss_mb
                            for r in base]) if base else float("nan")
        for trainer in dict.fromkeys(r.trainer for r in runs):
            mine = [r for r in runs if r.trainer == trainer]
            ok = [r for r in mine if r.error is None]
            row: dict = {"dataset": dataset, "trainer": trainer, "seeds": len(mine), "failed": len(mine) - len(ok),
                         "schedule": mine[0].schedule}
            notes = [f"seed {r.seed}: {r.notes}" if len(mine) > 1 else r.notes for r in mine if r.notes]
            if notes:
                row["notes"] = " | ".join(notes)
            if ok:
                classes = list(ok[0].dice)
                for c in classes:
                    row[f"dice_{c}"] = float(np.mean([r.dice[c] for r in ok]))
                    row[f"nsd_{c}"] = float(np.mean([r.nsd[c] for r in ok]))
                means = [_mean(r.dice) for r in ok]
                row["dice_mean"] = float(np.mean(means))
                row["dice_seed_spread"] = float(np.max(means) - np.min(means)) if len(means) > 1 else 0.0
                row["nsd_mean"] = float(np.mean([_mean(r.nsd) for r in ok]))
                row["gain_vs_supervised"] = row["dice_mean"] - base_dice
                row["sec_per_iter"] = float(np.mean([r.seconds_per_iteration for r in ok]))
                row["time_rel"] = row["sec_per_iter"] / base_sec
                row["max_rss_mb"] = float(np.mean([r.max_rss_mb for r in ok]))
                cuda = [r.cuda_max_allocated_mb for r in ok if r.cuda_max_allocated_mb is not None]
                row["cuda_max_allocated_mb"] = float(np.mean(cuda)) if cuda else None
                # on CUDA the GPU memory is what limits patch and batch size; on CPU the process RSS
                row["peak_mb"] = row["cuda_max_allocated_mb"] if cuda else row["max_rss_mb"]
                row["memory_rel"] = row["peak_mb"] / base_mem
                row["wall_seconds"] = float(np.mean([r.wall_seconds for r in ok]))
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        classes = [k[5:] for k in ds_rows[0] if k.startswith("dice_") and k not in ("dice_mean", "dice_seed_spread")]
        for r in ds_rows[1:]:
            classes += [k[5:] for k in r if k.startswith("dice_") and k[5:] not in classes
                        and k not in ("dice_mean", "dice_seed_spread")]
        head = ["trainer", *[f"Dice {c}" for c in classes], "Dice mean", "NSD mean", "gain", "seed spread",
                "s/iter", "time ×", "peak MB (GPU if CUDA, else RSS)", "mem ×", "row wall s"]
        schedules = sorted({r["schedule"] for r in ds_rows if r.get("schedule")})
        title = f"### {dataset}" + (f" ({', '.join(schedules)} per trainer)" if schedules else "")
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def f(v, fmt="{:.3f}"):
            return "n/a" if v is None or v != v else fmt.format(v)

        for r in ds_rows:
            if "dice_mean" not in r:
                lines.append(f"| {r['trainer']} | failed |" + " |" * (len(head) - 2))
                continue
            cells = [r["trainer"], *[f(r.get(f"dice_{c}")) for c in classes], f(r["dice_mean"]), f(r["nsd_mean"]),
                     f(r["gain_vs_supervised"], "{:+.3f}"), f(r["dice_seed_spread"]), f(r["sec_per_iter"]),
                     f(r["time_rel"], "{:.2f}"), f(r["peak_mb"], "{:.0f}"), f(r["memory_rel"], "{:.2f}"),
                     f(r.get("wall_seconds"), "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {r['trainer']}: {r['notes']}" for r in ds_rows if r.get("notes")]
        lines.append("")
    return "\n".join(lines)


def bar_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        ds_rows = [r for r in rows if r["dataset"] == dataset and "dice_mean" in r]
        names = [r["trainer"].replace("nnUNetTrainer", "") or "nnUNetTrainer" for r in ds_rows]
        ax.bar(names, [r["dice_mean"] for r in ds_rows],
               yerr=[r["dice_seed_spread"] / 2 for r in ds_rows], capsize=3)
        ax.set_title(dataset)
        ax.set_ylabel("mean foreground Dice")
        # right-aligned and anchored, so that long trainer names end under their own bar
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: list[RunResult], out: Path) -> list[dict]:
    from nnssl.io import atomic_write_json, atomic_write_text

    rows = summarize(results)
    atomic_write_json(out / "benchmark.json", {"runs": [r.__dict__ for r in results], "rows": rows})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = out / ".benchmark.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "benchmark.csv")
    atomic_write_text(out / "benchmark.md", markdown_table(rows))
    bar_plot(rows, out / "benchmark.png")
    return rows


def _synthetic_datasets(root: Path, seed: int, smoke: bool) -> list[tuple[int, str]]:
    """(dataset id, configuration) of the generated 3D and 2D sets for this seed, planned and preprocessed."""
    from nnssl.plans_tools import shrink_network
    from nnssl.synthetic import make_synthetic_dataset

    made = []
    # the same ids for every seed (each seed has its own nnUNet_raw), so the rows of the seeds average together
    specs = [(960, "3d", "3d_fullres", 4, 16, 6), (961, "2d", "2d", 6, 24, 10)]
    if smoke:
        specs = [(960, "3d", "3d_fullres", 5, 3, 1)]
    for dataset_id, kind, configuration, n_l, n_u, n_t in specs:
        raw = make_synthetic_dataset(root / "nnUNet_raw", dataset_id, kind, n_labeled=n_l, n_unlabeled=n_u,
                                     n_test=n_t, seed=seed, overwrite=True,
                                     voxel_scale=SYNTHETIC_3D_VOXEL_SCALE if kind == "3d" else 1.0)
        env = {**os.environ, "nnUNet_raw": str(root / "nnUNet_raw"),
               "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"), "nnUNet_n_proc_DA": "2"}
        _run(["nnssl_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2"], env,
             root / f"plan_{dataset_id}.log")
        shrink_network(root / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json")
        made.append((dataset_id, configuration))
    return made


@report_user_errors("nnssl_benchmark")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark nnssl trainers against supervised nnU-Net.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", type=int, help="dataset id (planned with nnssl_plan_and_preprocess)")
    src.add_argument("--synthetic", action="store_true", help="generate the synthetic 3D and 2D sets")
    parser.add_argument("-c", default="3d_fullres", help="configuration (with -d)")
    parser.add_argument("-f", default="all", help="fold (default: all labeled cases)")
    parser.add_argument("--trainers", nargs="+", default=None,
                        help=f"default: {BASELINE} and every nnssl trainer")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per epoch")
    parser.add_argument("--lr", type=float, default=None,
                        help="initial lr of the trainers on nnU-Net's SGD (NNSSL_INITIAL_LR; default: nnU-Net's 0.01, "
                             "the synthetic 3D set 0.05); the pseudo-label fine-tuning keeps its Adam 5e-5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="synthetic data seeds")
    parser.add_argument("-o", "--output", default="nnssl_benchmark", help="output folder")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: tiny data and schedule")
    parser.add_argument("--pl-dataset-id", type=int, default=None,
                        help="id of the pseudo-labeled dataset of the nnUNetTrainerPseudoLabelFinetune row (with -d; "
                             "replaced on every run; default: a free id in 900..999, reused on reruns)")
    parser.add_argument("--pl-min-voxels", type=int, default=None,
                        help=f"nnssl_pseudolabel --min-voxels of that row (default: 2000 as FLARE22 with -d, "
                             f"{SYNTHETIC_PL_MIN_VOXELS} on the synthetic sets)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--disable-tta", dest="tta", action="store_false", default=None,
                     help="predict the test set without mirroring (nnUNetv2_predict --disable_tta; default with "
                          "--synthetic)")
    tta.add_argument("--tta", dest="tta", action="store_true",
                     help="predict the test set with nnU-Net's mirroring (default with -d)")
    args = parser.parse_args(argv)
    if args.synthetic and args.pl_dataset_id is not None:
        parser.error("--pl-dataset-id is for -d; the synthetic sets use 962 (3D) and 963 (2D)")

    import torch

    from nnssl.cli.trainer_path import trainer_folder
    from nnssl_trainers.base import ENV_SKIP_FINAL_VALIDATION

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder(), "PYTHONUNBUFFERED": "1",
           ENV_SKIP_FINAL_VALIDATION: "1"}
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    trainers = args.trainers or ([BASELINE, "nnUNetTrainerMeanTeacher"] if args.smoke else [BASELINE, *SSL_TRAINERS])
    # every check that can fail on user input runs before the output folder is made
    trainers = check_trainers(trainers)
    if not args.synthetic:
        check_planned_dataset(args.d, args.c, env)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(is_pseudo_label_row(t) for t in trainers) and BASELINE not in trainers:
        print(f"nnssl_benchmark: the pseudo-label row fine-tunes the {BASELINE} model, so {BASELINE} runs too")
    if BASELINE in trainers or any(is_pseudo_label_row(t) for t in trainers):
        # the baseline first: every row's gain is relative to it, and it is stage 1 of the pseudo-label row
        trainers = [BASELINE, *[t for t in trainers if t != BASELINE]]
    min_voxels = args.pl_min_voxels if args.pl_min_voxels is not None else (
        SYNTHETIC_PL_MIN_VOXELS if args.synthetic else 2000)
    disable_tta = not predict_with_mirroring(args.tta, args.synthetic)
    start = time.time()
    results: list[RunResult] = []
    if args.synthetic:
        for seed in args.seeds:
            root = out / f"data_seed{seed}"
            env_seed = {**env, "nnUNet_raw": str(root / "nnUNet_raw"),
                        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
                        "nnUNet_results": str(root / "nnUNet_results")}
            for dataset_id, configuration in _synthetic_datasets(root, seed, args.smoke):
                # the generated sets are 960 (3D) and 961 (2D): their pseudo-labeled datasets are 962 and 963
                pl_round = PseudoLabelRound(dataset_id + 2, min_voxels)
                epochs, iterations, lr = (1, 2, None) if args.smoke else SYNTHETIC_SCHEDULES[configuration]
                env_run = {**env_seed, **schedule_env(args.epochs or epochs, args.iterations or iterations,
                                                      1 if args.smoke else 2, args.lr or lr)}
                for trainer in trainers:
                    print(f"[{time.time() - start:.0f} s] seed {seed} dataset {dataset_id} {configuration}: {trainer}")
                    results.append(run_trainer(trainer, dataset_id, configuration, args.f, env_run, out, device,
                                               seed, pl_round, disable_tta))
                    write_outputs(results, out)
    else:
        if args.smoke:
            env.update(schedule_env(args.epochs or 1, args.iterations or 2, 1, args.lr))
        else:  # the trainers' own schedules (nnU-Net's 1000 x 250; 40 epochs of fine-tuning) unless given
            env.update(schedule_env(args.epochs, args.iterations, None, args.lr))
        pl_round = None
        if any(is_pseudo_label_row(t) for t in trainers):
            pl_round = PseudoLabelRound(pseudo_label_dataset_id(out, args.d, args.c, args.f, env, args.pl_dataset_id),
                                        min_voxels)
            print(f"nnssl_benchmark: the pseudo-labeled dataset of {PSEUDO_LABEL_TRAINER} is {pl_round.new_dataset_id}")
        for trainer in trainers:
            print(f"[{time.time() - start:.0f} s] dataset {args.d} {args.c}: {trainer}")
            results.append(run_trainer(trainer, args.d, args.c, args.f, env, out, device, 0, pl_round,
                                       disable_tta))
            write_outputs(results, out)
    rows = write_outputs(results, out)
    print(markdown_table(rows))
    print(f"on {device}: {time.time() - start:.0f} s in all; tables in {out}")


if __name__ == "__main__":
    main()
