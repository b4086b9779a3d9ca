"""The bench's command line: ``BenchConfig`` (a draccus dataclass) and ``parse``, which turns every mistake into a
one-line ``BenchConfigError``.

The fields speak the vocabulary of the seed harness (``tokens``, ``hidden``, ``mlp_dim``, ``experts``, ``topk``,
``null_route_frac_list``, ...); scripts/bench/points.py is the one place that translates them to the layer's
``NullMoEConfig``. Every field is settable from YAML (``--config_path``) and from flags (``--tokens 4096``,
``--topk_list '[2,4,8]'``, ``--wandb.mode online``). Choices are ``Literal`` types, so draccus itself rejects a
bad one; each field's help text (``--help``, and the table in docs/BENCH.md) is the ``help`` given here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import io
import re
from typing import Any, Literal, Optional

from null_moe.config import EpTransport, GmmBackend
from null_moe.host_malloc import HostMalloc
from null_moe.routing import NullMode

Impl = Literal["null_moe", "masked_null", "stock_levanter", "null_moe_ep", "compact_psum"]
#: The impls that run over ep_size devices (scripts/bench/ep.py): this project's EP and the published baseline.
EP_IMPLS = ("null_moe_ep", "compact_psum")
NullRoutingMode = Literal[NullMode, "both"]
RoutingKind = Literal["forced", "learned"]
BenchPass = Literal["forward", "forward_backward"]
DType = Literal["float32", "bfloat16"]
HostMallocMode = Literal["auto", HostMalloc]
WandbMode = Literal["offline", "online", "disabled"]


class BenchConfigError(ValueError):
    """Bad bench input, found before any compute; the message starts with the field it is about."""


def _opt(default: Any, help: str):
    """A dataclass field with its help text (shown by --help, with the default)."""
    meta = {"help": help, "custom_args": {"help": help.replace("%", "%%")}}  # argparse formats help with %
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class LayerShape:
    """T, D, F, N of one layer shape."""

    tokens: int = _opt(4096, "T, tokens per step")
    hidden: int = _opt(512, "D, the embed size")
    mlp_dim: int = _opt(1024, "F, each expert's hidden size")
    experts: int = _opt(16, "N, real experts")

    @property
    def name(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.mlp_dim}x{self.experts}"


@dataclasses.dataclass
class ShapeConfig(LayerShape):
    """One matrix entry: a layer shape, optionally with its own sweep axes and timing (null: inherit the top level)."""

    topk_list: Optional[list[int]] = _opt(None, "k values for this shape")
    null_route_frac_list: Optional[list[float]] = _opt(None, "null fractions for this shape")
    impl: Optional[list[Impl]] = _opt(None, "implementations for this shape")
    warmup: Optional[int] = _opt(None, "warmup calls for this shape")
    iters: Optional[int] = _opt(None, "timed calls for this shape")
    split_forward_backward: Optional[bool] = _opt(None, "forward / backward split for this shape")


@dataclasses.dataclass
class WandbConfig:
    """W&B: one run per sweep point, all points of a sweep in one group."""

    enabled: bool = _opt(True, "log each point to W&B")
    project: str = _opt("null-moe-bench", "W&B project")
    entity: Optional[str] = _opt(None, "W&B entity (null: your default)")
    mode: Optional[WandbMode] = _opt(None, "offline, online or disabled; null: $WANDB_MODE, else offline. online needs "
                                           "credentials (`wandb login`), checked before any compute")
    group: Optional[str] = _opt(None, "run group; null: bench-<hash of the sweep's points>")
    tags: list[str] = _opt([], "run tags")

    def resolved_mode(self) -> str:
        """The mode that runs: ``disabled`` when not enabled, else the field, $WANDB_MODE or offline."""
        import os

        if not self.enabled:
            return "disabled"
        return self.mode or os.environ.get("WANDB_MODE") or "offline"


@dataclasses.dataclass
class BenchConfig(LayerShape):
    """A null-routing sweep of one NullRoutedMoE layer (docs/BENCH.md); tokens..experts: the shape if no `shapes`."""

    topk: int = _opt(4, "k, slots per token (1 <= k <= experts)")
    topk_list: list[int] = _opt([], "k values to sweep; non-empty overrides topk")
    null_route_frac: float = _opt(0.0, "target null fraction p in [0, 1)")
    null_route_frac_list: list[float] = _opt([], "null fractions to sweep; non-empty overrides null_route_frac")
    null_route_sweep: bool = _opt(False, "sweep 0.0 (the baseline), 0.1 .. 0.9; overrides both of the above")
    null_routing_mode: NullRoutingMode = _opt("independent", "which slots go null: independent, take_until_null "
                                                            "(every slot after a token's first null one), or both")
    routing: RoutingKind = _opt("forced", "forced: stock top-k, then a random null mask at the target fraction; "
                                          "learned: the layer's own router with null_route_frac = p")
    renormalize_real_after_null: bool = _opt(True, "real gate weights renormalized over the real slots")
    bench_pass: BenchPass = _opt("forward_backward", "what one timed step runs; forward_backward takes "
                                                     "gradients for every weight and the input")
    split_forward_backward: bool = _opt(False, "with forward_backward, also time the forward alone "
                                               "(time_fwd_s, time_bwd_s, a split plot)")
    impl: list[Impl] = _opt(["null_moe"], "null_moe: this layer; masked_null: null slots computed by a real expert "
                                         "with weight 0; stock_levanter: Levanter's MixtralSparseMoeBlock, null 0 "
                                         "only; null_moe_ep: this layer expert-parallel over ep_size devices (only "
                                         "real rows travel); compact_psum: the published EP path (tokens replicated "
                                         "over the expert axis, psum of the output)")
    ep_size: int = _opt(8, "devices on the expert axis of null_moe_ep and compact_psum (experts and tokens must "
                           "divide by it); on a CPU-only JAX the CLI simulates them (XLA_FLAGS="
                           "--xla_force_host_platform_device_count), so their times mean little: compare bytes")
    capacity_factor: Optional[float] = _opt(None, "null_moe_ep: rows per (source, destination) block as a multiple "
                                                  "of the expected real rows; null: dropless")
    ep_transport: EpTransport = _opt("auto", "null_moe_ep: all_to_all (padded), ragged_all_to_all (TPU/GPU), or "
                                             "auto (per platform); the one that ran is reported as transport")
    ep_dedup: bool = _opt(True, "null_moe_ep: send a token once per destination device (true) or once per real "
                                "slot (false)")
    backend: GmmBackend = _opt("auto", "grouped-matmul backend (the layer's gmm_backend); the one that ran is "
                                       "reported as backend")
    fused_experts: bool = _opt(True, "tiled backend: one fused kernel per real tile, or dispatch -> gmm x3 -> "
                                     "combine")
    tile_rows: Optional[int] = _opt(None, "row tile of the tiled backend (a multiple of 8); null: its default")
    dtype: DType = _opt("float32", "weights and activations (routing decides in f32)")
    warmup: int = _opt(2, "untimed calls of each point before timing")
    iters: int = _opt(5, "timed calls of each point (the median is reported)")
    seed: int = _opt(0, "seed of the weights, the input and the null mask")
    shapes: list[ShapeConfig] = _opt([], "matrix entries {tokens, hidden, mlp_dim, experts}, each with optional "
                                         "topk_list, null_route_frac_list, impl, warmup, iters, "
                                         "split_forward_backward; empty: the single shape above")
    out_dir: str = _opt("out/bench", "where the CSV, the plots and the W&B runs go")
    csv_name: str = _opt("results.csv", "the CSV's file name in out_dir")
    plots: bool = _opt(True, "write the plots at the end")
    max_memory_gb: Optional[float] = _opt(None, "memory limit of the pre-flight check; null: 80% of available "
                                                "memory (accelerator memory on GPU/TPU)")
    dry_run: bool = _opt(False, "check and list the points, run nothing")
    host_malloc: HostMallocMode = _opt("auto", "resident: re-execute with glibc tunables so XLA:CPU's per-call "
                                               "buffers are not page-faulted in each call; default: leave malloc "
                                               "alone; auto: resident when JAX runs on the CPU only")
    interleave: bool = _opt(True, "time the points that share one compiled step (forced routing: every null "
                                  "fraction and mode of a shape, topk and impl) in interleaved rounds")
    wandb: WandbConfig = _opt(WandbConfig(), "W&B logging (fields below)")


# --- parsing: every mistake as one line ------------------------------------------------------------------------


def _dotted(path) -> str:
    """draccus's path ('shapes', '0', 'impl') -> 'shapes[0].impl'."""
    out = ""
    for part in path:
        out += f"[{part}]" if str(part).isdigit() else (f".{part}" if out else str(part))
    return out


