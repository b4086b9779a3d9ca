"""End to end through the training CLI and Levanter's train_lm (each run a subprocess of the real CLI, offline
W&B, tiny model, a small stdlib-source corpus built once with max_chars):

- a short run: the loss falls; the offline .wandb file holds train/eval loss, throughput, the realized-FLOPs keys
  (consistent with the logged experts_per_token), the MoE stats, the aux losses, the gmm backend and the host
  allocator in the run config; one progress line per step; the text log is <id>.log; with the config's relative
  checkpoint base path and a 1 s save interval, every temporary checkpoint is deleted again;
- the same run id extended to more steps resumes from its checkpoint; rerunning the finished run (same or fewer
  steps) prints that it is complete and exits 0 without training;
- a corpus too small for the requested steps: exit code 3 and one error line, no end-of-run checkpoint;
- a bad config value: exit code 2 and one `error:` line, before any compute;
- the same run on 4 simulated CPU devices with a data x fsdp mesh (replica 2 x data 2) matches the
  single-device losses step by step.

Runs use a constant learning rate after a 4-step warmup, so a shorter run has the same schedule as a longer one.
They train with ``null_control: bias`` (a superset of the default "loss" control: the same model plus one bias per
layer), so the same runs also check the null-fraction controller end to end: ``moe/null_bias`` logged per layer
and as the mean, each layer's bias moving by exactly ``null_bias_rate x (p - realized)`` after every step, the bias
restored from the checkpoint on resume, and the same biases on the 4-device mesh. The default control trains end
to end in tests/test_training_configs.py and tests/test_null_quality.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.wandb_records import find_run_dirs, read_wandb_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "speedrun", "tiny_cpu.yaml")
STEPS = 16
RESUME_STEPS = 20
MESH_STEPS = 6
# 4-device vs 1-device losses, step by step, same batches, same initial weights.
# - Steps 0..2 (lr still tiny in the 4-step warmup): the same forward pass with a different reduction order; f32
#   reduction-order differences are ~1e-7 relative, and measured they are bitwise equal. Tolerance 1e-5.
# - Later steps: the two runs' gradients differ in the last bits (all-reduce order), and Adam's m / sqrt(v)
#   turns a last-bit difference in a near-zero gradient entry into a full-size update of the other sign; routing
#   top-k choices then flip where logits tie within float error. Measured: 5e-4 relative at step 3, 3.3e-3 at
#   step 5 (7.327 vs 7.352). We allow 1e-2 there.
# What this catches: anything that changes the forward pass on the mesh (a wrong batch shard, a dropped device's
# tokens, a loss reduced twice) moves the step-0 loss itself, and a gradient pointing elsewhere moves the later
# losses. It is blind to the gradient's scale: Adam divides each update by sqrt(v) and the gradient is clipped to
# a global norm, so a gradient off by a constant factor (e.g. reduced twice over the mesh) trains the same. The
# MoE layer's own gradients on a mesh are compared with one device's in tests/test_sharding.py and test_ep.py;
# the whole model's are not.
EXACT_STEPS = 3
EXACT_RTOL = 1e-5
LATER_RTOL = 1e-2

pytestmark = pytest.mark.slow


CORPUS_CHARS = 600_000  # about 200 k tokens: 100 steps of the tiny config
TINY_CORPUS_CHARS = 30_000  # about 10 k tokens: a handful of steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from experiments.speedrun.local_data import build_corpus

    d = str(tmp_path_factory.mktemp("corpus"))
    build_corpus(d, max_chars=CORPUS_CHARS)
    return d


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from experiments.speedrun.local_data import build_corpus

    d = str(tmp_path_factory.mktemp("tiny_corpus"))
    build_corpus(d, max_chars=TINY_CORPUS_CHARS)
    return d


NULL_CONTROL = {"null_control": "bias", "null_bias_rate": 2.0}


def _write_config(workdir: str, corpus: str, *, eval: bool = True, watch: bool = True, **trainer_overrides) -> str:
    """tiny_cpu.yaml pointed at ``corpus``. ``eval=False`` drops the validation set and ``watch=False`` Levanter's
    every-10-steps parameter/gradient norms: each saves a compile (about 10 s here) where a test does not need it."""
    with open(TINY_YAML) as f:
        cfg = yaml.safe_load(f)
    cfg["data"].update(
        tokenizer=os.path.join(corpus, "tokenizer"),
        train_urls=[os.path.join(corpus, "train.jsonl")],
        validation_urls=[os.path.join(corpus, "validation.jsonl")] if eval else [],
        cache_dir=os.path.join(corpus, "cache"),
    )
    cfg["trainer"].update(steps_per_eval=8, max_eval_batches=2, **trainer_overrides)
    if not watch:
        cfg["trainer"]["watch"] = {"interval": 0}
    cfg["optimizer"].update(lr_schedule="constant", warmup=4)
    cfg["model"].update(NULL_CONTROL)
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _train(workdir: str, config_path: str, *args: str, devices: int = 1, expect_rc: int = 0,
           env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The documented command, `python -m experiments.speedrun.custom_mixtral` (runs experiments/speedrun/train.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    env["WANDB_DIR"] = workdir
    env["WANDB_MODE"] = "offline"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    env.pop("NULL_MOE_HOST_MALLOC", None)
    for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)  # the CLI sets them itself (host_malloc auto -> resident on a CPU-only JAX)
    env.update(env_extra or {})
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "experiments.speedrun.custom_mixtral", "--config_path", config_path, *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != expect_rc:
        raise AssertionError(f"training exited {proc.returncode}, expected {expect_rc}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _progress_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The per-step lines (`step N/M  loss ...`), not the end-of-run eval line (`step N/M  eval_loss ...`)."""
    return [line for line in proc.stdout.splitlines() if line.startswith("step ") and line.split()[2] == "loss"]


