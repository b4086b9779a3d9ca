"""Build and time one sweep point: the NullRoutedMoE layer (or a baseline) in isolation.

Impls:
- ``null_moe``: the project's layer; null slots are dropped before the grouped matmul (``skip_null=True``).
- ``masked_null``: same layer and routing, but null slots stay in the expert matmul as zero-weight rows
  (``skip_null=False``): the naive approach, whose cost does not fall with the null fraction.
- ``stock_levanter``: ``levanter.models.mixtral.MixtralSparseMoeBlock`` with our layer's gate / w1 / w2 / w3
  weights copied in (null 0.0 only).

Forced routing (the default): the null mask is drawn once per point, outside the timed step, with
``null_moe.routing.forced_null_mask`` (what ``layer.route_forced`` uses) and fed to the step as data, so one
executable serves every null fraction and mode of a shape (compiling per point would cost ~2-3 s each on CPU).
The timed step is the whole layer: router logits, softmax and top-k, the mask, gate weights, dispatch, the
grouped expert matmuls, combine (and, with ``forward_backward``, the backward pass to the weights and x).

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
    timing: str = "sequential"  # "interleaved": timed in rounds with the other points of its group (run_group)

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


def compile_fn(fn: Callable, args: tuple):
    """AOT-compile fn for args; returns (executable, seconds)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _measurement(times: list[float], compile_s: float) -> Measurement:
    return Measurement(
        time_s=float(statistics.median(times)),
        time_min_s=float(min(times)),
        time_max_s=float(max(times)),
        compile_s=compile_s,
        times=list(times),
    )


def _timed_call(compiled: Callable, args: tuple) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0


def measure(compiled: Callable, args: tuple, warmup: int, iters: int, compile_s: float = 0.0) -> Measurement:
    """Warm up, then time `iters` calls, each blocking until ready; report the median."""
    for _ in range(warmup):
        _timed_call(compiled, args)
    return _measurement([_timed_call(compiled, args) for _ in range(iters)], compile_s)


def time_fn(fn: Callable, args: tuple, warmup: int, iters: int) -> Measurement:
    """Compile ahead of time, warm up, then time `iters` blocking calls; report the median."""
    compiled, compile_s = compile_fn(fn, args)
    return measure(compiled, args, warmup, iters, compile_s)


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


def _null_cfg(pt: Point, for_forced: bool = False):
    """The layer config of a point. Forced routing ignores the layer's own null settings (the mask is drawn at
    the target fraction), so forced points build the layer at null 0 and share it across fractions and modes."""
    from null_moe import NullMoEConfig

    return NullMoEConfig(
        hidden_dim=pt.hidden,
        intermediate_dim=pt.mlp_dim,
        n_routed_experts=pt.experts,
        num_experts_per_tok=pt.topk,
        null_route_frac=0.0 if for_forced else pt.null_target,
        take_until_null=False if for_forced else pt.null_mode == "take_until_null",
        renormalize_real=pt.renormalize,
        gmm_backend=pt.backend,
        tile_rows=pt.tile_rows,
        fused_experts=pt.fused,
    )


def build_layer(pt: Point, for_forced: bool = False):
    """Our layer with the point's config, cast to its dtype, plus its input x (same weights for every impl)."""
    import haliax as hax
    import jax
    from null_moe import NullRoutedMoE

    cfg = _null_cfg(pt, for_forced)
    k_init, k_x = jax.random.split(jax.random.PRNGKey(pt.seed))
    layer = NullRoutedMoE.init(cfg, key=k_init)
    layer = _cast_floats(layer, _dtype(pt.dtype))
    Token = hax.Axis("token", pt.tokens)
    x = hax.random.normal(k_x, (Token, cfg.Embed)).astype(_dtype(pt.dtype))
    return cfg, layer, x


def forced_routing_from_mask(layer, x, null_mask):
    """``layer.route_forced`` with its random null mask given as data (``null_mask`` [T, k] bool): stock top-k
    over the real logits, then the mask sends slots to null. Identical to ``layer.route_forced(key=...)`` for
    the mask ``draw_null_mask`` draws from the same key (tests/test_bench.py checks it); taking the mask as an
    input lets one executable serve every null fraction and mode of a shape."""
    return layer.route_forced(x, null_mask=null_mask, renormalize_real=layer.config.renormalize_real)


def draw_null_mask(pt: Point):
    """The forced null mask of a point, drawn with the same function ``route_forced`` uses (untimed)."""
    import jax
    from null_moe import routing as R

    key = jax.random.PRNGKey(pt.seed + 1)
    return jax.block_until_ready(R.forced_null_mask(key, pt.tokens, pt.topk, pt.null_target, pt.null_mode))


