"""The one definition of a result row: its columns drive the RESULT line, the CSV (header and types), the W&B
config / summary split and the column table in docs/BENCH.md (``python -m scripts.bench.docs`` rewrites it).

A row is a dict of Python values (int, float, bool, str, None for a figure that was not measured, lists of
floats); ``make_row`` builds it from a measured point, ``read_csv_value`` from the CSV, so a row read back is the
row that was written.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Literal, Optional, get_args

import numpy as np

Kind = Literal["str", "int", "float", "float?", "bool", "floats"]
# where a column goes in W&B: run config, run summary, a histogram (bin i = entry i), or a histogram and a table
Role = Literal["config", "summary", "histogram", "histogram+table"]
WandbRole = Optional[Role]


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    wandb: WandbRole  # where it goes in W&B
    wandb_key: Optional[str]  # the W&B key when it differs from the column name
    in_result: bool  # on the RESULT line (lists and run records are CSV only)
    source: str  # how make_row gets it: an attribute path of the result, ctx.<key>, or =<computed figure>
    doc: str


def _loads(r) -> np.ndarray:
    return np.asarray(r.counts.per_expert, np.float64) / max(r.counts.real, 1)


def _load_max(r) -> float:
    """Largest expert load relative to the mean (1.0 = perfectly balanced)."""
    loads = _loads(r)
    return float(loads.max() * len(loads)) if loads.sum() > 0 else 0.0


def _load_cv(r) -> float:
    loads = _loads(r)
    return float(loads.std() / loads.mean()) if loads.mean() > 0 else 0.0


def _flops(r) -> float:
    """Useful FLOPs: 6 D F per real assignment forward (three matmuls), x3 with the backward pass."""
    pt = r.point
    return 6.0 * pt.hidden * pt.mlp_dim * (3.0 if pt.bench_pass == "forward_backward" else 1.0) * r.counts.real


#: The figures computed from a result (scripts/bench/runner.PointResult), by name.
COMPUTED: dict[str, Callable[[Any], Any]] = {
    "null_realized": lambda r: r.counts.null / (r.point.tokens * r.point.topk),
    "experts_per_token": lambda r: r.counts.real / r.point.tokens,
    "all_null_frac": lambda r: r.counts.per_token[0] / r.point.tokens if r.counts.per_token else 0.0,
    "tokens_per_s": lambda r: r.point.tokens / r.main.median,
    "tflops": lambda r: _flops(r) / r.main.median / 1e12,
    "load_cv": _load_cv,
    "load_max": _load_max,
    "load_violation": lambda r: _load_max(r) - 1.0,
    "dropped_frac": lambda r: r.counts.dropped / max(r.counts.real, 1),
    "comm_bytes": lambda r: float(r.comm.get("total", 0.0)),
    "a2a_bytes": lambda r: float(r.comm.get("all-to-all", 0.0) + r.comm.get("ragged-all-to-all", 0.0)),
    "time_fwd_s": lambda r: r.forward.median if r.forward else None,
    "time_bwd_s": lambda r: r.main.median - r.forward.median if r.forward else None,
    "tile_rows": lambda r: "default" if r.point.tile_rows is None else str(r.point.tile_rows),
    "times": lambda r: list(r.main.times),
    "expert_loads": lambda r: list(_loads(r)),
    "real_per_token_hist": lambda r: [c / r.point.tokens for c in r.counts.per_token] if r.counts.per_token else None,
}

# One line per column, in RESULT / CSV order: name, kind, W&B role[:key], RESULT line (yes / csv: CSV only),
# source, meaning. float? is a float that may be absent (- on the RESULT line, empty in the CSV).
_TABLE = """
shape               str     config         yes  point.shape        TxDxFxN
tokens              int     config         yes  point.tokens       T, tokens per step
hidden              int     config         yes  point.hidden       D, embed size
mlp_dim             int     config         yes  point.mlp_dim      F, each expert's hidden size
experts             int     config         yes  point.experts      N, real experts
topk                int     config         yes  point.topk         k, slots per token
impl                str     config         yes  point.impl         null_moe, masked_null or stock_levanter
backend             str     config         yes  backend            the grouped-matmul backend that ran
pass                str     config         yes  point.bench_pass   forward or forward_backward
routing             str     config         yes  point.routing      forced or learned
null_mode           str     config         yes  point.null_mode    independent, take_until_null or learned
null_target         float   config         yes  point.null_target  target null fraction p
null_realized       float   summary        yes  =null_realized     fraction of the T k slots that were null
real_assignments    int     summary        yes  counts.real        slots that reached an expert
null_assignments    int     summary        yes  counts.null        null slots
experts_per_token   float   summary        yes  =experts_per_token real experts per token
all_null_frac       float   summary        yes  =all_null_frac     fraction of tokens with no real slot
time_s              float   summary        yes  main.median        median seconds per step
tokens_per_s        float   summary        yes  =tokens_per_s      tokens / time_s
tflops              float   summary        yes  =tflops            useful FLOPs / time_s / 1e12
load_cv             float   summary        yes  =load_cv           std / mean of the per-expert loads
load_max            float   summary        yes  =load_max          largest load / mean load (1.0 = balanced)
load_violation      float   summary        yes  =load_violation    load_max - 1
time_min_s          float   summary        yes  main.min           fastest timed step
time_max_s          float   summary        yes  main.max           slowest timed step
compile_s           float   summary        yes  main.compile_s     compile time of the step (one per batch)
time_fwd_s          float?  summary        yes  =time_fwd_s        median forward alone (split), else -
time_bwd_s          float?  summary        yes  =time_bwd_s        time_s - time_fwd_s, else -
ep_size             int     config         yes  point.ep_size      devices on the expert axis (1: one device)
capacity_factor     float?  config         yes  point.capacity_factor  null_moe_ep capacity factor, - = dropless
ep_dedup            bool    config         yes  point.ep_dedup     null_moe_ep: a row per (token, device), not per slot
transport           str     config         yes  transport          EP exchange that ran: all_to_all, ragged_all_to_all, psum or none
dropped_frac        float   summary        yes  =dropped_frac      fraction of real slots dropped by the capacity
comm_bytes          float   summary        yes  =comm_bytes        bytes one device sends per step (compiled HLO collectives)
a2a_bytes           float   summary        yes  =a2a_bytes         the all-to-all part of comm_bytes
dtype               str     config         yes  point.dtype        float32 or bfloat16
renormalize         bool    config         yes  point.renormalize  real gate weights renormalized after nulling
warmup              int     config         yes  point.warmup       untimed calls before timing
iters               int     config         yes  point.iters        timed calls
seed                int     config         yes  point.seed         seed of weights, input and mask
requested_backend   str     config         yes  point.backend      the backend asked for
tile_rows           str     config         yes  =tile_rows         row tile of the tiled backend, or default
fused_experts       bool    config         yes  expert_path_fused  the backend's fused expert kernels ran (tiled on CPU, triton on GPU)
host_malloc         str     config         yes  ctx.host_malloc    host allocator mode the process ran under
timing              str     config         yes  timing             interleaved (in rounds with its batch), sequential
point_key           str     config         yes  point.key          hash of the point's settings (resume)
sweep               str     config         csv  ctx.sweep          hash of the sweep's points
times               floats  -              csv  =times             every timed step, seconds
expert_loads        floats  histogram+table:expert_load  csv  =expert_loads  each expert's share of real assignments
real_per_token_hist floats  histogram:real_experts_per_token_hist  csv  =real_per_token_hist  tokens with 0..k real slots
timestamp           str     -              csv  ctx.timestamp      UTC time the row was written
"""


def _parse_table(table: str) -> tuple[Column, ...]:
    out = []
    for line in table.strip().splitlines():
        name, kind, wandb, line_flag, source, doc = line.split(None, 5)
        role, _, key = wandb.partition(":")
        col = Column(name, kind, None if role == "-" else role, key or None, line_flag == "yes", source, doc)
        if (kind not in get_args(Kind) or col.wandb not in get_args(Role) + (None,)
                or line_flag not in ("yes", "csv") or (source.startswith("=") and source[1:] not in COMPUTED)):
            raise ValueError(f"scripts/bench/schema.py: bad column line {line!r}")
        out.append(col)
    return tuple(out)


COLUMNS: tuple[Column, ...] = _parse_table(_TABLE)
#: Columns added since the first layout, with the CSV value every row of an older file has (one device, no
#: exchange, nothing dropped, nothing sent): scripts/bench/store.py upgrades such a file in place.
ADDED_COLUMNS: dict[str, str] = {
    "ep_size": "1", "capacity_factor": "", "ep_dedup": "true", "transport": "none", "dropped_frac": "0.0",
    "comm_bytes": "0.0", "a2a_bytes": "0.0",
}
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_BY_NAME = {c.name: c for c in COLUMNS}


def _value(c: Column, result, ctx: dict) -> Any:
    if c.source.startswith("="):
        return COMPUTED[c.source[1:]](result)
    if c.source.startswith("ctx."):
        return ctx[c.source[4:]]
    return operator.attrgetter(c.source)(result)


#: W&B config keys in the config file's own words, next to the row's.
WANDB_CONFIG_ALIASES: dict[str, Callable[[dict], Any]] = {
    "renormalize_real_after_null": lambda row: row["renormalize"],
    "bench_pass": lambda row: row["pass"],
    "null_routing_mode": lambda row: row["null_mode"],
    "null_route_frac": lambda row: row["null_target"],
    "split_forward_backward": lambda row: row["time_fwd_s"] is not None,
}


def make_row(result, *, sweep: str, timestamp: str, host_malloc: str) -> dict[str, Any]:
    """The full record of one measured point (scripts/bench/runner.PointResult)."""
    ctx = {"sweep": sweep, "timestamp": timestamp, "host_malloc": host_malloc}
    return {c.name: _value(c, result, ctx) for c in COLUMNS}


# --- RESULT line ------------------------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    """Compact, parseable value: 6 significant digits for floats, no spaces anywhere, - for nothing."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(v) if math.isnan(v) or math.isinf(v) else repr(float(f"{v:.6g}"))
    if v is None:
        return "-"
    s = str(v)
    return s.replace(" ", "_") if s else "-"


