"""``nnssl_generate_unlabeled -d ID -c 2d -n N``: MGCC's first stage inside nnssl.

Trains MONAI's latent diffusion model (:mod:`.train`) on the dataset's training images at the configuration's
preprocessing (:mod:`.data`), samples ``N`` images (:mod:`.sample`), adds them to the raw dataset as unlabeled
cases through ``nnssl_add_unlabeled``'s own code (:func:`dataset_conversion.add_unlabeled.add_cases`: same checks,
atomic write, ids listed as ``unlabeled`` in ssl_split.json with their provenance ``generated``, model and seed),
preprocesses the new cases with ``nnssl_preprocess_unlabeled``'s function and writes a sanity report
(:mod:`.report`).

The model lives in ``$nnUNet_results/DatasetXXX/nnssl_generative/<configuration>__<preset>__seed<S>/`` (settings
and training case ids in ``model.json``, checkpoints, ``samples/``, ``report/``). Running the command again resumes a
killed training from its last checkpoint, keeps the images a killed sampling run finished, and otherwise adds
``N`` more images with the next free ids (``<prefix>ldm_<preset>_s<S>_<index>``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from nnssl.errors import InputError, OutputExistsError, report_user_errors
from nnssl.io import atomic_write_json

from .data import (
    GENERATED,
    check_configuration,
    check_enough_images,
    load_training_images,
    training_case_files,
    work_size,
)
from .settings import PRESETS, get_settings, json_ready

PROG = "nnssl_generate_unlabeled"
MODEL_ROOT = "nnssl_generative"


def model_key(configuration: str, preset: str, seed: int) -> str:
    return f"{MODEL_ROOT}/{configuration}__{preset}__seed{seed}"


def case_id(prefix: str, preset: str, seed: int, index: int) -> str:
    return f"{prefix}ldm_{preset}_s{seed}_{index:05d}"


def next_index(split, key: str) -> int:
    """One past the highest index of the cases this model added before (0 for none)."""
    indices = [v.get("index", -1) for v in split.extra.get("provenance", {}).values()
               if isinstance(v, dict) and v.get("source") == GENERATED and v.get("model") == key]
    return max(indices, default=-1) + 1


def check_model_dir(folder: Path, identity: dict, overwrite: bool) -> None:
    """A model folder belongs to one set of settings and training cases; anything else needs ``--overwrite``."""
    import json

    record = folder / "model.json"
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved != identity and not overwrite:
            differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            raise OutputExistsError(f"{folder}: a model trained with other {', '.join(differ)}; pass --overwrite to "
                                    f"train it again (its images already in the dataset stay), or choose another "
                                    f"--seed / --preset")
        if saved != identity:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, identity)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("-device cuda: no CUDA device available; use -device cpu")
    return torch.device(name)


def generate_unlabeled(dataset: str | int, configuration: str, n: int, preset: str = "monai2d", seed: int = 0,
                       prefix: str = "gen_", device: str | None = None, plans_identifier: str = "nnUNetPlans",
                       overwrite: bool = False, num_processes: int = 1, progress: bool = True,
                       ae_epochs: int | None = None, ldm_epochs: int | None = None) -> dict:
    """The whole command; returns ``{"added": [...], "model_dir": Path, "report": {...}, "seconds": {...}}``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from dataset_conversion.add_unlabeled import add_cases, check_prefix
    from nnssl.preprocessing.unlabeled import preprocess_unlabeled, preprocessing_signature
    from nnssl.split import SPLIT_FILE_NAME, load_and_validate

    from .report import write_report
    from .sample import case_files, case_seed, is_done, sample_cases, write_case
    from .train import train_autoencoder, train_diffusion

    if n < 0:
        raise InputError(f"-n {n}: must be 0 or more")
    check_prefix(prefix)
    settings = get_settings(preset, ae_epochs, ldm_epochs)
    torch_device = _device(device)
    name = maybe_convert_to_dataset_name(dataset)
    raw_dir = Path(nnUNet_raw.require()) / name
    pp_dir = Path(nnUNet_preprocessed.require()) / name
    plans_file = pp_dir / f"{plans_identifier}.json"
    if not plans_file.is_file() or not (pp_dir / "dataset.json").is_file():
        raise InputError(f"{plans_file} not found: plan the dataset first (nnssl_plan_and_preprocess -d {dataset} "
                         f"-c {configuration})")
    plans, dataset_json = load_json(str(plans_file)), load_json(str(pp_dir / "dataset.json"))
    check_configuration(plans, configuration, name)
    split = load_and_validate(raw_dir)
    files = training_case_files(raw_dir, split, dataset_json)
    check_enough_images(len(files), name)

    seconds = {}
    t0 = time.time()
    training = load_training_images(files, plans, configuration, dataset_json, progress)
    cm = PlansManager(plans).get_configuration(configuration)
    patch = tuple(int(s) for s in cm.patch_size)
    size = work_size(patch, settings.downsampling())
    key = model_key(configuration, preset, seed)
    folder = Path(nnUNet_results.require()) / name / key
    identity = json_ready({"dataset": name, "configuration": configuration, "seed": seed,
                           "settings": settings.to_dict(), "patch_size": patch, "image_size": size,
                           "training_cases": sorted(training.case_ids),
                           "preprocessing": preprocessing_signature(plans, configuration, dataset_json)})
    check_model_dir(folder, identity, overwrite)
    atomic_write_json(folder / "intensity_map.json", training.intensity.to_dict())
    ae = train_autoencoder(training.images, size, settings, folder, torch_device, seed, progress)
    unet, scale_factor = train_diffusion(training.images, size, ae, settings, folder, torch_device, seed, progress)
    seconds["training"] = round(time.time() - t0, 1)

    t0 = time.time()
    samples = folder / "samples"
    ending, n_channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    first = next_index(split, key)
    for stale in sorted(samples.glob(f"*_0000{ending}")) if samples.is_dir() else []:
        stale_id = stale.name[:-len(f"_0000{ending}")]
        if stale_id in split.unlabeled:  # added by a run killed before it cleaned up
            for p in case_files(samples, stale_id, n_channels, ending):
                p.unlink(missing_ok=True)
    todo = {case_id(prefix, preset, seed, i): i for i in range(first, first + n)}
    missing = {k: i for k, i in todo.items() if not is_done(samples, k, n_channels, ending)}
    if len(missing) < len(todo):
        print(f"{len(todo) - len(missing)} image(s) finished by an earlier run are kept")
    latent_shape = _latent_shape(ae, n_channels, size, torch_device)

    def write(image: np.ndarray, cid: str) -> None:
        write_case(image, samples, cid, training.intensity, ending, training.spacing, training.out_of_plane_spacing,
                   plans["transpose_backward"])

    sample_cases(ae, unet, scale_factor, settings, latent_shape, patch, missing, seed, write, torch_device, progress)
    seconds["sampling"] = round(time.time() - t0, 1)

    added = []
    if todo:
        provenance = {k: {"source": GENERATED, "model": key, "preset": preset, "seed": seed, "index": i,
                          "noise_seed": case_seed(seed, i)} for k, i in todo.items()}
        added = add_cases(raw_dir, {k: case_files(samples, k, n_channels, ending) for k in todo}, key, provenance,
                          num_processes=num_processes, progress=progress)
        for k in added:
            for p in case_files(samples, k, n_channels, ending):
                p.unlink(missing_ok=True)
        t0 = time.time()
        preprocess_unlabeled(name, [configuration], plans_identifier, num_processes, progress)
        seconds["preprocessing"] = round(time.time() - t0, 1)
    generated = [np.load(p).astype(np.float32) for p in sorted(samples.glob("*.npy"))] if samples.is_dir() else []
    report = None
    if generated:
        report = write_report(training.images, generated, training.raw_shapes, folder / "report",
                              {"model": key, "split_file": str(raw_dir / SPLIT_FILE_NAME), "seconds": seconds})
    return {"added": added, "model_dir": folder, "report": report, "seconds": seconds}


