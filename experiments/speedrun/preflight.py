"""Checks the training CLI runs on a parsed config before anything starts (no data, no W&B, no compile).

Two concerns, each a one-line ``ConfigError`` (exit code 2) instead of an error deep inside Levanter or optax:

- **The learning-rate schedule** (:func:`check_lr_schedule`). Levanter's ``OptimizerConfig.lr_scheduler`` splits
  ``num_train_steps`` into cycles (``cycles`` / ``cycle_length`` / ``haps``; one by default), each into warmup,
  stable and decay phases. ``warmup`` / ``rewarmup`` / ``decay`` / ``cooldown`` are fractions of the cycle (of the
  run, for ``cooldown``) when <= 1 and whole steps when > 1 (so ``warmup: 1`` is the *whole* cycle). A phase in
  steps that is as long as the run leaves no decay steps, and ``cosine`` then fails in optax ("requires positive
  decay_steps, got decay_steps=-6") after W&B has started. Fractions scale with the run, so the shipped configs
  use them and work at any step count.
- **The devices the trainer mesh needs** (:func:`device_need`, :func:`check_devices`,
  :func:`reexec_for_cpu_devices`). Levanter's mesh is (replica, data, model) within a slice: a slice's device
  count must be a multiple of ``replica_ici_axis_size x model_axis_size`` (data takes the rest), and the slice
  count a multiple of ``replica_dcn_axis_size``; otherwise Levanter dies in an assertion. On a CPU-only JAX the
  CLI gives itself simulated devices (``--xla_force_host_platform_device_count``, read when JAX starts, hence a
  re-execution); elsewhere it stops with the devices needed and found.

How many CPU devices to simulate: the config's ``cpu_devices`` (the CLI's own field; e.g. 8 in
``tiny_cpu_ep.yaml`` for its replica 4 x data 2 mesh), else the fewest the mesh takes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from experiments.speedrun.train import ConfigError

__all__ = [
    "DEVICE_FLAG",
    "DeviceNeed",
    "check_devices",
    "check_devices_here",
    "check_lr_schedule",
    "device_need",
    "flag_device_count",
    "reexec_for_cpu_devices",
]

DEVICE_FLAG = "--xla_force_host_platform_device_count"


# --- learning-rate schedule --------------------------------------------------------------------------------------
def _steps(value, total: int) -> int:
    """Levanter's ``_convert_frac_or_steps``: <= 1 is a fraction of ``total``, > 1 whole steps."""
    return int(value * total) if value <= 1.0 else int(value)


def _is_steps(value) -> bool:
    return value is not None and value > 1.0


