"""Dispatch/combine against plain gathers and a per-token loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe.dispatch import combine_rows, dispatch_rows, make_dispatch

pytestmark = pytest.mark.fast  # the fast tier (scripts/run_tests.sh --fast)

N = 4


def _case():
    ids = jnp.array([[2, 4], [0, 2], [4, 4], [3, 1], [1, 4]], jnp.int32)  # 4 = null
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    w = jax.random.uniform(jax.random.PRNGKey(1), (5, 2)) * (ids < N)
    return ids, x, w


def test_sorted_rows_nulls_last_and_group_sizes_real_only():
    ids, x, w = _case()
    d = make_dispatch(ids, w, N)
    flat = np.asarray(ids).ravel()
    sorted_ids = flat[np.asarray(d.sort_idx)]
    assert list(sorted_ids) == sorted(flat)
    np.testing.assert_array_equal(d.group_sizes, [1, 2, 2, 1])
    assert int(d.num_real) == 6
    np.testing.assert_array_equal(np.asarray(d.sort_idx)[np.asarray(d.inv_idx)], np.arange(10))
    np.testing.assert_array_equal(d.token_idx, np.asarray(d.sort_idx) // 2)
    np.testing.assert_array_equal(d.row_weights, np.asarray(w).ravel()[np.asarray(d.sort_idx)])
    xs = dispatch_rows(x, d)
    np.testing.assert_allclose(xs, np.asarray(x)[np.asarray(d.sort_idx) // 2])


def test_combine_is_weighted_slot_sum_and_masks_past_rows():
    ids, x, w = _case()
    d = make_dispatch(ids, w, N)
    y_sorted = dispatch_rows(x, d) * 2.0
    y_sorted = y_sorted.at[int(d.num_real):].set(jnp.nan)  # a backend that left null rows uninitialised
    out = combine_rows(y_sorted, d, 5)
    want = np.zeros((5, 3))
    for t in range(5):
        for j in range(2):
            if ids[t, j] < N:
                want[t] += float(w[t, j]) * 2.0 * np.asarray(x[t])
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_custom_vjps_match_autodiff_of_plain_gathers():
    ids, x, w = _case()
    cot = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
    d = make_dispatch(ids, w, N)

    def ours(x, w):
        d = make_dispatch(ids, w, N)
        ys = jnp.sin(dispatch_rows(x, d)).at[int(d.num_real):].set(jnp.nan)  # NaN past R must not leak into grads
        return jnp.sum(combine_rows(ys, d, 5) * cot)

    def plain(x, w):
        xs = x[d.sort_idx // 2]
        ys = jnp.where((jnp.arange(10) < d.num_real)[:, None], jnp.sin(xs), 0)
        per_slot = ys[d.inv_idx].reshape(5, 2, 3)
        return jnp.sum(jnp.einsum("tkd,tk->td", per_slot, w) * cot)

    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_make_dispatch_degenerate_cases():
    """All slots null: no real rows, every group empty. No slot null: R = T k."""
    x = jnp.ones((3, 2))
    all_null = make_dispatch(jnp.full((3, 2), N, jnp.int32), jnp.zeros((3, 2)), N)
    assert int(all_null.num_real) == 0 and not np.any(np.asarray(all_null.group_sizes))
    np.testing.assert_array_equal(combine_rows(dispatch_rows(x, all_null), all_null, 3), np.zeros((3, 2)))
    none_null = make_dispatch(jnp.array([[0, 1], [1, 2], [3, 0]], jnp.int32), jnp.ones((3, 2)), N)
    assert int(none_null.num_real) == 6
    np.testing.assert_array_equal(none_null.group_sizes, [2, 2, 1, 1])
