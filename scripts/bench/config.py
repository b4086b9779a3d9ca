"""Bench config (a draccus dataclass), its validation, and its expansion into sweep points.

Every field is settable from YAML (``--config_path``) and from flags (``--tokens 4096``,
``--topk_list '[2,4,8]'``, ``--wandb.mode online``, ``--shapes '[{tokens: 512, hidden: 64, mlp_dim: 128,
experts: 8}]'``). ``validate`` raises ``BenchConfigError`` (a ValueError) naming the offending field before any
compute; the memory check (``check_memory``) runs on the expanded points, also before any compute.
"""


import dataclasses
import hashlib
import json
import math
import os
from typing import Optional

from scripts.bench.host_malloc import HOST_MALLOC_MODES

IMPLS = ("null_moe", "stock_levanter", "masked_null")
MODES = ("independent", "take_until_null")
NULL_MODES = MODES + ("both",)
ROUTINGS = ("forced", "learned")
PASSES = ("forward", "forward_backward")
DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "tiled", "megablox", "tokamax", "ragged_dot")
WANDB_MODES = ("offline", "online", "disabled")
NULL_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class BenchConfigError(ValueError):
    """Bad bench input; the message names the field."""


@dataclasses.dataclass
class ShapeConfig:
    """One matrix entry: a layer shape, optionally with its own sweep axes and timing settings (None: inherit
    the top level)."""

    tokens: int = 4096
    hidden: int = 512
    mlp_dim: int = 1024
    experts: int = 16
    topk_list: Optional[list[int]] = None
    null_route_frac_list: Optional[list[float]] = None
    impl: Optional[list[str]] = None
    warmup: Optional[int] = None
    iters: Optional[int] = None
    split_forward_backward: Optional[bool] = None

    @property
    def name(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.mlp_dim}x{self.experts}"


@dataclasses.dataclass
class WandbConfig:
    """W&B logging: one run per sweep point, all points of a sweep in one ``group``."""

    enabled: bool = True
    project: str = "null-moe-bench"
    entity: Optional[str] = None
    mode: Optional[str] = None  # offline | online | disabled; None: $WANDB_MODE, else offline
    group: Optional[str] = None  # None: "bench-<sweep hash>"
    tags: list[str] = dataclasses.field(default_factory=list)

    def resolved_mode(self) -> str:
        return self.mode or os.environ.get("WANDB_MODE") or "offline"


@dataclasses.dataclass
class BenchConfig:
    """Null-routing sweep of one NullRoutedMoE layer in isolation (see docs/BENCH.md)."""

    # single shape (used when `shapes` is empty)
    tokens: int = 4096
    hidden: int = 512
    mlp_dim: int = 1024
    experts: int = 16
    topk: int = 4
    topk_list: list[int] = dataclasses.field(default_factory=list)  # non-empty: overrides topk
    # null fraction: null_route_sweep > null_route_frac_list > null_route_frac
    null_route_frac: float = 0.0
    null_route_frac_list: list[float] = dataclasses.field(default_factory=list)
    null_route_sweep: bool = False  # 0.0 baseline + 0.1 .. 0.9
    null_routing_mode: str = "independent"  # independent | take_until_null | both
    routing: str = "forced"  # forced (mask at the target fraction) | learned (the layer's router)
    renormalize_real_after_null: bool = True
    bench_pass: str = "forward_backward"  # forward | forward_backward
    split_forward_backward: bool = False  # forward_backward: also time forward alone (fwd / bwd split)
    impl: list[str] = dataclasses.field(default_factory=lambda: ["null_moe"])
    backend: str = "auto"  # NullMoEConfig.gmm_backend
    fused_experts: bool = True  # NullMoEConfig.fused_experts (tiled backend: one fused loop vs gmm x3)
    tile_rows: Optional[int] = None  # NullMoEConfig.tile_rows (row tile of the CPU "tiled" backend); None: default
    dtype: str = "float32"
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    shapes: list[ShapeConfig] = dataclasses.field(default_factory=list)
    out_dir: str = "out/bench"
    csv_name: str = "results.csv"
    plots: bool = True
    max_memory_gb: Optional[float] = None  # None: 80 percent of available memory (device memory on GPU/TPU)
    dry_run: bool = False  # validate and list the points, run nothing
    # host allocator (scripts/bench/host_malloc.py): resident keeps freed buffers mapped (no per-call page
    # faults); auto = resident when JAX runs on the CPU only, default when an accelerator may be used
    host_malloc: str = "auto"
    # time the points that share one compiled step (forced routing: every null fraction and mode of a shape,
    # topk and impl) in interleaved rounds, so their ratios survive drift in the machine's speed
    interleave: bool = True
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: everything that determines a measurement."""

    tokens: int
    hidden: int
    mlp_dim: int
    experts: int
    topk: int
    impl: str
    null_target: float
    null_mode: str
    routing: str
    bench_pass: str
    renormalize: bool
    backend: str
    tile_rows: Optional[int]
    fused: bool
    dtype: str
    warmup: int
    iters: int
    seed: int
    split: bool

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.mlp_dim}x{self.experts}"

    @property
    def key(self) -> str:
        """Stable id of the measurement: same config, same key (used to resume from the CSV)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"{self.shape}_k{self.topk}_{self.impl}_{self.null_mode}_p{self.null_target:.2f}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_positive_int(field: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise BenchConfigError(f"{field} must be a positive integer, got {value!r}")


