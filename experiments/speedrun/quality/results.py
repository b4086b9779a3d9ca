"""``results.csv``: one row per finished arm x seed, rewritten atomically after every run (temp file, fsync,
rename), so a row is in the file only once its run finished and was read back."""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

__all__ = ["RESULT_COLUMNS", "fmt", "load_results", "write_rows_atomically"]

RESULT_COLUMNS = [
    "arm", "seed", "num_experts_per_tok", "null_route_frac", "num_null_experts", "expected_real_experts_per_token",
    "realized_experts_per_token", "realized_experts_per_token_final", "null_frac", "all_null_frac",
    "all_null_frac_final", "load_violation_max_final", "routing_entropy_final", "eval_loss", "eval_bpb",
    "train_loss_final", "train_tokens", "num_train_steps", "eval_tokens", "parameter_count", "tokens_per_second",
    "wall_s", "data_fingerprint", "run_id", "arm_overrides", "study_hash",
]


def load_results(path: str) -> list[dict]:
    """Rows of a results.csv as dicts of strings ([] if the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows_atomically(path: str, rows: list[dict], columns: Sequence[str] = tuple(RESULT_COLUMNS)) -> None:
    """Writes ``rows`` (only ``columns``; None as empty) to a temporary file, fsyncs it and renames it over
    ``path``, so a reader sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fmt(value: Any) -> str:
    """A CSV cell: floats rounded to 6 digits, None as empty."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(round(value, 6))
    return "" if value is None else str(value)
