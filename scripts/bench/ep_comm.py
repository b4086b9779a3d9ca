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

Bytes are per device, read from the compiled module's collectives as scripts/bench/ep.py counts them (the
standard algorithms' counts). The bench CLI runs the same two impls per sweep point (``null_moe_ep``,
``compact_psum``); this script keeps the paper-style table of one shape at several layouts.

Times (``--time``) run on simulated CPU devices (``--xla_force_host_platform_device_count``): all "devices" share
the same cores and the collectives are memory copies, so they mean little; the bytes are the figure.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import List

from scripts.bench.ep import DEVICE_FLAG, collective_bytes, compact_psum_apply, ep_mapping, ep_mesh



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

    base = dict(hidden_dim=hidden, intermediate_dim=mlp, n_routed_experts=experts, num_experts_per_tok=k,
                tile_rows=tile_rows)
    cfg = _impl_config(impl, base, p)
    mesh = ep_mesh(ep, devices)
    mapping = ep_mapping(impl, "batch")
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
