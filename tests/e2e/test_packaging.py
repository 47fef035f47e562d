"""An installed (non-editable) nnssl carries everything a user needs: the published split lists are package data,
read without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_paper_splits_ship_with_an_installed_copy(tmp_path):
    # a copy of the project's sources (pip builds in the source folder: the checkout stays untouched)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("nnssl", "nnssl_trainers", "dataset_conversion"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, cwd=tmp_path, capture_output=True)
    assert not (site / "nnssl" / "data" / "paper_splits").is_symlink()
    code = ("from dataset_conversion.published import find_splits_dir, read_published_list; "
            "import nnssl; d = find_splits_dir(); "
            "print(nnssl.__file__); print(d); print(len(read_published_list(d, 'SSL4MIS/acdc/train.list')))")
    env = {k: v for k, v in os.environ.items() if k != "NNSSL_SPLITS_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         encoding="utf-8", errors="replace").stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))  # the copy, not the source tree
    assert out[2] == "140"
    assert (site / "nnssl" / "data" / "paper_splits" / "PROVENANCE.md").is_file()
