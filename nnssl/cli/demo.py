"""``nnssl_demo``: the whole nnssl workflow on an embedded synthetic dataset, through the real CLIs.

1. writes a synthetic 3D multi-organ dataset in the raw-format contract (few labeled, more unlabeled cases);
2. ``nnssl_plan_and_preprocess`` (nnU-Net's fingerprint/plans/preprocessing + the unlabeled cases);
3. ``nnUNetv2_train`` with the supervised baseline and with Mean Teacher, same labeled cases, same schedule;
4. ``nnUNetv2_predict`` on imagesTs and the nnssl evaluation;
5. prints a per-class Dice table of both models side by side.

On CPU the network is narrowed (8..64 features instead of 32..320) so the demo finishes in minutes; on a GPU
(``--device cuda``) nnU-Net's planned network is kept unless ``--narrow`` is given.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

DEMO_DATASET_ID = 990
DEFAULT_TRAINERS = ("nnUNetTrainerSupervised", "nnUNetTrainerMeanTeacher")


def _env(work: Path, args: argparse.Namespace) -> dict[str, str]:
    from nnssl.cli.trainer_path import trainer_folder

    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_extTrainer": trainer_folder(),
        "NNSSL_NUM_EPOCHS": str(args.epochs),
        "NNSSL_ITERATIONS_PER_EPOCH": str(args.iterations_per_epoch),
        "NNSSL_VAL_ITERATIONS_PER_EPOCH": "2",
        "PYTHONUNBUFFERED": "1",
    })
    if args.device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")  # background workers only compete for 2 cores on CPU
        env.setdefault("nnUNet_def_n_proc", "1")
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path, desc: str, total_epochs: int | None = None) -> None:
    """Run a console script, keep its full output in ``log``, show a progress bar (epochs when training)."""
    unit = "epoch" if total_epochs else "step"
    with open(log, "w", encoding="utf-8") as f, tqdm(total=total_epochs, desc=desc, unit=unit, leave=True) as bar:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                errors="replace")
        for line in proc.stdout:
            f.write(line)
            if total_epochs and re.search(r": Epoch time:", line):
                bar.update()
        rc = proc.wait()
        if not total_epochs:
            bar.update()
    if rc != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); full log: {log}\n" + "\n".join(tail))


def format_dice_table(results: dict[str, dict[str, float]], class_names: list[str]) -> str:
    """Rows = classes (+ mean), columns = trainers, plus the gain of the last trainer over the first."""
    trainers = list(results)
    head = ["class", *trainers] + (["gain"] if len(trainers) > 1 else [])
    rows = []
    for name in [*class_names, "mean"]:
        values = [results[t][name] for t in trainers]
        row = [name, *(f"{v:.3f}" for v in values)]
        if len(trainers) > 1:
            row.append(f"{values[-1] - values[0]:+.3f}")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run nnssl end to end on an embedded synthetic dataset: Mean "
                                                 "Teacher next to supervised nnU-Net on the same labeled cases.")
    parser.add_argument("--work-dir", default="nnssl_demo_work", help="output folder (default: ./nnssl_demo_work)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations-per-epoch", type=int, default=40)
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--test", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS))
    parser.add_argument("--narrow", action="store_true", help="narrow the network also on GPU")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing work dir first")
    args = parser.parse_args(argv)

    import shutil

    import torch

    from nnssl.evaluation.evaluate import evaluate_folders
    from nnssl.plans_tools import shrink_network
    from nnssl.synthetic import make_synthetic_dataset

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work_dir).resolve()
    if work.exists():
        if not args.overwrite:
            raise SystemExit(f"{work} exists; pass --overwrite to replace it or --work-dir to choose another")
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    env = _env(work, args)
    start = time.time()

    print(f"[1/4] synthetic dataset ({args.labeled} labeled, {args.unlabeled} unlabeled, {args.test} test) in {work}")
    raw = make_synthetic_dataset(work / "nnUNet_raw", DEMO_DATASET_ID, "3d", n_labeled=args.labeled,
                                 n_unlabeled=args.unlabeled, n_test=args.test, seed=args.seed)
    print("[2/4] nnssl_plan_and_preprocess")
    _run(["nnssl_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-c", "3d_fullres", "-np", "2"],
         {**env, "nnUNet_n_proc_DA": "2"}, work / "logs" / "plan_and_preprocess.log", "plan + preprocess")
    if args.device == "cpu" or args.narrow:
        shrink_network(work / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json")

    print(f"[3/4] training {len(args.trainers)} trainers, {args.epochs} x {args.iterations_per_epoch} iterations "
          f"each, on {args.device}")
    for trainer in args.trainers:
        _run(["nnUNetv2_train", str(DEMO_DATASET_ID), "3d_fullres", "all", "-tr", trainer, "-device", args.device],
             env, work / "logs" / f"train_{trainer}.log", trainer, total_epochs=args.epochs)

    print("[4/4] predicting imagesTs and evaluating")
    import json

    dataset_json = json.loads((raw / "dataset.json").read_text())
    results = {}
    for trainer in args.trainers:
        pred = work / "predictions" / trainer
        _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DEMO_DATASET_ID), "-c",
              "3d_fullres", "-f", "all", "-tr", trainer, "-device", args.device, "-npp", "1", "-nps", "1"],
             env, work / "logs" / f"predict_{trainer}.log", f"predict {trainer}")
        summary = evaluate_folders(pred, raw / "labelsTs", dataset_json["labels"], progress=False)
        per_class = {name: stats["dice"]["mean"] for name, stats in summary["per_class"].items()}
        per_class["mean"] = summary["foreground_mean"]["dice"]
        results[trainer] = per_class

    class_names = [n for n in dataset_json["labels"] if n != "background"]
    print(f"\nPer-class Dice on {args.test} synthetic test cases ({args.labeled} labeled cases, "
          f"{args.epochs * args.iterations_per_epoch} iterations each; {time.time() - start:.0f} s in all):\n")
    print(format_dice_table(results, class_names))
    print(f"\nEverything (datasets, checkpoints, logs, predictions) is in {work}")


if __name__ == "__main__":
    main(sys.argv[1:])
