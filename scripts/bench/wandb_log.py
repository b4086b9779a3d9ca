"""One W&B run per sweep point (offline unless configured online), all points of a sweep in one group.

config = every axis of the point (and the sweep's settings); summary = the figures, plus the expert load as a
histogram (``expert_load``: bin i = expert i, height = its fraction of real assignments) and a table
(``expert_load_table``). Runs live under ``<out_dir>/wandb``. Init is kept light: no system stats, console
capture, code or machine metadata.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

import numpy as np

from scripts.bench.config import BenchConfig


def _settings():
    import wandb

    kwargs = dict(
        console="off",
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        save_code=False,
        silent=True,
    )
    try:
        return wandb.Settings(**kwargs)
    except Exception:  # older/newer wandb without one of these settings
        return wandb.Settings(console="off", silent=True)


def log_point(cfg: BenchConfig, row: dict[str, Any], result, group: str) -> Optional[str]:
    """Log one finished point; returns the run directory (None when W&B is disabled or fails)."""
    mode = cfg.wandb.resolved_mode()
    if not cfg.wandb.enabled or mode == "disabled":
        return None
    import wandb

    pt = result.point
    config = {k: row[k] for k in (
        "shape", "tokens", "hidden", "mlp_dim", "experts", "topk", "impl", "backend", "pass", "routing",
        "null_mode", "null_target", "dtype", "renormalize", "warmup", "iters", "seed", "requested_backend",
        "point_key", "sweep", "tile_rows", "fused_experts", "host_malloc", "timing",
    )}
    config["renormalize_real_after_null"] = pt.renormalize
    config["bench_pass"] = pt.bench_pass
    config["null_routing_mode"] = pt.null_mode
    config["null_route_frac"] = pt.null_target
    config["split_forward_backward"] = pt.split
    summary = {k: row[k] for k in (
        "null_realized", "real_assignments", "null_assignments", "experts_per_token", "all_null_frac",
        "time_s", "tokens_per_s", "tflops", "load_cv", "load_max", "load_violation", "time_min_s",
        "time_max_s", "compile_s",
    )}
    if result.forward is not None:
        summary["time_fwd_s"] = row["time_fwd_s"]
        summary["time_bwd_s"] = row["time_bwd_s"]
    wandb_dir = os.path.abspath(cfg.out_dir)
    os.makedirs(wandb_dir, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            mode=mode,
            group=group,
            job_type="bench",
            tags=list(cfg.wandb.tags),
            name=pt.label,
            dir=wandb_dir,
            config=config,
            settings=_settings(),
            reinit="create_new",
        )
        loads = np.asarray(result.expert_loads, dtype=np.float64)
        table = wandb.Table(columns=["expert", "load"], data=[[i, float(v)] for i, v in enumerate(loads)])
        hist = wandb.Histogram(np_histogram=(loads, np.arange(len(loads) + 1, dtype=np.float64)))
        log = dict(summary)
        log["expert_load"] = hist
        log["expert_load_table"] = table
        if result.real_per_token_hist is not None:
            rp = np.asarray(result.real_per_token_hist, dtype=np.float64)
            log["real_experts_per_token_hist"] = wandb.Histogram(
                np_histogram=(rp, np.arange(len(rp) + 1, dtype=np.float64))
            )
        run.log(log)
        run.summary.update(summary)
        run_dir = run.dir
        run.finish(quiet=True) if "quiet" in run.finish.__code__.co_varnames else run.finish()
        return os.path.dirname(run_dir.rstrip("/")) if run_dir.rstrip("/").endswith("files") else run_dir
    except Exception as e:  # never lose a sweep to a logging problem: the CSV already has the row
        print(f"WARNING: W&B logging failed for {pt.label}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def sweep_config(cfg: BenchConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
