"""``nnssl_speed``: the per-iteration cost of trainers at the plans' real patch, batch and network.

Every trainer runs in a fresh subprocess (:mod:`nnssl.benchmark.speed_worker`: built as ``nnUNetv2_train`` builds it,
``on_train_start()``, ``--warmup`` + ``--iterations`` steps at the middle of the schedule, ``on_train_end()``) and
gives its median seconds per iteration, its data-wait fraction (time blocked in ``next(dataloader_train)`` / step
time, summed over the timed steps), its peak memory (GPU ``max_memory_allocated``, else the process's peak RSS) and
the network passes one step made (forward hooks: rows and whether autograd was on).

The compute floor of a method is the passes it needs, declared by its trainer class (``network_passes``,
:mod:`nnssl.training.passes`; nnU-Net's own trainers: one forward + backward of the labeled batch). Each distinct
pass kind (rows, backward) is timed once in another subprocess as nnU-Net's ``nnUNetTrainer`` network forward (and
backward) on random patches of the same patch size, under the same autocast and compile decision; the floor is their
sum (times each pass's ``scale``) and the SSL tax = seconds per iteration / floor. The ratio is to
``nnUNetTrainer``, nnU-Net's own trainer, when it is in the table. Where the trainer is not compiled, the arithmetic
of one real step (FLOPs of convolutions and matrix products, forward and backward, counted by torch's
``FlopCounterMode``) over the floor's passes' FLOPs says whether a tax is arithmetic the declared passes do not count
(a network larger than the plans', an auxiliary decoder costing more than its declared ``scale``) or overhead.

Rows are saved under ``OUTPUT/rows/`` (:mod:`nnssl.benchmark.resume`) and reused by a rerun with the same key
(dataset and plans, configuration, fold, trainer, device, warm-up and iterations, ``nnUNet_n_proc_DA``,
``nnUNet_compile`` and every ``NNSSL_*`` variable); a failed trainer gets its error in its row and is retried on the
next run; ``--deadline`` starts no trainer after that many seconds (their rows say so). The training logs and nnU-Net's
output folders go to ``OUTPUT/logs`` and ``OUTPUT/nnUNet_results`` (never to your ``nnUNet_results``). On a CPU,
``--threads`` sets torch's threads (nnU-Net's default, one per core, is far slower on a machine shared with other
jobs).

``--synthetic`` (``cpu2d``, the default, or ``gpu3d``) generates and plans a synthetic dataset under ``OUTPUT`` with
:func:`nnssl.synthetic.make_synthetic_dataset` and ``nnssl_plan_and_preprocess``: ``cpu2d`` a small 2D set with the
network narrowed to 8..64 features (seconds on a CPU: the test suite's preset), ``gpu3d`` the 3D organs at native
voxel size with nnU-Net's own plans (full-width network).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nnssl.benchmark.resume import load_row, row_key, save_row
from nnssl.errors import InputError, report_user_errors
from nnssl.training.passes import NetworkPass

REFERENCE = "nnUNetTrainer"
WORKER = "nnssl.benchmark.speed_worker"


@dataclass(frozen=True)
class SpeedPreset:
    name: str
    dataset_id: int
    kind: str
    configuration: str
    n_labeled: int
    n_unlabeled: int
    narrow: bool


SPEED_PRESETS = {p.name: p for p in (
    SpeedPreset("cpu2d", 985, "2d", "2d", n_labeled=6, n_unlabeled=8, narrow=True),
    SpeedPreset("gpu3d", 986, "3d", "3d_fullres", n_labeled=6, n_unlabeled=12, narrow=False),
)}


@dataclass
class SpeedResult:
    """One trainer's row as measured (times in seconds)."""

    trainer: str
    seconds_per_iteration: float = float("nan")
    wait_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: float = float("nan")
    memory_kind: str = ""
    counted_passes: list[dict] = field(default_factory=list)
    declared_passes: list[dict] = field(default_factory=list)
    labeled_batch: int = 0
    unlabeled_batch: int = 0
    patch: list[int] = field(default_factory=list)
    device: str = ""
    compiled: bool = False
    step_flops: float | None = None  # one step's convolution / matmul FLOPs (None: compiled, or not counted)
    error: str | None = None


