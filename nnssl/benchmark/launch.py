"""Run one nnU-Net console entry point in this process and record its peak memory.

``python -m nnssl.benchmark.launch OUT.json nnUNetv2_train ARGS...`` runs exactly what the ``nnUNetv2_train``
console script runs (same entry function, same arguments) and then writes ``{"max_rss_mb", "cuda_max_allocated_mb",
"wall_s"}`` to OUT.json. Peak RSS is this process's own (``getrusage(RUSAGE_SELF)``), which excludes nnU-Net's
augmentation workers, the same for every trainer; CUDA memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import resource
import sys
import time

ENTRY_POINTS = {
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
}


def main() -> None:
    out, script, *args = sys.argv[1:]
    module_name, func_name = ENTRY_POINTS[script].split(":")
    import importlib

    import torch

    entry = getattr(importlib.import_module(module_name), func_name)
    sys.argv = [script, *args]
    start = time.time()
    entry()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    record = {
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_allocated_mb": cuda_peak,
        "wall_s": time.time() - start,
    }
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
