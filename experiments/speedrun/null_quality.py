"""Does null routing pay at matched compute? The quality study: arms x seeds through the training CLI.

    python -m experiments.speedrun.null_quality --config_path configs/quality/cpu_study.yaml \\
        [--num_train_steps N] [--seeds "[0,1,2]"] [--out_dir DIR] [--max_eval_batches B] ...

Every arm x seed is one run of the documented training command (``python -m experiments.speedrun.custom_mixtral
--config_path <base_config> ...``, a subprocess) with the same base config, token budget, optimizer, aux-loss
weights, evaluation batches and, per seed, the same initial weights and data order; arms differ only in
``model.num_experts_per_tok`` (k), ``model.null_route_frac`` (p) and an arm's own ``model`` overrides. Each run is
an (offline by default) W&B run in the group ``<name>`` with the id ``<name>-<arm>-s<seed>``, written under
``DIR/runs/<run id>/``; the study reads its metrics back from that run's ``.wandb`` file. It writes:

- ``DIR/results.csv``: one row per arm x seed (final held-out eval loss, expected and realized real experts per
  token, null / all-null fractions, load spread, train tokens, data-order fingerprint, wall time, ...). A run is
  done once its row is in the file (the file is rewritten atomically: temp file, fsync, rename). A rerun skips done
  runs; a run that crashed or was interrupted is started again from scratch (its partial W&B run and checkpoints are
  removed first), so every row comes from one uninterrupted run. Rows whose ``study_hash`` (a hash of everything
  that defines the run except arm and seed) differs from the current config stop the study with an error: use
  another ``--out_dir``.
- ``DIR/summary.md``: per arm mean +- std (over seeds) of the final eval loss and of realized experts per token;
  for each null arm, the paired (same seed) difference against its matched-expected-compute baseline with the
  verdict (win only if the mean difference is below zero by more than twice its std; loss if above zero by more
  than twice its std; else tie), at realized compute too when the realized experts per token are more than
  ``realized_tolerance`` off the target; the share of the k_low -> k_high bracket gap each arm recovers; the
  bracket gap against the seed noise.
- ``DIR/eval_loss_vs_step.png`` (mean over seeds per arm) and ``DIR/eval_loss_vs_experts.png`` (final eval loss
  vs expected real experts per token; hollow markers at the realized value). ``DIR/runs/<id>/metrics.json`` holds
  each run's eval and train-loss curves.

Data order: Levanter's ``train_lm`` draws the training order from ``data_seed`` (set to the run's seed here), the
data config, ``seq_len`` and the batch size only, never from the model, so every arm of a seed sees the same
batches; ``data_fingerprint`` in the CSV is a hash of the first and last training batch of each run, computed from
the run's own parsed config. The initial weights are the same too: ``trainer.seed`` is the run's seed and the
parameter shapes do not depend on k or p (the null gate exists at p = 0 too).

Exit codes: 0 done, 1 a run failed (finished rows are kept; rerun to continue), 2 configuration error (one
``error: ...`` line naming the field, before any compute).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "Arm",
    "QualityConfig",
    "RESULT_COLUMNS",
    "load_results",
    "main",
    "parse_config",
    "run_study",
    "summarize",
    "write_outputs",
]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG_ERROR = 0, 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_MODULE = "experiments.speedrun.custom_mixtral"  # the documented training command
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Set per run by the study: overriding them would break the study's pairing or bookkeeping.
_CONTROLLED = {
    "trainer.id", "trainer.seed", "data_seed", "trainer.num_train_steps", "trainer.steps_per_eval",
    "trainer.max_eval_batches", "trainer.checkpointer.base_path", "trainer.tracker.group", "trainer.tracker.name",
    "trainer.tracker.mode", "model.num_experts_per_tok", "model.null_route_frac", "progress_every",
}
# What an arm may change besides k and p (anything else would break "same token budget, optimizer, aux losses").
_ARM_FORBIDDEN_MODEL = {"num_experts_per_tok", "null_route_frac", "lbl_coef", "rzl_coef", "seq_len"}

RESULT_COLUMNS = [
    "arm", "seed", "num_experts_per_tok", "null_route_frac", "num_null_experts", "expected_real_experts_per_token",
    "realized_experts_per_token", "realized_experts_per_token_final", "null_frac", "all_null_frac",
    "all_null_frac_final", "load_violation_max_final", "routing_entropy_final", "eval_loss", "eval_bpb",
    "train_loss_final", "train_tokens", "num_train_steps", "eval_tokens", "parameter_count", "tokens_per_second",
    "wall_s", "data_fingerprint", "run_id", "arm_overrides", "study_hash",
]


class ConfigError(Exception):
    """A configuration problem; the message is one line naming the field."""


@dataclass(frozen=True)
class Arm:
    """One arm: k slots per token with a null fraction p, plus optional model overrides for this arm only.

    baseline: the p = 0 arm at the same expected real experts per token (None: the p = 0 arm whose k equals this
        arm's expected real experts per token, if there is one).
    model: extra ``--model.<key> <value>`` overrides for this arm, e.g. ``{renormalize_real: false}``.
    """

    name: str = ""
    num_experts_per_tok: int = 2
    null_route_frac: float = 0.0
    baseline: Optional[str] = None
    model: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return self.null_route_frac > 0


def _default_arms() -> List[Arm]:
    return [
        Arm("k2", 2, 0.0),
        Arm("k4-p0.5", 4, 0.5),
        Arm("k3-p0.33", 3, 1.0 / 3.0),
        Arm("k1", 1, 0.0),
        Arm("k4", 4, 0.0),
    ]


@dataclass(frozen=True)
class QualityConfig:
    """The study (see the module docstring and docs/TRAINING.md, *Quality study*).

    name: study name: the W&B group and the prefix of every run id.
    base_config: the training YAML every run starts from (its model shape, data, optimizer, trainer).
    overrides: dotted training-config overrides applied to every run (``{model.hidden_dim: 128}``).
    arms, seeds, num_train_steps: what is trained.
    steps_per_eval: held-out eval every this many steps (default num_train_steps // 4); the last step always
        evaluates. max_eval_batches: the fixed number of held-out batches every eval reads (the same batches for
        every arm).
    brackets: [k_low arm, k_high arm], both p = 0 (default: the p = 0 arms with the smallest and largest k).
    realized_tolerance: relative distance of realized from expected real experts per token beyond which the
        summary flags a null arm and compares it at realized compute too.
    wandb_mode: offline (default), online or disabled. keep_checkpoints: keep each finished run's checkpoints.
    run_timeout_s: kill a run after this many seconds (None: no limit).
    """

    name: str = "cpu_study"
    base_config: str = "configs/speedrun/tiny_cpu.yaml"
    overrides: Dict[str, Any] = field(default_factory=dict)
    arms: List[Arm] = field(default_factory=_default_arms)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    num_train_steps: int = 400
    steps_per_eval: Optional[int] = None
    max_eval_batches: int = 16
    brackets: Optional[List[str]] = None
    out_dir: str = "out/quality/cpu_study"
    realized_tolerance: float = 0.05
    wandb_mode: str = "offline"
    keep_checkpoints: bool = False
    run_timeout_s: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"name must be a non-empty run-id-safe string ([A-Za-z0-9_.-]), got {self.name!r}")
        if not self.arms:
            raise ValueError("arms must list at least one arm")
        names = [a.name for a in self.arms]
        for a in self.arms:
            if not isinstance(a.name, str) or not _NAME_RE.match(a.name):
                raise ValueError(f"arms: arm name must be run-id-safe ([A-Za-z0-9_.-]), got {a.name!r}")
            for key in a.model:
                if key in _ARM_FORBIDDEN_MODEL:
                    raise ValueError(f"arms.{a.name}.model.{key} may not differ between arms (set it in overrides)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: duplicate arm names {dup}")
        for a in self.arms:
            if a.baseline is not None and a.baseline not in names:
                raise ValueError(f"arms.{a.name}.baseline: no arm named {a.baseline!r}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        if not isinstance(self.num_train_steps, int) or self.num_train_steps < 1:
            raise ValueError(f"num_train_steps must be a positive integer, got {self.num_train_steps!r}")
        if self.steps_per_eval is not None and self.steps_per_eval < 1:
            raise ValueError(f"steps_per_eval must be >= 1, got {self.steps_per_eval!r}")
        if not isinstance(self.max_eval_batches, int) or self.max_eval_batches < 1:
            raise ValueError(f"max_eval_batches must be a positive integer, got {self.max_eval_batches!r}")
        if not 0 < self.realized_tolerance < 1:
            raise ValueError(f"realized_tolerance must be in (0, 1), got {self.realized_tolerance!r}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.run_timeout_s is not None and self.run_timeout_s <= 0:
            raise ValueError(f"run_timeout_s must be positive, got {self.run_timeout_s!r}")
        for key in self.overrides:
            if key in _CONTROLLED:
                raise ValueError(f"overrides.{key} is set by the study per run; use the study's own field")
            if key.startswith("model.") and key[len("model."):] in ("num_experts_per_tok", "null_route_frac"):
                raise ValueError(f"overrides.{key}: k and p are per arm")
        if not os.path.isfile(self.base_config):
            raise ValueError(f"base_config not found: {self.base_config}")
        # Every arm's MoE layer config, built as the model would build it: k > N, p out of [0, 1), a bad M ...
        for a in self.arms:
            try:
                self.moe_config(a)
            except (ValueError, TypeError) as e:
                raise ValueError(f"arms.{a.name}: {' '.join(str(e).split())}") from None
        if self.brackets is not None:
            if len(self.brackets) != 2 or any(b not in names for b in self.brackets):
                raise ValueError(f"brackets must name two arms (k_low, k_high), got {self.brackets!r}")
            for b in self.brackets:
                if self.arm(b).is_null:
                    raise ValueError(f"brackets: arm {b!r} has null_route_frac > 0; brackets are p = 0 arms")

    # --- derived ----------------------------------------------------------------------------------------------
    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def eval_every(self) -> int:
        return self.steps_per_eval if self.steps_per_eval is not None else max(1, self.num_train_steps // 4)

    def base_model_fields(self) -> dict:
        import yaml

        with open(self.base_config) as f:
            base = yaml.safe_load(f) or {}
        model = dict(base.get("model") or {})
        for key, value in self.overrides.items():
            if key.startswith("model."):
                model[key[len("model."):]] = value
        return model

    def moe_config(self, arm: Arm):
        """The arm's ``NullMoEConfig``, built from the base config's model fields as ``MixtralConfig`` builds it."""
        from null_moe.config import NullMoEConfig

        model = {**self.base_model_fields(), **arm.model}
        keys = ("hidden_dim", "intermediate_dim", "n_routed_experts", "take_until_null", "num_null_experts",
                "renormalize_real", "lbl_coef", "rzl_coef", "balance_scope", "capacity_factor", "ep_transport", "ep_dedup", "null_control", "null_bias_rate", "balance_pool")
        kwargs = {k: model[k] for k in keys if k in model}
        return NullMoEConfig(**kwargs, num_experts_per_tok=arm.num_experts_per_tok,
                             null_route_frac=float(arm.null_route_frac))

    def expected_real(self, arm: Arm) -> float:
        return float(self.moe_config(arm).expected_real_experts_per_token)

    def baseline_of(self, arm: Arm) -> Optional[str]:
        """The matched-expected-compute p = 0 arm of a null arm (None if there is none)."""
        if not arm.is_null:
            return None
        if arm.baseline is not None:
            return arm.baseline
        target = self.expected_real(arm)
        for b in self.arms:
            if not b.is_null and not b.model and abs(b.num_experts_per_tok - target) < 1e-6:
                return b.name
        return None

    def bracket_arms(self) -> Optional[tuple[str, str]]:
        if self.brackets is not None:
            return self.brackets[0], self.brackets[1]
        dense = [a for a in self.arms if not a.is_null and not a.model]
        if len(dense) < 2:
            return None
        lo = min(dense, key=lambda a: a.num_experts_per_tok)
        hi = max(dense, key=lambda a: a.num_experts_per_tok)
        return (lo.name, hi.name) if lo.num_experts_per_tok < hi.num_experts_per_tok else None

    def run_id(self, arm: Arm, seed: int) -> str:
        return f"{self.name}-{arm.name}-s{seed}"

    def study_hash(self) -> str:
        """What defines every run apart from arm and seed (a row with another hash belongs to another study)."""
        import yaml

        with open(self.base_config) as f:  # its content, not its bytes: comments do not matter
            base = json.dumps(yaml.safe_load(f), sort_keys=True, default=str)
        key = json.dumps(
            {"name": self.name, "base": base, "overrides": {k: str(v) for k, v in sorted(self.overrides.items())},
             "steps": self.num_train_steps, "eval_every": self.eval_every, "eval_batches": self.max_eval_batches},
            sort_keys=True,
        )
        return hashlib.sha1(key.encode()).hexdigest()[:12]


# --- the CLI config ------------------------------------------------------------------------------------------------
def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def parse_config(args: Sequence[str]) -> QualityConfig:
    """``--config_path X.yaml [--field value ...]`` -> ``QualityConfig``; ``ConfigError`` (one line) if invalid."""
    import draccus
    from draccus.utils import DecodingError, ParsingError

    args = list(args)
    for i, a in enumerate(args):
        path = args[i + 1] if a == "--config_path" and i + 1 < len(args) else (
            a.split("=", 1)[1] if a.startswith("--config_path=") else None)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
    captured = io.StringIO()
    try:
        from contextlib import redirect_stderr

        with redirect_stderr(captured):
            return draccus.parse(config_class=QualityConfig, args=args)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise ConfigError((lines[-1].split("error: ", 1)[-1]) if lines else f"invalid arguments (exit {e.code})")
    except DecodingError as e:
        where = ".".join(e.key_path)
        raise ConfigError(f"{where}: {e.message}" if where else e.message) from None
    except ParsingError as e:
        cause = e.__cause__
        raise ConfigError(_one_line(cause) if cause is not None else _one_line(e)) from None
    except Exception as e:  # bad YAML and the like
        raise ConfigError(_one_line(f"{type(e).__name__}: {e}")) from None


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
    """The run's training config, parsed in this process by the training CLI's own parser (catches bad overrides
    before any compute)."""
    from experiments.speedrun.train import ConfigError as TrainConfigError, parse_config as parse_train_config

    try:
        return parse_train_config(["--config_path", cfg.base_config, *run_args(cfg, arm, seed, out_dir)])
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


# --- results file ----------------------------------------------------------------------------------------------
def load_results(path: str) -> list[dict]:
    """Rows of a results.csv as dicts of strings ([] if the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows_atomically(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(round(value, 6))
    return "" if value is None else str(value)


# --- running ---------------------------------------------------------------------------------------------------
def _train_env(run_dir: str, wandb_mode: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")] if p)
    env["WANDB_DIR"] = run_dir
    env["WANDB_MODE"] = wandb_mode
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[key] = "1"
    return env


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def run_study(cfg: QualityConfig, *, log=print) -> int:
    """Trains every missing arm x seed, then writes the CSV (after each run), summary and plots."""
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
    todo = [(a, s) for s in cfg.seeds for a in cfg.arms if (a.name, s) not in done]

    # Before any compute: every run's training config parses (bad overrides fail here, naming the arm).
    parsed = {(a.name, s): _parsed_run_config(cfg, a, s, out_dir) for a, s in todo}
    log(f"study {cfg.name}: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds, {len(done)} done, {len(todo)} to run "
        f"({cfg.num_train_steps} steps each); out_dir {cfg.out_dir}")
    study_start = time.time()
    for i, (arm, seed) in enumerate(todo):
        run_id = cfg.run_id(arm, seed)
        run_dir = os.path.join(out_dir, "runs", run_id)
        ckpt_dir = os.path.join(out_dir, "checkpoints", run_id)
        for stale in (run_dir, ckpt_dir):  # a partial run from an interrupted study: start it again from scratch
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(run_dir)
        train_config = parsed[(arm.name, seed)]
        fingerprint = data_fingerprint(train_config)
        cmd = [sys.executable, "-m", TRAIN_MODULE, "--config_path", cfg.base_config,
               *run_args(cfg, arm, seed, out_dir)]
        with open(os.path.join(run_dir, "command.txt"), "w") as f:
            f.write(" ".join(cmd[1:]) + "\n")
        log_path = os.path.join(run_dir, "train.log")
        log(f"[{i + 1}/{len(todo)}] {run_id}: k={arm.num_experts_per_tok} p={arm.null_route_frac:.4g} "
            f"(expected {cfg.expected_real(arm):.3f} real experts/token) ...")
        t0 = time.time()
        with open(log_path, "w") as logf:
            try:
                proc = subprocess.run(cmd, cwd=os.getcwd(), env=_train_env(run_dir, cfg.wandb_mode), stdout=logf,
                                      stderr=subprocess.STDOUT, timeout=cfg.run_timeout_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.time() - t0
        if rc != 0:
            log(f"error: run {run_id} failed (exit {rc}) after {wall:.0f} s; its log: {log_path}\n{_tail(log_path)}")
            write_outputs(cfg, load_results(results_path), log=log)
            return EXIT_FAILED
        try:
            metrics = read_run(run_dir, cfg.num_train_steps)
        except Exception as e:
            log(f"error: could not read the results of run {run_id}: {_one_line(e)}")
            write_outputs(cfg, load_results(results_path), log=log)
            return EXIT_FAILED
        if metrics["logged_data_seed"] not in (None, seed):
            log(f"error: run {run_id} logged data_seed {metrics['logged_data_seed']}, expected {seed}")
            return EXIT_FAILED
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump({k: metrics[k] for k in ("eval_curve", "train_curve")}, f)
        train_tokens = metrics["train_tokens"]
        expected_tokens = (cfg.num_train_steps * int(train_config.trainer.train_batch_size)
                           * int(train_config.model.seq_len))
        if train_tokens is None:
            train_tokens = expected_tokens
        row = {
            "arm": arm.name,
            "seed": seed,
            "num_experts_per_tok": arm.num_experts_per_tok,
            "null_route_frac": float(arm.null_route_frac),
            "num_null_experts": metrics["num_null_experts"],
            "expected_real_experts_per_token": cfg.expected_real(arm),
            "eval_tokens": cfg.max_eval_batches * int(train_config.trainer.eval_batch_size)
            * int(train_config.model.seq_len),
            "num_train_steps": cfg.num_train_steps,
            "train_tokens": train_tokens,
            "wall_s": wall,
            "data_fingerprint": fingerprint,
            "run_id": run_id,
            "arm_overrides": json.dumps(arm.model, sort_keys=True) if arm.model else "",
            "study_hash": study_hash,
            **{k: metrics[k] for k in (
                "realized_experts_per_token", "realized_experts_per_token_final", "null_frac", "all_null_frac",
                "all_null_frac_final", "load_violation_max_final", "routing_entropy_final", "eval_loss", "eval_bpb",
                "train_loss_final", "parameter_count", "tokens_per_second")},
        }
        rows = load_results(results_path) + [{k: _fmt(v) for k, v in row.items()}]
        _write_rows_atomically(results_path, rows)
        if not cfg.keep_checkpoints and os.path.exists(ckpt_dir):
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        log(f"    eval_loss {metrics['eval_loss']:.4f}  realized {metrics['realized_experts_per_token']:.3f} "
            f"experts/token  all-null {metrics['all_null_frac']:.3f}  {wall:.0f} s")
    rows = load_results(results_path)
    write_outputs(cfg, rows, log=log)
    if todo:
        log(f"study {cfg.name}: {len(todo)} runs in {time.time() - study_start:.0f} s")
    return EXIT_OK


# --- summary ---------------------------------------------------------------------------------------------------
def _f(row: dict, key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std, len(values)


def verdict(mean: float, std: float, n: int) -> str:
    """win: mean < 0 by more than 2 std; loss: mean > 0 by more than 2 std; else tie (and n < 2: undecided)."""
    if n < 2 or math.isnan(std):
        return "undecided (fewer than 2 seeds)"
    if mean + 2 * std < 0:
        return "win"
    if mean - 2 * std > 0:
        return "loss"
    return "tie"


def _interp_dense(dense: list[tuple[float, float]], x: float) -> Optional[float]:
    """Loss of the p = 0 arms (k, loss), linearly interpolated in log2(k) at x experts per token (None outside)."""
    dense = sorted(dense)
    for (k0, l0), (k1, l1) in zip(dense, dense[1:]):
        if k0 <= x <= k1 and k1 > k0:
            t = (math.log2(x) - math.log2(k0)) / (math.log2(k1) - math.log2(k0))
            return l0 + t * (l1 - l0)
    if dense and abs(x - dense[0][0]) < 1e-9:
        return dense[0][1]
    return None


def summarize(cfg: QualityConfig, rows: list[dict]) -> dict:
    """The numbers of summary.md, as a dict (per arm, paired comparisons, brackets)."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
    arms = {}
    for a in cfg.arms:
        seeds = by_arm.get(a.name, {})
        loss = _mean_std([_f(r, "eval_loss") for r in seeds.values()])
        realized = _mean_std([_f(r, "realized_experts_per_token") for r in seeds.values()])
        expected = cfg.expected_real(a)
        arms[a.name] = {
            "k": a.num_experts_per_tok, "p": float(a.null_route_frac), "expected": expected,
            "eval_loss": loss, "realized": realized,
            "realized_final": _mean_std([_f(r, "realized_experts_per_token_final") for r in seeds.values()]),
            "all_null": _mean_std([_f(r, "all_null_frac") for r in seeds.values()]),
            "load_violation": _mean_std([_f(r, "load_violation_max_final") for r in seeds.values()]),
            "train_tokens": sorted({r["train_tokens"] for r in seeds.values()}),
            "wall_s": _mean_std([_f(r, "wall_s") for r in seeds.values()]),
            "seeds": sorted(seeds),
            "off_target": (not math.isnan(realized[0]) and a.is_null
                           and abs(realized[0] - expected) / expected > cfg.realized_tolerance),
            "overrides": a.model,
        }
    # paired comparisons against the matched-expected-compute baseline
    dense_names = [a.name for a in cfg.arms if not a.is_null and not a.model]
    paired = {}
    for a in cfg.arms:
        base = cfg.baseline_of(a)
        if base is None:
            continue
        common = sorted(set(by_arm.get(a.name, {})) & set(by_arm.get(base, {})))
        diffs = [_f(by_arm[a.name][s], "eval_loss") - _f(by_arm[base][s], "eval_loss") for s in common]
        m, sd, n = _mean_std(diffs)
        entry = {"baseline": base, "diffs": diffs, "seeds": common, "mean": m, "std": sd, "n": n,
                 "verdict": verdict(m, sd, n)}
        # at realized compute: the p = 0 arms of the same seed, interpolated in log2(k) at the realized value
        rdiffs = []
        for s in sorted(by_arm.get(a.name, {})):
            dense = [(float(cfg.arm(d).num_experts_per_tok), _f(by_arm[d][s], "eval_loss"))
                     for d in dense_names if s in by_arm.get(d, {})]
            ref = _interp_dense(dense, _f(by_arm[a.name][s], "realized_experts_per_token"))
            if ref is not None:
                rdiffs.append(_f(by_arm[a.name][s], "eval_loss") - ref)
        rm, rsd, rn = _mean_std(rdiffs)
        # no p = 0 arms bracketing the realized compute: nothing to compare with (not a seed shortfall)
        rv = verdict(rm, rsd, rn) if len(dense_names) >= 2 else "- (no p = 0 arms to interpolate)"
        entry["realized"] = {"diffs": rdiffs, "mean": rm, "std": rsd, "n": rn, "verdict": rv}
        paired[a.name] = entry
    brackets = None
    pair = cfg.bracket_arms()
    if pair is not None:
        lo, hi = pair
        common = sorted(set(by_arm.get(lo, {})) & set(by_arm.get(hi, {})))
        gaps = [_f(by_arm[lo][s], "eval_loss") - _f(by_arm[hi][s], "eval_loss") for s in common]
        gm, gsd, gn = _mean_std(gaps)
        shares = {}
        for a in cfg.arms:
            per_seed = []
            for s in common:
                if s in by_arm.get(a.name, {}):
                    g = _f(by_arm[lo][s], "eval_loss") - _f(by_arm[hi][s], "eval_loss")
                    if g != 0:
                        per_seed.append((_f(by_arm[lo][s], "eval_loss") - _f(by_arm[a.name][s], "eval_loss")) / g)
            lo_m, hi_m, a_m = arms[lo]["eval_loss"][0], arms[hi]["eval_loss"][0], arms[a.name]["eval_loss"][0]
            of_means = (lo_m - a_m) / (lo_m - hi_m) if (lo_m - hi_m) not in (0,) and not math.isnan(lo_m - hi_m) \
                else float("nan")
            shares[a.name] = {"of_means": of_means, "paired": _mean_std(per_seed)}
        seed_stds = [v["eval_loss"][1] for v in arms.values() if not math.isnan(v["eval_loss"][1])]
        brackets = {"low": lo, "high": hi, "gap": (gm, gsd, gn), "shares": shares,
                    "max_seed_std": max(seed_stds) if seed_stds else float("nan")}
    fingerprints: dict[int, set] = {}
    tokens = set()
    for r in rows:
        fingerprints.setdefault(int(r["seed"]), set()).add(r.get("data_fingerprint"))
        tokens.add(r.get("train_tokens"))
    return {"arms": arms, "paired": paired, "brackets": brackets,
            "same_data_order": all(len(v) == 1 for v in fingerprints.values()),
            "same_train_tokens": len(tokens) <= 1, "train_tokens": sorted(tokens), "n_rows": len(rows)}


def _pm(ms: tuple, digits: int = 4) -> str:
    m, sd = ms[0], ms[1]
    if math.isnan(m):
        return "-"
    if math.isnan(sd):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _signed_pm(m: float, sd: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:+.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def summary_markdown(cfg: QualityConfig, s: dict) -> str:
    lines = [f"# Quality study `{cfg.name}`", ""]
    lines.append(f"{cfg.num_train_steps} steps per run; seeds {list(cfg.seeds)}; base config `{cfg.base_config}`"
                 + (f" with overrides `{json.dumps(cfg.overrides)}`" if cfg.overrides else "")
                 + f"; final eval loss on the held-out split, {cfg.max_eval_batches} fixed eval batches. "
                 f"{s['n_rows']} of {len(cfg.arms) * len(cfg.seeds)} runs done.")
    lines.append(f"Train tokens per run: {', '.join(map(str, s['train_tokens']))}"
                 f" ({'the same for every run' if s['same_train_tokens'] else 'NOT the same for every run'}); data "
                 f"order per seed {'identical across arms' if s['same_data_order'] else 'DIFFERS across arms'} "
                 f"(fingerprint of the first and last training batch). Mean ± std over seeds (sample std).")
    lines += ["", "## Per arm", "",
              "| arm | k | p | expected real experts/token | realized (mean over training) | realized (last step) "
              "| all-null tokens | load violation (last) | eval loss | seeds | wall s/run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in s["arms"].items():
        flag = " ⚠" if a["off_target"] else ""
        extra = f" ({', '.join(f'{k}={v}' for k, v in a['overrides'].items())})" if a["overrides"] else ""
        lines.append(f"| {name}{extra} | {a['k']} | {a['p']:.3g} | {a['expected']:.3f} | {_pm(a['realized'], 3)}{flag} "
                     f"| {_pm(a['realized_final'], 3)} | {_pm(a['all_null'], 3)} | {_pm(a['load_violation'], 3)} "
                     f"| {_pm(a['eval_loss'])} | {len(a['seeds'])} | {_pm(a['wall_s'], 0)} |")
    if s["paired"]:
        lines += ["", "## Null arms against their matched-compute baseline (paired by seed)", "",
                  "Difference = null arm's eval loss - baseline's, same seed (negative: the null arm is better). "
                  "Win only if the mean is below zero by more than 2 std; loss if above zero by more than 2 std; "
                  "else tie.", "",
                  "| arm | baseline | paired diff (expected compute) | verdict | per seed | at realized compute "
                  "| verdict (realized) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, p in s["paired"].items():
            r = p["realized"]
            per_seed = ", ".join(f"{d:+.4f}" for d in p["diffs"])
            lines.append(f"| {name} | {p['baseline']} | {_signed_pm(p['mean'], p['std'])} | **{p['verdict']}** | "
                         f"{per_seed} | {_signed_pm(r['mean'], r['std'])} | {r['verdict']} |")
        lines += ["", "*At realized compute*: against the p = 0 arms of the same seed interpolated (linearly in "
                  "log2 k) at the null arm's realized mean real experts per token."]
        off = [n for n, a in s["arms"].items() if a["off_target"]]
        for n in off:
            a = s["arms"][n]
            lines.append(f"- ⚠ **{n}** realized {a['realized'][0]:.3f} real experts per token against a target of "
                         f"{a['expected']:.3f} ({100 * (a['realized'][0] / a['expected'] - 1):+.1f}%, more than "
                         f"{100 * cfg.realized_tolerance:.0f}% off): compare it at realized compute (last columns).")
        if not off:
            lines.append(f"- Every null arm realized its target within {100 * cfg.realized_tolerance:.0f}%.")
    b = s["brackets"]
    if b is not None:
        gm, gsd, gn = b["gap"]
        lines += ["", f"## Share of the bracket gap ({b['low']} -> {b['high']})", "",
                  f"Bracket gap (eval loss of {b['low']} - {b['high']}, paired by seed): {_signed_pm(gm, gsd)} "
                  f"over {gn} seeds; the largest per-arm seed std is {b['max_seed_std']:.4f}"
                  + (f", so the gap is {gm / b['max_seed_std']:.1f}x the seed noise."
                     if b['max_seed_std'] and not math.isnan(b['max_seed_std']) and not math.isnan(gm) else "."),
                  "", "Share = (loss(k_low) - loss(arm)) / (loss(k_low) - loss(k_high)): 0 = no better than k_low, "
                  "1 = as good as k_high.", "",
                  "| arm | expected real experts/token | share (of means) | share (paired, per seed) |",
                  "| --- | --- | --- | --- |"]
        for name, sh in b["shares"].items():
            pm = sh["paired"]
            share_txt = "-" if math.isnan(sh["of_means"]) else f"{sh['of_means']:.2f}"
            lines.append(f"| {name} | {s['arms'][name]['expected']:.3f} | {share_txt} | {_pm(pm, 2)} |")
    lines += ["", "Plots: `eval_loss_vs_step.png`, `eval_loss_vs_experts.png`. Per-run rows: `results.csv`.", ""]
    return "\n".join(lines)


def _curves(out_dir: str, cfg: QualityConfig, rows: list[dict]) -> dict[str, dict[int, list]]:
    curves: dict[str, dict[int, list]] = {}
    for r in rows:
        path = os.path.join(out_dir, "runs", r["run_id"], "metrics.json")
        try:
            with open(path) as f:
                curves.setdefault(r["arm"], {})[int(r["seed"])] = json.load(f)["eval_curve"]
        except (OSError, ValueError, KeyError):
            continue
    return curves


def plot(cfg: QualityConfig, rows: list[dict], s: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = _curves(out_dir, cfg, rows)
    fig, (ax_all, ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    half = cfg.num_train_steps // 2
    for a in cfg.arms:
        per_seed = curves.get(a.name, {})
        if not per_seed:
            continue
        steps = sorted(set.intersection(*[{int(st) for st, _ in c} for c in per_seed.values()]))
        by_step = [{int(x): y for x, y in c} for c in per_seed.values()]
        means = [statistics.fmean(d[st] for d in by_step) for st in steps]
        style = "--" if a.is_null else "-"
        label = f"{a.name} (k={a.num_experts_per_tok}, p={a.null_route_frac:.2g})"
        ax_all.plot([st + 1 for st in steps], means, style, marker="o", ms=3, label=label)
        late = [(st, m) for st, m in zip(steps, means) if st + 1 >= half]
        ax.plot([st + 1 for st, _ in late], [m for _, m in late], style, marker="o", ms=3, label=label)
    ax_all.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax_all.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax_all.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax_all.set_title("whole run")
    ax.set_title(f"second half (steps >= {half})")
    for axis in (ax_all, ax):
        axis.set_xlabel("step")
        axis.set_ylabel("held-out eval loss (mean over seeds)")
        axis.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{cfg.name}: eval loss vs step")
    fig.tight_layout()
    path = os.path.join(out_dir, "eval_loss_vs_step.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = sorted((a for a in cfg.arms if not a.is_null and not a.model), key=lambda a: a.num_experts_per_tok)
    xs = [s["arms"][a.name]["expected"] for a in dense if s["arms"][a.name]["seeds"]]
    ys = [s["arms"][a.name]["eval_loss"][0] for a in dense if s["arms"][a.name]["seeds"]]
    if xs:
        ax.plot(xs, ys, "-", color="gray", alpha=0.6, label="p = 0 (fixed top-k)")
    for a in cfg.arms:
        st = s["arms"][a.name]
        if not st["seeds"]:
            continue
        m, sd = st["eval_loss"][0], st["eval_loss"][1]
        err = None if math.isnan(sd) else sd
        line = ax.errorbar([st["expected"]], [m], yerr=err, fmt="o" if not a.is_null else "s", capsize=3,
                           label=f"{a.name}")
        if a.is_null and not math.isnan(st["realized"][0]):
            ax.plot([st["realized"][0]], [m], marker="s", mfc="none", color=line[0].get_color(), ls="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real experts per token (filled: expected; hollow: realized)")
    ax.set_ylabel("final held-out eval loss (mean ± std over seeds)")
    ax.set_title(f"{cfg.name}: quality vs expert compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = os.path.join(out_dir, "eval_loss_vs_experts.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def write_outputs(cfg: QualityConfig, rows: list[dict], *, log=print) -> None:
    out_dir = os.path.abspath(cfg.out_dir)
    s = summarize(cfg, rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(cfg, s))
    if rows:
        plot(cfg, rows, s, out_dir)
    log(f"wrote {os.path.join(cfg.out_dir, 'summary.md')} ({len(rows)} runs)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = parse_config(args)
        return run_study(cfg)
    except ConfigError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
