"""grouped_matmul / grouped_glu against jax.lax.ragged_dot, and the backend choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe import gmm as G
from null_moe.gmm import grouped_glu, grouped_matmul, resolve_backend

R, K, N, E = 100, 16, 24, 5


def _reference(x, w, gs):
    real = (jnp.arange(x.shape[0]) < gs.sum())[:, None]
    return jnp.where(real, jax.lax.ragged_dot(x, w, gs), 0.0)


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


@jax.jit
def _ref_value_and_grads(x, w, gs, cot):
    f = lambda x, w: jnp.sum(_reference(x, w, gs) * cot)  # noqa: E731
    return _reference(x, w, gs), jax.grad(f, (0, 1))(x, w)


@pytest.mark.parametrize("case", sorted(GROUPS))
def test_tiled_matches_ragged_dot(data, case):
    x, w, cot = data
    gs = jnp.asarray(GROUPS[case], jnp.int32)
    y, (dx, dw) = _tiled_value_and_grads(x, w, gs, cot)
    y_ref, (dx_ref, dw_ref) = _ref_value_and_grads(x, w, gs, cot)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    past = int(gs.sum())
    assert np.all(np.asarray(y[past:]) == 0) and np.all(np.asarray(dx[past:]) == 0)


def test_tiled_small_row_count_below_tile(data):
    x, w, cot = data
    gs = jnp.asarray([3, 0, 2, 0, 1], jnp.int32)
    y = grouped_matmul(x[:7], w, gs, backend="tiled", tile_rows=64)
    np.testing.assert_allclose(y, _reference(x[:7], w, gs), atol=1e-4)


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
    y_ref, (dx_ref, dw_ref) = _ref_value_and_grads(x, w, gs, cot)
    np.testing.assert_allclose(y[:past], y_ref[:past], atol=2e-4)
    np.testing.assert_allclose(dw, dw_ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["ragged_dot", "megablox"])
def test_guarded_backends_match_and_mask_past_rows(data, backend):
    x, w, cot = data
    gs = jnp.asarray(GROUPS["random_with_empty"], jnp.int32)
    f = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, backend=backend) * cot)  # noqa: E731
    y = grouped_matmul(x, w, gs, backend=backend)
    dx, dw = jax.grad(f, (0, 1))(x, w)
    y_ref, (dx_ref, dw_ref) = _ref_value_and_grads(x, w, gs, cot)
    np.testing.assert_allclose(y, y_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, atol=2e-4, rtol=1e-4)
    assert np.all(np.asarray(dx[int(gs.sum()):]) == 0)


def test_grouped_glu_matches_composed_reference(data):
    x, w1, cot = data
    w3 = jax.random.normal(jax.random.PRNGKey(5), w1.shape)
    gs = jnp.asarray(GROUPS["odd_sizes"], jnp.int32)

    def ours(x, w1, w3):
        return grouped_glu(x, w1, w3, gs, jax.nn.silu, backend="tiled", tile_rows=16)

    def theirs(x, w1, w3):
        return jax.nn.silu(_reference(x, w1, gs)) * _reference(x, w3, gs)

    np.testing.assert_allclose(jax.jit(ours)(x, w1, w3), theirs(x, w1, w3), atol=2e-4, rtol=1e-4)
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), (0, 1, 2)))(x, w1, w3)
    g_ref = jax.grad(lambda *a: jnp.sum(theirs(*a) * cot), (0, 1, 2))(x, w1, w3)
    for a, b in zip(g_ours, g_ref):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-4)


def test_tiled_visits_only_real_tiles(data):
    """Work scales with real rows: count tile visits through the loop's trip counts."""
    x, w, _ = data
    visits = []

    def counting_tile_loop(group_sizes, tile_rows, total_rows, per_expert, per_tile, finish, carry):
        def per_tile_counted(ctx, start, valid, carry, acc, size):
            jax.debug.callback(lambda s: visits.append(int(s)), size)
            return per_tile(ctx, start, valid, carry, acc, size)

        return original(group_sizes, tile_rows, total_rows, per_expert, per_tile_counted, finish, carry)

    original = G._tile_loop
    try:
        G._tile_loop = counting_tile_loop
        for sizes in ([0, 0, 0, 0, 0], [32, 0, 0, 0, 0], [32, 32, 32, 0, 4]):
            visits.clear()
            G._tiled_forward(x, w, jnp.asarray(sizes, jnp.int32), 16)
            jax.effects_barrier()
            small = max(8, 16 // 4)  # full 16-row tiles, then 8-row tiles for each expert's remainder
            expected = sum(s // 16 * 16 + -(-(s % 16) // small) * small for s in sizes)
            assert sum(visits) == expected, (sizes, visits)
    finally:
        G._tile_loop = original


@pytest.mark.parametrize(
    "platform,expected",
    [("cpu", "tiled"), ("tpu", "megablox"), ("gpu", "ragged_dot"), ("cuda", "ragged_dot")],
)
def test_auto_backend_per_platform(platform, expected, monkeypatch):
    monkeypatch.setattr(G, "_tokamax_available", lambda: False)
    assert resolve_backend("auto", platform=platform) == expected


def test_auto_prefers_tokamax_on_gpu_when_installed(monkeypatch):
    monkeypatch.setattr(G, "_tokamax_available", lambda: True)
    assert resolve_backend("auto", platform="gpu") == "tokamax"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto") == "megablox"


def test_backend_errors():
    with pytest.raises(ValueError, match="gmm_backend"):
        resolve_backend("cublas")
    if not G._tokamax_available():
        with pytest.raises(ValueError, match="tokamax"):
            resolve_backend("tokamax")
    with pytest.raises(ValueError, match="shape"):
        grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.zeros((2,), jnp.int32))
