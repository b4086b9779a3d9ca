"""A Pallas-Triton grouped matmul for NVIDIA GPUs whose work follows the real rows, forward and backward.

Rows of ``x`` are sorted by expert: expert e owns rows [offset_e, offset_e + group_sizes[e]) with
offset_e = sum(group_sizes[:e]); rows at or past R = sum(group_sizes) are null slots. The three kernels here
(forward, dX and dW) only multiply real rows; null rows get exact zeros in the output and in dX, and add nothing
to dW, whatever ``x`` or the cotangent hold there (NaN included).

Pallas-Triton has no dynamic grid and no scalar prefetch, so the row kernels (forward and dX) run a static grid
of ``cdiv(R_total, block_m) + E`` row tiles by output column blocks, and read what each tile does from a small
int32 schedule built in plain JAX beforehand (:func:`tile_schedule`):

- a *real* tile covers ``block_m`` rows of one expert starting at a group-relative offset (so two tiles of
  neighbouring experts may share rows of one ``block_m`` block; each row is loaded and stored only under its own
  expert's mask, so the writes never collide);
- a *zero* tile covers ``block_m`` rows of the null region [R, R_total) and stores zeros there (write-only);
- the schedule's remaining entries are *idle*: those programs load one schedule word and exit.

Each expert's rows take ``cdiv(g_e, block_m)`` tiles and the null region ``cdiv(R_total - R, block_m)``; these
sum to at most ``cdiv(R_total, block_m) + E`` (each of the E + 1 regions adds at most one partial tile), the
static grid size. The dW kernel runs one program per (expert, K block, N block) and loops over that expert's rows
with a dynamic trip count, so its cost is O(R) as well; an expert with no rows stores a zero block.

All loads past the real rows are masked (masked lanes are never read, and read as 0), so NaN in null rows
cannot leak. Accumulation is in f32; outputs take ``x.dtype`` and dW ``w.dtype``. f32 inputs use the dot's
default precision, which Triton runs as TF32 on the tensor cores (as XLA's default f32 dot does on NVIDIA).

Interpret mode is decided per lowering platform (``interpret=None``, null_moe.pallas_triton.pallas_call): a
program lowered for CUDA holds the compiled kernels, the same program on CPU runs them in Pallas interpret mode,
which is how the CPU tests exercise them. The module works with jax 0.7.2 and jax 0.11 (the version-tolerant
helpers are in null_moe.pallas_triton).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .pallas_triton import and_ as _and
from .pallas_triton import cdiv as _cdiv
from .pallas_triton import compiler_params as _triton_compiler_params  # noqa: F401  (tests read it here)
from .pallas_triton import load as _load
from .pallas_triton import multiple_of as _multiple_of
from .pallas_triton import pallas_call as _pallas_call
from .pallas_triton import store as _store

#: Default tiles: 128 x 128 output tiles; the contraction step depends on the element size so that a
#: 3- or 4-stage software pipeline of both operand tiles fits in an H100's shared memory.
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K_16BIT = 64
DEFAULT_BLOCK_K_32BIT = 32
#: 8 warps: with 4, a 128 x 128 f32 accumulator plus the tile addresses overflow the 255 registers of a thread
#: and spill (ptxas -v on the sm_90 build of these kernels); with 8 they fit (about 170 registers for bf16 inputs,
#: 210 for f32) and Triton still emits wgmma.
DEFAULT_NUM_WARPS = 8
#: Triton's tensor-core dot needs every operand dimension >= 16.
MIN_GPU_BLOCK = 16


# ---------------------------------------------------------------------------------------------------------------
# The schedules, built in plain JAX before the kernels.
# ---------------------------------------------------------------------------------------------------------------
def group_bounds(group_sizes: jax.Array, total_rows: int) -> tuple[jax.Array, jax.Array]:
    """(starts [E], ends [E]) int32 row bounds of each expert, clipped to [0, total_rows]."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), total_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def max_row_tiles(total_rows: int, num_groups: int, block_m: int) -> int:
    """Static length of the row-tile schedule: cdiv(R_total, block_m) + E (at least 1)."""
    return max(1, _cdiv(total_rows, block_m) + num_groups)


