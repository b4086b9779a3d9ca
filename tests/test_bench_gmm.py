"""scripts/bench/bench_gmm.py end to end on a tiny shape: one GMM line per point, ratios present."""

from __future__ import annotations

from scripts.bench.bench_gmm import GmmBenchConfig, main


def test_bench_gmm_tiny(capsys):
    cfg = GmmBenchConfig(rows=256, k=16, n=32, experts=4, backends=["tiled", "ragged_dot"], tile_rows_list=[32],
                         warmup=1, iters=1)
    lines = main(cfg)
    # 2 passes x (tiled + ragged_dot) x 3 real fractions
    assert len(lines) == 12
    fields = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines]
    assert {f["backend"] for f in fields} == {"tiled", "ragged_dot"}
    for f in fields:
        assert float(f["time_s"]) > 0 and float(f["speed_vs_dense"]) > 0
        if f["real_frac"] == "1.0":
            assert f["time_vs_full"] == "1.000"
    assert "backend=dense" in capsys.readouterr().out
