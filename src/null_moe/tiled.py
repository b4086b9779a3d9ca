"""The tiled CPU kernels: loops over only the row tiles of real experts, with dynamic trip counts.

Rows are expert-sorted: expert e owns [offset_e, offset_e + group_sizes[e]); rows past R = sum(group_sizes) are
null slots and are never visited, forward or backward, so the work is O(R) rather than O(T k).

Two kernels share :func:`tile_loop`:

- :func:`tiled_gmm`: y = x @ w[e] per sorted row (custom VJP: dX and dW loop over the same tiles).
- :func:`tiled_expert_mlp`: the whole gated expert MLP with dispatch and combine fused in. Each tile gathers
  its tokens' rows, runs act(x w1) * (x w3) w2, and scatter-adds gate-weighted results into the [T, D] output,
  so no [T k, D] dispatch buffer is built. The two [T k, F] pre-activations are stashed for the backward pass:
  those buffers are allocated and zero-filled at full size (a fixed cost per call that does not fall with the
  null fraction), though only real rows are written or read. The backward pass is one loop too.

Raw arrays only; the layer names axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# 512-row tiles run the per-tile matmul near dense speed on the development CPU, smaller ones fall off
# (docs/RESULTS.md, "tile size"); remainders use smaller tiles (see tile_sizes).
DEFAULT_TILE_ROWS = 512
ROUND_UP_FRAC = 0.5


def tile_sizes(tile_rows: int) -> tuple[int, ...]:
    """Tile heights for one expert's rows, largest first: tile_rows, then tile_rows / 4 (if >= 8) for the rest.

    A third level of 32-row tiles made the layer slower at null 0.5 (many weight-bandwidth-bound small
    matmuls; docs/RESULTS.md, "tile size"), so two levels it is.
    """
    return (tile_rows, tile_rows // 4) if tile_rows // 4 >= 8 else (tile_rows,)


def tile_loop(group_sizes, tile_rows: int, total_rows: int, per_expert, per_tile, finish_expert, carry):
    """Runs ``per_tile`` over the row tiles of every expert, and nothing for rows past the real ones.

    Expert e's rows [offset_e, offset_e + g_e) are covered by tiles of each height in :func:`tile_sizes`
    (512 then 128 rows by default): as many full big tiles as fit, one more if the rest exceeds
    ``ROUND_UP_FRAC`` of a big tile, then small tiles rounding up. Big tiles keep the matmuls near dense speed,
    small ones bound the padding waste per expert, which matters when null routing leaves each expert a
    hundred rows or so. All trip counts are dynamic, so empty experts and null rows
    cost nothing. A tile that would run off the end of the rows is shifted back to fit; ``valid`` marks the
    rows of the tile that belong to expert e and to no earlier tile of e, so writes masked by it are exact
    however tiles overlap.

    per_expert(e) -> ctx; per_tile(ctx, start, valid, carry, acc, size) -> (carry, acc), ``size`` the static
    tile height; finish_expert(e, ctx, carry, acc) -> carry, with acc starting at ctx.get("acc0").
    """
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    offsets = ends - group_sizes
    sizes = tile_sizes(tile_rows)

    def tiles(size, first, end, ctx):
        local_rows = jnp.arange(size, dtype=jnp.int32)

        def tile_body(j, state):
            carry, acc = state
            want = first + j * size
            start = jnp.minimum(want, total_rows - size)
            rows = start + local_rows
            valid = (rows >= want) & (rows < end)
            return per_tile(ctx, start, valid, carry, acc, size)

        return tile_body

    def expert_body(e, carry):
        ctx = per_expert(e)
        first, end = offsets[e], ends[e]
        state = (carry, ctx.get("acc0"))
        for level, size in enumerate(sizes):
            left = jnp.maximum(end - first, 0)
            if level == len(sizes) - 1:
                count = (left + size - 1) // size
            else:
                # One more big tile when the rest is over half of one: a part-empty big tile costs less than three
                # or four small, weight-bandwidth-bound ones (docs/RESULTS.md, "tile size").
                count = left // size + (left % size > ROUND_UP_FRAC * size)
            state = jax.lax.fori_loop(0, count, tiles(size, first, end, ctx), state)
            first = first + count * size
        return finish_expert(e, ctx, *state)

    return jax.lax.fori_loop(0, group_sizes.shape[0], expert_body, carry)


def _expert_weight(w, e):
    # The barrier makes XLA copy w[e] out once per expert; without it XLA:CPU fuses the dynamic slice into
    # every tile's dot, which runs far below dense speed (docs/RESULTS.md, "tile size").
    return jax.lax.optimization_barrier(jax.lax.dynamic_index_in_dim(w, e, keepdims=False))


def _rows(a, start, tile_rows):
    return jax.lax.dynamic_slice_in_dim(a, start, tile_rows, axis=0)


def _masked_write(buf, start, valid, value):
    old = _rows(buf, start, value.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(valid[:, None], value.astype(buf.dtype), old), start, 0)


def _t(a):
    # A real transposed copy: the barrier stops XLA's simplifier from folding the transpose back into the dot.
    return jax.lax.optimization_barrier(a.T)


def _mm_t(at, b):
    """at^T @ b: at [K, M], b [K, N] -> [M, N], f32 accumulation."""
    return jax.lax.dot_general(at, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# Row tiles at least this tall, projecting to at least as many columns as they have, go to the dot as they are.
PLAIN_DOT_MIN_ROWS = 512


def _dot_rows(xt, w):
    """xt [M, K] @ w [K, N] -> [M, N] in f32, in the operand layout XLA:CPU runs fastest for this tile.

    Handing the row tile over transposed, so that the dot contracts over its major axis, runs short tiles and
    narrowing tiles much faster on XLA:CPU; only tall tiles that widen are faster as they are. The figures are in
    docs/RESULTS.md ("operand layout"), reproduced by ``scripts/bench/probe_cpu.py``.
    """
    if xt.shape[0] >= PLAIN_DOT_MIN_ROWS and w.shape[1] >= xt.shape[1]:
        return jax.lax.dot_general(xt, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return _mm_t(_t(xt), w)


def _w_dot_rows(w, xt):
    """w [K, N] @ xt [M, N]^T -> [K, M] in f32 (the transpose of xt @ w^T, in the layout XLA:CPU runs fastest)."""
    return jax.lax.dot_general(w, xt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_rows_wt(xt, w):
    """xt [M, N] @ w [K, N]^T -> [M, K] in f32."""
    return _t(_w_dot_rows(w, xt))


def _mm_tn(a, b):
    """a^T @ b over the row axis, accumulated in f32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _pad_rows(x, tile_rows):
    short = tile_rows - x.shape[0]
    return jnp.pad(x, ((0, short), (0, 0))) if short > 0 else x


