"""The quality study's scheduler (experiments/speedrun/quality/runner.py) with a stand-in for the training command:
run order, the time budget (runs predicted not to fit are not started, a run past the deadline is stopped, both
listed as cut in summary.md), parallel runs and their memory share, and the wall-time prediction. The training
runs themselves are end to end in tests/test_null_quality.py and tests/test_gpu_script.py."""

from __future__ import annotations

import math
import os
import re
import time
from types import SimpleNamespace

import pytest

from experiments.speedrun.quality import runner
from experiments.speedrun.quality.config import QualityConfig, parse_config
from experiments.speedrun.quality.results import load_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "quality", "cpu_base.yaml")
GPU_STUDY = os.path.join(ROOT, "configs", "quality", "gpu_study.yaml")
pytestmark = pytest.mark.fast


def _study(tmp_path, **fields) -> QualityConfig:
    arms = [{"name": "k2", "num_experts_per_tok": 2, "null_route_frac": 0.0},
            {"name": "k4-p0.5", "num_experts_per_tok": 4, "null_route_frac": 0.5}]
    args = ["--base_config", BASE, "--name", "t", "--out_dir", str(tmp_path / "study"), "--plots", "false",
            "--num_train_steps", "4", "--arms", str(arms).replace("'", '"'), "--seeds", "[0, 1]"]
    for key, value in fields.items():
        args += [f"--{key}", str(value)]
    return parse_config(args)


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """The training command is ``sleep <seconds of its arm>``; it appends '<run id> <start time> <memory share>'
    to a file. Reading a run back and its data fingerprint are stand-ins too. The start order is the order in which
    the scheduler asked for the commands (it starts each right after): two runs started in the same poll race to
    append to the file, so the file's line order is not the scheduler's."""
    starts = tmp_path / "starts.txt"
    seconds = {"k2": 2.0, "k4-p0.5": 2.0}
    order = []

    def command(cfg, arm, seed, out_dir):
        order.append(cfg.run_id(arm, seed))
        return ["bash", "-c", f'echo {cfg.run_id(arm, seed)} $(date +%s.%N) "${{XLA_PYTHON_CLIENT_MEM_FRACTION:-}}" '
                              f'>> {starts}; sleep {seconds[arm.name]}']

    def parsed(cfg, arm, seed, out_dir):
        return SimpleNamespace(trainer=SimpleNamespace(train_batch_size=8, eval_batch_size=8),
                               model=SimpleNamespace(seq_len=64), data=SimpleNamespace(the_tokenizer=[0] * 2048))

    def read_run(run_dir, steps):
        return {"eval_loss": 5.0, "eval_bpb": None, "eval_curve": [[steps - 1, 5.0]], "train_curve": [],
                "train_loss_final": 5.0, "realized_experts_per_token": 2.0, "realized_experts_per_token_final": 2.0,
                "null_frac": 0.0, "all_null_frac": 0.0, "all_null_frac_final": 0.0, "load_violation_max_final": 0.1,
                "routing_entropy_final": 1.0, "train_tokens": steps * 8 * 64, "parameter_count": 1,
                "tokens_per_second": float("nan"), "num_null_experts": 0, "expected_real_experts_per_token": 2.0,
                "logged_data_seed": None, "exit_code": 0}

    monkeypatch.setattr(runner, "train_command", command)
    monkeypatch.setattr(runner, "_parsed_run_config", parsed)
    monkeypatch.setattr(runner, "read_run", read_run)
    monkeypatch.setattr(runner, "data_fingerprint", lambda config: "fp")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)

    def started():
        lines = starts.read_text().split("\n") if starts.exists() else []
        by_id = {fields[0]: fields for fields in (line.split(" ") for line in lines if line.strip())}
        assert set(by_id) == set(order), (by_id, order)  # every command asked for ran, and nothing else
        return [by_id[run_id] for run_id in order]

    return SimpleNamespace(seconds=seconds, started=started)


def test_run_order_by_seed_or_by_arm(tmp_path):
    by_seed = [(a.name, s) for a, s in _study(tmp_path).run_order()]
    assert by_seed == [("k2", 0), ("k4-p0.5", 0), ("k2", 1), ("k4-p0.5", 1)]
    by_arm = [(a.name, s) for a, s in _study(tmp_path, order="arm").run_order()]
    assert by_arm == [("k2", 0), ("k2", 1), ("k4-p0.5", 0), ("k4-p0.5", 1)]


def test_gpu_study_runs_the_main_comparison_first():
    cfg = parse_config(["--config_path", GPU_STUDY])
    order = [(a.name, s) for a, s in cfg.run_order()]
    assert order[:4] == [("k2", 0), ("k2", 1), ("k4-p0.5", 0), ("k4-p0.5", 1)]
    assert {a for a, _ in order[4:]} == {"k1", "k4"} and cfg.bracket_arms() == ("k1", "k4")
    assert cfg.parallel_runs == 4 and cfg.baseline_of(cfg.arm("k4-p0.5")) == "k2"


