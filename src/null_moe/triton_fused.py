"""The fused GPU expert path: gather, the gated MLP and combine in Pallas-Triton kernels that touch real rows only.

Inputs are this device's tokens and a dispatch (null_moe.dispatch): the T k slots sorted by expert, nulls last,
so the R = sum(group_sizes) real rows form a prefix of the S = T k sorted rows. Every per-slot buffer here
([S, F] pre-activations, [S, D] expert outputs) is allocated at its static size, but only its first R rows are
ever written or read, and only by these kernels: no XLA op reads or writes a per-slot row, so the work of a step
follows R in the forward and backward passes alike. (Rows past R are never written; their contents are undefined
and nothing reads them.)

Forward (four kernels, in the order they run):

- ``up``: per real row tile of one expert, loads the tokens' rows of x by index (no gathered copy of x), computes
  a = x w1[e] and b = x w3[e] with two accumulators, and in its epilogue stores a, b (the pre-activations, kept
  for the backward pass) and h = act(a) b.
- ``down``: y = g_r * (h w2[e]) per real row, the gate weight g_r applied in the epilogue.
- ``combine``: out[t] = sum over t's real slots of y[row of the slot]; a slot is real exactly when its sorted row
  is < R, so null slots are never loaded. One program per (token tile, D block); no scatter, no atomics.

Backward, from the cotangent G [T, D]:

- ``down_bwd``: per real row tile, u = G[t] w2[e]^T (G's rows loaded by token index), then in the epilogue
  dh = g_r u, da = dh b act'(a), db = dh act(a), and the gate weight's gradient <u, h> (summed over F inside
  the program).
- ``dx_rows``: dxs = da w1[e]^T + db w3[e]^T per real row; then ``combine`` sums each token's real slots into dx.
- weight gradients, one program per (expert, output block), looping over that expert's real rows only:
  dw1 / dw3 = x[t]^T da / db (x gathered by token, both from one load of x), dw2 = h^T (g_r G[t]) (G gathered and
  weighted in the loads).

Accumulation is in f32; a, b, h, y and dxs are stored in x's dtype, and h is computed from the stored (rounded)
a and b, so the backward pass differentiates exactly the forward that ran. Weight gradients come out in the
weights' dtype, dx in x's, the gate weights' gradient in their dtype.

Interpret mode follows the lowering platform (null_moe.pallas_triton.pallas_call): on CPU the same kernels run
in Pallas interpret mode, which is how the tests check them against per-token references.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .config import ACTIVATIONS
from .pallas_triton import and_, cdiv, iota, load, multiple_of, pallas_call, store
from .triton_gmm import MIN_GPU_BLOCK, group_bounds, tile_schedule


# ---------------------------------------------------------------------------------------------------------------
# Tiles.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FusedTiles:
    """Tile sizes and launch parameters of the fused kernels.

    block_m: sorted rows per row tile (up, down, down_bwd, dx_rows). block_f: F columns per program of ``up``
    and per step of ``down_bwd``; block_d: D columns per program of ``down``, ``dx_rows`` and ``combine``.
    block_k: contraction step of the row kernels. block_r: rows per step of the weight-gradient kernels, whose
    output tiles are block_m x block_d (dw1, dw3: D x F; dw2: F x D). block_t: tokens per ``combine`` program.
    On a GPU every block must be a power of two >= 16; interpret mode takes any positive size.
    """

    block_m: int = 128
    block_f: int = 64
    block_d: int = 128
    block_k: int = 64
    block_r: int = 64
    block_t: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @staticmethod
    def for_dtype(dtype) -> "FusedTiles":
        """The shipped tiles for inputs of ``dtype``. 16-bit: 64-wide contraction and row steps; 32-bit: 32, so that
        three pipeline stages of the widest kernel's operand tiles (dx_rows: da, db, w1, w3) stay within an
        H100's 227 KB of shared memory (4 x 128 x 32 x 4 bytes x 3 stages = 192 KB). block_f 64 keeps down_bwd's
        epilogue (u, a, b and their products over 128 x block_f) within the registers of 8 warps."""
        if jnp.dtype(dtype).itemsize <= 2:
            return FusedTiles()
        return FusedTiles(block_k=32, block_r=32)

    def check(self, interpret: Optional[bool]) -> None:
        for field in ("block_m", "block_f", "block_d", "block_k", "block_r", "block_t"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
            if interpret is not True and (value < MIN_GPU_BLOCK or value & (value - 1)):
                raise ValueError(f"{field} must be a power of two >= {MIN_GPU_BLOCK} for the Triton kernels, got {value}")


DEFAULT_TILES = FusedTiles()  # 16-bit inputs; FusedTiles.for_dtype picks per dtype


# ---------------------------------------------------------------------------------------------------------------
# Activations inside the kernels: f(a) and f'(a) from exp alone (Pallas-Triton lowers exp everywhere).
# ---------------------------------------------------------------------------------------------------------------
def _sigmoid(a):
    return 1.0 / (1.0 + jnp.exp(-a))


def _silu(a):
    s = _sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


def _relu(a):
    pos = a > 0
    return jnp.where(pos, a, 0.0), jnp.where(pos, 1.0, 0.0)


_GELU_C = 0.7978845608028654  # sqrt(2 / pi), as jax.nn.gelu(approximate=True)


def _gelu(a):
    z = _GELU_C * (a + 0.044715 * a * a * a)
    t = 2.0 * _sigmoid(2.0 * z) - 1.0  # tanh(z)
    dz = _GELU_C * (1.0 + 3.0 * 0.044715 * a * a)
    return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dz


#: The in-kernel form of each entry of null_moe.config.ACTIVATIONS: a -> (act(a), act'(a)), in f32.
KERNEL_ACTIVATIONS: dict[str, Callable] = {"silu": _silu, "relu": _relu, "gelu": _gelu}


def activation_name(act: Callable) -> str:
    """The name of ``act`` in null_moe.config.ACTIVATIONS (the fused kernels compute it in their epilogues)."""
    for name, fn in ACTIVATIONS.items():
        if fn is act:
            return name
    raise ValueError(f"the fused Triton expert path computes only the activations {tuple(ACTIVATIONS)}, got {act!r}")


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Raw refs; "kind" is the expert of a tile (schedule from null_moe.triton_gmm.tile_schedule without zero
# tiles: kind E + 1 is idle). Loads past the real rows are masked, so they never read a null row.
# ---------------------------------------------------------------------------------------------------------------
def _tile(sched_ref, i, bm):
    kind, start, end = sched_ref[0, i], sched_ref[1, i], sched_ref[2, i]
    rows_ok = (start + iota((bm,), 0)) < end
    return kind, start, rows_ok


def _edge(c0, size, dim, axis, shape):
    """Mask of the columns c0 .. c0 + size that lie inside ``dim`` (None when ``size`` divides ``dim``)."""
    if dim % size == 0:
        return None
    return (c0 + iota(shape, axis)) < dim


def _up_kernel(sched_ref, tok_ref, x_ref, w1_ref, w3_ref, a_ref, b_ref, h_ref, *, num_groups, bm, bf, bk, d_dim,
               f_dim, act):
    j, i = pl.program_id(0), pl.program_id(1)
    kind, start, rows_ok = _tile(sched_ref, i, bm)
    f0 = multiple_of(j * bf, bf)

    @pl.when(kind < num_groups)
    def _():
        tok = load(tok_ref.at[pl.ds(start, bm)], rows_ok)
        f_ok_row = _edge(f0, bf, f_dim, 1, (1, bf))

        def body(step, accs):
            acc_a, acc_b = accs
            k0 = multiple_of(step * bk, bk)
            cols = k0 + iota((1, bk), 1)
            x_mask = and_(rows_ok[:, None], _edge(k0, bk, d_dim, 1, (1, bk)))
            xt = load(x_ref.at[tok[:, None], cols], jnp.broadcast_to(x_mask, (bm, bk)))
            w_mask = and_(_edge(k0, bk, d_dim, 0, (bk, 1)), f_ok_row)
            w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bk, bf))
            w1t = load(w1_ref.at[kind, pl.ds(k0, bk), pl.ds(f0, bf)], w_mask)
            w3t = load(w3_ref.at[kind, pl.ds(k0, bk), pl.ds(f0, bf)], w_mask)
            dims = (((1,), (0,)), ((), ()))
            acc_a = acc_a + lax.dot_general(xt, w1t, dims, preferred_element_type=jnp.float32)
            acc_b = acc_b + lax.dot_general(xt, w3t, dims, preferred_element_type=jnp.float32)
            return acc_a, acc_b

        zero = jnp.zeros((bm, bf), jnp.float32)
        acc_a, acc_b = lax.fori_loop(0, cdiv(d_dim, bk), body, (zero, zero))
        a = acc_a.astype(a_ref.dtype)
        b = acc_b.astype(b_ref.dtype)
        act_a, _ = act(a.astype(jnp.float32))
        h = (act_a * b.astype(jnp.float32)).astype(h_ref.dtype)
        mask = jnp.broadcast_to(and_(rows_ok[:, None], f_ok_row), (bm, bf))
        store(a_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], a, mask)
        store(b_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], b, mask)
        store(h_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], h, mask)


def _down_kernel(sched_ref, rw_ref, h_ref, w2_ref, y_ref, *, num_groups, bm, bd, bk, f_dim, d_dim):
    j, i = pl.program_id(0), pl.program_id(1)
    kind, start, rows_ok = _tile(sched_ref, i, bm)
    d0 = multiple_of(j * bd, bd)

    @pl.when(kind < num_groups)
    def _():
        d_ok_row = _edge(d0, bd, d_dim, 1, (1, bd))

        def body(step, acc):
            k0 = multiple_of(step * bk, bk)
            h_mask = and_(rows_ok[:, None], _edge(k0, bk, f_dim, 1, (1, bk)))
            ht = load(h_ref.at[pl.ds(start, bm), pl.ds(k0, bk)], jnp.broadcast_to(h_mask, (bm, bk)))
            w_mask = and_(_edge(k0, bk, f_dim, 0, (bk, 1)), d_ok_row)
            w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bk, bd))
            wt = load(w2_ref.at[kind, pl.ds(k0, bk), pl.ds(d0, bd)], w_mask)
            return acc + lax.dot_general(ht, wt, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, cdiv(f_dim, bk), body, jnp.zeros((bm, bd), jnp.float32))
        gate = load(rw_ref.at[pl.ds(start, bm)], rows_ok).astype(jnp.float32)
        mask = jnp.broadcast_to(and_(rows_ok[:, None], d_ok_row), (bm, bd))
        store(y_ref.at[pl.ds(start, bm), pl.ds(d0, bd)], (acc * gate[:, None]).astype(y_ref.dtype), mask)


def _combine_kernel(num_real_ref, inv_ref, y_ref, out_ref, *, k, bt, bd, t_dim, d_dim):
    j, i = pl.program_id(0), pl.program_id(1)
    t0 = multiple_of(i * bt, bt)
    d0 = multiple_of(j * bd, bd)
    num_real = num_real_ref[0]
    tok_ok = (t0 + iota((bt,), 0)) < t_dim
    cols = d0 + iota((1, bd), 1)
    d_ok = _edge(d0, bd, d_dim, 1, (1, bd))
    acc = jnp.zeros((bt, bd), jnp.float32)
    for slot in range(k):
        # a traced int32 index: jax 0.11's interpret mode cannot index a ref with a Python int next to a slice
        pos = load(inv_ref.at[pl.ds(t0, bt), jnp.int32(slot)], tok_ok)
        real = tok_ok & (pos < num_real)  # sorted rows < R are exactly the real slots
        mask = jnp.broadcast_to(and_(real[:, None], d_ok), (bt, bd))
        acc = acc + load(y_ref.at[pos[:, None], cols], mask).astype(jnp.float32)
    mask = jnp.broadcast_to(and_(tok_ok[:, None], d_ok), (bt, bd))
    store(out_ref.at[pl.ds(t0, bt), pl.ds(d0, bd)], acc.astype(out_ref.dtype), mask)


def _down_bwd_kernel(sched_ref, tok_ref, rw_ref, g_ref, w2_ref, a_ref, b_ref, da_ref, db_ref, dgate_ref, *,
                     num_groups, bm, bf, bk, d_dim, f_dim, act):
    i = pl.program_id(0)
    kind, start, rows_ok = _tile(sched_ref, i, bm)

    @pl.when(kind < num_groups)
    def _():
        tok = load(tok_ref.at[pl.ds(start, bm)], rows_ok)
        gate = load(rw_ref.at[pl.ds(start, bm)], rows_ok).astype(jnp.float32)

        def f_block(fi, dgate):
            f0 = multiple_of(fi * bf, bf)
            f_ok_row = _edge(f0, bf, f_dim, 1, (1, bf))

            def body(step, acc):
                k0 = multiple_of(step * bk, bk)
                cols = k0 + iota((1, bk), 1)
                g_mask = and_(rows_ok[:, None], _edge(k0, bk, d_dim, 1, (1, bk)))
                gt = load(g_ref.at[tok[:, None], cols], jnp.broadcast_to(g_mask, (bm, bk)))
                w_mask = and_(_edge(f0, bf, f_dim, 0, (bf, 1)), _edge(k0, bk, d_dim, 1, (1, bk)))
                w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bf, bk))
                wt = load(w2_ref.at[kind, pl.ds(f0, bf), pl.ds(k0, bk)], w_mask)  # [bf, bk] of w2[e] (F x D)
                return acc + lax.dot_general(gt, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

            u = lax.fori_loop(0, cdiv(d_dim, bk), body, jnp.zeros((bm, bf), jnp.float32))
            mask = jnp.broadcast_to(and_(rows_ok[:, None], f_ok_row), (bm, bf))
            a = load(a_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], mask).astype(jnp.float32)
            b = load(b_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], mask).astype(jnp.float32)
            act_a, act_grad = act(a)
            # the forward's h, as it was stored (rounded to the compute dtype)
            h = (act_a * b).astype(da_ref.dtype).astype(jnp.float32)
            dh = u * gate[:, None]
            store(da_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], (dh * b * act_grad).astype(da_ref.dtype), mask)
            store(db_ref.at[pl.ds(start, bm), pl.ds(f0, bf)], (dh * act_a).astype(db_ref.dtype), mask)
            return dgate + jnp.sum(jnp.where(mask, u * h, 0.0), axis=1)

        dgate = lax.fori_loop(0, cdiv(f_dim, bf), f_block, jnp.zeros((bm,), jnp.float32))
        store(dgate_ref.at[pl.ds(start, bm)], dgate, rows_ok)


def _dx_rows_kernel(sched_ref, da_ref, db_ref, w1_ref, w3_ref, dxs_ref, *, num_groups, bm, bd, bk, d_dim, f_dim):
    j, i = pl.program_id(0), pl.program_id(1)
    kind, start, rows_ok = _tile(sched_ref, i, bm)
    d0 = multiple_of(j * bd, bd)

    @pl.when(kind < num_groups)
    def _():
        d_ok_col = _edge(d0, bd, d_dim, 0, (bd, 1))

        def body(step, acc):
            k0 = multiple_of(step * bk, bk)
            g_mask = jnp.broadcast_to(and_(rows_ok[:, None], _edge(k0, bk, f_dim, 1, (1, bk))), (bm, bk))
            dat = load(da_ref.at[pl.ds(start, bm), pl.ds(k0, bk)], g_mask)
            dbt = load(db_ref.at[pl.ds(start, bm), pl.ds(k0, bk)], g_mask)
            w_mask = and_(d_ok_col, _edge(k0, bk, f_dim, 1, (1, bk)))
            w_mask = None if w_mask is None else jnp.broadcast_to(w_mask, (bd, bk))
            w1t = load(w1_ref.at[kind, pl.ds(d0, bd), pl.ds(k0, bk)], w_mask)  # [bd, bk] of w1[e] (D x F)
            w3t = load(w3_ref.at[kind, pl.ds(d0, bd), pl.ds(k0, bk)], w_mask)
            dims = (((1,), (1,)), ((), ()))
            acc = acc + lax.dot_general(dat, w1t, dims, preferred_element_type=jnp.float32)
            return acc + lax.dot_general(dbt, w3t, dims, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, cdiv(f_dim, bk), body, jnp.zeros((bm, bd), jnp.float32))
        mask = jnp.broadcast_to(and_(rows_ok[:, None], _edge(d0, bd, d_dim, 1, (1, bd))), (bm, bd))
        store(dxs_ref.at[pl.ds(start, bm), pl.ds(d0, bd)], acc.astype(dxs_ref.dtype), mask)


def _wgrad_kernel(bounds_ref, tok_ref, rw_ref, lhs_ref, *refs, n_rhs, lhs_by_token, rhs_by_token, bp, bq, br,
                  p_dim, q_dim):
    """One (Q block, P block, expert) program of out_i[e] = sum over e's real rows r of lhs[r]^T rhs_i[r].

    lhs rows are x[token(r)] (``lhs_by_token``) or the sorted row r; rhs_i rows likewise, and with
    ``rhs_by_token`` they are also scaled by the row's gate weight (dw2's g_r G[t]). Experts without rows store
    zeros.
    """
    rhs_refs, out_refs = refs[:n_rhs], refs[n_rhs:]
    jq, jp, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = bounds_ref[0, e], bounds_ref[1, e]
    p0 = multiple_of(jp * bp, bp)
    q0 = multiple_of(jq * bq, bq)
    p_ok = _edge(p0, bp, p_dim, 1, (1, bp))
    q_ok = _edge(q0, bq, q_dim, 1, (1, bq))

    def rows(ref, r0, rows_ok, c0, size, ok, by_token, tok):
        mask = jnp.broadcast_to(and_(rows_ok[:, None], ok), (br, size))
        if by_token:
            return load(ref.at[tok[:, None], c0 + iota((1, size), 1)], mask)
        return load(ref.at[pl.ds(r0, br), pl.ds(c0, size)], mask)

    def body(step, accs):
        r0 = start + step * br
        rows_ok = (r0 + iota((br,), 0)) < end
        tok = load(tok_ref.at[pl.ds(r0, br)], rows_ok) if (lhs_by_token or rhs_by_token) else None
        lhs = rows(lhs_ref, r0, rows_ok, p0, bp, p_ok, lhs_by_token, tok)
        scale = None
        if rhs_by_token:
            scale = load(rw_ref.at[pl.ds(r0, br)], rows_ok).astype(jnp.float32)
        out = []
        for acc, ref in zip(accs, rhs_refs):
            rhs = rows(ref, r0, rows_ok, q0, bq, q_ok, rhs_by_token, tok)
            if scale is not None:
                rhs = (rhs.astype(jnp.float32) * scale[:, None]).astype(lhs.dtype)
            out.append(acc + lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
        return tuple(out)

    steps = (jnp.maximum(end - start, 0) + br - 1) // br
    zero = jnp.zeros((bp, bq), jnp.float32)
    accs = lax.fori_loop(0, steps, body, tuple(zero for _ in range(n_rhs)))
    mask = and_(_edge(p0, bp, p_dim, 0, (bp, 1)), q_ok)
    mask = None if mask is None else jnp.broadcast_to(mask, (bp, bq))
    for acc, ref in zip(accs, out_refs):
        store(ref.at[e, pl.ds(p0, bp), pl.ds(q0, bq)], acc.astype(ref.dtype), mask)


# ---------------------------------------------------------------------------------------------------------------
# The kernels as functions of arrays.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Run:
    tiles: FusedTiles
    interpret: Optional[bool]
    act: str

    def call(self, kernel, *, out_shape, grid, name):
        return pallas_call(kernel, out_shape=out_shape, grid=grid, name=name, interpret=self.interpret,
                           num_warps=self.tiles.num_warps, num_stages=self.tiles.num_stages)


def _schedule(group_sizes, rows, run: _Run):
    return tile_schedule(group_sizes, rows, run.tiles.block_m, zero_tiles=False)


def _up(x, tok, group_sizes, w1, w3, run: _Run):
    s_rows, (num_groups, d_dim, f_dim) = tok.shape[0], w1.shape
    t = run.tiles
    sched = _schedule(group_sizes, s_rows, run)
    kernel = functools.partial(_up_kernel, num_groups=num_groups, bm=t.block_m, bf=t.block_f, bk=t.block_k,
                               d_dim=d_dim, f_dim=f_dim, act=KERNEL_ACTIVATIONS[run.act])
    rows = jax.ShapeDtypeStruct((s_rows, f_dim), x.dtype)
    return run.call(kernel, out_shape=(rows, rows, rows), grid=(cdiv(f_dim, t.block_f), sched.shape[1]),
                    name="null_moe_fused_up")(sched, tok, x, w1.astype(x.dtype), w3.astype(x.dtype))


def _down(h, row_w, group_sizes, w2, run: _Run):
    s_rows, (num_groups, f_dim, d_dim) = h.shape[0], w2.shape
    t = run.tiles
    sched = _schedule(group_sizes, s_rows, run)
    kernel = functools.partial(_down_kernel, num_groups=num_groups, bm=t.block_m, bd=t.block_d, bk=t.block_k,
                               f_dim=f_dim, d_dim=d_dim)
    return run.call(kernel, out_shape=jax.ShapeDtypeStruct((s_rows, d_dim), h.dtype),
                    grid=(cdiv(d_dim, t.block_d), sched.shape[1]), name="null_moe_fused_down")(
        sched, row_w, h, w2.astype(h.dtype))


def _combine(rows_sorted, inv, num_real, out_dtype, run: _Run):
    t_dim, k = inv.shape
    d_dim = rows_sorted.shape[1]
    t = run.tiles
    kernel = functools.partial(_combine_kernel, k=k, bt=t.block_t, bd=t.block_d, t_dim=t_dim, d_dim=d_dim)
    return run.call(kernel, out_shape=jax.ShapeDtypeStruct((t_dim, d_dim), out_dtype),
                    grid=(cdiv(d_dim, t.block_d), cdiv(t_dim, t.block_t)), name="null_moe_fused_combine")(
        jnp.reshape(num_real, (1,)).astype(jnp.int32), inv, rows_sorted)


def _down_bwd(g, tok, row_w, group_sizes, w2, a, b, run: _Run):
    s_rows, (num_groups, f_dim, d_dim) = tok.shape[0], w2.shape
    t = run.tiles
    sched = _schedule(group_sizes, s_rows, run)
    kernel = functools.partial(_down_bwd_kernel, num_groups=num_groups, bm=t.block_m, bf=t.block_f, bk=t.block_k,
                               d_dim=d_dim, f_dim=f_dim, act=KERNEL_ACTIVATIONS[run.act])
    rows = jax.ShapeDtypeStruct((s_rows, f_dim), a.dtype)
    return run.call(kernel, out_shape=(rows, rows, jax.ShapeDtypeStruct((s_rows,), jnp.float32)),
                    grid=(sched.shape[1],), name="null_moe_fused_down_bwd")(
        sched, tok, row_w, g, w2.astype(a.dtype), a, b)


def _dx_rows(da, db, group_sizes, w1, w3, run: _Run):
    s_rows, (num_groups, d_dim, f_dim) = da.shape[0], w1.shape
    t = run.tiles
    sched = _schedule(group_sizes, s_rows, run)
    kernel = functools.partial(_dx_rows_kernel, num_groups=num_groups, bm=t.block_m, bd=t.block_d, bk=t.block_k,
                               d_dim=d_dim, f_dim=f_dim)
    return run.call(kernel, out_shape=jax.ShapeDtypeStruct((s_rows, d_dim), da.dtype),
                    grid=(cdiv(d_dim, t.block_d), sched.shape[1]), name="null_moe_fused_dx_rows")(
        sched, da, db, w1.astype(da.dtype), w3.astype(da.dtype))


def _wgrad(lhs, rhs: tuple, tok, row_w, group_sizes, out_dtype, run: _Run, *, lhs_by_token, rhs_by_token, name):
    """[E, P, Q] per rhs: sum over each expert's real rows of lhs[r]^T rhs[r] (see _wgrad_kernel)."""
    s_rows = tok.shape[0]
    num_groups = group_sizes.shape[0]
    p_dim, q_dim = lhs.shape[1], rhs[0].shape[1]
    t = run.tiles
    starts, ends = group_bounds(group_sizes, s_rows)
    bounds = jnp.stack([starts, ends]).astype(jnp.int32)
    kernel = functools.partial(_wgrad_kernel, n_rhs=len(rhs), lhs_by_token=lhs_by_token, rhs_by_token=rhs_by_token,
                               bp=t.block_m, bq=t.block_d, br=t.block_r, p_dim=p_dim, q_dim=q_dim)
    out = jax.ShapeDtypeStruct((num_groups, p_dim, q_dim), out_dtype)
    return run.call(kernel, out_shape=tuple(out for _ in rhs),
                    grid=(cdiv(q_dim, t.block_d), cdiv(p_dim, t.block_m), num_groups), name=name)(
        bounds, tok, row_w, lhs, *(r.astype(lhs.dtype) for r in rhs))


