"""The training CLI: Levanter's ``train_lm`` with the ``null_mixtral`` model, offline, with progress and clear exits.

    python -m experiments.speedrun.train --config_path configs/speedrun/tiny_cpu.yaml \\
        [--trainer.num_train_steps 80] [--model.null_route_frac 0.3] [--trainer.id my-run] ...
    # python -m experiments.speedrun.custom_mixtral ... is the same command

What it does, in order:

1. Host allocator: on a CPU-only JAX the process re-executes itself with glibc's resident-allocator tunables
   (``null_moe.host_malloc``: XLA:CPU's per-call buffers are not page-faulted in again on every step), before JAX
   initialises. ``NULL_MOE_HOST_MALLOC=default`` (or ``resident`` / ``auto``) overrides; the mode that ran is
   printed and logged to the run config as ``host/malloc``.
2. Parses the config: Levanter's ``TrainLmConfig`` with ``trainer.tracker`` typed as one tracker config, so
   ``--trainer.tracker.mode online`` / ``--trainer.tracker.project X`` work (Levanter types the field as a union of
   a tracker and a tuple of trackers, and draccus cannot address fields inside a union), plus ``progress_every``.
   A bad value, an unknown or mistyped field or a missing config file ends here with one line,
   ``error: model.null_route_frac must be in [0, 1), got 1.5``, and exit code 2, before any compute.
   ``preflight`` then checks what Levanter would only find out later, with the same one-line exit 2: a
   learning-rate schedule that does not fit ``num_train_steps`` (``error: optimizer.warmup=10 steps must be below
   trainer.num_train_steps=4 ...``; optax would fail after W&B started) and a device count the trainer mesh cannot
   use. On a CPU-only JAX a mesh of more than one device makes the process re-execute itself once more with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N: the config's ``cpu_devices``, else the fewest the mesh
   takes), saying so in one line; elsewhere too few devices is ``error: the trainer mesh needs a multiple of 4
   devices per slice (...), found 1 gpu device``.
3. Offline: ``HF_HUB_OFFLINE=1`` and friends; builds the local corpus, tokenizer and token caches on first use
   (``local_data.ensure_local_data``).
4. A run id whose checkpoint already reached ``num_train_steps`` is complete: it prints
   ``run <id> already complete at step N (num_train_steps=N); nothing to do`` and exits 0 without training.
5. With ``model.null_control: bias``, wraps the optimizer so that each MoE layer's null bias moves by exactly
   ``null_bias_rate x (p - realized null fraction)`` per step (``null_bias.install``).
6. Trains through ``train_lm.main`` with the workarounds of ``levanter_pin_workarounds`` (last-step checkpoint,
   routing stats in the right W&B row, deletable temporary checkpoints, ``<id>.log``) and ``monitor.RunMonitor``
   (a progress line per step, realized-compute metrics).
7. If the data loader ran out before ``num_train_steps``, prints ``error: the training data ran out after N of
   num_train_steps=M steps ...`` and exits 3 (no end-of-run checkpoint; the W&B run is marked failed).

Exit codes: 0 trained (or already complete), 2 configuration error, 3 data ran out, 1 anything else (a traceback).
"""


import contextlib
import dataclasses
import functools
import io
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "EXIT_CONFIG_ERROR",
    "EXIT_DATA_EXHAUSTED",
    "HOST_MALLOC_ENV",
    "cli_config_class",
    "completed_steps",
    "main",
    "parse_config",
    "run_training",
]

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_DATA_EXHAUSTED = 3
HOST_MALLOC_ENV = "NULL_MOE_HOST_MALLOC"


class ConfigError(Exception):
    """A configuration problem, with a one-line message naming the field."""


