"""Expert parallelism in the bench: meshes and axis mappings, the ``compact_psum`` baseline, and the bytes each
device sends, read from a compiled module's collectives.

Used by the bench CLI (impls ``null_moe_ep`` and ``compact_psum``) and by scripts/bench/ep_comm.py.

Bytes are per device, summed over the collectives of the compiled (SPMD-partitioned) module with the standard
algorithms' counts: all-to-all (n-1)/n of its buffer, all-gather (n-1)/n of the full result, reduce-scatter
(n-1)/n of the full operand, all-reduce 2(n-1)/n, collective-permute the buffer; n = replica-group size. A
ragged all-to-all is counted by its receive buffer (an upper bound; it sends only the real rows).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Dict, List, Optional

#: The XLA flag that gives a CPU process N simulated devices (read when JAX initialises its backend).
DEVICE_FLAG = "--xla_force_host_platform_device_count"
#: Mesh axes of the bench's expert-parallel impls: tokens over (data, expert), experts over expert.
MESH_AXES = ("data", "expert")

# --------------------------------------------------------------------------------------------------------------
# HLO collective bytes.
# --------------------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_OPS = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")


def _array_bytes(shape_text: str) -> List[float]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{(\{[0-9,]*\})", line)
    if m:
        return len([v for v in m.group(1).strip("{}").split(",") if v])
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    return num_devices


def collective_bytes(hlo_text: str, num_devices: int) -> Dict[str, float]:
    """Bytes one device sends per execution of a compiled SPMD module, by collective kind (see module doc).

    Returns {kind: bytes} for the kinds present, plus "total". Counts each collective instruction once (a
    collective inside a loop body would be undercounted; the layer has none).
    """
    totals: Dict[str, float] = {}
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        op = m.group("op")
        sizes = _array_bytes(m.group("shape"))
        if not sizes:
            continue
        # async starts return (operands..., results..., ...): count the largest buffer
        buf = max(sizes) if m.group("start") else sum(sizes)
        if op == "collective-permute":
            sent = buf
        else:
            n = _group_size(line, num_devices)
            if n <= 1:
                continue
            if op in ("all-to-all", "ragged-all-to-all", "all-gather"):
                sent = buf * (n - 1) / n
            elif op == "reduce-scatter":
                sent = buf * (n - 1)
            else:  # all-reduce
                sent = 2 * buf * (n - 1) / n
        totals[op] = totals.get(op, 0.0) + sent
    totals["total"] = sum(totals.values())
    return totals


def full_weight_all_gathers(hlo_text: str, shapes: List[tuple]) -> List[str]:
    """all-gather instructions whose result holds a full expert weight (any of ``shapes``, any dim order)."""
    hits = []
    wanted = [sorted(s) for s in shapes]
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m or m.group("op") != "all-gather":
            continue
        for _, dims in _ARRAY.findall(m.group("shape")):
            dims_t = sorted(int(d) for d in dims.split(",") if d)
            if dims_t in wanted:
                hits.append(line.strip()[:200])
    return hits


# --------------------------------------------------------------------------------------------------------------
# The baseline: compact_psum.
# --------------------------------------------------------------------------------------------------------------
def compact_psum_apply(layer, x, routing, *, expert_axis: str = "expert", token_axis: Optional[str] = "data"):
    """The published EP path: x's tokens replicated over ``expert_axis`` (sharded over ``token_axis`` or not at
    all), each device runs its N/EP experts on every token it holds (other experts and nulls map to the null id),
    and the output is psum'd over ``expert_axis``. Returns y (a NamedArray with x's axes)."""
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from null_moe.config import ACTIVATIONS
    from null_moe.experts import expert_mlp
    from null_moe.transport import shard_map_unchecked

    cfg = layer.config
    token_axes = tuple(ax for ax in x.axes if ax.name != "embed")
    x_tok = x.rearrange(token_axes + ("embed",)).array.reshape(-1, cfg.hidden_dim)
    w1, w2, w3 = layer.experts.raw_weights()
    mesh = hax.partitioning._resolve_mesh()
    ep = dict(mesh.shape)[expert_axis]
    n_local = cfg.n_routed_experts // ep

    @jax.custom_vjp
    def psum_out(y):
        return jax.lax.psum(y, expert_axis)

    def psum_fwd(y):
        return psum_out(y), None

    def psum_bwd(_, g):
        # The unchecked shard_map hands each device 1/EP of a replicated output's cotangent and JAX's transpose
        # of psum re-sums the EP equal parts with a second all-reduce; a multiply gives the same cotangent with
        # no communication (as a replication-checked shard_map does), so the baseline pays one all-reduce
        # forward (the output) and one backward (dx), as published.
        return (g * ep,)

    psum_out.defvjp(psum_fwd, psum_bwd)

    def body(x, ids, wts, w1, w2, w3):
        me = jax.lax.axis_index(expert_axis)
        mine = (ids // n_local) == me
        local = jnp.where(mine, ids - me * n_local, n_local)
        y = expert_mlp(x, local, jnp.where(mine, wts, 0), w1, w2, w3, ACTIVATIONS[cfg.activation],
                       backend=layer.backend, tile_rows=cfg.tile_rows, fused=cfg.fused_experts)
        return psum_out(y)

    tok = P(token_axis, None)
    wsp = P(expert_axis, None, None)
    y = shard_map_unchecked(body, mesh=mesh, in_specs=(tok, tok, tok, wsp, wsp, wsp), out_specs=tok)(
        x_tok, routing.expert_ids, routing.weights, w1, w2, w3
    )
    y = y.reshape(tuple(ax.size for ax in token_axes) + (cfg.hidden_dim,))
    return hax.named(y.astype(x.dtype), token_axes + (cfg.Embed,)).rearrange(x.axes)


# --------------------------------------------------------------------------------------------------------------
# Meshes and mappings.
# --------------------------------------------------------------------------------------------------------------
def ep_mesh(ep: int, devices: Optional[int] = None):
    """A (data, expert) mesh over the first ``devices`` (default ``ep``) devices, expert axis of size ``ep``."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = ep if devices is None else devices
    if devices % ep:
        raise ValueError(f"devices={devices} must be a multiple of ep={ep}")
    have = jax.devices()
    if len(have) < devices:
        raise ValueError(f"needs {devices} devices, found {len(have)} (on CPU set XLA_FLAGS={DEVICE_FLAG}={devices})")
    return Mesh(np.array(have[:devices]).reshape(devices // ep, ep), MESH_AXES)


def ep_mapping(impl: str, token_axis: str) -> dict:
    """The Haliax axis mapping of an expert-parallel impl: this project's EP shards the tokens over both mesh axes
    (so "experts" sits on an axis that also shards the tokens); compact_psum replicates them over "expert"."""
    if impl == "compact_psum":
        return {token_axis: "data", "experts": "expert"}
    return {token_axis: ("data", "expert"), "experts": "expert"}


@contextlib.contextmanager
def mesh_context(mesh, mapping: dict):
    """Trace and run under ``mesh`` with the Haliax axis ``mapping`` (what the layer reads to go expert-parallel)."""
    import haliax as hax

    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
        yield
