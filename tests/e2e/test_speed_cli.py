"""``nnssl_speed`` through its console script on the small synthetic CPU preset: the table's structure and invariants
(never wall-clock values; one torch thread, as on the shared test machine), resumed rows, and bad input as one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bad_input import assert_user_error, run_script
from e2e_utils import nnunet_env, run_cli

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS"]


def test_speed_table_of_three_trainers_on_the_synthetic_cpu_preset(tmp_path: Path):
    env = nnunet_env(tmp_path / "unused")  # nnssl_speed --synthetic sets its own nnUNet_* folders under -o
    out = tmp_path / "speed"
    cmd = ["nnssl_speed", "--synthetic", "--trainers", *TRAINERS, "--iterations", "2", "--warmup", "1", "-device",
           "cpu", "--threads", "1", "-o", str(out)]
    first = run_cli(cmd, env, timeout=600)
    table = json.loads((out / "speed.json").read_text(encoding="utf-8"))
    rows = {r["trainer"]: r for r in table["rows"]}
    assert list(rows) == TRAINERS
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["seconds_per_iteration"] > 0 and r["floor_seconds_per_iteration"] > 0 and r["ssl_tax"] > 0
        assert 0 <= r["data_wait_fraction"] <= 1
        assert r["peak_memory_mb"] > 0 and r["memory_kind"] == "RSS" and r["device"] == "cpu"
        assert r["passes_agree"], (name, r["passes_declared"], r["passes_counted"])
    assert rows["nnUNetTrainer"]["ratio_to_nnUNetTrainer"] == 1.0
    assert abs(rows["nnUNetTrainer"]["ssl_tax_over_nnUNetTrainer"] - 1.0) < 1e-9  # nnU-Net's own tax is the unit
    assert all(r["ssl_tax_over_nnUNetTrainer"] > 0 for r in rows.values())
    n_l, n_u = (int(x) for x in rows["nnUNetTrainerMeanTeacher"]["batch"].split(" + "))
    assert rows["nnUNetTrainer"]["batch"] == f"{n_l} + 0"
    # Mean Teacher: the student on the whole batch with autograd, the teacher once on the unlabeled rows without
    assert f"network {n_l + n_u} fwd+bwd" in rows["nnUNetTrainerMeanTeacher"]["passes_counted"]
    assert f"teacher {n_u} fwd" in rows["nnUNetTrainerMeanTeacher"]["passes_counted"].split(", ")
    assert rows["nnUNetTrainerCPS"]["passes_counted"] == f"network {n_l + n_u} fwd+bwd, network2 {n_l + n_u} fwd+bwd"
    # the floor of CPS is two passes of the kind Mean Teacher's student needs once
    floors = table["settings"]["floor_seconds"]
    assert set(floors) == {f"{n_l}:1", f"{n_l + n_u}:1", f"{n_u}:0"}
    assert abs(rows["nnUNetTrainerCPS"]["floor_seconds_per_iteration"] - 2 * floors[f"{n_l + n_u}:1"]) < 1e-9
    # these three trainers' arithmetic is their declared passes (the losses, EMA and optimizer steps count no
    # convolution or matrix-product FLOPs; nnU-Net skips the backward of the deep-supervision output it weights 0,
    # 1e-4 here): a mis-declared pass or a forward computed twice would move this off 1 by >= 25 %
    assert all(floor > 0 for floor in table["settings"]["floor_flops"].values())
    assert all(abs(r["flops_over_floor"] - 1.0) < 1e-3 for r in rows.values()), {
        n: r["flops_over_floor"] for n, r in rows.items()}

    md = (out / "speed.md").read_text(encoding="utf-8")
    assert "tax / nnUNetTrainer's" in md and "FLOPs / floor's" in md
    assert md.count("\n| nnUNetTrainer") == 3 and "SSL tax" in md and first.stdout.count("| nnUNetTrainer") == 3
    with open(out / "speed.csv", encoding="utf-8", newline="") as f:
        assert [r["trainer"] for r in csv.DictReader(f)] == TRAINERS

    again = run_cli(cmd, env, timeout=300)  # every row (and the floor) is reused
    assert all(f"nnssl_speed: {t}: reused" in again.stdout for t in TRAINERS)
    assert json.loads((out / "speed.json").read_text(encoding="utf-8"))["rows"] == table["rows"]

    # --repeats 2: the first round is the rows above (reused), the second is measured; medians with their range
    twice = run_cli([*cmd, "--repeats", "2"], env, timeout=600)
    assert all(f"nnssl_speed: {t} (run 1 of 2): reused" in twice.stdout for t in TRAINERS)
    assert all(f"nnssl_speed: {t} (run 2 of 2): " in twice.stdout
               and f"nnssl_speed: {t} (run 2 of 2): reused" not in twice.stdout for t in TRAINERS)
    repeated = json.loads((out / "speed.json").read_text(encoding="utf-8"))
    assert repeated["settings"]["repeats"] == 2
    for r in repeated["rows"]:
        low, high = r["ssl_tax_range"]
        assert r["repeats"] == 2 and low <= r["ssl_tax"] <= high and r["error"] is None
    assert "2 interleaved runs" in (out / "speed.md").read_text(encoding="utf-8")


def test_speed_bad_input_is_one_line(tmp_path: Path):
    env = nnunet_env(tmp_path)
    (tmp_path / "preprocessed").mkdir()
    proc = run_script(["nnssl_speed", "-d", "977", "-c", "2d", "-o", str(tmp_path / "out")], env)
    assert_user_error(proc, "-d 977", "nnssl_plan_and_preprocess")
    proc = run_script(["nnssl_speed", "-d", "977", "-c", "2d", "--trainers", "nnUNetTrainerNope", "-o",
                       str(tmp_path / "out")], env)
    assert_user_error(proc, "nnUNetTrainerNope")
    assert not (tmp_path / "out").exists()
