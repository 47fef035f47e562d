"""``nnssl_benchmark``: trainers side by side on one dataset, configuration, fold and schedule.

For every trainer: ``nnUNetv2_train`` and then ``nnUNetv2_predict`` on the test set (both through
:mod:`nnssl.benchmark.launch`, in one process, which records the training's peak memory) and the nnssl evaluation
(Dice, NSD). Writes ``benchmark.md``, ``benchmark.csv``, ``benchmark.json``, ``benchmark.png`` and
``benchmark_gap.png`` with per-class Dice and NSD, their means, the gain over the supervised baseline, the gap closed,
seconds per training iteration and peak memory relative to the baseline, and the wall seconds of each row.

The baseline is ``nnUNetTrainerSupervised``: nnU-Net's ``nnUNetTrainer`` unchanged except that it honours the
``NNSSL_*`` schedule variables, so every row trains on the same labeled cases for the same number of iterations.

``nnUNetTrainerPseudoLabelFinetune`` (and its variants) is a two-stage row, the FLARE22 recipe chained with the
same commands a user runs: the baseline's model of this benchmark is stage 1; ``nnssl_pseudolabel ... --preprocess``
writes the pseudo-labeled dataset (a free dataset id, or ``--pl-dataset-id``; reruns reuse the id this benchmark
made, recorded in ``pseudolabel_datasets.json``); ``nnUNetv2_train`` fine-tunes with ``-pretrained_weights`` for
the same schedule as every other row (so stage 1 + 2 train twice as many iterations); the test set is the source's.
Its seconds per iteration and memory are the fine-tuning stage's; the pseudo-labeling time, the number of selected
cases and their Dice against withheld labels are in the row's notes.

``FullySupervised`` is the fully supervised reference: when the raw dataset has withheld labels (``labelsUnlabeled``
for every unlabeled case of ``ssl_split.json``), ``nnssl.benchmark.full_reference`` writes a dataset of the labeled
and the unlabeled cases with their true labels (a free id in 900..999 recorded in ``full_reference_datasets.json``;
964 / 965 for the synthetic sets), plans it with the source's plans (same network, patch and normalisation) and the
baseline trains on it with the same schedule and predicts the source's test set. Only that dataset reads the
withheld labels. Without them the row is skipped and the table says why (``--no-full-reference`` skips it anyway).
With both references every row gets its gap closed, ``(Dice - Dice labeled-only) / (Dice full - Dice labeled-only)``
per seed, as a mean with a 95 % t-interval over seeds, and a Wilcoxon signed-rank test of its per-case Dice against
labeled-only (:mod:`nnssl.benchmark.gap`); ``benchmark_gap.png`` plots it.

Every finished row (dataset x trainer x seed) is saved under ``rows/`` with a key of its data, ``NNSSL_*`` schedule
and options (:mod:`nnssl.benchmark.resume`): a rerun with the same output folder reuses those rows and computes only
the missing or failed ones, so a killed run loses at most the row it was running.

``--budget iterations|time|both`` (:mod:`nnssl.benchmark.budget`): ``iterations`` (default) gives every row the same
schedule; ``time`` gives every SSL row the wall-clock training time of the labeled-only reference on that schedule:
a short speed calibration (each trainer 3 epochs of 10 iterations, saved under ``calibration/`` and reused on
rerun) gives the ratio of seconds per iteration, and the row's iterations per epoch are the schedule's times that
ratio (rounded down, at least 1, at most the schedule; the epochs stay, so the lr decay and the SSL ramps keep their
shape). The factor is in the row (``time_scale``, notes). ``both`` runs both: the equal-time rows are labeled
``X @ equal time`` in benchmark.md, have ``budget`` = ``time`` in benchmark.csv/json (the references, the same rows
under both budgets: ``both``) and are paired with the equal-iteration bars in benchmark_gap.png. The pseudo-label row
is not run under equal time: its stage 1 is the labeled-only run and uses the whole budget (see the budget module).
Time-budget rows are saved under ``rows/`` with the budget and their scaled schedule in the key.

``--reference-repeats R`` trains the labeled-only reference R times per seed (rows ``BASELINE#2`` ... ``BASELINE#R``,
training seed ``seed + 1000 (k - 1)``, models under ``nnUNet_results/reference_repeat<k>``); the tables merge them
into one reference row per seed, their per-test-case mean (:func:`merge_reference_repeats`).

``--synthetic`` generates the datasets of ``--preset`` (:mod:`nnssl.benchmark.presets`; default: the converged
label-efficiency preset ``cardiac2d``) and runs every seed in ``--seeds`` (default: seed 0) with the preset's CPU
schedule, predicting without mirroring; ``--smoke`` shrinks everything to seconds (used by the test suite). Every row
that trained on a fold with validation cases keeps nnU-Net's per-epoch validation Dice; ``learning_curves_*.png``
plots them per dataset and seed, and benchmark.md says whether the fully supervised reference plateaued and how far
labeled-only stays below it (:mod:`nnssl.benchmark.curves`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
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

from nnssl.benchmark.budget import BUDGETS, CALIBRATION_SCHEDULE, ITERATIONS, SMOKE_CALIBRATION_SCHEDULE, budgets_of
from nnssl.benchmark.ensemble import ensemble_base
from nnssl.benchmark.full_reference import missing_withheld_labels
from nnssl.benchmark.generated import GenerationSettings, note_for, split_row_name
from nnssl.benchmark.presets import (
    DEFAULT_PRESETS,
    FULL_OFFSET,
    GENERATED_BOTH_OFFSET,
    GENERATED_ONLY_OFFSET,
    PL_OFFSET,
    PRESETS,
    SMOKE_PRESET,
    SyntheticPreset,
)
from nnssl.benchmark.runs import finished_fold, fold_folder
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
    "nnUNetTrainerWeakStrongMT",  # nnssl's own combination (docs/methods/weak_strong.md)
    # DHC's method zoo (xmed-lab/DHC train_<method>.py)
    "nnUNetTrainerUAMT",
    "nnUNetTrainerURPC",
    "nnUNetTrainerSSNet",
    "nnUNetTrainerDST",
    "nnUNetTrainerDePL",
    "nnUNetTrainerAdsh",
    "nnUNetTrainerCReST",
    "nnUNetTrainerSimiS",
    "nnUNetTrainerCLD",
    "nnUNetTrainerBasak",
)
PSEUDO_LABEL_TRAINER = "nnUNetTrainerPseudoLabelFinetune"
PSEUDO_LABEL_REGISTRY = "pseudolabel_datasets.json"
# the fully supervised reference: BASELINE trained on the labeled + unlabeled cases with their withheld labels
FULL_REFERENCE = "FullySupervised"
FULL_REFERENCE_REGISTRY = "full_reference_datasets.json"
# --reference-repeats R: the labeled-only reference trained R times per seed (same data, other initialisation and
# sampling), its rows BASELINE, BASELINE#2, ..., BASELINE#R, averaged per test case into the one reference every gain,
# gap and paired test is measured against. One nnU-Net training of 2-3 labeled cases moves by as much as the effects
# measured (seed 0 of cardiac2d: 0.703 / 0.596 / 0.608 in three trainings of the same row).
REPEAT_SEP = "#"
REPEAT_RESULTS = "reference_repeat"  # nnUNet_results/reference_repeat<k>: the k-th training's model
REPEAT_SEED_STRIDE = 1000  # training seed of the k-th training: seed + 1000 (k - 1); the first keeps the seed
# the generated rows <trainer>[real+generated] / <trainer>[generated] (nnssl.benchmark.generated)
GENERATED_REGISTRIES = ("generated_both_datasets.json", "generated_only_datasets.json")
# The FLARE22 rule (every organ >= 2000 voxels) is meant for CT volumes of ~10^7 voxels. On the synthetic 3D set
# (adrenal 4-12 voxels) a stage-1 model trained for the CPU preset never predicts the adrenal, so any positive
# threshold selects no case (measured at 1.5x voxel size: 0 of 16 at 20 voxels); the synthetic preset keeps every case.
SYNTHETIC_PL_MIN_VOXELS = 0


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
    per_case_dice: dict[str, dict[str, float]] = field(default_factory=dict)  # test case -> class -> Dice
    skipped: str | None = None  # why the row was not run (the full reference without withheld labels)
    budget: str = "iterations"  # "iterations" or "time" (nnssl.benchmark.budget)
    time_scale: float | None = None  # under the time budget: scaled / schedule iterations per epoch
    curve: dict[str, list[float]] | None = None  # nnU-Net's per-epoch validation Dice (nnssl.benchmark.curves)
    iterations_per_epoch: int | None = None
    ssl_progress: dict[str, list[float | None]] | None = None  # the trainer's per-epoch SSL log (ssl_diagnostics)
    volume_ratio: dict[str, float] | None = None  # class -> predicted / true volume on the test set (volume_bias)


def check_trainers(names: list[str]) -> list[str]:
    """``names`` if nnU-Net resolves every one (its own trainers and, via nnUNet_extTrainer, nnssl's); otherwise
    an :class:`InputError` naming the unknown ones, raised before anything runs or is written."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnssl.benchmark.ensemble import check_ensemble_trainer

    unknown = []
    for name in names:
        try:
            # a generated row names its trainer and its unlabeled set; an ensemble row its trainer
            trainer = ensemble_base(name) or split_row_name(name)[0]
        except ValueError as e:
            raise InputError(f"--trainers: {e}") from None
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search module by module
                trainer_class = recursive_find_trainer_class_by_name(trainer)
        except RuntimeError:
            unknown.append(name)
            continue
        if ensemble_base(name):
            try:
                check_ensemble_trainer(trainer, trainer_class)
            except ValueError as e:
                raise InputError(f"--trainers: {e}") from None
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
    if configuration not in json.loads(plans.read_text(encoding="utf-8")).get("configurations", {}):
        raise InputError(f"-c {configuration}: not a configuration of {plans}")


def seconds_per_iteration(log_text: str) -> float:
    """Median of the per-epoch ``train seconds/iteration`` lines; the first epoch (warm-up) is dropped when
    there are more."""
    values = [float(v) for v in re.findall(r"train seconds/iteration: ([0-9.]+)", log_text)]
    if len(values) > 1:
        values = values[1:]
    return float(np.median(values)) if values else float("nan")


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc} (log {log}):\n{tail}")


