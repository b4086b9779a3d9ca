"""Build and time one sweep point: the NullRoutedMoE layer (or a baseline) in isolation.

Impls:
- ``null_moe``: the project's layer; null slots are dropped before the grouped matmul (``skip_null=True``).
- ``masked_null``: same layer and routing, but null slots stay in the expert matmul as zero-weight rows
  (``skip_null=False``): the naive approach, whose cost does not fall with the null fraction.
- ``stock_levanter``: ``levanter.models.mixtral.MixtralSparseMoeBlock`` with our layer's gate / w1 / w2 / w3
  weights copied in (null 0.0 only).

Timing: AOT-compile (``jit(...).lower(...).compile()``), ``warmup`` calls, then ``iters`` calls each followed
by ``jax.block_until_ready``; ``time_s`` is the median, and tokens/s and TFLOP/s are computed from that same
interval. FLOPs count real assignments only: 6 D F per real assignment forward, x3 with backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

import numpy as np

from scripts.bench.config import Point


@dataclasses.dataclass
class Measurement:
    time_s: float
    time_min_s: float
    time_max_s: float
    compile_s: float
    times: list[float]


@dataclasses.dataclass
class PointResult:
    point: Point
    backend: str
    null_realized: float
    real_assignments: int
    null_assignments: int
    expert_loads: list[float]  # fraction of real assignments per expert
    real_per_token_hist: Optional[list[float]]  # fraction of tokens with 0..k real experts
    all_null_frac: float
    main: Measurement
    forward: Optional[Measurement] = None  # forward alone, when the split is measured

    # --- derived figures ----------------------------------------------------------------------------------
    @property
    def flops(self) -> float:
        per = 6.0 * self.point.hidden * self.point.mlp_dim
        mult = 3.0 if self.point.bench_pass == "forward_backward" else 1.0
        return per * mult * self.real_assignments

    @property
    def tokens_per_s(self) -> float:
        return self.point.tokens / self.main.time_s

    @property
    def tflops(self) -> float:
        return self.flops / self.main.time_s / 1e12

    @property
    def load_cv(self) -> float:
        loads = np.asarray(self.expert_loads, dtype=np.float64)
        m = loads.mean()
        return float(loads.std() / m) if m > 0 else 0.0

    @property
    def load_max(self) -> float:
        """Largest expert load relative to the mean (1.0 = perfectly balanced)."""
        loads = np.asarray(self.expert_loads, dtype=np.float64)
        return float(loads.max() * len(loads)) if loads.sum() > 0 else 0.0

    def figures(self) -> dict[str, Any]:
        """Every reported figure, in RESULT / CSV order (after the point's axes)."""
        pt = self.point
        out: dict[str, Any] = {
            "null_realized": self.null_realized,
            "real_assignments": self.real_assignments,
            "null_assignments": self.null_assignments,
            "experts_per_token": self.real_assignments / pt.tokens,
            "all_null_frac": self.all_null_frac,
            "time_s": self.main.time_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops": self.tflops,
            "load_cv": self.load_cv,
            "load_max": self.load_max,
            "load_violation": self.load_max - 1.0,
            "time_min_s": self.main.time_min_s,
            "time_max_s": self.main.time_max_s,
            "compile_s": self.main.compile_s,
            "time_fwd_s": self.forward.time_s if self.forward else "",
            "time_bwd_s": (self.main.time_s - self.forward.time_s) if self.forward else "",
        }
        return out


# --- helpers -------------------------------------------------------------------------------------------------


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _cast_floats(tree, dtype):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def cast(a):
        if eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(dtype)
        return a

    return jax.tree_util.tree_map(cast, tree)


def _scalar(v) -> float:
    arr = getattr(v, "array", v)
    return float(np.asarray(arr))


def _vector(v) -> list[float]:
    arr = getattr(v, "array", v)
    return [float(a) for a in np.asarray(arr, dtype=np.float64).reshape(-1)]


def time_fn(fn: Callable, args: tuple, warmup: int, iters: int) -> Measurement:
    """Compile ahead of time, warm up, then time `iters` blocking calls; report the median."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return Measurement(
        time_s=float(statistics.median(times)),
        time_min_s=float(min(times)),
        time_max_s=float(max(times)),
        compile_s=compile_s,
        times=times,
    )


def _loss(y, extras: Optional[dict]) -> Any:
    """Scalar training-like loss: mean square of the output, plus the router's aux losses when present."""
    import haliax as hax
    import jax.numpy as jnp

    arr = y.array if hasattr(y, "array") else y
    loss = jnp.mean(jnp.square(arr.astype(jnp.float32)))
    if extras:
        for name in ("load_balancing_loss", "router_z_loss"):
            v = extras.get(name)
            if v is not None:
                loss = loss + jnp.asarray(getattr(v, "array", v), dtype=jnp.float32).sum()
    del hax
    return loss


def _make_fns(forward: Callable, model, x, key, with_aux: bool):
    """(main_fn, fwd_fn, args): jit-able pure functions of (params, x, key); static parts closed over."""
    import equinox as eqx
    import jax

    params, static = eqx.partition(model, eqx.is_array)

    def fwd_only(params, x, key):
        y, _ = forward(eqx.combine(params, static), x, key)
        return y

    def loss_fn(diff, key):
        params, x = diff
        y, extras = forward(eqx.combine(params, static), x, key)
        return _loss(y, extras if with_aux else None)

    def fwd_bwd(params, x, key):
        return jax.value_and_grad(loss_fn)((params, x), key)

    return fwd_only, fwd_bwd, (params, x, key)


# --- the impls -----------------------------------------------------------------------------------------------


def _null_cfg(pt: Point):
    from null_moe import NullMoEConfig

    return NullMoEConfig(
        hidden_dim=pt.hidden,
        intermediate_dim=pt.mlp_dim,
        n_routed_experts=pt.experts,
        num_experts_per_tok=pt.topk,
        null_route_frac=pt.null_target,
        take_until_null=pt.null_mode == "take_until_null",
        renormalize_real=pt.renormalize,
        gmm_backend=pt.backend,
    )


def build_layer(pt: Point):
    """Our layer with the point's config, cast to its dtype, plus its input x."""
    import haliax as hax
    import jax
    from null_moe import NullRoutedMoE

    cfg = _null_cfg(pt)
    k_init, k_x = jax.random.split(jax.random.PRNGKey(pt.seed))
    layer = NullRoutedMoE.init(cfg, key=k_init)
    layer = _cast_floats(layer, _dtype(pt.dtype))
    Token = hax.Axis("token", pt.tokens)
    x = hax.random.normal(k_x, (Token, cfg.Embed)).astype(_dtype(pt.dtype))
    return cfg, layer, x


def _null_forward(pt: Point) -> Callable:
    skip = pt.impl == "null_moe"

    def forward(layer, x, key):
        if pt.routing == "forced":
            routing = layer.route_forced(
                x, key=key, null_frac=pt.null_target, mode=pt.null_mode, renormalize_real=pt.renormalize
            )
            return layer.apply(x, routing, skip_null=skip)
        if skip:
            return layer(x, key=None)
        return layer.apply(x, layer.route(x), skip_null=False)

    return forward


def _stock_mesh():
    import haliax as hax
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    set_mesh = getattr(hax.partitioning, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else mesh


def build_stock(pt: Point):
    """Levanter's MixtralSparseMoeBlock with our layer's weights (gate, w1, w2, w3) copied in."""
    import equinox as eqx
    import haliax as hax
    import jax
    from levanter.models.mixtral import MixtralConfig, MixtralSparseMoeBlock

    _, ours, x_tok = build_layer(dataclasses.replace(pt, impl="null_moe", null_target=0.0))
    heads = 1
    mcfg = MixtralConfig(
        seq_len=pt.tokens,
        hidden_dim=pt.hidden,
        intermediate_dim=pt.mlp_dim,
        n_routed_experts=pt.experts,
        num_experts_per_tok=pt.topk,
        num_heads=heads,
        num_kv_heads=heads,
    )
    with _stock_mesh():
        block = MixtralSparseMoeBlock.init(mcfg, key=jax.random.PRNGKey(pt.seed))
    block = _cast_floats(block, _dtype(pt.dtype))

    def _copy_linear(dst, src):
        dst = eqx.tree_at(lambda m: m.weight, dst, src.weight.rearrange(dst.weight.axes))
        if getattr(dst, "bias", None) is not None and getattr(src, "bias", None) is not None:
            dst = eqx.tree_at(lambda m: m.bias, dst, src.bias.rearrange(dst.bias.axes))
        return dst

    block = eqx.tree_at(lambda b: b.gate, block, _copy_linear(block.gate, ours.gate))
    for name in ("w1", "w2", "w3"):
        block = eqx.tree_at(
            lambda b, n=name: getattr(b.experts, n), block,
            _copy_linear(getattr(block.experts, name), getattr(ours.experts, name)),
        )
    x = hax.named(x_tok.array, (mcfg.Pos, mcfg.Embed))
    return mcfg, block, x


def _stock_forward(layer, x, key):
    y, extras = layer(x, key=None)
    return y, extras


def run_point(pt: Point) -> PointResult:
    """Build, compile, warm up, time one point; then compute its routing stats (outside the timed region)."""
    import jax

    key = jax.random.PRNGKey(pt.seed + 1)
    ctx = contextlib.nullcontext()
    if pt.impl == "stock_levanter":
        mcfg, model, x = build_stock(pt)
        forward = _stock_forward
        with_aux = True
        ctx = _stock_mesh()
        w1 = model.experts.w1
        backend = "megablox" if getattr(w1, "use_gmm", False) else "ragged_dot"
        backend = f"levanter:{backend}"
    else:
        cfg, model, x = build_layer(pt)
        forward = _null_forward(pt)
        with_aux = pt.routing == "learned"
        backend = str(model.backend)

    with ctx:
        fwd_only, fwd_bwd, args = _make_fns(forward, model, x, key, with_aux)
        main_fn = fwd_bwd if pt.bench_pass == "forward_backward" else fwd_only
        main = time_fn(main_fn, args, pt.warmup, pt.iters)
        fwd = time_fn(fwd_only, args, pt.warmup, pt.iters) if pt.split else None

        # routing stats from one untimed forward
        import equinox as eqx

        params, static = eqx.partition(model, eqx.is_array)
        _, extras = jax.jit(lambda p, x, k: forward(eqx.combine(p, static), x, k))(*args)
        extras = jax.device_get(extras)

    tk = pt.tokens * pt.topk
    loads = _vector(extras["expert_loads"])
    if pt.impl == "stock_levanter":
        null_frac, hist, all_null = 0.0, None, 0.0
    else:
        null_frac = _scalar(extras["null_frac"])
        hist = _vector(extras["real_per_token_hist"]) if "real_per_token_hist" in extras else None
        all_null = _scalar(extras["all_null_frac"]) if "all_null_frac" in extras else 0.0
    null_assign = int(round(null_frac * tk))
    return PointResult(
        point=pt,
        backend=backend,
        null_realized=null_assign / tk,
        real_assignments=tk - null_assign,
        null_assignments=null_assign,
        expert_loads=loads,
        real_per_token_hist=hist,
        all_null_frac=all_null,
        main=main,
        forward=fwd,
    )
