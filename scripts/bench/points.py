"""Sweep points: the config expanded into ``Point`` s, the one translation to ``NullMoEConfig``, and the memory check.

``layer_config`` is the only place where the bench's vocabulary (``hidden``, ``topk``, ``null_route_frac``, ...)
becomes the layer's (``hidden_dim``, ``num_experts_per_tok``, ...). Every point's values are checked by building
that ``NullMoEConfig``: its error message comes back with the bench's names, prefixed by the field the value
came from (``topk_list[1]: topk must be in [1, experts=4], got 8``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Optional

from null_moe.config import NullMoEConfig, num_null_slots

from scripts.bench.config import EP_IMPLS, BenchConfig, BenchConfigError, ShapeConfig

#: Point fields of the expert-parallel impls (bench fields of the same names).
EP_FIELDS = ("ep_size", "capacity_factor", "ep_transport", "ep_dedup")
NULL_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: everything that determines a measurement (``key`` hashes exactly these fields)."""

    tokens: int
    hidden: int
    mlp_dim: int
    experts: int
    topk: int
    impl: str
    null_target: float
    null_mode: str  # independent | take_until_null; learned routing: "learned" where the mode cannot matter
    routing: str
    bench_pass: str
    renormalize: bool
    backend: str  # requested; the one that ran is in the result
    tile_rows: Optional[int]
    fused: bool
    dtype: str
    warmup: int
    iters: int
    seed: int
    split: bool
    # expert parallelism (EP_IMPLS only; the defaults elsewhere, and left out of the key there)
    ep_size: int = 1
    capacity_factor: Optional[float] = None
    ep_transport: str = "auto"
    ep_dedup: bool = True
    # bench field -> where its value came from ("shapes[2].tokens", "topk_list[1]"); for error messages only
    where: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.mlp_dim}x{self.experts}"

    @property
    def key(self) -> str:
        """Stable id of the measurement: same settings, same key (resume reads it from the CSV)."""
        skip = {"where"} | (set() if self.impl in EP_IMPLS else set(EP_FIELDS))
        blob = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def ep(self) -> bool:
        """Runs over ``ep_size`` devices (scripts/bench/ep.py)."""
        return self.impl in EP_IMPLS

    @property
    def capacity_per_p(self) -> bool:
        """null_moe_ep with a capacity: its send blocks are sized from p, so each null fraction compiles its own
        step (a dropless one serves every fraction)."""
        return self.impl == "null_moe_ep" and self.capacity_factor is not None

    @property
    def label(self) -> str:
        return point_label(self.shape, self.topk, self.impl, self.null_mode, self.null_target)


def point_label(shape: str, topk: int, impl: str, null_mode: str, null_target: float) -> str:
    """A point's name in logs and W&B (its row carries the same five values)."""
    return f"{shape}_k{topk}_{impl}_{null_mode}_p{null_target:.2f}"


# --- the one translation: bench field -> NullMoEConfig field -------------------------------------------------------

# NullMoEConfig field: (Point attribute, bench config field). take_until_null comes from the point's null_mode.
_TO_LAYER = {
    "hidden_dim": ("hidden", "hidden"),
    "intermediate_dim": ("mlp_dim", "mlp_dim"),
    "n_routed_experts": ("experts", "experts"),
    "num_experts_per_tok": ("topk", "topk"),
    "null_route_frac": ("null_target", "null_route_frac"),
    "renormalize_real": ("renormalize", "renormalize_real_after_null"),
    "gmm_backend": ("backend", "backend"),
    "tile_rows": ("tile_rows", "tile_rows"),
    "fused_experts": ("fused", "fused_experts"),
    "capacity_factor": ("capacity_factor", "capacity_factor"),
    "ep_transport": ("ep_transport", "ep_transport"),
    "ep_dedup": ("ep_dedup", "ep_dedup"),
}
_LAYER_TO_BENCH = {layer: bench for layer, (_, bench) in _TO_LAYER.items()} | {"take_until_null": "null_routing_mode"}


def layer_config(pt: Point) -> NullMoEConfig:
    """The layer config a point declares (its null fraction and mode). Raises BenchConfigError in the bench's
    words, naming the field the bad value came from."""
    kwargs = {layer: getattr(pt, attr) for layer, (attr, _) in _TO_LAYER.items()}
    kwargs["take_until_null"] = pt.null_mode == "take_until_null"
    try:
        return NullMoEConfig(**kwargs)
    except ValueError as e:
        msg = str(e)
        field = _LAYER_TO_BENCH.get(msg.split(" ", 1)[0].split("=", 1)[0], "")
        for layer, bench in _LAYER_TO_BENCH.items():
            msg = re.sub(rf"\b{layer}\b", bench, msg)
        where = pt.where.get(field, field)
        raise BenchConfigError(msg if where == field else f"{where}: {msg}") from None


