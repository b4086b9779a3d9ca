"""The one timer of every bench script: warm up, then time calls in interleaved rounds.

Each call is a function of no arguments that starts the work (usually an AOT-compiled executable applied to
its inputs); the timer blocks on its result with ``jax.block_until_ready``. After ``warmup`` calls of each, every
round calls each of them once, so a slow spell of the machine lands on all of them alike instead of on
whichever case ran during it. A single call timed alone is the same loop with one entry.

Per timed call it records the wall time and the process's minor page faults (buffers that XLA:CPU maps fresh
on every call show up there; see null_moe.host_malloc).

On an accelerator a single call can be shorter than the host's dispatch latency (a 0.15 ms kernel measured 2.2x
slower when 3 calls were timed per round). ``min_round_s`` makes every timed sample a run of back-to-back calls
holding at least that much work (the count is calibrated per case from its warmup calls), and records the time
per call of the run. ``sync`` is what waits for the device (``jax.block_until_ready`` by default; the GPU check
passes ``torch.cuda.synchronize`` for its PyTorch peers).
"""

from __future__ import annotations

import dataclasses
import math
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
    calls_per_sample: int = 1  # back-to-back calls behind each entry of ``times`` (min_round_s)

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


def _calls_for(seconds_per_call: float, min_round_s: float) -> int:
    if min_round_s <= 0:
        return 1
    return max(1, math.ceil(min_round_s / max(seconds_per_call, 1e-9)))


def interleaved(
    calls: Sequence[Callable[[], Any]],
    *,
    warmup: int,
    rounds: int,
    keep: Optional[Callable[[Any], Any]] = None,
    compile_s: Sequence[float] = (),
    min_round_s: float = 0.0,
    sync: Optional[Callable[[Any], Any]] = None,
) -> list[Timing]:
    """Time every call ``rounds`` times, one sample of each per round, after ``warmup`` untimed calls of each.

    A sample is one call, or with ``min_round_s`` > 0 as many back-to-back calls as hold at least that many
    seconds (counted per case from the fastest of its warmup calls; at least one warmup call is made), followed by
    one ``sync``; its time per call is recorded. ``keep`` (optional) picks what to hold from each call's last timed
    output (e.g. small statistics; the rest is dropped at once so that a batch of cases does not hold every
    case's outputs). ``compile_s`` is copied into the timings, one per call.
    """
    import jax

    sync = sync or jax.block_until_ready
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    repeats = []
    for call in calls:
        fastest = float("inf")
        for _ in range(max(warmup, 1 if min_round_s > 0 else 0)):
            t0 = time.perf_counter()
            sync(call())
            fastest = min(fastest, time.perf_counter() - t0)
        repeats.append(_calls_for(fastest, min_round_s))
    times: list[list[float]] = [[] for _ in calls]
    faults: list[list[int]] = [[] for _ in calls]
    kept: list[Any] = [None] * len(calls)
    for r in range(rounds):
        for i, call in enumerate(calls):
            f0, t0 = _minor_faults(), time.perf_counter()
            for _ in range(repeats[i] - 1):
                call()
            out = sync(call())
            times[i].append((time.perf_counter() - t0) / repeats[i])
            faults[i].append(_minor_faults() - f0)
            if keep is not None and r == rounds - 1:
                kept[i] = keep(out)
            del out
    cs = list(compile_s) + [0.0] * (len(calls) - len(compile_s))
    return [Timing(tuple(t), tuple(f), k, c, n) for t, f, k, c, n in zip(times, faults, kept, cs, repeats)]