def tile_schedule(group_sizes: jax.Array, total_rows: int, block_m: int, zero_tiles: bool = True) -> jax.Array:
    """[3, max_row_tiles] int32 schedule of the row kernels: per tile (kind, row start, row end).

    kind e < E: a real tile of expert e over rows [start, min(start + block_m, end)); kind E: a zero tile over
    rows of the null region [R, total_rows); kind E + 1: idle. Real tiles come first (expert by expert, in row
    order), then the zero tiles, then the idle entries. ``zero_tiles=False`` gives the null region no tile at all
    (its rows are never written): the schedule of kernels whose callers never read those rows.
    """
    num_groups = group_sizes.shape[0]
    length = max_row_tiles(total_rows, num_groups, block_m)
    starts, ends = group_bounds(group_sizes, total_rows)
    # The null region [R, total_rows) is region E.
    region_start = jnp.concatenate([starts, ends[-1:]])
    region_end = jnp.concatenate([ends, jnp.full((1,), total_rows, jnp.int32)])
    tiles = (region_end - region_start + block_m - 1) // block_m
    if not zero_tiles:
        tiles = tiles.at[num_groups].set(0)
    first_tile = jnp.cumsum(tiles) - tiles
    i = jnp.arange(length, dtype=jnp.int32)
    # The region holding tile i: the last one whose first tile is <= i (empty regions have no tile of their own).
    region = jnp.sum(first_tile[None, :] + tiles[None, :] <= i[:, None], axis=1).astype(jnp.int32)
    used = jnp.sum(tiles)
    region_c = jnp.minimum(region, num_groups)
    start = region_start[region_c] + (i - first_tile[region_c]) * block_m
    end = region_end[region_c]
    kind = jnp.where(i < used, region_c, num_groups + 1)
    start = jnp.where(i < used, start, 0)
    end = jnp.where(i < used, end, 0)
    return jnp.stack([kind, start, end]).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------------------------
def _rows_kernel(sched_ref, a_ref, w_ref, o_ref, *, num_groups, bm, bo, bc, c_dim, o_dim, transpose_w):
    """One (output column block, row tile) program of out[r] = a[r] @ W_e (or @ W_e^T for dX).

    a [R_total, C]; w [E, C, O] (or [E, O, C] with transpose_w); out [R_total, O].
    """
    j = pl.program_id(0)
    i = pl.program_id(1)
    kind = sched_ref[0, i]
    start = sched_ref[1, i]
    end = sched_ref[2, i]
    o0 = _multiple_of(j * bo, bo)

    rows_ok = (start + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < end  # [bm, 1]
    cols_ok = None
    if o_dim % bo:
        cols_ok = (o0 + lax.broadcasted_iota(jnp.int32, (1, bo), 1)) < o_dim  # [1, bo]
    out_mask = jnp.broadcast_to(_and(rows_ok, cols_ok), (bm, bo))
    out_view = o_ref.at[pl.ds(start, bm), pl.ds(o0, bo)]

    @pl.when(kind < num_groups)
    def _real_tile():
        def body(step, acc):
            c0 = _multiple_of(step * bc, bc)
            c_ok_row = c_ok_col = None
            if c_dim % bc:
                c_ok_row = (c0 + lax.broadcasted_iota(jnp.int32, (1, bc), 1)) < c_dim
                c_ok_col = (c0 + lax.broadcasted_iota(jnp.int32, (bc, 1), 0)) < c_dim
            a = _load(a_ref.at[pl.ds(start, bm), pl.ds(c0, bc)], jnp.broadcast_to(_and(rows_ok, c_ok_row), (bm, bc)))
            if transpose_w:
                o_ok_col = None
                if o_dim % bo:
                    o_ok_col = (o0 + lax.broadcasted_iota(jnp.int32, (bo, 1), 0)) < o_dim
                w_mask = _and(o_ok_col, c_ok_row)
                w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bo, bc))
                w = _load(w_ref.at[kind, pl.ds(o0, bo), pl.ds(c0, bc)], w_mask)
                dims = (((1,), (1,)), ((), ()))
            else:
                w_mask = _and(c_ok_col, cols_ok)
                w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bc, bo))
                w = _load(w_ref.at[kind, pl.ds(c0, bc), pl.ds(o0, bo)], w_mask)
                dims = (((1,), (0,)), ((), ()))
            return acc + lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, _cdiv(c_dim, bc), body, jnp.zeros((bm, bo), jnp.float32))
        _store(out_view, acc.astype(o_ref.dtype), out_mask)

    @pl.when(kind == num_groups)
    def _zero_tile():
        _store(out_view, jnp.zeros((bm, bo), o_ref.dtype), out_mask)


