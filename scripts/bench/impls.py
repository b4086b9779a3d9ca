"""What each impl runs: the model built for a point, and its step as a pure function of (params, x, data).

- ``null_moe``: the project's layer. Forced routing: ``layer.route_forced(x, null_mask=...)`` then
  ``layer.apply``; learned routing: ``layer(x)``, exactly what training calls.
- ``masked_null``: the same layer and routing, but every null slot is sent to a real expert (its stock top-k
  choice for that slot) with gate weight 0, so the expert matmuls compute it and throw it away: the naive
  approach, whose cost does not fall with the null fraction. Its output equals null_moe's.
- ``stock_levanter``: Levanter's ``MixtralSparseMoeBlock`` with this layer's gate and expert weights copied in.
- ``null_moe_ep``: the layer's own calls (as ``null_moe``) traced under an expert-parallel mesh and axis mapping
  (scripts/bench/ep.py): each device keeps ``experts / ep_size`` experts and only real rows travel.
- ``compact_psum``: the published EP path on the same mesh: tokens replicated over the expert axis, each device
  runs its own experts' rows, then a psum of the output (scripts/bench/ep.compact_psum_apply).

Every forward returns ``(y, stats, aux)``: ``stats`` are the routing statistics the layer computes (its
``extras``; for masked_null those of the null routing it was given, by the same function), ``aux`` its
auxiliary losses. The steps return the statistics next to their result, so the figures of a point come from
the very calls that were timed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from null_moe import routing as R

#: The routing statistics a step hands back (raw arrays); scripts/bench/runner.py turns them into counts.
STATS_KEYS = ("experts_per_token", "expert_loads", "real_per_token_hist", "dropped_frac")
_AUX_KEYS = ("load_balancing_loss", "router_z_loss")


def _raw(d: dict, keys) -> dict:
    return {k: getattr(d[k], "array", d[k]) for k in keys if k in d}


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def cast_floats(tree, dtype_name: str):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    dtype = _dtype(dtype_name)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def build_layer(layer_cfg, seed: int, tokens: int, dtype: str):
    """The layer for ``layer_cfg`` (a NullMoEConfig) and its input x [token, embed]; the same weights and input
    for every impl and null fraction of a seed."""
    import haliax as hax
    import jax
    from null_moe import NullRoutedMoE

    k_init, k_x = jax.random.split(jax.random.PRNGKey(seed))
    layer = cast_floats(NullRoutedMoE.init(layer_cfg, key=k_init), dtype)
    x = hax.random.normal(k_x, (hax.Axis("token", tokens), layer_cfg.Embed)).astype(_dtype(dtype))
    return layer, x


def _masked(layer, x, routing):
    """The routing with each null slot sent to the real expert stock top-k gives that slot (weight stays 0)."""
    import jax
    import jax.numpy as jnp

    n = layer.config.n_routed_experts
    fallback = jax.lax.top_k(layer.router_logits(x), layer.config.num_experts_per_tok)[1]
    ids = jnp.where(routing.expert_ids == n, fallback.astype(routing.expert_ids.dtype), routing.expert_ids)
    return R.Routing(ids, routing.weights, routing.probs, routing.logits)


def _layer_forward(layer, x, routing, impl: str):
    if impl == "compact_psum":
        from scripts.bench.ep import compact_psum_apply

        extras = layer.routing_extras(x, routing)
        return compact_psum_apply(layer, x, routing), _raw(extras, STATS_KEYS), _raw(extras, _AUX_KEYS)
    if impl == "masked_null":
        y, extras = layer.apply(x, _masked(layer, x, routing))
        stats = R.routing_stats(routing.expert_ids, layer.config.n_routed_experts)
        stats["dropped_frac"] = extras["dropped_frac"]  # 0.0: one device drops nothing
        return y, _raw(stats, STATS_KEYS), _raw(extras, _AUX_KEYS)
    y, extras = layer.apply(x, routing)
    return y, _raw(extras, STATS_KEYS), _raw(extras, _AUX_KEYS)


def forced_forward(impl: str) -> Callable:
    """forward(layer, x, null_mask): forced routing with the null mask given as data, so one executable serves
    every null fraction and mode (the mask is drawn outside the step with null_moe.routing.forced_null_mask, as
    ``layer.route_forced(key=...)`` draws it)."""

    def forward(layer, x, null_mask):
        return _layer_forward(layer, x, layer.route_forced(x, null_mask=null_mask), impl)

    return forward


def learned_forward(impl: str) -> Callable:
    """forward(layer, x, _): the layer's own router."""

    def forward(layer, x, _):
        if impl in ("null_moe", "null_moe_ep"):
            y, extras = layer(x)  # exactly what training calls
            return y, _raw(extras, STATS_KEYS), _raw(extras, _AUX_KEYS)
        return _layer_forward(layer, x, layer.route(x), impl)

    return forward


