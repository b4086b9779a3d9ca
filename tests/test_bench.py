"""Bench CLI (scripts/bench): config validation, resume, forced-routing fractions, and a tiny end-to-end sweep.

The end-to-end test runs the real CLI in a subprocess on a tiny shape and checks RESULT lines, the CSV, the
plots and the offline W&B runs (read back from the .wandb files with tests/wandb_records.py).
"""

import csv
import dataclasses
import glob
import math
import os
import subprocess
import sys

import pytest

from scripts.bench import bench_null_moe, report, timing
from scripts.bench.config import BenchConfig, BenchConfigError, ShapeConfig, WandbConfig, expand, validate
from tests.wandb_records import find_run_dirs, read_wandb_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, **kw) -> BenchConfig:
    base = dict(tokens=64, hidden=16, mlp_dim=32, experts=4, topk=2, warmup=0, iters=1,
                out_dir=str(tmp_path / "out"), wandb=WandbConfig(enabled=False))
    base.update(kw)
    return BenchConfig(**base)


# --- bad input: clear errors naming the field, before any compute ---------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(impl=["null_moe", "fused"]), "impl[1]"),
        (dict(impl=[]), "impl"),
        (dict(topk=5), "topk"),
        (dict(topk_list=[2, 8]), "topk_list[1]"),
        (dict(shapes=[ShapeConfig(tokens=64, hidden=16, mlp_dim=32, experts=2)], topk_list=[1, 4]), "topk_list[1]"),
        (dict(null_route_frac=1.0), "null_route_frac"),
        (dict(null_route_frac=-0.1), "null_route_frac"),
        (dict(null_route_frac=float("nan")), "null_route_frac"),
        (dict(null_route_frac_list=[0.0, 1.5]), "null_route_frac_list[1]"),
        (dict(null_routing_mode="sometimes"), "null_routing_mode"),
        (dict(host_malloc="jemalloc"), "host_malloc"),
        (dict(routing="random"), "routing"),
        (dict(bench_pass="backward"), "bench_pass"),
        (dict(dtype="float16"), "dtype"),
        (dict(backend="cuda"), "backend"),
        (dict(iters=0), "iters"),
        (dict(tokens=0), "tokens"),
        (dict(shapes=[ShapeConfig(tokens=64, hidden=-1, mlp_dim=32, experts=4)]), "shapes[0].hidden"),
    ],
)
def test_bad_input_names_field(tmp_path, monkeypatch, kw, field):
    def boom(*a, **k):  # no compute may start
        raise AssertionError("run_point called on bad input")

    monkeypatch.setattr(timing, "run_point", boom)
    with pytest.raises(BenchConfigError) as err:
        bench_null_moe.run(_cfg(tmp_path, **kw))
    assert str(err.value).startswith(field), str(err.value)


def test_shape_too_big_for_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "run_point", lambda *a, **k: pytest.fail("computed"))
    big = ShapeConfig(tokens=1 << 22, hidden=4096, mlp_dim=14336, experts=8)
    with pytest.raises(BenchConfigError, match=r"^shapes\[1\]\.tokens: .*GiB"):
        bench_null_moe.run(_cfg(tmp_path, shapes=[ShapeConfig(64, 16, 32, 4), big]))
    with pytest.raises(BenchConfigError, match=r"^tokens: .*max_memory_gb"):
        bench_null_moe.run(_cfg(tmp_path, tokens=4096, max_memory_gb=0.001))


