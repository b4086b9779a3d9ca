"""Null-routing benchmark CLI: see scripts/bench/bench_null_moe.py and docs/BENCH.md."""