def _latent_shape(ae, n_channels: int, size: tuple[int, ...], device) -> tuple[int, ...]:
    import torch

    with torch.no_grad():
        return tuple(ae.encode_stage_2_inputs(torch.zeros((1, n_channels, *size), device=device)).shape[1:])


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name (planned)")
    parser.add_argument("-c", default="2d", metavar="CONFIGURATION", help="a 2D configuration (default: 2d)")
    parser.add_argument("-n", type=int, required=True, metavar="N", help="images to add (0: train only)")
    parser.add_argument("--preset", default="monai2d", choices=sorted(PRESETS),
                        help="model size and schedule (default monai2d: MONAI's 2D LDM tutorial; tiny: CPU tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and of its images (default 0)")
    parser.add_argument("--prefix", default="gen_", help="start of the new case ids (default gen_)")
    parser.add_argument("--ae-epochs", type=int, default=None, help="autoencoder epochs (default: the preset's)")
    parser.add_argument("--ldm-epochs", type=int, default=None, help="diffusion epochs (default: the preset's)")
    parser.add_argument("-device", default=None, choices=["cpu", "cuda", "mps"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-np", type=int, default=1, help="worker processes for adding and preprocessing")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain a model whose settings or training cases changed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = generate_unlabeled(args.d, args.c, args.n, args.preset, args.seed, args.prefix, args.device,
                                args.plans_name, args.overwrite, args.np, not args.no_progress, args.ae_epochs,
                                args.ldm_epochs)
    print(f"added {len(result['added'])} generated unlabeled case(s); model in {result['model_dir']}")
    print(f"seconds: {result['seconds']}")
    report = result["report"]
    if report is not None:
        print(f"sanity report: {result['model_dir'] / 'report' / 'report.md'} (look at real_vs_generated.png)")
        for warning in report["warnings"]:
            print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
