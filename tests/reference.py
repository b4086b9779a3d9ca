"""Slow references for the null-routed layer: per-token routing loops and a dense masked expert einsum.

Nothing here shares code with src/null_moe beyond reading the layer's parameters: routing decisions are made
token by token in numpy, the experts run densely on every token and are masked by the routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def flat_tokens(layer, x):
    """x NamedArray -> [T, D] raw, tokens in the layer's flattening order (all non-embed axes, in order)."""
    axes = tuple(ax for ax in x.axes if ax.name != "embed")
    return x.rearrange(axes + ("embed",)).array.reshape(-1, layer.config.hidden_dim)


def raw_params(layer):
    cfg = layer.config
    gate = layer.gate.weight.rearrange(("embed", "experts")).array
    null_gate = layer.null_gate.weight.rearrange(("embed", "null_logit")).array[:, 0]
    w1, w2, w3 = layer.experts.raw_weights()
    return gate, null_gate, w1, w2, w3


def expanded_logits(cfg, x, gate, null_gate):
    z = x @ gate
    m = cfg.num_null
    if m == 0:
        return z
    u = x @ null_gate
    return jnp.concatenate([z, jnp.repeat(u[:, None], m, axis=1)], axis=1)


def route_per_token(cfg, probs: np.ndarray):
    """Per-token loop over the expanded pool: slot j takes the j-th largest prob (lower id first on ties)."""
    n = cfg.n_routed_experts
    k = cfg.num_experts_per_tok
    pool_ids = np.zeros((probs.shape[0], k), np.int64)
    null = np.zeros((probs.shape[0], k), bool)
    for t in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda i: (-probs[t, i], i))[:k]
        seen_null = False
        for j, i in enumerate(order):
            pool_ids[t, j] = i
            is_null = i >= n or (cfg.take_until_null and seen_null)
            seen_null = seen_null or is_null
            null[t, j] = is_null
    return pool_ids, null


def dense_forward(layer, x_flat, pool_ids, null):
    """Differentiable reference with routing decisions held fixed (as they are piecewise constant).

    Returns (y [T, D], lbl, rzl).
    """
    cfg = layer.config
    gate, null_gate, w1, w2, w3 = raw_params(layer)
    logits = expanded_logits(cfg, x_flat, gate, null_gate)
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.take_along_axis(probs, jnp.asarray(pool_ids), axis=1)
    w = jnp.where(null, 0.0, top)
    if cfg.renormalize_real:
        s = w.sum(-1, keepdims=True)
        w = jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 0.0)
    n = cfg.n_routed_experts
    expert_of_slot = np.where(null, n, pool_ids)  # [T, k], n = null
    onehot = jnp.asarray(expert_of_slot[..., None] == np.arange(n))  # [T, k, N]
    mix = jnp.einsum("tk,tke->te", w, onehot.astype(w.dtype))  # gate weight per (token, expert)
    act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}[cfg.activation]
    h = act(jnp.einsum("td,edf->tef", x_flat, w1)) * jnp.einsum("td,edf->tef", x_flat, w3)
    y_all = jnp.einsum("tef,efd->ted", h, w2)
    y = jnp.einsum("ted,te->td", y_all, mix)
    # aux losses, literally from DESIGN.md
    t, k = pool_ids.shape
    m = cfg.num_null
    counts = np.array([(expert_of_slot == i).sum() for i in range(n)], np.float64)
    if m:
        counts = np.concatenate([counts, np.full(m, (t * k - counts.sum()) / m)])
    loads = counts / (t * k)
    f = loads * (n + m) / k
    lbl = (cfg.lbl_coef or 0.0) * jnp.sum(jnp.asarray(f, jnp.float32) * probs.mean(0))
    rzl = (cfg.rzl_coef or 0.0) * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return y, lbl, rzl


def reference_stats(cfg, expert_of_slot: np.ndarray):
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    real = expert_of_slot < n
    per_tok = real.sum(1)
    counts = np.array([(expert_of_slot == i).sum() for i in range(n)], np.float64)
    loads = counts / max(counts.sum(), 1.0)
    return {
        "null_frac": 1.0 - real.mean(),
        "experts_per_token": per_tok.mean(),
        "all_null_frac": (per_tok == 0).mean(),
        "real_per_token_hist": np.array([(per_tok == c).mean() for c in range(k + 1)]),
        "expert_loads": loads,
        "load_violation_max": n * loads.max() - 1.0,
        "routing_entropy": -(loads * np.log(loads + 1e-6)).sum(),
    }
