"""What generated unlabeled images are worth (MGCC's question, issue "MGCC stage 1"): benchmark rows that train an
SSL trainer on the source's labeled cases with another unlabeled set, scored on the source's test set.

A row ``<trainer>[real+generated]`` trains on the real unlabeled cases plus ``n`` images of a latent diffusion model
(``nnssl_generate_unlabeled``, :mod:`nnssl.generative`) trained on the source's training images (labeled + real
unlabeled, never the test or validation set); ``<trainer>[generated]`` on the generated images only (the real
unlabeled cases left out). The plain ``<trainer>`` row is the real unlabeled set. Both derived datasets are planned
with the source's plans (same network, patch, normalisation), keep the source's labeled cases, folds, validation
and test cases, and come from one generation per seed:

    Dataset<both>_<Name>RealGen   source's labeled + real unlabeled (+ their withheld labels: the pseudo-label Dice
                                  diagnostic only) + n generated cases (stage 1 runs here)
    Dataset<only>_<Name>GenOnly   source's labeled + the same n generated cases (no withheld label: none exists)

Run as ``python -m nnssl.benchmark.generated -s SOURCE -b BOTH -g ONLY -c CFG -n N --preset P --seed S``
(nnssl_benchmark does, in a subprocess, so that nnU-Net's paths come from that run's environment). A finished build
is recorded in the ``ONLY`` dataset (``nnssl_benchmark_generated.json``) and reused when its settings match.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nnssl.io import atomic_output_dir, atomic_write_json
from nnssl.pseudolabel.dataset import (
    SPLIT_KEYS as PSEUDO_LABEL_SPLIT_KEYS,
)
from nnssl.pseudolabel.dataset import (
    RawDataset,
    _copy_case,
    _copy_label,
    check_new_dataset_id,
    copy_test_set,
    derive_splits,
    discard_stale_derived_data,
    link_validation_cases,
    preprocess_with_source_plans,
    write_derived_dataset_json,
)
from nnssl.split import SPLIT_FILE_NAME, SSLSplit, load_and_validate, save_split, validate_split_against_raw

VARIANTS = {"real+generated": "the real unlabeled cases plus the generated images",
            "generated": "the generated images only (the real unlabeled cases left out)"}
BOTH_SUFFIX, ONLY_SUFFIX = "RealGen", "GenOnly"
RECORD = "nnssl_benchmark_generated.json"
_ROW = re.compile(r"(?P<trainer>[A-Za-z0-9_]+)\[(?P<variant>[a-z+]+)\]")


def split_row_name(name: str) -> tuple[str, str | None]:
    """``nnUNetTrainerMGCC[generated]`` -> (``nnUNetTrainerMGCC``, ``generated``); a plain trainer -> (name, None).
    ValueError for an unknown variant."""
    match = _ROW.fullmatch(name)
    if match is None or match["variant"] == "ensemble":  # an ensemble row trains nothing new (benchmark.ensemble)
        return name, None
    if match["variant"] not in VARIANTS:
        raise ValueError(f"{name}: unknown unlabeled set [{match['variant']}]; use one of "
                         f"{', '.join(f'[{v}]' for v in VARIANTS)}")
    return match["trainer"], match["variant"]


@dataclass(frozen=True)
class GenerationSettings:
    """Stage 1 of the generated rows: how many images, which LDM preset and schedule, which seed."""

    n_images: int
    preset: str = "tiny"
    ae_epochs: int | None = None
    ldm_epochs: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _variant_split(source: RawDataset, unlabeled: list[str], provenance: dict, kind: str) -> SSLSplit:
    extra = {k: v for k, v in source.split.extra.items() if k not in PSEUDO_LABEL_SPLIT_KEYS and k != "provenance"}
    extra["unlabeled_set_of"] = {"source": source.name, "kind": kind}
    if provenance:
        extra["provenance"] = provenance
    return SSLSplit(labeled=list(source.split.labeled), unlabeled=unlabeled, test=list(source.split.test),
                    labeled_fraction=source.split.labeled_fraction, seed=source.split.seed,
                    origin=f"benchmark_{kind}:{source.name}", extra=extra)


def write_variant_dataset(source: RawDataset, destination: Path, unlabeled: dict[str, RawDataset],
                          withheld: bool, provenance: dict, kind: str) -> SSLSplit:
    """A raw dataset at ``destination``: ``source``'s labeled and test cases plus the unlabeled cases ``unlabeled``
    (case id -> the raw dataset holding its image), with their withheld labels when ``withheld``."""
    split = _variant_split(source, sorted(unlabeled), provenance, kind)
    ending = source.file_ending
    with atomic_output_dir(destination, overwrite=True, replace_only_with=("dataset.json", SPLIT_FILE_NAME)) as tmp:
        for case_id in source.split.labeled:
            _copy_case(source, "imagesTr", case_id, tmp, "imagesTr")
            _copy_label(source.root / "labelsTr" / f"{case_id}{ending}", tmp, "labelsTr", case_id, ending)
        for case_id, holder in sorted(unlabeled.items()):
            _copy_case(holder, "imagesUnlabeled", case_id, tmp, "imagesUnlabeled")
            label = holder.root / "labelsUnlabeled" / f"{case_id}{ending}"
            if withheld and label.is_file():  # read by the pseudo-label Dice diagnostic only, never by training
                _copy_label(label, tmp, "labelsUnlabeled", case_id, ending)
        copy_test_set(source, tmp)
        write_derived_dataset_json(source, destination, split, tmp, f"{source.name} with {VARIANTS[kind]} as its "
                                   f"unlabeled set (nnssl_benchmark)")
        save_split(split, tmp / SPLIT_FILE_NAME)
        validate_split_against_raw(split, tmp, strict=True)
    return split


def _load(root: Path) -> RawDataset:
    dataset_json = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    return RawDataset(root, root.name, dataset_json, load_and_validate(root))


def _plan_like_source(new_id: int, source: RawDataset, configuration: str, plans: str, num_processes: int) -> None:
    """The source's plans, folds and validation cases for ``new_id``; then its unlabeled cases preprocessed."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnssl.preprocessing.unlabeled import preprocess_unlabeled

    new_pp = preprocess_with_source_plans(new_id, source.name, plans, [configuration], num_processes)
    source_pp = Path(str(nnUNet_preprocessed)) / source.name
    derive_splits(source_pp, new_pp, [])
    val = list(source.split.extra.get("val", []))
    if val:
        link_validation_cases(source_pp, new_pp, plans, configuration, val)
    preprocess_unlabeled(new_id, [configuration], plans, num_processes, show_progress_bar=False)


