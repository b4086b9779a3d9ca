"""The one timer of every bench script: warm up, then time calls in interleaved rounds.

Each call is a function of no arguments that starts the work (usually an AOT-compiled executable applied to
its inputs); the timer blocks on its result with ``jax.block_until_ready``. After ``warmup`` calls of each, every
round calls each of them once, so a slow spell of the machine lands on all of them alike instead of on
whichever case ran during it. A single call timed alone is the same loop with one entry.

Per timed call it records the wall time and the process's minor page faults (buffers that XLA:CPU maps fresh
on every call show up there; see null_moe.host_malloc).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Timing:
    """The timed calls of one case, in round order."""

    times: tuple[float, ...]  # seconds per timed call
    faults: tuple[int, ...]  # minor page faults per timed call
    kept: Any = None  # ``keep`` applied to the output of the last timed call
    compile_s: float = 0.0  # what compiling the case took, when the caller says (compile_ahead)

    @property
    def median(self) -> float:
        return float(statistics.median(self.times))

    @property
    def min(self) -> float:
        return float(min(self.times))

    @property
    def max(self) -> float:
        return float(max(self.times))

    @property
    def median_faults(self) -> int:
        return int(statistics.median(self.faults))


def compile_ahead(fn: Callable, *args) -> tuple[Callable, float]:
    """``jax.jit(fn)`` compiled ahead of time for ``args``; returns (executable, seconds the compile took)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    calls: Sequence[Callable[[], Any]],
    *,
    warmup: int,
    rounds: int,
    keep: Optional[Callable[[Any], Any]] = None,
    compile_s: Sequence[float] = (),
) -> list[Timing]:
    """Time every call ``rounds`` times, one call of each per round, after ``warmup`` untimed calls of each.

    ``keep`` (optional) picks what to hold from each call's last timed output (e.g. small statistics; the rest
    is dropped at once so that a batch of cases does not hold every case's outputs). ``compile_s`` is copied
    into the timings, one per call.
    """
    import jax

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for call in calls:
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: list[list[float]] = [[] for _ in calls]
    faults: list[list[int]] = [[] for _ in calls]
    kept: list[Any] = [None] * len(calls)
    for r in range(rounds):
        for i, call in enumerate(calls):
            f0, t0 = _minor_faults(), time.perf_counter()
            out = jax.block_until_ready(call())
            times[i].append(time.perf_counter() - t0)
            faults[i].append(_minor_faults() - f0)
            if keep is not None and r == rounds - 1:
                kept[i] = keep(out)
            del out
    cs = list(compile_s) + [0.0] * (len(calls) - len(compile_s))
    return [Timing(tuple(t), tuple(f), k, c) for t, f, k, c in zip(times, faults, kept, cs)]
