"""Read an offline W&B run (the ``run-*.wandb`` file) back into plain Python: config, summary and history.

Used by the quality study (``experiments/speedrun/null_quality.py``) and the tests (``tests/wandb_records.py``
re-exports it). wandb >= 0.2x dropped its Python ``DataStore`` reader, so this
parses the file format directly: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by a LevelDB-style
log of 32 KiB blocks; each chunk has a 7-byte header (crc32 uint32 LE, length uint16 LE, type uint8 with
FULL=1, FIRST=2, MIDDLE=3, LAST=4) and chunks reassemble into serialized ``wandb_internal_pb2.Record`` protos.

    from experiments.speedrun.wandb_offline import read_wandb_records
    rec = read_wandb_records("out/wandb/offline-run-.../")   # or the .wandb file, or a dir holding one run
    rec["config"]["tokens"], rec["summary"]["tokens_per_s"], rec["history"][0]["loss"]

Values are JSON-decoded (W&B stores them as JSON strings). A key logged as one string stays one key even if it
contains "/" (``history[0]["train/loss"]``); a logged dict (a histogram, a table reference, ``{"a": {"b": 1}}``)
comes back as nested dicts (``summary["expert_load"]["values"]``). Config values are unwrapped from W&B's ``{"value": ...}`` form and the
internal ``_wandb`` entry is dropped. The summary is the last full summary record merged with later updates.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

_HEADER_IDENT = b":W&B"
_HEADER_LEN = 7
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _unique_real(paths) -> list[str]:
    """Dedupe through symlinks (W&B keeps a ``latest-run`` link next to the run dirs)."""
    seen: dict[str, str] = {}
    for p in sorted(paths):
        if "latest-run" in p.split(os.sep):
            seen.setdefault(os.path.realpath(p), os.path.realpath(p))
        else:
            seen[os.path.realpath(p)] = p
    return sorted(seen.values())


def find_wandb_file(path: str) -> str:
    """Resolve a run dir (``offline-run-*``), a dir containing exactly one run, or a ``.wandb`` file."""
    if os.path.isfile(path):
        return path
    hits = sorted(glob.glob(os.path.join(path, "*.wandb")))
    if not hits:
        hits = _unique_real(glob.glob(os.path.join(path, "**", "*.wandb"), recursive=True))
    if len(hits) != 1:
        raise FileNotFoundError(f"expected exactly one .wandb file under {path!r}, found {len(hits)}: {hits[:5]}")
    return hits[0]


def iter_raw_records(wandb_file: str):
    """Yield the serialized Record payloads (bytes) of a .wandb file, in order."""
    with open(wandb_file, "rb") as f:
        data = f.read()
    if len(data) < _HEADER_LEN or data[:4] != _HEADER_IDENT:
        raise ValueError(f"{wandb_file!r} is not a W&B transaction log (bad header {data[:7]!r})")
    pos = _HEADER_LEN
    pending: list[bytes] = []
    while pos < len(data):
        block_left = _BLOCK - (pos % _BLOCK)
        if block_left < _CHUNK_HEADER:  # trailer padding at the end of a block
            pos += block_left
            continue
        if pos + _CHUNK_HEADER > len(data):
            break
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        pos += _CHUNK_HEADER
        if kind == 0 and length == 0:  # zero padding (e.g. a truncated / preallocated tail)
            pos += block_left - _CHUNK_HEADER
            continue
        chunk = data[pos : pos + length]
        pos += length
        if len(chunk) < length:  # truncated tail: a run that was killed mid-write
            break
        if kind == _FULL:
            pending = []
            yield chunk
        elif kind == _FIRST:
            pending = [chunk]
        elif kind == _MIDDLE:
            pending.append(chunk)
        elif kind == _LAST:
            pending.append(chunk)
            yield b"".join(pending)
            pending = []
        else:
            raise ValueError(f"{wandb_file!r}: unknown chunk type {kind} at byte {pos}")


def _record_class():
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2.Record


def _decode(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except (TypeError, ValueError):
        return value_json


def _item_key(item) -> str:
    if item.key:
        return item.key
    return "/".join(item.nested_key)


def _item_path(item) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set(d: dict, item, value) -> None:
    """Store at the item's key; a multi-part nested_key (a logged dict, e.g. a histogram) becomes nested dicts."""
    path = _item_path(item)
    for part in path[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = d[part] = {}
        d = nxt
    d[path[-1]] = value


def _remove(d: dict, item) -> None:
    path = _item_path(item)
    for part in path[:-1]:
        d = d.get(part)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def iter_records(wandb_file: str):
    """Yield parsed ``wandb_internal_pb2.Record`` messages of a .wandb file."""
    Record = _record_class()
    for payload in iter_raw_records(wandb_file):
        rec = Record()
        rec.ParseFromString(payload)
        yield rec


def read_wandb_records(run_dir_or_file: str) -> dict:
    """Parse an offline W&B run into {"config": dict, "summary": dict, "history": [dict, ...], ...}.

    Extra keys: "run" (id, project, group, tags, job_type, name), "exit_code" (None when the run never
    finished: a crash), "file" (the .wandb path).
    """
    path = find_wandb_file(run_dir_or_file)
    config: dict = {}
    summary: dict = {}
    history: list[dict] = []
    run_info: dict = {}
    exit_code = None
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run_info = {
                "id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "group": r.run_group,
                "job_type": r.job_type,
                "name": r.display_name,
                "tags": list(r.tags),
            }
            for item in r.config.update:
                _set(config, item, _decode(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set(config, item, _decode(item.value_json))
            for item in rec.config.remove:
                _remove(config, item)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set(row, item, _decode(item.value_json))
            history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set(summary, item, _decode(item.value_json))
            for item in rec.summary.remove:
                _remove(summary, item)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    config.pop("_wandb", None)
    config = {k: (v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v)
              for k, v in config.items()}
    return {
        "config": config,
        "summary": summary,
        "history": history,
        "run": run_info,
        "exit_code": exit_code,
        "file": path,
    }


def find_run_dirs(root: str) -> list[str]:
    """All offline run directories (those holding a .wandb file) under root, sorted."""
    return sorted({os.path.dirname(p) for p in _unique_real(glob.glob(os.path.join(root, "**", "*.wandb"), recursive=True))})
