"""Expert-parallel transport: only real rows travel to the device that owns their expert, and back.

Runs per device inside ``shard_map`` (raw arrays, this device's T tokens flattened). The N experts are split
over EP devices of one mesh axis (device d owns experts [d N/EP, (d + 1) N/EP)); every device routes its own
tokens, and the rows it sends are *units*:

- dedup (default): one unit per (token, destination device) that holds at least one of the token's real slots.
  It carries the token's row once, plus the local expert ids and gate weights of all its slots there (slots
  elsewhere or null carry the null id and weight 0). The owner computes the gate-weighted sum of its experts
  and sends one row back.
- per slot: one unit per real slot (id and weight of that slot).

A null slot is never a unit, so it is never packed into a send buffer, forward or backward. Units are packed
into a [EP, C] grid of blocks, block d for destination d, in token order; C is the per-(source, destination)
capacity (:func:`block_capacity`). Units past C are dropped: their slots contribute zero and are counted.

Two exchanges (:func:`resolve_transport`): the padded ``jax.lax.all_to_all`` moves whole blocks (padding rows
are zeros with the null id, so the owner's grouped matmuls skip them); ``jax.lax.ragged_all_to_all`` moves only
the used prefix of each block into the same receive layout. Received rows go through
:func:`null_moe.experts.expert_mlp` with the local weights; results come back by the reverse exchange.

Every row movement here is a gather whose transpose is again a gather (custom VJPs), and the exchange's
transpose is the reverse exchange, so the backward pass moves the same rows the other way.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .config import EP_TRANSPORTS
from .experts import expert_mlp

#: Capacities above this are rounded up to a multiple of it (aligned blocks).
CAPACITY_ALIGN = 8


# ---------------------------------------------------------------------------------------------------------------
# Choices made once.
# ---------------------------------------------------------------------------------------------------------------
def resolve_transport(requested: str = "auto", platform: Optional[str] = None) -> str:
    """The exchange that runs for ``requested`` on ``platform`` (default ``jax.default_backend()``).

    auto: cpu -> all_to_all (XLA:CPU cannot compile ragged_all_to_all), tpu/gpu -> ragged_all_to_all.
    Explicit names run as asked.
    """
    if requested not in EP_TRANSPORTS:
        raise ValueError(f"ep_transport must be one of {EP_TRANSPORTS}, got {requested!r}")
    if requested != "auto":
        return requested
    platform = (platform or jax.default_backend()).lower()
    return "all_to_all" if platform == "cpu" else "ragged_all_to_all"


def shard_map_unchecked(f, *, mesh, in_specs, out_specs):
    """``shard_map`` without replication checks, on any jax: ``jax.shard_map`` if present, else the
    experimental one. Unchecked, the transpose psums cotangents of inputs replicated over mesh axes."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - older jax

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def expected_unit_fraction(k: int, n_experts: int, ep: int, null_frac: float, dedup: bool) -> float:
    """Expected units a token sends to one destination device, under uniform routing with i.i.d. null slots.

    per slot: k (1 - p) / EP. dedup: P(at least one of the token's real slots lands on that device); with m real
    slots on distinct experts that is 1 - C(N - N/EP, m) / C(N, m), averaged over m ~ Binomial(k, 1 - p).
    """
    if not dedup:
        return k * (1.0 - null_frac) / ep
    n_local = n_experts // ep
    q = 0.0
    for m in range(k + 1):
        weight = math.comb(k, m) * (1.0 - null_frac) ** m * null_frac ** (k - m)
        q += weight * (1.0 - math.comb(n_experts - n_local, m) / math.comb(n_experts, m))
    return q


