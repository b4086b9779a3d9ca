"""Whole layer, fused vs unfused tiled expert path, forward + backward at forced null 0 / 0.5 / 0.9.

    .venv/bin/python -m scripts.bench.compare_fused

T = 4096, D = 512, F = 1024, N = 16, k = 4, f32; medians of 3 after a warm-up; ratios within one process.
"""

from __future__ import annotations

import dataclasses
import time

import equinox as eqx
import haliax as hax
import jax
import numpy as np

from null_moe import NullMoEConfig, NullRoutedMoE

NULL_FRACS = (0.0, 0.5, 0.9)


def _step_time(layer, x, routing, iters=3):
    @eqx.filter_jit
    def step(layer, x, routing):
        return eqx.filter_value_and_grad(lambda l, x: hax.sum(l.apply(x, routing)[0] ** 2).scalar())(layer, x)

    jax.block_until_ready(step(layer, x, routing))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(layer, x, routing))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    base = NullMoEConfig(hidden_dim=512, intermediate_dim=1024, n_routed_experts=16, num_experts_per_tok=4)
    layer0 = NullRoutedMoE.init(base, key=jax.random.PRNGKey(0))
    x = hax.random.normal(jax.random.PRNGKey(1), (hax.Axis("token", 4096), base.Embed))
    for fused in (True, False):
        layer = dataclasses.replace(layer0, config=dataclasses.replace(base, fused_experts=fused))
        res = {}
        for p in NULL_FRACS:
            routing = layer.route_forced(x, key=jax.random.PRNGKey(2), null_frac=p)
            res[p] = _step_time(layer, x, routing)
        cells = " ".join(f"{p}: {t:.3f}s ({t / res[0.0]:.3f})" for p, t in res.items())
        print("fused" if fused else "unfused", cells, flush=True)


if __name__ == "__main__":
    main()