def reference_repeat(trainer: str) -> int:
    """k for the k-th training of the labeled-only reference (``BASELINE`` is the first, ``BASELINE#k`` the k-th),
    0 for every other row."""
    if trainer == BASELINE:
        return 1
    name, sep, k = trainer.partition(REPEAT_SEP)
    return int(k) if name == BASELINE and sep and k.isdigit() and int(k) >= 2 else 0


def reference_repeat_rows(repeats: int) -> list[str]:
    """The rows of the 2nd to ``repeats``-th training of the labeled-only reference."""
    return [f"{BASELINE}{REPEAT_SEP}{k}" for k in range(2, repeats + 1)]


def is_pseudo_label_row(trainer: str) -> bool:
    return trainer.startswith(PSEUDO_LABEL_TRAINER)


@dataclass
class PseudoLabelRound:
    """How the two-stage pseudo-label row makes its dataset: the new id and the selection rule."""

    new_dataset_id: int
    min_voxels: int


def _train_and_predict(trainer: str, dataset_id: int, raw: Path, configuration: str, fold: str,
                       env: dict[str, str], out: Path, device: str, tag: str, result: RunResult,
                       disable_tta: bool = False, train_args: tuple[str, ...] = (),
                       training_seed: int | None = None) -> Path:
    """``nnUNetv2_train`` on ``dataset_id``, then ``nnUNetv2_predict`` of ``raw``'s imagesTs with that model, both
    through :mod:`nnssl.benchmark.launch` in one process; fills the cost fields of ``result`` (training only) and
    returns the prediction folder. The log of both is ``{tag}.log``."""
    mem_file = out / f"{tag}_memory.json"
    log = out / f"{tag}.log"
    pred = out / "predictions" / tag
    tta = ["--disable_tta"] if disable_tta else []
    # on a CPU, nnU-Net's sequential mode (no worker processes, which cost more than a small test set's inference)
    workers = "0" if device == "cpu" else "1"
    from nnssl.benchmark.launch import ENV_SEED, THEN

    # reproducible rows on a CPU (nnssl.benchmark.launch)
    env = {**env, ENV_SEED: str(result.seed if training_seed is None else training_seed)}
    _run([sys.executable, "-m", "nnssl.benchmark.launch", str(mem_file),
          "nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-device", device, *train_args,
          THEN, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(dataset_id), "-c",
          configuration, "-f", fold, "-tr", trainer, "-device", device, "-npp", workers, "-nps", workers, *tta],
         env, log)
    memory = json.loads(mem_file.read_text(encoding="utf-8"))
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnssl.benchmark.curves import read_curve
    from nnssl.benchmark.ssl_diagnostics import read_ssl_progress

    fold_dir = fold_folder(env, maybe_convert_to_dataset_name(dataset_id), trainer, configuration, fold)
    result.curve = read_curve(fold_dir)
    result.ssl_progress = read_ssl_progress(fold_dir)
    result.iterations_per_epoch = int(env.get("NNSSL_ITERATIONS_PER_EPOCH") or 250)
    result.max_rss_mb = memory["max_rss_mb"]
    result.cuda_max_allocated_mb = memory["cuda_max_allocated_mb"]
    result.seconds_per_iteration = seconds_per_iteration(log.read_text(encoding="utf-8", errors="replace"))
    return pred


def _ensemble_predict(trainer: str, dataset: str, raw: Path, configuration: str, fold: str, env: dict[str, str],
                      out: Path, device: str, tag: str, result: RunResult, disable_tta: bool = False) -> Path:
    """``trainer``'s finished run exported as a pair (:mod:`nnssl.benchmark.ensemble`) and ``raw``'s imagesTs predicted
    with both networks' averaged softmax; the cost fields stay those of no training (the run's are in its row)."""
    from nnssl.cps_ensemble import ENSEMBLE_TRAINER_NAME, export_cps_ensemble

    results = out / "ensembles" / tag
    run = finished_fold(env, dataset, trainer, configuration, fold, needed_by=f"{trainer}[ensemble]")
    export_cps_ensemble(run, results_dir=results)
    pred = out / "predictions" / tag
    workers = "0" if device == "cpu" else "1"
    tta = ["--disable_tta"] if disable_tta else []
    _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", dataset, "-c", configuration,
          "-f", fold, "-tr", ENSEMBLE_TRAINER_NAME, "-device", device, "-npp", workers, "-nps", workers, *tta],
         {**env, "nnUNet_results": str(results)}, out / f"{tag}.log")
    result.notes = (f"{trainer}'s run of this seed predicting with both networks' averaged softmax "
                    f"({ENSEMBLE_TRAINER_NAME}); nothing trained, costs: see {trainer}'s row")
    return pred


def _evaluate(pred: Path, raw: Path, result: RunResult) -> None:
    """Score the predictions against ``raw``'s labelsTs (per-class mean Dice and NSD into ``result``)."""
    from nnssl.benchmark.volume_bias import volume_ratios
    from nnssl.evaluation.evaluate import evaluate_folders

    dataset_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    summary = evaluate_folders(pred, raw / "labelsTs", dataset_json["labels"],
                               file_ending=dataset_json["file_ending"], progress=False)
    result.dice = {n: s["dice"]["mean"] for n, s in summary["per_class"].items()}
    result.nsd = {n: s["nsd"]["mean"] for n, s in summary["per_class"].items()}
    # kept for the paired test against labeled-only (pairs = seeds x test cases)
    result.per_case_dice = {c["case"]: {n: float(m["dice"]) for n, m in c["metrics"].items()}
                            for c in summary["per_case"]}
    result.volume_ratio = volume_ratios(summary["per_case"])


def _pseudo_label_stage(dataset_id: int, configuration: str, fold: str, env: dict[str, str], out: Path,
                        device: str, tag: str, round_: PseudoLabelRound) -> tuple[Path, str]:
    """Stage 1 -> pseudo-labeled dataset: ``nnssl_pseudolabel`` with the baseline's model of this benchmark.

    Returns the stage-1 checkpoint and a note (selected cases, their Dice against withheld labels, seconds)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    # stage 1 is the baseline's model (nnssl_benchmark puts the baseline first in --trainers)
    stage1 = finished_fold(env, maybe_convert_to_dataset_name(dataset_id), BASELINE, configuration, fold,
                           needed_by="the pseudo-label row's stage 1") / "checkpoint_final.pth"
    start = time.time()
    _run(["nnssl_pseudolabel", "-d", str(dataset_id), "-c", configuration, "-f", fold, "-tr", BASELINE,
          "-o", str(round_.new_dataset_id), "--min-voxels", str(round_.min_voxels), "--preprocess", "--overwrite",
          "-device", device, "-npp", "1", "-nps", "1", "--no-progress"], env, out / f"{tag}_pseudolabel.log")
    seconds = time.time() - start
    from nnssl.pseudolabel.dataset import REPORT_JSON

    new_raw = Path(env["nnUNet_raw"]) / maybe_convert_to_dataset_name(round_.new_dataset_id)
    report = json.loads((new_raw / REPORT_JSON).read_text(encoding="utf-8"))
    # per selected case, the mean over classes of its pseudo-label Dice (None: class absent from both)
    dice = [np.mean(values) for c in report["cases"] if c["selected"]
            if (values := [d for d in c.get("dice_vs_withheld_label", {}).values() if d is not None])]
    note = (f"stage 1 = the {BASELINE} row; {report['num_selected']} of {report['num_predicted']} unlabeled cases "
            f"selected (every class >= {round_.min_voxels} voxels)")
    if dice:
        note += f", their mean pseudo-label Dice vs withheld labels {np.mean(dice):.3f}"
    note += f"; pseudo-labeling + preprocessing {seconds:.0f} s; stage 2 trains the same schedule as every row"
    return stage1, note


def _full_reference_stage(dataset_id: int, full_id: int, configuration: str, fold: str, env: dict[str, str],
                          out: Path, tag: str) -> str:
    """The fully labeled dataset ``full_id`` of ``dataset_id``, written, planned with the source's plans and
    preprocessed (:mod:`nnssl.benchmark.full_reference`, in a subprocess with this run's nnU-Net paths); returns
    the row's note."""
    start = time.time()
    log = out / f"{tag}_dataset.log"
    _run([sys.executable, "-m", "nnssl.benchmark.full_reference", "-s", str(dataset_id), "-t", str(full_id),
          "-c", configuration], env, log)
    made = json.loads(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1])
    # fold "all" trains on every case; a numbered fold should be the source's fold plus the formerly unlabeled cases
    folds = "" if fold == "all" or made["folds_from_source"] else \
        "; nnU-Net's own folds (the source had no splits_final.json)"
    return (f"{BASELINE} on {made['dataset']}: {made['labeled']} labeled + {made['withheld_labels_used']} unlabeled "
            f"cases with their withheld labels, the source's plans, the same schedule and test set{folds}; dataset "
            f"+ preprocessing {time.time() - start:.0f} s")