def _runs(workdir: str, run_id: str) -> list[dict]:
    runs = [read_wandb_records(d) for d in find_run_dirs(os.path.join(workdir, "wandb"))]
    return [r for r in runs if r["run"].get("id") == run_id]


def _losses(rec: dict) -> dict[int, float]:
    return {int(h["_step"]): float(h["train/loss"]) for h in rec["history"] if "train/loss" in h}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus):
    workdir = str(tmp_path_factory.mktemp("train1"))
    config = _write_config(workdir, corpus)
    # the config's checkpoint base path is relative (checkpoints/tiny_cpu); 1 s makes temporary checkpoints
    proc = _train(workdir, config, "--trainer.id", "e2e", "--trainer.num_train_steps", str(STEPS),
                  "--trainer.checkpointer.save_interval", "1s")
    (rec,) = _runs(workdir, "e2e")
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints", "tiny_cpu", "e2e")))
    return dict(workdir=workdir, config=config, proc=proc, rec=rec, checkpoints=checkpoints)


def _vocab_size(corpus: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(os.path.join(corpus, "tokenizer")))


def _model_config(config_path: str):
    from experiments.speedrun.custom_mixtral import MixtralConfig

    with open(config_path) as f:
        model_cfg = dict(yaml.safe_load(f)["model"])
    model_cfg.pop("type")
    return MixtralConfig(**{k: v for k, v in model_cfg.items() if k != "attn_backend"})


