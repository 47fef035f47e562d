"""nnssl.parts: nnUNetv2_predict's -num_parts/-part_id split."""

from __future__ import annotations

import argparse

import pytest

from nnssl.errors import InputError
from nnssl.parts import Part, add_part_arguments


@pytest.mark.parametrize("num_parts", [1, 2, 3, 7, 12])
def test_parts_are_disjoint_cover_every_case_and_ignore_input_order(num_parts):
    cases = [f"case_{i:03d}" for i in range(10)]
    shuffled = cases[::-1]
    parts = [Part(num_parts, i).select(shuffled) for i in range(num_parts)]
    assert sorted(c for p in parts for c in p) == cases
    assert sum(len(p) for p in parts) == len(cases)
    assert [len(p) for p in parts] == [len(cases[i::num_parts]) for i in range(num_parts)]  # nnU-Net's list[i::N]
    assert parts[0] == cases[0::num_parts]


def test_partial_folders_differ_per_part_and_whole_keeps_the_plain_name():
    assert Part().partial_dir_name() == ".partial" and Part().is_whole and Part().describe() == ""
    names = {Part(3, i).partial_dir_name() for i in range(3)}
    assert len(names) == 3 and all(n.startswith(".partial-part") for n in names)
    assert Part(3, 2).describe() == " (part 2 of 3)"


@pytest.mark.parametrize("num_parts, part_id, fragment", [(0, 0, "-num_parts"), (2, 2, "0..1"), (2, -1, "0..1")])
def test_invalid_parts_are_user_errors(num_parts, part_id, fragment):
    with pytest.raises(InputError, match=fragment):
        Part(num_parts, part_id)


def test_arguments_have_nnunet_predict_names_and_defaults():
    parser = argparse.ArgumentParser()
    add_part_arguments(parser)
    assert vars(parser.parse_args([])) == {"num_parts": 1, "part_id": 0}
    assert vars(parser.parse_args(["-num_parts", "4", "-part_id", "3"])) == {"num_parts": 4, "part_id": 3}