def _generated_stage(dataset_id: int, ids: tuple[int, int], configuration: str, settings: GenerationSettings,
                     env: dict[str, str], out: Path, device: str, tag: str) -> dict:
    """The datasets of the generated rows of ``dataset_id`` (:mod:`nnssl.benchmark.generated`, in a subprocess
    with this run's nnU-Net paths; built once per seed, reused by the other generated row)."""
    log = out / f"{tag}_generation.log"
    cmd = [sys.executable, "-m", "nnssl.benchmark.generated", "-s", str(dataset_id), "-b", str(ids[0]), "-g",
           str(ids[1]), "-c", configuration, "-n", str(settings.n_images), "--preset", settings.preset, "--seed",
           str(settings.seed), "-device", device]
    for option, value in (("--ae-epochs", settings.ae_epochs), ("--ldm-epochs", settings.ldm_epochs)):
        if value is not None:
            cmd += [option, str(value)]
    _run(cmd, env, log)
    return json.loads(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1])


def run_trainer(trainer: str, dataset_id: int, configuration: str, fold: str, env: dict[str, str], out: Path,
                device: str, seed: int, pseudo_label_round: PseudoLabelRound | None = None,
                disable_tta: bool = False, full_reference_id: int | None = None, tag_suffix: str = "",
                generated_ids: tuple[int, int] | None = None,
                generation: GenerationSettings | None = None) -> RunResult:
    """One row: ``trainer`` on ``dataset_id`` (or, for :data:`FULL_REFERENCE`, :data:`BASELINE` on the fully
    labeled dataset ``full_reference_id``; for ``<trainer>[variant]`` the trainer on the dataset with that unlabeled
    set, ``generated_ids`` = (real + generated, generated only)), scored on ``dataset_id``'s test set."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    dataset = maybe_convert_to_dataset_name(dataset_id)
    raw = Path(env["nnUNet_raw"]) / dataset
    result = RunResult(trainer, dataset, seed, schedule=schedule_text(env))
    tag = re.sub(r"[^\w.+-]", "_", f"{dataset}_{configuration}_{trainer}_seed{seed}{tag_suffix}")
    start = time.time()
    try:
        if trainer == FULL_REFERENCE:
            if full_reference_id is None:
                raise ValueError(f"{FULL_REFERENCE} needs the id of its fully labeled dataset")
            result.notes = _full_reference_stage(dataset_id, full_reference_id, configuration, fold, env, out,
                                                 tag)
            pred = _train_and_predict(BASELINE, full_reference_id, raw, configuration, fold, env, out, device, tag,
                                      result, disable_tta)
        elif reference_repeat(trainer) > 1:
            k = reference_repeat(trainer)
            env = {**env, "nnUNet_results": str(Path(env["nnUNet_results"]) / f"{REPEAT_RESULTS}{k}")}
            training_seed = seed + REPEAT_SEED_STRIDE * (k - 1)
            result.notes = f"training {k} of the labeled-only reference (training seed {training_seed})"
            pred = _train_and_predict(BASELINE, dataset_id, raw, configuration, fold, env, out, device, tag, result,
                                      disable_tta, training_seed=training_seed)
        elif ensemble_base(trainer):
            pred = _ensemble_predict(ensemble_base(trainer), dataset, raw, configuration, fold, env, out, device,
                                     tag, result, disable_tta)
        elif split_row_name(trainer)[1] is not None:
            if generated_ids is None or generation is None:
                raise ValueError(f"{trainer} needs the ids of its datasets and the generation settings")
            name, variant = split_row_name(trainer)
            made = _generated_stage(dataset_id, generated_ids, configuration, generation, env, out, device, tag)
            result.notes = note_for(made, variant)
            train_id = generated_ids[0] if variant == "real+generated" else generated_ids[1]
            pred = _train_and_predict(name, train_id, raw, configuration, fold, env, out, device, tag, result,
                                      disable_tta)
        elif is_pseudo_label_row(trainer):
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
    return derived_dataset_id(out, PSEUDO_LABEL_REGISTRY, source_id, configuration, fold, env, requested,
                              "the pseudo-labeled dataset", "--pl-dataset-id")


def _registered_ids(out: Path) -> set[int]:
    """Ids this output folder's registries hold (datasets it will make, maybe not on disk yet)."""
    ids: set[int] = set()
    for name in (PSEUDO_LABEL_REGISTRY, FULL_REFERENCE_REGISTRY, *GENERATED_REGISTRIES):
        if (out / name).is_file():
            ids |= {int(v) for v in json.loads((out / name).read_text(encoding="utf-8")).values()}
    return ids


def derived_dataset_id(out: Path, registry_name: str, source_id: int, configuration: str, fold: str,
                       env: dict[str, str], requested: int | None, what: str, option: str) -> int:
    """The id of a dataset this benchmark derives from ``source_id`` (``what``), kept in ``out/registry_name``:
    ``requested``, else the registered one, else the highest id in 900..999 that no dataset and no registry of
    ``out`` uses (so the pseudo-labeled and the fully labeled dataset never share one)."""
    from nnssl.io import atomic_write_json

    registry_file = out / registry_name
    registry = json.loads(registry_file.read_text(encoding="utf-8")) if registry_file.is_file() else {}
    key = f"{env['nnUNet_raw']}|{source_id}|{configuration}|{fold}"
    if requested is not None:
        new_id = requested
    elif key in registry:
        new_id = registry[key]
    else:
        used = {int(m.group(1)) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                if Path(env[k]).is_dir() for p in Path(env[k]).iterdir() if (m := re.match(r"Dataset(\d{3})_", p.name))}
        used |= set(registry.values()) | _registered_ids(out)
        free = [i for i in range(999, 899, -1) if i not in used and i != source_id]
        if not free:
            raise SystemExit(f"nnssl_benchmark: no free dataset id in 900..999 for {what}; pass {option}")
        new_id = free[0]
    if new_id == source_id:
        raise SystemExit(f"nnssl_benchmark: {option} {new_id} is the source dataset")
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
    from nnssl.training.environment import ENV_INITIAL_LR, ENV_ITERATIONS, ENV_NUM_EPOCHS, ENV_VAL_ITERATIONS

    values = {ENV_NUM_EPOCHS: epochs, ENV_ITERATIONS: iterations, ENV_VAL_ITERATIONS: val_iterations,
              ENV_INITIAL_LR: initial_lr}
    return {k: str(v) for k, v in values.items() if v is not None}


def schedule_text(env: dict[str, str]) -> str:
    from nnssl.training.environment import ENV_INITIAL_LR, ENV_ITERATIONS, ENV_NUM_EPOCHS

    epochs, iterations = env.get(ENV_NUM_EPOCHS, "trainer's"), env.get(ENV_ITERATIONS, "trainer's")
    lr = f", SGD lr {env[ENV_INITIAL_LR]}" if env.get(ENV_INITIAL_LR) else ""
    return f"{epochs} epochs x {iterations} iterations{lr}"