def _tiled_forward(x, w, group_sizes, tile_rows, transpose_w=False):
    """y[r] = x[r] @ w[e(r)] (or @ w[e(r)]^T) over real rows; zeros past them. x [R, K] -> [R, N]."""
    rows = x.shape[0]
    x = _pad_rows(x, tile_rows)
    total = x.shape[0]
    n_out = w.shape[1] if transpose_w else w.shape[2]

    def per_expert(e):
        return {"w": _expert_weight(w, e)}

    def per_tile(ctx, start, valid, out, acc, size):
        xt = _rows(x, start, size)
        y = _dot_rows_wt(xt, ctx["w"]) if transpose_w else _dot_rows(xt, ctx["w"])
        return _masked_write(out, start, valid, y), acc

    out = jnp.zeros((total, n_out), x.dtype)
    out = tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, lambda e, c, o, a: o, out)
    return out[:rows]


def _tiled_weight_grad(x, dy, group_sizes, tile_rows, num_experts):
    """dw[e] = sum over expert e's real rows of x[r]^T dy[r]. x [R, K], dy [R, N] -> [E, K, N] (f32)."""
    x, dy = _pad_rows(x, tile_rows), _pad_rows(dy, tile_rows)
    total = x.shape[0]
    k_in, n_out = x.shape[1], dy.shape[1]

    def per_expert(e):
        return {"acc0": jnp.zeros((k_in, n_out), jnp.float32)}

    def per_tile(ctx, start, valid, carry, acc, size):
        xt = jnp.where(valid[:, None], _rows(x, start, size), 0)
        gt = jnp.where(valid[:, None], _rows(dy, start, size), 0)
        return carry, acc + _mm_tn(xt, gt)

    def finish(e, ctx, dw, acc):
        return jax.lax.dynamic_update_index_in_dim(dw, acc, e, 0)

    dw = jnp.zeros((num_experts, k_in, n_out), jnp.float32)
    return tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, finish, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_gmm(x, w, group_sizes, tile_rows):
    return _tiled_forward(x, w, group_sizes, tile_rows)


