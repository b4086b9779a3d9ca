"""grouped_matmul and experts.expert_mlp against float64 per-group and per-token loops, and the backend choice.

These tests pin small tile heights (8 to 64 rows); tests/test_tiled.py runs the kernels at the default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe import experts as X
from null_moe import gmm as G
from null_moe import tiled as TL
from null_moe.gmm import grouped_matmul, resolve_backend

R, K, N, E = 100, 16, 24, 5


def _reference(x, w, gs, cot):
    """float64 loop over the groups, sharing nothing with any backend: y = x w[e], dx = cot w[e]^T,
    dw[e] = x^T cot over expert e's rows; zeros on rows past sum(gs)."""
    x, w, cot = (np.asarray(a, np.float64) for a in (x, w, cot))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, g in enumerate(np.asarray(gs).tolist()):
        rows = slice(start, start + g)
        y[rows], dx[rows], dw[e] = x[rows] @ w[e], cot[rows] @ w[e].T, x[rows].T @ cot[rows]
        start += g
    return y, (dx, dw)


GROUPS = {
    "random_with_empty": [17, 0, 40, 3, 21],  # sum 81 < R
    "all_real": [20, 20, 20, 20, 20],
    "no_real": [0, 0, 0, 0, 0],
    "one_expert_all": [0, 0, 100, 0, 0],
    "odd_sizes": [9, 1, 7, 0, 13],  # not multiples of the tile
}


@pytest.fixture(scope="module")
def data():
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    return (
        jax.random.normal(kx, (R, K)),
        jax.random.normal(kw, (E, K, N)),
        jax.random.normal(kc, (R, N)),
    )


@jax.jit
def _tiled_value_and_grads(x, w, gs, cot):
    f = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, backend="tiled", tile_rows=16) * cot)  # noqa: E731
    return grouped_matmul(x, w, gs, backend="tiled", tile_rows=16), jax.grad(f, (0, 1))(x, w)


@pytest.mark.fast
@pytest.mark.parametrize("case", sorted(GROUPS))
def test_tiled_matches_reference(data, case):
    x, w, cot = data
    gs = jnp.asarray(GROUPS[case], jnp.int32)
    y, (dx, dw) = _tiled_value_and_grads(x, w, gs, cot)
    y_ref, (dx_ref, dw_ref) = _reference(x, w, gs, cot)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    past = int(gs.sum())
    assert np.all(np.asarray(y[past:]) == 0) and np.all(np.asarray(dx[past:]) == 0)


@pytest.mark.parametrize("case", ["random_with_empty", "all_real"])
def test_both_tile_dot_layouts_match_reference(data, case, monkeypatch):
    """The tiled kernels hand tall widening tiles to the dot as they are and others transposed; with the threshold
    lowered to one row, the as-is layout runs on these tiny shapes too, forward and backward, for the grouped
    matmul and the fused expert MLP."""
    monkeypatch.setattr(TL, "PLAIN_DOT_MIN_ROWS", 1)
    x, w, cot = data
    gs = jnp.asarray(GROUPS[case], jnp.int32)
    run = jax.jit(lambda x, w, gs, cot: _tiled_value_and_grads.__wrapped__(x, w, gs, cot))  # a fresh trace
    y, (dx, dw) = run(x, w, gs, cot)
    y_ref, (dx_ref, dw_ref) = _reference(x, w, gs, cot)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    _check_expert_mlp_against_per_token_loop("tiled", True)  # traced afresh: its jit wraps new closures


def test_tiled_small_row_count_below_tile(data):
    x, w, cot = data
    gs = jnp.asarray([3, 0, 2, 0, 1], jnp.int32)
    y = grouped_matmul(x[:7], w, gs, backend="tiled", tile_rows=64)
    np.testing.assert_allclose(y, _reference(x[:7], w, gs, cot[:7])[0], atol=1e-4)


@pytest.mark.fast
def test_rows_past_real_cannot_poison(data):
    """NaN in rows >= R (where null slots sit) must not reach outputs or gradients of real rows."""
    x, w, cot = data
    gs = jnp.asarray(GROUPS["random_with_empty"], jnp.int32)
    past = int(gs.sum())
    x_nan = x.at[past:].set(jnp.nan)
    cot_nan = cot.at[past:].set(jnp.nan)
    y, (dx, dw) = _tiled_value_and_grads(x_nan, w, gs, cot_nan)
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(dw)))
    assert np.all(np.isfinite(np.asarray(dx[:past])))
    y_ref, (dx_ref, dw_ref) = _reference(x, w, gs, cot)
    np.testing.assert_allclose(y[:past], y_ref[:past], atol=2e-4)
    np.testing.assert_allclose(dw, dw_ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["ragged_dot", "megablox", "triton"])