def test_cli_bad_input_exit_code():
    proc = subprocess.run(
        [sys.executable, "scripts/bench/bench_null_moe.py", "--impl", "[null_moe,magic]", "--wandb.mode", "disabled"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "impl[1] must be one of" in proc.stderr
    assert "RESULT" not in proc.stdout
    helped = subprocess.run([sys.executable, "-m", "scripts.bench.bench_null_moe", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--null_route_frac_list" in helped.stdout, helped.stderr[-2000:]


def test_expand_baseline_shared_and_stock_only_at_zero(tmp_path):
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.5, 0.9], null_routing_mode="both",
               impl=["null_moe", "stock_levanter"], topk_list=[1, 2])
    validate(cfg)
    pts = expand(cfg)
    # per topk: null_moe 1 baseline + 2 modes x 2 fractions; stock 1
    assert len(pts) == 2 * (1 + 4 + 1)
    assert all(p.null_target == 0.0 for p in pts if p.impl == "stock_levanter")
    assert len({p.key for p in pts}) == len(pts)
    sweep = _cfg(tmp_path, null_route_sweep=True)
    assert [p.null_target for p in expand(sweep)] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_yaml_configs_parse_and_validate():
    import draccus

    for name in ("seed_matrix", "cpu_matrix"):
        path = os.path.join(ROOT, "configs", "bench", f"{name}.yaml")
        cfg = draccus.parse(BenchConfig, config_path=path, args=[])
        validate(cfg)
        pts = expand(cfg)
        assert pts, name
        shapes = {p.shape for p in pts}
        if name == "seed_matrix":
            assert shapes == {"32768x2048x1408x60", "32768x2048x2048x64", "65536x3072x3072x128"}
            assert {p.topk for p in pts} == {2, 4, 8} and {p.dtype for p in pts} == {"bfloat16"}
            assert {p.null_mode for p in pts} == {"independent", "take_until_null"}
        else:
            anchor = [p for p in pts if p.shape == "4096x512x1024x16" and p.topk == 4 and p.impl == "null_moe"]
            assert {p.null_target for p in anchor} >= {0.0, 0.5, 0.9}
            assert {p.bench_pass for p in pts} == {"forward_backward"}


# --- resume after a crash (fake measurements: this is about the CSV, not timing) ------------------------------


def _fake_result(pt):
    tk = pt.tokens * pt.topk
    null = int(round(pt.null_target * tk))
    m = timing.Measurement(time_s=0.01 * (1 - pt.null_target) + 0.001, time_min_s=0.001, time_max_s=0.02,
                           compile_s=0.0, times=[0.01])
    return timing.PointResult(point=pt, backend="fake", null_realized=null / tk, real_assignments=tk - null,
                              null_assignments=null, expert_loads=[1.0 / pt.experts] * pt.experts,
                              real_per_token_hist=None, all_null_frac=0.0, main=m)


def test_resume_after_crash(tmp_path, monkeypatch, capsys):
    # one point at a time (interleave off): every finished point is on disk when the crash comes
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.3, 0.6, 0.9], plots=False, interleave=False)
    calls = []

    def crashing(pt):
        calls.append(pt.key)
        if len(calls) == 3:
            raise RuntimeError("simulated crash at point 3")
        return _fake_result(pt)

    monkeypatch.setattr(timing, "run_point", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        bench_null_moe.run(cfg)
    csv_path = os.path.join(cfg.out_dir, cfg.csv_name)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["null_target"]) for r in rows] == [0.0, 0.3]
    capsys.readouterr()

    calls.clear()
    monkeypatch.setattr(timing, "run_point", lambda pt: (calls.append(pt.key), _fake_result(pt))[1])
    rows = bench_null_moe.run(cfg)
    out = capsys.readouterr().out
    assert out.count("SKIP ") == 2 and out.count("RESULT ") == 2 and len(calls) == 2
    assert sorted(r["null_target"] for r in rows) == [0.0, 0.3, 0.6, 0.9]
    # the table covers all four points, with gains vs the resumed 0.0 baseline
    assert "0.90" in out and "gain" in out

    # a third run has nothing to do; a different config (iters) is a different measurement
    calls.clear()
    bench_null_moe.run(cfg)
    assert calls == []
    bench_null_moe.run(dataclasses.replace(cfg, iters=2))
    assert len(calls) == 4


def test_interleaved_batches_keep_finished_batches_on_crash(tmp_path, monkeypatch, capsys):
    # two batches (topk 1 and 2, four null fractions each); the second crashes: the first batch's rows stay
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.3, 0.6, 0.9], topk_list=[1, 2], plots=False)
    batches = []

    def group(points):
        batches.append([p.topk for p in points])
        if len(batches) == 2:
            raise RuntimeError("simulated crash in batch 2")
        return [dataclasses.replace(_fake_result(p), timing="interleaved") for p in points]

    monkeypatch.setattr(timing, "run_group", group)
    monkeypatch.setattr(timing, "run_point", lambda pt: pytest.fail("grouped points ran alone"))
    with pytest.raises(RuntimeError, match="batch 2"):
        bench_null_moe.run(cfg)
    assert batches == [[1, 1, 1, 1], [2, 2, 2, 2]]
    with open(os.path.join(cfg.out_dir, cfg.csv_name)) as f:
        rows = list(csv.DictReader(f))
    assert [(r["topk"], r["null_target"], r["timing"]) for r in rows] == [
        ("1", t, "interleaved") for t in ("0.0", "0.3", "0.6", "0.9")]
    batches.clear()
    monkeypatch.setattr(timing, "run_group", lambda pts: (batches.append(len(pts)), [_fake_result(p) for p in pts])[1])
    rows = bench_null_moe.run(cfg)
    assert batches == [4] and len(rows) == 8  # only the lost batch reruns


