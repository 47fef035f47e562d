"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Predictions and references are paired by file name (``CASE<file_ending>`` in both folders). Files are read with
nnU-Net's reader/writer for the file ending (SimpleITK for ``.nii.gz``, the natural-image reader for ``.png``), so
the spacing is the one nnU-Net itself sees; 2D images (PNG: spacing 1 per pixel) are evaluated in 2D. The metrics
and the empty-mask convention are defined in :mod:`nnssl.evaluation.metrics`.

The summary returned by :func:`evaluate_folders` keeps undefined distances as ``float('nan')``;
:func:`write_outputs` stores them as ``null`` in ``summary.json`` (strict JSON) and ``nan`` in ``per_case.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
from tqdm import tqdm

from nnssl.evaluation.metrics import METRIC_NAMES, compute_case_metrics, evaluated_classes
from nnssl.io import atomic_write_json, atomic_write_text

SUMMARY_FILE_NAME = "summary.json"
PER_CASE_FILE_NAME = "per_case.csv"
EMPTY_MASK_CONVENTION = (
    "FLARE22: reference and prediction both empty -> Dice 1, NSD 1, HD95 0, ASD 0; exactly one empty -> Dice 0, "
    "NSD 0, HD95/ASD undefined (NaN/null), excluded from means and counted in n_undefined"
)
# nnU-Net's readers mark a 2D image by a leading axis of size 1 whose spacing is 999 times the largest real spacing.
_DUMMY_AXIS_SPACING_FACTOR = 999


@dataclass(frozen=True)
class CasePair:
    case: str
    prediction_file: Path
    reference_file: Path


def _cases_in(folder: Path, file_ending: str) -> dict[str, Path]:
    return {
        p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(file_ending)
    }


def _short_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def find_case_pairs(
    pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, file_ending: str = ".nii.gz", only_predicted: bool = False
) -> tuple[list[CasePair], list[str]]:
    """Pair ``CASE<file_ending>`` files of ``pred_dir`` and ``gt_dir`` by name.

    Every prediction needs a reference. Every reference needs a prediction unless ``only_predicted`` (e.g. the
    validation predictions of one fold against all of labelsTr); the references skipped that way are returned
    as the second element. Raises FileNotFoundError / ValueError listing the missing or extra files.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for role, folder in (("prediction", pred_dir), ("reference", gt_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{role} folder {folder} does not exist or is not a folder")
    predictions, references = _cases_in(pred_dir, file_ending), _cases_in(gt_dir, file_ending)
    if not references:
        raise ValueError(f"reference folder {gt_dir} contains no *{file_ending} files")
    if not predictions:
        raise ValueError(f"prediction folder {pred_dir} contains no *{file_ending} files")
    extra = sorted(set(predictions) - set(references))
    missing = sorted(set(references) - set(predictions))
    problems = []
    if extra:
        problems.append(f"{len(extra)} prediction(s) in {pred_dir} have no reference in {gt_dir}: {_short_list(extra)}")
    if missing and not only_predicted:
        problems.append(
            f"{len(missing)} reference(s) in {gt_dir} have no prediction in {pred_dir}: {_short_list(missing)} "
            "(use --only-predicted / only_predicted=True to evaluate the predicted cases only)"
        )
    if problems:
        raise ValueError(f"cannot pair *{file_ending} files by name:\n  " + "\n  ".join(problems))
    pairs = [CasePair(case, predictions[case], references[case]) for case in sorted(predictions)]
    return pairs, missing


def read_label_map(path: Path, reader_writer: type[BaseReaderWriter]) -> tuple[np.ndarray, list[float]]:
    """Read a segmentation with nnU-Net's reader; return the label map (2D or 3D) and its spacing per array axis."""
    try:
        seg, properties = reader_writer().read_seg(str(path))
    except Exception as error:  # the readers raise anything from RuntimeError to ValueError on bad files
        raise ValueError(f"cannot read segmentation {path} with {reader_writer.__name__}: {error}") from error
    label_map = np.asarray(seg[0])
    spacing = [float(s) for s in properties["spacing"]]
    if label_map.ndim == 3 and label_map.shape[0] == 1 and spacing[0] >= _DUMMY_AXIS_SPACING_FACTOR * max(spacing[1:]):
        label_map, spacing = label_map[0], spacing[1:]
    if not np.issubdtype(label_map.dtype, np.integer):
        rounded = np.rint(label_map)
        if not np.array_equal(rounded, label_map):
            raise ValueError(f"segmentation {path} contains non-integer values; expected a label map")
        label_map = rounded.astype(np.int32)
    return label_map, spacing