def _mean(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _gap_columns(mine: list[RunResult], base: dict[int, RunResult], full: dict[int, RunResult]) -> dict:
    """Gap closed per seed (:func:`nnssl.benchmark.gap.gap_closed` on mean foreground Dice, seeds where the row
    and both references finished), its mean and 95 % t-interval over seeds, and the Wilcoxon p against
    labeled-only (pairs = seeds x test cases)."""
    from nnssl.benchmark.gap import gap_closed, mean_ci, paired_cases, wilcoxon_p

    per_seed = {r.seed: gap_closed(_mean(r.dice), _mean(base[r.seed].dice), _mean(full[r.seed].dice))
                for r in mine if r.seed in base and r.seed in full}
    mean, low, high = mean_ci(list(per_seed.values()))
    x, y = paired_cases({r.seed: r.per_case_dice for r in mine}, {s: r.per_case_dice for s, r in base.items()})
    return {"gap_closed": mean, "gap_closed_ci_low": low, "gap_closed_ci_high": high,
            "gap_closed_seeds": sum(v == v for v in per_seed.values()),
            "gap_closed_per_seed": {str(s): v for s, v in per_seed.items()},
            "wilcoxon_p": wilcoxon_p(x, y), "wilcoxon_pairs": len(x)}


def _paired_gain(mine: list[RunResult], base: dict[int, RunResult], full: dict[int, RunResult], trainer: str
                 ) -> dict:
    """Gain in mean Dice over labeled-only, paired by seed (seeds where both rows finished), and a note naming the
    seeds of this row that lack a reference row: without pairing, a seed whose reference failed would compare the
    row's mean over some seeds with the reference's mean over others."""
    paired = [r for r in mine if r.seed in base]
    gain = float(np.mean([_mean(r.dice) - _mean(base[r.seed].dice) for r in paired])) if paired else float("nan")
    out = {"gain_vs_supervised": gain, "gain_seeds": len(paired)}
    if is_reference(trainer):
        return out
    seeds = sorted({r.seed for r in mine})
    no_base, no_full = [s for s in seeds if s not in base], [s for s in seeds if s not in full]
    notes = []
    if no_base:
        notes.append(f"seed(s) {', '.join(map(str, no_base))} without a finished {BASELINE} row: left out of gain, "
                     f"gap closed and the paired test")
    if no_full:
        notes.append(f"seed(s) {', '.join(map(str, no_full))} without a finished {FULL_REFERENCE} row: left out of "
                     f"gap closed")
    if notes:
        out["unpaired_note"] = "; ".join(notes) + " (the Dice columns average every finished seed of this row)"
    return out


def _gap_note(base: dict[int, RunResult], full: dict[int, RunResult], skipped: str | None) -> str | None:
    """Why gap closed is n/a for (some) seeds of a dataset, or None."""
    from nnssl.benchmark.gap import GAP_MIN_DENOMINATOR

    if not full:
        return f"gap closed n/a: no fully supervised reference ({skipped or 'not run or failed'})"
    if not base:
        return f"gap closed n/a: no labeled-only ({BASELINE}) row"
    tiny = {s: _mean(full[s].dice) - _mean(base[s].dice) for s in sorted(set(base) & set(full))}
    tiny = {s: d for s, d in tiny.items() if not d >= GAP_MIN_DENOMINATOR}
    if not tiny:
        return None
    gaps = ", ".join(f"seed {s}: {d:+.3f}" for s, d in tiny.items())
    return (f"gap closed undefined where the fully supervised reference is less than {GAP_MIN_DENOMINATOR} Dice above "
            f"labeled-only ({gaps}): all labels made no measurable difference here (a schedule too short to use "
            f"them?), and a ratio over that difference would be noise")


def row_label(row: dict) -> str:
    """``trainer``, or ``trainer @ equal time`` for a row of the time budget."""
    from nnssl.benchmark.budget import BUDGET_LABEL

    budget = row.get("budget")
    return f"{row['trainer']} @ {BUDGET_LABEL[budget]}" if budget in BUDGET_LABEL and budget != ITERATIONS \
        else row["trainer"]


def _mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in dict.fromkeys(k for d in dicts for k in d)}


