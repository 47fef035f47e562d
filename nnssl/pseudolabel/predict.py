"""Predict the unlabeled cases of a dataset with a trained nnU-Net model, into a resumable cache
(docs/methods/pseudolabel.md).

The network, sliding window, mirroring, preprocessing and the resampling back to the original geometry are all
nnU-Net's own (``nnUNetPredictor`` initialised from the trained model folder, nnU-Net's preprocessing iterator,
``convert_predicted_logits_to_segmentation_with_correct_shape``). What this module adds around them:

- **a cache next to the model**: ``<model folder>/pseudolabels/fold_<f>__<checkpoint stem>/`` (the model folder is
  ``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>``), so the predictions belong to the model that
  made them and are shared by every new dataset built from it. Per case it holds ``<case><file_ending>`` (the
  argmax label map, the dataset's own format and geometry), ``<case>.json`` (voxel count of every class, mean
  confidences; written last, it marks the case complete) and, with ``save_confidence``,
  ``<case>_confidence.npz`` (key ``confidence``: the per-voxel max softmax probability, float16, in the array
  layout of nnU-Net's segmentation: what its reader returns for the label file, without the leading channel
  axis). ``pseudolabel_cache.json`` identifies the model (checkpoint sha256) and the inference settings; when
  they change, the old predictions are discarded.
- **resumability**: every file is written under a temporary name and moved into place, the record last, so a
  killed run leaves no case that looks complete but is not; a rerun predicts only the missing cases. This is why
  nnU-Net's ``predict_from_files`` (which writes in place and counts any existing file as done) is not used as is.
- **parts** (``-num_parts N -part_id i``, :mod:`nnssl.parts`): part ``i`` predicts only its cases, through its own
  temporary folder, into the same cache; it refuses a cache holding another model's predictions (discarding them
  would delete what the other parts are writing): run once without parts, or pass another cache folder.
- **bounded memory**: one case at a time per export worker; confidence is reduced to the max probability in the
  worker, so no ``K``-channel probability map is ever written to disk (nnU-Net's ``--save_probabilities`` would
  write one per case).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nnssl.errors import InputError
from nnssl.io import atomic_write_json
from nnssl.parts import Part
from nnssl.pseudolabel.selection import class_voxel_counts

CACHE_MANIFEST = "pseudolabel_cache.json"
PARTIAL_DIR = ".partial"
CONFIDENCE_SUFFIX = "_confidence.npz"
CONFIDENCE_REGIONS = ("foreground", "all")


@dataclass(frozen=True)
class ModelSource:
    """The trained nnU-Net model that makes the pseudo-labels (one fold, or several folds ensembled)."""

    dataset_name: str
    trainer: str
    plans: str
    configuration: str
    folds: tuple[str, ...]
    checkpoint: str
    model_folder: str

    def checkpoint_files(self) -> list[Path]:
        return [Path(self.model_folder) / f"fold_{f}" / self.checkpoint for f in self.folds]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folds"] = list(self.folds)
        d["checkpoint_files"] = [str(p) for p in self.checkpoint_files()]
        return d


@dataclass(frozen=True)
class InferenceSettings:
    """What changes the predictions (and therefore invalidates a cache) plus what must be stored per case."""

    use_mirroring: bool = True
    tile_step_size: float = 0.5
    compute_confidence: bool = False
    save_confidence: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.tile_step_size <= 1:
            raise ValueError(f"tile step size must be in (0, 1], got {self.tile_step_size}")
        if self.save_confidence and not self.compute_confidence:
            object.__setattr__(self, "compute_confidence", True)


def resolve_model(dataset_name: str, trainer: str, plans: str, configuration: str, folds: Sequence[str],
                  checkpoint: str) -> ModelSource:
    """Locate the model folder in ``$nnUNet_results`` and check every checkpoint exists (clear error otherwise)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = Path(get_output_folder(dataset_name, trainer, plans, configuration))
    source = ModelSource(dataset_name, trainer, plans, configuration, tuple(str(f) for f in folds), checkpoint,
                         str(folder))
    missing = [str(p) for p in source.checkpoint_files() if not p.is_file()]
    if missing:
        hint = ""
        if folder.is_dir():
            found = sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))
            hint = f"; checkpoints in {folder}: {found or 'none'}"
        else:
            hint = f"; {folder} does not exist (train it with nnUNetv2_train, or check -tr/-p/-c)"
        raise FileNotFoundError(f"checkpoint(s) not found: {missing}{hint}")
    for f in ("plans.json", "dataset.json"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} not found: {folder} is not a complete nnU-Net model folder")
    return source