def _allowed_label_values(labels: Mapping[str, int | Sequence[int]]) -> np.ndarray:
    values = {0}
    for value in labels.values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return np.array(sorted(values))


def _check_label_values(label_map: np.ndarray, allowed: np.ndarray, path: Path) -> None:
    if not np.isin(label_map, allowed).all():
        unexpected = np.setdiff1d(np.unique(label_map), allowed)
        raise ValueError(
            f"{path} contains label value(s) {unexpected.tolist()} that are not in the dataset labels "
            f"{allowed.tolist()} (wrong dataset or wrong folder?)"
        )


def evaluate_case(
    pair: CasePair,
    labels: Mapping[str, int | Sequence[int]],
    tolerance_mm: float,
    reader_writer: type[BaseReaderWriter],
) -> dict[str, Any]:
    """Read one prediction/reference pair, check that they match, and compute all metrics for every class."""
    pred, pred_spacing = read_label_map(pair.prediction_file, reader_writer)
    gt, gt_spacing = read_label_map(pair.reference_file, reader_writer)
    if pred.shape != gt.shape:
        raise ValueError(
            f"case {pair.case}: prediction {pair.prediction_file} has shape {pred.shape} but reference "
            f"{pair.reference_file} has shape {gt.shape}"
        )
    if not np.allclose(pred_spacing, gt_spacing, rtol=1e-3, atol=1e-6):
        raise ValueError(
            f"case {pair.case}: prediction {pair.prediction_file} has spacing {pred_spacing} but reference "
            f"{pair.reference_file} has spacing {gt_spacing}"
        )
    allowed = _allowed_label_values(labels)
    _check_label_values(pred, allowed, pair.prediction_file)
    _check_label_values(gt, allowed, pair.reference_file)
    return {
        "case": pair.case,
        "prediction_file": str(pair.prediction_file),
        "reference_file": str(pair.reference_file),
        "spacing": gt_spacing,
        "metrics": compute_case_metrics(pred, gt, gt_spacing, labels, tolerance_mm),
    }


