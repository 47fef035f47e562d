"""``nnssl_benchmark``: trainers side by side on one dataset, configuration, fold and schedule.

For every trainer: ``nnUNetv2_train`` (through :mod:`nnssl.benchmark.launch`, which records peak memory), then
``nnUNetv2_predict`` on the test set and the nnssl evaluation (Dice, NSD). Writes ``benchmark.md``,
``benchmark.csv``, ``benchmark.json`` and ``benchmark.png`` with per-class Dice and NSD, their means, the gain
over the supervised baseline, seconds per training iteration and peak memory relative to the baseline.

The baseline is ``nnUNetTrainerSupervised``: nnU-Net's ``nnUNetTrainer`` unchanged except that it honours the
``NNSSL_*`` schedule variables, so every row trains on the same labeled cases for the same number of iterations.

``--synthetic`` generates a class-imbalanced 3D multi-organ set (few labeled, many unlabeled with withheld labels,
a labeled test set) and a 2D ultrasound-like set, and runs every seed in ``--seeds``; ``--smoke`` shrinks
everything to seconds (used by the test suite).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BASELINE = "nnUNetTrainerSupervised"
SSL_TRAINERS = (
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerCPS",
    "nnUNetTrainerGuidedNet",
    "nnUNetTrainerGuidedNet_FittedGMM",
    "nnUNetTrainerSDCL",
    "nnUNetTrainerDHC",
    "nnUNetTrainerMGCC",
)


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


def available_trainers(names: list[str]) -> list[str]:
    """The names nnU-Net can resolve (via nnUNet_extTrainer); unknown ones are reported and skipped."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    found = []
    for name in names:
        try:
            recursive_find_trainer_class_by_name(name)
            found.append(name)
        except RuntimeError:
            print(f"nnssl_benchmark: trainer {name} not found, skipped", file=sys.stderr)
    return found


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


