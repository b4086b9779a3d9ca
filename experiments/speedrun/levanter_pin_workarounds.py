"""Workarounds for behaviours of the pinned Levanter (``levanter==1.2.dev1644``). Delete this module on an upgrade.

Everything here exists only because of a specific behaviour of this Levanter build; each piece names the behaviour
it works around. After upgrading Levanter, check each one against the new release, drop the pieces it fixes (and
their call sites in ``custom_mixtral.py`` / ``train.py``); nothing else in the project depends on them.

1. **Routing stats land in the wrong W&B row** (``log_moe_stats``, ``StepAlignedTracker``). Metrics logged from
   inside the jitted train step go through ``levanter.tracker.jit_log`` with ``step=None``; W&B files them under
   the row of the *previous* step (the trainer logs step s only after step s ran), and the last step's stats are
   never committed in a row of their own. Here a host callback buffers the stats and ``StepAlignedTracker`` merges
   them into the trainer's next log call that has a step: the one for the step that produced them.
   (Newer Levanter collects in-step metrics and logs them with the step: ``defer_tracker_for_jit``.)
2. **No checkpoint at the last step** (``FinalCheckpointerConfig``). ``Trainer`` registers ``checkpointer.on_step``
   through a ``LambdaCallback`` that drops the ``force`` flag, so the forced hook run at the end of
   ``Trainer.train`` never saves: a finished run only has step-policy / time-based checkpoints, and extending it
   restarts from an older step. The hook here passes ``force`` through (and skips the end-of-run save of a run
   that stopped before ``num_train_steps`` because its data ran out, so that state is not mistaken for a
   finished run).
3. **Temporary checkpoints under a relative base path are never deleted** (``absolute_checkpoint_paths``).
   ``Checkpointer._do_rm_checkpoint`` joins the (already absolute) filesystem path of ``base_path`` with the
   checkpoint path, which itself starts with ``base_path``; for a relative ``base_path`` that doubles it
   (``.../ckpt/<id>/ckpt/<id>/step-2``), the delete fails with a logged exception and every temporary checkpoint
   stays on disk. Local base paths are made absolute before training.
4. **The text log is ``<id>.log.log``** (``log_file_named_after_run_id``). ``TrainerConfig.initialize`` passes
   ``f"{id}.log"`` to ``levanter.utils.logging.init_logging``, which appends ``.log`` again.
5. **Newer JAX (0.8 and later, e.g. the GPU machines' 0.11)** (``apply_newer_jax_workarounds``):
   - Levanter's next-token loss passes its 0/1 *float* loss mask as ``where`` to ``hax.mean``; ``jnp.mean`` now
     raises "where must be None or a boolean array". ``haliax.nn.loss.maybe_reduce_loss`` (which Levanter calls
     through the module attribute) is wrapped to hand on ``where != 0`` instead: for a 0/1 mask that is what
     older JAX computed (it summed the mask as the count and used it as a condition).
   - ``levanter.utils.jax_utils.barrier_sync`` (multi-process runs only) imports ``jaxlib.xla_extension``, which
     JAX renamed to ``jax._src.lib._jax``: the old module name is registered as an alias of the new one.
   - ``jax.make_mesh`` now makes *Explicit* mesh axes by default (Auto before). Levanter's data loader stacks each
     batch under ``levanter.utils.jax_utils.local_cpu_mesh()``, built with ``jax.make_mesh``, from arrays made
     under the trainer's Auto mesh, and JAX refuses to mix the two ("context mesh ... should match the aval
     mesh"). ``local_cpu_mesh`` is replaced, in every Levanter module that imported it, by the same one-CPU mesh
     with Auto axes (what older JAX built).
   Each piece is applied only where the running JAX needs it (probed, not read from the version number), and
   says so once in the log. The core's own JAX shims (haliax calls removed JAX functions) live in
   ``null_moe.jax_compat``.
6. **No MFU on an H200** (``h200_flops_known``). Levanter's FLOP table has an ``h200-sxm`` entry, but its device
   name mapping sends "NVIDIA H200" nowhere, so ``throughput/mfu`` (and this project's realized MFU) are missing
   there. The mapping is extended to send H200 names to that entry (the H200's compute is the H100 SXM's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

import levanter.tracker
import levanter.utils.logging
from levanter.callbacks import Callback
from levanter.checkpoint import Checkpointer, CheckpointerConfig
from levanter.tracker import Tracker

__all__ = [
    "FinalCheckpointerConfig",
    "apply_newer_jax_workarounds",
    "h200_flops_known",
    "StepAlignedTracker",
    "absolute_checkpoint_paths",
    "log_file_named_after_run_id",
    "log_moe_stats",
    "wait_for_checkpointers",
    "with_final_checkpoint",
]


# --- 1. step-aligned logging of in-step metrics ------------------------------------------------------------------
_PENDING_MOE_STATS: Dict[str, float] = {}
_PENDING_LOCK = threading.Lock()
_STEP_ALIGNED_TRACKERS = 0


def _host_moe_stats(stats) -> None:
    values = {k: float(np.asarray(v)) for k, v in stats.items()}
    if _STEP_ALIGNED_TRACKERS > 0:
        with _PENDING_LOCK:
            _PENDING_MOE_STATS.update(values)  # microbatches: the last one wins
        return
    try:  # no aligned tracker (plain train_lm, tests with another tracker): jit_log's semantics
        levanter.tracker.log(values, step=None, commit=False)
    except RuntimeError:  # no tracker set: nowhere to log
        pass


def _take_pending_moe_stats() -> Dict[str, float]:
    with _PENDING_LOCK:
        pending = dict(_PENDING_MOE_STATS)
        _PENDING_MOE_STATS.clear()
    return pending


def log_moe_stats(stats: Dict[str, jax.Array]) -> None:
    """Logs scalars from inside jit through a host callback (``stop_gradient``'ed here too, so this never puts an
    IO callback on the JVP path)."""
    stats = {k: jax.lax.stop_gradient(v) for k, v in stats.items()}
    jax.experimental.io_callback(_host_moe_stats, None, stats, ordered=False)


class StepAlignedTracker(Tracker):
    """Forwards to another tracker; merges the buffered in-step stats into the next log call that has a step."""

    def __init__(self, inner: Tracker):
        global _STEP_ALIGNED_TRACKERS
        self.inner = inner
        self.name = getattr(inner, "name", "step_aligned")
        self._last_step: Optional[int] = None
        self._active = True
        _STEP_ALIGNED_TRACKERS += 1

    def log(self, metrics, *, step, commit=None):
        if step is not None:
            pending = _take_pending_moe_stats()
            if pending:
                metrics = {**pending, **metrics}
            self._last_step = int(step)
        self.inner.log(metrics, step=step, commit=commit)

    def log_hyperparameters(self, hparams):
        self.inner.log_hyperparameters(hparams)

    def log_summary(self, metrics):
        self.inner.log_summary(metrics)

    def log_artifact(self, artifact_path, *, name=None, type=None):
        self.inner.log_artifact(artifact_path, name=name, type=type)

    def finish(self):
        global _STEP_ALIGNED_TRACKERS
        pending = _take_pending_moe_stats()
        if pending and self._last_step is not None:
            self.inner.log(pending, step=self._last_step)
        if self._active:
            self._active = False
            _STEP_ALIGNED_TRACKERS -= 1
        self.inner.finish()

    def __getattr__(self, name):  # e.g. .run of a WandbTracker
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


# --- 2. a checkpoint at the last step -------------------------------------------------------------------------
class _ForceAwareCheckpointHook(Callback):
    """Hands the trainer's ``force`` flag to the checkpointer (see the module docstring, item 2)."""

    def __init__(self, checkpointer: Checkpointer, num_train_steps: Optional[int]):
        self.checkpointer = checkpointer
        self.num_train_steps = num_train_steps

    def on_step(self, info, force: bool = False):
        if force and info.step > 0:
            if getattr(self.checkpointer, "_last_save_step", None) == info.step:
                return  # already saved at this step by the step policy: don't write the same directory twice
            if self.num_train_steps is not None and info.next_step < self.num_train_steps:
                return  # the run stopped early (its data ran out): don't save that state as the run's end
        self.checkpointer.on_step(info, force=force)