def draw_null_mask(seed: int, tokens: int, topk: int, null_frac: float, mode: str):
    """The forced null mask of a point (untimed): the key ``seed + 1``, as the bench has always drawn it."""
    import jax

    mask = R.forced_null_mask(jax.random.PRNGKey(seed + 1), tokens, topk, null_frac, mode)
    return jax.block_until_ready(mask)


# --- stock Levanter --------------------------------------------------------------------------------------------


def stock_mesh():
    """The one-device mesh Levanter's block expects to be traced under."""
    import haliax as hax
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    set_mesh = getattr(hax.partitioning, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else mesh


def build_stock(ours, x_tok, tokens: int, seed: int, dtype: str):
    """Levanter's MixtralSparseMoeBlock with ``ours``' weights (gate, w1, w2, w3) copied in, and x on its axes."""
    import equinox as eqx
    import haliax as hax
    import jax
    from levanter.models.mixtral import MixtralConfig, MixtralSparseMoeBlock

    c = ours.config
    mcfg = MixtralConfig(seq_len=tokens, hidden_dim=c.hidden_dim, intermediate_dim=c.intermediate_dim,
                         n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
                         num_heads=1, num_kv_heads=1)
    with stock_mesh():
        block = cast_floats(MixtralSparseMoeBlock.init(mcfg, key=jax.random.PRNGKey(seed)), dtype)

    def copy_linear(dst, src):
        return eqx.tree_at(lambda m: m.weight, dst, src.weight.rearrange(dst.weight.axes))

    block = eqx.tree_at(lambda b: b.gate, block, copy_linear(block.gate, ours.gate))
    for name in ("w1", "w2", "w3"):
        block = eqx.tree_at(lambda b, n=name: getattr(b.experts, n), block,
                            copy_linear(getattr(block.experts, name), getattr(ours.experts, name)))
    backend = "levanter:" + ("megablox" if getattr(block.experts.w1, "use_gmm", False) else "ragged_dot")
    return block, hax.named(x_tok.array, (mcfg.Pos, mcfg.Embed)), backend


def stock_forward(block, x, _):
    y, extras = block(x, key=None)
    return y, _raw(extras, STATS_KEYS), _raw(extras, _AUX_KEYS)


# --- the steps -------------------------------------------------------------------------------------------------


def _loss(y, aux: dict, with_aux: bool) -> Any:
    """Mean square of the output, plus the router's aux losses where training would add them."""
    import jax.numpy as jnp

    loss = jnp.mean(jnp.square(getattr(y, "array", y).astype(jnp.float32)))
    if with_aux:
        for v in aux.values():
            loss = loss + jnp.asarray(v, dtype=jnp.float32).sum()
    return loss


def make_steps(forward: Callable, model, with_aux: bool):
    """(forward_step, forward_backward_step, params): pure functions of (params, x, data), model statics closed
    over. forward_step returns (y, stats); forward_backward_step ((loss, grads for params and x), stats)."""
    import equinox as eqx
    import jax

    params, static = eqx.partition(model, eqx.is_array)

    def fwd(params, x, data):
        y, stats, _ = forward(eqx.combine(params, static), x, data)
        return y, stats

    def loss_fn(diff, data):
        y, stats, aux = forward(eqx.combine(diff[0], static), diff[1], data)
        return _loss(y, aux, with_aux), stats

    def fwd_bwd(params, x, data):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)((params, x), data)
        return (loss, grads), stats

    return fwd, fwd_bwd, params