def result_line(row: dict[str, Any]) -> str:
    return "RESULT " + " ".join(f"{c.name}={fmt(row[c.name])}" for c in COLUMNS if c.in_result)


def parse_result_line(line: str) -> dict[str, str]:
    """Inverse of result_line (values stay strings)."""
    if not line.startswith("RESULT "):
        raise ValueError(f"not a RESULT line: {line[:40]!r}")
    return dict(tok.partition("=")[::2] for tok in line[len("RESULT "):].split())


# --- CSV values -------------------------------------------------------------------------------------------------


def csv_value(name: str, v: Any) -> str:
    if v is None:
        return ""
    kind = _BY_NAME[name].kind
    if kind == "bool":
        return "true" if v else "false"
    if kind == "floats":
        return ";".join(f"{x:.6g}" for x in v)
    if kind in ("float", "float?"):
        return repr(float(v))
    return str(v)


def read_csv_value(name: str, s: str) -> Any:
    kind = _BY_NAME[name].kind if name in _BY_NAME else "str"
    if s in ("", "-") and kind != "str":
        return None
    if kind == "int":
        return int(float(s))
    if kind in ("float", "float?"):
        return float(s)
    if kind == "bool":
        return s == "true"
    if kind == "floats":
        return [float(x) for x in s.split(";")]
    return s


