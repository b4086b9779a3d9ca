"""Bench CLI, expert-parallel impls (null_moe_ep, compact_psum) on simulated CPU devices.

The CLI runs in a subprocess (it gives itself ep_size simulated devices before JAX starts). Its rows are checked
against slow references computed here on one device: the routing counts against the single-device impl, the
dropped fraction against a per-token loop over the send blocks, and the bytes against the buffer sizes.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from scripts.bench.config import BenchConfig
from scripts.bench.points import expand, forced_layer_config
from tests.wandb_records import read_wandb_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, D, F, N, K, EP, CF = 256, 16, 32, 8, 2, 4, 0.75  # a capacity small enough to drop at every p
PS = (0.0, 0.5)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ep_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ep")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "scripts.bench.bench_null_moe", "--tokens", str(T), "--hidden", str(D), "--mlp_dim",
           str(F), "--experts", str(N), "--topk", str(K), "--null_route_frac_list", str(list(PS)),
           "--impl", "[null_moe,null_moe_ep,compact_psum]", "--ep_size", str(EP), "--capacity_factor", str(CF),
           "--warmup", "0", "--iters", "1", "--plots", "false", "--host_malloc", "default", "--out_dir", str(out),
           "--wandb.mode", "offline"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc.stdout, {(r["impl"], float(r["null_target"])): r for r in rows}, out


def test_cli_simulates_the_devices_and_says_times_mean_little(ep_sweep):
    stdout, rows, _ = ep_sweep
    assert f"{EP} device(s)" in stdout and "simulated CPU devices" in stdout and "expert parallelism:" in stdout
    assert len(rows) == 3 * len(PS)


def test_routing_counts_equal_the_single_device_impl(ep_sweep):
    _, rows, _ = ep_sweep
    for p in PS:
        one = rows[("null_moe", p)]
        for impl in ("null_moe_ep", "compact_psum"):
            r = rows[(impl, p)]
            for col in ("real_assignments", "null_assignments", "expert_loads", "real_per_token_hist"):
                assert r[col] == one[col], (impl, p, col)


def test_columns_of_each_impl(ep_sweep):
    _, rows, _ = ep_sweep
    for p in PS:
        one, ep, ps = rows[("null_moe", p)], rows[("null_moe_ep", p)], rows[("compact_psum", p)]
        assert (one["ep_size"], one["transport"], one["comm_bytes"], one["dropped_frac"]) == ("1", "none", "0.0", "0.0")
        assert (ep["ep_size"], ep["transport"], float(ep["capacity_factor"])) == (str(EP), "all_to_all", CF)
        assert (ps["ep_size"], ps["transport"], ps["capacity_factor"], ps["dropped_frac"]) == (str(EP), "psum", "", "0.0")
        assert float(ps["a2a_bytes"]) == 0.0 and float(ep["a2a_bytes"]) > 0.0


def _reference_dropped(ids: np.ndarray, capacity: int) -> int:
    """Real slots dropped, by a loop over tokens: each device owns T/EP consecutive tokens and sends each token at
    most once to each destination (its real slots there ride along); a block keeps its first ``capacity``."""
    t_local, n_local, dropped = T // EP, N // EP, 0
    for src in range(EP):
        for dst in range(EP):
            sent = 0
            for t in range(src * t_local, (src + 1) * t_local):
                here = sum(1 for e in ids[t] if e < N and e // n_local == dst)
                if here:
                    sent += 1
                    if sent > capacity:
                        dropped += here
    return dropped


def test_dropped_fraction_equals_a_per_token_loop(ep_sweep):
    from null_moe.transport import block_capacity
    from scripts.bench import impls

    _, rows, _ = ep_sweep
    seen_drops = 0
    for p in PS:
        (pt,) = [q for q in expand(BenchConfig(tokens=T, hidden=D, mlp_dim=F, experts=N, topk=K, null_route_frac=p,
                                                impl=["null_moe_ep"], ep_size=EP, capacity_factor=CF))]
        layer, x = impls.build_layer(forced_layer_config(pt), pt.seed, T, pt.dtype)  # one device: the reference
        mask = impls.draw_null_mask(pt.seed, T, K, p, pt.null_mode)
        ids = np.asarray(layer.route_forced(x, null_mask=mask).expert_ids)
        cap = block_capacity(T // EP, K, N, EP, null_frac=p, capacity_factor=CF, dedup=True)
        dropped, real = _reference_dropped(ids, cap), int((ids < N).sum())
        row = rows[("null_moe_ep", p)]
        assert int(row["real_assignments"]) == real
        assert float(row["dropped_frac"]) == pytest.approx(dropped / real, abs=1e-7), (p, dropped, real)
        seen_drops += dropped
    assert seen_drops > 0  # the capacity is small enough that the test can fail


def test_bytes_follow_the_buffers(ep_sweep):
    """compact_psum: at least the output all-reduce forward and the dx all-reduce backward ([T, D] f32 each), the
    same at every p. null_moe_ep: at least 4 exchanges (x out and back, forward and backward) of its
    [EP, C, D] f32 send buffer, each (EP-1)/EP of it, and fewer bytes at p = 0.5 than at p = 0."""
    from null_moe.transport import block_capacity

    _, rows, _ = ep_sweep
    psum = [float(rows[("compact_psum", p)]["comm_bytes"]) for p in PS]
    assert psum[0] == psum[1] >= 2 * 2 * (EP - 1) / EP * T * D * 4
    a2a = []
    for p in PS:
        cap = block_capacity(T // EP, K, N, EP, null_frac=p, capacity_factor=CF, dedup=True)
        rows_bytes = 4 * (EP - 1) / EP * EP * cap * D * 4
        got = float(rows[("null_moe_ep", p)]["a2a_bytes"])
        assert rows_bytes <= got <= 1.5 * rows_bytes, (p, got, rows_bytes)
        a2a.append(got)
    assert a2a[1] < a2a[0]


def test_wandb_runs_carry_the_ep_figures(ep_sweep):
    import glob

    _, rows, out = ep_sweep
    found = 0
    for run_dir in glob.glob(os.path.join(out, "wandb", "offline-run-*")):
        rec = read_wandb_records(run_dir)
        if rec["config"]["impl"] != "null_moe_ep":
            continue
        row = rows[("null_moe_ep", rec["config"]["null_target"])]
        assert rec["config"]["transport"] == "all_to_all" and rec["config"]["ep_size"] == EP
        assert rec["summary"]["dropped_frac"] == pytest.approx(float(row["dropped_frac"]))
        assert rec["summary"]["comm_bytes"] == pytest.approx(float(row["comm_bytes"]))
        found += 1
    assert found == len(PS)