class _FinalCheckpointer:
    """A Levanter ``Checkpointer`` whose ``on_step`` is a force-aware ``Callback``."""

    def __init__(self, inner: Checkpointer, num_train_steps: Optional[int]):
        self._inner = inner
        self.on_step = _ForceAwareCheckpointHook(inner, num_train_steps)

    def __getattr__(self, name):
        return getattr(self._inner, name)


_CREATED_CHECKPOINTERS: list = []


@dataclass
class FinalCheckpointerConfig(CheckpointerConfig):
    """Levanter's ``CheckpointerConfig`` plus a permanent checkpoint at the last step of every run, so a run
    resumed or extended with the same ``trainer.id`` continues exactly where it stopped.

    ``num_train_steps`` (set by the CLI from ``trainer.num_train_steps``): the end-of-run save is skipped when the
    run stopped before that step."""

    num_train_steps: Optional[int] = None

    def create(self, run_id) -> Checkpointer:
        checkpointer = _FinalCheckpointer(super().create(run_id), self.num_train_steps)
        _CREATED_CHECKPOINTERS.append(checkpointer)
        return checkpointer  # type: ignore[return-value]


def with_final_checkpoint(config) -> None:
    """Swaps ``config.trainer.checkpointer`` for a ``FinalCheckpointerConfig`` with the same fields."""
    ckpt = config.trainer.checkpointer
    fields = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(CheckpointerConfig)}
    config.trainer.checkpointer = FinalCheckpointerConfig(**fields, num_train_steps=config.trainer.num_train_steps)