def typed(raw: dict[str, str]) -> dict[str, Any]:
    """A CSV row (strings) -> the row make_row built."""
    return {k: read_csv_value(k, v or "") for k, v in raw.items()}


# --- W&B and docs -----------------------------------------------------------------------------------------------


def wandb_split(row: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(config, summary, vectors) of a row: vectors maps a W&B key to (values, role)."""
    config = {c.name: row[c.name] for c in COLUMNS if c.wandb == "config"}
    config.update({k: f(row) for k, f in WANDB_CONFIG_ALIASES.items()})
    summary = {c.name: row[c.name] for c in COLUMNS if c.wandb == "summary" and row[c.name] is not None}
    vectors = {c.wandb_key or c.name: (row[c.name], c.wandb) for c in COLUMNS
               if c.wandb in ("histogram", "histogram+table") and row[c.name] is not None}
    return config, summary, vectors


def markdown_table() -> str:
    """The column table of docs/BENCH.md."""
    def where(c: Column) -> str:
        key = c.wandb_key or c.name
        return {"histogram": f"histogram `{key}`", "histogram+table": f"histogram `{key}`, table `{key}_table`",
                None: "-"}.get(c.wandb, c.wandb)

    lines = ["| column | RESULT | W&B | meaning |", "| --- | --- | --- | --- |"]
    for c in COLUMNS:
        lines.append(f"| `{c.name}` | {'yes' if c.in_result else 'CSV only'} | {where(c)} | {c.doc} |")
    aliases = ", ".join(f"`{k}`" for k in WANDB_CONFIG_ALIASES)
    lines.append(f"\nW&B config also holds {aliases} (the config file's names for `renormalize`, `pass`, "
                 "`null_mode`, `null_target`, and whether the split was measured).")
    return "\n".join(lines)
