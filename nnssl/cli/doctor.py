"""``nnssl_doctor [-d ID]``: check the set-up a user meets first and say what to do about each problem.

Checks: the nnU-Net folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) are set and exist,
``nnUNet_extTrainer`` points at the nnssl trainers (without it nnU-Net answers ``-tr nnUNetTrainerCPS`` with
"Could not find requested nnunet trainer"), the trainers import, and with ``-d`` that the dataset's raw folder,
split file, plans and preprocessed unlabeled cases are there. Prints one line per check; exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
from pathlib import Path

from nnssl.cli.trainer_path import PLUGIN_PACKAGE, trainer_folder
from nnssl.errors import report_user_errors

OK, PROBLEM = "ok", "PROBLEM"


def nnssl_trainer_names() -> list[str]:
    """Every nnUNetTrainer subclass defined in the plugin folder, by name (its modules are imported by name, as
    nnU-Net's trainer lookup does: the library has no import of the plugin)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names = set()
    for module_info in pkgutil.iter_modules([trainer_folder()]):
        module = importlib.import_module(f"{PLUGIN_PACKAGE}.{module_info.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__ and not name.endswith("Base"):
                names.add(name)
    return sorted(names)


def environment_checks() -> list[tuple[str, str, str]]:
    """``(status, what, advice)`` for the nnU-Net folders and the trainer path."""
    checks = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        if not value:
            checks.append((PROBLEM, f"{var} is not set", f"export {var}=/path/to/{var}"))
        elif not Path(value).is_dir():
            checks.append((PROBLEM, f"{var}={value} is not a folder", f"mkdir -p {value}"))
        else:
            checks.append((OK, f"{var}={value}", ""))
    wanted = trainer_folder()
    ext = os.environ.get("nnUNet_extTrainer", "")
    if not ext or os.path.abspath(ext) != wanted:
        checks.append((PROBLEM, f"nnUNet_extTrainer={ext or '(not set)'}: nnUNetv2_train/-predict will not find "
                                "the nnssl trainers ('Could not find requested nnunet trainer')",
                       'export nnUNet_extTrainer="$(nnssl_trainer_path)"'))
    else:
        checks.append((OK, f"nnUNet_extTrainer={ext}", ""))
    return checks


def dataset_checks(dataset: str) -> list[tuple[str, str, str]]:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnssl.preprocessing.unlabeled import completed_cases, unlabeled_folder
    from nnssl.split import SPLIT_FILE_NAME, SplitError, load_and_validate

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        return [(PROBLEM, f"dataset {dataset} not found in nnUNet_raw / nnUNet_preprocessed / nnUNet_results",
                 "convert it first (nnssl_convert, nnssl_make_synthetic) or check the id")]
    checks = []
    raw = Path(os.environ.get("nnUNet_raw", "")) / name
    split = None
    if (raw / SPLIT_FILE_NAME).is_file():
        try:
            split = load_and_validate(raw)
            checks.append((OK, f"{raw / SPLIT_FILE_NAME}: {len(split.labeled)} labeled, {len(split.unlabeled)} "
                               f"unlabeled, {len(split.test)} test", ""))
        except SplitError as e:
            checks.append((PROBLEM, str(e).splitlines()[0], "fix the split file or reconvert the dataset"))
    else:
        checks.append((PROBLEM, f"{raw / SPLIT_FILE_NAME} not found", "convert with nnssl_convert"))
    pp = Path(os.environ.get("nnUNet_preprocessed", "")) / name
    plans = pp / "nnUNetPlans.json"
    if not plans.is_file():
        checks.append((PROBLEM, f"{plans} not found", f"nnssl_plan_and_preprocess -d {dataset}"))
        return checks
    import json

    configurations = json.loads(plans.read_text(encoding="utf-8"))["configurations"]
    for cfg, conf in configurations.items():
        if "data_identifier" not in conf:
            continue
        done = len(completed_cases(unlabeled_folder(pp, conf["data_identifier"])))
        expected = len(split.unlabeled) if split is not None else None
        status = OK if expected is None or done == expected else PROBLEM
        checks.append((status, f"{cfg}: {done}" + (f"/{expected}" if expected is not None else "")
                       + " unlabeled cases preprocessed",
                       "" if status == OK else f"nnssl_preprocess_unlabeled -d {dataset} -c {cfg}"))
    return checks


@report_user_errors("nnssl_doctor")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnssl_doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", help="also check this dataset (id or name)")
    args = parser.parse_args(argv)
    checks = environment_checks()
    try:
        names = nnssl_trainer_names()
        checks.append((OK, f"{len(names)} nnssl trainers: {', '.join(names)}", ""))
    except Exception as e:  # noqa: BLE001 - an import error of a trainer is exactly what this reports
        checks.append((PROBLEM, f"the nnssl trainers do not import: {type(e).__name__}: {e}",
                       "reinstall nnssl (pip install -e .) and check the torch / nnunetv2 versions"))
    if args.d is not None:
        checks += dataset_checks(args.d)
    for status, what, advice in checks:
        print(f"[{status}] {what}" + (f"\n        -> {advice}" if advice else ""))
    return 1 if any(status == PROBLEM for status, _, _ in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
