"""Null-routing sweeps of the NullRoutedMoE layer in isolation: RESULT lines, a resumable CSV, plots, W&B.

    python -m scripts.bench.bench_null_moe --config_path configs/bench/cpu_matrix.yaml
    python scripts/bench/bench_null_moe.py --tokens 2048 --topk_list '[2,4]' --null_route_sweep true \\
        --impl '[null_moe,masked_null]' --null_routing_mode both --out_dir out/bench/try

stdout: one RESULT line per point (after its CSV row is on disk), then the summary. stderr: one progress line
per point. Every mistake in the input, the outputs or the W&B setup is one ``error: <field>: ...`` line on
stderr and exit code 2, before anything is computed or written. See docs/BENCH.md.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `scripts.bench` and `null_moe` importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, _ROOT)
    sys.path.insert(1, os.path.join(_ROOT, "src"))

from typing import Optional

from null_moe import host_malloc

from scripts.bench import config as bconfig
from scripts.bench import points as bpoints, schema, store, wandb_log
from scripts.bench.config import BenchConfig, BenchConfigError


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One stderr line per finished point: ``[i/n] point: time, tokens/s | elapsed, eta``."""

    def __init__(self, total: int, already: int):
        self.total, self.done, self.start, self.ran = total, already, time.perf_counter(), 0

    def point(self, row: dict) -> None:
        self.done += 1
        self.ran += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.ran * (self.total - self.done)
        width = len(str(self.total))
        label = bpoints.point_label(row["shape"], row["topk"], row["impl"], row["null_mode"], row["null_target"])
        print(f"[{self.done:>{width}}/{self.total}] {label}: {row['time_s']:.4g} s, {row['tokens_per_s']:,.0f} "
              f"tokens/s | {_duration(elapsed)} elapsed, eta {_duration(eta)}", file=sys.stderr, flush=True)


def prepare(cfg: BenchConfig) -> tuple[BenchConfig, list[bpoints.Point]]:
    """Everything that can be checked without computing or writing anything: the config's types and choices (as
    draccus checks them), every point's values (through the layer's config), out_dir and the CSV, W&B, and the
    memory estimate of the points still to run. Raises BenchConfigError naming the field."""
    cfg = bconfig.normalize(cfg)
    points = bpoints.expand(cfg)
    store.check_out_dir(cfg.out_dir)
    csv_store = store.ResultsCSV(os.path.join(cfg.out_dir, cfg.csv_name))
    csv_store.check()
    if not cfg.dry_run:
        wandb_log.preflight(cfg)
        done = csv_store.done_keys()
        bpoints.check_memory(cfg, [p for p in points if p.key not in done])
        bpoints.check_devices(points)
    return cfg, points


def simulate_devices(points: list[bpoints.Point]) -> None:
    """Expert-parallel points on a CPU-only JAX: give this process ep_size simulated devices (XLA reads the flag
    when JAX initialises, so this runs before any JAX work). A flag already set is left as it is."""
    need = bpoints.devices_needed(points)
    flags = os.environ.get("XLA_FLAGS", "")
    if need > 1 and host_malloc.jax_cpu_only() and "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()


def _catch_up_wandb(cfg: BenchConfig, rows: list[dict], group: str, mode: str) -> None:
    """Log the sweep's finished points that have no W&B run in this mode yet (from their CSV rows)."""
    if mode == "disabled":
        return
    logged = wandb_log.Ledger(cfg.out_dir).logged(mode)
    missing = [r for r in rows if r["point_key"] not in logged]
    if missing:
        _out(f"bench: logging {len(missing)} finished point(s) to W&B ({mode}) that have no run there yet")
        for row in missing:
            wandb_log.log_row(cfg, row, group, mode)


def run(cfg: BenchConfig) -> list[dict]:
    """Run the sweep; returns the typed rows of this sweep (resumed ones included)."""
    cfg, points = prepare(cfg)
    sweep = bpoints.sweep_hash(points)
    group = cfg.wandb.group or f"bench-{sweep}"
    mode = cfg.wandb.resolved_mode()
    csv_path = os.path.join(cfg.out_dir, cfg.csv_name)
    results = store.ResultsCSV(csv_path)
    done = results.done_keys()
    todo = [p for p in points if p.key not in done]
    _out(f"bench: {len(points)} points ({len(points) - len(todo)} already in {csv_path}), sweep={sweep}, "
         f"group={group}, wandb={mode}")
    if cfg.dry_run:
        for p in points:
            _out(f"POINT {p.label} key={p.key} {'done' if p.key in done else 'todo'} "
                 f"est_gib={bpoints.estimate_bytes(p) / 2**30:.2f}")
        return []

    import jax

    from scripts.bench import report, runner

    results.open()
    dev = jax.devices()[0]
    _out(f"bench: jax {jax.__version__} on {dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s), "
         f"host_malloc={host_malloc.current_mode()}")
    if dev.platform == "cpu" and bpoints.devices_needed(points) > 1:
        _out(f"bench: expert-parallel points run on {bpoints.devices_needed(points)} simulated CPU devices that share "
             "this host's cores (collectives are memory copies): their times mean little; compare comm_bytes")
    for i, pt in enumerate(points):
        if pt.key in done:
            _out(f"SKIP {i + 1}/{len(points)} {pt.label} key={pt.key} (already in {csv_path})")
    keys = {p.key for p in points}
    _catch_up_wandb(cfg, [r for r in results.read() if r["point_key"] in keys], group, mode)

    progress = Progress(len(points), len(points) - len(todo))
    for batch in runner.batches(todo, cfg.interleave):
        # a batch's rows land together once it is timed: a crash loses at most the batch in flight
        for result in runner.run_batch(batch):
            ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            row = schema.make_row(result, sweep=sweep, timestamp=ts, host_malloc=host_malloc.current_mode())
            results.append(row)  # durable before its number is shown anywhere
            _out(schema.result_line(row))
            progress.point(row)
            if mode != "disabled":
                wandb_log.log_row(cfg, row, group, mode)

    rows = [r for r in results.read() if r["point_key"] in keys]
    _out()
    _out(report.summary_table(rows))
    comm = report.comm_table(rows)
    if comm:
        _out("\nexpert parallelism:\n" + comm)
    md = report.anchor_style_markdown(rows)
    if md:
        _out("\nnull_moe in the layout of the TPU anchor table (markdown):\n" + md + "\n")
    if cfg.plots:
        for path in report.make_plots(rows, cfg.out_dir):
            _out(f"PLOT {path}")
    _out(f"CSV {csv_path}")
    return rows


def main(args: Optional[list[str]] = None) -> None:
    try:
        cfg = bconfig.parse(args)
        simulate_devices(bpoints.expand(bconfig.normalize(cfg)))
        cfg, _ = prepare(cfg)
        # before any JAX work: the allocator tunables are read at process start (host_malloc)
        host_malloc.reexec_if_needed(cfg.host_malloc)
        run(cfg)
    except BenchConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