def wait_for_checkpointers() -> None:
    """Waits for the asynchronous checkpoint writes (and deletions) of every checkpointer created so far."""
    while _CREATED_CHECKPOINTERS:
        _CREATED_CHECKPOINTERS.pop().wait_until_finished()


# --- 3. temporary checkpoints under a relative base path ------------------------------------------------------
def _is_local_path(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def absolute_checkpoint_paths(config) -> None:
    """Makes a local ``trainer.checkpointer.base_path`` (and ``trainer.load_checkpoint_path``) absolute, relative to
    the current directory, so Levanter can delete its temporary checkpoints (module docstring, item 3)."""
    trainer = config.trainer
    base = trainer.checkpointer.base_path
    if isinstance(base, str) and _is_local_path(base):
        trainer.checkpointer.base_path = os.path.abspath(os.path.expanduser(base.removeprefix("file://")))
    load = trainer.load_checkpoint_path
    if isinstance(load, str) and _is_local_path(load):
        trainer.load_checkpoint_path = os.path.abspath(os.path.expanduser(load.removeprefix("file://")))


# --- 4. the text log's file name ------------------------------------------------------------------------------
@contextlib.contextmanager
def log_file_named_after_run_id():
    """While active, Levanter's ``init_logging(log_dir, "<id>.log")`` writes ``<id>.log``, not ``<id>.log.log``."""
    original = levanter.utils.logging.init_logging

    def init_logging(log_dir, run_id, *args, **kwargs):
        if isinstance(run_id, str) and run_id.endswith(".log"):
            run_id = run_id[: -len(".log")]
        return original(log_dir, run_id, *args, **kwargs)

    levanter.utils.logging.init_logging = init_logging
    try:
        yield
    finally:
        levanter.utils.logging.init_logging = original


# --- 5. newer JAX ---------------------------------------------------------------------------------------------------
def _float_where_rejected() -> bool:
    """True when this JAX's ``jnp.mean`` refuses a float ``where`` (JAX >= 0.8)."""
    try:
        jnp.mean(jnp.ones((2,), jnp.float32), where=jnp.ones((2,), jnp.float32))
    except (TypeError, ValueError):
        return True
    return False


def _bool_where_reduce(original):
    @functools.wraps(original)
    def maybe_reduce_loss(arr, reduction, reduction_axis, where):
        import haliax as hax

        if isinstance(where, hax.NamedArray) and where.dtype != jnp.bool_:
            where = where != 0
        elif where is not None and not isinstance(where, hax.NamedArray) and jnp.asarray(where).dtype != jnp.bool_:
            where = jnp.asarray(where) != 0
        return original(arr, reduction, reduction_axis, where)

    maybe_reduce_loss.__null_moe_bool_where__ = True
    return maybe_reduce_loss


def _make_mesh_is_explicit() -> bool:
    """True when ``jax.make_mesh`` defaults to Explicit axes (JAX >= 0.8)."""
    try:
        cpu = jax.local_devices(backend="cpu")[0]
        mesh = jax.make_mesh((1,), ("probe",), devices=[cpu])
        explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
        return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()))
    except Exception:  # noqa: BLE001 - an old JAX without axis types: nothing to fix
        return False