def _fmt(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_lr_schedule(optimizer, num_train_steps: int) -> None:
    """Raises ``ConfigError`` (one line, naming the field) when ``optimizer``'s schedule cannot be built for
    ``num_train_steps`` steps, or builds one that is not what the fields say (a warmup or decay in steps that does
    not fit). Mirrors ``levanter.optim.OptimizerConfig.lr_scheduler`` of Levanter 1.2.dev1644, then builds the
    schedule itself so that anything this does not foresee still fails here, before W&B starts."""
    n = int(num_train_steps)
    if n < 1:
        raise ConfigError(f"trainer.num_train_steps must be >= 1, got {n}")
    for name in ("warmup", "rewarmup", "decay", "cooldown"):
        value = getattr(optimizer, name, None)
        if value is None:
            continue
        if value < 0 or (value > 1 and value % 1 != 0):
            raise ConfigError(f"optimizer.{name} must be a fraction in [0, 1] of the run or a whole number of steps "
                              f"> 1, got {value}")
    hint = "(a fraction such as 0.05 scales with the run)"
    warmup = optimizer.warmup
    if _is_steps(warmup) and warmup >= n:
        raise ConfigError(f"optimizer.warmup={_fmt(warmup)} steps must be below trainer.num_train_steps={n} {hint}")
    cooldown_steps = _steps(optimizer.cooldown, n) if optimizer.cooldown is not None else 0
    if cooldown_steps >= n:
        raise ConfigError(f"optimizer.cooldown={_fmt(optimizer.cooldown)} leaves no steps of the "
                          f"trainer.num_train_steps={n} before it")
    main_steps = n - cooldown_steps
    try:
        points = optimizer._get_cycle_minima(main_steps)
    except ValueError as e:
        raise ConfigError(f"optimizer: {' '.join(str(e).split())}") from None
    cosine = _needs_positive_decay(optimizer.lr_schedule)
    for cycle, (start, end) in enumerate(zip(points[:-1], points[1:])):
        cycle_steps = end - start
        where = "" if len(points) == 2 else f" in cycle {cycle} (steps {start}-{end})"
        if cycle_steps <= 0:
            raise ConfigError(f"optimizer: cycle {cycle} has {cycle_steps} steps (cycle boundaries {points} for "
                              f"trainer.num_train_steps={n}); fewer cycles or more steps")
        field, value = ("warmup", warmup) if cycle == 0 else ("rewarmup", optimizer.rewarmup)
        warm = _steps(value, cycle_steps)
        if warm > cycle_steps or (_is_steps(value) and warm >= cycle_steps):
            raise ConfigError(f"optimizer.{field}={_fmt(value)} steps must be below the {cycle_steps} steps of the "
                              f"schedule{where} (trainer.num_train_steps={n}) {hint}")
        decay = _steps(optimizer.decay, cycle_steps) if optimizer.decay is not None else cycle_steps - warm
        if optimizer.decay is not None and warm + decay > cycle_steps:
            raise ConfigError(f"optimizer.decay={_fmt(optimizer.decay)} ({decay} steps) plus warmup ({warm} steps) "
                              f"exceed the {cycle_steps} steps of the schedule{where} "
                              f"(trainer.num_train_steps={n})")
        if decay <= 0 and cosine:
            what = (f"optimizer.decay={_fmt(optimizer.decay)}" if optimizer.decay is not None
                    else f"optimizer.{field}={_fmt(value)} ({'' if _is_steps(value) else 'a fraction: '}{warm} of "
                         f"{cycle_steps} steps)")
            raise ConfigError(f"{what} leaves no decay steps{where} for lr_schedule "
                              f"{_schedule_name(optimizer.lr_schedule)} (trainer.num_train_steps={n})")
    try:
        optimizer.lr_scheduler(n)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"optimizer: the learning-rate schedule for trainer.num_train_steps={n} fails: "
                          f"{' '.join(str(e).split())}") from None


def _schedule_name(schedule) -> str:
    return schedule if isinstance(schedule, str) else type(schedule).__name__


def _needs_positive_decay(schedule) -> bool:
    """Whether the schedule's decay phase refuses zero steps (optax's cosine; Levanter's linear, inv and
    constant take any count)."""
    if isinstance(schedule, str):
        return schedule == "cosine"
    return "cosine" in type(schedule).__name__.lower()


