"""scripts/bench/bench_gmm.py: the ratios it prints, from known timings, and a tiny real run."""

from __future__ import annotations

import pytest

from scripts.bench import bench_gmm, timer
from scripts.bench.bench_gmm import GmmBenchConfig, main


def _fields(lines):
    return [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines]


def test_ratios_from_known_timings(monkeypatch, capsys):
    """Each point is compared with the dense matmul and with its own backend's 100%-real point of the same run."""
    # microsecond timings, so that every GFLOP/s figure (printed with one decimal) is well above 0.1: 52.4 dense,
    # 26.2, 23.8 and 13.1 for the tiled points; a wrong formula or a zero cannot pass the check below
    times = {"dense": 1.0e-5, 1.0: 2.0e-5, 0.5: 1.1e-5, 0.1: 4.0e-6}

    def fake_interleaved(calls, *, warmup, rounds, **_):
        # calls: dense, then tiled at real_frac 1.0 / 0.5 / 0.1 (the order main builds them in)
        order = ["dense", 1.0, 0.5, 0.1]
        return [timer.Timing((times[order[i]],) * rounds, (7,) * rounds) for i in range(len(calls))]

    monkeypatch.setattr(bench_gmm.timer, "interleaved", fake_interleaved)
    monkeypatch.setattr(bench_gmm.timer, "compile_ahead", lambda fn, *a: (fn, 0.0))
    cfg = GmmBenchConfig(rows=512, k=16, n=32, experts=4, backends=["tiled"], tile_rows_list=[64],
                         passes=["forward"], warmup=0, iters=3)
    lines = _fields(main(cfg))
    assert [f["real_frac"] for f in lines] == ["1.0", "0.5", "0.1"]
    dense_flops = 2 * 512 * 16 * 32
    for f, frac in zip(lines, (1.0, 0.5, 0.1)):
        rows = round(frac * 512)  # multinomial group sizes sum to exactly the real rows
        flops = 2 * rows * 16 * 32
        assert float(f["time_vs_full"]) == pytest.approx(times[frac] / times[1.0], abs=1e-3)
        assert float(f["speed_vs_dense"]) == pytest.approx((flops / times[frac]) / (dense_flops / times["dense"]),
                                                           abs=1e-3)
        assert float(f["gflops"]) > 10 and float(f["gflops"]) == pytest.approx(flops / times[frac] / 1e9, abs=0.051)
        assert f["page_faults"] == "7"
    out = capsys.readouterr().out
    (dense,) = _fields([line for line in out.splitlines() if "backend=dense" in line])
    assert dense["time_s"] == "0.00001" and float(dense["gflops"]) == pytest.approx(dense_flops / 1e-5 / 1e9, abs=0.051)


def test_bench_gmm_tiny_real_run():
    cfg = GmmBenchConfig(rows=256, k=16, n=32, experts=4, backends=["tiled", "ragged_dot"], tile_rows_list=[32],
                         real_fracs=[1.0, 0.25], passes=["forward_backward"], warmup=1, iters=1)
    lines = _fields(main(cfg))
    assert [(f["backend"], f["real_frac"]) for f in lines] == [
        ("tiled", "1.0"), ("tiled", "0.25"), ("ragged_dot", "1.0"), ("ragged_dot", "0.25")]
    assert all(float(f["time_s"]) > 0 and float(f["speed_vs_dense"]) > 0 for f in lines)
