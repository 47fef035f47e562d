"""The benchmark's generated rows (MGCC stage 1, nnssl.benchmark.generated) through ``nnssl_benchmark -d``: one LDM
per seed, two derived datasets with the source's plans and labeled/test cases, rows for real + generated and
generated only, reused on a rerun; an unknown unlabeled set is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from e2e_utils import nnunet_env, run_cli

TRAINERS = ["nnUNetTrainerSupervised", "nnUNetTrainerMGCC[generated]", "nnUNetTrainerMGCC[real+generated]"]


def _split(raw: Path) -> dict:
    return json.loads((raw / "ssl_split.json").read_text(encoding="utf-8"))


def test_generated_rows_build_both_datasets_once_and_are_reused(synthetic2d, tmp_path):
    for kind, source in (("raw", synthetic2d.raw), ("preprocessed", synthetic2d.preprocessed)):
        shutil.copytree(source, tmp_path / kind / source.name)  # a private copy: the session fixture stays as it is
    env = nnunet_env(tmp_path, OMP_NUM_THREADS="1")
    out = tmp_path / "bench"
    cmd = ["nnssl_benchmark", "-d", str(synthetic2d.dataset_id), "-c", "2d", "--smoke", "--no-full-reference",
           "-device", "cpu", "--disable-tta", "--generated-images", "3", "--ldm-epochs", "1", "1", "-o", str(out),
           "--trainers", *TRAINERS]
    proc = run_cli(cmd, env, timeout=1500)
    rows = {r["trainer"]: r for r in json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["runs"]}
    source = _split(synthetic2d.raw)
    for variant, n_unlabeled in (("generated", 3), ("real+generated", len(source["unlabeled"]) + 3)):
        row = rows[f"nnUNetTrainerMGCC[{variant}]"]
        assert row["error"] is None and row["dice"], row
        assert f"({n_unlabeled} cases)" in row["notes"] and "LDM preset tiny" in row["notes"]

    both_id, only_id = (next(iter(json.loads((out / r).read_text(encoding="utf-8")).values()))
                        for r in ("generated_both_datasets.json", "generated_only_datasets.json"))
    both_raw, only_raw = (next((tmp_path / "raw").glob(f"Dataset{i:03d}_*")) for i in (both_id, only_id))
    both, only = _split(both_raw), _split(only_raw)
    generated = sorted(c for c, p in both["provenance"].items() if p["source"] == "generated")
    assert len(generated) == 3 and sorted(only["unlabeled"]) == generated
    assert sorted(both["unlabeled"]) == sorted(source["unlabeled"] + generated)
    for split in (both, only):
        assert split["labeled"] == source["labeled"] and split["test"] == source["test"]
    assert not (only_raw / "labelsUnlabeled").exists()  # no generated image has a label
    assert sorted(p.name for p in (both_raw / "labelsTr").iterdir()) == sorted(
        p.name for p in (synthetic2d.raw / "labelsTr").iterdir())  # withheld labels never become training labels
    source_plans = json.loads((synthetic2d.preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    for raw in (both_raw, only_raw):
        plans = json.loads((tmp_path / "preprocessed" / raw.name / "nnUNetPlans.json").read_text(encoding="utf-8"))
        assert plans["configurations"] == source_plans["configurations"]  # the source's network, patch, spacing
    assert len(list((tmp_path / "results" / both_raw.name / "nnssl_generative").iterdir())) == 1  # one LDM

    again = run_cli(cmd, env, timeout=600)
    assert again.stdout.count("reusing finished row") == len(TRAINERS), again.stdout[-3000:]
    assert "Traceback" not in proc.stderr + again.stderr

    bad = run_cli([*cmd[:-len(TRAINERS)], "nnUNetTrainerMGCC[fake]"], env, expect_ok=False)
    assert bad.returncode == 1 and "[fake]" in bad.stderr and "[generated]" in bad.stderr
    assert "Traceback" not in bad.stderr