def test_tiny_training_loss_falls_and_logs_everything(single_run, corpus):
    rec = single_run["rec"]
    assert rec["exit_code"] == 0
    losses = _losses(rec)
    assert sorted(losses) == list(range(STEPS))
    first, last = losses[0], sum(losses[s] for s in range(STEPS - 3, STEPS)) / 3
    assert last < first - 0.5, losses

    keys = set().union(*rec["history"])
    required = [
        "train/loss", "eval/loss",
        "throughput/tokens_per_second", "throughput/examples_per_second", "throughput/gflops_per_second",
        "throughput/total_gflops",
        "moe/null_frac", "moe/experts_per_token", "moe/all_null_frac", "moe/load_violation_max",
        "moe/routing_entropy", "moe/load_balancing_loss", "moe/router_z_loss",
        "moe/layer0/null_frac", "moe/layer1/null_frac", "moe/layer0/experts_per_token",
        "moe/layer0/expert0_load", "moe/layer1/expert7_load", "moe/expert0_load",
        "moe/real_per_token_0", "moe/real_per_token_2",
        "train/load_balancing_loss", "train/router_z_loss",
        "moe/null_bias", "moe/layer0/null_bias", "moe/layer1/null_bias",
    ]
    missing = [k for k in required if k not in keys]
    assert not missing, missing

    # every step's row carries that step's routing stats (StepAlignedTracker), the last step included
    rows = [h for h in rec["history"] if "moe/null_frac" in h]
    assert sorted(int(h["_step"]) for h in rows) == list(range(STEPS))
    assert rec["config"]["trainer"]["tracker"]["mode"] == "offline"
    for h in rows:
        assert 0.0 <= h["moe/null_frac"] <= 1.0
        assert h["moe/experts_per_token"] == pytest.approx(2 * (1 - h["moe/null_frac"]), abs=1e-4)
        assert h["train/load_balancing_loss"] > 0 and h["train/router_z_loss"] > 0
        loads = sum(h[f"moe/layer0/expert{j}_load"] for j in range(8))
        assert loads == pytest.approx(1.0, abs=1e-4)

    # the run config: the model's fields, the backend that actually ran, the host allocator
    cfg = rec["config"]
    assert cfg["moe/gmm_backend"] == "tiled"
    assert cfg["moe/gmm_backend_requested"] == "auto"
    assert cfg["moe/expert_path"] == "fused"
    assert cfg["moe/num_null_experts"] == 8
    assert cfg["moe/null_control"] == "bias" and cfg["model"]["null_bias_rate"] == NULL_CONTROL["null_bias_rate"]
    assert cfg["model"]["null_route_frac"] == 0.5 and cfg["model"]["gmm_backend"] == "auto"
    assert cfg["host/malloc"] == "resident"  # auto on a CPU-only JAX: the CLI re-executed itself

    # Levanter's throughput numbers use our FLOPs (expected real experts), and the parameter count is ours
    m = _model_config(single_run["config"])
    vocab = _vocab_size(corpus)
    summary = rec["summary"]
    assert summary["throughput/flops_per_example"] == pytest.approx(3 * m.flops_per_token(vocab) * m.seq_len)
    assert summary["parameter_count"] == m.total_trainable_params(vocab)

    # a finished run leaves a checkpoint at its last step (Levanter names it by the last completed step index)
    assert f"step-{STEPS - 1}" in single_run["checkpoints"], single_run["checkpoints"]


def test_realized_flops_are_logged_every_step_and_match_the_routing(single_run, corpus):
    """Next to Levanter's estimate (k (1 - p) real experts), each step logs the FLOPs of the experts it actually
    ran: 3 x 2 x 3 x D x F x (sum over layers of moe/layer{i}/experts_per_token) for the routed experts, and the
    model's FLOPs with the realized mean experts per token."""
    m = _model_config(single_run["config"])
    vocab = _vocab_size(corpus)
    D, F, L = m.hidden_dim, m.intermediate_dim, m.num_layers
    rows = [h for h in single_run["rec"]["history"] if "throughput/realized_flops_per_token" in h]
    assert sorted(int(h["_step"]) for h in rows) == list(range(STEPS))
    expected = 3 * m.flops_per_token(vocab)
    assert single_run["rec"]["summary"]["throughput/flops_per_example"] == pytest.approx(expected * m.seq_len)
    for h in rows:
        per_layer = sum(h[f"moe/layer{i}/experts_per_token"] for i in range(L))
        assert h["throughput/realized_expert_flops_per_token"] == pytest.approx(3 * 6 * D * F * per_layer, rel=1e-6)
        assert h["throughput/realized_flops_per_token"] == pytest.approx(
            3 * m.flops_per_token(vocab, real_experts_per_token=h["moe/experts_per_token"]), rel=1e-6)
        assert h["throughput/expected_flops_per_token"] == pytest.approx(expected)
        # realized - expected = the expert work above (below) k (1 - p) real experts per token
        delta = 3 * 6 * D * F * L * (h["moe/experts_per_token"] - m.expected_real_experts_per_token)
        assert h["throughput/realized_flops_per_token"] - expected == pytest.approx(delta, rel=1e-4, abs=1.0)
        assert h["throughput/realized_gflops_per_second"] == pytest.approx(
            h["throughput/realized_flops_per_token"] * h["throughput/tokens_per_second"] / 1e9, rel=1e-6)
        assert "throughput/realized_mfu" not in h  # Levanter knows no CPU peak


