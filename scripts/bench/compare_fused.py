"""Whole layer, fused vs unfused tiled expert path, forward + backward at forced null 0 / 0.5 / 0.9.

    .venv/bin/python -m scripts.bench.compare_fused [--rounds 5] [--host_malloc auto|resident|default]

T = 4096, D = 512, F = 1024, N = 16, k = 4, f32. Every step is compiled and warmed up first, then timed in
interleaved rounds (one call of each per round); medians per step, ratios against null 0 of the same path.
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import haliax as hax
import jax

from null_moe import NullMoEConfig, NullRoutedMoE
from null_moe import host_malloc
from scripts.bench import timer

NULL_FRACS = (0.0, 0.5, 0.9)


def _step(layer, x, routing):
    # gradients for the weights and the input, as in training (the layer's input comes from earlier layers)
    return eqx.filter_value_and_grad(lambda lx: hax.sum(lx[0].apply(lx[1], routing)[0] ** 2).scalar())((layer, x))


def main(rounds: int = 5):
    base = NullMoEConfig(hidden_dim=512, intermediate_dim=1024, n_routed_experts=16, num_experts_per_tok=4)
    layer0 = NullRoutedMoE.init(base, key=jax.random.PRNGKey(0))
    x = hax.random.normal(jax.random.PRNGKey(1), (hax.Axis("token", 4096), base.Embed))
    step = eqx.filter_jit(_step)
    cases = []
    for fused in (True, False):
        layer = dataclasses.replace(layer0, config=dataclasses.replace(base, fused_experts=fused))
        for p in NULL_FRACS:
            routing = layer.route_forced(x, key=jax.random.PRNGKey(2), null_frac=p)
            cases.append(((fused, p), functools.partial(step, layer, x, routing)))
    timings = timer.interleaved([call for _, call in cases], warmup=1, rounds=rounds)
    med = {case: t.median for (case, _), t in zip(cases, timings)}
    print(f"host_malloc={host_malloc.current_mode()} rounds={rounds} device={jax.devices()[0].device_kind}")
    for fused in (True, False):
        cells = " ".join(f"{p}: {med[(fused, p)]:.3f}s ({med[(fused, p)] / med[(fused, 0.0)]:.3f})" for p in NULL_FRACS)
        print("fused" if fused else "unfused", cells, flush=True)
    return med


if __name__ == "__main__":
    main(host_malloc.rounds_cli(__doc__, 5))