def _decoding_message(path, message: str) -> str:
    """One line from a draccus DecodingError: the field path first, then what was wrong."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    where = _dotted(path)
    inner = re.match(r"^(?:[\w\[\]., ]+: )?`([^`]*)`: (.*)$", last)
    if inner:  # a union's member reports its own sub-path
        where += _dotted(inner.group(1).split("."))
        last = inner.group(2)
    last = re.sub(r" \(<class '[^']*'>\)", "", last)
    last = re.sub(r"^[\w\[\]., ]+?: (?=Cannot convert)", "", last)  # a union member's type name
    choice = re.match(r"Cannot convert (.*) into one of: (.*)$", last)
    if choice:
        last = f"must be one of [{choice.group(2)}], got {choice.group(1)}"
    unknown = re.match(r"The fields (.*) are not valid for (\w+)", last)
    if unknown:
        cls = {c.__name__: c for c in (BenchConfig, ShapeConfig, WandbConfig)}.get(unknown.group(2))
        names = [f.name for f in dataclasses.fields(cls)] if cls else []
        hints = []
        for bad in re.findall(r"`([^`]*)`", unknown.group(1)):
            close = difflib.get_close_matches(bad, names, n=1)
            hints.append(f"{bad} (did you mean {close[0]}?)" if close else bad)
        last = f"unknown field {', '.join(hints)}"
        where = where or "config_path"  # at the top level only a YAML file can name an unknown field
    return f"{where}: {last}" if where else last


def normalize(cfg: BenchConfig) -> BenchConfig:
    """The config as draccus would have parsed it: a config built in Python gets the same type and choice checks
    (and the same messages) as one from the command line. Raises BenchConfigError."""
    import draccus
    from draccus.utils import DecodingError

    try:
        return draccus.decode(BenchConfig, draccus.encode(cfg))
    except DecodingError as e:
        raise BenchConfigError(_decoding_message(e.key_path, e.message)) from None


def _flags() -> list[str]:
    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if f.name == "wandb":
                yield from walk(WandbConfig, "wandb.")

    return [f"--{name}" for name in walk(BenchConfig, "")]


def _argparse_message(stderr: str) -> str:
    """argparse's usage + 'prog: error: ...' -> the error alone, with a hint for a misspelled flag."""
    err = next((ln.split(": error: ", 1)[1] for ln in stderr.splitlines() if ": error: " in ln), stderr.strip())
    choice = re.match(r"argument --(\S+): invalid choice: (.*) \(choose from (.*)\)$", err)
    if choice:
        return f"{choice.group(1)}: must be one of [{choice.group(3).replace(chr(39), '')}], got {choice.group(2)}"
    unknown = re.match(r"unrecognized arguments: (.*)", err)
    if unknown:
        flags = [a.split("=")[0] for a in unknown.group(1).split() if a.startswith("--")]
        hints = [f"{f} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(f, _flags(), n=1)) else f
                 for f in flags]
        return f"unknown option {', '.join(hints) or unknown.group(1)}; see --help"
    return err


def parse(args: Optional[list[str]] = None) -> BenchConfig:
    """The command line (and ``--config_path`` YAML) -> BenchConfig. Raises BenchConfigError with one line for a
    missing or unparsable YAML, an unknown field, a wrong type or a bad choice; --help exits 0 as usual."""
    import draccus
    from draccus.utils import DecodingError, ParsingError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return draccus.parse(config_class=BenchConfig, args=args)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise BenchConfigError(_argparse_message(captured.getvalue())) from None
    except FileNotFoundError as e:
        raise BenchConfigError(f"config_path: no such file: {e.filename}") from None
    except DecodingError as e:
        raise BenchConfigError(_decoding_message(e.key_path, e.message)) from None
    except ParsingError as e:
        cause = e.__cause__ or e.__context__
        detail = " ".join(str(cause).split()) if cause is not None else str(e)
        raise BenchConfigError(f"config_path: not valid YAML: {detail}") from None