def _dw_kernel(bounds_ref, x_ref, g_ref, dw_ref, *, bk, bn, br, k_dim, n_dim):
    """One (N block, K block, expert) program of dw[e] = sum over e's rows of x[r]^T g[r]."""
    jn = pl.program_id(0)
    jk = pl.program_id(1)
    e = pl.program_id(2)
    start = bounds_ref[0, e]
    end = bounds_ref[1, e]
    k0 = _multiple_of(jk * bk, bk)
    n0 = _multiple_of(jn * bn, bn)
    k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < k_dim if k_dim % bk else None
    n_ok = (n0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n_dim if n_dim % bn else None

    def body(step, acc):
        r0 = start + step * br
        rows_ok = (r0 + lax.broadcasted_iota(jnp.int32, (br, 1), 0)) < end  # [br, 1]
        x = _load(x_ref.at[pl.ds(r0, br), pl.ds(k0, bk)], jnp.broadcast_to(_and(rows_ok, k_ok), (br, bk)))
        g = _load(g_ref.at[pl.ds(r0, br), pl.ds(n0, bn)], jnp.broadcast_to(_and(rows_ok, n_ok), (br, bn)))
        return acc + lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    steps = (jnp.maximum(end - start, 0) + br - 1) // br
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
    mask = None
    if k_ok is not None or n_ok is not None:
        k_ok_col = (k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < k_dim if k_dim % bk else None
        mask = jnp.broadcast_to(_and(k_ok_col, n_ok), (bk, bn))
    _store(dw_ref.at[e, pl.ds(k0, bk), pl.ds(n0, bn)], acc.astype(dw_ref.dtype), mask)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Config:
    interpret: Optional[bool]  # None: per lowering platform (null_moe.pallas_triton.pallas_call)
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    zero_null_rows: bool

    def call(self, kernel, *, out_shape, grid, name):
        return _pallas_call(kernel, out_shape=out_shape, grid=grid, name=name, interpret=self.interpret,
                            num_warps=self.num_warps, num_stages=self.num_stages)


def _rows_matmul(a, w, group_sizes, cfg: _Config, *, transpose_w: bool):
    """out[r] = a[r] @ w[e(r)] (or @ w[e(r)]^T) on real rows; zeros on rows past them (or unwritten: see
    ``zero_null_rows``)."""
    rows, c_dim = a.shape
    num_groups = w.shape[0]
    o_dim = w.shape[1] if transpose_w else w.shape[2]
    bm, bo, bc = cfg.block_m, cfg.block_n, cfg.block_k
    sched = tile_schedule(group_sizes, rows, bm, zero_tiles=cfg.zero_null_rows)
    kernel = functools.partial(
        _rows_kernel,
        num_groups=num_groups,
        bm=bm,
        bo=bo,
        bc=bc,
        c_dim=c_dim,
        o_dim=o_dim,
        transpose_w=transpose_w,
    )
    return cfg.call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, o_dim), a.dtype),
        grid=(_cdiv(o_dim, bo), sched.shape[1]),
        name="null_moe_gmm_dx" if transpose_w else "null_moe_gmm",
    )(sched, a, w.astype(a.dtype))


