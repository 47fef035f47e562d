"""Split roles: a dataset's cases and rules, and the labeled / unlabeled / test / val choice.

A converter describes its raw cases as a :class:`Catalogue` (training pool, real unlabeled images, its own test
set) and its own knowledge as :class:`DatasetRules` (format, id normalisation, the unit labeled as a whole, its
published split). :func:`assign_roles` turns these and the :class:`~dataset_conversion.options.SplitOptions`
(random fraction/count, ``--split paper``, ``--split-file``) into a :class:`RoleAssignment`, the roles of the
raw-format contract of :mod:`nnssl.split`, and checks that no case and no group (ACDC: a patient) is in two roles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nnssl.split import SplitError, SSLSplit, choose_labeled, read_list_file

from .cases import Case, DatasetFormat
from .errors import ConversionError
from .options import SplitOptions
from .published import PaperSplit, find_splits_dir


@dataclass
class Catalogue:
    """The raw cases of one dataset. ``labeled``: cases with labels forming the training pool; ``unlabeled``: real
    unlabeled images; ``test``: the dataset's own held-out cases (labels optional)."""

    labeled: dict[str, Case] = field(default_factory=dict)
    unlabeled: dict[str, Case] = field(default_factory=dict)
    test: dict[str, Case] = field(default_factory=dict)

    def all_cases(self) -> dict[str, Case]:
        return {**self.unlabeled, **self.test, **self.labeled}


@dataclass(frozen=True)
class DatasetRules:
    """Per-dataset knowledge the shared code needs. ``normalize_id`` maps ids of published or user lists to case
    ids; ``paper_split(splits_dir, options)`` reads the published lists; ``group_of`` maps a case id to the unit that
    is labeled as a whole; ``default_test_fraction`` applies in random mode when the catalogue has no test set."""

    fmt: DatasetFormat
    default_test_fraction: float = 0.0
    normalize_id: Callable[[str], str] = str
    group_of: Callable[[str], str] | None = None
    paper_split: Callable[[Path, SplitOptions], PaperSplit] | None = None
    unit: str = "cases"


@dataclass
class RoleAssignment:
    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    val: list[str]
    origin: str
    seed: int | None
    labeled_fraction: float | None
    not_converted: list[str] = field(default_factory=list)


def _normalized(ids: Sequence[str], rules: DatasetRules) -> list[str]:
    return list(dict.fromkeys(rules.normalize_id(i) for i in ids))


def _choose(ids: Sequence[str], rules: DatasetRules, where: str, n: int | None = None,
            fraction: float | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    try:
        return choose_labeled(ids, n_labeled=n, fraction=fraction, seed=seed, group_of=rules.group_of)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}".replace("groups", rules.unit)) from e


def _hold_out_test(pool: list[str], catalogue: Catalogue, rules: DatasetRules, options: SplitOptions,
                   ) -> tuple[list[str], list[str]]:
    """(test ids, remaining pool): the catalogue's own test set plus a ``test_fraction`` share of the pool."""
    fraction = options.test_fraction
    if fraction is None:
        fraction = 0.0 if catalogue.test else rules.default_test_fraction
    test = sorted(catalogue.test)
    if fraction > 0 and pool:
        held, pool = _choose(pool, rules, "--test-fraction", fraction=fraction, seed=options.test_seed)
        if not pool:
            raise ConversionError(f"--test-fraction {fraction} leaves no training {rules.unit}")
        test += held
    return test, pool