def _forced_forward(skip_null: bool) -> Callable:
    def forward(layer, x, null_mask):
        return layer.apply(x, forced_routing_from_mask(layer, x, null_mask), skip_null=skip_null)

    return forward


def _learned_forward(skip_null: bool) -> Callable:
    def forward(layer, x, key):
        if skip_null:
            return layer(x, key=None)  # exactly what training calls
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

    _, ours, x_tok = build_layer(dataclasses.replace(pt, impl="null_moe", null_target=0.0), for_forced=True)
    mcfg = MixtralConfig(
        seq_len=pt.tokens,
        hidden_dim=pt.hidden,
        intermediate_dim=pt.mlp_dim,
        n_routed_experts=pt.experts,
        num_experts_per_tok=pt.topk,
        num_heads=1,
        num_kv_heads=1,
    )
    with _stock_mesh():
        block = MixtralSparseMoeBlock.init(mcfg, key=jax.random.PRNGKey(pt.seed))
    block = _cast_floats(block, _dtype(pt.dtype))

    def _copy_linear(dst, src):
        return eqx.tree_at(lambda m: m.weight, dst, src.weight.rearrange(dst.weight.axes))

    block = eqx.tree_at(lambda b: b.gate, block, _copy_linear(block.gate, ours.gate))
    for name in ("w1", "w2", "w3"):
        block = eqx.tree_at(
            lambda b, n=name: getattr(b.experts, n), block,
            _copy_linear(getattr(block.experts, name), getattr(ours.experts, name)),
        )
    x = hax.named(x_tok.array, (mcfg.Pos, mcfg.Embed))
    return mcfg, block, x


def _stock_forward(layer, x, key):
    return layer(x, key=None)


def _stats_from_ids(expert_ids, n_real: int, k: int) -> dict[str, Any]:
    """Exact integer routing statistics from the [T, k] expert ids (N = null), on the host."""
    ids = np.asarray(expert_ids).reshape(-1, k)
    is_real = ids < n_real
    counts = np.bincount(ids[is_real].reshape(-1), minlength=n_real)[:n_real].astype(np.float64)
    real = int(is_real.sum())
    per_tok = is_real.sum(axis=1)
    hist = np.bincount(per_tok, minlength=k + 1)[: k + 1].astype(np.float64) / ids.shape[0]
    loads = counts / max(real, 1)
    return {
        "real": real,
        "null": int(ids.size - real),
        "loads": [float(v) for v in loads],
        "hist": [float(v) for v in hist],
        "all_null": float(hist[0]),
    }


class _Prepared:
    """Compiled executables and inputs for one (shape, topk, impl, pass, dtype, backend, ...) of forced routing,
    shared by every null fraction and mode of it."""

    def __init__(self, pt: Point):
        import equinox as eqx
        import jax

        cfg, layer, x = build_layer(pt, for_forced=True)
        self.backend = str(layer.backend)
        mask0 = draw_null_mask(dataclasses.replace(pt, null_target=0.0, null_mode="independent"))
        forward = _forced_forward(skip_null=pt.impl == "null_moe")
        fwd_only, fwd_bwd, args = _make_fns(forward, layer, x, mask0, with_aux=False)
        self.params, self.x = args[0], args[1]
        main_fn = fwd_bwd if pt.bench_pass == "forward_backward" else fwd_only
        self.main, self.main_compile_s = compile_fn(main_fn, args)
        self.fwd = self.fwd_compile_s = None
        if pt.split:
            self.fwd, self.fwd_compile_s = compile_fn(fwd_only, args)
        static = eqx.partition(layer, eqx.is_array)[1]

        def route_ids(params, x, mask):
            return forced_routing_from_mask(eqx.combine(params, static), x, mask).expert_ids

        self.route_ids = jax.jit(route_ids)


_CACHE: dict[tuple, _Prepared] = {}


def _cache_key(pt: Point) -> tuple:
    return (pt.tokens, pt.hidden, pt.mlp_dim, pt.experts, pt.topk, pt.impl, pt.bench_pass, pt.renormalize,
            pt.backend, pt.tile_rows, pt.fused, pt.dtype, pt.seed, pt.split)


def _prepared(pt: Point) -> _Prepared:
    key = _cache_key(pt)
    if key not in _CACHE:
        _CACHE.clear()  # points run grouped by this key: keep one set of executables and weights alive
        _CACHE[key] = _Prepared(pt)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def _run_forced(pt: Point) -> PointResult:
    prep = _prepared(pt)
    mask = draw_null_mask(pt)
    args = (prep.params, prep.x, mask)
    main = measure(prep.main, args, pt.warmup, pt.iters, prep.main_compile_s)
    fwd = measure(prep.fwd, args, pt.warmup, pt.iters, prep.fwd_compile_s) if prep.fwd is not None else None
    st = _stats_from_ids(prep.route_ids(*args), pt.experts, pt.topk)
    return _result(pt, prep.backend, st, main, fwd)


