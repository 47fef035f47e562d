"""``nnssl_pseudolabel``: offline pseudo-labeling as in the FLARE22 paper of Gao, Xu & Fei
(docs/methods/pseudolabel.md).

1. predict every unlabeled case of dataset ``-d`` with a trained nnU-Net model (nnU-Net's own predictor; cached
   and resumable, see :mod:`nnssl.pseudolabel.predict`);
2. keep a case iff every foreground class has ``>= --min-voxels`` voxels in its pseudo-label (the paper: 2000),
   optionally also ``mean confidence >= --min-confidence`` and at most ``--max-cases`` cases, most confident first
   (:func:`nnssl.pseudolabel.selection.select_cases`);
3. write dataset ``-o NEW_ID`` = labeled + selected ``pl_*`` cases (:mod:`nnssl.pseudolabel.dataset`), with a
   report of every decision.

With ``-num_parts N -part_id i`` (nnUNetv2_predict's options) a run does step 1 for its part of the cases only, so N
GPUs or nodes sharing a file system predict concurrently into one cache; the same command without parts then finds
every case predicted (predicting what is missing) and does steps 2-3.

Then fine-tune the first model on it with ``nnUNetTrainerPseudoLabelFinetune`` (its docstring has the whole
recipe). The new dataset is a valid input of this command again, so rounds can be repeated.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Sequence

from nnssl.errors import report_user_errors
from nnssl.parts import Part, add_part_arguments
from nnssl.pseudolabel.dataset import (
    REPORT_MD,
    RawDataset,
    check_new_dataset_id,
    dataset_folder_name,
    default_new_name,
    derive_splits,
    discard_stale_derived_data,
    link_validation_cases,
    load_raw_dataset,
    preprocess_with_source_plans,
    pseudo_id,
    withheld_label_dice,
    write_pseudo_labeled_dataset,
)
from nnssl.pseudolabel.predict import (
    CONFIDENCE_REGIONS,
    InferenceSettings,
    ModelSource,
    default_cache_dir,
    label_path,
    predict_unlabeled,
    resolve_model,
)
from nnssl.pseudolabel.selection import CaseStats, SelectionDecision, select_cases


def selection_rule(min_voxels: int, min_confidence: float | None, max_cases: int | None, classes: list[int],
                   confidence_region: str) -> dict[str, Any]:
    return {"min_voxels": min_voxels, "classes_checked": classes, "min_confidence": min_confidence,
            "max_cases": max_cases, "confidence_region": confidence_region,
            "rule": "keep a case iff every checked class has >= min_voxels voxels in its argmax pseudo-label"
                    + (f" and mean {confidence_region} confidence >= min_confidence" if min_confidence is not None
                       else "")
                    + (", at most max_cases cases, most confident first" if max_cases is not None else "")}


def case_stats(records: dict[str, dict[str, Any]], confidence_region: str | None) -> list[CaseStats]:
    """Selection statistics of every predicted case. ``confidence_region`` 'foreground' uses the mean max-prob over
    the predicted foreground (the plain mean is dominated by easy background voxels), falling back to the mean over
    all voxels for a case with no foreground voxel; None leaves confidence out."""
    import numpy as np

    stats = []
    for case_id, record in sorted(records.items()):
        confidence = None
        if confidence_region is not None:
            confidence = record["mean_foreground_confidence"] if confidence_region == "foreground" else None
            if confidence is None:
                confidence = record["mean_confidence"]
        stats.append(CaseStats(case_id, np.asarray(record["voxel_counts"], dtype=np.int64), confidence))
    return stats


def build_report(source: RawDataset, new_name: str, model: ModelSource, cache_dir: Path,
                 records: dict[str, dict[str, Any]], decisions: list[SelectionDecision], rule: dict[str, Any],
                 stats: list[CaseStats], withheld_dice: dict[str, dict[int, float | None]]) -> dict[str, Any]:
    names = source.class_names()
    confidence = {s.case_id: s.mean_confidence for s in stats}
    cases = []
    for decision in decisions:
        record = records[decision.case_id]
        entry = {
            "case_id": decision.case_id,
            "selected": decision.selected,
            "new_id": pseudo_id(decision.case_id) if decision.selected else None,
            "reasons": list(decision.reasons),
            "voxel_counts": {names.get(k, str(k)): int(n) for k, n in enumerate(record["voxel_counts"])},
            "mean_confidence": record["mean_confidence"],
            "mean_foreground_confidence": record["mean_foreground_confidence"],
            "selection_confidence": confidence[decision.case_id],
            "pseudo_label_file": str(cache_dir / record["label_file"]),
        }
        if decision.case_id in withheld_dice:
            entry["dice_vs_withheld_label"] = {names.get(k, str(k)): d
                                               for k, d in withheld_dice[decision.case_id].items()}
        cases.append(entry)
    return {
        "source_dataset": source.name,
        "new_dataset": new_name,
        "model": model.to_dict(),
        "cache_dir": str(cache_dir),
        "selection": rule,
        "num_predicted": len(decisions),
        "num_selected": sum(d.selected for d in decisions),
        "selected": [d.case_id for d in decisions if d.selected],
        "cases": cases,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a readable Markdown table (one row per predicted case)."""
    class_names = list(report["cases"][0]["voxel_counts"])[1:] if report["cases"] else []
    has_dice = any("dice_vs_withheld_label" in c for c in report["cases"])
    lines = [
        f"# Pseudo-labels for {report['new_dataset']}",
        "",
        f"- source dataset: {report['source_dataset']}",
        f"- model: {report['model']['trainer']}__{report['model']['plans']}__{report['model']['configuration']}, "
        f"fold(s) {', '.join(report['model']['folds'])}, {report['model']['checkpoint']}",
        f"- rule: {report['selection']['rule']} (min_voxels {report['selection']['min_voxels']}, "
        f"min_confidence {report['selection']['min_confidence']}, max_cases {report['selection']['max_cases']})",
        f"- selected {report['num_selected']} of {report['num_predicted']} unlabeled cases",
        "",
    ]
    header = ["case", "selected", "new id", *(f"{n} voxels" for n in class_names), "confidence"]
    if has_dice:
        header.append("Dice vs withheld label (diagnostic)")
    header.append("reasons")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for case in report["cases"]:
        row = [case["case_id"], "yes" if case["selected"] else "no", case["new_id"] or "-",
               *(str(case["voxel_counts"][n]) for n in class_names), _fmt(case["selection_confidence"])]
        if has_dice:
            dice = case.get("dice_vs_withheld_label")
            row.append("-" if dice is None else ", ".join(f"{k} {_fmt(v)}" for k, v in dice.items()))
        row.append("; ".join(case["reasons"]).replace("|", "/"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run_pseudolabel(dataset: str, configuration: str, folds: Sequence[str], new_id: int,
                    trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                    checkpoint: str = "checkpoint_final.pth", new_name: str | None = None, min_voxels: int = 2000,
                    min_confidence: float | None = None, max_cases: int | None = None,
                    confidence_region: str = "foreground", save_confidence: bool = False,
                    use_mirroring: bool = True, tile_step_size: float = 0.5, device: str | None = None,
                    num_processes_preprocessing: int = 2, num_processes_export: int = 2,
                    cache_dir: str | None = None, overwrite: bool = False, show_progress: bool = True,
                    preprocess: bool = False, part: Part = Part()) -> dict[str, Any]:
    """Predict, select and write the new dataset; returns the report (also written into the new dataset).
    ``preprocess``: then plan (by moving the source's plans) and preprocess it for ``configuration``, so that it can
    be fine-tuned from the source model at once (:func:`preprocess_with_source_plans`). With a ``part`` of several,
    only predict that part's cases into the cache and return ``{"part": ..., "predicted": [case ids]}``."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if min_voxels < 0:
        raise ValueError(f"--min-voxels must be >= 0, got {min_voxels}")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    if max_cases is not None and max_cases < 1:
        raise ValueError(f"--max-cases must be >= 1, got {max_cases}")
    if confidence_region not in CONFIDENCE_REGIONS:
        raise ValueError(f"--confidence-region must be one of {CONFIDENCE_REGIONS}, got {confidence_region!r}")

    source_name = maybe_convert_to_dataset_name(dataset)
    source = load_raw_dataset(Path(nnUNet_raw.require()) / source_name)
    new_name = new_name or default_new_name(source_name)
    if part.is_whole:  # before the expensive part (a part writes only into the cache; the final run checks it)
        check_new_dataset_id(new_id, new_name, source_name, overwrite)
    model = resolve_model(source_name, trainer, plans, configuration, folds, checkpoint)
    needs_confidence = save_confidence or min_confidence is not None or max_cases is not None
    settings = InferenceSettings(use_mirroring=use_mirroring, tile_step_size=tile_step_size,
                                 compute_confidence=needs_confidence, save_confidence=save_confidence)
    cache = Path(cache_dir) if cache_dir else default_cache_dir(model)
    cases = {c: [str(f) for f in source.image_files("imagesUnlabeled", c)] for c in source.split.unlabeled}
    records = predict_unlabeled(model, cases, cache, settings, device, num_processes_preprocessing,
                                num_processes_export, show_progress, part)
    if not part.is_whole:
        print(f"part {part.part_id} of {part.num_parts}: {len(records)} unlabeled cases predicted in {cache}; when "
              f"every part has finished, run the same command without -num_parts -part_id to select the cases and "
              f"write dataset {new_id}")
        return {"part": [part.part_id, part.num_parts], "predicted": sorted(records)}

    foreground = sorted(k for k in source.class_names() if k > 0 and k != source.dataset_json["labels"].get("ignore"))
    stats = case_stats(records, confidence_region if needs_confidence else None)
    decisions = select_cases(stats, min_voxels=min_voxels, min_confidence=min_confidence, max_cases=max_cases,
                             classes=foreground, class_names=source.class_names())
    selected = [d.case_id for d in decisions if d.selected]
    label_files = {c: label_path(cache, c, source.file_ending) for c in records}
    rule = selection_rule(min_voxels, min_confidence, max_cases, foreground, confidence_region)
    destination = Path(nnUNet_raw.require()) / dataset_folder_name(new_id, new_name)
    report = build_report(source, destination.name, model, cache, records, decisions, rule, stats,
                          withheld_label_dice(source, label_files))
    round_info = {
        "source_dataset": source_name,
        "source_origin": source.split.origin,
        "model": {**model.to_dict(), "use_mirroring": use_mirroring, "tile_step_size": tile_step_size},
        "selection": rule,
        "cases": {pseudo_id(c): c for c in selected},
        "num_predicted": len(decisions),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    replaced = destination.exists()
    write_pseudo_labeled_dataset(source, destination, selected, label_files, round_info, report,
                                 report_markdown(report), overwrite=overwrite)
    if replaced:
        discard_stale_derived_data(destination.name)
    print(f"selected {len(selected)} of {len(decisions)} unlabeled cases; wrote {destination}\n"
          f"report: {destination / REPORT_MD}")
    if preprocess:
        new_pp = preprocess_with_source_plans(new_id, source_name, plans, [configuration],
                                              num_processes_preprocessing)
        # folds that mean what the source's mean: fold k trains on its cases plus every pl_ case and validates on
        # the same real cases (the source's 'val' cases live in its imagesVal: their preprocessed files are linked)
        source_pp = Path(str(nnUNet_preprocessed)) / source_name
        derive_splits(source_pp, new_pp, [pseudo_id(c) for c in selected])
        val = list(source.split.extra.get("val", []))
        if val:
            link_validation_cases(source_pp, new_pp, plans, configuration, val)
    print(next_steps(new_id, source_name, model, preprocess))
    return report


def next_steps(new_id: int, source_name: str, model: ModelSource, preprocessed: bool) -> str:
    steps = [] if preprocessed else [
        f"nnUNetv2_extract_fingerprint -d {new_id}",
        f"nnUNetv2_move_plans_between_datasets -s {source_name} -t {new_id} -sp {model.plans} -tp {model.plans}",
        f"cp $nnUNet_raw/{dataset_folder_name(new_id, '*')}/dataset.json $nnUNet_preprocessed/"
        f"{dataset_folder_name(new_id, '*')}/",
        f"nnUNetv2_preprocess -d {new_id} -plans_name {model.plans} -c {model.configuration}",
        "(or all of the above: rerun this command with --preprocess)",
    ]
    fold = model.folds[0]
    steps.append(f"nnUNetv2_train {new_id} {model.configuration} {fold} -p {model.plans} "
                 f"-tr nnUNetTrainerPseudoLabelFinetune -pretrained_weights {model.checkpoint_files()[0]}")
    return "next steps:\n  " + "\n  ".join(steps)


@report_user_errors("nnssl_pseudolabel")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_pseudolabel",
        description="Pseudo-label the unlabeled cases of a dataset with a trained nnU-Net model, keep the cases "
                    "whose pseudo-label has every organ (FLARE22 pseudo-labeling), and write a new raw dataset "
                    "NEW_ID = labeled + pl_* cases for fine-tuning (nnUNetTrainerPseudoLabelFinetune).")
    parser.add_argument("-d", required=True, help="source dataset id or name (must have imagesUnlabeled)")
    parser.add_argument("-c", required=True, help="configuration of the trained model, e.g. 3d_fullres")
    parser.add_argument("-f", nargs="+", required=True,
                        help="fold(s) of the trained model; several folds are ensembled (0 1 2 3 4, or all)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer of the model (default: nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    parser.add_argument("-o", type=int, required=True, help="id of the new dataset (must not exist)")
    parser.add_argument("--name", default=None, help="name of the new dataset (default: <source name>PL)")
    parser.add_argument("--min-voxels", type=int, default=2000,
                        help="keep a case iff every foreground class has at least this many voxels (default: 2000)")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="also require this mean max-softmax confidence (0..1; default: off)")
    parser.add_argument("--max-cases", type=int, default=None,
                        help="keep at most this many cases, most confident first (default: all that pass)")
    parser.add_argument("--confidence-region", choices=CONFIDENCE_REGIONS, default="foreground",
                        help="voxels the mean confidence is taken over (default: predicted foreground)")
    parser.add_argument("--save-confidence", action="store_true",
                        help="also store the per-voxel max softmax probability (<case>_confidence.npz in the cache)")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding window step (default: 0.5)")
    parser.add_argument("-device", choices=("cuda", "cpu", "mps"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("-npp", type=int, default=2, help="preprocessing processes (0: in this process; default 2)")
    parser.add_argument("-nps", type=int, default=2, help="export processes (0: in this process; default 2)")
    parser.add_argument("--cache-dir", default=None,
                        help="where predictions are cached (default: <model folder>/pseudolabels/fold_<f>__<chk>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset NEW_ID")
    parser.add_argument("--preprocess", action="store_true",
                        help="then plan NEW_ID with the source's plans (nnUNetv2_move_plans_between_datasets) and "
                             "preprocess configuration -c, ready for nnUNetTrainerPseudoLabelFinetune "
                             "-pretrained_weights")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_part_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_pseudolabel(args.d, args.c, args.f, args.o, trainer=args.tr, plans=args.p, checkpoint=args.chk,
                        new_name=args.name, min_voxels=args.min_voxels, min_confidence=args.min_confidence,
                        max_cases=args.max_cases, confidence_region=args.confidence_region,
                        save_confidence=args.save_confidence, use_mirroring=not args.disable_tta,
                        tile_step_size=args.step_size, device=args.device, num_processes_preprocessing=args.npp,
                        num_processes_export=args.nps, cache_dir=args.cache_dir, overwrite=args.overwrite,
                        show_progress=not args.no_progress, preprocess=args.preprocess,
                        part=Part(args.num_parts, args.part_id))
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no traceback
        print(f"nnssl_pseudolabel: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
