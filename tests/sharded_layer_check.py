"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by tests/test_sharding.py).

Compares the layer's outputs and gradients with tokens sharded over a data axis and expert weights sharded
fsdp-style (embed over data) against the same computation on one device, and reads from the compiled HLO the
size of every sort (any element type, rank or operand count) and of every top-k, so the parent can check that
each device sorts only its own slots and routes only its own tokens. Prints one JSON line.

Arguments: take_until_null (0 or 1), num_null_experts (an int, or "auto" for the count derived from p).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from null_moe import NullMoEConfig, NullRoutedMoE


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    take_until_null = bool(int(sys.argv[1])) if len(sys.argv) > 1 else False
    num_null = None if len(sys.argv) < 3 or sys.argv[2] == "auto" else int(sys.argv[2])
    cfg = NullMoEConfig(hidden_dim=16, intermediate_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5, take_until_null=take_until_null, num_null_experts=num_null, tile_rows=8)
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    Batch, Pos = hax.Axis("batch", 16), hax.Axis("position", 8)
    x = hax.random.normal(jax.random.PRNGKey(1), (Batch, Pos, cfg.Embed))
    cot = hax.random.normal(jax.random.PRNGKey(2), (Batch, Pos, cfg.Embed))

    def loss_fn(layer, x):
        y, extras = layer(x)
        return hax.sum(y * cot).scalar() + extras["load_balancing_loss"].scalar() + extras["router_z_loss"].scalar(), (y, extras["null_frac"])

    step = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    (l1, (y1, nf1)), g1 = eqx.filter_jit(step)(layer, x)

    mesh = Mesh(np.array(devices).reshape(8), ("data",))
    compute = {"batch": "data"}
    params = {"embed": "data"}  # fsdp: weights sharded over the data axis
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(compute):
        layer_s = hax.shard(layer, params)
        x_s = hax.shard(x, compute)
        jitted = hax.named_jit(step, axis_resources=compute)
        (l8, (y8, nf8)), g8 = jitted(layer_s, x_s)
        hlo = jax.jit(lambda l, x: step(l, x)).lower(layer_s, x_s).compile().as_text()

    # every sort instruction, whatever it sorts: the element count of each of its operands
    sort_sizes, topk_rows = [], []
    for m in re.finditer(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) sort\(", hlo, re.M):
        shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
        sort_sizes += [math.prod(int(d) for d in dims.split(",") if d) for dims in shapes]
    # the router's top-k (a TopK custom call on XLA:CPU): its rows are tokens
    for m in re.finditer(r"= \(?\w+\[(\d+)[\d,]*\][^\n]*custom_call_target=\"TopK\"", hlo):
        topk_rows.append(int(m.group(1)))
    # the flag's effect: slots whose expert changes when take_until_null is flipped (0 when it is a no-op)
    flipped = dataclasses.replace(layer, config=dataclasses.replace(cfg, take_until_null=not take_until_null))
    route = eqx.filter_jit(lambda l, x: l.route(x).expert_ids)
    flag_changes = int(jnp.sum(route(layer, x) != route(flipped, x)))
    diffs = {
        "loss": float(abs(l1 - l8) / max(1.0, abs(float(l1)))),  # a sum of 2048 products: relative
        "y": float(jnp.max(jnp.abs((y1 - y8).array))),
        "null_frac": float(abs(nf1.array - nf8.array)),
    }
    for name, a, b in zip(
        ["gate", "null_gate", "w1", "w2", "w3"],
        [g1.gate.weight, g1.null_gate.weight, g1.experts.w1.weight, g1.experts.w2.weight, g1.experts.w3.weight],
        [g8.gate.weight, g8.null_gate.weight, g8.experts.w1.weight, g8.experts.w2.weight, g8.experts.w3.weight],
    ):
        diffs["grad_" + name] = float(jnp.max(jnp.abs(a.array - b.array)))
    print(json.dumps({"diffs": diffs, "loss": float(l1), "sort_sizes": sort_sizes, "topk_rows": topk_rows,
                      "tokens": Batch.size * Pos.size,
                      "global_slots": Batch.size * Pos.size * cfg.num_experts_per_tok,
                      "num_null": cfg.num_null, "null_frac": float(nf1.array), "flag_changes": flag_changes,
                      "sharding_y": str(y8.array.sharding)}))


if __name__ == "__main__":
    main()