def _tiled_gmm_fwd(x, w, group_sizes, tile_rows):
    return _tiled_forward(x, w, group_sizes, tile_rows), (x, w, group_sizes)


def _tiled_gmm_bwd(tile_rows, res, g):
    x, w, group_sizes = res
    dx = _tiled_forward(g, w, group_sizes, tile_rows, transpose_w=True)
    dw = _tiled_weight_grad(x, g, group_sizes, tile_rows, w.shape[0]).astype(w.dtype)
    return dx, dw, None


tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# --- the fused expert MLP ---------------------------------------------------------------------------------------
def _take_rows(a, idx):
    return jnp.take(a, idx, axis=0, mode="clip")


def _mlp_forward(x, token_idx, row_w, group_sizes, w1, w2, w3, tile_rows, act):
    """Returns (out [T, D], a [S, F], b [S, F]) with S = max(T k, tile_rows) sorted rows."""
    token_idx, row_w = _pad_rows(token_idx[:, None], tile_rows)[:, 0], _pad_rows(row_w[:, None], tile_rows)[:, 0]
    total, f = token_idx.shape[0], w1.shape[2]

    def per_expert(e):
        return {"w1": _expert_weight(w1, e), "w2": _expert_weight(w2, e), "w3": _expert_weight(w3, e)}

    def per_tile(ctx, start, valid, carry, acc, size):
        out, pre_a, pre_b = carry
        idx = _rows(token_idx, start, size)
        xt = _take_rows(x, idx)
        a, b = _dot_rows(xt, ctx["w1"]), _dot_rows(xt, ctx["w3"])
        y = _dot_rows((act(a) * b).astype(x.dtype), ctx["w2"])
        wt = jnp.where(valid, _rows(row_w, start, size), 0).astype(jnp.float32)
        out = out.at[idx].add(jnp.where(valid[:, None], y * wt[:, None], 0))
        return (out, _masked_write(pre_a, start, valid, a), _masked_write(pre_b, start, valid, b)), acc

    init = (
        jnp.zeros((x.shape[0], w2.shape[2]), jnp.float32),
        jnp.zeros((total, f), x.dtype),
        jnp.zeros((total, f), x.dtype),
    )
    out, a, b = tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, lambda e, c, o, acc: o, init)
    return out.astype(x.dtype), a, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def tiled_expert_mlp(x, token_idx, row_w, group_sizes, w1, w2, w3, tile_rows, act):
    """out[t] = sum over real sorted rows r of token t: row_w[r] * (act(x_t w1[e]) * (x_t w3[e])) w2[e].

    Args:
        x: [T, D] tokens.
        token_idx: [S] int32 token of each expert-sorted slot row (S = T k).
        row_w: [S] gate weight of each sorted row (0 on null rows).
        group_sizes: [E] int real rows per expert; rows past their sum are never read.
        w1, w3: [E, D, F]; w2: [E, F, D].
    Returns:
        [T, D] routed output.
    """
    return _mlp_forward(x, token_idx, row_w, group_sizes, w1, w2, w3, tile_rows, act)[0]


