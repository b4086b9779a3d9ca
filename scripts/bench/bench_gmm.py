"""Grouped-matmul microbenchmark: speed vs one dense matmul, and time vs fraction of real rows.

    python -m scripts.bench.bench_gmm                       # issue-3 goal shape, tiled + ragged_dot
    python -m scripts.bench.bench_gmm --tile_rows_list "[64,128,256,512]" --backends "[tiled]"

All figures of one run are ratios against the dense matmul and the 100%-real time measured in the same
process. Prints one ``GMM key=value ...`` line per point and a summary.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import draccus
import jax
import jax.numpy as jnp
import numpy as np

from null_moe.gmm import DEFAULT_TILE_ROWS, grouped_matmul, resolve_backend
from scripts.bench.timing import time_fn


@dataclasses.dataclass
class GmmBenchConfig:
    rows: int = 16384
    k: int = 512
    n: int = 1024
    experts: int = 16
    real_fracs: List[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.1])
    backends: List[str] = dataclasses.field(default_factory=lambda: ["tiled", "ragged_dot"])
    tile_rows_list: Optional[List[int]] = None  # tiled only; default: [DEFAULT_TILE_ROWS]
    passes: List[str] = dataclasses.field(default_factory=lambda: ["forward", "forward_backward"])
    dtype: str = "float32"
    warmup: int = 2
    iters: int = 5
    seed: int = 0


def _median_time(fn, args, warmup, iters):
    return time_fn(fn, args, warmup, iters).time_s


def _group_sizes(rng, real_rows, experts):
    return jnp.asarray(rng.multinomial(real_rows, np.full(experts, 1.0 / experts)), jnp.int32)


def main(cfg: GmmBenchConfig):
    dtype = jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    x = jax.random.normal(kx, (cfg.rows, cfg.k), dtype)
    w = (jax.random.normal(kw, (cfg.experts, cfg.k, cfg.n), dtype) / np.sqrt(cfg.k)).astype(dtype)
    g = jax.random.normal(kg, (cfg.rows, cfg.n), dtype)
    print(f"device={jax.devices()[0].device_kind} platform={jax.default_backend()} shape={cfg.rows}x{cfg.k}x{cfg.n}x{cfg.experts}")

    summary = []
    for pass_ in cfg.passes:
        flop_mult = 1 if pass_ == "forward" else 3
        if pass_ == "forward":
            dense = jax.jit(lambda x, w: x @ w[0])
        else:
            # value_and_grad keeps the forward in the executable (grad alone lets XLA drop it)
            dense = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(x @ w[0], g[: x.shape[0]]), (0, 1)))
        t_dense = _median_time(dense, (x, w), cfg.warmup, cfg.iters)
        dense_flops = 2 * cfg.rows * cfg.k * cfg.n * flop_mult
        print(f"GMM pass={pass_} backend=dense real_frac=1.0 time_s={t_dense:.5f} gflops={dense_flops / t_dense / 1e9:.1f}")
        for backend in cfg.backends:
            tiles = (cfg.tile_rows_list or [DEFAULT_TILE_ROWS]) if backend == "tiled" else [None]
            for tile in tiles:
                name = resolve_backend(backend)

                def forward(x, w, gs, tile=tile, name=name):
                    return grouped_matmul(x, w, gs, backend=name, tile_rows=tile)

                def loss(x, w, gs, forward=forward):
                    return jnp.vdot(forward(x, w, gs), g)

                # forward: the output itself, as for the dense baseline; fwd+bwd: value and grads of <y, g>
                fn = jax.jit(forward if pass_ == "forward" else jax.value_and_grad(loss, (0, 1)))
                t_full = None
                for frac in cfg.real_fracs:
                    gs = _group_sizes(rng, int(round(frac * cfg.rows)), cfg.experts)
                    t = _median_time(fn, (x, w, gs), cfg.warmup, cfg.iters)
                    t_full = t if frac == 1.0 else t_full
                    flops = 2 * int(gs.sum()) * cfg.k * cfg.n * flop_mult
                    vs_full = f"{t / t_full:.3f}" if t_full else "nan"
                    line = (
                        f"GMM pass={pass_} backend={name} tile_rows={tile} real_frac={frac} time_s={t:.5f} "
                        f"gflops={flops / t / 1e9:.1f} speed_vs_dense={(flops / t) / (dense_flops / t_dense):.3f} "
                        f"time_vs_full={vs_full}"
                    )
                    print(line, flush=True)
                    summary.append(line)
    return summary


if __name__ == "__main__":
    main(draccus.parse(config_class=GmmBenchConfig))
