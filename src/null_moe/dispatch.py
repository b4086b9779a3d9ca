"""Dispatch and combine: routing -> expert-sorted rows with per-expert group sizes, and back.

Raw arrays, tokens flattened: x [T, D], expert_ids [T, k] (N = null), weights [T, k]. The T k slot rows are
sorted by expert id with nulls last, so the R = sum(group_sizes) real rows form a prefix and every row at or
past R is a null slot that the grouped matmul never computes.

Both row movements are permutations, so their transposes are gathers too: custom VJPs keep XLA from lowering
the backward pass to scatter-adds (slow and serial on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(NamedTuple):
    """How slot rows are laid out for the experts.

    sort_idx: [T k] flat slot index (t k + j) of each sorted row.
    inv_idx: [T k] sorted row of each flat slot (inverse permutation of sort_idx).
    group_sizes: [N] real rows per expert; nulls are not counted.
    num_real: scalar int32, R = sum(group_sizes).
    """

    sort_idx: jax.Array
    inv_idx: jax.Array
    group_sizes: jax.Array
    num_real: jax.Array


def make_dispatch(expert_ids: jax.Array, n_real: int) -> Dispatch:
    """Sort the T k slots by expert id (stable; null id N sorts last) and count real rows per expert."""
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    sort_idx = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inv_idx = jnp.argsort(sort_idx).astype(jnp.int32)
    group_sizes = jnp.sum(flat[:, None] == jnp.arange(n_real, dtype=jnp.int32)[None, :], axis=0, dtype=jnp.int32)
    return Dispatch(sort_idx, inv_idx, group_sizes, jnp.sum(group_sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_slots(x, sort_idx, inv_idx, k):
    return jnp.take(x, sort_idx // k, axis=0)


def _gather_slots_fwd(x, sort_idx, inv_idx, k):
    return _gather_slots(x, sort_idx, inv_idx, k), (sort_idx, inv_idx)


def _gather_slots_bwd(k, res, g):
    _, inv_idx = res
    # Row t k + j of the flat slots came from token t: gather each token's k rows back and sum them.
    per_slot = jnp.take(g, inv_idx, axis=0)
    return per_slot.reshape(-1, k, g.shape[-1]).sum(axis=1), None, None


_gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)


@jax.custom_vjp
def _permute_rows(y, perm, inv_perm):
    return jnp.take(y, perm, axis=0)


def _permute_rows_fwd(y, perm, inv_perm):
    return jnp.take(y, perm, axis=0), (perm, inv_perm)


def _permute_rows_bwd(res, g):
    _, inv_perm = res
    return jnp.take(g, inv_perm, axis=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def dispatch_rows(x: jax.Array, d: Dispatch, k: int) -> jax.Array:
    """x [T, D] -> [T k, D]: row r holds the token of sorted slot r."""
    return _gather_slots(x, d.sort_idx, d.inv_idx, k)


def combine_rows(y_sorted: jax.Array, weights: jax.Array, d: Dispatch) -> jax.Array:
    """Expert outputs in sorted order [T k, D] -> weighted sum over each token's slots [T, D].

    Rows at or past R are masked first: backends may leave them uninitialised (megablox gave NaN there), and
    0 * NaN would still be NaN.
    """
    num_tokens, k = weights.shape
    real = (jnp.arange(y_sorted.shape[0]) < d.num_real)[:, None]
    y_sorted = jnp.where(real, y_sorted, 0)
    per_slot = _permute_rows(y_sorted, d.inv_idx, d.sort_idx).reshape(num_tokens, k, -1)
    return jnp.einsum("tkd,tk->td", per_slot, weights.astype(per_slot.dtype))