def build(source_id: int, both_id: int, only_id: int, configuration: str, settings: GenerationSettings,
          plans: str = "nnUNetPlans", num_processes: int = 1, device: str | None = None) -> dict:
    """Both datasets of the generated rows (module docstring); returns what was done (the rows' notes), reusing an
    earlier build with the same settings."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnssl.generative.cli import generate_unlabeled
    from nnssl.generative.data import generated_case_ids

    raw_root = Path(str(nnUNet_raw))
    source = _load(raw_root / maybe_convert_to_dataset_name(source_id))
    short = source.name.split("_", 1)[1]
    both_name, only_name = f"Dataset{both_id:03d}_{short}{BOTH_SUFFIX}", f"Dataset{only_id:03d}_{short}{ONLY_SUFFIX}"
    identity = {"source": source.name, "source_split": source.split.to_dict(), "configuration": configuration,
                "settings": settings.to_dict()}
    record_file = raw_root / only_name / RECORD
    if record_file.is_file() and (raw_root / both_name).is_dir():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("identity") == json.loads(json.dumps(identity)):
            return record["made"]

    start = time.time()
    check_new_dataset_id(both_id, both_name.split("_", 1)[1], source.name, overwrite=True)
    real = {c: source for c in source.split.unlabeled}
    write_variant_dataset(source, raw_root / both_name, real, True, {}, "real+generated")
    discard_stale_derived_data(both_name)
    _plan_like_source(both_id, source, configuration, plans, num_processes)
    generation = generate_unlabeled(both_id, configuration, settings.n_images, settings.preset, settings.seed,
                                    device=device, plans_identifier=plans, num_processes=num_processes,
                                    progress=False, ae_epochs=settings.ae_epochs, ldm_epochs=settings.ldm_epochs)
    stage1_seconds = time.time() - start

    both = _load(raw_root / both_name)
    generated = sorted(generated_case_ids(both.split))
    provenance = {c: both.split.extra["provenance"][c] for c in generated}
    check_new_dataset_id(only_id, only_name.split("_", 1)[1], source.name, overwrite=True)
    write_variant_dataset(source, raw_root / only_name, {c: both for c in generated}, False, provenance,
                          "generated")
    discard_stale_derived_data(only_name)
    _plan_like_source(only_id, source, configuration, plans, num_processes)
    distances = [[round(c["histogram_distance"], 4), round(c["histogram_distance_real_halves"], 4)]
                 for c in (generation["report"] or {}).get("channels", [])]
    made = {"both": both_name, "only": only_name, "real_unlabeled": len(real), "generated": len(generated),
            "stage1_seconds": round(stage1_seconds, 1), "generation_seconds": generation["seconds"],
            "histogram_distance": distances, "model_dir": str(generation["model_dir"]),
            "settings": settings.to_dict()}
    atomic_write_json(record_file, {"identity": identity, "made": made})
    return made


def note_for(made: dict, variant: str) -> str:
    """The row's note: its unlabeled set and what stage 1 cost."""
    s = made["settings"]
    schedule = ", ".join(f"{k} {s[k]}" for k in ("ae_epochs", "ldm_epochs") if s.get(k) is not None)
    n_unlabeled = made["generated"] + (made["real_unlabeled"] if variant == "real+generated" else 0)
    return (f"unlabeled set: {VARIANTS[variant]} ({n_unlabeled} cases); stage 1 = nnssl_generate_unlabeled "
            f"(LDM preset {s['preset']}{', ' + schedule if schedule else ''}, seed {s['seed']}) on the source's "
            f"training images: {made['generated']} images, {made['stage1_seconds']:.0f} s with its dataset; "
            f"intensity histogram distance (Wasserstein) generated vs real, per channel: "
            + ", ".join(f"{d:.3f} (real half vs half {h:.3f})" for d, h in made["histogram_distance"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the datasets of nnssl_benchmark's generated rows.")
    parser.add_argument("-s", type=int, required=True, help="source dataset id")
    parser.add_argument("-b", type=int, required=True, help="id of the real + generated dataset")
    parser.add_argument("-g", type=int, required=True, help="id of the generated-only dataset")
    parser.add_argument("-c", required=True, help="a 2D configuration")
    parser.add_argument("-n", type=int, required=True, help="images to generate")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--ae-epochs", type=int, default=None)
    parser.add_argument("--ldm-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-device", default=None)
    parser.add_argument("-p", default="nnUNetPlans")
    args = parser.parse_args(argv)
    settings = GenerationSettings(args.n, args.preset, args.ae_epochs, args.ldm_epochs, args.seed)
    print(json.dumps(build(args.s, args.b, args.g, args.c, settings, args.p, device=args.device)))


if __name__ == "__main__":
    main()