def _auto_local_cpu_mesh():
    from levanter.utils.jax_utils import ResourceAxis, use_cpu_device

    import haliax.partitioning

    @contextlib.contextmanager
    def local_cpu_mesh():
        """Levanter's local_cpu_mesh with Auto mesh axes (see the module docstring, item 5)."""
        cpu = jax.local_devices(backend="cpu")[0]
        auto = jax.sharding.AxisType.Auto
        mesh = jax.make_mesh(
            (1, 1, 1), (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL), devices=[cpu],
            axis_types=(auto, auto, auto),
        )
        with use_cpu_device(), haliax.partitioning.set_mesh(mesh):
            yield mesh

    local_cpu_mesh.__null_moe_auto_mesh__ = True
    return local_cpu_mesh


def apply_newer_jax_workarounds() -> list[str]:
    """Applies item 5 of the module docstring where the running JAX needs it; returns what it changed (empty on the
    pinned jax 0.7.2). Idempotent; logs one line when it changes anything."""
    import haliax.nn.loss

    applied = []
    current = haliax.nn.loss.maybe_reduce_loss
    if not getattr(current, "__null_moe_bool_where__", False) and _float_where_rejected():
        haliax.nn.loss.maybe_reduce_loss = _bool_where_reduce(current)
        applied.append("haliax.nn.loss.maybe_reduce_loss passes a boolean where (jnp.mean refuses Levanter's float mask)")
    import levanter.utils.jax_utils as levanter_jax_utils

    original = levanter_jax_utils.local_cpu_mesh
    if not getattr(original, "__null_moe_auto_mesh__", False) and _make_mesh_is_explicit():
        replacement = _auto_local_cpu_mesh()
        importlib.import_module("levanter.data.loader")  # the modules that import it by name, loaded first
        for name, module in list(sys.modules.items()):
            if (name == "levanter" or name.startswith("levanter.")) and getattr(module, "local_cpu_mesh", None) is original:
                module.local_cpu_mesh = replacement
        applied.append("levanter's local_cpu_mesh builds an Auto mesh (jax.make_mesh now defaults to Explicit axes)")
    if "jaxlib.xla_extension" not in sys.modules:
        try:
            importlib.import_module("jaxlib.xla_extension")
        except ImportError:
            try:
                from jax._src.lib import _jax as renamed
            except ImportError:  # pragma: no cover - neither name: nothing to alias
                renamed = None
            if renamed is not None:
                sys.modules["jaxlib.xla_extension"] = renamed
                applied.append("jaxlib.xla_extension aliased to jax._src.lib._jax (renamed by JAX)")
    if applied:
        print(f"jax {jax.__version__}: Levanter workarounds applied: {'; '.join(applied)}", flush=True)
    return applied


# --- 6. the H200 in Levanter's FLOP table -----------------------------------------------------------------------
def h200_flops_known() -> bool:
    """Makes Levanter map H200 device names to its ``h200-sxm`` FLOP entry (module docstring, item 6); returns
    whether it changed anything (idempotent)."""
    from levanter.utils import flop_utils

    original = flop_utils._simplify_device_kind
    if getattr(original, "__null_moe_h200__", False) or "h200-sxm" not in flop_utils.DEVICE_AVAILABLE_FLOPS:
        return False
    if original("NVIDIA H200") in flop_utils.DEVICE_AVAILABLE_FLOPS:
        return False  # this Levanter already knows it

    @functools.wraps(original)
    def _simplify_device_kind(kind: str) -> str:
        simple = original(kind)
        if simple not in flop_utils.DEVICE_AVAILABLE_FLOPS and "h200" in kind.lower():
            return "h200-sxm"
        return simple

    _simplify_device_kind.__null_moe_h200__ = True
    flop_utils._simplify_device_kind = _simplify_device_kind
    return True