def test_progress_lines_log_file_and_host_allocator(single_run):
    proc = single_run["proc"]
    lines = _progress_lines(proc)
    # every step for a 16-step run (every max(1, num_train_steps // 100) steps)
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)], proc.stdout
    losses = _losses(single_run["rec"])
    for line, step in zip(lines, range(STEPS)):
        fields = line.split()
        assert fields[2] == "loss" and float(fields[3]) == pytest.approx(losses[step], abs=1e-4)
        assert "tok/s" in fields and "null_frac" in fields and "experts/tok" in fields and "realized" in fields
        assert "null_bias" in fields
    assert "eval_loss" in lines[0] and "eval_loss" in lines[8]  # steps_per_eval 8
    # Levanter evaluates once more at the end, after the last step's line
    assert proc.stdout.splitlines()[-1].startswith(f"step {STEPS}/{STEPS}  eval_loss ")
    assert "host_malloc=resident" in proc.stdout
    logs = os.listdir(os.path.join(single_run["workdir"], "out", "logs"))
    assert "e2e.log" in logs and "e2e.log.log" not in logs, logs


def test_temporary_checkpoints_under_a_relative_base_path_are_deleted(single_run):
    err = single_run["proc"].stderr
    assert "Saving temporary checkpoint" in err
    assert "Deleted old checkpoint" in err
    assert "Failed to delete" not in err
    assert single_run["checkpoints"] == [f"step-{STEPS - 1}"]  # only the permanent end-of-run checkpoint is left


def test_extended_run_resumes_from_checkpoint(single_run):
    workdir = single_run["workdir"]
    proc = _train(workdir, single_run["config"], "--trainer.id", "e2e",
                  "--trainer.num_train_steps", str(RESUME_STEPS))
    out = proc.stdout + proc.stderr
    assert f"Resuming training from step {STEPS}" in out
    runs = _runs(workdir, "e2e")
    assert len(runs) == 2
    second = max(runs, key=lambda r: r["file"])
    losses = _losses(second)
    assert sorted(losses) == list(range(STEPS, RESUME_STEPS)), sorted(losses)
    # continues from the trained weights, not from scratch
    first_losses = _losses(single_run["rec"])
    assert losses[STEPS] < first_losses[0] - 0.5
    assert abs(losses[STEPS] - first_losses[STEPS - 1]) < 0.5
    resumed = [line.split()[1] for line in _progress_lines(proc)]
    assert resumed == [f"{s}/{RESUME_STEPS}" for s in range(STEPS + 1, RESUME_STEPS + 1)]
    # null_control: bias. Every step moves each layer's bias by rate x (p - that layer's realized null fraction of
    # the step), from 0 at step 0; the resumed run starts from the bias the checkpoint holds, not from 0.
    rate, p = NULL_CONTROL["null_bias_rate"], 0.5
    rows = {int(h["_step"]): h for rec in (single_run["rec"], second) for h in rec["history"] if "moe/null_bias" in h}
    assert sorted(rows) == list(range(RESUME_STEPS))
    for i in range(2):
        bias = [rows[s][f"moe/layer{i}/null_bias"] for s in range(RESUME_STEPS)]
        frac = [rows[s][f"moe/layer{i}/null_frac"] for s in range(RESUME_STEPS)]
        assert bias[0] == 0.0
        for s in range(1, RESUME_STEPS):
            assert bias[s] == pytest.approx(bias[s - 1] + rate * (p - frac[s - 1]), abs=1e-5), (i, s)
        assert abs(bias[STEPS]) > 0.05  # what the resumed run started from: a trained bias
    for s in range(RESUME_STEPS):
        assert rows[s]["moe/null_bias"] == pytest.approx(
            (rows[s]["moe/layer0/null_bias"] + rows[s]["moe/layer1/null_bias"]) / 2, abs=1e-6)


def test_rerunning_a_finished_run_says_so_and_exits_0(single_run):
    """Same id, same steps: complete. Same id, fewer steps: complete too. Neither trains (no new W&B run)."""
    workdir = single_run["workdir"]
    done = _train(workdir, single_run["config"], "--trainer.id", "e2e", "--trainer.num_train_steps", str(RESUME_STEPS))
    complete = f"run e2e already complete at step {RESUME_STEPS} (num_train_steps={RESUME_STEPS}); nothing to do"
    assert complete in done.stdout
    fewer = _train(workdir, single_run["config"], "--trainer.id", "e2e", "--trainer.num_train_steps", "5")
    assert f"run e2e already complete at step {RESUME_STEPS}, past num_train_steps=5; nothing to do" in fewer.stdout
    for proc in (done, fewer):
        assert not _progress_lines(proc) and "Traceback" not in proc.stderr
    assert len(_runs(workdir, "e2e")) == 2  # the first run and its extension only