def _single_threaded_torch() -> None:
    # Each worker already is one of num_processes parallel jobs; torch's own thread pool on top would oversubscribe.
    import torch

    torch.set_num_threads(1)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def summarize_cases(per_case: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class mean/std over cases (NaN distances excluded and counted) and the mean over foreground classes.

    The standard deviation is the population one (numpy's default, ddof=0). ``foreground_mean`` is the mean of the
    per-class means, as in nnU-Net's summary.json.
    """
    per_class: dict[str, dict[str, dict[str, float | int]]] = {}
    for name in class_names:
        per_class[name] = {}
        for metric in METRIC_NAMES:
            values = [float(case["metrics"][name][metric]) for case in per_case]
            finite = _finite(values)
            per_class[name][metric] = {
                "mean": float(np.mean(finite)) if finite else float("nan"),
                "std": float(np.std(finite)) if finite else float("nan"),
                "n": len(finite),
                "n_undefined": len(values) - len(finite),
            }
    foreground_mean = {}
    for metric in METRIC_NAMES:
        class_means = _finite([per_class[name][metric]["mean"] for name in class_names])
        foreground_mean[metric] = float(np.mean(class_means)) if class_means else float("nan")
    return {"per_class": per_class, "foreground_mean": foreground_mean}


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    labels: Mapping[str, int | Sequence[int]],
    tolerance_mm: float = 1.0,
    num_processes: int = 1,
    file_ending: str = ".nii.gz",
    reader_writer: type[BaseReaderWriter] | None = None,
    only_predicted: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every prediction in ``pred_dir`` against the same-named reference in ``gt_dir``.

    ``labels`` is a dataset.json ``labels`` mapping. ``reader_writer`` defaults to nnU-Net's reader for
    ``file_ending`` (pass the dataset's ``overwrite_image_reader_writer`` class if it has one). Returns the summary
    dict (see module docstring); write it with :func:`write_outputs`.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"the NSD tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    classes = evaluated_classes(labels)
    pairs, skipped = find_case_pairs(pred_dir, gt_dir, file_ending, only_predicted)
    if reader_writer is None:
        reader_writer = determine_reader_writer_from_file_ending(
            file_ending, str(pairs[0].reference_file), verbose=False
        )
    evaluate_one = partial(evaluate_case, labels=dict(labels), tolerance_mm=tolerance_mm, reader_writer=reader_writer)
    with tqdm(total=len(pairs), desc="evaluating", unit="case", disable=not progress) as bar:
        if num_processes == 1:
            per_case = []
            for pair in pairs:
                per_case.append(evaluate_one(pair))
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
            with context.Pool(min(num_processes, len(pairs)), initializer=_single_threaded_torch) as pool:
                per_case = []
                for record in pool.imap(evaluate_one, pairs):
                    per_case.append(record)
                    bar.update()
    return {
        "prediction_folder": str(Path(pred_dir).resolve()),
        "reference_folder": str(Path(gt_dir).resolve()),
        "file_ending": file_ending,
        "tolerance_mm": float(tolerance_mm),
        "labels": {name: list(values) for name, values in classes.items()},
        "empty_mask_convention": EMPTY_MASK_CONVENTION,
        "num_cases": len(per_case),
        "references_without_prediction": skipped,
        **summarize_cases(per_case, list(classes)),
        "per_case": per_case,
    }


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(value) for value in obj]
    return obj


def per_case_csv(summary: Mapping[str, Any]) -> str:
    """One row per case and class: case, class, dice, nsd, hd95, asd, n_ref_voxels, n_pred_voxels."""
    columns = ["case", "class", *METRIC_NAMES, "n_ref_voxels", "n_pred_voxels"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in summary["per_case"]:
        for name, metrics in record["metrics"].items():
            writer.writerow(
                [
                    record["case"],
                    name,
                    *(repr(float(metrics[m])) for m in METRIC_NAMES),
                    metrics["n_ref_voxels"],
                    metrics["n_pred_voxels"],
                ]
            )
    return buffer.getvalue()


def write_outputs(summary: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Atomically write ``summary.json`` (NaN as null) and ``per_case.csv`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    summary_path, csv_path = output_dir / SUMMARY_FILE_NAME, output_dir / PER_CASE_FILE_NAME
    atomic_write_json(summary_path, _nan_to_none(dict(summary)))
    atomic_write_text(csv_path, per_case_csv(summary))
    return summary_path, csv_path


def _is_missing(value: float | None) -> bool:
    return value is None or math.isnan(value)  # a loaded summary.json has null where the dict had NaN


def _mean_std(stats: Mapping[str, Any], decimals: int) -> str:
    if _is_missing(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table: one row per class with mean ± std of Dice, NSD, HD95 and ASD, then the foreground mean.

    Accepts the dict from :func:`evaluate_folders` or a loaded ``summary.json`` (where NaN became null).
    """
    decimals = {"dice": 4, "nsd": 4, "hd95": 2, "asd": 2}
    headers = ["class", "Dice", f"NSD@{summary['tolerance_mm']:g}mm", "HD95 (mm)", "ASD (mm)"]
    class_rows = [
        [name, *(_mean_std(stats[m], decimals[m]) for m in METRIC_NAMES)]
        for name, stats in summary["per_class"].items()
    ]
    foreground = summary["foreground_mean"]
    foreground_row = [
        "foreground mean",
        *("n/a" if _is_missing(foreground[m]) else f"{foreground[m]:.{decimals[m]}f}" for m in METRIC_NAMES),
    ]
    widths = [max(len(row[i]) for row in [headers, *class_rows, foreground_row]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    rule = line(["-" * w for w in widths])
    lines = [f"{summary['num_cases']} case(s), mean ± std over cases", line(headers), rule]
    lines += [line(row) for row in class_rows] + [rule, line(foreground_row)]
    undefined = [
        f"{name} in {stats['hd95']['n_undefined']} case(s)"
        for name, stats in summary["per_class"].items()
        if stats["hd95"]["n_undefined"]
    ]
    if undefined:
        lines.append(
            "HD95/ASD undefined (prediction or reference empty, not both; excluded from the means): "
            + ", ".join(undefined)
        )
    return "\n".join(lines)