def _weight_grad(x, g, group_sizes, num_groups: int, out_dtype, cfg: _Config):
    """dw[e] = x[rows of e]^T g[rows of e] -> [E, K, N] in ``out_dtype``."""
    rows, k_dim = x.shape
    n_dim = g.shape[1]
    starts, ends = group_bounds(group_sizes, rows)
    bounds = jnp.stack([starts, ends]).astype(jnp.int32)
    bk, bn, br = cfg.block_m, cfg.block_n, cfg.block_k
    kernel = functools.partial(_dw_kernel, bk=bk, bn=bn, br=br, k_dim=k_dim, n_dim=n_dim)
    return cfg.call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
        grid=(_cdiv(n_dim, bn), _cdiv(k_dim, bk), num_groups),
        name="null_moe_gmm_dw",
    )(bounds, x, g.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, cfg):
    return _rows_matmul(x, w, group_sizes, cfg, transpose_w=False)


def _gmm_fwd(x, w, group_sizes, cfg):
    return _rows_matmul(x, w, group_sizes, cfg, transpose_w=False), (x, w, group_sizes)


def _gmm_bwd(cfg, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _rows_matmul(dy, w, group_sizes, cfg, transpose_w=True)
    dw = _weight_grad(x, dy, group_sizes, w.shape[0], w.dtype, cfg)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check_block(name: str, value: int, interpret: Optional[bool]) -> None:
    """Any positive block runs in interpret mode; the compiled kernel (interpret False, or None, which compiles on
    GPU platforms) needs powers of two >= 16."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if interpret is not True and (value < MIN_GPU_BLOCK or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= {MIN_GPU_BLOCK} for the Triton kernel, got {value}")


def triton_gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    interpret: Optional[bool] = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: Optional[int] = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: Optional[int] = None,
    zero_null_rows: bool = True,
) -> jax.Array:
    """Grouped matmul over expert-sorted rows whose forward, dX and dW touch only the real rows.

    Args:
        x: [R_total, K] rows sorted by expert; rows >= sum(group_sizes) belong to no expert.
        w: [E, K, N] one weight per expert.
        group_sizes: [E] int rows per expert, sum <= R_total (groups are clipped at R_total otherwise).
        interpret: True runs Pallas interpret mode, False the compiled Triton kernels; None (default) decides
            per lowering platform: compiled for CUDA/ROCm, interpreted elsewhere (null_moe.pallas_triton).
        block_m, block_n: output tile (rows x columns for forward and dX; K x N for dW).
        block_k: contraction step (K for forward, N for dX, rows for dW); None: 64 for 16-bit inputs,
            32 for 32-bit. Compiled, all three must be powers of two >= 16.
        num_warps, num_stages: Triton launch parameters (num_stages None: 4 for 16-bit inputs, 3 otherwise).
        zero_null_rows: write exact zeros to the output and dX rows past the real ones (default). False leaves
            them unwritten (their contents are undefined), so the work is the real rows' alone: for callers that
            never read those rows.

    Returns:
        [R_total, N] in x.dtype: x[r] @ w[e(r)] on real rows, exact zeros past them (undefined there with
        ``zero_null_rows=False``); differentiable in x (cotangent zero past the real rows, unless
        ``zero_null_rows=False``) and w (f32 accumulation, cast to w.dtype; rows past the real ones never read).
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"expected x [R, K], w [E, K, N], group_sizes [E]; got {x.shape}, {w.shape}, {group_sizes.shape}")
    if x.shape[1] != w.shape[1] or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}")
    small = jnp.dtype(x.dtype).itemsize <= 2
    if block_k is None:
        block_k = DEFAULT_BLOCK_K_16BIT if small else DEFAULT_BLOCK_K_32BIT
    if num_stages is None:
        num_stages = 4 if small else 3
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _check_block(name, value, interpret)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[2]), x.dtype)
    interp = None if interpret is None else bool(interpret)
    cfg = _Config(interp, block_m, block_n, block_k, int(num_warps), int(num_stages), bool(zero_null_rows))
    return _gmm(x, w, group_sizes.astype(jnp.int32), cfg)