def test_budget_skips_runs_predicted_not_to_fit_and_stops_one_past_the_deadline(tmp_path, stub):
    """k2 takes 2 s, k4-p0.5 60 s; budget 14 s, one run at a time, order arm: both k2 seeds finish (the second one
    predicted at ~2 s with ~12 s left), k4-p0.5 s0 starts (predicted at ~2 s from k2's wall time, ~9 s left) and is
    stopped at the deadline, k4-p0.5 s1 is not started. Exit 0; summary.md lists both as cut."""
    stub.seconds["k4-p0.5"] = 60.0
    cfg = _study(tmp_path, order="arm", time_budget_s=14)
    t0 = time.time()
    messages = []
    assert runner.run_study(cfg, log=messages.append, started=t0) == runner.EXIT_OK
    took = time.time() - t0
    assert took < 20, took  # not the 60 s the k4-p0.5 run wanted
    rows = load_results(os.path.join(cfg.out_dir, "results.csv"))
    assert [(r["arm"], r["seed"]) for r in rows] == [("k2", "0"), ("k2", "1")], messages
    assert [s[0] for s in stub.started()] == ["t-k2-s0", "t-k2-s1", "t-k4-p0.5-s0"], messages
    summary = open(os.path.join(cfg.out_dir, "summary.md")).read()
    assert "**Cut** (time_budget_s=14): 2 run(s) did not finish" in summary
    assert "- `t-k4-p0.5-s0`: stopped after" in summary and "the time budget ran out" in summary
    assert "- `t-k4-p0.5-s1`: not started: the time budget is spent" in summary
    assert "2 of 4 runs done" in summary


def test_a_run_predicted_to_overrun_is_not_started(tmp_path, stub):
    """k2 takes 3 s, budget 5 s: after k2 s0 (3 s), k2 s1 is predicted at 3 s with ~2 s left: not started."""
    stub.seconds["k2"] = 3.0
    cfg = _study(tmp_path, order="arm", time_budget_s=5)
    assert runner.run_study(cfg, log=lambda *a: None, started=time.time()) == runner.EXIT_OK
    assert [s[0] for s in stub.started()] == ["t-k2-s0"]
    summary = open(os.path.join(cfg.out_dir, "summary.md")).read()
    assert re.search(r"- `t-k2-s1`: not started: predicted [34] s, [012] s of the time budget left", summary), summary


def test_parallel_runs_start_together_in_order_with_a_memory_share(tmp_path, stub):
    cfg = _study(tmp_path, parallel_runs=2)
    assert runner.run_study(cfg, log=lambda *a: None) == runner.EXIT_OK
    started = stub.started()
    assert [s[0] for s in started] == ["t-k2-s0", "t-k4-p0.5-s0", "t-k2-s1", "t-k4-p0.5-s1"]
    t = [float(s[1]) for s in started]
    assert t[1] - t[0] < 1.5  # the second run did not wait for the first (2 s)
    assert t[2] - t[0] > 1.5  # the third waited for a free slot
    assert {s[2] for s in started} == {"0.450"}  # 0.9 / parallel_runs of the accelerator's memory each
    assert len(load_results(os.path.join(cfg.out_dir, "results.csv"))) == 4


def test_predict_wall_s():
    costs = {"k2": 60.0, "k4": 100.0, "k1": 40.0}
    assert runner.predict_wall_s("k2", [], costs, 1000) is None
    done = [runner.Finished("k2", 50.0, 100.0)]  # 1000 tokens at 100 tok/s: 10 s training, 40 s start-up
    assert runner.predict_wall_s("k2", done, costs, 1000) == 50.0  # the same arm: its own wall time
    # another arm: 40 s start-up + 1000 tokens x 100 FLOPs at k2's 100 x 60 FLOP/s
    assert runner.predict_wall_s("k4", done, costs, 1000) == pytest.approx(40 + 1000 * 100 / 6000)
    assert runner.predict_wall_s("k1", done, costs, 1000) == pytest.approx(40 + 1000 * 40 / 6000)
    # the slowest rate and the longest start-up of the finished runs
    done.append(runner.Finished("k1", 20.0, 200.0))  # 5 s training, 15 s start-up, 8000 FLOP/s
    assert runner.predict_wall_s("k4", done, costs, 1000) == pytest.approx(40 + 1000 * 100 / 6000)
    # no usable rate: the longest wall scaled up (never down) by the FLOPs ratio
    unrated = [runner.Finished("k2", 50.0, math.nan)]
    assert runner.predict_wall_s("k4", unrated, costs, 1000) == pytest.approx(50 * 100 / 60)
    assert runner.predict_wall_s("k1", unrated, costs, 1000) == 50.0


def test_budget_and_parallel_fields_validate(tmp_path):
    from experiments.speedrun.quality.config import ConfigError

    for field, value, message in [("time_budget_s", 0, "time_budget_s must be positive"),
                                  ("parallel_runs", 0, "parallel_runs must be a positive integer"),
                                  ("order", "random", "order must be seed or arm")]:
        with pytest.raises(ConfigError, match=message):
            _study(tmp_path, **{field: value})
