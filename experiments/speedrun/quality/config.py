"""The study's config: arms, seeds, token budget, eval, time budget; validated when parsed (one-line errors).

An arm's model is validated as the training CLI would build it: the base config's ``model`` section, the study's
``model.*`` overrides, the arm's own ``model`` overrides and its k and p, decoded into the registered ``LmConfig``
(``null_mixtral``: ``experiments.speedrun.custom_mixtral.MixtralConfig``) by draccus, so every field the model
class has is accepted and checked by its ``__post_init__`` (no list of allowed keys here). What an arm may *not*
change is a policy of the study (``ARM_FORBIDDEN_MODEL``: what would break "same token budget, optimizer, aux
losses"), not a list of fields.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "ARM_FORBIDDEN_MODEL",
    "Arm",
    "CONTROLLED",
    "ConfigError",
    "QualityConfig",
    "one_line",
    "parse_config",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Set per run by the study: overriding them would break the study's pairing or bookkeeping.
CONTROLLED = {
    "trainer.id", "trainer.seed", "data_seed", "trainer.num_train_steps", "trainer.steps_per_eval",
    "trainer.max_eval_batches", "trainer.checkpointer.base_path", "trainer.tracker.group", "trainer.tracker.name",
    "trainer.tracker.mode", "model.num_experts_per_tok", "model.null_route_frac", "progress_every",
}
# What an arm may change besides k and p (anything else would break "same token budget, optimizer, aux losses").
ARM_FORBIDDEN_MODEL = {"num_experts_per_tok", "null_route_frac", "lbl_coef", "rzl_coef", "seq_len"}


class ConfigError(Exception):
    """A configuration problem; the message is one line naming the field."""


def one_line(message: Any) -> str:
    return " ".join(str(message).split())


@dataclass(frozen=True)
class Arm:
    """One arm: k slots per token with a null fraction p, plus optional model overrides for this arm only.

    baseline: the p = 0 arm at the same expected real experts per token (None: the p = 0 arm whose k equals this
        arm's expected real experts per token, if there is one).
    model: extra ``--model.<key> <value>`` overrides for this arm, e.g. ``{renormalize_real: false}``: any field of
        the model config, validated as the model validates it.
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


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = tree.get(p)
        if not isinstance(child, dict):
            child = tree[p] = {}
        tree = child
    tree[parts[-1]] = value


@dataclass(frozen=True)
class QualityConfig:
    """The study (see ``experiments/speedrun/null_quality.py`` and docs/TRAINING.md, *Quality study*).

    name: study name: the W&B group and the prefix of every run id.
    base_config: the training YAML every run starts from (its model shape, data, optimizer, trainer).
    overrides: dotted training-config overrides applied to every run (``{model.hidden_dim: 128}``).
    arms, seeds, num_train_steps: what is trained.
    order: the order the runs start in, so that a study cut short by its time budget loses the least: ``seed``
        (default: seed by seed, the arms in their listed order within each) or ``arm`` (arm by arm in the listed
        order, every seed of an arm before the next arm: the first two arms' paired comparison is complete first).
        List the arms in order of importance.
    steps_per_eval: held-out eval every this many steps (default num_train_steps // 4); the last step always
        evaluates. max_eval_batches: the fixed number of held-out batches every eval reads (the same batches for
        every arm).
    brackets: [k_low arm, k_high arm], both p = 0 (default: the p = 0 arms with the smallest and largest k).
    realized_tolerance: relative distance of realized from expected real experts per token beyond which the
        summary flags a null arm and compares it at realized compute too.
    wandb_mode: offline (default), online or disabled. keep_checkpoints: keep each finished run's checkpoints.
    run_timeout_s: kill a run after this many seconds (None: no limit).
    time_budget_s: wall-clock budget of the whole study command, counted from its start (None: no limit). A run
        predicted not to finish inside it is not started (``runner.predict_wall_s``: the same arm's wall time in
        this command, else the finished runs' largest start-up time plus the arm's training FLOPs at their lowest
        FLOP rate; the first runs always start); a run still going when it ends is stopped. Either way the run is listed as cut in summary.md,
        a later (cheaper) run may still fit, and the study exits 0 with what it has.
    parallel_runs: how many runs train at once (default 1). On one accelerator they share it (each process gets
        0.9 / parallel_runs of its memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set): start-up and compiles,
        which are CPU work, overlap with the others' training. Runs still start in the study's order.
    plots: write the two PNG figures (matplotlib).
    """

    name: str = "cpu_study"
    base_config: str = "configs/speedrun/tiny_cpu.yaml"
    overrides: Dict[str, Any] = field(default_factory=dict)
    arms: List[Arm] = field(default_factory=_default_arms)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    order: str = "seed"
    num_train_steps: int = 400
    steps_per_eval: Optional[int] = None
    max_eval_batches: int = 16
    brackets: Optional[List[str]] = None
    out_dir: str = "out/quality/cpu_study"
    realized_tolerance: float = 0.05
    wandb_mode: str = "offline"
    keep_checkpoints: bool = False
    run_timeout_s: Optional[float] = None
    time_budget_s: Optional[float] = None
    parallel_runs: int = 1
    plots: bool = True

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
                if key in ARM_FORBIDDEN_MODEL:
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
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s!r}")
        if self.order not in ("seed", "arm"):
            raise ValueError(f"order must be seed or arm, got {self.order!r}")
        if isinstance(self.parallel_runs, bool) or not isinstance(self.parallel_runs, int) or self.parallel_runs < 1:
            raise ValueError(f"parallel_runs must be a positive integer, got {self.parallel_runs!r}")
        for key in self.overrides:
            if key in CONTROLLED:
                raise ValueError(f"overrides.{key} is set by the study per run; use the study's own field")
            if key.startswith("model.") and key[len("model."):] in ("num_experts_per_tok", "null_route_frac"):
                raise ValueError(f"overrides.{key}: k and p are per arm")
        if not os.path.isfile(self.base_config):
            raise ValueError(f"base_config not found: {self.base_config}")
        # Every arm's model config, built as the training CLI builds it: unknown fields, k > N, p out of [0, 1) ...
        for a in self.arms:
            self.model_config(a)
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
        """The base config's ``model`` section with the study's ``model.*`` overrides applied."""
        import yaml

        with open(self.base_config) as f:
            base = yaml.safe_load(f) or {}
        model = copy.deepcopy(dict(base.get("model") or {}))
        for key, value in self.overrides.items():
            if key.startswith("model."):
                _set_dotted(model, key[len("model."):], value)
        return model

    def model_config(self, arm: Arm):
        """The arm's model config (``LmConfig`` subclass named by the base config's ``model.type``), decoded by
        draccus from the base fields, the study's and the arm's overrides and the arm's k and p; raises
        ``ValueError`` naming the arm and the field."""
        import draccus
        from draccus.utils import DecodingError, ParsingError
        from levanter.models.lm_model import LmConfig

        import experiments.speedrun.custom_mixtral  # noqa: F401  (registers null_mixtral)

        fields = self.base_model_fields()
        for key, value in arm.model.items():
            _set_dotted(fields, key, value)
        fields["num_experts_per_tok"] = arm.num_experts_per_tok
        fields["null_route_frac"] = float(arm.null_route_frac)
        try:
            return draccus.decode(LmConfig, fields)
        except DecodingError as e:
            where = ".".join(str(k) for k in e.key_path)
            raise ValueError(f"arms.{arm.name}: model.{where}: {one_line(e.message)}" if where
                             else f"arms.{arm.name}: model: {one_line(e.message)}") from None
        except ParsingError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            raise ValueError(f"arms.{arm.name}: {one_line(cause)}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"arms.{arm.name}: {one_line(e)}") from None

    def moe_config(self, arm: Arm):
        """The arm's ``NullMoEConfig``, as its model builds it."""
        return self.model_config(arm).moe_config()

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

    def run_order(self) -> list[tuple[Arm, int]]:
        """Every (arm, seed) in the order the study starts them (``order``)."""
        if self.order == "arm":
            return [(a, s) for a in self.arms for s in self.seeds]
        return [(a, s) for s in self.seeds for a in self.arms]

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
        raise ConfigError(one_line(cause) if cause is not None else one_line(e)) from None
    except Exception as e:  # bad YAML and the like
        raise ConfigError(one_line(f"{type(e).__name__}: {e}")) from None