def _check_null(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise BenchConfigError(f"{field} must be in [0, 1), got {value!r}")


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise BenchConfigError(f"{field} must be one of {list(choices)}, got {value!r}")


def shape_entries(cfg: BenchConfig) -> list[tuple[str, ShapeConfig]]:
    """(field name for errors, shape) pairs: the `shapes` list, or the top-level single shape."""
    if cfg.shapes:
        return [(f"shapes[{i}]", s) for i, s in enumerate(cfg.shapes)]
    single = ShapeConfig(tokens=cfg.tokens, hidden=cfg.hidden, mlp_dim=cfg.mlp_dim, experts=cfg.experts)
    return [("", single)]


def null_fracs(cfg: BenchConfig, shape: ShapeConfig) -> list[float]:
    if shape.null_route_frac_list is not None:
        return list(shape.null_route_frac_list)
    if cfg.null_route_sweep:
        return list(NULL_SWEEP)
    if cfg.null_route_frac_list:
        return list(cfg.null_route_frac_list)
    return [cfg.null_route_frac]


def topks(cfg: BenchConfig, shape: ShapeConfig) -> list[int]:
    if shape.topk_list is not None:
        return list(shape.topk_list)
    return list(cfg.topk_list) if cfg.topk_list else [cfg.topk]


def validate(cfg: BenchConfig) -> None:
    """Raise BenchConfigError naming the field for any bad input. Runs before any compute."""
    _check_choice("null_routing_mode", cfg.null_routing_mode, NULL_MODES)
    _check_choice("routing", cfg.routing, ROUTINGS)
    _check_choice("bench_pass", cfg.bench_pass, PASSES)
    _check_choice("backend", cfg.backend, BACKENDS)
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("host_malloc", cfg.host_malloc, HOST_MALLOC_MODES)
    _check_choice("wandb.mode", cfg.wandb.resolved_mode(), WANDB_MODES)
    if not isinstance(cfg.impl, list) or not cfg.impl:
        raise BenchConfigError(f"impl must be a non-empty list of {list(IMPLS)}, got {cfg.impl!r}")
    for i, name in enumerate(cfg.impl):
        _check_choice(f"impl[{i}]", name, IMPLS)
    if not _is_int(cfg.warmup) or cfg.warmup < 0:
        raise BenchConfigError(f"warmup must be a non-negative integer, got {cfg.warmup!r}")
    _check_positive_int("iters", cfg.iters)
    if not _is_int(cfg.seed):
        raise BenchConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.max_memory_gb is not None and not cfg.max_memory_gb > 0:
        raise BenchConfigError(f"max_memory_gb must be > 0 or null, got {cfg.max_memory_gb!r}")
    if cfg.tile_rows is not None and (not _is_int(cfg.tile_rows) or cfg.tile_rows < 8 or cfg.tile_rows % 8):
        raise BenchConfigError(f"tile_rows must be a positive multiple of 8 or null, got {cfg.tile_rows!r}")
    if not isinstance(cfg.fused_experts, bool):
        raise BenchConfigError(f"fused_experts must be true or false, got {cfg.fused_experts!r}")
    if not cfg.out_dir:
        raise BenchConfigError("out_dir must be a non-empty path")
    # top-level lists (checked even when every shape overrides them: a typo should not pass silently)
    _check_positive_int("topk", cfg.topk)
    for i, k in enumerate(cfg.topk_list):
        _check_positive_int(f"topk_list[{i}]", k)
    _check_null("null_route_frac", cfg.null_route_frac)
    for i, p in enumerate(cfg.null_route_frac_list):
        _check_null(f"null_route_frac_list[{i}]", p)
    for prefix, shape in shape_entries(cfg):
        pre = f"{prefix}." if prefix else ""
        for name in ("tokens", "hidden", "mlp_dim", "experts"):
            _check_positive_int(pre + name, getattr(shape, name))
        if shape.impl is not None:
            if not shape.impl:
                raise BenchConfigError(f"{pre}impl must be a non-empty list or null")
            for i, name in enumerate(shape.impl):
                _check_choice(f"{pre}impl[{i}]", name, IMPLS)
        if shape.warmup is not None and (not _is_int(shape.warmup) or shape.warmup < 0):
            raise BenchConfigError(f"{pre}warmup must be a non-negative integer, got {shape.warmup!r}")
        if shape.iters is not None:
            _check_positive_int(pre + "iters", shape.iters)
        if shape.null_route_frac_list is not None:
            if not shape.null_route_frac_list:
                raise BenchConfigError(f"{pre}null_route_frac_list must be non-empty or null")
            for i, p in enumerate(shape.null_route_frac_list):
                _check_null(f"{pre}null_route_frac_list[{i}]", p)
        if shape.topk_list is not None:
            ks, kfield = shape.topk_list, pre + "topk_list"
            if not ks:
                raise BenchConfigError(f"{kfield} must be non-empty or null")
        elif cfg.topk_list:
            ks, kfield = cfg.topk_list, "topk_list"
        else:
            ks, kfield = [cfg.topk], "topk"
        for i, k in enumerate(ks):
            name = kfield if kfield == "topk" else f"{kfield}[{i}]"
            _check_positive_int(name, k)
            if k > shape.experts:
                where = f"{pre}experts" if pre else "experts"
                raise BenchConfigError(f"{name}={k} is greater than {where}={shape.experts} (top-k must be <= experts)")


def expand(cfg: BenchConfig) -> list[Point]:
    """All sweep points in run order: shape, topk, impl, mode, null fraction.

    The null 0.0 baseline is the same computation in both modes, so with ``null_routing_mode: both`` it is
    measured once (labelled ``independent``) and serves as the baseline of both modes. ``stock_levanter``
    has no null routing: it runs at null 0.0 only (other fractions are skipped, not errors).
    """
    modes = list(MODES) if cfg.null_routing_mode == "both" else [cfg.null_routing_mode]
    points: list[Point] = []
    seen: set[str] = set()
    for _, shape in shape_entries(cfg):
        impls = shape.impl if shape.impl is not None else cfg.impl
        for k in topks(cfg, shape):
            for impl in impls:
                for mode in modes:
                    for p in null_fracs(cfg, shape):
                        p = float(p)
                        if impl == "stock_levanter" and p != 0.0:
                            continue
                        m = modes[0] if p == 0.0 else mode
                        pt = Point(
                            tokens=shape.tokens, hidden=shape.hidden, mlp_dim=shape.mlp_dim,
                            experts=shape.experts, topk=int(k), impl=impl, null_target=p, null_mode=m,
                            routing=cfg.routing, bench_pass=cfg.bench_pass,
                            renormalize=cfg.renormalize_real_after_null, backend=cfg.backend,
                            tile_rows=cfg.tile_rows, fused=bool(cfg.fused_experts), dtype=cfg.dtype,
                            warmup=shape.warmup if shape.warmup is not None else cfg.warmup,
                            iters=shape.iters if shape.iters is not None else cfg.iters,
                            seed=cfg.seed,
                            split=bool(
                                (cfg.split_forward_backward if shape.split_forward_backward is None
                                 else shape.split_forward_backward) and cfg.bench_pass == "forward_backward"
                            ),
                        )
                        if pt.key not in seen:
                            seen.add(pt.key)
                            points.append(pt)
    if not points:
        raise BenchConfigError("the sweep is empty (impl: stock_levanter runs at null_route_frac 0.0 only)")
    return points


def sweep_hash(points: list[Point]) -> str:
    return hashlib.sha1(",".join(sorted(p.key for p in points)).encode()).hexdigest()[:8]


# --- memory check --------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def estimate_bytes(pt: Point) -> int:
    """Rough peak bytes of one point: params (+ grads), and T k dispatched rows x max(D, F) x a few.

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
    try:
        import jax

        dev = jax.devices()[0]
        if dev.platform != "cpu":
            stats = dev.memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]), f"{dev.platform} memory"
    except Exception:  # pragma: no cover - no usable backend
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:  # pragma: no cover
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host RAM"


def check_memory(cfg: BenchConfig, points: list[Point]) -> None:
    """Refuse points whose estimated footprint exceeds the limit, naming the shape entry and its tokens."""
    if cfg.max_memory_gb is not None:
        limit, where = int(cfg.max_memory_gb * 2**30), "max_memory_gb"
    else:
        avail, src = available_memory_bytes()
        limit, where = int(0.8 * avail), f"80% of {src}"
    entries = shape_entries(cfg)
    for pt in points:
        need = estimate_bytes(pt)
        if need > limit:
            field = "tokens"
            for prefix, s in entries:
                if (s.tokens, s.hidden, s.mlp_dim, s.experts) == (pt.tokens, pt.hidden, pt.mlp_dim, pt.experts):
                    field = f"{prefix}.tokens" if prefix else "tokens"
                    break
            which = "shapes" if cfg.shapes else "tokens/hidden/mlp_dim/experts"
            raise BenchConfigError(
                f"{field}: shape {pt.shape} with topk={pt.topk} ({pt.bench_pass}, {pt.dtype}) needs about "
                f"{need / 2**30:.1f} GiB, over the limit of {limit / 2**30:.1f} GiB ({where}); reduce "
                f"{which} (e.g. tokens) or raise max_memory_gb"
            )