def forced_layer_config(pt: Point) -> NullMoEConfig:
    """Forced routing draws its null mask outside the layer, so its layer runs at null 0: one layer (and one
    compiled step) serves every null fraction and mode of a shape, topk and impl. Except null_moe_ep with a
    capacity: its send blocks are sized from the point's p (``Point.capacity_per_p``)."""
    cfg = layer_config(pt)
    return dataclasses.replace(cfg, null_route_frac=cfg.null_route_frac if pt.capacity_per_p else 0.0,
                               take_until_null=False)


# --- expansion -----------------------------------------------------------------------------------------------------


def _entries(cfg: BenchConfig):
    """(prefix for error paths, shape, its topk list with paths, its null list with paths, impls, overrides)."""
    shapes = [(f"shapes[{i}].", s) for i, s in enumerate(cfg.shapes)] or [
        ("", ShapeConfig(tokens=cfg.tokens, hidden=cfg.hidden, mlp_dim=cfg.mlp_dim, experts=cfg.experts))
    ]
    for pre, s in shapes:
        if s.topk_list is not None:
            ks = [(k, f"{pre}topk_list[{i}]") for i, k in enumerate(s.topk_list)]
        elif cfg.topk_list:
            ks = [(k, f"topk_list[{i}]") for i, k in enumerate(cfg.topk_list)]
        else:
            ks = [(cfg.topk, "topk")]
        if s.null_route_frac_list is not None:
            ps = [(p, f"{pre}null_route_frac_list[{i}]") for i, p in enumerate(s.null_route_frac_list)]
        elif cfg.null_route_sweep:
            ps = [(p, "null_route_sweep") for p in NULL_SWEEP]
        elif cfg.null_route_frac_list:
            ps = [(p, f"null_route_frac_list[{i}]") for i, p in enumerate(cfg.null_route_frac_list)]
        else:
            ps = [(cfg.null_route_frac, "null_route_frac")]
        impls = s.impl if s.impl is not None else cfg.impl
        for name, values in (("topk_list", ks), ("null_route_frac_list", ps), ("impl", impls)):
            if not values:
                raise BenchConfigError(f"{pre}{name}: must not be empty")
        yield pre, s, ks, ps, impls


def _modes(cfg: BenchConfig, routing: str, p: float, experts: int, topk: int) -> list[str]:
    """The null modes to measure at p. Null 0 is one computation whatever the mode: measured once, under the
    first mode. Under learned routing the M null copies share one logit, so once M >= k the router already
    takes until null and the take_until_null flag changes nothing: measured once, labelled ``learned``."""
    modes = ["independent", "take_until_null"] if cfg.null_routing_mode == "both" else [cfg.null_routing_mode]
    if routing == "learned" and (p == 0.0 or num_null_slots(experts, p, None) >= topk):
        return ["learned"]
    return modes[:1] if p == 0.0 else modes


