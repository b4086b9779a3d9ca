"""Compile and time sweep points; each point's result holds its timings and the routing counts of its own calls.

Points that share one compiled step (forced routing: every null fraction and mode of a shape, topk and impl,
the null mask being data) form a batch, timed together in interleaved rounds (scripts/bench/timer.py); every
other point (learned routing, stock Levanter, or all of them with ``interleave: false``) is a batch of one.
The compiled step of the last batch stays cached, so consecutive batches of one group compile once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import numpy as np

from scripts.bench import ep as bep
from scripts.bench import impls, timer
from scripts.bench.points import Point, forced_layer_config, layer_config


@dataclasses.dataclass(frozen=True)
class RoutingCounts:
    """Exact integer routing statistics of a point, read from the statistics its timed step returned."""

    real: int  # real assignments (slots that reach an expert)
    null: int
    per_expert: tuple[int, ...]  # real assignments per expert
    per_token: Optional[tuple[int, ...]]  # tokens with 0..k real slots (None: the impl does not report it)
    dropped: int = 0  # real slots dropped by an expert-parallel capacity (they contributed zero)

    @staticmethod
    def from_stats(stats: dict, pt: Point) -> "RoutingCounts":
        """The layer reports fractions (f32); the counts behind them are integers far below 2^24, so rounding
        recovers them exactly."""
        tk = pt.tokens * pt.topk
        real = int(round(float(stats["experts_per_token"]) * pt.tokens)) if "experts_per_token" in stats else tk
        per_expert = np.rint(np.asarray(stats["expert_loads"], np.float64) * real).astype(int)
        hist = stats.get("real_per_token_hist")
        per_token = None if hist is None else tuple(int(v) for v in np.rint(np.asarray(hist, np.float64) * pt.tokens))
        dropped = int(round(float(stats.get("dropped_frac", 0.0)) * real))
        return RoutingCounts(real, tk - real, tuple(int(v) for v in per_expert), per_token, dropped)


@dataclasses.dataclass(frozen=True)
class PointResult:
    point: Point
    backend: str  # the grouped-matmul backend that ran
    counts: RoutingCounts
    main: timer.Timing  # the step of bench_pass
    forward: Optional[timer.Timing] = None  # the forward alone, when the split is measured
    timing: str = "sequential"  # "interleaved": timed in rounds with the other points of its batch
    transport: str = "none"  # expert-parallel exchange that ran: all_to_all, ragged_all_to_all, psum, or none
    comm: dict = dataclasses.field(default_factory=dict)  # bytes one device sends per step, by collective kind
    expert_path: str = "unfused"  # "fused" when the backend's fused expert kernels ran (layer.expert_path)

    @property
    def expert_path_fused(self) -> bool:
        return self.expert_path == "fused"


def group_key(pt: Point) -> Optional[tuple]:
    """Points with equal keys share one compiled step; None for points that compile their own."""
    if pt.routing != "forced" or pt.impl == "stock_levanter":
        return None
    return (pt.tokens, pt.hidden, pt.mlp_dim, pt.experts, pt.topk, pt.impl, pt.bench_pass, pt.renormalize,
            pt.backend, pt.tile_rows, pt.fused, pt.dtype, pt.seed, pt.split, pt.ep_size, pt.capacity_factor,
            pt.ep_transport, pt.ep_dedup, pt.null_target if pt.capacity_per_p else None)


def batches(points: list[Point], interleave: bool) -> list[list[Point]]:
    """Consecutive points of one group and timing loop form a batch (with ``interleave``); the rest run alone."""
    out: list[list[Point]] = []
    for pt in points:
        key = group_key(pt)
        prev = out[-1][0] if out else None
        if (interleave and prev is not None and key is not None and group_key(prev) == key
                and (prev.warmup, prev.iters) == (pt.warmup, pt.iters)):
            out[-1].append(pt)
        else:
            out.append([pt])
    return out


class _Step:
    """A point's compiled step (and its forward alone when split), with the inputs its batch shares."""

    def __init__(self, pt: Point):
        self.context = contextlib.nullcontext
        forced = group_key(pt) is not None
        cfg = forced_layer_config(pt) if forced or pt.impl == "stock_levanter" else layer_config(pt)
        layer, x = impls.build_layer(cfg, pt.seed, pt.tokens, pt.dtype)
        self.devices, self.transport, self.data_sharding = 1, "none", None
        if pt.impl == "stock_levanter":
            model, x, self.backend = impls.build_stock(layer, x, pt.tokens, pt.seed, pt.dtype)
            forward, with_aux, self.context = impls.stock_forward, True, impls.stock_mesh
        else:
            if pt.ep:
                import haliax as hax
                from jax.sharding import NamedSharding, PartitionSpec

                mesh = bep.ep_mesh(pt.ep_size)
                self.context = functools.partial(bep.mesh_context, mesh, bep.ep_mapping(pt.impl, x.axes[0].name))
                with self.context():
                    layer, x = hax.shard(layer), hax.shard(x)
                self.devices, self.data_sharding = pt.ep_size, NamedSharding(mesh, PartitionSpec())
                if pt.ep_size > 1:
                    self.transport = "psum" if pt.impl == "compact_psum" else layer.transport
            model, self.backend, self.expert_path = layer, layer.backend, layer.expert_path
            forward = impls.forced_forward(pt.impl) if forced else impls.learned_forward(pt.impl)
            with_aux = not forced  # training adds the aux losses; forced routing has none to learn
        self.forced = forced
        with self.context():
            fwd, fwd_bwd, self.params = impls.make_steps(forward, model, with_aux)
            self.x = x
            args = (self.params, x, self.data(pt))
            main = fwd_bwd if pt.bench_pass == "forward_backward" else fwd
            self.main, self.main_compile_s = timer.compile_ahead(main, *args)
            self.fwd = self.fwd_compile_s = None
            if pt.split:
                self.fwd, self.fwd_compile_s = timer.compile_ahead(fwd, *args)
        # one device has no collectives: its module text need not be rendered and read
        self.comm = bep.collective_bytes(self.main.as_text(), self.devices) if self.devices > 1 else {}

    def data(self, pt: Point):
        """The step's third input: the point's null mask (forced routing), else an unused scalar."""
        import jax
        import jax.numpy as jnp

        data = (impls.draw_null_mask(pt.seed, pt.tokens, pt.topk, pt.null_target, pt.null_mode) if self.forced
                else jnp.zeros((), jnp.int32))
        # on an expert-parallel mesh, every input lives on the mesh (replicated; the layer slices its tokens)
        return data if self.data_sharding is None else jax.device_put(data, self.data_sharding)