def default_cache_dir(source: ModelSource) -> Path:
    stem = source.checkpoint[:-len(".pth")] if source.checkpoint.endswith(".pth") else source.checkpoint
    return Path(source.model_folder) / "pseudolabels" / f"fold_{'_'.join(source.folds)}__{stem}"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_manifest(source: ModelSource, settings: InferenceSettings) -> dict[str, Any]:
    """Everything the cached predictions depend on. Confidence options are per case, not part of it."""
    return {
        "model": source.to_dict(),
        "checkpoint_sha256": [file_sha256(p) for p in source.checkpoint_files()],
        "use_mirroring": settings.use_mirroring,
        "tile_step_size": settings.tile_step_size,
    }


def label_path(cache_dir: Path, case_id: str, file_ending: str) -> Path:
    return cache_dir / f"{case_id}{file_ending}"


def record_path(cache_dir: Path, case_id: str) -> Path:
    return cache_dir / f"{case_id}.json"


def confidence_path(cache_dir: Path, case_id: str) -> Path:
    return cache_dir / f"{case_id}{CONFIDENCE_SUFFIX}"


def load_record(cache_dir: Path, case_id: str) -> dict[str, Any] | None:
    """The case's record, or None when it is missing or unreadable (i.e. the case is not done)."""
    try:
        return json.loads(record_path(cache_dir, case_id).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_case_complete(cache_dir: Path, case_id: str, file_ending: str, settings: InferenceSettings) -> bool:
    """A case is complete when its record exists, its label file has the size the record saw after writing it,
    and what the current options need (a mean confidence, a confidence map) is there."""
    record = load_record(cache_dir, case_id)
    if record is None:
        return False
    label = label_path(cache_dir, case_id, file_ending)
    if not label.is_file() or label.stat().st_size != record.get("label_bytes"):
        return False
    if settings.compute_confidence and record.get("mean_confidence") is None:
        return False
    if settings.save_confidence and not confidence_path(cache_dir, case_id).is_file():
        return False
    return True


def prepare_cache(cache_dir: Path, manifest: dict[str, Any], part: Part = Part()) -> None:
    """Create the cache, drop leftovers of this part's killed run, and discard predictions made by another
    model/settings (a part refuses instead: the other parts may be writing there)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache_dir / part.partial_dir_name(PARTIAL_DIR), ignore_errors=True)
    manifest_file = cache_dir / CACHE_MANIFEST
    if manifest_file.is_file():
        try:
            old = json.loads(manifest_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
        if old != manifest and not part.is_whole:
            raise InputError(f"{manifest_file}: the cache holds predictions of another checkpoint or other inference "
                             f"settings; a part does not discard them (other parts write there): run once without "
                             f"-num_parts, or pass another --cache-dir")
        if old != manifest:
            print(f"note: {cache_dir} holds predictions of another checkpoint or other inference settings; "
                  f"they are discarded and the cases predicted again")
            for entry in cache_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    atomic_write_json(manifest_file, manifest)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(min(values.mean(dtype=np.float64), 1.0)) if values.size else None


def export_case(logits: np.ndarray, properties: dict, case_id: str, cache_dir: str, plans: dict,
                configuration: str, dataset_json: dict, compute_confidence: bool, save_confidence: bool,
                partial_name: str = PARTIAL_DIR) -> dict:
    """Resample ``logits`` to the original image, write the argmax label map, its statistics and (optionally)
    the max-probability map atomically into ``cache_dir``; return the case record.

    Runs in an export worker (spawn), so it takes plain picklable arguments and rebuilds nnU-Net's managers."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cache = Path(cache_dir)
    partial = cache / partial_name
    partial.mkdir(exist_ok=True)
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    result = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties,
        return_probabilities=compute_confidence)
    del logits
    segmentation, probabilities = result if compute_confidence else (result, None)
    num_classes = max(label_manager.all_labels) + 1
    counts = class_voxel_counts(segmentation, num_classes)

    mean_all = mean_foreground = None
    if probabilities is not None:
        confidence = probabilities.max(axis=0)
        del probabilities
        mean_all = _mean_or_none(confidence)
        mean_foreground = _mean_or_none(confidence[segmentation > 0])
        if save_confidence:
            tmp = partial / f"{case_id}{CONFIDENCE_SUFFIX}"
            np.savez_compressed(tmp, confidence=confidence.astype(np.float16))
            os.replace(tmp, confidence_path(cache, case_id))
        del confidence

    ending = dataset_json["file_ending"]
    tmp_label = partial / f"{case_id}{ending}"  # the writer picks the format from the ending
    plans_manager.image_reader_writer_class().write_seg(segmentation, str(tmp_label), properties)
    final_label = label_path(cache, case_id, ending)
    os.replace(tmp_label, final_label)
    record = {
        "case_id": case_id,
        "label_file": final_label.name,
        "label_bytes": final_label.stat().st_size,
        "shape": [int(s) for s in segmentation.shape],
        "voxel_counts": [int(c) for c in counts],
        "mean_confidence": mean_all,
        "mean_foreground_confidence": mean_foreground,
        "confidence_file": confidence_path(cache, case_id).name if save_confidence else None,
    }
    atomic_write_json(record_path(cache, case_id), record)  # last: marks the case complete
    return record


