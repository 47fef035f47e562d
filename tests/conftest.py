"""Test layout: ``tests/unit/`` one file per library module (tensors in, tensors out; no CLI), ``tests/e2e/``
through the real console scripts (every test there is marked ``slow``); shared helpers at this level
(``tiny_trainer.py``: tiny plans for trainer unit tests, ``e2e_utils.py``, ``bad_input.py``, ``conversion_fakes.py``).

Here: the ``slow`` mark of ``tests/e2e/`` and the session-wide synthetic datasets, planned and preprocessed once
through the real CLIs, shared by the end-to-end tests of every trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_utils import nnunet_env, run_cli

E2E_FOLDER = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FOLDER in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Where a test writes a fake public download (tests/conversion_fakes.py)."""
    return tmp_path / "raw"


@pytest.fixture
def nnraw(tmp_path: Path) -> Path:
    """The nnUNet_raw folder a conversion test writes into."""
    return tmp_path / "nnUNet_raw"


@dataclass
class PlannedDataset:
    dataset_id: int
    name: str
    env: dict[str, str]
    raw: Path
    preprocessed: Path


def _plan(root: Path, dataset_id: int, kind: str, configurations: list[str], n_labeled: int, n_unlabeled: int,
          n_test: int) -> PlannedDataset:
    from nnssl.plans_tools import shrink_network
    from nnssl.synthetic import make_synthetic_dataset

    env = nnunet_env(root)
    raw = make_synthetic_dataset(root / "raw", dataset_id, kind, n_labeled=n_labeled, n_unlabeled=n_unlabeled,
                                 n_test=n_test, seed=dataset_id)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must be positive there
    run_cli(["nnssl_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "2"],
            {**env, "nnUNet_n_proc_DA": "2"})
    preprocessed = root / "preprocessed" / raw.name
    shrink_network(preprocessed / "nnUNetPlans.json", base_features=8, max_features=64)
    return PlannedDataset(dataset_id, raw.name, env, raw, preprocessed)


@pytest.fixture(scope="session")
def synthetic3d(tmp_path_factory) -> PlannedDataset:
    """3D multi-organ CT look-alike: 5 labeled, 6 unlabeled, 2 test cases; 3d_fullres and 2d planned."""
    return _plan(tmp_path_factory.mktemp("nnunet3d"), 501, "3d", ["3d_fullres", "2d"], 5, 6, 2)


@pytest.fixture(scope="session")
def synthetic2d(tmp_path_factory) -> PlannedDataset:
    """2D ultrasound look-alike (PNG): 6 labeled, 8 unlabeled, 3 test cases; 2d planned."""
    return _plan(tmp_path_factory.mktemp("nnunet2d"), 502, "2d", ["2d"], 6, 8, 3)
