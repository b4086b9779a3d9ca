"""Grouped matmul over expert-sorted rows, with work proportional to the real rows.

Rows of ``x`` are sorted by expert: expert e owns rows [offset_e, offset_e + group_sizes[e]); rows at or past
R = sum(group_sizes) belong to no expert (null slots) and are "don't care" for callers. Every backend returns
zeros there and gives them zero cotangent, so nothing from those rows can poison results or gradients.

Backends (chosen in exactly one place, :func:`resolve_backend`):

- ``tiled``: this project's CPU kernel. Each expert's rows are cut into tiles of ``tile_rows``; a loop with a
  dynamic trip count visits only the tiles that hold real rows, so forward, dX and dW all cost O(R), not O(T k).
- ``megablox``: the TPU Pallas kernel that Haliax's ``gmm_sharded`` wraps; it visits only tiles of real groups.
- ``tokamax``: tokamax's ``ragged_dot`` (GPU, Hopper); used when the package is installed.
- ``ragged_dot``: ``jax.lax.ragged_dot``; the reference. On CPU it runs every group densely whatever R is.

All raw arrays here: ``x`` [R, K], ``w`` [E, K, N], ``group_sizes`` [E] int32.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .config import GMM_BACKENDS

# Measured on the 2-core development CPU (docs/RESULTS.md, "tile size"): 256 rows gave the best time at
# 100% real rows at K=512, N=1024, and within noise of 128 at 10% real rows.
DEFAULT_TILE_ROWS = 512


# ---------------------------------------------------------------------------------------------------------------
# Backend choice: the one place that maps a request + platform to what runs.
# ---------------------------------------------------------------------------------------------------------------
def _tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def resolve_backend(requested: str = "auto", platform: Optional[str] = None) -> str:
    """The backend that runs for ``requested`` on ``platform`` (default: ``jax.default_backend()``).

    auto: cpu -> tiled, tpu -> megablox, gpu -> tokamax if installed else ragged_dot.
    """
    if requested not in GMM_BACKENDS:
        raise ValueError(f"gmm_backend must be one of {GMM_BACKENDS}, got {requested!r}")
    platform = (platform or jax.default_backend()).lower()
    if requested != "auto":
        if requested == "tokamax" and not _tokamax_available():
            raise ValueError("gmm_backend='tokamax' needs the tokamax package (pip install tokamax)")
        return requested
    if platform == "tpu":
        return "megablox"
    if platform in ("gpu", "cuda", "rocm"):
        return "tokamax" if _tokamax_available() else "ragged_dot"
    return "tiled"


def _real_row_mask(num_rows: int, group_sizes: jax.Array) -> jax.Array:
    return jnp.arange(num_rows) < jnp.sum(group_sizes)


# ---------------------------------------------------------------------------------------------------------------
# The tiled CPU kernel.
# ---------------------------------------------------------------------------------------------------------------
def _tile_loop(group_sizes, tile_rows: int, total_rows: int, per_expert, per_tile, finish_expert, carry):
    """Runs ``per_tile`` over the row tiles of every expert, and nothing for rows past the real ones.

    Expert e's rows [offset_e, offset_e + g_e) are covered by floor(g_e / tile_rows) full tiles, then by
    ceil(rest / small) tiles of small = tile_rows // 4 rows: big tiles keep the matmuls near dense speed,
    small ones keep the padding waste under ``small`` rows per expert. Both trip counts are dynamic, so empty
    experts and null rows cost nothing. A tile that would run off the end of the rows is shifted back to fit;
    ``valid`` marks the rows of the tile that belong to expert e and to no earlier tile of e, so writes
    masked by it are exact however tiles overlap.

    per_expert(e) -> ctx; per_tile(ctx, start, valid, carry, acc, size) -> (carry, acc), ``size`` the static
    tile height; finish_expert(e, ctx, carry, acc) -> carry, with acc starting at ctx.get("acc0").
    """
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    offsets = ends - group_sizes
    small = max(8, tile_rows // 4)
    num_big = group_sizes // tile_rows
    num_small = (group_sizes - num_big * tile_rows + small - 1) // small

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
        state = jax.lax.fori_loop(0, num_big[e], tiles(tile_rows, first, end, ctx), state)
        rest = first + num_big[e] * tile_rows
        state = jax.lax.fori_loop(0, num_small[e], tiles(small, rest, end, ctx), state)
        return finish_expert(e, ctx, *state)

    return jax.lax.fori_loop(0, group_sizes.shape[0], expert_body, carry)


def _expert_weight(w, e):
    # The barrier makes XLA copy w[e] out once per expert; without it XLA:CPU fuses the dynamic slice into
    # every tile's dot and runs at about half of dense speed (measured at 256 and 512-row tiles).
    return jax.lax.optimization_barrier(jax.lax.dynamic_index_in_dim(w, e, keepdims=False))


def _rows(a, start, tile_rows):
    return jax.lax.dynamic_slice_in_dim(a, start, tile_rows, axis=0)


def _masked_write(buf, start, valid, value):
    old = _rows(buf, start, value.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(valid[:, None], value.astype(buf.dtype), old), start, 0)


def _mm(a, b, *, transpose_b=False):
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


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
        y = _mm(_rows(x, start, size), ctx["w"], transpose_b=transpose_w)
        return _masked_write(out, start, valid, y), acc

    out = jnp.zeros((total, n_out), x.dtype)
    out = _tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, lambda e, c, o, a: o, out)
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
    return _tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, finish, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_gmm(x, w, group_sizes, tile_rows):
    return _tiled_forward(x, w, group_sizes, tile_rows)


def _tiled_gmm_fwd(x, w, group_sizes, tile_rows):
    return _tiled_forward(x, w, group_sizes, tile_rows), (x, w, group_sizes)


def _tiled_gmm_bwd(tile_rows, res, g):
    x, w, group_sizes = res
    dx = _tiled_forward(g, w, group_sizes, tile_rows, transpose_w=True)
    dw = _tiled_weight_grad(x, g, group_sizes, tile_rows, w.shape[0]).astype(w.dtype)
    return dx, dw, None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# --- fused gated projection: act(x @ w1) * (x @ w3), both matmuls and the activation per real tile -------------
def _tiled_glu_forward(x, w1, w3, group_sizes, tile_rows, act):
    rows = x.shape[0]
    x = _pad_rows(x, tile_rows)
    total, f = x.shape[0], w1.shape[2]

    def per_expert(e):
        return {
            "w1": _expert_weight(w1, e),
            "w3": _expert_weight(w3, e),
        }

    def per_tile(ctx, start, valid, bufs, acc, size):
        xt = _rows(x, start, size)
        a, b = _mm(xt, ctx["w1"]), _mm(xt, ctx["w3"])
        h, pre_a, pre_b = bufs
        h = _masked_write(h, start, valid, act(a) * b)
        return (h, _masked_write(pre_a, start, valid, a), _masked_write(pre_b, start, valid, b)), acc

    bufs = tuple(jnp.zeros((total, f), x.dtype) for _ in range(3))
    h, a, b = _tile_loop(group_sizes, tile_rows, total, per_expert, per_tile, lambda e, c, o, acc: o, bufs)
    return h[:rows], a[:rows], b[:rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tiled_glu(x, w1, w3, group_sizes, tile_rows, act):
    return _tiled_glu_forward(x, w1, w3, group_sizes, tile_rows, act)[0]


def _tiled_glu_fwd(x, w1, w3, group_sizes, tile_rows, act):
    h, a, b = _tiled_glu_forward(x, w1, w3, group_sizes, tile_rows, act)
    return h, (x, w1, w3, group_sizes, a, b)


def _tiled_glu_bwd(tile_rows, act, res, g):
    x, w1, w3, group_sizes, a, b = res
    rows = x.shape[0]
    x, a, b, g = (_pad_rows(t, tile_rows) for t in (x, a, b, g))
    total, d = x.shape
    f = w1.shape[2]

    def per_expert(e):
        zeros = jnp.zeros((d, f), jnp.float32)
        return {
            "w1": _expert_weight(w1, e),
            "w3": _expert_weight(w3, e),
            "acc0": (zeros, zeros),
        }

    def per_tile(ctx, start, valid, dx, acc, size):
        keep = valid[:, None]
        xt = jnp.where(keep, _rows(x, start, size), 0)
        at = jnp.where(keep, _rows(a, start, size), 0).astype(jnp.float32)
        bt = jnp.where(keep, _rows(b, start, size), 0).astype(jnp.float32)
        gt = jnp.where(keep, _rows(g, start, size), 0).astype(jnp.float32)
        act_a, act_vjp = jax.vjp(act, at)
        (da,) = act_vjp(gt * bt)
        db = gt * act_a
        da, db = da.astype(x.dtype), db.astype(x.dtype)
        dxt = _mm(da, ctx["w1"], transpose_b=True) + _mm(db, ctx["w3"], transpose_b=True)
        dw1, dw3 = acc
        return _masked_write(dx, start, valid, dxt), (dw1 + _mm_tn(xt, da), dw3 + _mm_tn(xt, db))

    def finish(e, ctx, carry, acc):
        dx, dw1, dw3 = carry
        put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, e, 0)  # noqa: E731
        return dx, put(dw1, acc[0]), put(dw3, acc[1])

    def per_tile_carry(ctx, start, valid, carry, acc, size):
        dx, dw1, dw3 = carry
        dx, acc = per_tile(ctx, start, valid, dx, acc, size)
        return (dx, dw1, dw3), acc

    e_count = w1.shape[0]
    init = (
        jnp.zeros((total, d), x.dtype),
        jnp.zeros((e_count, d, f), jnp.float32),
        jnp.zeros((e_count, d, f), jnp.float32),
    )
    dx, dw1, dw3 = _tile_loop(group_sizes, tile_rows, total, per_expert, per_tile_carry, finish, init)
    return dx[:rows], dw1.astype(w1.dtype), dw3.astype(w3.dtype), None


_tiled_glu.defvjp(_tiled_glu_fwd, _tiled_glu_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Other backends, with rows past the real ones guarded.
# ---------------------------------------------------------------------------------------------------------------
@jax.custom_vjp
def _zero_cotangent_past(x, group_sizes):
    """Identity on x whose cotangent is zeroed on rows >= sum(group_sizes).

    megablox leaves those rows of dX uninitialised (NaN seen on CPU); without this guard they would reach the
    dispatch gather's transpose and poison the gradient of every token.
    """
    return x


def _zero_cotangent_past_fwd(x, group_sizes):
    return x, group_sizes


def _zero_cotangent_past_bwd(group_sizes, g):
    keep = _real_row_mask(g.shape[0], group_sizes)[:, None]
    return jnp.where(keep, g, 0), None


_zero_cotangent_past.defvjp(_zero_cotangent_past_fwd, _zero_cotangent_past_bwd)


def _megablox_gmm(x, w, group_sizes):
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    rows, k_in = x.shape
    n_out = w.shape[2]
    tm = 512 if rows >= 512 else max(8, -(-rows // 8) * 8)
    padded = -(-rows // tm) * tm
    xp = jnp.pad(x, ((0, padded - rows), (0, 0))) if padded != rows else x
    tiling = (tm, min(k_in, 1024), min(n_out, 1024))
    out = megablox_gmm(
        xp,
        w,
        group_sizes.astype(jnp.int32),
        preferred_element_type=x.dtype,
        tiling=tiling,
        interpret=jax.default_backend() != "tpu",
    )
    return out[:rows]


def _tokamax_gmm(x, w, group_sizes):
    import tokamax

    return tokamax.ragged_dot(x, w, group_sizes.astype(jnp.int32))


def _ragged_dot_gmm(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=x.dtype)


_GUARDED = {"megablox": _megablox_gmm, "tokamax": _tokamax_gmm, "ragged_dot": _ragged_dot_gmm}


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------------------------
def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    tile_rows: Optional[int] = None,
) -> jax.Array:
    """Per-expert matmul over expert-sorted rows.

    Args:
        x: [R, K] rows sorted by expert; rows >= sum(group_sizes) belong to no expert.
        w: [E, K, N] one weight per expert.
        group_sizes: [E] int rows per expert, sum <= R.
        backend: see :func:`resolve_backend`.
        tile_rows: row tile of the tiled backend (default :data:`DEFAULT_TILE_ROWS`).

    Returns:
        [R, N]: x[r] @ w[expert(r)] on real rows; zeros past them (and zero cotangent there).
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"expected x [R, K], w [E, K, N], group_sizes [E]; got {x.shape}, {w.shape}, {group_sizes.shape}")
    if x.shape[1] != w.shape[1] or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}")
    name = resolve_backend(backend)
    with jax.named_scope(f"gmm_{name}"):
        if name == "tiled":
            return _tiled_gmm(x, w, group_sizes, tile_rows or DEFAULT_TILE_ROWS)
        x = _zero_cotangent_past(x, group_sizes)
        out = _GUARDED[name](x, w, group_sizes)
        return jnp.where(_real_row_mask(x.shape[0], group_sizes)[:, None], out, 0)


def grouped_glu(
    x: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    group_sizes: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    backend: str = "auto",
    tile_rows: Optional[int] = None,
) -> jax.Array:
    """act(x @ w1[e]) * (x @ w3[e]) over expert-sorted rows: the gated half of a Mixtral expert.

    On the tiled backend both projections and the activation run inside one loop over the real tiles (forward
    and backward), so no elementwise work is spent on null rows. Other backends compose
    :func:`grouped_matmul`. x [R, D], w1/w3 [E, D, F] -> [R, F], zeros past the real rows.
    """
    name = resolve_backend(backend)
    if name == "tiled":
        with jax.named_scope("glu_tiled"):
            return _tiled_glu(x, w1, w3, group_sizes, tile_rows or DEFAULT_TILE_ROWS, act)
    a = grouped_matmul(x, w1, group_sizes, backend=name)
    b = grouped_matmul(x, w3, group_sizes, backend=name)
    return act(a) * b