def merge_reference_repeats(results: list[RunResult]) -> list[RunResult]:
    """``results`` with the trainings of the labeled-only reference of each dataset and seed (``BASELINE``,
    ``BASELINE#k``) replaced by one row, where the first one was: Dice, NSD and per-case Dice the mean over the
    finished trainings (per class, per test case), cost columns their mean; a note names each training's mean Dice.
    Without repeats nothing changes."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        if reference_repeat(r.trainer):
            groups.setdefault((r.dataset, r.seed), []).append(r)
    merged: dict[tuple[str, int], RunResult] = {}
    for key, runs in groups.items():
        if not any(reference_repeat(r.trainer) > 1 for r in runs):
            continue
        ok = sorted((r for r in runs if r.error is None and r.skipped is None),
                    key=lambda r: reference_repeat(r.trainer))
        first = next((r for r in runs if r.trainer == BASELINE), runs[0])
        if not ok:
            merged[key] = dataclasses.replace(first, trainer=BASELINE)
            continue
        volumes = [r.volume_ratio for r in ok if r.volume_ratio]
        each = ", ".join(f"{_mean(r.dice):.3f}" for r in ok)
        failed = len(runs) - len(ok)
        note = (f"mean of {len(ok)} trainings of the labeled-only reference (mean Dice {each})"
                + (f"; {failed} training(s) failed or not computed, left out" if failed else ""))
        merged[key] = dataclasses.replace(
            ok[0], trainer=BASELINE, dice=_mean_of([r.dice for r in ok]), nsd=_mean_of([r.nsd for r in ok]),
            per_case_dice={case: _mean_of([r.per_case_dice[case] for r in ok if case in r.per_case_dice])
                           for case in dict.fromkeys(c for r in ok for c in r.per_case_dice)},
            seconds_per_iteration=float(np.mean([r.seconds_per_iteration for r in ok])),
            wall_seconds=float(np.mean([r.wall_seconds for r in ok])),
            volume_ratio=_mean_of(volumes) if volumes else None,
            notes="; ".join(n for n in (note, ok[0].notes if ok[0].trainer == BASELINE else None) if n))
    out = []
    for r in results:
        key = (r.dataset, r.seed)
        if reference_repeat(r.trainer) and key in merged:
            if merged[key] is not None:
                out.append(merged[key])
                merged[key] = None  # type: ignore[assignment]  # placed once, where the first training was
            continue
        out.append(r)
    return out


def summarize(results: list[RunResult]) -> list[dict]:
    """One row per (dataset, trainer, budget): means over seeds, over seeds the spread (max - min) of mean Dice, and
    gap closed with its 95 % interval (see :mod:`nnssl.benchmark.gap`). Rows of the time budget are measured against
    the same references; with any of them every row has a ``budget`` (the references: ``both``)."""
    rows = []
    results = merge_reference_repeats(results)
    with_budgets = any(r.budget != ITERATIONS for r in results)
    for dataset in dict.fromkeys(r.dataset for r in results):
        runs = [r for r in results if r.dataset == dataset]
        base = [r for r in runs if r.trainer == BASELINE and r.error is None and r.skipped is None]
        base_by_seed = {r.seed: r for r in base}
        full_by_seed = {r.seed: r for r in runs
                        if r.trainer == FULL_REFERENCE and r.error is None and r.skipped is None}
        skipped_full = next((r.skipped for r in runs if r.trainer == FULL_REFERENCE and r.skipped), None)
        gap_note = _gap_note(base_by_seed, full_by_seed, skipped_full)
        first = len(rows)
        base_sec = np.mean([r.seconds_per_iteration for r in base]) if base else float("nan")
        base_mem = np.mean([r.cuda_max_allocated_mb if r.cuda_max_allocated_mb is not None else r.max_rss_mb
                            for r in base]) if base else float("nan")
        for trainer, budget in dict.fromkeys((r.trainer, r.budget) for r in runs):
            mine = [r for r in runs if r.trainer == trainer and r.budget == budget]
            skipped = [r for r in mine if r.skipped]
            mine = [r for r in mine if not r.skipped]
            ok = [r for r in mine if r.error is None]
            row: dict = {"dataset": dataset, "trainer": trainer, "seeds": len(mine), "failed": len(mine) - len(ok),
                         "schedule": (mine or skipped)[0].schedule}
            if with_budgets:
                row["budget"] = "both" if is_reference(trainer) else budget
            if skipped and not mine:
                row["skipped"] = skipped[0].skipped
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
                row.update(_paired_gain(ok, base_by_seed, full_by_seed, trainer))
                row.update(_gap_columns(ok, base_by_seed, full_by_seed))
                row["sec_per_iter"] = float(np.mean([r.seconds_per_iteration for r in ok]))
                row["time_rel"] = row["sec_per_iter"] / base_sec
                row["max_rss_mb"] = float(np.mean([r.max_rss_mb for r in ok]))
                cuda = [r.cuda_max_allocated_mb for r in ok if r.cuda_max_allocated_mb is not None]
                row["cuda_max_allocated_mb"] = float(np.mean(cuda)) if cuda else None
                # on CUDA the GPU memory is what limits patch and batch size; on CPU the process RSS
                row["peak_mb"] = row["cuda_max_allocated_mb"] if cuda else row["max_rss_mb"]
                row["memory_rel"] = row["peak_mb"] / base_mem
                row["wall_seconds"] = float(np.mean([r.wall_seconds for r in ok]))
                scales = [r.time_scale for r in ok if r.time_scale is not None]
                if scales:
                    row["time_scale"] = float(np.mean(scales))
            rows.append(row)
        if gap_note:
            rows[first]["gap_note"] = gap_note  # one note per dataset table
    return rows


def _fmt(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None or v != v else fmt.format(v)


def gap_cell(row: dict) -> str:
    """``0.77 [0.52, 1.02]``; the interval is n/a with one seed, the whole cell when gap closed is undefined."""
    if row.get("gap_closed") is None or row["gap_closed"] != row["gap_closed"]:
        return "n/a"
    return f"{row['gap_closed']:+.2f} [{_fmt(row['gap_closed_ci_low'], '{:+.2f}')}, " \
           f"{_fmt(row['gap_closed_ci_high'], '{:+.2f}')}]"


def markdown_table(rows: list[dict]) -> str:
    from nnssl.benchmark.gap import GAP_MIN_DENOMINATOR, TEST_NAME

    lines = []
    not_classes = ("dice_mean", "dice_seed_spread")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        classes = [k[5:] for r in ds_rows for k in r if k.startswith("dice_") and k not in not_classes]
        classes = list(dict.fromkeys(classes))
        head = ["trainer", *[f"Dice {c}" for c in classes], "Dice mean", "NSD mean", "gain", "gap closed [95 % CI]",
                "p (Wilcoxon) vs labeled-only", "seed spread", "s/iter", "time ×", "peak MB (GPU if CUDA, else RSS)",
                "mem ×", "row wall s"]
        schedules = sorted({r["schedule"] for r in ds_rows if r.get("schedule") and r.get("budget") != "time"})
        title = f"### {dataset}" + (f" ({', '.join(schedules)} per trainer)" if schedules else "")
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in ds_rows:
            if r.get("skipped"):
                lines.append(f"| {row_label(r)} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
                continue
            if "dice_mean" not in r:
                lines.append(f"| {row_label(r)} | failed |" + " |" * (len(head) - 2))
                continue
            p = "—" if r["trainer"] == BASELINE else f"{_fmt(r['wilcoxon_p'], '{:.3g}')} (n={r['wilcoxon_pairs']})"
            cells = [row_label(r), *[_fmt(r.get(f"dice_{c}")) for c in classes], _fmt(r["dice_mean"]),
                     _fmt(r["nsd_mean"]), _fmt(r["gain_vs_supervised"], "{:+.3f}"), gap_cell(r), p,
                     _fmt(r["dice_seed_spread"]), _fmt(r["sec_per_iter"]), _fmt(r["time_rel"], "{:.2f}"),
                     _fmt(r["peak_mb"], "{:.0f}"), _fmt(r["memory_rel"], "{:.2f}"),
                     _fmt(r.get("wall_seconds"), "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Gap closed = (Dice − Dice {BASELINE}) / (Dice {FULL_REFERENCE} − Dice {BASELINE}) per seed "
                      f"(mean foreground Dice; 0 = labeled-only, 1 = all labels), mean over seeds with a 95 % "
                      f"Student-t interval (n/a with one seed; undefined when the full reference is < "
                      f"{GAP_MIN_DENOMINATOR} above labeled-only). p: {TEST_NAME}.", ""]
        lines += [f"- {r['gap_note']}" for r in ds_rows if r.get("gap_note")]
        if any(r.get("budget") == "time" for r in ds_rows):
            lines.append(f"- @ equal time: the row trains as long as {BASELINE} on the schedule (its iterations per "
                         f"epoch scaled by a speed calibration, the epochs kept); the references are the same rows "
                         f"under both budgets")
        lines += [f"- {row_label(r)}: {r['notes']}" for r in ds_rows if r.get("notes")]
        lines += [f"- {row_label(r)}: {r['unpaired_note']}" for r in ds_rows if r.get("unpaired_note")]
        lines.append("")
    return "\n".join(lines)


def _short(trainer: str) -> str:
    return trainer.replace("nnUNetTrainer", "") or "nnUNetTrainer"


def _short_label(row: dict) -> str:
    return _short(row["trainer"]) + (" @ time" if row.get("budget") == "time" else "")


def bar_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        ds_rows = [r for r in rows if r["dataset"] == dataset and "dice_mean" in r]
        names = [_short_label(r) for r in ds_rows]
        ax.bar(names, [r["dice_mean"] for r in ds_rows],
               yerr=[r["dice_seed_spread"] / 2 for r in ds_rows], capsize=3)
        ax.set_title(dataset)
        ax.set_ylabel("mean foreground Dice")
        # right-aligned and anchored, so that long trainer names end under their own bar
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gap_plot(rows: list[dict], path: Path) -> None:
    """Gap closed per trainer (one bar each, error bars = the 95 % interval over seeds), with the two references
    as lines at 0 and 1; a dataset without gap closed says why instead. With rows of both budgets each trainer has
    two bars side by side (equal iterations, equal time)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        ds_rows = [r for r in rows if r["dataset"] == dataset and r["trainer"] not in (BASELINE, FULL_REFERENCE)
                   and r.get("gap_closed") is not None and r["gap_closed"] == r["gap_closed"]]
        ax.set_title(dataset)
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(1, color="grey", lw=1, ls="--")
        if not ds_rows:
            note = next((r.get("gap_note") for r in rows if r["dataset"] == dataset and r.get("gap_note")), "")
            import textwrap

            ax.text(0.5, 0.5, textwrap.fill(note or "gap closed n/a", 70), ha="center", va="center",
                    transform=ax.transAxes, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        from nnssl.benchmark.budget import BUDGET_LABEL

        trainers = list(dict.fromkeys(r["trainer"] for r in ds_rows))
        budgets = list(dict.fromkeys(r.get("budget", ITERATIONS) for r in ds_rows))
        width = 0.8 / len(budgets)
        for i, budget in enumerate(budgets):
            mine = [r for r in ds_rows if r.get("budget", ITERATIONS) == budget]
            means = np.array([r["gap_closed"] for r in mine])
            low = np.array([r["gap_closed_ci_low"] for r in mine])
            high = np.array([r["gap_closed_ci_high"] for r in mine])
            # no interval with one seed: no error bar rather than a made-up one
            err = np.nan_to_num(np.vstack([means - low, high - means]), nan=0.0)
            x = np.array([trainers.index(r["trainer"]) for r in mine]) + (i - (len(budgets) - 1) / 2) * width
            ax.bar(x, means, width=width, yerr=err, capsize=3, label=BUDGET_LABEL.get(budget, budget))
        ax.set_xticks(range(len(trainers)), [_short(t) for t in trainers])
        if len(budgets) > 1:
            ax.legend(fontsize=7)
        ax.set_ylabel("gap closed (0 = labeled-only, 1 = all labels)")
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: list[RunResult], out: Path) -> list[dict]:
    from nnssl.benchmark.ssl_diagnostics import diagnostics_markdown, trainer_summaries
    from nnssl.benchmark.volume_bias import volume_bias_markdown
    from nnssl.io import atomic_write_json, atomic_write_text

    rows = summarize(results)
    atomic_write_json(out / "benchmark.json", {"runs": [r.__dict__ for r in results], "rows": rows})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = out / ".benchmark.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "benchmark.csv")
    curve_lines = write_learning_curves(results, out)
    diagnostics = diagnostics_markdown(trainer_summaries([(r.trainer, r.ssl_progress) for r in results
                                                          if r.budget == ITERATIONS and not r.error]))
    volume = volume_bias_markdown([(r.trainer, r.seed, r.volume_ratio) for r in results
                                   if r.budget == ITERATIONS and not r.error])
    atomic_write_text(out / "benchmark.md", markdown_table(rows) + (
        "\n\n## Convergence of the references\n\n" + "\n".join(curve_lines) + "\n" if curve_lines else "") + (
        "\n\n## What the SSL rows did (equal iterations)\n\nThe trainers' own diagnostics (`ssl_progress.json`), mean "
        "over the last quarter of the epochs, then over seeds; pseudo-label Dice against the withheld labels of the "
        "unlabeled cases (never used in training).\n\n" + diagnostics + "\n" if diagnostics else "") + (
        "\n\n## Predicted / true volume on the test set (equal iterations)\n\nPer class, the predicted voxels over "
        "the reference voxels summed over the test cases (1 = unbiased, above 1 = the row over-segments); mean over "
        "seeds (each seed's value in parentheses).\n\n" + volume + "\n" if volume else ""))
    bar_plot(rows, out / "benchmark.png")
    gap_plot(rows, out / "benchmark_gap.png")
    return rows


@dataclass
class DatasetRun:
    """One dataset of one seed, as every row of it runs: where, which schedule, and its derived datasets."""

    dataset_id: int
    configuration: str
    fold: str
    env: dict[str, str]
    seed: int
    data: str  # what the data is, for the row keys (see nnssl.benchmark.resume)
    pl_round: PseudoLabelRound | None = None
    full_id: int | None = None
    label: str = ""
    calibration_schedule: tuple[int, int] = CALIBRATION_SCHEDULE  # (epochs, iterations) of the speed calibration
    # known up front for generated data, whose raw folder only exists once a row needs computing (a rerun that
    # reuses every row of a seed never generates it); "" = look it up in nnUNet_raw
    dataset_name: str = ""
    generated_ids: tuple[int, int] | None = None  # (real + generated, generated only) of the generated rows
    generation: GenerationSettings | None = None


