"""What the training CLI adds to every step: a progress line and the realized compute (``RunMonitor``).

``RunMonitor`` wraps the run's tracker (W&B by default) and sees every log call of the trainer. When a step's
throughput numbers arrive (Levanter logs them after the step's loss and routing stats) it

- adds the *realized* compute of that step to the same log call, next to Levanter's estimate (all forward +
  backward, i.e. 3 x forward, per token):

  - ``throughput/realized_expert_flops_per_token``: 3 x 2 x 3 x D x F x (sum over layers of
    ``moe/layer{i}/experts_per_token``), the routed-expert FLOPs;
  - ``throughput/realized_flops_per_token``: 3 x ``flops_per_token`` with k (1 - p) replaced by the realized mean
    ``moe/experts_per_token``;
  - ``throughput/expected_flops_per_token``: 3 x ``flops_per_token``, what Levanter's throughput and MFU use
    (``throughput/flops_per_example`` / seq_len);
  - ``throughput/realized_gflops_per_second``: realized FLOPs per token x ``throughput/tokens_per_second``;
  - ``throughput/realized_mfu``: the same against the hardware peak where Levanter knows one
    (``throughput/theoretical_flops``: TPU, GPU; not CPU);

- prints one progress line (``step 12/200  loss 5.8123  tok/s 9,870  null_frac 0.468  experts/tok 1.06 ...``)
  every ``every`` steps, plus the first and the last step this process runs and every step with an eval loss
  (an eval logged after its step's line, as at the end of a run, gets a short ``step N/M  eval_loss X`` line);
- remembers the last step it saw, so the CLI can tell a finished run from one whose data ran out.

The FLOP arithmetic is ``MixtralConfig.expert_flops_per_assignment`` and ``MixtralConfig.flops_per_token``; nothing
here knows about routing. Models without them (another ``LmConfig``) get the progress lines only.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, TextIO

from levanter.tracker import Tracker

__all__ = ["RunMonitor", "default_progress_every"]


def default_progress_every(num_train_steps: int) -> int:
    """Every step for runs up to 100 steps, then about 100 lines per run."""
    return max(1, num_train_steps // 100)


def _scalar(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RunMonitor(Tracker):
    """Forwards to ``inner``; adds the realized-compute keys and prints progress lines (module docstring)."""

    def __init__(
        self,
        inner: Tracker,
        *,
        model_config: Any,
        vocab_size: int,
        num_train_steps: int,
        every: Optional[int] = None,
        hparams: Optional[dict] = None,
        out: Optional[TextIO] = None,
        exit_code_if_incomplete: Optional[int] = None,
    ):
        self.inner = inner
        self.name = getattr(inner, "name", "monitor")
        self.model_config = model_config
        self.vocab_size = vocab_size
        self.num_train_steps = num_train_steps
        self.every = every if every is not None else default_progress_every(num_train_steps)
        if self.every < 1:
            raise ValueError(f"progress_every must be >= 1, got {self.every}")
        self.out = out
        self.exit_code_if_incomplete = exit_code_if_incomplete
        self.last_step: Optional[int] = None
        self.theoretical_flops: Optional[float] = None
        self._row: dict[str, float] = {}
        self._row_step: Optional[int] = None
        self._printed_step: Optional[int] = None
        self._first_step: Optional[int] = None
        self._is_primary: Optional[bool] = None
        self._flops = hasattr(model_config, "expert_flops_per_assignment") and hasattr(model_config, "num_layers")
        if hparams:
            inner.log_hyperparameters(hparams)

    # --- realized compute ----------------------------------------------------------------------------------------
    def realized_metrics(self, row: Mapping[str, float]) -> dict[str, float]:
        """The realized-compute keys for one step's logged values (empty without routing stats)."""
        if not self._flops:
            return {}
        cfg = self.model_config
        L = cfg.num_layers
        per_layer = [row.get(f"moe/layer{i}/experts_per_token") for i in range(L)]
        if all(v is not None for v in per_layer):
            total = float(sum(per_layer))  # type: ignore[arg-type]
        elif row.get("moe/experts_per_token") is not None:
            total = L * float(row["moe/experts_per_token"])
        else:
            return {}
        realized = 3.0 * cfg.flops_per_token(self.vocab_size, real_experts_per_token=total / L)
        out = {
            "throughput/realized_expert_flops_per_token": 3.0 * cfg.expert_flops_per_assignment * total,
            "throughput/realized_flops_per_token": realized,
            "throughput/expected_flops_per_token": 3.0 * cfg.flops_per_token(self.vocab_size),
        }
        tokens_per_second = row.get("throughput/tokens_per_second")
        if tokens_per_second:
            out["throughput/realized_gflops_per_second"] = realized * tokens_per_second / 1e9
            if self.theoretical_flops:
                out["throughput/realized_mfu"] = realized * tokens_per_second / self.theoretical_flops * 100.0
        return out

    # --- progress lines ------------------------------------------------------------------------------------------
    def _primary(self) -> bool:
        if self._is_primary is None:
            import jax

            self._is_primary = jax.process_index() == 0
        return self._is_primary

    def progress_line(self, step: int, row: Mapping[str, float]) -> str:
        parts = [f"step {step + 1}/{self.num_train_steps}"]

        def add(key: str, fmt: str) -> None:
            value = row.get(key)
            if value is not None:
                parts.append(fmt.format(value))

        add("train/loss", "loss {:.4f}")
        add("eval/loss", "eval_loss {:.4f}")
        add("throughput/tokens_per_second", "tok/s {:,.0f}")
        add("moe/null_frac", "null_frac {:.3f}")
        add("moe/experts_per_token", "experts/tok {:.3f}")
        add("moe/null_bias", "null_bias {:+.3f}")
        add("throughput/realized_gflops_per_second", "realized {:.2f} GFLOP/s")
        add("throughput/mfu", "mfu {:.1f}%")
        add("throughput/realized_mfu", "realized_mfu {:.1f}%")
        return "  ".join(parts)

    def _maybe_print(self, step: int, *, force: bool = False) -> None:
        if self._printed_step == step:
            return
        due = (force or step == self._first_step or (step + 1) % self.every == 0 or step + 1 >= self.num_train_steps
               or "eval/loss" in self._row)
        if not due or not self._primary():
            return
        self._printed_step = step
        out = self.out if self.out is not None else sys.stdout
        print(self.progress_line(step, self._row), file=out, flush=True)

    # --- Tracker -------------------------------------------------------------------------------------------------
    def log(self, metrics, *, step, commit=None):
        if step is None:
            self.inner.log(metrics, step=step, commit=commit)
            return
        step = int(step)
        if step != self._row_step:
            if self._row_step is not None and self._printed_step != self._row_step:
                self._maybe_print(self._row_step)
            self._row, self._row_step = {}, step
            if self._first_step is None:
                self._first_step = step
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        for key, value in metrics.items():
            number = _scalar(value)
            if number is not None:
                self._row[key] = number
        extra: dict[str, float] = {}
        if "throughput/tokens_per_second" in metrics:  # Levanter's throughput hook: the step's last numbers
            extra = self.realized_metrics(self._row)
            self._row.update(extra)
            self._maybe_print(step)
        elif "eval/loss" in metrics and self._printed_step == step and self._primary():
            # an eval after the step's line (Levanter's forced end-of-run hooks): a short line of its own
            eval_line = f"step {step + 1}/{self.num_train_steps}  eval_loss {self._row['eval/loss']:.4f}"
            print(eval_line, file=self.out if self.out is not None else sys.stdout, flush=True)
        self.inner.log({**metrics, **extra} if extra else metrics, step=step, commit=commit)

    def log_hyperparameters(self, hparams):
        self.inner.log_hyperparameters(hparams)

    def log_summary(self, metrics):
        value = _scalar(metrics.get("throughput/theoretical_flops")) if hasattr(metrics, "get") else None
        if value:
            self.theoretical_flops = value
        self.inner.log_summary(metrics)

    def log_artifact(self, artifact_path, *, name=None, type=None):
        self.inner.log_artifact(artifact_path, name=name, type=type)

    @property
    def steps_done(self) -> Optional[int]:
        """Steps completed by the end of this process's training (None if it saw none)."""
        return None if self.last_step is None else self.last_step + 1

    def finish(self):
        if self._row_step is not None:
            self._maybe_print(self._row_step, force=True)
        done = self.steps_done
        if done is not None and done < self.num_train_steps:
            # the trainer returned early: its data loader ran out. Say so in the run, and fail it where we can.
            self.inner.log_summary({"run/steps_done": done, "run/data_exhausted": True})
            run = getattr(self.inner, "run", None)
            if self.exit_code_if_incomplete is not None and run is not None and hasattr(run, "finish"):
                run.finish(exit_code=self.exit_code_if_incomplete)  # W&B: the run is marked failed
                return
        self.inner.finish()

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)