@dataclass
class FloorResult:
    """The median seconds and the FLOPs of one pass kind of nnU-Net's network (``trainer`` is
    ``floor:ROWS:BACKWARD``)."""

    trainer: str
    seconds: float = float("nan")
    flops: float | None = None  # None: compiled, or a row written before FLOPs were counted
    error: str | None = None


# ---------------------------------------------------------------------------------------------- pure parts
def resolve_passes(passes: tuple[NetworkPass, ...], n_labeled: int, n_unlabeled: int) -> list[dict]:
    """Declared passes with their batch sizes: ``{"network", "rows", "backward", "scale"}`` each."""
    return [{"network": p.network, "rows": p.rows(n_labeled, n_unlabeled), "backward": p.backward,
             "scale": p.scale} for p in passes]


def pass_kinds(passes: list[dict]) -> set[tuple[int, bool]]:
    """The distinct (rows, backward) kinds the floor of these passes needs (passes of scale 0 need none)."""
    return {(int(p["rows"]), bool(p["backward"])) for p in passes if p.get("scale", 1.0) > 0}


def kind_name(rows: int, backward: bool) -> str:
    return f"floor:{rows}:{int(backward)}"


def floor_sum(passes: list[dict], per_kind: dict[tuple[int, bool], float]) -> float:
    """Sum over the passes of scale x its kind's value (seconds, or FLOPs); NaN when a kind is missing."""
    total = 0.0
    for p in passes:
        scale = p.get("scale", 1.0)
        if scale > 0:
            total += scale * per_kind.get((int(p["rows"]), bool(p["backward"])), float("nan"))
    return total


def wait_fraction(waits: list[float], steps: list[float]) -> float:
    """Time blocked waiting for the next batch over the step time, summed over the timed steps."""
    total = sum(steps)
    return sum(waits) / total if total > 0 else float("nan")


def format_passes(passes: list[dict]) -> str:
    """``network 4 fwd+bwd, teacher 2 fwd x2``: one item per distinct (network, rows, backward), in first-seen order."""
    counts = Counter((p["network"], int(p["rows"]), bool(p["backward"])) for p in passes)
    items = []
    for (network, rows, backward), n in counts.items():
        items.append(f"{network} {rows} {'fwd+bwd' if backward else 'fwd'}" + (f" x{n}" if n > 1 else ""))
    return ", ".join(items) if items else "-"


