"""Expert-parallel communication: bytes each device sends per layer step, read from the compiled HLO.

    python -m scripts.bench.ep_comm                         # the second seed shape on 8 devices + small timings
    python -m scripts.bench.ep_comm --tokens 4096 --hidden 256 --mlp 256 --experts 16 --k 4 --time false

Implementations, one MoE layer, forward + backward (grad of <y, g> w.r.t. x and every parameter), forced routing
at null fraction p:

- ``ep_a2a_dropless``, ``ep_a2a_cf<c>``: this project's expert parallelism (null_moe.transport) with the padded
  all-to-all, dropless or at capacity factor c; ``ep_a2a_slot_*``: the same with one row per real slot instead
  of one per (token, destination device).
- ``compact_psum``: the published EP path, as a baseline: tokens replicated over the expert axis, each device
  computes its own experts' rows (the same ``expert_mlp``, other experts and nulls mapped to the null id), then a
  psum of the full output over the expert axis. Its bytes do not depend on p.

Bytes are per device, summed over the collectives of the compiled (SPMD-partitioned) module with the standard
algorithms' counts: all-to-all (n-1)/n of its buffer, all-gather (n-1)/n of the full result, reduce-scatter
(n-1)/n of the full operand, all-reduce 2(n-1)/n, collective-permute the buffer; n = replica-group size. A
ragged all-to-all is counted by its receive buffer (an upper bound; it sends only the real rows).

Times (``--time``) run on simulated CPU devices (``--xla_force_host_platform_device_count``): all "devices" share
the same cores and the collectives are memory copies, so they mean little; the bytes are the figure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional

DEVICE_FLAG = "--xla_force_host_platform_device_count"

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
# Points.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpCommConfig:
    tokens: int = 32768  # global tokens (batch x position)
    seq: int = 2048  # position axis size; batch = tokens / seq
    hidden: int = 2048
    mlp: int = 2048
    experts: int = 64
    k: int = 8
    devices: int = 8
    ep: int = 8  # expert axis size; data axis = devices / ep
    null_fracs: List[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 0.9])
    impls: List[str] = dataclasses.field(
        default_factory=lambda: ["ep_a2a_dropless", "ep_a2a_cf1.25", "ep_a2a_slot_cf1.25", "compact_psum"]
    )
    dtype: str = "float32"
    time: bool = True  # also time each impl at the small shape below on the simulated devices
    time_tokens: int = 2048
    time_seq: int = 64
    time_hidden: int = 64
    time_mlp: int = 64
    time_experts: int = 16
    time_k: int = 4
    iters: int = 3
    lower_ragged: bool = True  # also lower (not run: XLA:CPU cannot compile it) the ragged transport once


def _impl_config(impl: str, base: dict, p: float):
    from null_moe import NullMoEConfig

    kw = dict(base, null_route_frac=p)
    if impl.startswith("ep_"):
        kw["ep_transport"] = "ragged_all_to_all" if "ragged" in impl else "all_to_all"
        kw["ep_dedup"] = "_slot" not in impl
        m = re.search(r"cf([0-9.]+)$", impl)
        kw["capacity_factor"] = float(m.group(1)) if m else None
    elif impl != "compact_psum":
        raise ValueError(f"unknown impl {impl!r}")
    return NullMoEConfig(**kw)


def _mapping(impl: str) -> dict:
    if impl == "compact_psum":
        return {"batch": "data", "experts": "expert"}
    return {"batch": ("data", "expert"), "experts": "expert"}


def _step_fn(impl: str):
    """(layer, x, mask, g) -> (<y, g>, grads w.r.t. layer and x)."""
    import haliax as hax
    import jax

    def loss(layer, x, mask, g):
        routing = layer.route_forced(x, null_mask=mask)
        if impl == "compact_psum":
            y = compact_psum_apply(layer, x, routing)
        else:
            y, _ = layer.apply(x, routing)
        return hax.sum(y * g).scalar().astype("float32")

    def step(layer, x, mask, g):
        return jax.value_and_grad(loss, argnums=(0, 1))(layer, x, mask, g)

    return step


def _abstract_inputs(cfg_layer, tokens, seq, dtype, mapping, mesh, *, concrete: bool, seed: int = 0):
    """Layer, x, null mask, cotangent: concrete arrays (for timing) or sharded ShapeDtypeStructs (bytes only)."""
    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from null_moe import NullRoutedMoE

    Batch, Pos = hax.Axis("batch", tokens // seq), hax.Axis("position", seq)
    k = cfg_layer.num_experts_per_tok

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
        if concrete:
            layer = cast(NullRoutedMoE.init(cfg_layer, key=jax.random.PRNGKey(seed)))
            x = hax.random.normal(jax.random.PRNGKey(seed + 1), (Batch, Pos, cfg_layer.Embed)).astype(dtype)
            g = hax.random.normal(jax.random.PRNGKey(seed + 2), (Batch, Pos, cfg_layer.Embed)).astype(dtype)
            return hax.shard(layer), hax.shard(x), None, hax.shard(g)
        layer = eqx.filter_eval_shape(lambda: cast(NullRoutedMoE.init(cfg_layer, key=jax.random.PRNGKey(seed))))
        shardings = hax.partitioning.infer_resource_partitions(layer, mapping, preserve_existing_shardings=False, mesh=mesh)
        layer = jax.tree.map(
            lambda a, s: hax.NamedArray(jax.ShapeDtypeStruct(a.array.shape, a.array.dtype, sharding=s), a.axes),
            layer, shardings, is_leaf=lambda n: isinstance(n, hax.NamedArray),
        )
        tok_sh = NamedSharding(mesh, P(mapping["batch"], None, None))
        x = hax.NamedArray(jax.ShapeDtypeStruct((Batch.size, Pos.size, cfg_layer.hidden_dim), jnp.dtype(dtype), sharding=tok_sh),
                      (Batch, Pos, cfg_layer.Embed))
        return layer, x, None, x


def _mask_for(tokens, k, p, mesh, mapping, *, concrete: bool, seed: int = 0):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from null_moe.routing import forced_null_mask

    sh = NamedSharding(mesh, P(mapping["batch"], None))
    if not concrete:
        return jax.ShapeDtypeStruct((tokens, k), jnp.bool_, sharding=sh)
    return jax.device_put(forced_null_mask(jax.random.PRNGKey(seed + 3), tokens, k, p, "independent"), sh)


def measure_point(impl, p, *, tokens, seq, hidden, mlp, experts, k, devices, ep, dtype, time_it=False, iters=3,
                  lower_only=False, tile_rows=None):
    """One point: {"bytes": {...}, "hlo": text or None, "time_s": float or None, "dropped_frac": float or None}."""
    import haliax as hax
    import jax
    import numpy as np
    from jax.sharding import Mesh

    base = dict(hidden_dim=hidden, intermediate_dim=mlp, n_routed_experts=experts, num_experts_per_tok=k,
                tile_rows=tile_rows)
    cfg = _impl_config(impl, base, p)
    mesh = Mesh(np.array(jax.devices()[:devices]).reshape(devices // ep, ep), ("data", "expert"))
    mapping = _mapping(impl)
    layer, x, _, g = _abstract_inputs(cfg, tokens, seq, dtype, mapping, mesh, concrete=time_it)
    mask = _mask_for(tokens, k, p, mesh, mapping, concrete=time_it)
    step = _step_fn(impl)
    out = {"bytes": None, "hlo": None, "time_s": None, "dropped_frac": None}
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
        lowered = jax.jit(step).lower(layer, x, mask, g)
        if lower_only:
            out["hlo"] = lowered.as_text()
            return out
        compiled = lowered.compile()
        text = compiled.as_text()
        out["bytes"] = collective_bytes(text, devices)
        out["hlo"] = text
        if time_it:
            jax.block_until_ready(compiled(layer, x, mask, g))
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(layer, x, mask, g))
                times.append(time.perf_counter() - t0)
            out["time_s"] = float(np.median(times))
            if impl != "compact_psum":
                extras = jax.jit(lambda l, x, m: l.apply(x, l.route_forced(x, null_mask=m))[1]["dropped_frac"])(
                    layer, x, mask
                )
                out["dropped_frac"] = float(extras.array)
    return out


def _fmt_mb(b):
    return f"{b / 2**20:10.2f}"


def run(cfg: EpCommConfig) -> list:
    rows = []
    shape = dict(tokens=cfg.tokens, seq=cfg.seq, hidden=cfg.hidden, mlp=cfg.mlp, experts=cfg.experts, k=cfg.k,
                 devices=cfg.devices, ep=cfg.ep, dtype=cfg.dtype)
    print(f"# bytes per device per layer step (fwd+bwd), compiled HLO: tokens={cfg.tokens} hidden={cfg.hidden} "
          f"mlp={cfg.mlp} experts={cfg.experts} k={cfg.k} devices={cfg.devices} ep={cfg.ep} dtype={cfg.dtype}",
          flush=True)
    for impl in cfg.impls:
        for p in cfg.null_fracs:
            t0 = time.perf_counter()
            res = measure_point(impl, p, **shape)
            b = res["bytes"]
            rows.append(dict(impl=impl, p=p, a2a=b.get("all-to-all", 0.0), total=b["total"], detail=b,
                             compile_s=time.perf_counter() - t0))
            print(f"EPCOMM impl={impl} p={p} a2a_MiB={b.get('all-to-all', 0.0) / 2**20:.2f} "
                  f"total_MiB={b['total'] / 2**20:.2f} compile_s={time.perf_counter() - t0:.1f} "
                  + " ".join(f"{kk}={v / 2**20:.2f}" for kk, v in b.items() if kk != "total"), flush=True)
    base = {r["p"]: r["total"] for r in rows if r["impl"] == "compact_psum"}
    p0 = {r["impl"]: r for r in rows if r["p"] == 0.0}
    print()
    print(f"{'impl':22s} {'p':>4s} {'a2a MiB':>10s} {'total MiB':>10s} {'a2a/p0':>7s} {'total/p0':>8s} {'vs psum':>8s}")
    for r in rows:
        ref = p0.get(r["impl"])
        a2a_ratio = r["a2a"] / ref["a2a"] if ref and ref["a2a"] else float("nan")
        tot_ratio = r["total"] / ref["total"] if ref and ref["total"] else float("nan")
        vs = r["total"] / base[r["p"]] if r["p"] in base else float("nan")
        r.update(a2a_vs_p0=a2a_ratio, total_vs_p0=tot_ratio, vs_compact_psum=vs)
        print(f"{r['impl']:22s} {r['p']:4.2f} {_fmt_mb(r['a2a'])} {_fmt_mb(r['total'])} {a2a_ratio:7.3f} "
              f"{tot_ratio:8.3f} {vs:8.3f}")
    if cfg.lower_ragged:
        res = measure_point("ep_ragged_cf1.25", cfg.null_fracs[-1], **shape, lower_only=True)
        print(f"\nragged_all_to_all lowers: {'ragged_all_to_all' in res['hlo']} (XLA:CPU cannot compile it; "
              "its bytes are the real rows, bounded by the padded figures above)")
    if cfg.time:
        small = dict(tokens=cfg.time_tokens, seq=cfg.time_seq, hidden=cfg.time_hidden, mlp=cfg.time_mlp,
                     experts=cfg.time_experts, k=cfg.time_k, devices=cfg.devices, ep=cfg.ep, dtype=cfg.dtype)
        print(f"\n# time per fwd+bwd step on {cfg.devices} SIMULATED CPU devices (they share the host's cores and "
              f"collectives are memcpys: these times mean little), {small}")
        for impl in cfg.impls:
            for p in cfg.null_fracs:
                res = measure_point(impl, p, **small, time_it=True, iters=cfg.iters, tile_rows=64)
                df = res["dropped_frac"]
                print(f"EPTIME impl={impl} p={p} time_ms={res['time_s'] * 1e3:.2f} "
                      f"total_MiB={res['bytes']['total'] / 2**20:.3f} dropped_frac={'' if df is None else f'{df:.4f}'}",
                      flush=True)
    return rows


def main(argv=None):
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_FLAG not in flags:  # before jax initialises its backend
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}=8".strip()
    import draccus

    cfg = draccus.parse(EpCommConfig, args=argv)
    import jax

    if jax.device_count() < cfg.devices:
        sys.exit(f"ep_comm: needs {cfg.devices} devices, found {jax.device_count()} (set XLA_FLAGS={DEVICE_FLAG}=N)")
    run(cfg)


if __name__ == "__main__":
    main()
