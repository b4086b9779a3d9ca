"""The results CSV: checked before any compute, repaired on resume, one durable row per point.

A row is flushed and fsynced before its RESULT line is printed, so every number a log shows is in the CSV. A
run killed mid-write leaves at most one unterminated last line: readers ignore it and ``open`` cuts it off,
so the point is measured again instead of surviving as a torn duplicate.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from typing import Any

from scripts.bench import schema
from scripts.bench.config import BenchConfigError


def _probe_dir(path: str, field: str) -> None:
    """Raise unless files can be created in the existing directory ``path`` (an unnamed temp file, gone at once)."""
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise BenchConfigError(f"{field}: cannot write in {path} ({e.strerror or e})") from None


def check_out_dir(out_dir: str) -> None:
    """out_dir must be a writable directory, or creatable in one. Nothing is created here."""
    path = os.path.abspath(out_dir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise BenchConfigError(f"out_dir: {out_dir} exists and is not a directory")
        _probe_dir(path, "out_dir")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BenchConfigError(f"out_dir: cannot create {out_dir}: {parent} is not a directory")
    _probe_dir(parent, "out_dir")


class ResultsCSV:
    def __init__(self, path: str):
        self.path = path

    def _complete(self) -> bytes:
        """The file up to its last newline: an unterminated last line is a row torn by a crash."""
        if not os.path.exists(self.path):
            return b""
        with open(self.path, "rb") as f:
            data = f.read()
        return data[: data.rfind(b"\n") + 1]

    def _complete_text(self) -> str:
        return self._complete().decode("utf-8", errors="replace")

    def check(self) -> None:
        """Before any compute: an existing CSV must be a writable file with this bench's columns."""
        if not os.path.exists(self.path):
            return
        if not os.path.isfile(self.path):
            raise BenchConfigError(f"csv_name: {self.path} exists and is not a file")
        try:
            text = self._complete_text()
            with open(self.path, "a"):
                pass
        except OSError as e:
            raise BenchConfigError(f"csv_name: cannot read and append to {self.path} ({e.strerror or e})") from None
        header = next(csv.reader(io.StringIO(text)), None)
        if header is not None and tuple(header) != schema.NAMES and not self._upgradable(header):
            diff = next((i for i, (a, b) in enumerate(zip(header, schema.NAMES)) if a != b),
                        min(len(header), len(schema.NAMES)))
            got = header[diff] if diff < len(header) else "(end)"
            want = schema.NAMES[diff] if diff < len(schema.NAMES) else "(end)"
            raise BenchConfigError(
                f"csv_name: {self.path} has another column layout ({len(header)} columns, column {diff + 1} is "
                f"{got!r} where this bench writes {want!r}); use another out_dir or csv_name, or move it away"
            )

    @staticmethod
    def _upgradable(header) -> bool:
        """The layout before ``schema.ADDED_COLUMNS``: this bench's columns without them, in order."""
        return tuple(header) == tuple(n for n in schema.NAMES if n not in schema.ADDED_COLUMNS)

    def _upgrade(self) -> None:
        """Rewrite an older-layout file in this layout (the added columns at their old-row values), atomically."""
        rows = list(csv.reader(io.StringIO(self._complete_text())))
        header, body = rows[0], rows[1:]
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(schema.NAMES)
        for r in body:
            if len(r) == len(header):
                old = dict(zip(header, r))
                w.writerow([old[n] if n in old else schema.ADDED_COLUMNS[n] for n in schema.NAMES])
        tmp = self.path + ".upgrade"
        with open(tmp, "w", newline="") as f:
            f.write(out.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read(self) -> list[dict[str, Any]]:
        """The complete rows, typed (scripts/bench/schema.typed)."""
        rows = csv.reader(io.StringIO(self._complete_text()))
        header = next(rows, None)
        if header is None:
            return []
        return [schema.typed(dict(zip(header, r))) for r in rows if len(r) == len(header) and r[-1]]

    def done_keys(self) -> set[str]:
        return {r["point_key"] for r in self.read() if r.get("point_key")}

    def open(self) -> None:
        """Create the directory, cut off a torn last line, write the header into a new or empty file."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        keep = len(self._complete())
        if os.path.exists(self.path) and os.path.getsize(self.path) != keep:
            with open(self.path, "rb+") as f:
                f.truncate(keep)
        if keep == 0:
            self._write_line(list(schema.NAMES))
        elif self._upgradable(next(csv.reader(io.StringIO(self._complete_text())))):
            self._upgrade()

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and make it durable (flush + fsync) before returning."""
        self._write_line([schema.csv_value(k, row.get(k)) for k in schema.NAMES])

    def _write_line(self, values: list[str]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
            f.flush()
            os.fsync(f.fileno())