def row_key_of(run: DatasetRun, trainer: str, device: str, disable_tta: bool, budget: str = ITERATIONS) -> dict:
    """The row's key; under the time budget with ``budget`` in it (``run`` then has the scaled schedule), under the
    iteration budget as before the budgets existed, so earlier rows stay reusable."""
    from nnssl.benchmark.resume import row_key

    options: dict = {"device": device, "disable_tta": disable_tta}
    if is_pseudo_label_row(trainer) and run.pl_round is not None:
        options["pl_min_voxels"] = run.pl_round.min_voxels
    if split_row_name(trainer)[1] is not None and run.generation is not None:
        options["generation"] = run.generation.to_dict()
    if budget != ITERATIONS:
        options["budget"] = budget
    return row_key(run.dataset_id, run.configuration, run.fold, trainer, run.seed, run.env, run.data, **options)


def is_reference(trainer: str) -> bool:
    """The labeled-only and the fully supervised reference: the same rows under every budget."""
    return trainer == FULL_REFERENCE or reference_repeat(trainer) > 0


def budget_trainers(trainers: list[str], budget: str, budgets: list[str] | None = None) -> list[str]:
    """The rows of ``budget`` when ``budgets`` run: at equal iterations every trainer (only the references when the
    time budget runs alone: they are its references too), at equal time the SSL trainers."""
    if budget != ITERATIONS:  # a generated row costs what its plain row costs: only at equal iterations
        return [t for t in trainers if not is_reference(t) and split_row_name(t)[1] is None
                and ensemble_base(t) is None]
    return list(trainers) if budgets is None or ITERATIONS in budgets else [t for t in trainers if is_reference(t)]


def calibration_of(run: DatasetRun, out: Path, device: str) -> tuple[Path, dict, dict[str, float]]:
    """(file, key, trainer -> seconds per iteration) of ``run``'s saved speed calibration (empty without one)."""
    from nnssl.benchmark.budget import calibration_file, calibration_key, load_calibration

    path = calibration_file(out, run.dataset_id, run.configuration, run.seed, device)
    key = calibration_key(run.data, run.configuration, run.fold, device, run.env, run.calibration_schedule)
    return path, key, load_calibration(path, key)


