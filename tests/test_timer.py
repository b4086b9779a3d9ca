"""scripts/bench/timer.py: samples sized by device work (min_round_s) and a pluggable sync."""

from __future__ import annotations

import time

import pytest

from scripts.bench import timer


def test_min_round_s_runs_enough_back_to_back_calls_and_records_time_per_call():
    counts = {"calls": 0, "syncs": 0}

    def call():
        counts["calls"] += 1
        time.sleep(0.002)
        return counts["calls"]

    def sync(out):
        counts["syncs"] += 1
        return out

    (t,) = timer.interleaved([call], warmup=2, rounds=3, min_round_s=0.02, sync=sync)
    assert 10 <= t.calls_per_sample <= 11  # ceil(0.02 / ~0.002)
    # 2 warmup calls (each synced), then 3 samples of calls_per_sample calls with one sync each
    assert counts["calls"] == 2 + 3 * t.calls_per_sample
    assert counts["syncs"] == 2 + 3
    assert len(t.times) == 3
    for per_call in t.times:  # per call, not per sample
        assert 0.0019 < per_call < 0.006


def test_without_min_round_s_each_sample_is_one_call():
    calls = []
    (t,) = timer.interleaved([lambda: calls.append(1) or 0], warmup=0, rounds=4, sync=lambda out: out)
    assert t.calls_per_sample == 1 and len(calls) == 4 and len(t.times) == 4


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds"):
        timer.interleaved([lambda: 0], warmup=0, rounds=0, sync=lambda out: out)