def test_run_group_matches_run_point_stats(tmp_path):
    """The interleaved timing of a batch measures the same points as one-by-one timing: same realized fractions
    and loads, every round timed."""
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.5], null_routing_mode="both", iters=3)
    pts = expand(cfg)
    assert len({timing.group_key(p) for p in pts}) == 1
    grouped = timing.run_group(pts)
    for pt, g in zip(pts, grouped):
        alone = timing.run_point(pt)
        assert g.timing == "interleaved" and alone.timing == "sequential"
        assert g.null_realized == alone.null_realized and g.expert_loads == alone.expert_loads
        assert len(g.main.times) == 3 and g.main.time_s > 0


def test_result_line_roundtrip():
    pt = expand(BenchConfig(tokens=64, hidden=16, mlp_dim=32, experts=4, topk=2, null_route_frac=0.5))[0]
    row = report.make_row(_fake_result(pt), "sweep", "2026-01-01T00:00:00+00:00")
    parsed = report.parse_result_line(report.result_line(row))
    for k in ("shape", "tokens", "hidden", "mlp_dim", "experts", "topk", "impl", "backend", "pass", "routing",
              "null_mode", "null_target", "null_realized", "real_assignments", "null_assignments", "time_s",
              "tokens_per_s", "tflops", "load_cv", "load_max"):
        assert k in parsed, k
    assert float(parsed["tokens_per_s"]) == pytest.approx(64 / row["time_s"], rel=1e-5)
    assert float(parsed["tflops"]) == pytest.approx(6 * 16 * 32 * 3 * 64 / row["time_s"] / 1e12, rel=1e-4)


# --- forced routing: realized fraction within 0.01 of the target at T k >= 16384 -----------------------------


@pytest.mark.parametrize("mode", ["independent", "take_until_null"])
def test_forced_routing_realized_fraction(tmp_path, mode):
    cfg = _cfg(tmp_path, tokens=4096, hidden=8, mlp_dim=16, experts=8, topk=4, bench_pass="forward",
               null_route_frac_list=[0.1, 0.5, 0.9], null_routing_mode=mode, routing="forced")
    for pt in expand(cfg):
        res = timing.run_point(pt)
        assert res.real_assignments + res.null_assignments == 4096 * 4
        assert abs(res.null_realized - pt.null_target) <= 0.01, (mode, pt.null_target, res.null_realized)
        assert res.backend == "tiled"
        assert sum(res.expert_loads) == pytest.approx(1.0, abs=1e-4)


