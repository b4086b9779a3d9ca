"""The GPU check's one result table: ``OUT/gpu_results.csv``, written row by row (flushed) by every timing process
of the check (measure.py's JAX sections, torch_peers.py's PyTorch peers), and read back by summary.py.

Columns: ``section`` (env, gmm, layer, torch_gmm, torch_layer), ``backend`` (what ran: triton, triton_unfused,
tokamax, dense, torch_grouped_mm, torch_layer, ...), ``dtype``, ``shape``, ``real_frac_or_null`` (gmm: fraction
of rows that are real; layer: the null fraction), ``mode`` (independent / take_until_null), ``pass`` (fwd /
fwdbwd), ``median_ms`` (per call), ``ratio`` and ``ratio_of`` (what the ratio compares), ``tokens_per_s``,
``timing`` (how it was timed) and ``note``. A row with an empty ``median_ms`` records a failure or a skip.
"""

from __future__ import annotations

import csv
import pathlib

COLUMNS = [
    "section",
    "backend",
    "dtype",
    "shape",
    "real_frac_or_null",
    "mode",
    "pass",
    "median_ms",
    "ratio",
    "ratio_of",
    "tokens_per_s",
    "timing",
    "note",
]
CSV_NAME = "gpu_results.csv"


class Results:
    """Appends rows to OUT/gpu_results.csv (header written once), flushing each; keeps them for the caller."""

    def __init__(self, out_dir: pathlib.Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / CSV_NAME
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self.rows: list[dict] = []
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        if fresh:
            self._writer.writeheader()
            self._fh.flush()

    def add(self, **row) -> dict:
        if "pass_" in row:  # 'pass' is a Python keyword
            row["pass"] = row.pop("pass_")
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        full = {c: row.get(c, "") for c in COLUMNS}
        for key in ("median_ms", "ratio", "tokens_per_s"):
            if isinstance(full[key], float):
                full[key] = f"{full[key]:.6g}"
        self.rows.append(full)
        self._writer.writerow(full)
        self._fh.flush()
        return full

    def close(self) -> None:
        self._fh.close()


def read(out_dir: pathlib.Path) -> list[dict]:
    """Every row of OUT/gpu_results.csv (empty if it does not exist)."""
    path = pathlib.Path(out_dir) / CSV_NAME
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def timing_note(timing, rounds: int) -> str:
    """How a case was timed, for the ``timing`` column (a scripts.bench.timer.Timing)."""
    return (f"median of {rounds} rounds x {timing.calls_per_sample} back-to-back calls "
            f"(>= the round's minimum of device work), per call")
