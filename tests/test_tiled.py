"""The tiled CPU kernels at the tile height that ships (``tile_rows`` left at its default), against float64 numpy.

The other kernel tests pin ``tile_rows`` to 8 or 16, where there is one tile height and no round-up. Here every
call leaves ``tile_rows`` unset, and the group sizes (data, so each function compiles once) are chosen to reach
every branch of ``tile_loop`` at the default: groups of several big tiles, a remainder rounded up to one more big
tile (also at the end of the rows, where that tile is shifted back over earlier experts' rows), small tiles after
big ones, small tiles shifted back at the end, remainders at the round-up boundary, empty experts, and null rows
(NaN-poisoned) past the real ones. Outputs and every gradient are compared with per-group float64 loops that
share nothing with the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe import experts as X
from null_moe import tiled as TL
from null_moe.gmm import grouped_matmul

BIG = TL.DEFAULT_TILE_ROWS
SMALL = BIG // 4
HALF = int(TL.ROUND_UP_FRAC * BIG)


def test_default_has_two_tile_heights():
    # the cases below are written for the shipped default: big tiles, a quarter-height level, round-up at half
    assert TL.tile_sizes(BIG) == (BIG, SMALL) and SMALL >= 8 and BIG >= 256
    assert TL.PLAIN_DOT_MIN_ROWS <= BIG  # big tiles of widening projections go to the dot as they are


def _assert_all_close(pairs, rtol=1e-4):
    """Every (name, got, want) compared, and all mismatches named in one failure (forward and backward apart)."""
    bad = []
    for name, got, want in pairs:
        got = np.asarray(got, np.float64)
        atol = rtol * max(1.0, float(np.max(np.abs(want), initial=0.0)))
        if not np.all(np.isfinite(got)):
            bad.append(f"{name}: not finite")
        elif not np.allclose(got, want, rtol=rtol, atol=atol):
            err = np.abs(got - want) - rtol * np.abs(want)
            bad.append(f"{name}: {int(np.sum(err > atol))} of {err.size} off, worst {float(np.max(err)) + atol:.3g}")
    assert not bad, "; ".join(bad)


# --- the grouped matmul ------------------------------------------------------------------------------------------
ROWS, K, N = 4 * BIG + HALF, 8, 16  # N > K: big forward tiles take the plain dot, small ones the transposed one
GMM_GROUPS = {
    # 2 big + a small part tile | empty | round-up big tile | 2 small | empty | 1 big + 2 small, the last shifted
    # back from the end of the rows (4 null rows after)
    "mixed": [2 * BIG + SMALL // 2 + 12, 0, HALF + 44, SMALL + SMALL // 2 + 8, 0, BIG + SMALL + 60],
    # 2 big + round-up | round-up | round-up shifted back over the previous experts' rows (104 null rows)
    "round_up_at_the_end": [3 * BIG - 36, 0, 0, HALF + 144, HALF + 44, 0],
    # tile-aligned, every row real
    "aligned_no_null_rows": [BIG, BIG, 0, 2 * BIG, SMALL, SMALL],
    # 4 big + exactly half a big tile: no round-up, two small tiles
    "one_expert_owns_all": [0, 0, ROWS, 0, 0, 0],
    # one row over half (round-up), exactly half (small tiles), around one small tile, a single row
    "round_up_boundaries": [HALF + 1, HALF, SMALL - 1, 1, SMALL + 1, 0],
    "no_real_rows": [0, 0, 0, 0, 0, 0],
}
E_GMM = 6


@functools.lru_cache(maxsize=None)
def _gmm_data():
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(20), 3)
    x = jax.random.normal(kx, (ROWS, K), jnp.float32)
    w = jax.random.normal(kw, (E_GMM, K, N), jnp.float32) / np.sqrt(K)
    cot = jax.random.normal(kc, (ROWS, N), jnp.float32)
    return x, w, cot


@jax.jit
def _gmm_value_and_grads(x, w, gs, cot):
    # tile_rows left unset: the default the layer ships with
    f = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, backend="tiled") * cot)  # noqa: E731
    return grouped_matmul(x, w, gs, backend="tiled"), jax.grad(f, (0, 1))(x, w)


def _gmm_reference(x, w, gs, cot):
    """float64 loop over the groups: y = x w[e], dx = cot w[e]^T, dw[e] = x^T cot over e's rows; 0 elsewhere."""
    x, w, cot = (np.asarray(a, np.float64) for a in (x, w, cot))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, g in enumerate(gs):
        rows = slice(start, start + g)
        y[rows] = x[rows] @ w[e]
        dx[rows] = cot[rows] @ w[e].T
        dw[e] = x[rows].T @ cot[rows]
        start += g
    return y, dx, dw