def _error(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def _offline_env() -> None:
    # Nothing may reach the Hugging Face hub; the tokenizer and corpus are local paths.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --- the config --------------------------------------------------------------------------------------------------
@functools.cache
def cli_config_class() -> type:
    """The CLI's config class (built on first use: importing Levanter is slow, and the CLI re-executes itself for
    the host allocator before it does).

    ``TrainConfig`` is Levanter's ``TrainLmConfig`` with these changes: ``trainer`` is a ``TrainerConfig`` whose
    ``tracker`` is one ``TrackerConfig`` (a draccus choice type, so ``--trainer.tracker.<field>`` overrides parse;
    Levanter's ``TrackerConfig | Tuple[TrackerConfig, ...]`` takes only a whole value), ``progress_every``: print
    a progress line every N steps (default ``max(1, num_train_steps // 100)``), and ``cpu_devices``: on a CPU-only
    JAX, how many devices to simulate for the trainer mesh (default: the fewest it takes; ``preflight``).
    """
    from dataclasses import dataclass, field

    from levanter.main.train_lm import TrainLmConfig
    from levanter.tracker import TrackerConfig
    from levanter.tracker.wandb import WandbConfig
    from levanter.trainer import TrainerConfig as LevanterTrainerConfig

    import experiments.speedrun.custom_mixtral  # noqa: F401  (registers the null_mixtral model type)

    @dataclass
    class TrainerConfig(LevanterTrainerConfig):
        tracker: TrackerConfig = field(default_factory=WandbConfig)

    @dataclass
    class TrainConfig(TrainLmConfig):
        trainer: TrainerConfig = field(default_factory=TrainerConfig)
        progress_every: Optional[int] = None
        cpu_devices: Optional[int] = None

    TrainerConfig.__module__ = TrainConfig.__module__ = __name__
    TrainerConfig.__qualname__, TrainConfig.__qualname__ = "TrainerConfig", "TrainConfig"
    return TrainConfig


def _instantiation_error(exc: BaseException) -> Optional[str]:
    """For draccus' "Couldn't instantiate class X": the failing config's dotted path and the underlying message,
    e.g. ``model.null_route_frac must be in [0, 1), got 1.5`` (the path is read from draccus' decode frames)."""
    cause = exc.__cause__
    if cause is None:
        return None
    path: tuple = ()
    cls = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "decode_dataclass" and "path" in frame.f_locals:
            path, cls = tuple(frame.f_locals["path"]), frame.f_locals.get("cls")
        tb = tb.tb_next
    message = " ".join(str(cause).split())
    prefix = ".".join(path)
    if not prefix:
        return message
    names = set()
    try:
        import typing

        origin = typing.get_origin(cls) or cls
        names = {f.name for f in dataclasses.fields(origin)}
    except TypeError:
        pass
    first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
    if first and first.group(0) in names:
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def _config_path_arg(args: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == "--config_path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None


def parse_config(args: Sequence[str]) -> Any:
    """Parses ``--config_path X.yaml --a.b value ...`` into the CLI's config (``cli_config_class()``).

    Raises ``ConfigError`` with a one-line message for a bad value, an unknown or mistyped field, bad YAML or a
    missing config file. ``--help`` prints the usage and raises ``SystemExit(0)``.
    """
    import levanter.config
    import yaml
    from draccus.utils import DecodingError, ParsingError

    config_class = cli_config_class()

    def _identity(config):
        return config

    _identity.__annotations__ = {"config": config_class}  # levanter.config.main reads the config class from here
    config_path = _config_path_arg(args)
    captured = io.StringIO()  # argparse prints its whole usage before the error; keep only the error line
    ok = False
    try:
        with contextlib.redirect_stderr(captured):
            config = levanter.config.main(_identity, args=list(args))()
        ok = True
        return config
    except SystemExit as e:
        if e.code in (0, None):
            ok = True
            raise
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        last = lines[-1] if lines else f"invalid arguments (exit {e.code})"
        raise ConfigError(last.split("error: ", 1)[-1]) from None
    except DecodingError as e:
        where = ".".join(e.key_path)
        raise ConfigError(f"{where}: {e.message}" if where else e.message) from None
    except ParsingError as e:
        raise ConfigError(_instantiation_error(e) or str(e)) from None
    except FileNotFoundError as e:
        missing = e.filename or config_path
        if config_path is not None and missing == config_path:
            raise ConfigError(f"config file not found: {config_path}") from None
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {config_path}: {e}") from None
    finally:
        if ok:
            sys.stderr.write(captured.getvalue())


# --- checkpoints of an existing run ------------------------------------------------------------------------------
def _run_id(config) -> Optional[str]:
    return config.trainer.id or os.environ.get("RUN_ID")


def completed_steps(config) -> Optional[int]:
    """Steps completed by the latest checkpoint of this run id (None: no id, no checkpoint, or loading is off).

    Levanter names a checkpoint after the index of the last step it holds (``step-15`` after 16 steps)."""
    from levanter.checkpoint import _load_metadata, discover_latest_checkpoint
    from levanter.utils import fsspec_utils

    run_id = _run_id(config)
    if run_id is None or config.trainer.load_checkpoint is False:
        return None
    path = config.trainer.load_checkpoint_path or config.trainer.checkpointer.expanded_path(run_id)
    if not fsspec_utils.exists(path):
        return None
    latest = discover_latest_checkpoint(path)
    if latest is None:
        return None
    return int(_load_metadata(latest)["step"]) + 1


# --- training ----------------------------------------------------------------------------------------------------
def _wrap_tracker_init(trainer_config, wrap) -> None:
    """Makes ``trainer.tracker.init(run_id)`` return ``wrap(tracker)``. Set on the instance: the config's fields
    (what Levanter logs and dumps) do not change, and any tracker type gets the wrapper."""
    tracker_config = trainer_config.tracker
    if isinstance(tracker_config, Sequence):
        raise ConfigError("trainer.tracker: this CLI takes one tracker config, not a list")
    base_init = tracker_config.init

    def init(run_id):
        return wrap(base_init(run_id))

    object.__setattr__(tracker_config, "init", init)


def run_training(config, *, cli: bool = False) -> int:
    """Runs one training job from a parsed config; returns the exit code (see the module docstring). ``cli``: called
    by the command line, which could simulate CPU devices (only changes the wording of a device error)."""
    from experiments.speedrun import preflight

    preflight.check_lr_schedule(config.optimizer, config.trainer.num_train_steps)
    preflight.check_devices_here(config, simulated_here=cli)

    from levanter.main import train_lm

    from experiments.speedrun import levanter_pin_workarounds as pin
    from experiments.speedrun import null_bias
    from experiments.speedrun.local_data import ensure_local_data
    from experiments.speedrun.monitor import RunMonitor
    from null_moe.host_malloc import current_mode

    _offline_env()
    host_malloc = current_mode()
    print(f"host_malloc={host_malloc} (glibc resident-allocator tunables "
          f"{'on' if host_malloc == 'resident' else 'off'}; {HOST_MALLOC_ENV}=default|resident|auto overrides)",
          flush=True)
    num_train_steps = int(config.trainer.num_train_steps)
    every = getattr(config, "progress_every", None)
    if every is not None and every < 1:
        raise ConfigError(f"progress_every must be >= 1, got {every}")
    try:
        ensure_local_data(config.data)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None

    pin.apply_newer_jax_workarounds()
    pin.h200_flops_known()
    pin.absolute_checkpoint_paths(config)
    done = completed_steps(config)
    if done is not None and done >= num_train_steps:
        run_id = _run_id(config)
        if done == num_train_steps:
            print(f"run {run_id} already complete at step {done} (num_train_steps={num_train_steps}); nothing to do",
                  flush=True)
        else:
            print(f"run {run_id} already complete at step {done}, past num_train_steps={num_train_steps}; nothing "
                  f"to do (a larger --trainer.num_train_steps extends it)", flush=True)
        return EXIT_OK

    pin.with_final_checkpoint(config)
    null_bias.install(config)  # null_control: bias -> the controller's exact update rule in the optimizer step
    vocab_size = len(config.data.the_tokenizer)
    monitors: list[RunMonitor] = []

    def wrap(tracker):
        monitor = RunMonitor(
            tracker, model_config=config.model, vocab_size=vocab_size, num_train_steps=num_train_steps, every=every,
            hparams={"host/malloc": host_malloc}, exit_code_if_incomplete=EXIT_DATA_EXHAUSTED,
        )
        monitors.append(monitor)
        return pin.StepAlignedTracker(monitor)

    _wrap_tracker_init(config.trainer, wrap)
    no_steps = False
    try:
        with pin.log_file_named_after_run_id():
            train_lm.main(config)
    except RuntimeError as e:
        if "No training steps were executed" not in str(e):
            raise
        no_steps = True  # resumed at a point where the loader has nothing left
    finally:
        pin.wait_for_checkpointers()

    seen = [m.steps_done for m in monitors if m.steps_done is not None]
    steps_done = max(seen) if seen else (done or 0)
    if no_steps or steps_done < num_train_steps:
        _error(
            f"the training data ran out after {steps_done} of num_train_steps={num_train_steps} steps: the corpus "
            f"is too small for this run (more data, data epochs via --epoch, or fewer steps); the run is incomplete "
            f"and no end-of-run checkpoint was written"
        )
        return EXIT_DATA_EXHAUSTED
    return EXIT_OK


def main(args: Optional[Sequence[str]] = None) -> int:
    """``python -m experiments.speedrun.train --config_path X.yaml [--a.b value ...]``; returns the exit code.

    Called with ``args`` (tests, other Python code) it runs in this process as it is: no re-execution for the
    allocator or for simulated CPU devices."""
    cli = args is None
    if cli:
        from null_moe.host_malloc import HOST_MALLOC_MODES, reexec_if_needed

        mode = os.environ.get(HOST_MALLOC_ENV, "auto")
        if mode not in HOST_MALLOC_MODES:
            _error(f"{HOST_MALLOC_ENV} must be one of {HOST_MALLOC_MODES}, got {mode!r}")
            return EXIT_CONFIG_ERROR
        reexec_if_needed(mode)  # first thing: glibc reads the tunables at process start
        args = sys.argv[1:]
    _offline_env()
    try:
        config = parse_config(args)
        if cli:
            from experiments.speedrun import preflight

            preflight.check_lr_schedule(config.optimizer, config.trainer.num_train_steps)  # before the re-exec line
            preflight.reexec_for_cpu_devices(config)
        return run_training(config, cli=cli)
    except ConfigError as e:
        _error(str(e))
        return EXIT_CONFIG_ERROR
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