def passes_agree(declared: list[dict], counted: list[dict]) -> bool:
    """Whether the counted calls are exactly the declared ones (network, rows, backward; as multisets)."""
    def key(passes):
        return Counter((p["network"], int(p["rows"]), bool(p["backward"])) for p in passes)

    return key(declared) == key(counted)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def summarize(results: list[SpeedResult], kind_seconds: dict[tuple[int, bool], float],
              kind_flops: dict[tuple[int, bool], float] | None = None) -> list[dict]:
    """The table rows: ratio to ``nnUNetTrainer``, floor, SSL tax, a step's FLOPs over the floor's, data-wait
    fraction and the passes."""
    reference = next((r for r in results if r.trainer == REFERENCE and r.error is None), None)
    rows = []
    for r in results:
        ok = r.error is None
        floor = floor_sum(r.declared_passes, kind_seconds) if ok and r.declared_passes else float("nan")
        floor_flops = floor_sum(r.declared_passes, kind_flops or {}) if ok and r.declared_passes else float("nan")
        ratio = (r.seconds_per_iteration / reference.seconds_per_iteration
                 if ok and reference is not None and reference.seconds_per_iteration > 0 else float("nan"))
        rows.append({
            "trainer": r.trainer,
            "seconds_per_iteration": r.seconds_per_iteration if ok else float("nan"),
            "ratio_to_nnUNetTrainer": ratio,
            "floor_seconds_per_iteration": floor,
            "ssl_tax": r.seconds_per_iteration / floor if ok and _finite(floor) and floor > 0 else float("nan"),
            "ssl_tax_over_nnUNetTrainer": float("nan"),
            "flops_over_floor": (r.step_flops / floor_flops if ok and r.step_flops is not None and _finite(floor_flops)
                                 and floor_flops > 0 else float("nan")),
            "data_wait_fraction": wait_fraction(r.wait_seconds, r.step_seconds) if ok else float("nan"),
            "peak_memory_mb": r.peak_memory_mb if ok else float("nan"),
            "memory_kind": r.memory_kind,
            "passes_declared": format_passes(r.declared_passes) if r.declared_passes else "-",
            "passes_counted": format_passes(r.counted_passes) if ok else "-",
            "passes_agree": passes_agree(r.declared_passes, r.counted_passes) if ok else None,
            "device": r.device,
            "compiled": r.compiled,
            "patch": "x".join(str(s) for s in r.patch),
            "batch": f"{r.labeled_batch} + {r.unlabeled_batch}" if ok else "",
            "error": r.error,
        })
    # nnU-Net's own step costs more than its passes (loss with deep supervision, optimizer step, gradient clipping,
    # batch transfer): the part of a method's tax that nnU-Net pays too is not the method's
    reference_tax = next((row["ssl_tax"] for row in rows if row["trainer"] == REFERENCE and not row["error"]), None)
    if reference_tax is not None and _finite(reference_tax) and reference_tax > 0:
        for row in rows:
            row["ssl_tax_over_nnUNetTrainer"] = row["ssl_tax"] / reference_tax
    return rows


RANGED = ("seconds_per_iteration", "ratio_to_nnUNetTrainer", "ssl_tax", "ssl_tax_over_nnUNetTrainer")


def combine_repeats(rounds: list[list[dict]]) -> list[dict]:
    """One table from ``--repeats`` rounds (each a :func:`summarize` of every trainer, in the same order).

    Every numeric column is the median over the rounds of that round's value, so ratios and taxes are paired within
    a round (a trainer and nnU-Net's own row, or a trainer and its floor, measured minutes apart) before the median
    is taken: drift between rounds (another job, the CPU clock) cancels in the pair. The main columns also get their
    range over the rounds (``*_range``: ``[min, max]``), the run-to-run noise a reader needs to judge a difference.
    A trainer that failed in any round is reported as failed, with that round's error.
    """
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for per_round in zip(*rounds):
        row = dict(per_round[0])
        failed = next((r for r in per_round if r["error"]), None)
        if failed is not None:  # same columns as a measured row, so the csv has one header
            combined.append({**row, "error": failed["error"], **{f"{k}_range": None for k in RANGED},
                             "repeats": len(rounds)})
            continue
        for key, value in list(row.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = sorted(r[key] for r in per_round if _finite(r[key]))
                row[key] = statistics.median(values) if values else float("nan")
                if key in RANGED:
                    row[f"{key}_range"] = [values[0], values[-1]] if values else None
        row["repeats"] = len(rounds)
        combined.append(row)
    return combined


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def _ranged(row: dict, key: str, spec: str) -> str:
    """``value`` or, after ``--repeats``, ``value (min–max)``."""
    span = row.get(f"{key}_range")
    text = _fmt(row[key], spec)
    return f"{text} ({_fmt(span[0], spec)}–{_fmt(span[1], spec)})" if span and _finite(row[key]) else text


COLUMNS = ("trainer | s/iter (median) | ratio to nnUNetTrainer | floor s/iter | SSL tax | tax / nnUNetTrainer's | "
           "FLOPs / floor's | data wait | peak MB | "
           "passes declared | passes counted | device | patch | batch (labeled + unlabeled)")


def markdown_table(rows: list[dict]) -> str:
    n_columns = len(COLUMNS.split(" | "))
    lines = ["| " + COLUMNS + " |", "|" + " --- |" * n_columns]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['trainer']} | error: {r['error'].replace('|', '/')} |" + " |" * (n_columns - 2))
            continue
        counted = r["passes_counted"] + ("" if r["passes_agree"] else " (differs)")
        device = r["device"] + (" compiled" if r["compiled"] else "")
        lines.append(f"| {r['trainer']} | {_ranged(r, 'seconds_per_iteration', '.4f')} | "
                     f"{_ranged(r, 'ratio_to_nnUNetTrainer', '.2f')} | "
                     f"{_fmt(r['floor_seconds_per_iteration'], '.4f')} | "
                     f"{_ranged(r, 'ssl_tax', '.2f')} | {_ranged(r, 'ssl_tax_over_nnUNetTrainer', '.2f')} | "
                     f"{_fmt(r['flops_over_floor'], '.2f')} | "
                     f"{_fmt(r['data_wait_fraction'], '.1%')} | "
                     f"{_fmt(r['peak_memory_mb'], '.0f')} {r['memory_kind']} | {r['passes_declared']} | {counted} | "
                     f"{device} | {r['patch']} | {r['batch']} |")
    return "\n".join(lines)