def _check_counts(pt: Point) -> None:
    """What NullMoEConfig does not know about: the token count, the timing loop and the expert-parallel size."""
    for name, value, low in (("tokens", pt.tokens, 1), ("warmup", pt.warmup, 0), ("iters", pt.iters, 1),
                             ("ep_size", pt.ep_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchConfigError(f"{pt.where.get(name, name)}: must be an integer >= {low}, got {value!r}")
    if pt.ep:
        for name in ("experts", "tokens"):
            if getattr(pt, name) % pt.ep_size:
                raise BenchConfigError(f"ep_size: {pt.where.get(name, name)}={getattr(pt, name)} must be divisible "
                                       f"by ep_size={pt.ep_size} (impl {pt.impl})")


def expand(cfg: BenchConfig) -> list[Point]:
    """All sweep points in run order (shape, topk, impl, mode, null fraction), each checked through the layer's
    config. ``stock_levanter`` has no null routing: it runs at null 0.0 only (other fractions are skipped)."""
    if cfg.max_memory_gb is not None and not cfg.max_memory_gb > 0:
        raise BenchConfigError(f"max_memory_gb: must be > 0 or null, got {cfg.max_memory_gb!r}")
    for name in ("out_dir", "csv_name"):
        if not getattr(cfg, name):
            raise BenchConfigError(f"{name}: must not be empty")
    if os.sep in cfg.csv_name:
        raise BenchConfigError(f"csv_name: must be a file name (no '{os.sep}'), got {cfg.csv_name!r}")
    points: list[Point] = []
    seen: set[str] = set()
    for pre, s, ks, ps, impls in _entries(cfg):
        split = cfg.split_forward_backward if s.split_forward_backward is None else s.split_forward_backward
        base = dict(
            tokens=s.tokens, hidden=s.hidden, mlp_dim=s.mlp_dim, experts=s.experts, routing=cfg.routing,
            bench_pass=cfg.bench_pass, renormalize=cfg.renormalize_real_after_null, backend=cfg.backend,
            tile_rows=cfg.tile_rows, fused=cfg.fused_experts, dtype=cfg.dtype,
            warmup=s.warmup if s.warmup is not None else cfg.warmup,
            iters=s.iters if s.iters is not None else cfg.iters, seed=cfg.seed,
            split=bool(split and cfg.bench_pass == "forward_backward"),
        )
        where = {f: pre + f for f in ("tokens", "hidden", "mlp_dim", "experts")}
        where |= {f: (pre + f if getattr(s, f) is not None else f) for f in ("warmup", "iters")}
        for k, k_where in ks:
            for impl in impls:
                for p, p_where in ps:
                    if impl == "stock_levanter" and p != 0.0:
                        continue
                    w = where | {"topk": k_where, "null_route_frac": p_where}
                    # compact_psum has no send buffers: only the device count applies to it
                    ep = ({f: getattr(cfg, f) for f in EP_FIELDS} if impl == "null_moe_ep"
                          else {"ep_size": cfg.ep_size} if impl in EP_IMPLS else {})
                    probe = Point(topk=k, impl=impl, null_target=p, null_mode="independent", where=w, **base, **ep)
                    _check_counts(probe)
                    layer_config(probe)  # the values, checked by the layer itself
                    for mode in _modes(cfg, cfg.routing, float(p), s.experts, k):
                        pt = dataclasses.replace(probe, null_target=float(p), null_mode=mode)
                        if pt.key not in seen:
                            seen.add(pt.key)
                            points.append(pt)
    if not points:
        raise BenchConfigError("impl: the sweep is empty (stock_levanter runs at null_route_frac 0.0 only)")
    return _run_order(points)


def _run_order(points: list[Point]) -> list[Point]:
    """Shape, topk, impl, then mode and fraction as expanded (the mode loop sits outside the fraction loop)."""
    group = {}
    for pt in points:
        group.setdefault((pt.shape, pt.topk, pt.impl), []).append(pt)
    out = []
    for pts in group.values():
        modes = list(dict.fromkeys(p.null_mode for p in pts if p.null_target > 0.0))
        out += [p for p in pts if p.null_target == 0.0] + [p for m in modes for p in pts
                                                              if p.null_target > 0.0 and p.null_mode == m]
    return out


def devices_needed(points: list[Point]) -> int:
    """The most devices one point runs on (1 without expert-parallel points)."""
    return max([p.ep_size for p in points if p.ep] + [1])


def check_devices(points: list[Point]) -> None:
    """Expert-parallel points need ep_size devices in this process (JAX initialised here)."""
    import jax

    need, have = devices_needed(points), jax.device_count()
    if need > have:
        raise BenchConfigError(
            f"ep_size: {need} devices needed, this process has {have}; on a CPU-only JAX the CLI simulates them, "
            f"from Python set XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts"
        )


def sweep_hash(points: list[Point]) -> str:
    return hashlib.sha1(",".join(sorted(p.key for p in points)).encode()).hexdigest()[:8]


# --- memory check --------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def estimate_bytes(pt: Point) -> int:
    """Rough peak bytes of one point: params (x3 with gradients), and T k dispatched rows x max(D, F) x a few.

    Forward keeps about 4 row-sized buffers live (sorted x, h1, h3, out); forward+backward about 10 (saved
    activations plus their cotangents). Token-sized buffers (x, y, dx) and the router are small next to it.
    """
    b = _DTYPE_BYTES[pt.dtype]
    d, f, n, t, k = pt.hidden, pt.mlp_dim, pt.experts, pt.tokens, pt.topk
    params = (3 * n * d * f + 2 * d * n) * b
    fb = pt.bench_pass == "forward_backward"
    rows = t * k * max(d, f) * b * (10 if fb else 4)
    tokens = t * d * b * (6 if fb else 3)
    return int(params * (3 if fb else 1) + rows + tokens)


def available_memory_bytes() -> tuple[int, str]:
    """(bytes, where): the accelerator's memory limit when JAX runs on one, else the host's MemAvailable."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{dev.platform} memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host RAM"


def check_memory(cfg: BenchConfig, points: list[Point]) -> None:
    """Refuse a point whose estimated footprint exceeds the limit, naming the field of its token count."""
    if cfg.max_memory_gb is not None:
        limit, src = int(cfg.max_memory_gb * 2**30), "max_memory_gb"
    else:
        avail, where = available_memory_bytes()
        limit, src = int(0.8 * avail), f"80% of {where}"
    for pt in points:
        need = estimate_bytes(pt)
        if need > limit:
            raise BenchConfigError(
                f"{pt.where.get('tokens', 'tokens')}: shape {pt.shape} with topk={pt.topk} ({pt.bench_pass}, "
                f"{pt.dtype}) needs about {need / 2**30:.1f} GiB, over the limit of {limit / 2**30:.1f} GiB ({src}); "
                f"use smaller shapes or raise max_memory_gb"
            )
