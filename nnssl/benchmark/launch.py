"""Run nnU-Net console entry points in this process and record the peak memory of the first one.

``python -m nnssl.benchmark.launch OUT.json nnUNetv2_train ARGS... [--then nnUNetv2_predict ARGS...]`` runs exactly
what the ``nnUNetv2_train`` console script runs (same entry function, same arguments), writes ``{"max_rss_mb",
"cuda_max_allocated_mb", "wall_s"}`` of that first command to OUT.json, and then runs each ``--then`` command the
same way. Peak RSS is this process's own (``getrusage(RUSAGE_SELF)``), which excludes nnU-Net's augmentation
workers, the same for every trainer; CUDA memory is ``torch.cuda.max_memory_allocated``.

With ``NNSSL_BENCHMARK_SEED`` set, Python's, numpy's and torch's global generators are seeded with it before the first
command: nnU-Net seeds nothing itself, so with augmentation in this process (``nnUNet_n_proc_DA=0``, the
benchmark's CPU setting) a row is then reproducible bit for bit on a CPU (initialisation, batch sampling,
augmentation, the methods' own draws); the benchmark passes the row's seed. Worker processes
(``nnUNet_n_proc_DA > 0``) and CUDA kernels stay non-deterministic.

Prediction runs in the training process because importing nnU-Net (torch, torch._dynamo, timm through
dynamic-network-architectures) costs about 6.5 s of one CPU core per process: once per benchmark row instead of twice.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time

ENTRY_POINTS = {
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
}
THEN = "--then"
ENV_SEED = "NNSSL_BENCHMARK_SEED"


def split_commands(argv: list[str]) -> list[list[str]]:
    """``[script, args..., "--then", script, args...]`` -> one ``[script, args...]`` per command; scripts checked."""
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        if not command or command[0] not in ENTRY_POINTS:
            raise SystemExit(f"nnssl.benchmark.launch: expected one of {sorted(ENTRY_POINTS)} to start every command, "
                             f"got {command[:1] or 'nothing'} in {argv}")
    return commands


def run_entry_point(command: list[str]) -> None:
    script, *args = command
    module_name, func_name = ENTRY_POINTS[script].split(":")
    entry = getattr(importlib.import_module(module_name), func_name)
    sys.argv = [script, *args]
    entry()


def seed_everything(seed: int) -> None:
    """Seed the global generators every draw of a training comes from (Python, numpy, torch on every device)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    out, *rest = sys.argv[1:]
    first, *then = split_commands(rest)
    import torch

    if os.environ.get(ENV_SEED, "") != "":
        seed_everything(int(os.environ[ENV_SEED]))

    start = time.time()
    run_entry_point(first)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    record = {
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_allocated_mb": cuda_peak,
        "wall_s": time.time() - start,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer's cached blocks are not needed by the predictor
    for command in then:
        run_entry_point(command)


if __name__ == "__main__":
    main()