def group_key(pt: Point) -> Optional[tuple]:
    """Points with equal keys share one compiled step (forced routing: the null mask is data) and can be timed
    together by :func:`run_group`; None for points that compile their own (learned routing, stock Levanter)."""
    if pt.routing == "forced" and pt.impl != "stock_levanter":
        return _cache_key(pt) + (pt.warmup, pt.iters)
    return None


def run_group(points: list[Point]) -> list[PointResult]:
    """Times points of one :func:`group_key` in interleaved rounds: each point warms up, then every round calls
    each point's step once (and its forward alone, when split). A slow spell of the machine then lands on every
    null fraction alike instead of on whichever point ran during it, so ratios between them hold up."""
    key = group_key(points[0])
    if key is None or any(group_key(p) != key for p in points):
        raise ValueError("run_group needs forced-routing points that share one group_key")
    prep = _prepared(points[0])
    argss = [(prep.params, prep.x, draw_null_mask(pt)) for pt in points]
    execs = [("main", prep.main)] + ([("fwd", prep.fwd)] if prep.fwd is not None else [])
    for args in argss:
        for _, compiled in execs:
            for _ in range(points[0].warmup):
                _timed_call(compiled, args)
    times: dict[tuple[int, str], list[float]] = {(i, n): [] for i in range(len(points)) for n, _ in execs}
    for _ in range(points[0].iters):
        for i, args in enumerate(argss):
            for name, compiled in execs:
                times[(i, name)].append(_timed_call(compiled, args))
    results = []
    for i, (pt, args) in enumerate(zip(points, argss)):
        main = _measurement(times[(i, "main")], prep.main_compile_s)
        fwd = _measurement(times[(i, "fwd")], prep.fwd_compile_s) if prep.fwd is not None else None
        st = _stats_from_ids(prep.route_ids(*args), pt.experts, pt.topk)
        results.append(dataclasses.replace(_result(pt, prep.backend, st, main, fwd), timing="interleaved"))
    return results


def _run_generic(pt: Point) -> PointResult:
    """Learned routing and stock Levanter: one build and compile per point."""
    import equinox as eqx
    import jax

    ctx = contextlib.nullcontext()
    key = jax.random.PRNGKey(pt.seed + 1)
    if pt.impl == "stock_levanter":
        _, model, x = build_stock(pt)
        forward, with_aux, ctx = _stock_forward, True, _stock_mesh()
        backend = "levanter:" + ("megablox" if getattr(model.experts.w1, "use_gmm", False) else "ragged_dot")
    else:
        _, model, x = build_layer(pt)
        forward, with_aux = _learned_forward(skip_null=pt.impl == "null_moe"), True
        backend = str(model.backend)
    with ctx:
        fwd_only, fwd_bwd, args = _make_fns(forward, model, x, key, with_aux)
        main_fn = fwd_bwd if pt.bench_pass == "forward_backward" else fwd_only
        main = time_fn(main_fn, args, pt.warmup, pt.iters)
        fwd = time_fn(fwd_only, args, pt.warmup, pt.iters) if pt.split else None
        if pt.impl == "stock_levanter":
            loads = _vector(jax.jit(lambda p, x, k: forward(eqx.combine(p, eqx.partition(model, eqx.is_array)[1]), x, k)[1]["expert_loads"])(*args))
            tk = pt.tokens * pt.topk
            st = {"real": tk, "null": 0, "loads": loads, "hist": None, "all_null": 0.0}
        else:
            static = eqx.partition(model, eqx.is_array)[1]
            ids = jax.jit(lambda p, x: eqx.combine(p, static).route(x).expert_ids)(args[0], args[1])
            st = _stats_from_ids(ids, pt.experts, pt.topk)
    return _result(pt, backend, st, main, fwd)


def _result(pt: Point, backend: str, st: dict, main: Measurement, fwd: Optional[Measurement]) -> PointResult:
    tk = pt.tokens * pt.topk
    return PointResult(
        point=pt,
        backend=backend,
        null_realized=st["null"] / tk,
        real_assignments=st["real"],
        null_assignments=st["null"],
        expert_loads=st["loads"],
        real_per_token_hist=st["hist"],
        all_null_frac=st["all_null"],
        main=main,
        forward=fwd,
    )


def run_point(pt: Point) -> PointResult:
    """Build (or reuse), compile, warm up and time one point; routing stats are computed outside the timing."""
    if pt.routing == "forced" and pt.impl != "stock_levanter":
        return _run_forced(pt)
    return _run_generic(pt)
