"""Routing: router logits -> which expert (or null) each of a token's k slots uses, with what gate weight.

Pure functions over raw arrays with tokens flattened: T tokens, N real experts, M null copies, k slots.
Conventions: ``expert_ids`` [T, k] int32 in 0..N, where N means null; ``weights`` [T, k] with 0 on null
slots; slots in descending router score order.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, get_args

import jax
import jax.numpy as jnp

#: How the benchmark's forced routing nulls slots (see :func:`forced_null_mask`).
NullMode = Literal["independent", "take_until_null"]
NULL_MODES: tuple[str, ...] = get_args(NullMode)


class Routing(NamedTuple):
    """The routing decision for T tokens (raw arrays; the layer names the axes).

    expert_ids: [T, k] int32, real expert id or N for a null slot.
    weights: [T, k] gate weight of each slot, 0 on null slots.
    probs: [T, P] router probabilities over the pool the load-balancing loss is taken over (N + M for learned
        routing, N for forced routing).
    logits: [T, P] the logits behind ``probs`` (router z-loss).
    """

    expert_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array


def expand_logits(real_logits: jax.Array, null_logit: jax.Array, num_null: int) -> jax.Array:
    """[T, N] real logits and [T] null logit -> [T, N + M]: z followed by u repeated M times."""
    copies = jnp.broadcast_to(null_logit[:, None], null_logit.shape + (num_null,)).astype(real_logits.dtype)
    return jnp.concatenate([real_logits, copies], axis=-1)


def _null_after_first_null(is_null: jax.Array) -> jax.Array:
    """take_until_null: a slot is null once any earlier (higher-scored) slot is."""
    return jnp.cumsum(is_null.astype(jnp.int32), axis=-1) > 0


def gate_weights(top_probs: jax.Array, is_null: jax.Array, renormalize_real: bool) -> jax.Array:
    """Real slots keep their prob, null slots get 0; optionally renormalised over the real slots.

    A token with no real slot gets all-zero weights; the guarded division keeps its gradient finite.
    """
    weights = jnp.where(is_null, 0.0, top_probs)
    if renormalize_real:
        total = jnp.sum(weights, axis=-1, keepdims=True)
        weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    return weights


def learned_routing(
    real_logits: jax.Array,
    null_logit: Optional[jax.Array],
    *,
    k: int,
    num_null: int,
    take_until_null: bool,
    renormalize_real: bool,
    null_bias: Optional[jax.Array] = None,
) -> Routing:
    """Top-k over the N real logits and M copies of the learned null logit (docs/DESIGN.md, learned routing).

    The M copies share one logit, so they tie: once one enters a token's top-k, every later slot is a copy too
    while copies remain. With M >= k this is already take-until-null and ``take_until_null`` changes nothing;
    with M < k it also nulls the real slots ranked after the copies run out.

    Args:
        real_logits: [T, N] z = gate(x).
        null_logit: [T] u = null_gate(x); ignored when num_null == 0.
        null_bias: None (null_control="loss": exactly the routing above), or the null-fraction controller's bias
            b, [] or [T], added to the M copies' scores for the top-k selection only: slots are the top-k of
            softmax(z, u + b, ..., u + b), in that order, while their gate weights, ``probs`` and ``logits`` (what
            the aux losses read) stay those of the unbiased (z, u, ..., u). It carries no gradient.
    """
    n_real = real_logits.shape[-1]
    logits = expand_logits(real_logits, null_logit, num_null) if num_null else real_logits
    probs = jax.nn.softmax(logits, axis=-1)
    if null_bias is None or not num_null:
        # top-k on probs, as stock Levanter does, so ties break identically at p = 0.
        top_probs, top_ids = jax.lax.top_k(probs, k)
    else:
        bias = jnp.broadcast_to(jax.lax.stop_gradient(null_bias).astype(logits.dtype), real_logits.shape[:1])
        offset = jnp.concatenate(
            [jnp.zeros_like(real_logits), jnp.broadcast_to(bias[:, None], bias.shape + (num_null,))], axis=-1
        )
        # the same selection rule on the biased scores (softmax, then top-k): b = 0 selects exactly as above
        _, top_ids = jax.lax.top_k(jax.nn.softmax(logits + offset, axis=-1), k)
        top_probs = jnp.take_along_axis(probs, top_ids, axis=-1)
    is_null = top_ids >= n_real
    if take_until_null:
        is_null = _null_after_first_null(is_null)
    expert_ids = jnp.where(is_null, n_real, top_ids).astype(jnp.int32)
    weights = gate_weights(top_probs, is_null, renormalize_real)
    return Routing(expert_ids, weights, probs, logits)


# --- the null-fraction controller (null_control="bias") --------------------------------------------------------
def null_bias_update(null_bias: jax.Array, null_frac: jax.Array, target: float, rate: float) -> jax.Array:
    """The controller's rule, applied once per training step: b <- b + rate (p - realized null fraction).

    Up when the step routed fewer slots to null than p, down when more; the step is proportional to the error, so
    the bias settles where the realized fraction meets p (an integral controller: a constant offset in the
    router's own preference is cancelled, not just reduced).
    """
    return null_bias + rate * (target - null_frac)


def null_bias_signal(null_bias: jax.Array, null_frac: jax.Array, target: float) -> jax.Array:
    """A term worth exactly 0 whose gradient with respect to ``null_bias`` is the control error (realized - p).

    Added to a training loss it hands the error to the optimizer as the bias's gradient g; an optimizer that
    updates the bias by ``-rate * g`` (and nothing else) applies :func:`null_bias_update`. Gradients of the
    mean loss over equal microbatches average the per-microbatch errors: the error of the whole batch.
    """
    error = jax.lax.stop_gradient(null_frac - target).astype(jnp.float32)
    surrogate = null_bias.astype(jnp.float32) * error
    return surrogate - jax.lax.stop_gradient(surrogate)


def slot_null_prob(null_frac: float, k: int, mode: NullMode) -> float:
    """Per-slot mask probability q that makes the expected null fraction equal ``null_frac``.

    independent: q = p. take_until_null: slot j is null iff one of slots 0..j is masked, so the expected null
    fraction is (1/k) sum_{j<k} (1 - (1 - q)^(j + 1)), increasing in q; solved by bisection.
    """
    if mode not in NULL_MODES:
        raise ValueError(f"null_routing_mode must be one of {NULL_MODES}, got {mode!r}")
    if not 0.0 <= null_frac < 1.0:
        raise ValueError(f"null_route_frac must be in [0, 1), got {null_frac!r}")
    if mode == "independent" or k == 1 or null_frac == 0.0:
        return float(null_frac)

    def expected(q):
        return sum(1.0 - (1.0 - q) ** (j + 1) for j in range(k)) / k

    lo, hi = 0.0, null_frac
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(mid) < null_frac else (lo, mid)
    return 0.5 * (lo + hi)


def _stratified_uniform(key: jax.Array, num: int, columns: int) -> jax.Array:
    """[num, columns] uniforms whose every column holds exactly one value in each [i/num, (i+1)/num).

    Marginally each entry is U(0, 1), so per-slot probabilities are exact; stratifying over tokens removes the
    sampling noise of the realized fraction (error <= 1/num per column instead of ~1/sqrt(num)).
    """
    k_perm, k_jit = jax.random.split(key)
    strata = jnp.broadcast_to(jnp.arange(num, dtype=jnp.float32), (columns, num))
    strata = jax.random.permutation(k_perm, strata, axis=1, independent=True).T
    return (strata + jax.random.uniform(k_jit, (num, columns))) / num


def forced_null_mask(key: jax.Array, num_tokens: int, k: int, null_frac: float, mode: NullMode) -> jax.Array:
    """[T, k] bool: which slots the benchmark's forced routing sends to null.

    independent: each slot null with probability p, stratified per slot column.
    take_until_null: the number of real slots c in 0..k is drawn from its law under per-slot masking with
    q = slot_null_prob(p) (P(c = j) = (1-q)^j q for j < k, (1-q)^k for j = k), by one stratified uniform per
    token; slots c.. are null. Expected null fraction p, realized within O(k / T) of it.
    """
    q = slot_null_prob(null_frac, k, mode)
    if mode == "independent":
        return _stratified_uniform(key, num_tokens, k) < q
    u = _stratified_uniform(key, num_tokens, 1)[:, 0]
    # P(c > j) = (1 - q)^(j + 1): c = number of j in 0..k-1 with u < (1-q)^(j+1).
    survive = (1.0 - q) ** jnp.arange(1, k + 1, dtype=jnp.float32)
    real_count = jnp.sum(u[:, None] < survive[None, :], axis=-1)
    return jnp.arange(k)[None, :] >= real_count[:, None]


def routing_with_null_mask(real_logits: jax.Array, null_mask: jax.Array, *, renormalize_real: bool) -> Routing:
    """Stock top-k over the real logits, then ``null_mask`` [T, k] (True = null) sends slots to null.

    k is ``null_mask.shape[-1]``. The pool of the aux losses is the N real experts.
    """
    n_real, k = real_logits.shape[-1], null_mask.shape[-1]
    probs = jax.nn.softmax(real_logits, axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs, k)
    top_ids = top_ids.astype(jnp.int32)
    expert_ids = jnp.where(null_mask, n_real, top_ids)
    weights = gate_weights(top_probs, null_mask, renormalize_real)
    return Routing(expert_ids, weights, probs, real_logits)


def forced_routing(
    real_logits: jax.Array,
    key: jax.Array,
    *,
    k: int,
    null_frac: float,
    mode: NullMode,
    renormalize_real: bool,
) -> Routing:
    """Benchmark routing: stock top-k over the real logits, then a random null mask at the target fraction."""
    null_mask = forced_null_mask(key, real_logits.shape[0], k, null_frac, mode)
    return routing_with_null_mask(real_logits, null_mask, renormalize_real=renormalize_real)


# --- aux losses and statistics ----------------------------------------------------------------------------------
def real_assignment_counts(expert_ids: jax.Array, n_real: int) -> jax.Array:
    """[N] int32 number of slots assigned to each real expert (null slots, id N, are not counted).

    The one place rows per expert are counted: dispatch's group sizes, the load-balancing loss and the load
    statistics all read it.
    """
    one_hot = expert_ids.reshape(-1)[:, None] == jnp.arange(n_real, dtype=expert_ids.dtype)[None, :]
    return jnp.sum(one_hot, axis=0, dtype=jnp.int32)


def load_balancing_loss(routing: Routing, n_real: int, coef: float, groups: int = 1, pool: str = "all") -> jax.Array:
    """Levanter's formula over the N + M pool, null assignments split evenly over the M copies.

    loads_i = assignments_i / (T k), f_i = loads_i (N + M) / k, P_i = mean_t probs_i, loss = coef sum_i f_i P_i.
    With M = 0 (and for forced routing, whose pool is the N real experts) this is stock Levanter's loss.
    ``groups`` > 1 splits the T tokens into that many consecutive equal groups (e.g. sequences), takes the loss
    of each and returns their mean: loads are then measured per group, not over the whole batch.
    ``pool="real"`` (for a routing whose pool has null copies) takes the same formula over the N real experts
    only, as if the real assignments were all the slots: loads_i = assignments_i / R (R real assignments, at least
    1), f_i = loads_i N / k, P_i = mean_t softmax(z_t)_i over the real logits. It balances the real experts among
    themselves and gives the null logit no gradient; at M = 0 it is the formula above.
    """
    num_tokens, k = routing.expert_ids.shape
    if groups < 1 or num_tokens % groups:
        raise ValueError(f"groups must divide the {num_tokens} tokens, got {groups}")
    if pool not in ("all", "real"):
        raise ValueError(f"pool must be 'all' or 'real', got {pool!r}")
    size = routing.probs.shape[-1]
    num_null = size - n_real
    real_only = pool == "real" and num_null > 0
    probs = jax.nn.softmax(routing.logits[:, :n_real], axis=-1) if real_only else routing.probs
    size = probs.shape[-1]

    def one(expert_ids, probs):
        t = expert_ids.shape[0]
        counts = real_assignment_counts(expert_ids, n_real).astype(jnp.float32)
        if real_only:
            total = jnp.maximum(jnp.sum(counts), 1.0)
        else:
            total = t * k
            if num_null:
                null_total = t * k - jnp.sum(counts)
                counts = jnp.concatenate([counts, jnp.full((num_null,), null_total / num_null)])
        loads = jax.lax.stop_gradient(counts / total)
        f = loads * size / k
        return jnp.sum(f * jnp.mean(probs.astype(jnp.float32), axis=0))

    if groups == 1:
        return coef * one(routing.expert_ids, probs)
    per_group = jax.vmap(one)(routing.expert_ids.reshape(groups, -1, k), probs.reshape(groups, -1, size))
    return coef * jnp.mean(per_group)


def router_z_loss(routing: Routing, coef: float) -> jax.Array:
    """coef * mean_t logsumexp(logits_t)^2 over the routing pool (expanded logits for learned routing)."""
    lse = jax.nn.logsumexp(routing.logits.astype(jnp.float32), axis=-1)
    return coef * jnp.mean(lse**2)


def routing_stats(expert_ids: jax.Array, n_real: int) -> dict[str, jax.Array]:
    """Null-routing statistics of one layer, all without gradient.

    null_frac: fraction of the T k slots that are null; experts_per_token: mean real slots per token;
    real_per_token_hist: [k + 1] fraction of tokens with 0..k real slots; all_null_frac: fraction of tokens
    with no real slot; expert_loads: [N] fraction of real assignments per expert (zeros if there are none);
    load_violation_max: N max(load) - 1; routing_entropy: -sum load log load (Levanter's definition).
    """
    expert_ids = jax.lax.stop_gradient(expert_ids)
    k = expert_ids.shape[-1]
    is_real = expert_ids < n_real
    real_per_token = jnp.sum(is_real, axis=-1)
    counts = real_assignment_counts(expert_ids, n_real).astype(jnp.float32)
    total_real = jnp.sum(counts)
    loads = counts / jnp.maximum(total_real, 1.0)
    hist = jnp.mean(real_per_token[:, None] == jnp.arange(k + 1)[None, :], axis=0, dtype=jnp.float32)
    return {
        "null_frac": 1.0 - jnp.mean(is_real, dtype=jnp.float32),
        "experts_per_token": jnp.mean(real_per_token, dtype=jnp.float32),
        "real_per_token_hist": hist,
        "all_null_frac": hist[0],
        "expert_loads": loads,
        "load_violation_max": n_real * jnp.max(loads) - 1.0,
        "routing_entropy": -jnp.sum(loads * jnp.log(loads + 1e-6)),
    }
