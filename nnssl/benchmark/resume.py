"""Finished rows of ``nnssl_benchmark`` on disk, so that a rerun with the same output folder computes only what is
missing (a killed run keeps its rows; a bigger table can be built in pieces).

A row is one (dataset, configuration, fold, trainer, seed). It is saved as ``rows/<tag>.json`` = ``{"key": ...,
"result": RunResult fields}`` once it finished without error. The key holds everything that changes the number:
the data (the raw dataset's split and its location, or the synthetic preset's spec), every ``NNSSL_*`` schedule
variable, mirroring, the device and the row's own options (e.g. the pseudo-label selection rule); a row is only
reused when its stored key equals the new one exactly, so a run under another schedule never borrows its numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

ROWS_FOLDER = "rows"


def schedule_key(env: Mapping[str, str]) -> dict[str, str]:
    """Every ``NNSSL_*`` variable of the run's environment (epochs, iterations, lr, batch sizes, ...)."""
    return {k: env[k] for k in sorted(env) if k.startswith("NNSSL_")}


def row_key(dataset_id: int, configuration: str, fold: str, trainer: str, seed: int, env: Mapping[str, str],
            data: str, **options: Any) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "configuration": configuration, "fold": str(fold), "trainer": trainer,
            "seed": seed, "data": data, "schedule": schedule_key(env), **{k: options[k] for k in sorted(options)}}


def row_file(out: Path, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return (out / ROWS_FOLDER /
            f"{key['dataset_id']}_{key['configuration']}_f{key['fold']}_{key['trainer']}_seed{key['seed']}_{digest}.json")


def save_row(out: Path, key: Mapping[str, Any], result: Any) -> None:
    """Store a finished row (only without error: a failed row is recomputed on the next run)."""
    from nnssl.io import atomic_write_json

    if result.error is None and getattr(result, "skipped", None) is None:
        atomic_write_json(row_file(out, key), {"key": dict(key), "result": dataclasses.asdict(result)})


def load_row(out: Path, key: Mapping[str, Any], result_type: type) -> Any | None:
    """The stored result of the row ``key``, or None when there is none, it is unreadable, or its key differs."""
    path = row_file(out, key)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stored.get("key") != json.loads(json.dumps(dict(key))):  # compared as JSON (tuples become lists)
        return None
    names = {f.name for f in dataclasses.fields(result_type)}
    return result_type(**{k: v for k, v in stored.get("result", {}).items() if k in names})