EXPLANATION = """\
- s/iter: median wall seconds of one training iteration (waiting for the batch + `train_step`), after the warm-up.
  With `--repeats R`: every trainer and the floor measured R times in interleaved rounds; each column is the median
  over the rounds of the round's value (ratios and taxes paired within a round), range over the rounds in parentheses.
- ratio: s/iter over nnU-Net's own `nnUNetTrainer` on the same plans.
- floor: the network passes the method needs (its `network_passes`), each timed as nnU-Net's network forward
  (+ backward) on as many patches, same autocast and compile; no loss, no optimizer step. SSL tax = s/iter / floor.
- tax / nnUNetTrainer's: the SSL tax over nnU-Net's own (its loss, optimizer step, clipping and batch transfer are
  above the floor too): what the method adds beyond what every nnU-Net step pays; 1.00 = nothing.
- FLOPs / floor's: the convolution and matrix-product FLOPs of one real step (forward + backward, torch's
  `FlopCounterMode`; not counted for a compiled trainer: "-") over those of the floor's passes. About 1: the tax is
  overhead (losses, optimizer, small operations); above 1: arithmetic the declared passes do not count (a larger
  network than the plans', extra decoders or heads costing more than their declared scale, feature statistics).
- data wait: time blocked in `next(dataloader_train)` over the step time, summed over the timed iterations.
- peak MB: GPU `max_memory_allocated` (GPU) or the process's peak resident memory (RSS, augmentation workers excluded).
- passes: one step's network calls, `name rows fwd+bwd` (autograd on) or `fwd` (no grad); counted with forward hooks
  on every registered network in the last warm-up step; "(differs)" when they are not the declared ones.
"""


