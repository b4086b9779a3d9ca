"""Host allocator mode for CPU runs: keep freed buffers mapped so XLA's per-call buffers skip page faults.

XLA:CPU allocates every output and temporary buffer with malloc on each call. glibc serves large blocks with a
fresh mmap, and XLA's worker threads have arenas of their own; either way, each call touches new pages and the
kernel faults them in one 4 KiB page at a time. Measured on the 2-core development CPU (docs/RESULTS.md, "host
allocator"): a 64 MB zero-fill takes 20 ms with faults and under 2 ms without; `x + 1` over 64 MB 22.8 ms vs
3.3 ms. Fault time is a fixed cost per buffer, whatever share of its rows a kernel fills, so it hides what null
routing saves.

``resident`` sets glibc's documented tunables: one arena for all threads, no mmap for large blocks, and no
trimming of the heap top, so freed buffers are reused without faults. They are read only at process start, so
the bench entry points and the training CLI (``experiments/speedrun/train.py``) re-execute themselves with them
set (:func:`reexec_if_needed`). ``default`` leaves the allocator as it is. ``auto`` (their default) is
``resident`` when JAX will run on the CPU and ``default`` when an accelerator may be used: there device buffers
do not come from malloc, and one arena would only make the host threads contend. Every figure a bench prints,
and every training run, says which mode it ran under.

Standard library only: this module imports no JAX (it runs before JAX initialises).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal

HostMalloc = Literal["resident", "default"]
HOST_MALLOC_MODES = ("auto", "resident", "default")
# packages whose presence means JAX may pick an accelerator when JAX_PLATFORMS is unset
_ACCELERATOR_PACKAGES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")

RESIDENT_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}


def current_mode() -> HostMalloc:
    """The mode this process runs under (``resident`` only when every tunable is set as above)."""
    return "resident" if all(os.environ.get(k) == v for k, v in RESIDENT_ENV.items()) else "default"


def resolve(mode: str) -> HostMalloc:
    """``auto`` -> ``resident`` for a CPU-only JAX (JAX_PLATFORMS=cpu, or no accelerator plugin installed),
    else ``default``; other modes map to themselves. Decided without initializing JAX."""
    if mode not in HOST_MALLOC_MODES:
        raise ValueError(f"host_malloc must be one of {HOST_MALLOC_MODES}, got {mode!r}")
    if mode != "auto":
        return mode  # type: ignore[return-value]
    return "resident" if jax_cpu_only() else "default"


def jax_cpu_only() -> bool:
    """Whether JAX will run on the CPU alone (JAX_PLATFORMS=cpu, or no accelerator plugin installed), decided
    without initializing JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PACKAGES)


def reexec_if_needed(mode: str) -> None:
    """Re-executes the current command with the resident tunables when ``mode`` asks for them and they are unset.

    Call it first thing in a ``__main__`` block, before any JAX work. A no-op when ``mode`` resolves to
    ``default``, when already resident, or off Linux (the tunables are glibc's).
    """
    if resolve(mode) == "default" or current_mode() == "resident" or not sys.platform.startswith("linux"):
        return
    env = {**os.environ, **RESIDENT_ENV}
    argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def rounds_cli(doc: str, default_rounds: int) -> int:
    """The command line of the small timing scripts: ``--rounds N --host_malloc MODE``. Re-executes with the
    allocator tunables when the mode asks for them (so call it before any JAX work) and returns N."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=default_rounds)
    ap.add_argument("--host_malloc", default="auto", choices=HOST_MALLOC_MODES)
    args = ap.parse_args()
    reexec_if_needed(args.host_malloc)
    return args.rounds