_CACHE: dict[tuple, _Step] = {}


def _step(pt: Point) -> _Step:
    key = group_key(pt)
    if key is None:
        _CACHE.clear()
        return _Step(pt)
    if key not in _CACHE:
        _CACHE.clear()  # one group's executables and weights alive at a time
        _CACHE[key] = _Step(pt)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def _host(out):
    import jax

    return jax.device_get(out[1])  # the statistics; the rest of the output is dropped at once


def run_batch(points: list[Point]) -> list[PointResult]:
    """Compile (or reuse) the batch's step, then time every point in interleaved rounds: each point's step
    (and its forward alone, when split) once per round, after its warmup calls."""
    one_loop = len({(group_key(p), p.warmup, p.iters) for p in points}) == 1
    if not one_loop or (len(points) > 1 and group_key(points[0]) is None):
        raise ValueError("run_batch needs points of one group and timing loop (see runner.batches)")
    step = _step(points[0])
    calls, compile_s = [], []
    for pt in points:
        args = (step.params, step.x, step.data(pt))
        calls.append(functools.partial(step.main, *args))
        compile_s.append(step.main_compile_s)
        if step.fwd is not None:
            calls.append(functools.partial(step.fwd, *args))
            compile_s.append(step.fwd_compile_s)
    with step.context():
        timings = timer.interleaved(calls, warmup=points[0].warmup, rounds=points[0].iters, keep=_host,
                                    compile_s=compile_s)
    per = 2 if step.fwd is not None else 1
    label = "interleaved" if len(points) > 1 else "sequential"
    results = []
    for i, pt in enumerate(points):
        main = timings[i * per]
        fwd = timings[i * per + 1] if per == 2 else None
        results.append(PointResult(pt, str(step.backend), RoutingCounts.from_stats(main.kept, pt), main, fwd, label,
                                   step.transport, step.comm, getattr(step, "expert_path", "unfused")))
    return results
