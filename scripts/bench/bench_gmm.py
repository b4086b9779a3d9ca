"""Grouped-matmul microbenchmark: speed vs one dense matmul, and time vs fraction of real rows.

    python -m scripts.bench.bench_gmm                       # issue-3 goal shape, tiled + ragged_dot
    python -m scripts.bench.bench_gmm --tile_rows_list "[64,128,256,512]" --backends "[tiled]"

All figures of one run are ratios against the dense matmul and the 100%-real time measured in the same
process, timed in interleaved rounds (page_faults: median minor page faults per call). Prints one
``GMM key=value ...`` line per point and a summary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional

import draccus
import jax
import jax.numpy as jnp
import numpy as np

from null_moe import host_malloc
from null_moe.config import GmmBackend
from null_moe.gmm import DEFAULT_TILE_ROWS, grouped_matmul, resolve_backend

from scripts.bench import timer
from scripts.bench.config import BenchPass, DType, HostMallocMode


@dataclasses.dataclass
class GmmBenchConfig:
    rows: int = 16384
    k: int = 512
    n: int = 1024
    experts: int = 16
    real_fracs: List[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.1])
    backends: List[GmmBackend] = dataclasses.field(default_factory=lambda: ["tiled", "ragged_dot"])
    tile_rows_list: Optional[List[int]] = None  # tiled only; default: [DEFAULT_TILE_ROWS]
    passes: List[BenchPass] = dataclasses.field(default_factory=lambda: ["forward", "forward_backward"])
    dtype: DType = "float32"
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    host_malloc: HostMallocMode = "auto"  # null_moe.host_malloc


def _fwd_bwd(fn, g):
    """(y, dx, dw) of y = fn(x, w, *rest) for the fixed cotangent g.

    A VJP with a given cotangent times exactly the forward and backward passes; a scalar loss such as <y, g> would
    add a reduction over all R x N outputs to every point and skew the ratios.
    """

    def run(x, w, *rest):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, *rest), x, w)
        return (y, *vjp(g))

    return run


def _group_sizes(rng, real_rows, experts):
    return jnp.asarray(rng.multinomial(real_rows, np.full(experts, 1.0 / experts)), jnp.int32)


def _interleaved_medians(fns: list, args: list, warmup: int, iters: int) -> tuple[list[float], list[int]]:
    """Median seconds and minor page faults per call of each function (scripts/bench/timer.py)."""
    compiled = [timer.compile_ahead(fn, *a)[0] for fn, a in zip(fns, args)]
    timings = timer.interleaved([functools.partial(c, *a) for c, a in zip(compiled, args)], warmup=warmup, rounds=iters)
    return [t.median for t in timings], [t.median_faults for t in timings]


def main(cfg: GmmBenchConfig):
    dtype = jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    x = jax.random.normal(kx, (cfg.rows, cfg.k), dtype)
    w = (jax.random.normal(kw, (cfg.experts, cfg.k, cfg.n), dtype) / np.sqrt(cfg.k)).astype(dtype)
    g = jax.random.normal(kg, (cfg.rows, cfg.n), dtype)
    sizes = {frac: _group_sizes(rng, int(round(frac * cfg.rows)), cfg.experts) for frac in cfg.real_fracs}
    print(
        f"device={jax.devices()[0].device_kind} platform={jax.default_backend()} "
        f"shape={cfg.rows}x{cfg.k}x{cfg.n}x{cfg.experts} dtype={cfg.dtype} host_malloc={host_malloc.current_mode()} "
        f"rounds={cfg.iters}"
    )

    summary = []
    for pass_ in cfg.passes:
        flop_mult = 1 if pass_ == "forward" else 3
        dense = (lambda x, w: x @ w[0]) if pass_ == "forward" else _fwd_bwd(lambda x, w: x @ w[0], g)
        labels, fns, args = [("dense", None, 1.0)], [dense], [(x, w)]
        for backend in cfg.backends:
            name = resolve_backend(backend)
            for tile in (cfg.tile_rows_list or [DEFAULT_TILE_ROWS]) if backend == "tiled" else [None]:

                def forward(x, w, gs, tile=tile, name=name):
                    return grouped_matmul(x, w, gs, backend=name, tile_rows=tile)

                # forward: the output itself, as for the dense baseline; fwd+bwd: the output and its VJP
                fn = forward if pass_ == "forward" else _fwd_bwd(forward, g)
                for frac in cfg.real_fracs:
                    labels.append((name, tile, frac))
                    fns.append(fn)
                    args.append((x, w, sizes[frac]))
        times, faults = _interleaved_medians(fns, args, cfg.warmup, cfg.iters)
        t_dense = times[0]
        dense_flops = 2 * cfg.rows * cfg.k * cfg.n * flop_mult
        print(
            f"GMM pass={pass_} backend=dense real_frac=1.0 time_s={t_dense:.5f} "
            f"gflops={dense_flops / t_dense / 1e9:.1f} page_faults={faults[0]}"
        )
        full = {(n, tl): t for (n, tl, fr), t in zip(labels, times) if fr == 1.0}
        for (name, tile, frac), t, nflt in list(zip(labels, times, faults))[1:]:
            flops = 2 * int(sizes[frac].sum()) * cfg.k * cfg.n * flop_mult
            t_full = full.get((name, tile))
            vs_full = f"{t / t_full:.3f}" if t_full else "nan"
            line = (
                f"GMM pass={pass_} backend={name} tile_rows={tile} real_frac={frac} time_s={t:.5f} "
                f"gflops={flops / t / 1e9:.1f} speed_vs_dense={(flops / t) / (dense_flops / t_dense):.3f} "
                f"time_vs_full={vs_full} page_faults={nflt}"
            )
            print(line, flush=True)
            summary.append(line)
    return summary


if __name__ == "__main__":
    _cfg = draccus.parse(config_class=GmmBenchConfig)
    host_malloc.reexec_if_needed(_cfg.host_malloc)
    main(_cfg)
