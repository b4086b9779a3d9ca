"""Running the study: each arm x seed is one run of the documented training command (a subprocess), in the
study's order, inside its time budget; each finished run is read back from its offline W&B file into a row of
results.csv."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from experiments.speedrun.quality.config import Arm, ConfigError, QualityConfig, one_line
from experiments.speedrun.quality.report import write_outputs
from experiments.speedrun.quality.results import fmt, load_results, write_rows_atomically

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "Finished",
    "TRAIN_MODULE",
    "data_fingerprint",
    "predict_wall_s",
    "read_run",
    "run_args",
    "run_study",
    "train_command",
]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG_ERROR = 0, 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TRAIN_MODULE = "experiments.speedrun.custom_mixtral"  # the documented training command


# --- per-run command -------------------------------------------------------------------------------------------
def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def run_args(cfg: QualityConfig, arm: Arm, seed: int, out_dir: str) -> list[str]:
    """The training CLI's arguments for one run (after ``--config_path <base_config>``)."""
    args = []
    for key, value in cfg.overrides.items():
        args += [f"--{key}", _cli_value(value)]
    args += [
        "--trainer.id", cfg.run_id(arm, seed),
        "--trainer.seed", str(seed),
        "--data_seed", str(seed),
        "--trainer.num_train_steps", str(cfg.num_train_steps),
        "--trainer.steps_per_eval", str(cfg.eval_every),
        "--trainer.max_eval_batches", str(cfg.max_eval_batches),
        "--trainer.checkpointer.base_path", os.path.join(out_dir, "checkpoints"),
        "--trainer.tracker.group", cfg.name,
        "--trainer.tracker.name", cfg.run_id(arm, seed),
        "--trainer.tracker.mode", cfg.wandb_mode,
        "--progress_every", str(max(1, cfg.num_train_steps // 10)),
        "--model.num_experts_per_tok", str(arm.num_experts_per_tok),
        "--model.null_route_frac", repr(float(arm.null_route_frac)),
    ]
    for key, value in arm.model.items():
        args += [f"--model.{key}", _cli_value(value)]
    return args


def _parsed_run_config(cfg: QualityConfig, arm: Arm, seed: int, out_dir: str):
    """The run's training config, parsed in this process by the training CLI's own parser, and its learning-rate
    schedule checked as the CLI checks it (catches bad overrides before any compute)."""
    from experiments.speedrun.preflight import check_lr_schedule
    from experiments.speedrun.train import ConfigError as TrainConfigError, parse_config as parse_train_config

    try:
        config = parse_train_config(["--config_path", cfg.base_config, *run_args(cfg, arm, seed, out_dir)])
        check_lr_schedule(config.optimizer, config.trainer.num_train_steps)
        return config
    except TrainConfigError as e:
        raise ConfigError(f"arms.{arm.name}: {e}") from None


def data_fingerprint(train_config) -> str:
    """sha1 (12 hex) of the token ids of the first and the last training batch the run will see, read through
    Levanter's dataset exactly as ``train_lm`` builds it (key = PRNGKey(data_seed))."""
    import jax.random as jrandom
    import numpy as np

    from experiments.speedrun.local_data import ensure_local_data

    seed = train_config.data_seed
    if seed is None:
        raise ValueError("data_seed must be set")
    ensure_local_data(train_config.data)
    dataset = train_config.data.train_set(train_config.model.Pos, train_config.trainer.batch_schedule,
                                          key=jrandom.PRNGKey(seed), epochs=train_config.epoch)
    sync = dataset.as_sync_dataset()
    bs = int(train_config.trainer.train_batch_size)
    last = (int(train_config.trainer.num_train_steps) - 1) * bs
    h = hashlib.sha1()
    for start in (0, last):
        for ex in sync.get_batch(list(range(start, start + bs))):
            h.update(np.asarray(ex.tokens.array, dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


# --- reading a finished run -----------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def read_run(run_dir: str, num_train_steps: int) -> dict:
    """Final eval loss, routing statistics and curves of one finished run, from its offline W&B file."""
    from experiments.speedrun.wandb_offline import find_run_dirs, read_wandb_records

    dirs = find_run_dirs(run_dir)
    if len(dirs) != 1:
        raise RuntimeError(f"expected one W&B run under {run_dir}, found {len(dirs)}")
    rec = read_wandb_records(dirs[0])
    history = rec["history"]
    last = num_train_steps - 1

    def step_of(row):
        return int(row.get("global_step", row.get("_step", -1)))

    evals = sorted((step_of(r), float(r["eval/loss"]), r.get("eval/bpb")) for r in history if "eval/loss" in r)
    final = [e for e in evals if e[0] == last]
    if not final:
        raise RuntimeError(f"{run_dir}: no eval/loss at the last step ({last}); evaluated at {[e[0] for e in evals]}")
    train_rows = [r for r in history if "train/loss" in r]
    last_row = max(train_rows, key=step_of)
    if step_of(last_row) != last:
        raise RuntimeError(f"{run_dir}: the last training step logged is {step_of(last_row)}, expected {last}")
    moe_rows = [r for r in train_rows if "moe/experts_per_token" in r]

    def series(key):
        return [float(r[key]) for r in moe_rows if key in r]

    tps = [float(r["throughput/tokens_per_second"]) for r in history if "throughput/tokens_per_second" in r]
    summary, config = rec["summary"], rec["config"]
    total_tokens = summary.get("throughput/total_tokens", last_row.get("throughput/total_tokens"))
    return {
        "eval_loss": final[-1][1],
        "eval_bpb": final[-1][2],
        "eval_curve": [[s, v] for s, v, _ in evals],
        "train_curve": [[step_of(r), float(r["train/loss"])] for r in sorted(train_rows, key=step_of)],
        "train_loss_final": float(last_row["train/loss"]),
        "realized_experts_per_token": _mean(series("moe/experts_per_token")),
        "realized_experts_per_token_final": float(last_row.get("moe/experts_per_token", float("nan"))),
        "null_frac": _mean(series("moe/null_frac")),
        "all_null_frac": _mean(series("moe/all_null_frac")),
        "all_null_frac_final": float(last_row.get("moe/all_null_frac", float("nan"))),
        "load_violation_max_final": float(last_row.get("moe/load_violation_max", float("nan"))),
        "routing_entropy_final": float(last_row.get("moe/routing_entropy", float("nan"))),
        "train_tokens": int(total_tokens) if total_tokens is not None else None,
        "parameter_count": summary.get("parameter_count"),
        "tokens_per_second": statistics.median(tps) if tps else float("nan"),
        "num_null_experts": config.get("moe/num_null_experts"),
        "expected_real_experts_per_token": config.get("moe/expected_real_experts_per_token"),
        "logged_data_seed": config.get("data_seed"),
        "exit_code": rec["exit_code"],
    }


# --- the time budget ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finished:
    """A run this command finished: its arm, wall time and median training tokens per second."""

    arm: str
    wall_s: float
    tokens_per_second: float


def predict_wall_s(arm: str, finished: list[Finished], costs: dict[str, float], tokens: int) -> Optional[float]:
    """How long a run of ``arm`` (``tokens`` training tokens) will take, from the runs this command finished and
    the arms' training FLOPs per token (``costs``). The same arm's last wall time if it ran (it compiled too, so
    this errs long); else start-up plus training: the largest start-up time seen (wall minus tokens over tokens per
    second) plus the arm's FLOPs at the lowest FLOP rate seen (their tokens per second times their FLOPs per
    token). Without a usable rate, the longest wall time scaled up by the FLOPs ratio. None before any finished."""
    same = [f for f in finished if f.arm == arm]
    if same:
        return same[-1].wall_s
    if not finished:
        return None
    rated = [f for f in finished if f.tokens_per_second > 0 and math.isfinite(f.tokens_per_second)]
    if rated:
        startup = max(max(0.0, f.wall_s - tokens / f.tokens_per_second) for f in rated)
        flop_rate = min(f.tokens_per_second * costs[f.arm] for f in rated)
        return startup + tokens * costs[arm] / flop_rate
    return max(f.wall_s * max(1.0, costs[arm] / costs[f.arm]) for f in finished)


def _arm_costs(cfg: QualityConfig, vocab_size: int) -> dict[str, float]:
    return {a.name: 3 * float(cfg.model_config(a).flops_per_token(vocab_size)) for a in cfg.arms}


# --- running ---------------------------------------------------------------------------------------------------
def _train_env(run_dir: str, wandb_mode: str, parallel_runs: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")] if p)
    env["WANDB_DIR"] = run_dir
    env["WANDB_MODE"] = wandb_mode
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[key] = "1"
    if parallel_runs > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
        # runs that share one accelerator: each preallocates its share of the memory, not JAX's default 75%
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel_runs:.3f}"
    return env


def _study_process_on_cpu() -> None:
    """This process reads data through JAX (the fingerprints) but trains nothing: keep it on the CPU, so that on a
    GPU machine it holds none of the memory the runs need. The runs' environment is not touched."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def train_command(cfg: QualityConfig, arm: Arm, seed: int, out_dir: str) -> list[str]:
    """The documented training command for one run."""
    return [sys.executable, "-m", TRAIN_MODULE, "--config_path", cfg.base_config, *run_args(cfg, arm, seed, out_dir)]


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


@dataclass
class _Run:
    arm: Arm
    seed: int
    run_id: str
    run_dir: str
    ckpt_dir: str
    log_path: str
    train_config: Any
    fingerprint: str
    proc: subprocess.Popen
    logf: Any
    t0: float
    kill_at: Optional[float]
    killed: bool = False


def _start(cfg: QualityConfig, arm: Arm, seed: int, train_config, out_dir: str, deadline: Optional[float]) -> _Run:
    run_id = cfg.run_id(arm, seed)
    run_dir = os.path.join(out_dir, "runs", run_id)
    ckpt_dir = os.path.join(out_dir, "checkpoints", run_id)
    for stale in (run_dir, ckpt_dir):  # a partial run from an interrupted study: start it again from scratch
        if os.path.exists(stale):
            shutil.rmtree(stale)
    os.makedirs(run_dir)
    fingerprint = data_fingerprint(train_config)  # the first one builds the corpus and its caches
    cmd = train_command(cfg, arm, seed, out_dir)
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd[1:]) + "\n")
    log_path = os.path.join(run_dir, "train.log")
    logf = open(log_path, "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=_train_env(run_dir, cfg.wandb_mode, cfg.parallel_runs),
                            stdout=logf, stderr=subprocess.STDOUT)
    limits = [t for t in (None if cfg.run_timeout_s is None else t0 + cfg.run_timeout_s, deadline) if t is not None]
    return _Run(arm, seed, run_id, run_dir, ckpt_dir, log_path, train_config, fingerprint, proc, logf, t0,
                min(limits) if limits else None)


def _wait_any(running: list[_Run], poll_s: float = 0.5) -> list[_Run]:
    """Blocks until at least one run ended (killing any past its time limit); returns the ended runs."""
    while True:
        ended = []
        now = time.time()
        for r in running:
            if r.proc.poll() is None and r.kill_at is not None and now >= r.kill_at:
                r.proc.kill()
                r.killed = True
                r.proc.wait()
            if r.proc.poll() is not None:
                ended.append(r)
        if ended:
            for r in ended:
                r.logf.close()
            return ended
        time.sleep(poll_s)


def _row(cfg: QualityConfig, r: _Run, metrics: dict, wall: float, study_hash: str) -> dict:
    arm, tc = r.arm, r.train_config
    train_tokens = metrics["train_tokens"]
    if train_tokens is None:
        train_tokens = cfg.num_train_steps * int(tc.trainer.train_batch_size) * int(tc.model.seq_len)
    return {
        "arm": arm.name,
        "seed": r.seed,
        "num_experts_per_tok": arm.num_experts_per_tok,
        "null_route_frac": float(arm.null_route_frac),
        "num_null_experts": metrics["num_null_experts"],
        "expected_real_experts_per_token": cfg.expected_real(arm),
        "eval_tokens": cfg.max_eval_batches * int(tc.trainer.eval_batch_size) * int(tc.model.seq_len),
        "num_train_steps": cfg.num_train_steps,
        "train_tokens": train_tokens,
        "wall_s": wall,
        "data_fingerprint": r.fingerprint,
        "run_id": r.run_id,
        "arm_overrides": json.dumps(arm.model, sort_keys=True) if arm.model else "",
        "study_hash": study_hash,
        **{k: metrics[k] for k in (
            "realized_experts_per_token", "realized_experts_per_token_final", "null_frac", "all_null_frac",
            "all_null_frac_final", "load_violation_max_final", "routing_entropy_final", "eval_loss", "eval_bpb",
            "train_loss_final", "parameter_count", "tokens_per_second")},
    }


def run_study(cfg: QualityConfig, *, log=print, started: Optional[float] = None) -> int:
    """Trains every missing arm x seed (``cfg.run_order()``, up to ``cfg.parallel_runs`` at once, within
    ``cfg.time_budget_s`` of ``started``, default now), then writes the CSV (after each run), summary and plots."""
    started = time.time() if started is None else started
    deadline = None if cfg.time_budget_s is None else started + cfg.time_budget_s
    _study_process_on_cpu()
    out_dir = os.path.abspath(cfg.out_dir)
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    results_path = os.path.join(out_dir, "results.csv")
    study_hash = cfg.study_hash()
    rows = load_results(results_path)
    others = sorted({r.get("study_hash") for r in rows} - {study_hash})
    if others:
        raise ConfigError(f"out_dir {cfg.out_dir} holds results of another study config (study_hash {others} vs "
                          f"{study_hash}: base config, overrides, steps or eval settings differ); use another "
                          f"--out_dir")
    done = {(r["arm"], int(r["seed"])) for r in rows}
    todo = [(a, s) for a, s in cfg.run_order() if (a.name, s) not in done]

    # Before any compute: every run's training config parses (bad overrides fail here, naming the arm).
    parsed = {(a.name, s): _parsed_run_config(cfg, a, s, out_dir) for a, s in todo}
    log(f"study {cfg.name}: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds, {len(done)} done, {len(todo)} to run "
        f"({cfg.num_train_steps} steps each"
        + (f", {cfg.parallel_runs} at a time" if cfg.parallel_runs > 1 else "") + f"); out_dir {cfg.out_dir}"
        + (f"; time budget {cfg.time_budget_s:g} s" if deadline is not None else ""))
    study_start = time.time()
    finished: list[Finished] = []
    costs: dict[str, float] = {}
    cut: list[dict] = []
    running: list[_Run] = []
    pending = list(enumerate(todo, 1))
    failed = False
    while pending or running:
        while pending and not failed and len(running) < cfg.parallel_runs:
            i, (arm, seed) = pending.pop(0)
            run_id, train_config = cfg.run_id(arm, seed), parsed[(arm.name, seed)]
            if deadline is not None:
                left = deadline - time.time()
                if finished and not costs:
                    costs = _arm_costs(cfg, len(train_config.data.the_tokenizer))
                tokens = cfg.num_train_steps * int(train_config.trainer.train_batch_size) * int(
                    train_config.model.seq_len)
                predicted = predict_wall_s(arm.name, finished, costs, tokens)
                if left <= 0 or (predicted is not None and predicted > left):
                    why = ("the time budget is spent" if left <= 0 else
                           f"predicted {predicted:.0f} s, {left:.0f} s of the time budget left")
                    log(f"[{i}/{len(todo)}] {run_id}: not started ({why})")
                    cut.append({"run_id": run_id, "reason": f"not started: {why}"})
                    continue
            running.append(_start(cfg, arm, seed, train_config, out_dir, deadline))
            log(f"[{i}/{len(todo)}] {run_id}: k={arm.num_experts_per_tok} p={arm.null_route_frac:.4g} "
                f"(expected {cfg.expected_real(arm):.3f} real experts/token) started")
        if not running:
            break
        for r in _wait_any(running):
            running.remove(r)
            wall = time.time() - r.t0
            rc = r.proc.returncode
            if r.killed and deadline is not None and time.time() >= deadline - 1:
                log(f"    {r.run_id}: stopped at the end of the time budget after {wall:.0f} s")
                cut.append({"run_id": r.run_id, "reason": f"stopped after {wall:.0f} s: the time budget ran out"})
                shutil.rmtree(r.ckpt_dir, ignore_errors=True)
                continue
            if r.killed or rc != 0:
                what = f"killed after run_timeout_s={cfg.run_timeout_s:g}" if r.killed else f"exit {rc}"
                log(f"error: run {r.run_id} failed ({what}) after {wall:.0f} s; its log: {r.log_path}\n"
                    f"{_tail(r.log_path)}")
                failed = True
                continue
            try:
                metrics = read_run(r.run_dir, cfg.num_train_steps)
                if metrics["logged_data_seed"] not in (None, r.seed):
                    raise RuntimeError(f"logged data_seed {metrics['logged_data_seed']}, expected {r.seed}")
            except Exception as e:
                log(f"error: could not read the results of run {r.run_id}: {one_line(e)}")
                failed = True
                continue
            finished.append(Finished(r.arm.name, wall, float(metrics["tokens_per_second"])))
            with open(os.path.join(r.run_dir, "metrics.json"), "w") as f:
                json.dump({k: metrics[k] for k in ("eval_curve", "train_curve")}, f)
            rows = load_results(results_path) + [{k: fmt(v) for k, v in _row(cfg, r, metrics, wall,
                                                                               study_hash).items()}]
            write_rows_atomically(results_path, rows)
            if not cfg.keep_checkpoints and os.path.exists(r.ckpt_dir):
                shutil.rmtree(r.ckpt_dir, ignore_errors=True)
            log(f"    {r.run_id}: eval_loss {metrics['eval_loss']:.4f}  realized "
                f"{metrics['realized_experts_per_token']:.3f} experts/token  all-null {metrics['all_null_frac']:.3f}"
                f"  {wall:.0f} s")
    if failed:
        cut += [{"run_id": cfg.run_id(a, s), "reason": "not started: an earlier run failed"} for _, (a, s) in pending]
    write_outputs(cfg, load_results(results_path), cut=cut, log=log)
    if todo:
        log(f"study {cfg.name}: {len(todo) - len(cut)} of {len(todo)} runs in {time.time() - study_start:.0f} s"
            + (f"; {len(cut)} cut" if cut else ""))
    return EXIT_FAILED if failed else EXIT_OK