def _real_unlabeled(catalogue: Catalogue, options: SplitOptions) -> list[str]:
    ids = sorted(catalogue.unlabeled)
    n = options.unlabeled_count
    if n is None or n >= len(ids):
        return ids
    if n == 0:
        return []
    order = np.random.RandomState(options.seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def _random_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    test, pool = _hold_out_test(sorted(catalogue.labeled), catalogue, rules, options)
    if options.labeled_count is None and options.labeled_fraction is None:
        labeled, withheld = pool, []
    else:
        labeled, withheld = _choose(pool, rules, "--labeled-count/--labeled-fraction", n=options.labeled_count,
                                    fraction=options.labeled_fraction, seed=options.seed)
    return RoleAssignment(labeled, withheld + _real_unlabeled(catalogue, options), test, [], "random", options.seed,
                          options.labeled_fraction)


def _file_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    """``--split-file``: a JSON file with ``labeled``/``unlabeled``/``test`` (``val``) lists, or a text file listing
    the labeled ids (the rest of the pool becomes unlabeled, the test set is chosen as in random mode)."""
    path = Path(options.split_file)
    origin = f"file:{path}"
    if not path.is_file():
        raise ConversionError(f"--split-file {path}: file not found")
    if path.suffix.lower() == ".json":
        try:
            split = SSLSplit.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
        except (ValueError, SplitError) as e:
            raise ConversionError(f"--split-file {path}: {e}") from e
        val = split.extra.get("val", [])
        return _roles_from_lists(catalogue, rules, split.labeled, split.unlabeled, split.test, val, origin,
                                 options.seed, split.labeled_fraction)
    wanted = _normalized(read_list_file(path), rules)
    if not wanted:
        raise ConversionError(f"--split-file {path}: no ids in the file")
    unknown = [i for i in wanted if i not in catalogue.labeled]
    if unknown:
        raise ConversionError(f"--split-file {path}: ids not among the labeled raw cases: {unknown[:10]}")
    group_of = rules.group_of or (lambda i: i)
    wanted_groups = {group_of(i) for i in wanted}
    labeled = sorted(i for i in catalogue.labeled if group_of(i) in wanted_groups)
    rest = sorted(i for i in catalogue.labeled if group_of(i) not in wanted_groups)
    test, withheld = _hold_out_test(rest, catalogue, rules, options)
    return RoleAssignment(labeled, withheld + _real_unlabeled(catalogue, options), test, [], origin, options.seed,
                          None)


def _roles_from_lists(catalogue: Catalogue, rules: DatasetRules, labeled: Sequence[str], unlabeled: Sequence[str],
                      test: Sequence[str], val: Sequence[str], origin: str, seed: int | None,
                      labeled_fraction: float | None) -> RoleAssignment:
    roles = {name: _normalized(ids, rules) for name, ids in
             (("labeled", labeled), ("unlabeled", unlabeled), ("test", test), ("val", val))}
    known = catalogue.all_cases()
    missing = {r: [i for i in ids if i not in known] for r, ids in roles.items()}
    missing = {r: ids for r, ids in missing.items() if ids}
    if missing:
        detail = "; ".join(f"{r}: {len(ids)} e.g. {ids[:5]}" for r, ids in missing.items())
        raise ConversionError(f"{origin}: listed cases not found in the raw data ({detail})")
    no_label = [i for i in roles["labeled"] + roles["val"] if known[i].label is None]
    if no_label:
        raise ConversionError(f"{origin}: labeled/val cases without a label in the raw data: {no_label[:10]}")
    used = {i for ids in roles.values() for i in ids}
    return RoleAssignment(roles["labeled"], roles["unlabeled"], roles["test"], roles["val"], origin, seed,
                          labeled_fraction, sorted(set(known) - used))


def check_groups(assignment: RoleAssignment, rules: DatasetRules) -> None:
    """No id in two roles, and (ACDC) no group such as a patient spread over two roles."""
    group_of = rules.group_of or (lambda i: i)
    role_of: dict[str, str] = {}
    seen: dict[str, str] = {}
    for role in ("labeled", "unlabeled", "test", "val"):
        for case in getattr(assignment, role):
            if case in seen:
                raise ConversionError(f"case '{case}' is in both '{seen[case]}' and '{role}'")
            seen[case] = role
            g = group_of(case)
            if role_of.setdefault(g, role) != role:
                raise ConversionError(f"{rules.unit[:-1]} '{g}' has cases in both '{role_of[g]}' and '{role}'")


def assign_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    if not catalogue.labeled and not catalogue.test and not catalogue.unlabeled:
        raise ConversionError(f"no {rules.fmt.name} cases found")
    if options.split == "paper":
        if rules.paper_split is None:
            raise ConversionError(f"--split paper: no published split is available for {rules.fmt.name}")
        paper = rules.paper_split(find_splits_dir(options.splits_dir), options)
        assignment = _roles_from_lists(catalogue, rules, paper.labeled, paper.unlabeled, paper.test, paper.val,
                                       paper.origin, None, paper.labeled_fraction)
    elif options.split == "file":
        assignment = _file_roles(catalogue, rules, options)
    else:
        if not catalogue.labeled:
            raise ConversionError(f"no labeled {rules.fmt.name} training cases found")
        assignment = _random_roles(catalogue, rules, options)
    if not assignment.labeled:
        raise ConversionError("the split has no labeled case")
    check_groups(assignment, rules)
    return assignment