def test_guarded_backends_match_and_mask_past_rows(data, backend):
    x, w, cot = data
    gs = jnp.asarray(GROUPS["random_with_empty"], jnp.int32)
    f = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, backend=backend) * cot)  # noqa: E731
    y = grouped_matmul(x, w, gs, backend=backend)
    dx, dw = jax.grad(f, (0, 1))(x, w)
    y_ref, (dx_ref, dw_ref) = _reference(x, w, gs, cot)
    np.testing.assert_allclose(y, y_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, atol=2e-4, rtol=1e-4)
    past = int(gs.sum())
    assert np.all(np.asarray(y[past:]) == 0) and np.all(np.asarray(dx[past:]) == 0)


def _expert_mlp_reference(x, ids, wts, w1, w2, w3):
    """Dense per-token loop: every slot's expert applied to its token, weighted, summed."""
    out = []
    for t in range(x.shape[0]):
        acc = jnp.zeros(w2.shape[2])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < w1.shape[0]:
                h = jax.nn.silu(x[t] @ w1[e]) * (x[t] @ w3[e])
                acc = acc + wts[t, j] * (h @ w2[e])
        out.append(acc)
    return jnp.stack(out)


@pytest.mark.parametrize("backend,fused", [("tiled", True), ("tiled", False), ("ragged_dot", True)])
def test_expert_mlp_matches_per_token_loop(backend, fused):
    _check_expert_mlp_against_per_token_loop(backend, fused)


def _check_expert_mlp_against_per_token_loop(backend, fused):
    t, k, d, f, e = 24, 3, 8, 12, 4
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    x = jax.random.normal(keys[0], (t, d))
    ids = jax.random.randint(keys[1], (t, k), 0, e + 1)  # e = null
    ids = ids.at[0].set(e)  # one all-null token
    wts = jax.random.uniform(keys[2], (t, k)) * (ids < e)
    w1, w3 = (jax.random.normal(kk, (e, d, f)) for kk in keys[3:5])
    w2 = jax.random.normal(keys[5], (e, f, d))
    cot = jax.random.normal(keys[0], (t, d))

    def ours(x, wts, w1, w2, w3):
        return X.expert_mlp(x, ids, wts, w1, w2, w3, jax.nn.silu, backend=backend, tile_rows=8, fused=fused)

    np.testing.assert_allclose(jax.jit(ours)(x, wts, w1, w2, w3), _expert_mlp_reference(x, ids, wts, w1, w2, w3), atol=1e-4, rtol=1e-4)
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), (0, 1, 2, 3, 4)))(x, wts, w1, w2, w3)
    dense = lambda *a: jnp.sum(_expert_mlp_reference(*a[:1], ids, *a[1:]) * cot)  # noqa: E731
    g_ref = jax.grad(dense, (0, 1, 2, 3, 4))(x, wts, w1, w2, w3)
    for name, a, b in zip(["x", "weights", "w1", "w2", "w3"], g_ours, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-4, err_msg=name)


@pytest.mark.fast
def test_tiled_visits_only_real_tiles(data):
    """Work scales with real rows: count tile visits through the loop's trip counts."""
    x, w, _ = data
    visits = []

    def counting_tile_loop(group_sizes, tile_rows, total_rows, per_expert, per_tile, finish, carry):
        def per_tile_counted(ctx, start, valid, carry, acc, size):
            jax.debug.callback(lambda s: visits.append(int(s)), size)
            return per_tile(ctx, start, valid, carry, acc, size)

        return original(group_sizes, tile_rows, total_rows, per_expert, per_tile_counted, finish, carry)

    original = TL.tile_loop
    try:
        TL.tile_loop = counting_tile_loop
        for sizes in ([0, 0, 0, 0, 0], [32, 0, 0, 0, 0], [40, 3, 17, 0, 4]):
            visits.clear()
            TL._tiled_forward(x, w, jnp.asarray(sizes, jnp.int32), 32)
            jax.effects_barrier()
            # tile_rows 32 -> heights (32, 8): full 32-row tiles (one more if over 16 rows are left), then
            # 8-row tiles rounding up
            def rows_visited(s):
                big = s // 32 + (s % 32 > 16)
                return big * 32 + -(-max(s - big * 32, 0) // 8) * 8

            expected = sum(rows_visited(s) for s in sizes)
            assert sum(visits) == expected, (sizes, visits)
    finally:
        TL.tile_loop = original


@pytest.mark.parametrize(
    "platform,expected",
    [("cpu", "tiled"), ("tpu", "megablox"), ("gpu", "triton"), ("cuda", "triton")],
)
@pytest.mark.fast
def test_auto_backend_per_platform(platform, expected, monkeypatch):
    monkeypatch.setattr(G, "_tokamax_available", lambda: True)  # installed or not, auto never picks it
    assert resolve_backend("auto", platform=platform) == expected


def test_auto_follows_the_default_platform(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto") == "megablox"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backend("auto") == "triton"


@pytest.mark.fast
def test_backend_errors():
    with pytest.raises(ValueError, match="gmm_backend"):
        resolve_backend("cublas")
    if not G._tokamax_available():
        with pytest.raises(ValueError, match="tokamax"):
            resolve_backend("tokamax")
    with pytest.raises(ValueError, match="shape"):
        grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.zeros((2,), jnp.int32))
