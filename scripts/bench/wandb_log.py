"""One W&B run per sweep point, all points of a sweep in one group, from the point's row (scripts/bench/schema).

The requested mode is checked before any compute: ``online`` needs credentials (``wandb login`` or
``WANDB_API_KEY``). A point counts as logged only once its run has finished and the run's local record (the
``run-<id>.wandb`` file, written in both modes) holds its exit: W&B's writer can still be flushing after
``run.finish()`` returns, so :func:`log_row` waits for it (up to ``WRITE_TIMEOUT_S``). The ledger
``<out_dir>/wandb/logged.tsv`` records (point_key, mode, run id). A rerun logs, from their CSV rows and without
computing anything, the points of its sweep that have no run in the current mode yet: runs that failed (a
network error), or, with ``online``, every point so far only logged offline. Init is kept light: no system
stats, console capture, code or machine metadata.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import sys
from typing import Any, Optional
from urllib.parse import urlparse

from scripts.bench import schema
from scripts.bench.config import BenchConfig, BenchConfigError
from scripts.bench.points import point_label


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def preflight(cfg: BenchConfig) -> str:
    """The W&B mode that will run; raises BenchConfigError when it cannot work."""
    mode = cfg.wandb.resolved_mode()
    if mode not in ("offline", "online", "disabled"):  # from $WANDB_MODE; the field itself is a Literal
        raise BenchConfigError(f"wandb.mode: $WANDB_MODE={mode!r} must be one of offline, online, disabled")
    if mode == "disabled":
        return mode
    if importlib.util.find_spec("wandb") is None:
        raise BenchConfigError("wandb.enabled: the wandb package is not installed (pip install wandb), "
                               "or use --wandb.mode disabled")
    if mode == "online" and not _has_credentials():
        raise BenchConfigError(
            "wandb.mode: online needs W&B credentials and none were found (no WANDB_API_KEY, no ~/.netrc entry); "
            "run `wandb login`, or use --wandb.mode offline (upload later: rerun with online)"
        )
    return mode


class Ledger:
    """Which points have a finished W&B run, per mode."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "wandb", "logged.tsv")

    def logged(self, mode: str) -> set[str]:
        if not os.path.exists(self.path):
            return set()
        with open(self.path) as f:
            return {parts[0] for parts in (ln.split("\t") for ln in f) if len(parts) >= 2 and parts[1] == mode}

    def add(self, key: str, mode: str, run_id: str) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{key}\t{mode}\t{run_id}\n")


#: How long log_row waits for a finished run's local record to hold its exit before leaving it unlogged.
WRITE_TIMEOUT_S = 30.0


def _written(out_dir: str, run_id: str, timeout_s: float) -> bool:
    """Whether the run's local ``.wandb`` record holds its exit record within ``timeout_s`` (polled)."""
    import glob
    import time

    from experiments.speedrun.wandb_offline import read_wandb_records

    deadline = time.monotonic() + timeout_s
    pattern = os.path.join(out_dir, "wandb", f"*-{run_id}")
    while True:
        for run_dir in glob.glob(pattern):
            try:
                if read_wandb_records(run_dir)["exit_code"] is not None:
                    return True
            except Exception:  # noqa: BLE001 - not there yet, or a record still being written
                pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _settings():
    import wandb

    try:
        return wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True,
                              x_disable_machine_info=True, save_code=False, silent=True)
    except Exception:  # a wandb without one of these settings
        return wandb.Settings(console="off", silent=True)


def log_row(cfg: BenchConfig, row: dict[str, Any], group: str, mode: str) -> Optional[str]:
    """Log one point's row as a finished run and record it in the ledger; returns the run id, or None (with a
    one-line warning on stderr) when W&B failed: the point stays unlogged and a rerun retries it."""
    import numpy as np
    import wandb

    config, summary, vectors = schema.wandb_split(row)
    name = point_label(row["shape"], row["topk"], row["impl"], row["null_mode"], row["null_target"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=mode, group=group,
                         job_type="bench", tags=list(cfg.wandb.tags), name=name, dir=os.path.abspath(cfg.out_dir),
                         config=config, settings=_settings(), reinit="create_new")
        log = dict(summary)
        for key, (values, role) in vectors.items():
            v = np.asarray(values, dtype=np.float64)
            log[key] = wandb.Histogram(np_histogram=(v, np.arange(len(v) + 1, dtype=np.float64)))
            if role == "histogram+table":
                data = [[i, float(x)] for i, x in enumerate(v)]
                log[f"{key}_table"] = wandb.Table(columns=["expert", "load"], data=data)
        run.log(log)
        run.summary.update(summary)
        run_id = run.id
        run.finish()
    except Exception as e:  # the CSV has the row; the ledger does not, so a rerun logs it
        msg = " ".join(str(e).split())[:200]
        print(f"WARNING: W&B run for {name} failed ({type(e).__name__}: {msg}); a rerun will log it",
              file=sys.stderr, flush=True)
        return None
    if not _written(os.path.abspath(cfg.out_dir), run_id, WRITE_TIMEOUT_S):
        print(f"WARNING: W&B run for {name} finished but its record was not on disk within {WRITE_TIMEOUT_S:.0f} s; "
              "a rerun will log it", file=sys.stderr, flush=True)
        return None
    Ledger(cfg.out_dir).add(row["point_key"], mode, run_id)
    return run_id