# --- devices -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceNeed:
    """What a trainer mesh takes: a multiple of ``per_slice`` devices in every slice, a multiple of ``slices``
    slices; ``cpu_devices``: how many to simulate on a CPU-only JAX."""

    per_slice: int
    slices: int
    cpu_devices: int
    why: str

    def fits(self, device_count: int, num_slices: int = 1) -> bool:
        if num_slices < 1 or device_count % num_slices:
            return False
        return (device_count // num_slices) % self.per_slice == 0 and num_slices % self.slices == 0


def device_need(trainer, cpu_devices: Optional[int] = None) -> DeviceNeed:
    """The devices ``trainer`` (Levanter's ``TrainerConfig``) needs; no JAX calls. ``cpu_devices`` (the CLI's
    field) must be a positive multiple of the mesh's per-slice size."""
    replica, model = int(trainer.replica_ici_axis_size), int(trainer.model_axis_size)
    if replica < 1:
        raise ConfigError(f"trainer.replica_ici_axis_size must be >= 1, got {replica}")
    if model < 1:
        raise ConfigError(f"trainer.model_axis_size must be >= 1, got {model}")
    dcn = int(trainer.replica_dcn_axis_size)
    slices = 1 if dcn == -1 else dcn  # -1: as many as there are
    if slices < 1:
        raise ConfigError(f"trainer.replica_dcn_axis_size must be >= 1 or -1, got {dcn}")
    per_slice = replica * model
    why = f"replica_ici_axis_size={replica} x model_axis_size={model}"
    if cpu_devices is None:
        cpu = per_slice
    else:
        if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1:
            raise ConfigError(f"cpu_devices must be a positive integer, got {cpu_devices!r}")
        if cpu_devices % per_slice:
            raise ConfigError(f"cpu_devices={cpu_devices} must be a multiple of {per_slice} (the trainer mesh: {why})")
        cpu = cpu_devices
    return DeviceNeed(per_slice=per_slice, slices=slices, cpu_devices=cpu, why=why)


def check_devices(need: DeviceNeed, *, platform: str, device_count: int, num_slices: int = 1,
                  simulated_here: bool = True) -> None:
    """Raises ``ConfigError`` naming the devices needed and found when the mesh does not fit. ``simulated_here``:
    whether this process could have simulated CPU devices (False: called in-process, JAX already chosen)."""
    if need.fits(device_count, num_slices):
        return
    if need.slices > 1 and num_slices % need.slices:
        raise ConfigError(f"trainer.replica_dcn_axis_size={need.slices} needs a multiple of {need.slices} slices, "
                          f"found {num_slices} ({platform})")
    found = f"found {device_count} {platform} device{'s' if device_count != 1 else ''}"
    if num_slices > 1:
        found += f" in {num_slices} slices"
    message = f"the trainer mesh needs a multiple of {need.per_slice} devices per slice ({need.why}), {found}"
    if platform == "cpu":
        message += (f"; set XLA_FLAGS={DEVICE_FLAG}={need.cpu_devices} before JAX starts"
                    if not simulated_here else
                    f" (XLA_FLAGS sets {DEVICE_FLAG}; leave it unset and the CLI simulates {need.cpu_devices})")
    raise ConfigError(message)


def flag_device_count(xla_flags: Optional[str]) -> Optional[int]:
    """The count ``--xla_force_host_platform_device_count=N`` in ``xla_flags`` sets (the last one wins), or None."""
    count = None
    for token in (xla_flags or "").split():
        if token.startswith(DEVICE_FLAG + "="):
            try:
                count = int(token.split("=", 1)[1])
            except ValueError:
                raise ConfigError(f"XLA_FLAGS: {token} is not a device count") from None
    return count


def _cpu_devices_field(config) -> Optional[int]:
    return getattr(config, "cpu_devices", None)


def reexec_for_cpu_devices(config) -> None:
    """The CLI's first step after parsing: on a CPU-only JAX whose ``XLA_FLAGS`` does not set a device count, a
    mesh that needs more than one device makes the process re-execute itself with
    ``--xla_force_host_platform_device_count=N`` added (JAX reads it only when it starts), saying so in one line.
    A no-op otherwise (one device, a count already set, an accelerator JAX)."""
    from null_moe.host_malloc import jax_cpu_only

    need = device_need(config.trainer, _cpu_devices_field(config))
    if need.cpu_devices <= 1 or not jax_cpu_only():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if flag_device_count(flags) is not None:
        return  # set by the caller: check_devices_here judges it
    new_flags = f"{flags} {DEVICE_FLAG}={need.cpu_devices}".strip()
    print(f"cpu_devices={need.cpu_devices}: the trainer mesh ({need.why}) needs more than one device; re-executing "
          f"on a CPU-only JAX with XLA_FLAGS={new_flags}", flush=True)
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else [sys.executable, *sys.argv]
    os.execve(sys.executable, argv, {**os.environ, "XLA_FLAGS": new_flags})


def check_devices_here(config, *, simulated_here: bool) -> None:
    """``check_devices`` against this process's JAX devices. Initialises JAX's backend, so it is skipped for a
    multi-process (``jax.distributed``) run, where Levanter must initialise first, and for a one-device mesh."""
    need = device_need(config.trainer, _cpu_devices_field(config))
    if need.per_slice == 1 and need.slices == 1:
        return
    distributed = getattr(config.trainer, "distributed", None)
    if distributed is not None and getattr(distributed, "initialize_jax_distributed", False) \
            and distributed._is_distributed():
        return
    import jax

    devices = jax.devices()
    num_slices = max(getattr(d, "slice_index", 0) or 0 for d in devices) + 1
    check_devices(need, platform=devices[0].platform, device_count=len(devices), num_slices=num_slices,
                  simulated_here=simulated_here)