# --- the CLI end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "scripts.bench.bench_null_moe",
        "--tokens", "128", "--hidden", "16", "--mlp_dim", "32", "--experts", "4", "--topk_list", "[1,2]",
        "--null_route_frac_list", "[0.0,0.5]", "--null_routing_mode", "both",
        "--impl", "[null_moe,masked_null,stock_levanter]", "--split_forward_backward", "true",
        "--warmup", "0", "--iters", "2", "--out_dir", str(out), "--wandb.mode", "offline",
        "--wandb.group", "tiny", "--wandb.tags", "[test]",
    ]
    env = dict(os.environ, WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [report.parse_result_line(l) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    # per topk: null_moe and masked_null: baseline + 2 modes at 0.5; stock_levanter: null 0 only
    assert len(lines) == 2 * (3 + 3 + 1)
    for r in lines:
        assert r["shape"] == "128x16x32x4" and r["pass"] == "forward_backward" and r["routing"] == "forced"
        t = float(r["time_s"])
        assert t > 0 and float(r["tokens_per_s"]) == pytest.approx(128 / t, rel=1e-4)
        real = int(r["real_assignments"])
        assert real + int(r["null_assignments"]) == 128 * int(r["topk"])
        assert float(r["tflops"]) == pytest.approx(18 * 16 * 32 * real / t / 1e12, rel=1e-3)
        assert float(r["time_fwd_s"]) > 0
    assert {r["backend"] for r in lines if r["impl"] != "stock_levanter"} == {"tiled"}
    assert {r["backend"] for r in lines if r["impl"] == "stock_levanter"} == {"levanter:ragged_dot"}
    # the CLI re-executed itself with the resident allocator tunables (the default) and says so per point
    assert {r["host_malloc"] for r in lines} == {"resident"}
    # forced-routing points of one shape/topk/impl share a step and are timed in interleaved rounds
    assert {r["timing"] for r in lines if r["impl"] != "stock_levanter"} == {"interleaved"}
    assert {r["timing"] for r in lines if r["impl"] == "stock_levanter"} == {"sequential"}

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lines)
    for r, l in zip(rows, lines):
        for k in ("shape", "topk", "impl", "null_mode", "real_assignments", "backend"):
            assert r[k] == l[k]
        for k in ("null_target", "null_realized", "time_s", "tokens_per_s", "tflops", "load_cv", "load_max"):
            assert float(r[k]) == pytest.approx(float(l[k]), rel=1e-5, abs=1e-9), k

    assert os.path.exists(out / "tokens_per_s_128x16x32x4.png")
    assert os.path.exists(out / "time_split_128x16x32x4.png")
    assert "gain" in proc.stdout and "PLOT" in proc.stdout

    runs = find_run_dirs(str(out))
    assert len(runs) == len(lines)
    by_key = {r["point_key"]: r for r in rows}
    for run_dir in runs:
        rec = read_wandb_records(run_dir)
        cfg, summ = rec["config"], rec["summary"]
        row = by_key[cfg["point_key"]]
        assert rec["run"]["group"] == "tiny" and "test" in rec["run"]["tags"]
        for k in ("shape", "impl", "null_mode", "routing", "backend"):
            assert cfg[k] == row[k]
        assert cfg["topk"] == int(row["topk"]) and cfg["null_target"] == float(row["null_target"])
        for k in ("tokens_per_s", "time_s", "tflops", "null_realized", "load_cv", "load_max"):
            assert summ[k] == pytest.approx(float(row[k]), rel=1e-6), k
        assert summ["real_assignments"] == int(row["real_assignments"])
        assert summ["expert_load"]["_type"] == "histogram" and len(summ["expert_load"]["values"]) == 4
        assert math.isclose(sum(summ["expert_load"]["values"]), 1.0, rel_tol=1e-4)
        assert rec["exit_code"] == 0

    # rerun: everything is in the CSV, nothing is recomputed, the table is printed again
    proc2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "RESULT " not in proc2.stdout and proc2.stdout.count("SKIP ") == len(lines)
    assert len(glob.glob(str(out / "*.png"))) == 2


def test_forced_routing_from_mask_matches_route_forced():
    """The bench feeds the forced mask as data; it must be exactly layer.route_forced for the same key."""
    import jax
    import numpy as np

    pt = expand(BenchConfig(tokens=512, hidden=16, mlp_dim=32, experts=8, topk=4, null_route_frac=0.4,
                            null_routing_mode="take_until_null"))[0]
    _, layer, x = timing.build_layer(pt, for_forced=True)
    key = jax.random.PRNGKey(pt.seed + 1)
    ref = layer.route_forced(x, key=key, null_frac=0.4, mode="take_until_null", renormalize_real=True)
    got = timing.forced_routing_from_mask(layer, x, timing.draw_null_mask(pt))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learned_routing_point(tmp_path):
    """routing=learned runs the layer's own router (null fraction as it comes) and reports consistent stats."""
    cfg = _cfg(tmp_path, tokens=512, hidden=16, mlp_dim=32, experts=8, topk=2, bench_pass="forward",
               null_route_frac=0.5, routing="learned", warmup=1)
    (pt,) = expand(cfg)
    res = timing.run_point(pt)
    assert res.real_assignments + res.null_assignments == 512 * 2
    assert 0.0 < res.null_realized < 1.0
    assert res.main.time_s > 0 and res.backend == "tiled"
    assert sum(res.real_per_token_hist) == pytest.approx(1.0)