def _tiled_expert_mlp_fwd(x, token_idx, row_w, group_sizes, w1, w2, w3, tile_rows, act):
    out, a, b = _mlp_forward(x, token_idx, row_w, group_sizes, w1, w2, w3, tile_rows, act)
    return out, (x, token_idx, row_w, group_sizes, w1, w2, w3, a, b)


def _tiled_expert_mlp_bwd(tile_rows, act, res, g):
    x, token_idx, row_w, group_sizes, w1, w2, w3, a, b = res
    rows = token_idx.shape[0]
    token_idx, row_w = _pad_rows(token_idx[:, None], tile_rows)[:, 0], _pad_rows(row_w[:, None], tile_rows)[:, 0]
    total = token_idx.shape[0]
    e_count, d, f = w1.shape

    def per_expert(e):
        zeros_df = jnp.zeros((d, f), jnp.float32)
        return {
            "w1": _expert_weight(w1, e),
            "w2": _expert_weight(w2, e),
            "w3": _expert_weight(w3, e),
            "acc0": (zeros_df, jnp.zeros((f, d), jnp.float32), zeros_df),
        }

    def per_tile(ctx, start, valid, carry, acc, size):
        dx, d_row_w, dw1_all, dw2_all, dw3_all = carry
        keep = valid[:, None]
        idx = _rows(token_idx, start, size)
        xt = jnp.where(keep, _take_rows(x, idx), 0)
        gt = jnp.where(keep, _take_rows(g, idx), 0).astype(jnp.float32)
        wt = jnp.where(valid, _rows(row_w, start, size), 0).astype(jnp.float32)
        at = jnp.where(keep, _rows(a, start, size), 0).astype(jnp.float32)
        bt = jnp.where(keep, _rows(b, start, size), 0).astype(jnp.float32)
        act_a, act_vjp = jax.vjp(act, at)
        h = act_a * bt
        # d out / d h_r = row_w[r] g_t w2^T; and d out / d row_w[r] = <g_t, h_r w2> = <g_t w2^T, h_r>
        u = _dot_rows_wt(gt.astype(x.dtype), ctx["w2"])
        d_row_w = _masked_write(d_row_w[:, None], start, valid, jnp.sum(u * h, axis=-1, keepdims=True))[:, 0]
        dh = u * wt[:, None]
        (da,) = act_vjp(dh * bt)
        db = dh * act_a
        da, db = da.astype(x.dtype), db.astype(x.dtype)
        dxt = _t(_w_dot_rows(ctx["w1"], da) + _w_dot_rows(ctx["w3"], db))
        dx = dx.at[idx].add(jnp.where(keep, dxt, 0))
        dw1, dw2, dw3 = acc
        gw = (gt * wt[:, None]).astype(x.dtype)
        acc = (dw1 + _mm_tn(xt, da), dw2 + _mm_tn(h.astype(x.dtype), gw), dw3 + _mm_tn(xt, db))
        return (dx, d_row_w, dw1_all, dw2_all, dw3_all), acc

    def finish(e, ctx, carry, acc):
        dx, d_row_w, dw1_all, dw2_all, dw3_all = carry
        put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, e, 0)  # noqa: E731
        return dx, d_row_w, put(dw1_all, acc[0]), put(dw2_all, acc[1]), put(dw3_all, acc[2])

    init = (
        jnp.zeros(x.shape, jnp.float32),
        jnp.zeros((total,), jnp.float32),
        jnp.zeros(w1.shape, jnp.float32),
        jnp.zeros(w2.shape, jnp.float32),
        jnp.zeros(w3.shape, jnp.float32),
    )
    dx, d_row_w, dw1, dw2, dw3 = tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, finish, init)
    return (
        dx.astype(x.dtype),
        None,
        d_row_w[:rows].astype(row_w.dtype),
        None,
        dw1.astype(w1.dtype),
        dw2.astype(w2.dtype),
        dw3.astype(w3.dtype),
    )


tiled_expert_mlp.defvjp(_tiled_expert_mlp_fwd, _tiled_expert_mlp_bwd)