def run_trainer(trainer: str, dataset_id: int, configuration: str, fold: str, env: dict[str, str], out: Path,
                device: str, seed: int) -> RunResult:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnssl.evaluation.evaluate import evaluate_folders

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    dataset = maybe_convert_to_dataset_name(dataset_id)
    raw = Path(env["nnUNet_raw"]) / dataset
    result = RunResult(trainer, dataset, seed)
    tag = f"{dataset}_{configuration}_{trainer}_seed{seed}"
    try:
        mem_file = out / f"{tag}_memory.json"
        _run([sys.executable, "-m", "nnssl.benchmark.launch", str(mem_file), "nnUNetv2_train", str(dataset_id),
              configuration, fold, "-tr", trainer, "-device", device], env, out / f"{tag}_train.log")
        memory = json.loads(mem_file.read_text())
        result.max_rss_mb = memory["max_rss_mb"]
        result.cuda_max_allocated_mb = memory["cuda_max_allocated_mb"]
        result.seconds_per_iteration = seconds_per_iteration((out / f"{tag}_train.log").read_text())
        pred = out / "predictions" / tag
        _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(dataset_id), "-c",
              configuration, "-f", fold, "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1"], env,
             out / f"{tag}_predict.log")
        dataset_json = json.loads((raw / "dataset.json").read_text())
        summary = evaluate_folders(pred, raw / "labelsTs", dataset_json["labels"],
                                   file_ending=dataset_json["file_ending"], progress=False)
        result.dice = {n: s["dice"]["mean"] for n, s in summary["per_class"].items()}
        result.nsd = {n: s["nsd"]["mean"] for n, s in summary["per_class"].items()}
    except Exception as e:  # one failing trainer must not lose the others' rows
        result.error = str(e).splitlines()[0][:300]
        print(f"nnssl_benchmark: {trainer} on {dataset} failed: {e}", file=sys.stderr)
    return result


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
            row: dict = {"dataset": dataset, "trainer": trainer, "seeds": len(mine), "failed": len(mine) - len(ok)}
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
                "s/iter", "time ×", "peak MB (GPU if CUDA, else RSS)", "mem ×"]
        lines += [f"### {dataset}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def f(v, fmt="{:.3f}"):
            return "n/a" if v is None or v != v else fmt.format(v)

        for r in ds_rows:
            if "dice_mean" not in r:
                lines.append(f"| {r['trainer']} | failed |" + " |" * (len(head) - 2))
                continue
            cells = [r["trainer"], *[f(r.get(f"dice_{c}")) for c in classes], f(r["dice_mean"]), f(r["nsd_mean"]),
                     f(r["gain_vs_supervised"], "{:+.3f}"), f(r["dice_seed_spread"]), f(r["sec_per_iter"]),
                     f(r["time_rel"], "{:.2f}"), f(r["peak_mb"], "{:.0f}"), f(r["memory_rel"], "{:.2f}")]
            lines.append("| " + " | ".join(cells) + " |")
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
        ax.tick_params(axis="x", rotation=45)
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
    specs = [(960 + seed * 2, "3d", "3d_fullres", 4, 16, 6), (961 + seed * 2, "2d", "2d", 6, 24, 10)]
    if smoke:
        specs = [(960 + seed * 2, "3d", "3d_fullres", 5, 3, 1)]
    for dataset_id, kind, configuration, n_l, n_u, n_t in specs:
        raw = make_synthetic_dataset(root / "nnUNet_raw", dataset_id, kind, n_labeled=n_l, n_unlabeled=n_u,
                                     n_test=n_t, seed=seed, overwrite=True)
        env = {**os.environ, "nnUNet_raw": str(root / "nnUNet_raw"),
               "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"), "nnUNet_n_proc_DA": "2"}
        _run(["nnssl_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2"], env,
             root / f"plan_{dataset_id}.log")
        shrink_network(root / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json")
        made.append((dataset_id, configuration))
    return made


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="synthetic data seeds")
    parser.add_argument("-o", "--output", default="nnssl_benchmark", help="output folder")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: tiny data and schedule")
    args = parser.parse_args(argv)

    import torch

    from nnssl.cli.trainer_path import trainer_folder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or (1 if args.smoke else 8)
    iterations = args.iterations or (2 if args.smoke else 40)
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder(), "NNSSL_NUM_EPOCHS": str(epochs),
           "NNSSL_ITERATIONS_PER_EPOCH": str(iterations), "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1" if args.smoke else "2",
           "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    trainers = args.trainers or ([BASELINE, "nnUNetTrainerMeanTeacher"] if args.smoke else [BASELINE, *SSL_TRAINERS])
    trainers = available_trainers(trainers)
    start = time.time()
    results: list[RunResult] = []
    if args.synthetic:
        for seed in args.seeds:
            root = out / f"data_seed{seed}"
            env_seed = {**env, "nnUNet_raw": str(root / "nnUNet_raw"),
                        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
                        "nnUNet_results": str(root / "nnUNet_results")}
            for dataset_id, configuration in _synthetic_datasets(root, seed, args.smoke):
                for trainer in trainers:
                    print(f"[{time.time() - start:.0f} s] seed {seed} dataset {dataset_id} {configuration}: {trainer}")
                    results.append(run_trainer(trainer, dataset_id, configuration, args.f, env_seed, out, device,
                                               seed))
                    write_outputs(results, out)
    else:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            if k not in env:
                raise SystemExit(f"nnssl_benchmark: {k} is not set")
        for trainer in trainers:
            print(f"[{time.time() - start:.0f} s] dataset {args.d} {args.c}: {trainer}")
            results.append(run_trainer(trainer, args.d, args.c, args.f, env, out, device, 0))
            write_outputs(results, out)
    rows = write_outputs(results, out)
    print(markdown_table(rows))
    print(f"{epochs} epochs x {iterations} iterations per trainer on {device}; {time.time() - start:.0f} s in all; "
          f"tables in {out}")


if __name__ == "__main__":
    main()