@pytest.mark.parametrize("case", list(GMM_GROUPS))
def test_tiled_gmm_at_default_tile_rows(case):
    sizes = GMM_GROUPS[case]
    assert sum(sizes) <= ROWS
    x, w, cot = _gmm_data()
    past = sum(sizes)
    # rows past the real ones (null slots) hold NaN: they must reach nothing, forward or backward
    x_nan, cot_nan = x.at[past:].set(jnp.nan), cot.at[past:].set(jnp.nan)
    y, (dx, dw) = _gmm_value_and_grads(x_nan, w, jnp.asarray(sizes, jnp.int32), cot_nan)
    y_ref, dx_ref, dw_ref = _gmm_reference(x[:past], w, sizes, cot[:past])
    _assert_all_close([("y", y[:past], y_ref), ("dx", dx[:past], dx_ref), ("dw", dw, dw_ref)])
    assert np.all(np.asarray(y[past:]) == 0) and np.all(np.asarray(dx[past:]) == 0)


def _documented_tiles(g):
    """(big, small) tiles for one expert's g rows: full big tiles, one more if over half a big tile is left, then
    small tiles rounding up (tiled.tile_loop's docstring)."""
    big = g // BIG + (g % BIG > HALF)
    return big, -(-max(g - big * BIG, 0) // SMALL)


def test_default_tile_schedule_visits_the_documented_tiles(monkeypatch):
    """Results cannot tell a slower schedule from the documented one (all valid tilings give the same numbers):
    count the tiles of each height that the forward pass visits at the default, for every case above."""
    visits = []
    original = TL.tile_loop

    def counting_tile_loop(group_sizes, tile_rows, total_rows, per_expert, per_tile, finish, carry):
        def per_tile_counted(ctx, start, valid, carry, acc, size):
            jax.debug.callback(lambda s: visits.append(int(s)), size)
            return per_tile(ctx, start, valid, carry, acc, size)

        return original(group_sizes, tile_rows, total_rows, per_expert, per_tile_counted, finish, carry)

    monkeypatch.setattr(TL, "tile_loop", counting_tile_loop)
    x, w, _ = _gmm_data()
    forward = jax.jit(lambda x, w, gs: TL._tiled_forward(x, w, gs, BIG))
    for case, sizes in GMM_GROUPS.items():
        visits.clear()
        forward(x, w, jnp.asarray(sizes, jnp.int32)).block_until_ready()
        jax.effects_barrier()
        tiles = [_documented_tiles(g) for g in sizes]
        expected = {BIG: sum(b for b, _ in tiles), SMALL: sum(s for _, s in tiles)}
        assert {BIG: visits.count(BIG), SMALL: visits.count(SMALL)} == expected and len(visits) == sum(
            expected.values()), (case, visits)


# --- the expert MLP, fused and unfused ---------------------------------------------------------------------------
T, TOPK, E, D, F = (4 * BIG + HALF) // 4, 4, 4, 8, 16  # T k = 4.5 big tiles of slot rows; E = null id
MLP_COUNTS = {
    # real slots per expert; the rest of the T k slots are null, spread at random over tokens and slots
    "mixed": [2 * BIG + SMALL // 2 + 12, 0, HALF + 44, SMALL + SMALL // 2 + 8],
    # no null slot; the last expert's round-up big tile is shifted back over the previous experts' rows
    "no_null_round_up_at_the_end": [0, 3 * BIG - 36, HALF + 144, HALF + 148],
    "round_up_boundaries": [HALF + 1, HALF, SMALL - 1, SMALL + 1],
    "one_expert_owns_all": [0, 0, T * TOPK, 0],
    "all_null": [0, 0, 0, 0],
}


@functools.lru_cache(maxsize=None)
def _mlp_case(case):
    counts = MLP_COUNTS[case]
    assert sum(counts) <= T * TOPK
    rng = np.random.default_rng(sorted(MLP_COUNTS).index(case))
    flat = np.full(T * TOPK, E)
    flat[: sum(counts)] = np.repeat(np.arange(E), counts)
    ids = rng.permutation(flat).reshape(T, TOPK)
    wts = rng.uniform(0.1, 1.0, (T, TOPK)) * (ids < E)
    return ids.astype(np.int32), wts.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _mlp_data():
    keys = jax.random.split(jax.random.PRNGKey(21), 5)
    x = jax.random.normal(keys[0], (T, D), jnp.float32)
    w1 = jax.random.normal(keys[1], (E, D, F), jnp.float32) / np.sqrt(D)
    w3 = jax.random.normal(keys[2], (E, D, F), jnp.float32) / np.sqrt(D)
    w2 = jax.random.normal(keys[3], (E, F, D), jnp.float32) / np.sqrt(F)
    cot = jax.random.normal(keys[4], (T, D), jnp.float32)
    return x, w1, w2, w3, cot


@functools.partial(jax.jit, static_argnames="fused")
def _mlp_value_and_grads(x, ids, wts, w1, w2, w3, cot, *, fused):
    def f(x, wts, w1, w2, w3):  # tile_rows left unset: the default
        return X.expert_mlp(x, ids, wts, w1, w2, w3, jax.nn.silu, backend="tiled", fused=fused)

    loss = lambda *a: jnp.sum(f(*a) * cot)  # noqa: E731
    return f(x, wts, w1, w2, w3), jax.grad(loss, (0, 1, 2, 3, 4))(x, wts, w1, w2, w3)


def _mlp_reference(x, ids, wts, w1, w2, w3, cot):
    """float64, slot by slot (vectorised over the slots): out_t = sum_j wts[t, j] silu(x_t w1[e]) (x_t w3[e]) w2[e]
    with e = ids[t, j] (null: nothing), and its gradient for the cotangent ``cot``, derived by hand."""
    x, wts, w1, w2, w3, cot = (np.asarray(a, np.float64) for a in (x, wts, w1, w2, w3, cot))
    t_idx, j_idx = np.nonzero(ids < w1.shape[0])
    e = ids[t_idx, j_idx]
    xs, g, wt = x[t_idx], cot[t_idx], wts[t_idx, j_idx][:, None]
    a = np.einsum("sd,sdf->sf", xs, w1[e])
    b = np.einsum("sd,sdf->sf", xs, w3[e])
    sig = 1.0 / (1.0 + np.exp(-a))
    act = a * sig
    h = act * b
    y = np.einsum("sf,sfd->sd", h, w2[e])
    out = np.zeros_like(x)
    np.add.at(out, t_idx, wt * y)
    dh = wt * np.einsum("sd,sfd->sf", g, w2[e])
    da = dh * b * (sig + a * sig * (1.0 - sig))
    db = dh * act
    d_wts = np.zeros_like(wts)
    d_wts[t_idx, j_idx] = np.sum(g * y, axis=1)
    dx = np.zeros_like(x)
    np.add.at(dx, t_idx, np.einsum("sf,sdf->sd", da, w1[e]) + np.einsum("sf,sdf->sd", db, w3[e]))
    dw1, dw2, dw3 = np.zeros_like(w1), np.zeros_like(w2), np.zeros_like(w3)
    np.add.at(dw1, e, np.einsum("sd,sf->sdf", xs, da))
    np.add.at(dw3, e, np.einsum("sd,sf->sdf", xs, db))
    np.add.at(dw2, e, np.einsum("sf,sd->sfd", h, wt * g))
    return out, (dx, d_wts, dw1, dw2, dw3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", list(MLP_COUNTS))
def test_expert_mlp_at_default_tile_rows(case, fused):
    ids, wts = _mlp_case(case)
    x, w1, w2, w3, cot = _mlp_data()
    out, grads = _mlp_value_and_grads(x, jnp.asarray(ids), jnp.asarray(wts), w1, w2, w3, cot, fused=fused)
    out_ref, grads_ref = _mlp_reference(x, ids, wts, w1, w2, w3, cot)
    names = ["d_x", "d_gate_weights", "d_w1", "d_w2", "d_w3"]
    _assert_all_close([("out", out, out_ref), *zip(names, grads, grads_ref)])
    if case == "all_null":
        assert np.all(np.asarray(out) == 0) and all(np.all(np.asarray(g) == 0) for g in grads)
