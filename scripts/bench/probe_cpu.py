"""Two probes behind the tiled kernel's design on CPU (docs/RESULTS.md, "host allocator" and "operand layout").

    .venv/bin/python -m scripts.bench.probe_cpu [--host_malloc resident|default]

1. Buffer cost: a fresh 64 MB output (zero-fill, and x + 1 over 64 MB) and a 64 MB loop-carried buffer, under the
   process's host allocator mode (page faults make these fixed costs with glibc's defaults).
2. Operand layout: sixteen row tiles against sixteen expert weights, y = x_e @ w[e] (K = 512 -> N = 1024 and
   back), with the row tile handed to the dot as is ([M, K]) or transposed ([K, M], contracting its major axis).
Medians of interleaved rounds; prints ``PROBE key=value ...`` lines.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from null_moe import host_malloc
from scripts.bench import timer


def _medians(fns: dict, rounds: int) -> dict:
    """Median seconds of each (fn, args), one warmup call each, then interleaved rounds (scripts/bench/timer.py)."""
    timings = timer.interleaved([functools.partial(fn, *args) for fn, args in fns.values()], warmup=1, rounds=rounds)
    return {k: t.median for k, t in zip(fns, timings)}


def buffer_probe(rounds: int) -> dict:
    rows, cols = 16384, 1024  # 64 MB of f32
    small = jnp.ones((128, cols), jnp.float32)
    k = jnp.int32(2)

    def carried(k, a):  # a loop-carried buffer, as the tiled kernels' outputs are
        body = lambda i, o: jax.lax.dynamic_update_slice_in_dim(o, a * i, i * 128, 0)  # noqa: E731
        return jax.lax.fori_loop(0, k, body, jnp.zeros((rows, cols), jnp.float32))

    fns = {
        "zeros_64MB": (jax.jit(lambda a: jnp.zeros((rows, cols), jnp.float32) + a[0, 0]), (small,)),
        "x_plus_1_64MB": (jax.jit(lambda x: x + 1), (jnp.ones((rows, cols), jnp.float32),)),
        "loop_carried_64MB": (jax.jit(carried), (k, small)),
    }
    return _medians(fns, rounds)


def layout_probe(rounds: int, experts: int = 16) -> dict:
    def tiles(w, m, transposed):
        def fn(x, w):
            def body(e, acc):
                we = jax.lax.optimization_barrier(jax.lax.dynamic_index_in_dim(w, e, keepdims=False))
                xt = jnp.take(x, jnp.arange(m) + e * m, axis=0)
                if transposed:
                    y = jax.lax.dot_general(jax.lax.optimization_barrier(xt.T), we, (((0,), (0,)), ((), ())))
                else:
                    y = xt @ we
                return acc + y
            return jax.lax.fori_loop(0, experts, body, jnp.zeros((m, w.shape[2]), jnp.float32))
        return jax.jit(fn)

    fns, flops = {}, {}
    for kin, nout in ((512, 1024), (1024, 512)):
        w = jax.random.normal(jax.random.PRNGKey(1), (experts, kin, nout), jnp.float32)
        for m in (128, 512):
            x = jax.random.normal(jax.random.PRNGKey(0), (experts * m, kin), jnp.float32)
            for transposed in (False, True):
                key = f"rows{m}_{kin}to{nout}_{'transposed' if transposed else 'plain'}"
                fns[key] = (tiles(w, m, transposed), (x, w))
                flops[key] = 2 * experts * m * kin * nout
    return {k: flops[k] / t / 1e9 for k, t in _medians(fns, rounds).items()}


def main(rounds: int = 9) -> None:
    mode = host_malloc.current_mode()
    for k, t in buffer_probe(rounds).items():
        print(f"PROBE host_malloc={mode} buffer={k} time_ms={t * 1e3:.2f}", flush=True)
    for k, g in layout_probe(rounds).items():
        print(f"PROBE host_malloc={mode} dot={k} gflops={g:.0f}", flush=True)


if __name__ == "__main__":
    main(host_malloc.rounds_cli(__doc__, 9))