def _calibrate_one(run: DatasetRun, trainer: str, out: Path, device: str) -> float:
    """Seconds per iteration of ``trainer`` on ``run``'s data: ``nnUNetv2_train`` for the calibration schedule into a
    scratch results folder (removed after), the fastest epoch's ``train seconds/iteration`` after the first."""
    import shutil

    from nnssl.benchmark.budget import CALIBRATION_FOLDER, calibration_seconds_per_iteration

    epochs, iterations = run.calibration_schedule
    folder = out / CALIBRATION_FOLDER
    scratch = folder / f"scratch_{run.dataset_id}_{run.configuration}_seed{run.seed}_{device}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = {**run.env, **schedule_env(epochs, iterations, 1), "nnUNet_results": str(scratch)}
    env.pop("NNSSL_SAVE_EVERY", None)
    log = folder / f"{run.dataset_id}_{run.configuration}_seed{run.seed}_{device}_{trainer}.log"
    try:
        _run([sys.executable, "-m", "nnssl.benchmark.launch", str(scratch / "memory.json"), "nnUNetv2_train",
              str(run.dataset_id), run.configuration, run.fold, "-tr", trainer, "-device", device], env, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = calibration_seconds_per_iteration(log.read_text(encoding="utf-8", errors="replace"))
    if not seconds > 0:
        raise RuntimeError(f"no 'train seconds/iteration' in {log}")
    return seconds


def calibrate(run: DatasetRun, trainers: list[str], out: Path, device: str) -> dict[str, float]:
    """trainer -> seconds per iteration for the labeled-only reference and ``trainers``: the saved calibration,
    with the ones it lacks measured and added (a trainer whose calibration fails is left out)."""
    from nnssl.benchmark.budget import save_calibration

    path, key, seconds = calibration_of(run, out, device)
    for trainer in dict.fromkeys([BASELINE, *trainers]):
        if trainer in seconds:
            continue
        print(f"nnssl_benchmark: speed calibration ({run.label}): {trainer}, "
              f"{run.calibration_schedule[0]} epochs x {run.calibration_schedule[1]} iterations")
        try:
            seconds[trainer] = _calibrate_one(run, trainer, out, device)
        except RuntimeError as e:
            print(f"nnssl_benchmark: speed calibration of {trainer} failed: {e}", file=sys.stderr)
            continue
        save_calibration(path, key, seconds)
    return seconds


EQUAL_TIME_RESULTS = "equal_time"  # subfolder of nnUNet_results with the models of the time-budget rows
PSEUDO_LABEL_TIME_SKIP = (f"not run at equal time: its stage 1 is the {BASELINE} run, which alone uses the whole "
                          f"budget, so within it the recipe is labeled-only (gap closed 0 by construction); see "
                          f"nnssl.benchmark.budget")


def time_budget_run(run: DatasetRun, trainer: str, seconds: dict[str, float]) -> tuple[DatasetRun, float, str]:
    """(``run`` with ``trainer``'s equal-time schedule, the applied scale of its iterations per epoch, the row's
    note); ValueError without a calibration of both."""
    from nnssl.benchmark.budget import speed_ratio, time_budget_env

    missing = [t for t in (BASELINE, trainer) if t not in seconds]
    if missing:
        raise ValueError(f"no speed calibration of {', '.join(missing)}")
    ratio = speed_ratio(seconds[BASELINE], seconds[trainer])
    env, iterations, scaled = time_budget_env(run.env, ratio)
    if env.get("nnUNet_results"):  # its own models: the equal-iteration model of the trainer stays where it was
        env["nnUNet_results"] = str(Path(env["nnUNet_results"]) / EQUAL_TIME_RESULTS)
    epochs, its = run.calibration_schedule
    note = (f"equal time: {scaled} instead of {iterations} iterations per epoch (x{scaled / iterations:.3f}; "
            f"calibration {epochs} epochs x {its} iterations: {BASELINE} {seconds[BASELINE]:.4f} s/iter, this "
            f"trainer {seconds[trainer]:.4f} s/iter, ratio {ratio:.3f})")
    return dataclasses.replace(run, env=env), scaled / iterations, note


def _row_plan(run: DatasetRun, trainer: str, budget: str, seconds: dict[str, float] | None
              ) -> tuple[DatasetRun, float | None, str | None]:
    """(the run of the row, its time scale, its budget note) for ``trainer`` under ``budget``."""
    if budget == ITERATIONS:
        return run, None, None
    return time_budget_run(run, trainer, seconds or {})


def reusable_rows(run: DatasetRun, trainers: list[str], out: Path, device: str, disable_tta: bool,
                  budget: str = ITERATIONS, seconds: dict[str, float] | None = None) -> dict[str, RunResult]:
    """trainer -> its finished row of an earlier run with the same key (same data, schedule, options, budget);
    under the time budget only trainers with a calibration (``seconds``) can have one."""
    from nnssl.benchmark.resume import load_row

    found = {}
    for trainer in trainers:
        if budget != ITERATIONS and is_pseudo_label_row(trainer):
            continue
        try:
            row_run, _, _ = _row_plan(run, trainer, budget, seconds)
        except ValueError:
            continue
        found[trainer] = load_row(out, row_key_of(row_run, trainer, device, disable_tta, budget), RunResult)
    return {t: r for t, r in found.items() if r is not None}


def rows_to_compute(run: DatasetRun, trainers: list[str], budgets: list[str], out: Path, device: str,
                    disable_tta: bool) -> int:
    """How many rows of ``run`` under ``budgets`` have no finished row to reuse (the pseudo-label row at equal time,
    which is never run, not counted)."""
    missing = 0
    for budget in dict.fromkeys([ITERATIONS, *budgets]):
        mine = budget_trainers(trainers, budget, budgets)
        if budget != ITERATIONS:
            mine = [t for t in mine if not is_pseudo_label_row(t)]
        seconds = calibration_of(run, out, device)[2] if budget != ITERATIONS else None
        missing += len(mine) - len(reusable_rows(run, mine, out, device, disable_tta, budget, seconds))
    return missing


NOT_COMPUTED = "not computed yet (--tables-only: only finished rows are shown)"


def _backfill_ssl_progress(result: RunResult, run: DatasetRun) -> bool:
    """A row saved before rows kept the trainer's diagnostics gets them from its run's fold folder, when that is
    still under the benchmark's output (the folder the row's training wrote; CPU rows are deterministic, so a rerun
    would write the same). True if the row gained them."""
    from nnssl.benchmark.ssl_diagnostics import read_ssl_progress

    if result.ssl_progress is not None or result.error or result.skipped or "nnUNet_results" not in run.env:
        return False
    fold = fold_folder(run.env, result.dataset, result.trainer, run.configuration, run.fold)
    result.ssl_progress = read_ssl_progress(fold) if (fold / "checkpoint_final.pth").is_file() else None
    return result.ssl_progress is not None


def run_rows(run: DatasetRun, trainers: list[str], out: Path, device: str, disable_tta: bool,
             results: list[RunResult], start: float, full_skip: str | None = None, budget: str = ITERATIONS,
             compute: bool = True) -> None:
    """Every row of ``run`` under ``budget`` in order, appended to ``results`` (tables rewritten after each): a
    finished row of an earlier run with the same key is reused, every other one computed and saved under
    ``out/rows`` (with ``compute`` False only listed as not computed). Under the time budget ``trainers`` are the
    SSL rows; the speed calibration runs first (saved, reused)."""
    from nnssl.benchmark.resume import load_row, row_file, save_row

    seconds = None
    timed = [t for t in trainers if not is_pseudo_label_row(t) and not is_reference(t)]
    if budget != ITERATIONS and timed:
        seconds = calibrate(run, timed, out, device) if compute else calibration_of(run, out, device)[2]

    for trainer in trainers:
        if budget != ITERATIONS and is_pseudo_label_row(trainer):
            print(f"nnssl_benchmark: {trainer} @ equal time skipped ({run.label}): {PSEUDO_LABEL_TIME_SKIP}")
            results.append(RunResult(trainer, _dataset_name(run), run.seed, schedule=schedule_text(run.env),
                                     skipped=PSEUDO_LABEL_TIME_SKIP, budget=budget))
            write_outputs(results, out)
            continue
        try:
            row_run, scale, budget_note = _row_plan(run, trainer, budget, seconds)
        except ValueError as e:  # no calibration of this trainer: under --tables-only simply not computed yet
            results.append(RunResult(trainer, _dataset_name(run), run.seed, schedule=schedule_text(run.env),
                                     error=str(e) if compute else None, skipped=None if compute else NOT_COMPUTED,
                                     budget=budget))
            write_outputs(results, out)
            continue
        key = row_key_of(row_run, trainer, device, disable_tta, budget)
        reused = load_row(out, key, RunResult)
        label = trainer if budget == ITERATIONS else f"{trainer} @ equal {budget}"
        if reused is not None:
            print(f"nnssl_benchmark: reusing finished row {row_file(out, key).name} ({run.label}: {label})")
            if budget == ITERATIONS and _backfill_ssl_progress(reused, row_run):
                save_row(out, key, reused)
            results.append(reused)
            continue
        if not compute:
            print(f"nnssl_benchmark: {label} ({run.label}): {NOT_COMPUTED}")
            results.append(RunResult(trainer, _dataset_name(run), run.seed, schedule=schedule_text(run.env),
                                     skipped=NOT_COMPUTED, budget=budget))
            continue
        if trainer == FULL_REFERENCE and full_skip:
            print(f"nnssl_benchmark: {FULL_REFERENCE} skipped ({run.label}): {full_skip}")
            results.append(RunResult(FULL_REFERENCE, _dataset_name(run), run.seed,
                                     schedule=schedule_text(run.env), skipped=full_skip))
            continue
        print(f"[{time.time() - start:.0f} s] {run.label}: {label}")
        result = run_trainer(trainer, row_run.dataset_id, row_run.configuration, row_run.fold, row_run.env, out,
                             device, row_run.seed, row_run.pl_round, disable_tta, row_run.full_id,
                             "" if budget == ITERATIONS else f"_equal_{budget}", row_run.generated_ids,
                             row_run.generation)
        if budget != ITERATIONS:
            result.budget, result.time_scale = budget, scale
            result.notes = "; ".join(n for n in (budget_note, result.notes) if n)
        save_row(out, key, result)
        results.append(result)
        write_outputs(results, out)


def _dataset_name(run: DatasetRun) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if run.dataset_name:
        return run.dataset_name
    os.environ.update({k: run.env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                       if k in run.env})
    return maybe_convert_to_dataset_name(run.dataset_id)


def raw_folder(env: dict[str, str], dataset_id: int) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return Path(env["nnUNet_raw"]) / maybe_convert_to_dataset_name(dataset_id)


def raw_data_text(env: dict[str, str], dataset_id: int) -> str:
    """The data of ``-d``, for the row keys: its raw folder and a digest of its roles (ssl_split.json), so a changed
    split (other labeled cases) is not mistaken for the same data."""
    import hashlib

    raw = raw_folder(env, dataset_id)
    split = raw / "ssl_split.json"
    digest = hashlib.sha256(split.read_bytes()).hexdigest()[:16] if split.is_file() else "no ssl_split.json"
    return f"{raw} split {digest}"


def generation_settings(args: argparse.Namespace, n_real_unlabeled: int, seed: int) -> GenerationSettings:
    """Stage 1 of the generated rows: ``--generated-images`` (default: as many as the real unlabeled cases, so that
    [generated] and the plain row compare sets of one size), ``--ldm-preset``, ``--ldm-epochs``, the data seed."""
    ae, ldm = args.ldm_epochs or (None, None)
    return GenerationSettings(args.generated_images or n_real_unlabeled, args.ldm_preset, ae, ldm, seed)


def order_rows(trainers: list[str], full_reference: bool, reference_repeats: int = 1) -> list[str]:
    """The references first (every gain and gap is relative to them; the baseline is stage 1 of the pseudo-label
    row): the baseline when asked for or needed, with its repeated trainings, then the full reference when wanted,
    then the rest."""
    if BASELINE in trainers or any(is_pseudo_label_row(t) for t in trainers):
        rest = [t for t in trainers if not reference_repeat(t)]
        trainers = [BASELINE, *reference_repeat_rows(reference_repeats), *rest]
    trainers = [t for t in trainers if t != FULL_REFERENCE]
    if full_reference:
        at = sum(1 for t in trainers if reference_repeat(t))
        trainers = [*trainers[:at], FULL_REFERENCE, *trainers[at:]]
    return trainers


def synthetic_dataset_name(preset: SyntheticPreset) -> str:
    """The raw folder name :func:`make_synthetic` writes for ``preset``."""
    from nnssl.synthetic import DEFAULT_NAMES

    return f"Dataset{preset.dataset_id:03d}_{DEFAULT_NAMES[preset.kind]}"


def make_synthetic(root: Path, preset: SyntheticPreset, seed: int) -> None:
    """Generate, plan and preprocess the dataset of ``preset`` for ``seed`` under ``root``."""
    from nnssl.plans_tools import shrink_network
    from nnssl.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(root / "nnUNet_raw", preset.dataset_id, preset.kind, n_labeled=preset.n_labeled,
                                 n_unlabeled=preset.n_unlabeled, n_test=preset.n_test, n_val=preset.n_val, seed=seed,
                                 overwrite=True, voxel_scale=preset.voxel_scale,
                                 labeled_scanner=preset.labeled_scanner)
    env = {**os.environ, "nnUNet_raw": str(root / "nnUNet_raw"),
           "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"), "nnUNet_n_proc_DA": "2"}
    _run(["nnssl_plan_and_preprocess", "-d", str(preset.dataset_id), "-c", preset.configuration, "-np", "2"], env,
         root / f"plan_{preset.dataset_id}.log")
    if preset.narrow:
        shrink_network(root / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json")


def write_learning_curves(results: list[RunResult], out: Path) -> list[str]:
    """``learning_curves_<dataset>_seed<s>.png`` for every dataset and seed whose rows have curves; returns the
    convergence lines (fully supervised reference vs labeled-only) for benchmark.md."""
    from nnssl.benchmark.curves import convergence_check, convergence_text, plot_curves

    lines = []
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        if r.curve and r.curve.get("ema_fg_dice") and r.budget == ITERATIONS:
            groups.setdefault((r.dataset, r.seed), []).append(r)
    for (dataset, seed), rows in sorted(groups.items()):
        by_trainer = {r.trainer: r for r in rows}
        check = convergence_check(getattr(by_trainer.get(BASELINE), "curve", None),
                                  getattr(by_trainer.get(FULL_REFERENCE), "curve", None))
        lines.append(f"- {dataset} seed {seed}: {convergence_text(check)}")
        plot_curves({_short(r.trainer): r.curve for r in rows}, rows[0].iterations_per_epoch or 250,
                    out / f"learning_curves_{dataset}_seed{seed}.png",
                    f"{dataset} seed {seed}: validation Dice per epoch (thin), trailing mean (thick)")
    return lines


@report_user_errors("nnssl_benchmark")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark nnssl trainers against supervised nnU-Net.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", type=int, help="dataset id (planned with nnssl_plan_and_preprocess)")
    src.add_argument("--synthetic", action="store_true", help="generate the synthetic 3D and 2D sets")
    parser.add_argument("-c", default="3d_fullres", help="configuration (with -d)")
    parser.add_argument("-f", default=None,
                        help="fold (default: all labeled cases; a preset with validation cases: fold 0, which "
                             "trains on all labeled cases and validates on them)")
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=None,
                        help=f"synthetic presets (default: {' '.join(DEFAULT_PRESETS)}; nnssl.benchmark.presets)")
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
    parser.add_argument("--reference-repeats", type=int, default=1, metavar="R",
                        help=f"train the labeled-only reference R times per seed (other initialisation and sampling, "
                             f"same data) and measure every row against their per-case mean (rows {BASELINE}"
                             f"{REPEAT_SEP}2 ... {REPEAT_SEP}R; default 1)")
    parser.add_argument("--no-full-reference", action="store_true",
                        help=f"skip the fully supervised reference ({FULL_REFERENCE}: {BASELINE} on the labeled + "
                             f"unlabeled cases with their withheld labels; default: run it when labelsUnlabeled has "
                             f"every unlabeled case's label)")
    parser.add_argument("--full-dataset-id", type=int, default=None,
                        help=f"id of the fully labeled dataset of the {FULL_REFERENCE} row (with -d; replaced on every "
                             f"run; default: a free id in 900..999, reused on reruns)")
    parser.add_argument("--budget", choices=BUDGETS, default=ITERATIONS,
                        help="iterations (default): every row trains the schedule; time: every SSL row trains as "
                             f"long as {BASELINE} on it (iterations per epoch scaled by a short speed calibration, "
                             "saved under OUTPUT/calibration); both: both sets of rows (the references are shared)")
    parser.add_argument("--generated-images", type=int, default=None,
                        help="images stage 1 generates for the rows <trainer>[real+generated] and <trainer>[generated] "
                             "(default: as many as the real unlabeled cases)")
    parser.add_argument("--ldm-preset", default="tiny",
                        help="nnssl_generate_unlabeled --preset of those rows (default tiny: the CPU size)")
    parser.add_argument("--ldm-epochs", type=int, nargs=2, default=None, metavar=("AE", "LDM"),
                        help="autoencoder and diffusion epochs of that stage (default: the preset's)")
    parser.add_argument("--tables-only", action="store_true",
                        help="write the tables from the finished rows under OUTPUT/rows, training nothing (rows not "
                             "computed yet are listed as such): a table built in pieces, or rows of several runs "
                             "copied into one rows/ folder")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--disable-tta", dest="tta", action="store_false", default=None,
                     help="predict the test set without mirroring (nnUNetv2_predict --disable_tta; default with "
                          "--synthetic)")
    tta.add_argument("--tta", dest="tta", action="store_true",
                     help="predict the test set with nnU-Net's mirroring (default with -d)")
    args = parser.parse_args(argv)
    if args.synthetic and args.pl_dataset_id is not None:
        parser.error(f"--pl-dataset-id is for -d; a synthetic preset uses its id + {PL_OFFSET}")
    if args.synthetic and args.full_dataset_id is not None:
        parser.error(f"--full-dataset-id is for -d; a synthetic preset uses its id + {FULL_OFFSET}")
    if args.preset and not args.synthetic:
        parser.error("--preset goes with --synthetic")
    if args.reference_repeats < 1:
        parser.error(f"--reference-repeats: at least 1, got {args.reference_repeats}")
    if not args.synthetic:
        args.f = args.f or "all"

    import torch

    from nnssl.cli.trainer_path import trainer_folder
    from nnssl.training.environment import ENV_SKIP_FINAL_VALIDATION

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder(), "PYTHONUNBUFFERED": "1",
           ENV_SKIP_FINAL_VALIDATION: "1"}
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    trainers = args.trainers or ([BASELINE, "nnUNetTrainerMeanTeacher"] if args.smoke else [BASELINE, *SSL_TRAINERS])
    # every check that can fail on user input runs before the output folder is made
    trainers = check_trainers([t for t in trainers if t != FULL_REFERENCE])  # the reference is a row, not a class
    if not args.synthetic:
        check_planned_dataset(args.d, args.c, env)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(is_pseudo_label_row(t) for t in trainers) and BASELINE not in trainers:
        print(f"nnssl_benchmark: the pseudo-label row fine-tunes the {BASELINE} model, so {BASELINE} runs too")
    if args.budget != ITERATIONS and BASELINE not in trainers:
        print(f"nnssl_benchmark: the time budget is the {BASELINE} run's time, so {BASELINE} runs too")
        trainers = [BASELINE, *trainers]
    trainers = order_rows(trainers, full_reference=not args.no_full_reference,
                          reference_repeats=args.reference_repeats)
    min_voxels = args.pl_min_voxels if args.pl_min_voxels is not None else (
        SYNTHETIC_PL_MIN_VOXELS if args.synthetic else 2000)
    disable_tta = not predict_with_mirroring(args.tta, args.synthetic)
    budgets = budgets_of(args.budget)
    calibration_schedule = SMOKE_CALIBRATION_SCHEDULE if args.smoke else CALIBRATION_SCHEDULE
    start = time.time()
    results: list[RunResult] = []
    if args.synthetic:
        presets = [SMOKE_PRESET] if args.smoke else [PRESETS[n] for n in (args.preset or DEFAULT_PRESETS)]
        for seed in args.seeds:
            root = out / f"data_seed{seed}"
            env_seed = {**env, "nnUNet_raw": str(root / "nnUNet_raw"),
                        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
                        "nnUNet_results": str(root / "nnUNet_results")}
            for preset in presets:
                dataset_id, configuration = preset.dataset_id, preset.configuration
                env_run = {**env_seed, **schedule_env(args.epochs or preset.epochs,
                                                      args.iterations or preset.iterations, preset.val_iterations,
                                                      args.lr or preset.lr)}
                # fixed ids of the derived datasets (each seed has its own nnUNet_raw): pseudo-labeled id + PL_OFFSET,
                # fully labeled id + FULL_OFFSET
                run = DatasetRun(dataset_id, configuration, args.f or preset.fold, env_run, seed,
                                 preset.data_text(seed), PseudoLabelRound(dataset_id + PL_OFFSET, min_voxels),
                                 dataset_id + FULL_OFFSET, f"seed {seed} {preset.name} ({dataset_id} {configuration})",
                                 calibration_schedule, synthetic_dataset_name(preset),
                                 (dataset_id + GENERATED_BOTH_OFFSET, dataset_id + GENERATED_ONLY_OFFSET),
                                 generation_settings(args, preset.n_unlabeled, seed))
                if not args.tables_only and rows_to_compute(run, trainers, budgets, out, device, disable_tta):
                    make_synthetic(root, preset, seed)  # deterministic in (preset, seed): a rerun makes the same data
                for budget in dict.fromkeys([ITERATIONS, *budgets]):
                    run_rows(run, budget_trainers(trainers, budget, budgets), out, device, disable_tta, results,
                             start, budget=budget, compute=not args.tables_only)
    else:
        if args.smoke:
            env.update(schedule_env(args.epochs or 1, args.iterations or 2, 1, args.lr))
        else:  # the trainers' own schedules (nnU-Net's 1000 x 250; 40 epochs of fine-tuning) unless given
            env.update(schedule_env(args.epochs, args.iterations, None, args.lr))
        run = DatasetRun(args.d, args.c, args.f, env, 0, raw_data_text(env, args.d), label=f"dataset {args.d} {args.c}",
                         calibration_schedule=calibration_schedule)
        if any(split_row_name(t)[1] for t in trainers):
            run.generated_ids = tuple(derived_dataset_id(out, registry, args.d, args.c, args.f, env, None,
                                                         "a dataset of the generated rows", "--trainers")
                                      for registry in GENERATED_REGISTRIES)
            split_text = (raw_folder(env, args.d) / "ssl_split.json").read_text(encoding="utf-8")
            n_real = len(json.loads(split_text)["unlabeled"])
            run.generation = generation_settings(args, n_real, 0)
            print(f"nnssl_benchmark: the datasets of the generated rows are {run.generated_ids}")
        if any(is_pseudo_label_row(t) for t in trainers):
            run.pl_round = PseudoLabelRound(pseudo_label_dataset_id(out, args.d, args.c, args.f, env,
                                                                    args.pl_dataset_id), min_voxels)
            print(f"nnssl_benchmark: the pseudo-labeled dataset of {PSEUDO_LABEL_TRAINER} is "
                  f"{run.pl_round.new_dataset_id}")
        full_skip = None
        if FULL_REFERENCE in trainers:
            full_skip = missing_withheld_labels(raw_folder(env, args.d))
            if full_skip is None:
                run.full_id = derived_dataset_id(out, FULL_REFERENCE_REGISTRY, args.d, args.c, args.f, env,
                                                 args.full_dataset_id, "the fully labeled dataset", "--full-dataset-id")
                if run.pl_round is not None and run.full_id == run.pl_round.new_dataset_id:
                    raise InputError(f"--full-dataset-id {run.full_id} is the pseudo-labeled dataset's id")
                print(f"nnssl_benchmark: the fully labeled dataset of {FULL_REFERENCE} is {run.full_id}")
        for budget in dict.fromkeys([ITERATIONS, *budgets]):
            run_rows(run, budget_trainers(trainers, budget, budgets), out, device, disable_tta, results, start,
                     full_skip, budget, compute=not args.tables_only)
    rows = write_outputs(results, out)
    print(markdown_table(rows))
    print(f"on {device}: {time.time() - start:.0f} s in all; tables in {out}")


if __name__ == "__main__":
    main()