def write_outputs(rows: list[dict], out: Path, settings: dict) -> str:
    text = (f"# nnssl_speed\n\n{settings['description']}\n\n{markdown_table(rows)}\n\n{EXPLANATION}")
    (out / "speed.md").write_text(text, encoding="utf-8")
    with open(out / "speed.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trainer"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "speed.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2), encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------- running
def default_trainers() -> list[str]:
    from nnssl.benchmark.cli import BASELINE, SSL_TRAINERS

    return [REFERENCE, BASELINE, *SSL_TRAINERS]


def find_dataset(preprocessed: Path, dataset: str) -> str:
    """The dataset's folder name in ``nnUNet_preprocessed`` from an id or a ``DatasetXXX_Name``."""
    if dataset.startswith("Dataset"):
        name = dataset
    else:
        try:
            number = int(dataset)
        except ValueError:
            raise InputError(f"-d {dataset}: not a dataset id or DatasetXXX_Name") from None
        found = sorted(p.name for p in preprocessed.glob(f"Dataset{number:03d}_*") if p.is_dir())
        if not found:
            raise InputError(f"-d {dataset}: no Dataset{number:03d}_* in nnUNet_preprocessed ({preprocessed}); run "
                             f"nnssl_plan_and_preprocess -d {dataset} first")
        name = found[0]
    if not (preprocessed / name / "nnUNetPlans.json").is_file():
        raise InputError(f"-d {dataset}: {preprocessed / name / 'nnUNetPlans.json'} not found; run "
                         f"nnssl_plan_and_preprocess -d {dataset} first")
    return name


def check_configuration(plans_file: Path, configuration: str) -> str:
    configurations = json.loads(plans_file.read_text(encoding="utf-8")).get("configurations", {})
    if configuration not in configurations:
        raise InputError(f"-c {configuration}: not a configuration of {plans_file} "
                         f"(there: {', '.join(sorted(configurations))})")
    return hashlib.sha256(plans_file.read_bytes()).hexdigest()[:16]


def make_synthetic(preset: SpeedPreset, root: Path, env: dict[str, str]) -> None:
    """Generate and plan ``preset`` under ``root`` once (a marker file says it finished)."""
    marker = root / "planned.json"
    if marker.is_file():
        return
    from nnssl.plans_tools import shrink_network
    from nnssl.synthetic import make_synthetic_dataset

    shutil.rmtree(root, ignore_errors=True)
    raw = make_synthetic_dataset(root / "nnUNet_raw", preset.dataset_id, preset.kind, n_labeled=preset.n_labeled,
                                 n_unlabeled=preset.n_unlabeled, n_test=1, seed=0)
    cmd = ["nnssl_plan_and_preprocess", "-d", str(preset.dataset_id), "-c", preset.configuration, "-np", "2"]
    proc = subprocess.run(cmd, env={**env, "nnUNet_n_proc_DA": "2"}, capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if preset.narrow:
        shrink_network(root / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json", base_features=8,
                       max_features=64)
    marker.write_text(json.dumps(dataclasses.asdict(preset)))


def run_worker(args: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[dict, str | None]:
    """Run the worker in its own process group; ``(record, error)``; a timeout kills the group (and its workers)."""
    out = log.with_suffix(".json")
    out.unlink(missing_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, "-m", WORKER, args[0], str(out), *args[1:]], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {}, f"timed out after {timeout:.0f} s (log {log})"
    try:
        record = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = " ".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:])
        return {}, f"worker exited {proc.returncode} without a result: {tail[-400:]} (log {log})"
    return record, record.get("error")


def measure_trainers(trainers: list[str], base_args: list[str], env: dict[str, str], out: Path, key_of,
                     timeout: float, deadline: float = float("inf"), run: int = 0, runs: int = 1) -> list[SpeedResult]:
    """One row per trainer: reused from ``out/rows`` or measured in a worker; none is started after ``deadline``
    (``time.time()``): those rows say so and a rerun computes them."""
    names = {f.name for f in dataclasses.fields(SpeedResult)}
    log_suffix, label = (f".r{run}" if run else ""), (f" (run {run + 1} of {runs})" if runs > 1 else "")
    results = []
    for trainer in trainers:
        key = key_of(trainer)
        result = load_row(out, key, SpeedResult)
        if result is None and time.time() > deadline:
            result = SpeedResult(trainer, error="not run: --deadline reached (a rerun measures it)")
            print(f"nnssl_speed: {trainer}: {result.error}", flush=True)
        elif result is None:
            start = time.time()
            record, error = run_worker(["trainer", "--trainer", trainer, *base_args], env,
                                       out / "logs" / f"{trainer}{log_suffix}.log", timeout)
            result = SpeedResult(trainer, **{k: v for k, v in record.items() if k in names and k != "trainer"})
            result.unlabeled_batch = result.unlabeled_batch or 0
            result.error = error
            save_row(out, key, result)
            status = f"error: {error}" if error else f"{result.seconds_per_iteration:.4f} s/iter"
            print(f"nnssl_speed: {trainer}{label}: {status} ({time.time() - start:.0f} s)", flush=True)
        else:
            print(f"nnssl_speed: {trainer}{label}: reused {out / 'rows'}", flush=True)
        results.append(result)
    return results


def measure_floor(results: list[SpeedResult], base_args: list[str], env: dict[str, str], out: Path, key_of,
                  timeout: float, run: int = 0) -> tuple[dict[tuple[int, bool], float], dict[tuple[int, bool], float]]:
    """Seconds and FLOPs of every pass kind the rows' floors need: ``(kind_seconds, kind_flops)``."""
    kinds = set().union(*[pass_kinds(r.declared_passes) for r in results if r.error is None])
    seconds, flops, missing = {}, {}, []
    for rows, backward in sorted(kinds):
        stored = load_row(out, key_of(kind_name(rows, backward)), FloorResult)
        if stored is not None:
            seconds[(rows, backward)] = stored.seconds
            if stored.flops is not None:
                flops[(rows, backward)] = stored.flops
        else:
            missing.append((rows, backward))
    if missing:
        record, error = run_worker(["floor", *base_args, "--kinds", *[f"{r}:{int(b)}" for r, b in missing]], env,
                                   out / "logs" / (f"floor.r{run}.log" if run else "floor.log"), timeout)
        if error:
            print(f"nnssl_speed: floor: error: {error}", flush=True)
        for rows, backward in missing:
            value = record.get("seconds", {}).get(f"{rows}:{int(backward)}")
            counted = record.get("flops", {}).get(f"{rows}:{int(backward)}")
            result = FloorResult(kind_name(rows, backward), float("nan") if value is None else value, counted, error)
            save_row(out, key_of(result.trainer), result)
            seconds[(rows, backward)] = result.seconds
            if counted is not None:
                flops[(rows, backward)] = counted
    return seconds, flops


@report_user_errors("nnssl_speed")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnssl_speed", description="Per-iteration cost of nnU-Net / nnssl trainers "
                                     "at the plans' patch, batch and network: s/iter, floor, SSL tax, data wait.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", help="dataset id or name (planned with nnssl_plan_and_preprocess)")
    src.add_argument("--synthetic", nargs="?", const="cpu2d", choices=sorted(SPEED_PRESETS),
                     help="generate and plan a synthetic set under OUTPUT (cpu2d: small 2D, narrow network; gpu3d: "
                          "3D organs at native size, nnU-Net's plans)")
    parser.add_argument("-c", default=None, help="configuration (default with --synthetic: the preset's)")
    parser.add_argument("--trainers", nargs="+", default=None,
                        help=f"default: {REFERENCE} and every nnssl trainer of nnssl_benchmark")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every trainer and the floor this many times, in interleaved rounds (one "
                             "process each), and report medians with their range: on a shared or noisy machine one "
                             "run's ratios move by ~10 %%")
    parser.add_argument("-device", default=None, choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("-o", "--output", default="nnssl_speed", help="output folder")
    parser.add_argument("-f", "--fold", default="0", help="fold (nnU-Net's; default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on a CPU (default: nnU-Net's, every core; 1 on a shared machine)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the command's start after which no further trainer is started (their rows "
                             "say so; the floor is still measured); default: none")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per trainer subprocess (then: error row)")
    args = parser.parse_args(argv)
    began = time.time()
    if (args.iterations < 1 or args.repeats < 1 or args.warmup < 0
            or (args.threads is not None and args.threads < 1)):
        parser.error("--iterations, --repeats and --threads must be >= 1 and --warmup >= 0")
    if args.d is not None and args.c is None:
        parser.error("-c is required with -d")

    from nnssl.cli.trainer_path import trainer_folder

    out = Path(args.output).resolve()
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder(), "PYTHONUNBUFFERED": "1",
           "nnUNet_results": str(out / "nnUNet_results")}
    preset = SPEED_PRESETS.get(args.synthetic) if args.synthetic else None
    if preset is not None:
        root = out / f"synthetic_{preset.name}"
        env.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"))
        configuration, dataset = args.c or preset.configuration, str(preset.dataset_id)
    else:
        missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed") if not env.get(k)]
        if missing:
            raise InputError(f"-d {args.d}: the environment variable(s) {', '.join(missing)} are not set")
        configuration, dataset = args.c, args.d
    os.environ.update({k: env[k] for k in ("nnUNet_extTrainer", "nnUNet_results", "nnUNet_raw",
                                           "nnUNet_preprocessed")})
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from nnssl.benchmark.cli import check_trainers

    trainers = check_trainers(list(dict.fromkeys(args.trainers or default_trainers())))
    if preset is None:
        name = find_dataset(Path(env["nnUNet_preprocessed"]), dataset)
        plans_digest = check_configuration(Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans.json",
                                           configuration)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    if preset is not None:
        print(f"nnssl_speed: synthetic preset {preset.name} under {root}", flush=True)
        make_synthetic(preset, root, env)
        name = find_dataset(Path(env["nnUNet_preprocessed"]), dataset)
        plans_digest = check_configuration(Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans.json",
                                           configuration)
    data = f"{name} plans {plans_digest}" + (f" synthetic {preset.name}" if preset else "")
    options = {"device": device, "warmup": args.warmup, "iterations": args.iterations, "mode": "speed",
               "n_proc_DA": env.get("nnUNet_n_proc_DA", "default"), "compile": env.get("nnUNet_compile", "default"),
               "threads": args.threads if device == "cpu" else None}

    def keys_of(repeat: int):
        # round 0 keeps the key of a run without --repeats, so its rows are reused and a table can grow by rounds
        extra = {"repeat": repeat} if repeat else {}
        return lambda trainer: row_key(int(name[7:10]), configuration, args.fold, trainer, 0, env, data, **options,
                                       **extra)

    base_args = ["-d", name, "-c", configuration, "-f", args.fold, "-device", device, "--warmup", str(args.warmup),
                 "--iterations", str(args.iterations),
                 *(["--threads", str(args.threads)] if args.threads and device == "cpu" else [])]
    start = time.time()
    deadline = began + args.deadline if args.deadline is not None else float("inf")
    rounds, floors = [], []
    for repeat in range(args.repeats):
        results = measure_trainers(trainers, base_args, env, out, keys_of(repeat), args.timeout, deadline,
                                   run=repeat, runs=args.repeats)
        kind_seconds, kind_flops = measure_floor(results, base_args, env, out, keys_of(repeat), args.timeout,
                                                 run=repeat)
        rounds.append(summarize(results, kind_seconds, kind_flops))
        floors.append((kind_seconds, kind_flops))
    rows = combine_repeats(rounds)
    kind_seconds = {kind: statistics.median(f[0][kind] for f in floors if kind in f[0]) for kind in floors[0][0]}
    kind_flops = floors[0][1]
    settings = {"dataset": name, "configuration": configuration, "fold": args.fold, "device": device,
                "warmup": args.warmup, "iterations": args.iterations, "repeats": args.repeats,
                "nnUNet_n_proc_DA": options["n_proc_DA"],
                "nnUNet_compile": options["compile"], "floor_seconds": {f"{r}:{int(b)}": s for (r, b), s in
                                                                        sorted(kind_seconds.items())},
                "floor_flops": {f"{r}:{int(b)}": f for (r, b), f in sorted(kind_flops.items())},
                "description": f"{name} {configuration} fold {args.fold} on {device}: {args.warmup} warm-up + "
                               f"{args.iterations} timed iterations per trainer (median), at epoch num_epochs // 2; "
                               + (f"{args.repeats} interleaved runs of every trainer and of the floor (median over the "
                                  "runs, range in parentheses); " if args.repeats > 1 else "") +
                               f"nnUNet_n_proc_DA={options['n_proc_DA']}, nnUNet_compile={options['compile']}"
                               + (f", {args.threads} torch thread(s)" if options["threads"] else "") + "."}
    print(write_outputs(rows, out, settings))
    print(f"nnssl_speed: {time.time() - start:.0f} s; tables in {out} (speed.md, speed.csv, speed.json)")


if __name__ == "__main__":
    main()