def _inline_preprocessing(cases: dict[str, list[str]], plans_manager, configuration_manager,
                          dataset_json: dict) -> Iterator[dict]:
    import torch

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    for case_id, files in cases.items():
        data, _, properties = preprocessor.run_case(files, None, plans_manager, configuration_manager, dataset_json)
        yield {"data": torch.from_numpy(data).float(), "data_properties": properties, "ofile": case_id}


def _preprocessed_cases(cases: dict[str, list[str]], predictor, num_processes: int) -> Iterator[dict]:
    """nnU-Net's background preprocessing (``num_processes >= 1``) or the same steps in this process (0)."""
    if num_processes == 0:
        yield from _inline_preprocessing(cases, predictor.plans_manager, predictor.configuration_manager,
                                         predictor.dataset_json)
        return
    from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles

    yield from preprocessing_iterator_fromfiles(
        list(cases.values()), None, list(cases.keys()), predictor.plans_manager, predictor.dataset_json,
        predictor.configuration_manager, num_processes, predictor.device.type == "cuda", False)


def make_device(name: str | None):
    """``torch.device`` for ``-device`` as ``nnUNetv2_predict`` sets it up; ``None`` means CUDA when present."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cuda", "cpu", "mps"):
        raise ValueError(f"-device must be cuda, cpu or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda was requested but torch sees no CUDA device; use -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("-device mps was requested but MPS is not available; use -device cpu")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        # as nnUNetv2_predict: the GPU does the work, CPU threads would only contend with the export workers
        torch.set_num_threads(1)
    return torch.device(name)


def make_predictor(source: ModelSource, settings: InferenceSettings, device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=settings.tile_step_size, use_gaussian=True,
                                use_mirroring=settings.use_mirroring, perform_everything_on_device=True,
                                device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(source.model_folder, source.folds, source.checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise ValueError(f"configuration {source.configuration!r} is a cascade stage; pseudo-label with a model of "
                         f"a non-cascaded configuration (3d_fullres, 3d_lowres or 2d)")
    if predictor.label_manager.has_regions:
        raise ValueError(f"{source.dataset_name} is trained on regions; region-based pseudo-labels are not supported")
    return predictor


def predict_unlabeled(source: ModelSource, cases: dict[str, list[str]], cache_dir: str | os.PathLike,
                      settings: InferenceSettings, device_name: str | None = None,
                      num_processes_preprocessing: int = 2, num_processes_export: int = 2,
                      show_progress: bool = True, part: Part = Part()) -> dict[str, dict[str, Any]]:
    """Predict every case of ``cases`` (case id -> channel files; with ``part`` only that part's) not yet complete
    in ``cache_dir``; return the record of every such case (cached and new), keyed by case id.

    ``num_processes_preprocessing`` / ``num_processes_export``: nnU-Net's ``-npp`` / ``-nps``; 0 runs that step
    in this process (slower on big data, lighter on small machines and in tests).
    """
    from tqdm import tqdm

    if num_processes_preprocessing < 0 or num_processes_export < 0:
        raise ValueError("-npp and -nps must be >= 0")
    cache = Path(cache_dir)
    cases = {c: cases[c] for c in part.select(cases)}
    prepare_cache(cache, cache_manifest(source, settings), part)
    model_dataset_json = json.loads((Path(source.model_folder) / "dataset.json").read_text(encoding="utf-8"))
    ending = model_dataset_json["file_ending"]
    todo = {c: [str(f) for f in files] for c, files in cases.items()
            if not is_case_complete(cache, c, ending, settings)}
    print(f"{len(cases) - len(todo)}/{len(cases)} unlabeled cases{part.describe()} already predicted in {cache}")
    if todo:
        device = make_device(device_name)
        predictor = make_predictor(source, settings, device)
        plans = predictor.plans_manager.plans
        args = (str(cache), plans, source.configuration, predictor.dataset_json, settings.compute_confidence,
                settings.save_confidence, part.partial_dir_name(PARTIAL_DIR))
        bar = tqdm(total=len(todo), desc="pseudo-labels", unit="case", disable=not show_progress)
        try:
            if num_processes_export == 0:
                for item in _preprocessed_cases(todo, predictor, num_processes_preprocessing):
                    logits = predictor.predict_logits_from_preprocessed_data(_as_tensor(item["data"])).numpy()
                    export_case(logits, item["data_properties"], item["ofile"], *args)
                    bar.update()
            else:
                _predict_with_export_pool(predictor, todo, args, num_processes_preprocessing, num_processes_export,
                                          bar)
        finally:
            bar.close()
    shutil.rmtree(cache / part.partial_dir_name(PARTIAL_DIR), ignore_errors=True)
    if part.is_whole:  # run after the parts: what a killed part left behind
        for leftover in cache.glob(f"{PARTIAL_DIR}-part*"):
            shutil.rmtree(leftover, ignore_errors=True)
    missing = [c for c in cases if not is_case_complete(cache, c, ending, settings)]
    if missing:
        raise RuntimeError(f"prediction finished but cases are incomplete in {cache}: {missing[:10]}")
    return {c: load_record(cache, c) for c in cases}


def _as_tensor(data):
    import torch

    if isinstance(data, str):  # nnU-Net's iterator may hand over big arrays as a temporary .npy file
        array = np.load(data)
        os.remove(data)
        return torch.from_numpy(array)
    return data


def _predict_with_export_pool(predictor, todo: dict[str, list[str]], args: tuple, npp: int, nps: int, bar) -> None:
    """nnU-Net's own scheme: the main process predicts, a spawn pool resamples and writes, with at most a couple
    of cases queued so that a fast GPU cannot pile up logits in memory."""
    from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

    with multiprocessing.get_context("spawn").Pool(nps) as pool:
        workers = list(pool._pool)
        pending: list = []
        for item in _preprocessed_cases(todo, predictor, npp):
            while check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=2):
                time.sleep(0.1)
            logits = predictor.predict_logits_from_preprocessed_data(_as_tensor(item["data"])).numpy()
            pending.append(pool.apply_async(export_case, (logits, item["data_properties"], item["ofile"], *args)))
            done = [p for p in pending if p.ready()]
            for p in done:
                p.get()  # re-raises an export error here
                pending.remove(p)
                bar.update()
        for p in pending:
            while not p.ready():
                if not all(w.is_alive() for w in workers):
                    raise RuntimeError("an export worker died (probably out of CPU memory); use fewer -nps")
                p.wait(0.1)
            p.get()
            bar.update()
