"""nnssl_speed's pure parts (nnssl.benchmark.speed, nnssl.benchmark.speed_worker, nnssl.training.passes): the pass
declarations of every trainer, the hook counter, and the table (ratio, floor, SSL tax, data-wait fraction); the
command itself: tests/e2e/test_speed_cli.py."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path

import pytest
import tiny_trainer as tiny
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnssl.benchmark.resume import load_row, row_key, save_row
from nnssl.benchmark.speed import (
    REFERENCE,
    SpeedResult,
    floor_sum,
    format_passes,
    markdown_table,
    pass_kinds,
    passes_agree,
    resolve_passes,
    summarize,
    wait_fraction,
    write_outputs,
)
from nnssl.benchmark.speed_worker import PassCounter, first_tensor, passes_of, trainer_modules
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.passes import SUPERVISED_PASSES, NetworkPass, check_passes

PLUGIN = Path(__file__).resolve().parents[2] / "nnssl_trainers"


def plugin_trainers() -> list[type]:
    classes = {}
    for path in sorted(PLUGIN.glob("*.py")):
        if path.name != "__init__.py":
            module = importlib.import_module(f"nnssl_trainers.{path.stem}")
            classes.update({obj.__name__: obj for _, obj in inspect.getmembers(module, inspect.isclass)
                            if obj.__module__ == module.__name__ and issubclass(obj, nnUNetTrainer)})
    return [classes[name] for name in sorted(classes)]


# ------------------------------------------------------------------------------------------------ declarations
def test_network_pass_checks_its_fields_and_counts_rows():
    assert NetworkPass("labeled", True).rows(2, 3) == 2
    assert NetworkPass("unlabeled", False, "teacher").rows(2, 3) == 3
    assert NetworkPass("both", True).rows(2, 3) == 5
    assert NetworkPass("unlabeled", False, "teacher", batch_factor=2).rows(2, 3) == 6
    for bad in (dict(batch="all", backward=True), dict(batch="both", backward=1), dict(batch="both", backward=True,
                network=""), dict(batch="both", backward=True, batch_factor=0), dict(batch="both", backward=True,
                                                                                     scale=-1.0)):
        with pytest.raises(ValueError):
            NetworkPass(**bad)
    with pytest.raises(ValueError, match="non-empty"):
        check_passes(())
    with pytest.raises(ValueError, match="inference network"):
        check_passes((NetworkPass("both", False),))


def test_every_plugin_trainer_declares_well_formed_passes_that_name_its_declared_networks():
    trainers = plugin_trainers()
    assert len(trainers) >= 30
    for cls in trainers:
        passes = passes_of(cls)
        assert passes is not None, f"{cls.__name__} declares no network_passes"
        check_passes(passes, cls.__name__)
        names = {p.network for p in passes}
        if issubclass(cls, nnUNetTrainerSSLBase):
            assert (cls.teacher_ema_decay is not None) <= ("teacher" in names), cls.__name__
            assert (cls.second_network is not None) <= ("network2" in names), cls.__name__
            assert any(p.batch != "labeled" for p in passes), f"{cls.__name__} never sees the unlabeled batch"
        else:
            assert passes == SUPERVISED_PASSES, cls.__name__


def test_nnunets_own_trainer_makes_nnunets_step_and_an_ssl_trainer_without_a_declaration_has_none():
    assert passes_of(nnUNetTrainer) == SUPERVISED_PASSES

    class Undeclared(nnUNetTrainerSSLBase):
        pass

    assert passes_of(Undeclared) is None


SSL_TRAINERS_TO_STEP = ["MeanTeacher", "MeanTeacher_consistencyAll", "CPS", "CPS_ensemble", "EntropyMin", "DHC",
                        "MGCC", "MGCC_mainSupervisionOnly", "GuidedNet", "SDCL", "UAMT", "URPC", "SSNet", "DST",
                        "DePL", "Adsh", "CReST", "SimiS", "CLD", "Basak", "WeakStrongMT", "WeakStrongMT_noTeacher"]


@pytest.mark.parametrize("name", SSL_TRAINERS_TO_STEP)
def test_the_declared_passes_are_the_ones_a_step_makes(name, tmp_path, monkeypatch):
    """Each trainer's declaration against its real step on the tiny plans (mid-schedule, as nnssl_speed measures):
    a forward computed twice, or a pass on other rows, fails here."""
    cls = {c.__name__: c for c in plugin_trainers()}[f"nnUNetTrainer{name}"]
    trainer = tiny.two_case_trainer(cls, tmp_path, monkeypatch)
    trainer.current_epoch = trainer.num_epochs // 2  # as speed_worker: SDCL in stage 2
    trainer.global_iteration = trainer.current_epoch * trainer.num_iterations_per_epoch
    trainer.on_train_epoch_start()
    counter = PassCounter(trainer_modules(trainer))
    with counter.counting():
        trainer.train_step(tiny.tiny_batch(torch.Generator().manual_seed(0), n_labeled=2, n_unlabeled=2))
    declared = resolve_passes(passes_of(cls), 2, 2)
    assert passes_agree(declared, counter.as_records()), (format_passes(declared),
                                                          format_passes(counter.as_records()))


# ------------------------------------------------------------------------------------------------ hook counting
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x, extra=None):
        return self.conv(x[0] if isinstance(x, list) else x)


def test_pass_counter_records_rows_and_autograd_of_every_call_and_removes_its_hooks():
    student, teacher = Tiny(), Tiny()
    counter = PassCounter({"network": student, "teacher": teacher})
    x_l, x_u = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    with counter.counting():
        student(torch.cat((x_l, x_u))).mean().backward()
        with torch.no_grad():
            teacher(x_u)
            teacher([x_u.repeat(2, 1, 1, 1)], extra=1)  # nested inputs: the first tensor's rows
        student(x=x_l)  # keyword input
    student(x_l)  # outside: not counted
    assert counter.as_records() == [{"network": "network", "rows": 5, "backward": True},
                                    {"network": "teacher", "rows": 3, "backward": False},
                                    {"network": "teacher", "rows": 6, "backward": False},
                                    {"network": "network", "rows": 2, "backward": True}]
    assert not student._forward_pre_hooks and not teacher._forward_pre_hooks
    assert first_tensor({"a": [(), [x_u]]}) is x_u and first_tensor([1, "b"]) is None



def test_pass_counter_sees_the_calls_of_a_compiled_network():
    """nnU-Net compiles its network on CUDA: the hooks sit on the compiled wrapper the trainer holds."""
    network = torch.compile(Tiny(), backend="eager")
    counter = PassCounter({"network": network})
    with counter.counting(), torch.no_grad():
        network(torch.randn(3, 1, 8, 8))
    assert counter.as_records() == [{"network": "network", "rows": 3, "backward": False}]

def test_passes_agree_only_when_the_calls_are_the_declared_ones():
    declared = resolve_passes((NetworkPass("both", True), NetworkPass("unlabeled", False, "teacher")), 2, 2)
    counted = [{"network": "network", "rows": 4, "backward": True}, {"network": "teacher", "rows": 2,
                                                                      "backward": False}]
    assert passes_agree(declared, counted)
    assert not passes_agree(declared, counted + counted[1:])  # a teacher forward computed twice
    assert not passes_agree(declared, [counted[0], {**counted[1], "backward": True}])  # a teacher pass with autograd
    assert format_passes(counted + counted[1:]) == "network 4 fwd+bwd, teacher 2 fwd x2"
    assert format_passes([]) == "-"


# ------------------------------------------------------------------------------------------------ table
def result(trainer, seconds, passes, waits=(0.1, 0.1), n_l=2, n_u=2, error=None, memory=100.0):
    resolved = resolve_passes(passes, n_l, n_u)
    return SpeedResult(trainer, seconds, list(waits), [seconds, seconds], memory, "RSS", counted_passes=resolved,
                       declared_passes=resolved,
                       labeled_batch=n_l, unlabeled_batch=n_u, patch=[64, 64], device="cpu", error=error)


MT = (NetworkPass("both", True), NetworkPass("unlabeled", False, "teacher"))


def test_floor_is_the_sum_of_the_timed_kinds_times_their_scale():
    passes = resolve_passes((*MT, NetworkPass("both", True, "aux", scale=1.5), NetworkPass("both", False, "x",
                                                                                            scale=0.0)), 2, 2)
    assert pass_kinds(passes) == {(4, True), (2, False)}
    kinds = {(4, True): 1.0, (2, False): 0.25}
    assert floor_sum(passes, kinds) == pytest.approx(1.0 + 0.25 + 1.5)
    assert math.isnan(floor_sum(passes, {(4, True): 1.0}))


def test_summary_gives_ratio_to_nnunet_floor_tax_and_wait_fraction():
    kinds = {(2, True): 0.5, (4, True): 1.0, (2, False): 0.25}
    rows = summarize([result(REFERENCE, 0.6, SUPERVISED_PASSES, waits=(0.0, 0.06)),
                      result("nnUNetTrainerMeanTeacher", 1.5, MT, waits=(0.3, 0.0)),
                      SpeedResult("nnUNetTrainerBroken", error="RuntimeError: boom"),
                      result("nnUNetTrainerSlowMT", 1.875, MT)], kinds)
    ref, mt, broken, slow = rows
    assert ref["ratio_to_nnUNetTrainer"] == 1.0 and mt["ratio_to_nnUNetTrainer"] == pytest.approx(2.5)
    assert ref["floor_seconds_per_iteration"] == 0.5 and ref["ssl_tax"] == pytest.approx(1.2)
    assert mt["floor_seconds_per_iteration"] == 1.25 and mt["ssl_tax"] == pytest.approx(1.2)
    # the tax nnU-Net's own step pays (1.2 here) is not the method's: same tax -> 1.0, 1.5 -> 1.25
    assert ref["ssl_tax_over_nnUNetTrainer"] == pytest.approx(1.0)
    assert mt["ssl_tax_over_nnUNetTrainer"] == pytest.approx(1.0)
    assert slow["ssl_tax"] == pytest.approx(1.5) and slow["ssl_tax_over_nnUNetTrainer"] == pytest.approx(1.25)
    assert math.isnan(broken["ssl_tax_over_nnUNetTrainer"])
    assert ref["data_wait_fraction"] == pytest.approx(0.05) and mt["data_wait_fraction"] == pytest.approx(0.1)
    assert mt["passes_agree"] and mt["batch"] == "2 + 2" and mt["patch"] == "64x64"
    assert broken["error"] == "RuntimeError: boom" and math.isnan(broken["ssl_tax"])
    table = markdown_table(rows)
    assert "| nnUNetTrainerBroken | error: RuntimeError: boom |" in table
    assert len({line.count("|") for line in table.splitlines()}) == 1  # every row has every column
    assert wait_fraction([], []) != wait_fraction([], [])  # NaN without steps


def test_without_the_reference_the_ratio_is_undefined(tmp_path):
    rows = summarize([result("nnUNetTrainerMeanTeacher", 1.5, MT)], {(4, True): 1.0, (2, False): 0.25})
    assert math.isnan(rows[0]["ratio_to_nnUNetTrainer"])
    write_outputs(rows, tmp_path, {"description": "test"})
    assert {p.name for p in tmp_path.iterdir()} == {"speed.md", "speed.csv", "speed.json"}
    written = json.loads((tmp_path / "speed.json").read_text(encoding="utf-8"))
    assert written["rows"][0]["trainer"] == "nnUNetTrainerMeanTeacher"
    csv_header = (tmp_path / "speed.csv").read_text(encoding="utf-8").splitlines()[0]
    assert csv_header.startswith("trainer,seconds_per_iteration")


def test_a_finished_row_is_reused_with_the_same_key_only_and_a_failed_one_never(tmp_path):
    key = row_key(985, "2d", "0", "nnUNetTrainerMeanTeacher", 0, {"NNSSL_X": "1"}, "data", device="cpu",
                  iterations=2, warmup=1)
    row = result("nnUNetTrainerMeanTeacher", 1.5, MT)
    save_row(tmp_path, key, row)
    assert load_row(tmp_path, key, SpeedResult) == row
    assert load_row(tmp_path, {**key, "iterations": 3}, SpeedResult) is None
    other = {**key, "trainer": "nnUNetTrainerCPS"}
    save_row(tmp_path, other, SpeedResult("nnUNetTrainerCPS", error="boom"))
    assert load_row(tmp_path, other, SpeedResult) is None


def test_no_trainer_is_started_after_the_deadline_and_its_row_is_not_saved(tmp_path):
    from nnssl.benchmark.speed import measure_trainers

    def key_of(trainer):
        return row_key(985, "2d", "0", trainer, 0, {}, "data")

    results = measure_trainers(["nnUNetTrainer"], [], {}, tmp_path, key_of, timeout=1, deadline=0.0)
    assert results[0].error.startswith("not run: --deadline") and not (tmp_path / "rows").exists()


def test_flops_over_floor_compares_a_step_with_its_declared_passes():
    kinds, kind_flops = {(4, True): 1.0, (2, False): 0.25}, {(4, True): 300.0, (2, False): 50.0}
    exact, bigger, uncounted = (result(n, 1.5, MT) for n in ("nnUNetTrainerMeanTeacher", "nnUNetTrainerBig", "X"))
    exact.step_flops, bigger.step_flops = 350.0, 455.0  # 1.3x the arithmetic of its declared passes
    rows = summarize([exact, bigger, uncounted], kinds, kind_flops)
    assert rows[0]["flops_over_floor"] == pytest.approx(1.0) and rows[1]["flops_over_floor"] == pytest.approx(1.3)
    assert math.isnan(rows[2]["flops_over_floor"])  # compiled: not counted (step_flops None)
    assert math.isnan(summarize([exact], kinds)[0]["flops_over_floor"])  # floor rows without FLOPs (older rows)


def test_counted_flops_are_additive_over_batch_rows_and_count_the_backward():
    from nnssl.benchmark.speed_worker import counted_flops

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    forward = {n: counted_flops(lambda n=n: net(torch.randn(n, 1, 16, 16))) for n in (2, 4)}
    both = counted_flops(lambda: net(torch.randn(2, 1, 16, 16)).sum().backward())
    assert forward[2] > 0 and forward[4] == 2 * forward[2]
    assert 2 * forward[2] < both <= 3 * forward[2]  # weight gradients of both layers, the input gradient of the 2nd


def test_repeats_report_medians_of_paired_rounds_with_their_range_and_a_failure_of_any_round():
    from nnssl.benchmark.speed import combine_repeats

    kinds = {(2, True): 0.5, (4, True): 1.0, (2, False): 0.25}
    # three rounds; the machine is 2x slower in the second: the trainers' ratio to nnU-Net stays 2.5 in every round
    rounds = [summarize([result(REFERENCE, 0.6 * slow, SUPERVISED_PASSES),
                         result("nnUNetTrainerMeanTeacher", 1.5 * slow * jitter, MT),
                         SpeedResult("nnUNetTrainerFlaky", error="boom") if flaky else result("nnUNetTrainerFlaky", 1.0,
                                                                                             MT)],
                        {k: v * slow for k, v in kinds.items()})
              for slow, jitter, flaky in ((1.0, 1.0, False), (2.0, 1.1, True), (1.0, 0.9, False))]
    ref, mt, flaky = combine_repeats(rounds)
    assert mt["seconds_per_iteration"] == pytest.approx(1.5)  # median of 1.5, 3.3, 1.35
    assert mt["seconds_per_iteration_range"] == pytest.approx([1.35, 3.3])
    assert mt["ratio_to_nnUNetTrainer"] == pytest.approx(2.5)  # paired within each round: 2.5, 2.75, 2.25
    assert mt["ratio_to_nnUNetTrainer_range"] == pytest.approx([2.25, 2.75])
    assert mt["ssl_tax_over_nnUNetTrainer"] == pytest.approx(1.0) and mt["repeats"] == 3
    assert ref["ratio_to_nnUNetTrainer_range"] == [1.0, 1.0]
    assert flaky["error"] == "boom" and flaky["ssl_tax_range"] is None
    table = markdown_table([ref, mt, flaky])
    assert "| 2.50 (2.25–2.75) |" in table and "| 1.5000 (1.3500–3.3000) |" in table
    assert len({line.count("|") for line in table.splitlines()}) == 1
    assert combine_repeats(rounds[:1]) == rounds[0]  # one run: the table as before, no range columns