def block_capacity(
    tokens: int,
    k: int,
    n_experts: int,
    ep: int,
    *,
    null_frac: float,
    capacity_factor: Optional[float],
    dedup: bool,
) -> int:
    """Rows per (source, destination) block for a device with ``tokens`` tokens.

    None (dropless): the worst case, every token's units for one destination (1 per token with dedup,
    min(k, N/EP) per slot). A float: ceil(capacity_factor * tokens * expected_unit_fraction), at least 1,
    rounded up to a multiple of CAPACITY_ALIGN above it, never above the worst case. Per slot the expected
    rows are k (1 - p) T / EP, the issue's formula.
    """
    if n_experts % ep:
        raise ValueError(f"n_routed_experts={n_experts} must be divisible by the expert-parallel size {ep}")
    worst = tokens * (1 if dedup else min(k, n_experts // ep))
    if capacity_factor is None:
        return worst
    cap = math.ceil(capacity_factor * tokens * expected_unit_fraction(k, n_experts, ep, null_frac, dedup) - 1e-9)
    if cap > CAPACITY_ALIGN:
        cap = -(-cap // CAPACITY_ALIGN) * CAPACITY_ALIGN
    return int(min(max(cap, 1), worst))


# ---------------------------------------------------------------------------------------------------------------
# Units and the send plan.
# ---------------------------------------------------------------------------------------------------------------
class Units(NamedTuple):
    """What one device would send, before capacity: U units per token ([T, U] grids).

    dest: int32 destination device of each unit, EP where the unit does not exist (nothing real to send).
    local_ids: [T, U, S] int32 expert id on the destination (N/EP = null) of each slot the unit carries.
    weights: [T, U, S] gate weights of those slots (0 where null).
    real_slots: [T, U] int32 real slots the unit carries.
    """

    dest: jax.Array
    local_ids: jax.Array
    weights: jax.Array
    real_slots: jax.Array


def make_units(expert_ids: jax.Array, weights: jax.Array, n_experts: int, ep: int, dedup: bool) -> Units:
    """[T, k] routing (id N = null) -> units (see the module docstring)."""
    n_local = n_experts // ep
    ids = expert_ids.astype(jnp.int32)
    dev = ids // n_local  # null id N -> EP
    if dedup:
        devices = jnp.arange(ep, dtype=jnp.int32)
        on = dev[:, None, :] == devices[None, :, None]  # [T, EP, k]
        local_ids = jnp.where(on, ids[:, None, :] - devices[None, :, None] * n_local, n_local)
        unit_w = jnp.where(on, weights[:, None, :], 0)
        real = jnp.sum(on, axis=-1, dtype=jnp.int32)
        dest = jnp.where(real > 0, devices[None, :], ep)
        return Units(dest, local_ids.astype(jnp.int32), unit_w.astype(weights.dtype), real)
    real = dev < ep
    local_ids = jnp.where(real, ids - dev * n_local, n_local)
    return Units(dev, local_ids[..., None], jnp.where(real, weights, 0)[..., None], real.astype(jnp.int32))


class SendPlan(NamedTuple):
    """Where each unit goes in the [EP C] send buffer (block d = destination d), and back.

    row_of_unit: [T U] int32 buffer row of each unit; EP C where it is not sent (absent or over capacity).
    unit_of_row: [EP C] int32 unit in each buffer row; T U on padding rows.
    send_sizes: [EP] int32 rows used in each block (a prefix of the block).
    dropped_units: [T U] bool units that exist but did not fit.
    """

    row_of_unit: jax.Array
    unit_of_row: jax.Array
    send_sizes: jax.Array
    dropped_units: jax.Array


def plan_send(dest: jax.Array, ep: int, capacity: int) -> SendPlan:
    """dest [n] (EP = no unit) -> the send plan: each block holds its units in order, the first ``capacity``."""
    n = dest.shape[0]
    onehot = dest[:, None] == jnp.arange(ep, dtype=dest.dtype)[None, :]  # [n, EP]
    position = jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - 1
    position = jnp.take_along_axis(position, jnp.minimum(dest, ep - 1)[:, None], axis=1)[:, 0]
    exists = dest < ep
    kept = exists & (position < capacity)
    row_of_unit = jnp.where(kept, dest * capacity + position, ep * capacity).astype(jnp.int32)
    unit_of_row = jnp.full((ep * capacity,), n, jnp.int32).at[row_of_unit].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop"
    )
    send_sizes = jnp.minimum(jnp.sum(onehot, axis=0, dtype=jnp.int32), capacity)
    return SendPlan(row_of_unit, unit_of_row, send_sizes, exists & ~kept)


# ---------------------------------------------------------------------------------------------------------------
# Row movements: gathers whose transposes are gathers.
# ---------------------------------------------------------------------------------------------------------------
def _take(src: jax.Array, idx: jax.Array, fill=0) -> jax.Array:
    """src[idx] along rows; out-of-range indices give ``fill``."""
    return jnp.take(src, idx, axis=0, mode="fill", fill_value=fill)


def _sum_taken(src: jax.Array, idx: jax.Array) -> jax.Array:
    """idx [n, U] -> [n, ...]: sum over u of src[idx[:, u]] (out-of-range rows contribute 0)."""
    n, u = idx.shape
    return _take(src, idx.reshape(-1)).reshape((n, u) + src.shape[1:]).sum(axis=1)


@jax.custom_vjp
def pack_rows(src: jax.Array, src_of_row: jax.Array, rows_of_src: jax.Array) -> jax.Array:
    """Buffer row r <- src[src_of_row[r]] (zero where out of range).

    ``rows_of_src`` [n, U] lists the buffer rows each source row went to (out of range = none): the transpose
    sums those rows, a gather, not a scatter-add.
    """
    return _take(src, src_of_row)


def _pack_fwd(src, src_of_row, rows_of_src):
    return pack_rows(src, src_of_row, rows_of_src), (src_of_row, rows_of_src)


def _pack_bwd(res, g):
    src_of_row, rows_of_src = res
    return unpack_rows(g, rows_of_src, src_of_row), None, None


@jax.custom_vjp
def unpack_rows(buf: jax.Array, rows_of_src: jax.Array, src_of_row: jax.Array) -> jax.Array:
    """Source row i <- sum over u of buf[rows_of_src[i, u]]; the transpose of :func:`pack_rows`."""
    return _sum_taken(buf, rows_of_src)


def _unpack_fwd(buf, rows_of_src, src_of_row):
    return unpack_rows(buf, rows_of_src, src_of_row), (rows_of_src, src_of_row)


def _unpack_bwd(res, g):
    rows_of_src, src_of_row = res
    return pack_rows(g, src_of_row, rows_of_src), None, None


pack_rows.defvjp(_pack_fwd, _pack_bwd)
unpack_rows.defvjp(_unpack_fwd, _unpack_bwd)


# ---------------------------------------------------------------------------------------------------------------
# The exchange.
# ---------------------------------------------------------------------------------------------------------------
def _exchange_raw(buf, send_sizes, recv_sizes, *, axis_name, transport, fill=0):
    """Block d of my buffer -> block (my index) of device d's buffer. [EP C, ...] in and out.

    all_to_all moves whole blocks. ragged_all_to_all moves the first send_sizes[d] rows of block d; rows not
    received hold ``fill`` (so received padding carries the null id, as in the padded exchange).
    """
    if transport == "all_to_all":
        return jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=True)
    ep = send_sizes.shape[0]
    cap = buf.shape[0] // ep
    me = jax.lax.axis_index(axis_name).astype(jnp.int32)
    offsets = jnp.arange(ep, dtype=jnp.int32) * cap
    output = jnp.full_like(buf, fill)
    return jax.lax.ragged_all_to_all(
        buf, output, offsets, send_sizes, jnp.full((ep,), me * cap, jnp.int32), recv_sizes, axis_name=axis_name
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def exchange(buf, send_sizes, recv_sizes, axis_name, transport):
    """Differentiable exchange; its transpose is the reverse exchange (sizes swapped)."""
    return _exchange_raw(buf, send_sizes, recv_sizes, axis_name=axis_name, transport=transport)


def _exchange_fwd(buf, send_sizes, recv_sizes, axis_name, transport):
    return exchange(buf, send_sizes, recv_sizes, axis_name, transport), (send_sizes, recv_sizes)


def _exchange_bwd(axis_name, transport, res, g):
    send_sizes, recv_sizes = res
    return _exchange_raw(g, recv_sizes, send_sizes, axis_name=axis_name, transport=transport), None, None


exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _id_dtype(n_local: int):
    """Smallest integer dtype for local ids 0..n_local (n_local = null): the ids travel too."""
    return jnp.int8 if n_local < 127 else (jnp.int16 if n_local < 32767 else jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# The per-device expert-parallel layer body.
# ---------------------------------------------------------------------------------------------------------------
class SendTraffic(NamedTuple):
    """Per destination (this device's view), read from the packed send buffer itself.

    rows: [EP] buffer rows that carry a unit. real_slots: [EP] real slots those rows carry. null_rows: [EP]
    rows that carry a token but no real slot for that destination (must be 0). padding_rows: [EP] the rest.
    """

    rows: jax.Array
    real_slots: jax.Array
    null_rows: jax.Array
    padding_rows: jax.Array


def _pack(x, expert_ids, weights, *, n_experts, ep, capacity, dedup):
    units = make_units(expert_ids, weights, n_experts, ep, dedup)
    t, u = units.dest.shape
    n_local = n_experts // ep
    plan = plan_send(units.dest.reshape(-1), ep, capacity)
    rows_of_token = plan.row_of_unit.reshape(t, u)
    token_of_row = plan.unit_of_row // u  # padding rows: t u // u = t, out of range
    xs = pack_rows(x, token_of_row, rows_of_token)
    flat_w = units.weights.reshape(t * u, -1)
    ws = pack_rows(flat_w, plan.unit_of_row, plan.row_of_unit[:, None])
    ids = _take(units.local_ids.reshape(t * u, -1).astype(_id_dtype(n_local)), plan.unit_of_row, fill=n_local)
    dropped = jnp.sum(jnp.where(plan.dropped_units, units.real_slots.reshape(-1), 0))
    return xs, ws, ids, plan, rows_of_token, token_of_row, dropped


def send_traffic(expert_ids, weights, *, n_experts, ep, capacity, dedup, x=None) -> SendTraffic:
    """Count what :func:`ep_expert_mlp` packs, per destination, from the packed buffers (for tests)."""
    n_local = n_experts // ep
    if x is None:
        x = jnp.zeros((expert_ids.shape[0], 1), weights.dtype)
    _, _, ids, plan, _, _, _ = _pack(x, expert_ids, weights, n_experts=n_experts, ep=ep, capacity=capacity, dedup=dedup)
    carries = (plan.unit_of_row < plan.row_of_unit.shape[0]).reshape(ep, capacity)
    real = (ids.astype(jnp.int32) < n_local).reshape(ep, capacity, -1).sum(-1)
    rows = carries.sum(-1)
    return SendTraffic(rows, real.sum(-1), (carries & (real == 0)).sum(-1), capacity - rows)


def ep_expert_mlp(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    axis_name,
    ep: int,
    n_experts: int,
    capacity: int,
    dedup: bool = True,
    transport: str = "all_to_all",
    backend: str = "auto",
    tile_rows: Optional[int] = None,
    fused: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One device's tokens through expert-parallel dispatch, the local experts, and back.

    Args:
        x: [T, D] this device's tokens; expert_ids, weights: [T, k] their routing (global ids, N = null).
        w1, w3: [N/EP, D, F], w2: [N/EP, F, D]: this device's experts.
        axis_name: the mesh axis (or axes) the experts are split over, of size ``ep``.
        capacity: rows per (source, destination) block (:func:`block_capacity`).
        transport: "all_to_all" or "ragged_all_to_all" (resolved).
    Returns:
        (y [T, D], dropped real slots on this device (int32 scalar)).
    """
    if transport not in ("all_to_all", "ragged_all_to_all"):
        raise ValueError(f"transport must be resolved to all_to_all or ragged_all_to_all, got {transport!r}")
    n_local = w1.shape[0]
    if n_local * ep != n_experts:
        raise ValueError(f"each of the {ep} devices must hold {n_experts // ep} experts, got {n_local}")
    with jax.named_scope("ep_pack"):
        xs, ws, ids, plan, rows_of_token, token_of_row, dropped = _pack(
            x, expert_ids, weights, n_experts=n_experts, ep=ep, capacity=capacity, dedup=dedup
        )
    send_sizes = plan.send_sizes
    if transport == "ragged_all_to_all":
        recv_sizes = jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)
    else:
        recv_sizes = send_sizes  # unused by the padded exchange
    with jax.named_scope("ep_dispatch"):
        xr = exchange(xs, send_sizes, recv_sizes, axis_name, transport)
        wr = exchange(ws, send_sizes, recv_sizes, axis_name, transport)
        ir = _exchange_raw(ids, send_sizes, recv_sizes, axis_name=axis_name, transport=transport, fill=n_local)
    yr = expert_mlp(xr, ir.astype(jnp.int32), wr, w1, w2, w3, act, backend=backend, tile_rows=tile_rows, fused=fused)
    with jax.named_scope("ep_return"):
        back = exchange(yr, recv_sizes, send_sizes, axis_name, transport)
        y = unpack_rows(back, rows_of_token, token_of_row)
    return y, dropped
