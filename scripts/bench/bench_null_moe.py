"""Null-routing sweeps of the NullRoutedMoE layer in isolation: RESULT lines, a resumable CSV, plots, W&B.

    python -m scripts.bench.bench_null_moe --config_path configs/bench/cpu_matrix.yaml
    python scripts/bench/bench_null_moe.py --tokens 2048 --topk_list '[2,4]' --null_route_sweep true \\
        --impl '[null_moe,masked_null]' --null_routing_mode both --out_dir out/bench/try

See docs/BENCH.md for every field. Bad input is rejected before any compute with an error naming the field.
"""


import datetime
import os
import sys

if __package__ in (None, ""):  # run as a file: make `scripts.bench` and `null_moe` importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, _ROOT)
    sys.path.insert(1, os.path.join(_ROOT, "src"))

import draccus

from typing import Optional

from scripts.bench import config as bconfig
from scripts.bench import host_malloc
from scripts.bench.config import BenchConfig, BenchConfigError


def _log(msg: str) -> None:
    print(msg, flush=True)


def prepare(cfg: BenchConfig):
    """Validate, expand and memory-check the sweep (no compute). Raises BenchConfigError naming the field."""
    bconfig.validate(cfg)
    points = bconfig.expand(cfg)
    bconfig.check_memory(cfg, points)
    return points


def _batches(todo: list, interleave: bool) -> list[list]:
    """Consecutive points that share one compiled step (scripts.bench.timing.group_key) form one batch, timed in
    interleaved rounds; everything else, or everything when ``interleave`` is off, runs alone."""
    from scripts.bench import timing

    batches: list[list] = []
    for pt in todo:
        key = timing.group_key(pt) if interleave else None
        if batches and key is not None and timing.group_key(batches[-1][0]) == key and interleave:
            batches[-1].append(pt)
        else:
            batches.append([pt])
    return batches


def run(cfg: BenchConfig) -> list[dict]:
    """Run the sweep; returns the typed CSV rows of this sweep (resumed ones included)."""
    points = prepare(cfg)
    sweep = bconfig.sweep_hash(points)
    group = cfg.wandb.group or f"bench-{sweep}"

    from scripts.bench import report

    csv_path = os.path.join(cfg.out_dir, cfg.csv_name)
    store = report.ResultsCSV(csv_path)
    done = store.done_keys()
    todo = [p for p in points if p.key not in done]
    _log(
        f"bench: {len(points)} points ({len(points) - len(todo)} already in {csv_path}), sweep={sweep}, "
        f"group={group}, wandb={cfg.wandb.resolved_mode() if cfg.wandb.enabled else 'disabled'}"
    )
    if cfg.dry_run:
        for p in points:
            _log(f"POINT {p.label} key={p.key} {'done' if p.key in done else 'todo'} "
                 f"est_gib={bconfig.estimate_bytes(p) / 2**30:.2f}")
        return []

    import jax

    from scripts.bench import timing, wandb_log

    _log(f"bench: jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
         f"{len(jax.devices())} device(s), host_malloc={host_malloc.current_mode()}")
    for i, pt in enumerate(points):
        if pt.key in done:
            _log(f"SKIP {i + 1}/{len(points)} {pt.label} key={pt.key} (already in {csv_path})")
    for batch in _batches([p for p in todo], cfg.interleave):
        # a batch's rows land together once it is timed; a crash loses at most the batch in flight
        results = timing.run_group(batch) if len(batch) > 1 else [timing.run_point(batch[0])]
        for result in results:
            ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            row = report.make_row(result, sweep, ts)
            _log(report.result_line(row))
            store.append(row)
            wandb_log.log_point(cfg, row, result, group)

    keys = {p.key for p in points}
    rows = [report.typed(r) for r in store.read() if r["point_key"] in keys]
    _log("")
    _log(report.summary_table(rows))
    md = report.anchor_style_markdown(rows)
    if md:
        _log("\nnull_moe in the layout of the TPU anchor table (markdown):\n" + md + "\n")
    if cfg.plots:
        for path in report.make_plots(rows, cfg.out_dir):
            _log(f"PLOT {path}")
    _log(f"CSV {csv_path}")
    return rows


def main(args: Optional[list[str]] = None) -> None:
    cfg = draccus.parse(config_class=BenchConfig, args=args)
    try:
        bconfig.validate(cfg)
        # before any JAX work: the allocator tunables are read at process start (scripts/bench/host_malloc.py)
        host_malloc.reexec_if_needed(cfg.host_malloc)
        run(cfg)
    except BenchConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
