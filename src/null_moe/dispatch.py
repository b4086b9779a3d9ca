"""Dispatch and combine: routing -> expert-sorted rows with per-expert group sizes, and back.

Raw arrays, tokens flattened: x [T, D], expert_ids [T, k] (N = null), weights [T, k]. The T k slot rows are
sorted by expert id with nulls last, so the R = sum(group_sizes) real rows form a prefix and every row at or
past R is a null slot that no grouped matmul computes.

Both row movements are permutations, so their transposes are gathers too: custom VJPs keep XLA from lowering
the backward pass to scatter-adds (slow and serial on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .routing import real_assignment_counts


class Dispatch(NamedTuple):
    """How slot rows are laid out for the experts: everything combine and the kernels need, derived once.

    sort_idx: [T k] int32 flat slot index (t k + j) of each sorted row.
    inv_idx: [T k] int32 sorted row of each flat slot (inverse permutation of sort_idx).
    token_idx: [T k] int32 token of each sorted row (sort_idx // k).
    row_weights: [T k] gate weight of each sorted row (0 on null rows); differentiable w.r.t. the weights.
    group_sizes: [N] int32 real rows per expert; nulls are not counted.
    num_real: scalar int32, R = sum(group_sizes).
    """

    sort_idx: jax.Array
    inv_idx: jax.Array
    token_idx: jax.Array
    row_weights: jax.Array
    group_sizes: jax.Array
    num_real: jax.Array


def make_dispatch(expert_ids: jax.Array, weights: jax.Array, n_real: int) -> Dispatch:
    """Sort the T k slots by expert id (stable; null id N sorts last); per-row token, gate weight, group sizes.

    Args:
        expert_ids: [T, k] int, real expert id or ``n_real`` for a null slot.
        weights: [T, k] gate weights (0 on null slots).
    """
    k = expert_ids.shape[-1]
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    sort_idx = jnp.argsort(flat, stable=True).astype(jnp.int32)
    # The inverse permutation by one scatter of int32 indices (a second sort would cost as much as the first).
    inv_idx = jnp.zeros_like(sort_idx).at[sort_idx].set(jnp.arange(sort_idx.shape[0], dtype=jnp.int32),
                                                          unique_indices=True)
    row_weights = _permute_rows(weights.reshape(-1, 1), sort_idx, inv_idx)[:, 0]
    group_sizes = real_assignment_counts(flat, n_real)
    return Dispatch(sort_idx, inv_idx, sort_idx // k, row_weights, group_sizes, jnp.sum(group_sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_tokens(x, token_idx, inv_idx, k):
    return jnp.take(x, token_idx, axis=0)


def _gather_tokens_fwd(x, token_idx, inv_idx, k):
    return _gather_tokens(x, token_idx, inv_idx, k), inv_idx


def _gather_tokens_bwd(k, inv_idx, g):
    # Flat slot t k + j came from token t: gather each token's k rows back in slot order and sum them.
    per_slot = jnp.take(g, inv_idx, axis=0)
    return per_slot.reshape(-1, k, g.shape[-1]).sum(axis=1), None, None


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


@jax.custom_vjp
def _permute_rows(y, perm, inv_perm):
    return jnp.take(y, perm, axis=0)


def _permute_rows_fwd(y, perm, inv_perm):
    return jnp.take(y, perm, axis=0), inv_perm


def _permute_rows_bwd(inv_perm, g):
    return jnp.take(g, inv_perm, axis=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def dispatch_rows(x: jax.Array, d: Dispatch) -> jax.Array:
    """x [T, D] -> [T k, D]: row r holds the token of sorted slot r."""
    k = d.sort_idx.shape[0] // x.shape[0]
    return _gather_tokens(x, d.token_idx, d.inv_idx, k)


def combine_rows(y_sorted: jax.Array, d: Dispatch, num_tokens: int) -> jax.Array:
    """Expert outputs in sorted order [T k, D] -> gate-weighted sum over each token's slots [T, D].

    Rows at or past R are masked first: backends may leave them uninitialised (megablox gave NaN there), and
    0 * NaN would still be NaN.
    """
    real = (jnp.arange(y_sorted.shape[0]) < d.num_real)[:, None]
    # Mask before weighting: the weights' cotangent is g * y, which must not see NaN past R.
    weighted = jnp.where(real, y_sorted, 0) * d.row_weights[:, None].astype(y_sorted.dtype)
    per_slot = _permute_rows(weighted, d.inv_idx, d.sort_idx)
    return per_slot.reshape(num_tokens, -1, y_sorted.shape[-1]).sum(axis=1)