def test_a_corpus_too_small_fails_loudly(tmp_path_factory, tiny_corpus):
    workdir = str(tmp_path_factory.mktemp("exhausted"))
    config = _write_config(workdir, tiny_corpus, eval=False, watch=False)
    steps = 40
    proc = _train(workdir, config, "--trainer.id", "short", "--trainer.num_train_steps", str(steps), expect_rc=3)
    ran = len(_progress_lines(proc))
    assert 0 < ran < steps
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the training data ran out after {ran} of num_train_steps={steps} steps: the "
                           "corpus is too small for this run"), last
    (rec,) = _runs(workdir, "short")
    assert sorted(_losses(rec)) == list(range(ran))
    assert rec["exit_code"] == 3 and rec["summary"]["run/data_exhausted"] is True
    ckpt = os.path.join(workdir, "checkpoints", "tiny_cpu", "short")
    assert not os.path.exists(ckpt) or f"step-{ran - 1}" not in os.listdir(ckpt)  # not saved as if complete


def test_a_bad_value_is_one_error_line_and_exit_2(tmp_path_factory, corpus):
    workdir = str(tmp_path_factory.mktemp("bad_value"))
    config = _write_config(workdir, corpus)
    proc = _train(workdir, config, "--model.null_route_frac", "1.5", expect_rc=2)
    assert proc.stderr.strip().splitlines() == ["error: model.null_route_frac must be in [0, 1), got 1.5"]
    assert proc.stdout == ""  # nothing ran: not even the host allocator line
    proc = _train(workdir, config, env_extra={"NULL_MOE_HOST_MALLOC": "jemalloc"}, expect_rc=2)
    assert proc.stderr.strip().splitlines() == [
        "error: NULL_MOE_HOST_MALLOC must be one of ('auto', 'resident', 'default'), got 'jemalloc'"]


def test_four_device_data_fsdp_mesh_matches_single_device(single_run, tmp_path_factory, corpus):
    workdir = str(tmp_path_factory.mktemp("mesh4"))
    config = _write_config(workdir, corpus, watch=False)
    proc = _train(workdir, config, "--trainer.id", "mesh4", "--trainer.num_train_steps", str(MESH_STEPS),
                  "--trainer.replica_ici_axis_size", "2", devices=4, env_extra={"NULL_MOE_HOST_MALLOC": "default"})
    (rec,) = _runs(workdir, "mesh4")
    assert rec["summary"]["throughput/device_kind"] == "cpu"
    assert rec["config"]["host/malloc"] == "default" and "host_malloc=default" in proc.stdout  # the override
    # data x fsdp: batch over replica x data (4-way), parameters sharded over data (Levanter's fsdp axis)
    assert rec["config"]["mesh/device_count"] == 4
    assert rec["config"]["mesh/shape"] == {"replica": 2, "data": 2, "model": 1}
    assert single_run["rec"]["config"]["mesh/device_count"] == 1
    sharded = _losses(rec)
    single = _losses(single_run["rec"])
    assert sorted(sharded) == list(range(MESH_STEPS))
    for s in range(EXACT_STEPS):
        assert sharded[s] == pytest.approx(single[s], rel=EXACT_RTOL), (s, sharded, single)
    for s in range(EXACT_STEPS, MESH_STEPS):
        assert sharded[s] == pytest.approx(single[s], rel=LATER_RTOL), (s, sharded, single)
    # routing stats agree too while the trajectories are identical
    n1 = {int(h["_step"]): h["moe/null_frac"] for h in single_run["rec"]["history"] if "moe/null_frac" in h}
    n4 = {int(h["_step"]): h["moe/null_frac"] for h in rec["history"] if "moe/null_frac" in h}
    assert sorted(n4) == list(range(MESH_STEPS))
    for s in range(EXACT_STEPS):
        assert n4[s] == pytest.approx(n1[s], abs=1e-6)
    # the null-fraction controller: the same biases (each update used the global realized fraction)
    b1 = {int(h["_step"]): h["moe/null_bias"] for h in single_run["rec"]["history"] if "moe/null_bias" in h}
    b4 = {int(h["_step"]): h["moe/null_bias"] for h in rec["history"] if "moe/null_bias" in h}
    for s in range(EXACT_STEPS + 1):
        assert b4[s] == pytest.approx(b1[s], abs=1e-5), (s, b4, b1)
    assert abs(b4[EXACT_STEPS]) > 0.01