# ---------------------------------------------------------------------------------------------------------------
# The differentiable op.
# ---------------------------------------------------------------------------------------------------------------
def _forward(x, tok, inv, row_w, group_sizes, w1, w2, w3, run: _Run):
    num_real = jnp.sum(group_sizes)
    with jax.named_scope("fused_up"):
        a, b, h = _up(x, tok, group_sizes, w1, w3, run)
    with jax.named_scope("fused_down"):
        y = _down(h, row_w, group_sizes, w2, run)
    with jax.named_scope("fused_combine"):
        out = _combine(y, inv, num_real, x.dtype, run)
    return out, (a, b, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused(x, tok, inv, row_w, group_sizes, w1, w2, w3, run):
    return _forward(x, tok, inv, row_w, group_sizes, w1, w2, w3, run)[0]


def _fused_fwd(x, tok, inv, row_w, group_sizes, w1, w2, w3, run):
    out, (a, b, h) = _forward(x, tok, inv, row_w, group_sizes, w1, w2, w3, run)
    return out, (x, tok, inv, row_w, group_sizes, w1, w2, w3, a, b, h)


def _fused_bwd(run, res, g):
    x, tok, inv, row_w, group_sizes, w1, w2, w3, a, b, h = res
    g = g.astype(x.dtype)
    num_real = jnp.sum(group_sizes)
    with jax.named_scope("fused_down_bwd"):
        da, db, dgate = _down_bwd(g, tok, row_w, group_sizes, w2, a, b, run)
    with jax.named_scope("fused_dw2"):
        (dw2,) = _wgrad(h, (g,), tok, row_w, group_sizes, w2.dtype, run, lhs_by_token=False, rhs_by_token=True,
                        name="null_moe_fused_dw2")
    with jax.named_scope("fused_dx"):
        dxs = _dx_rows(da, db, group_sizes, w1, w3, run)
        dx = _combine(dxs, inv, num_real, x.dtype, run)
    with jax.named_scope("fused_dw13"):
        dw1, dw3 = _wgrad(x, (da, db), tok, row_w, group_sizes, w1.dtype, run, lhs_by_token=True,
                          rhs_by_token=False, name="null_moe_fused_dw13")
    # The gate weights' gradient exists on real rows only (the kernel never writes the others).
    real = jnp.arange(dgate.shape[0]) < num_real
    d_row_w = jnp.where(real, dgate, 0.0).astype(row_w.dtype)
    return dx, None, None, d_row_w, None, dw1, dw2, dw3


_fused.defvjp(_fused_fwd, _fused_bwd)


def triton_expert_mlp(
    x: jax.Array,
    token_idx: jax.Array,
    inv_idx: jax.Array,
    row_w: jax.Array,
    group_sizes: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    act: Callable = jax.nn.silu,
    *,
    tiles: Optional[FusedTiles] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
    """out[t] = sum over token t's real slots j of g_tj * (act(x_t w1[e]) * (x_t w3[e])) w2[e], fused (module doc).

    Args:
        x: [T, D] tokens.
        token_idx: [S] int32 token of each expert-sorted slot row (S = T k).
        inv_idx: [T, k] int32 sorted row of each slot (slot j of token t is real iff inv_idx[t, j] < R).
        row_w: [S] gate weight of each sorted row (0 on null rows); differentiable.
        group_sizes: [E] int real rows per expert (R = their sum; the real rows are the sorted prefix).
        w1, w3: [E, D, F]; w2: [E, F, D]; act: an entry of null_moe.config.ACTIVATIONS.
        tiles: tile sizes (default :meth:`FusedTiles.for_dtype` of x's dtype; tests use tiny ones in interpret mode).
        interpret: True / False force Pallas interpret mode / the compiled kernels; None (default) compiles for
            CUDA/ROCm and interprets elsewhere, per lowering platform.
    Returns:
        [T, D] in x's dtype, differentiable in x, row_w, w1, w2 and w3.
    """
    t_dim, d_dim = x.shape
    s_rows = token_idx.shape[0]
    e_dim, _, f_dim = w1.shape
    if inv_idx.ndim != 2 or inv_idx.shape[0] != t_dim or inv_idx.shape[0] * inv_idx.shape[1] != s_rows:
        raise ValueError(f"inv_idx must be [T, k] with T k = {s_rows} rows; got {inv_idx.shape} for T = {t_dim}")
    if w1.shape != w3.shape or w2.shape != (e_dim, f_dim, d_dim) or w1.shape[1] != d_dim:
        raise ValueError(f"expected w1, w3 [E, D, F] and w2 [E, F, D] with D = {d_dim}; got {w1.shape}, {w2.shape}, {w3.shape}")
    if row_w.shape != (s_rows,) or group_sizes.shape != (e_dim,):
        raise ValueError(f"expected row_w [{s_rows}] and group_sizes [{e_dim}]; got {row_w.shape}, {group_sizes.shape}")
    tiles = tiles or FusedTiles.for_dtype(x.dtype)
    tiles.check(interpret)
    run = _Run(tiles, None if interpret is None else bool(interpret), activation_name(act))
    return _fused(x, token_idx.astype(jnp.int32), inv_idx.astype(jnp.int32), row_w, group_sizes.astype(jnp.int32),
                  w1, w2, w3, run)
