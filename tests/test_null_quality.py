"""The quality study CLI (experiments/speedrun/null_quality.py).

- fast: config validation (exit 2 with one `error:` line naming the field, before any compute), the verdict rule,
  the summary arithmetic on synthetic rows (paired differences, bracket-gap shares, interpolation at realized
  compute, the off-target flag);
- slow: a tiny end-to-end study through the real training CLI (two arms, two seeds, a few steps, a small
  stdlib-source corpus): results.csv, summary.md and both plots exist; every run trained the same number of
  tokens; arms of a seed share the data order; the p = 0 arm realizes exactly k experts per token; each run is an
  offline W&B run in the study's group; a rerun skips the finished runs.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "speedrun", "tiny_cpu.yaml")
STUDY_YAML = os.path.join(ROOT, "configs", "quality", "cpu_study.yaml")
STEPS = 4
CORPUS_CHARS = 120_000


def _cli(args, cwd=ROOT, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "experiments.speedrun.null_quality", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- fast ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_train_steps", "0"], "error: num_train_steps must be a positive integer, got 0"),
        (["--seeds", "[]"], "error: seeds must be a non-empty list"),
        (["--seeds", "[1,1]"], "error: seeds must be distinct"),
        (["--arms", "[{name: x, num_experts_per_tok: 9}]"],
         "error: arms.x: num_experts_per_tok must be in [1, n_routed_experts=8], got 9"),
        (["--arms", "[{name: x, num_experts_per_tok: 2, null_route_frac: 1.0}]"],
         "error: arms.x: null_route_frac must be in [0, 1), got 1.0"),
        (["--brackets", "[k1, nope]"], "error: brackets must name two arms"),
        (["--overrides", "{trainer.seed: 3}"], "error: overrides.trainer.seed is set by the study"),
        (["--base_config", "missing.yaml"], "error: base_config not found: missing.yaml"),
        (["--bogus", "1"], "error: unrecognized arguments: --bogus 1"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, message, tmp_path):
    proc = _cli(["--config_path", STUDY_YAML, "--out_dir", str(tmp_path / "o"), *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.fast
@pytest.mark.fast
@pytest.mark.parametrize(
    "model, message",
    [
        ({"bogus_field": 1}, "arms.x: model: The fields `bogus_field` are not valid for MixtralConfig"),
        ({"num_heads": 3}, "arms.x: num_heads=3 must be divisible by num_kv_heads=2"),
        ({"renormalize_real": "maybe"}, "arms.x: model.renormalize_real: Couldn't parse 'maybe' into a bool"),
        ({"capacity_factor": -1.0}, "arms.x: capacity_factor must be"),
        ({"lbl_coef": 0.1}, "arms.x.model.lbl_coef may not differ between arms"),
    ],
)
def test_arm_model_overrides_are_validated_by_the_model_class(model, message):
    """An arm's `model:` overrides go through the registered model config (draccus decode + __post_init__), so any
    model field is accepted and checked, with no list of allowed keys in the study."""
    from experiments.speedrun.quality.config import ConfigError, parse_config

    arms = [{"name": "x", "num_experts_per_tok": 2, "null_route_frac": 0.5, "model": model}]
    with pytest.raises(ConfigError) as info:
        parse_config(["--config_path", STUDY_YAML, "--arms", str(arms)])
    assert str(info.value).startswith(message), str(info.value)
    ok = [{"name": "x", "num_experts_per_tok": 2, "null_route_frac": 0.5,
           "model": {"take_until_null": True, "balance_scope": "sequence", "upcast_attn": True}}]
    cfg = parse_config(["--config_path", STUDY_YAML, "--arms", str(ok), "--brackets", "null"])
    m = cfg.model_config(cfg.arms[0])
    assert (m.take_until_null, m.balance_scope, m.upcast_attn, m.null_route_frac) == (True, "sequence", True, 0.5)


def test_missing_config_file_exits_2(tmp_path):
    proc = _cli(["--config_path", str(tmp_path / "nope.yaml")], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.fast
def test_verdict_rule():
    from experiments.speedrun.quality.stats import verdict

    assert verdict(-0.05, 0.02, 3) == "win"
    assert verdict(-0.03, 0.02, 3) == "tie"  # below zero, but not by more than 2 std
    assert verdict(0.05, 0.02, 3) == "loss"
    assert verdict(0.01, 0.02, 3) == "tie"
    assert verdict(-0.05, float("nan"), 1).startswith("undecided")


def _row(arm, seed, k, p, loss, realized, expected):
    return {"arm": arm, "seed": str(seed), "num_experts_per_tok": str(k), "null_route_frac": str(p),
            "eval_loss": str(loss), "realized_experts_per_token": str(realized),
            "realized_experts_per_token_final": str(realized), "expected_real_experts_per_token": str(expected),
            "all_null_frac": "0.0", "load_violation_max_final": "0.1", "train_tokens": "1000", "wall_s": "1",
            "data_fingerprint": f"fp{seed}", "run_id": f"s-{arm}-s{seed}"}


@pytest.mark.fast
def test_summary_arithmetic():
    from experiments.speedrun.quality.config import parse_config
    from experiments.speedrun.quality.report import summary_markdown
    from experiments.speedrun.quality.stats import summarize

    cfg = parse_config(["--config_path", STUDY_YAML])
    rows = []
    # k1 = 5.0 + s/100, k4 = 4.6 + s/100, k2 = 4.8 + s/100; k4-p0.5 = k2 - 0.05 (a clear win);
    # k3-p0.33 = k2 + 0.01 +- noise (a tie) and realizes 2.4 experts (20% over target: flagged)
    for s in (0, 1, 2):
        base = s / 100
        rows += [_row("k1", s, 1, 0, 5.0 + base, 1.0, 1.0), _row("k4", s, 4, 0, 4.6 + base, 4.0, 4.0),
                 _row("k2", s, 2, 0, 4.8 + base, 2.0, 2.0),
                 _row("k4-p0.5", s, 4, 0.5, 4.75 + base, 2.0, 2.0),
                 _row("k3-p0.33", s, 3, 1 / 3, 4.81 + base + (0.02 if s == 1 else -0.01), 2.4, 2.0)]
    s = summarize(cfg, rows)
    win = s["paired"]["k4-p0.5"]
    assert win["baseline"] == "k2" and win["verdict"] == "win"
    assert win["mean"] == pytest.approx(-0.05) and win["std"] == pytest.approx(0.0, abs=1e-9)
    tie = s["paired"]["k3-p0.33"]
    assert tie["verdict"] == "tie" and tie["diffs"] == pytest.approx([0.0, 0.03, 0.0])
    assert s["arms"]["k3-p0.33"]["off_target"] and not s["arms"]["k4-p0.5"]["off_target"]
    # at realized compute, k3-p0.33 is compared with k2..k4 interpolated in log2 k at 2.4 experts
    t = math.log2(2.4) - 1
    assert tie["realized"]["mean"] == pytest.approx(0.01 + 0.2 * t, abs=1e-9)  # k2 + t (k4 - k2) per seed
    b = s["brackets"]
    assert (b["low"], b["high"]) == ("k1", "k4") and b["gap"][0] == pytest.approx(0.4)
    assert b["shares"]["k2"]["of_means"] == pytest.approx(0.5)
    assert b["shares"]["k4-p0.5"]["of_means"] == pytest.approx(0.625)
    assert b["shares"]["k4"]["of_means"] == pytest.approx(1.0) and b["shares"]["k1"]["of_means"] == pytest.approx(0)
    md = summary_markdown(cfg, s)
    assert "**win**" in md and "**tie**" in md and "k3-p0.33** realized 2.400" in md


# --- slow: end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from experiments.speedrun.local_data import build_corpus

    work = tmp_path_factory.mktemp("quality")
    corpus = str(work / "corpus")
    build_corpus(corpus, max_chars=CORPUS_CHARS)
    with open(TINY_YAML) as f:
        base = yaml.safe_load(f)
    base["data"].update(tokenizer=os.path.join(corpus, "tokenizer"),
                        train_urls=[os.path.join(corpus, "train.jsonl")],
                        validation_urls=[os.path.join(corpus, "validation.jsonl")],
                        cache_dir=os.path.join(corpus, "cache"))
    base["model"].update(seq_len=64)
    base["trainer"]["watch"] = {"interval": 0}  # no parameter-norm hook: one compile less
    base["optimizer"].update(lr_schedule="constant", warmup=1)
    base_path = str(work / "base.yaml")
    with open(base_path, "w") as f:
        yaml.safe_dump(base, f)
    study_cfg = {
        "name": "t",
        "base_config": base_path,
        "arms": [{"name": "k2", "num_experts_per_tok": 2, "null_route_frac": 0.0},
                 {"name": "k2-p0.5", "num_experts_per_tok": 2, "null_route_frac": 0.5, "baseline": "k2"}],
        "steps_per_eval": 2,
        "max_eval_batches": 1,
        "parallel_runs": 2,  # two runs at a time: the 2-core test machine finishes the four in about half the time
        "overrides": {"trainer.train_batch_size": 8, "trainer.per_device_eval_parallelism": 8},
    }
    cfg_path = str(work / "study.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(study_cfg, f)
    out = str(work / "out")
    args = ["--config_path", cfg_path, "--num_train_steps", str(STEPS), "--seeds", "[0,1]", "--out_dir", out]
    proc = _cli(args, cwd=str(work))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"out": out, "args": args, "work": str(work), "proc": proc}


@pytest.mark.slow
def test_end_to_end_outputs(study):
    out = study["out"]
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arm"], int(r["seed"])) for r in rows) == [("k2", 0), ("k2", 1), ("k2-p0.5", 0), ("k2-p0.5", 1)]
    for col in ("arm", "seed", "num_experts_per_tok", "null_route_frac", "expected_real_experts_per_token",
                "realized_experts_per_token", "eval_loss", "train_tokens", "all_null_frac", "wall_s"):
        assert all(r[col] != "" for r in rows), col
    # same token budget for every run: steps x batch x seq_len
    assert {int(r["train_tokens"]) for r in rows} == {STEPS * 8 * 64}
    # same data order per seed across arms, different across seeds
    fp = {(r["arm"], int(r["seed"])): r["data_fingerprint"] for r in rows}
    assert fp[("k2", 0)] == fp[("k2-p0.5", 0)] and fp[("k2", 1)] == fp[("k2-p0.5", 1)]
    assert fp[("k2", 0)] != fp[("k2", 1)]
    for r in rows:
        assert math.isfinite(float(r["eval_loss"])) and 0 < float(r["eval_loss"]) < 20
        if float(r["null_route_frac"]) == 0:  # p = 0 realizes exactly k real experts per token, every step
            assert float(r["realized_experts_per_token"]) == float(r["num_experts_per_tok"])
            assert float(r["realized_experts_per_token_final"]) == float(r["num_experts_per_tok"])
            assert float(r["all_null_frac"]) == 0.0
        else:
            assert float(r["expected_real_experts_per_token"]) == pytest.approx(1.0)
            assert 0 <= float(r["realized_experts_per_token"]) <= 2
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| k2-p0.5 | k2 |" in summary and "Train tokens per run: 2048 (the same for every run)" in summary
    assert "identical across arms" in summary
    for png in ("eval_loss_vs_step.png", "eval_loss_vs_experts.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_runs_are_grouped_wandb_runs_with_the_same_data_seed(study):
    from tests.wandb_records import find_run_dirs, read_wandb_records

    for arm in ("k2", "k2-p0.5"):
        for seed in (0, 1):
            run_dir = os.path.join(study["out"], "runs", f"t-{arm}-s{seed}")
            (d,) = find_run_dirs(run_dir)
            rec = read_wandb_records(d)
            assert rec["run"]["group"] == "t" and rec["run"]["id"] == f"t-{arm}-s{seed}"
            assert rec["config"]["data_seed"] == seed and rec["config"]["trainer"]["seed"] == seed
            assert rec["config"]["trainer"]["num_train_steps"] == STEPS
            evals = [r for r in rec["history"] if "eval/loss" in r]
            assert evals and evals[-1]["global_step"] == STEPS - 1  # the last step evaluated
    assert not os.path.exists(os.path.join(study["out"], "checkpoints", "t-k2-s0"))  # removed once the row is in


@pytest.mark.slow
def test_rerun_skips_finished_runs(study):
    before = open(os.path.join(study["out"], "results.csv")).read()
    proc = _cli(study["args"], cwd=study["work"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 done, 0 to run" in proc.stdout
    assert open(os.path.join(study["out"], "results.csv")).read() == before
    # another study config in the same out_dir is refused (rows from different settings never mix)
    proc = _cli([*study["args"], "--max_eval_batches", "2"], cwd=study["work"], timeout=300)
    assert proc.returncode == 2 and "holds results of another study config" in proc.stderr


def test_every_study_config_parses():
    """Each YAML under configs/quality that names a base_config is a study: it parses and its arms validate."""
    import glob

    from experiments.speedrun.quality.config import parse_config

    studies = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "quality", "*.yaml"))):
        with open(path) as f:
            if "base_config:" not in f.read():
                continue  # a training base config, not a study
        studies.append(parse_config(["--config_path", path]))
    assert {c.name for c in studies} >= {"cpu_study", "cpu_balance_scope"}
    scope = next(c for c in studies if c.name == "cpu_balance_scope")
    assert [scope.moe_config(a).balance_scope for a in scope.arms] == ["batch", "sequence"]
    control = next(c for c in studies if c.name == "cpu_null_control")
    assert [(a.name, control.moe_config(a).null_control, control.moe_config(a).balance_pool) for a in control.arms
            if a.is_null] == [("k4-p0.5", "loss", "all"), ("k4-p0.5-bias", "bias", "all"),
                              ("k4-p0.5-bias-real", "bias", "real")]
