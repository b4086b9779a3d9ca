"""RESULT lines, the resumable CSV, the end-of-sweep table and the plots."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Optional

from scripts.bench import host_malloc
from scripts.bench.config import Point

# RESULT / CSV column order: the point's axes, then the figures (scripts.bench.timing.PointResult.figures),
# then bookkeeping. Every RESULT line carries all of these keys.
AXIS_COLUMNS = [
    "shape", "tokens", "hidden", "mlp_dim", "experts", "topk", "impl", "backend", "pass", "routing",
    "null_mode", "null_target",
]
FIGURE_COLUMNS = [
    "null_realized", "real_assignments", "null_assignments", "experts_per_token", "all_null_frac",
    "time_s", "tokens_per_s", "tflops", "load_cv", "load_max", "load_violation",
    "time_min_s", "time_max_s", "compile_s", "time_fwd_s", "time_bwd_s",
]
EXTRA_COLUMNS = [
    "dtype", "renormalize", "warmup", "iters", "seed", "requested_backend", "tile_rows", "fused_experts", "host_malloc", "timing", "point_key", "sweep", "times",
    "expert_loads", "timestamp",
]
COLUMNS = AXIS_COLUMNS + FIGURE_COLUMNS + EXTRA_COLUMNS

# keys compared as floats when reading back the CSV
FLOAT_COLUMNS = {
    "null_target", "null_realized", "experts_per_token", "all_null_frac", "time_s", "tokens_per_s", "tflops",
    "load_cv", "load_max", "load_violation", "time_min_s", "time_max_s", "compile_s", "time_fwd_s",
    "time_bwd_s",
}
INT_COLUMNS = {"tokens", "hidden", "mlp_dim", "experts", "topk", "real_assignments", "null_assignments",
               "warmup", "iters", "seed"}


def fmt(v: Any) -> str:
    """Compact, parseable value: 6 significant digits for floats, no spaces anywhere."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return repr(float(f"{v:.6g}"))
    s = str(v)
    return s.replace(" ", "_") if s else "-"


def point_axes(pt: Point, backend: str) -> dict[str, Any]:
    return {
        "shape": pt.shape,
        "tokens": pt.tokens,
        "hidden": pt.hidden,
        "mlp_dim": pt.mlp_dim,
        "experts": pt.experts,
        "topk": pt.topk,
        "impl": pt.impl,
        "backend": backend,
        "pass": pt.bench_pass,
        "routing": pt.routing,
        "null_mode": pt.null_mode,
        "null_target": pt.null_target,
    }


def make_row(result, sweep: str, timestamp: str) -> dict[str, Any]:
    """The full record of one point (RESULT line and CSV row share it)."""
    pt: Point = result.point
    row = point_axes(pt, result.backend)
    row.update(result.figures())
    row.update(
        {
            "dtype": pt.dtype,
            "renormalize": pt.renormalize,
            "warmup": pt.warmup,
            "iters": pt.iters,
            "seed": pt.seed,
            "requested_backend": pt.backend,
            "tile_rows": pt.tile_rows if pt.tile_rows is not None else "default",
            "fused_experts": pt.fused,
            "host_malloc": host_malloc.current_mode(),
            "timing": result.timing,
            "point_key": pt.key,
            "sweep": sweep,
            "times": ";".join(f"{t:.6g}" for t in result.main.times),
            "expert_loads": ";".join(f"{v:.6g}" for v in result.expert_loads),
            "timestamp": timestamp,
        }
    )
    return row


def result_line(row: dict[str, Any]) -> str:
    keys = [c for c in COLUMNS if c not in ("times", "expert_loads", "timestamp", "sweep")]
    return "RESULT " + " ".join(f"{k}={fmt(row[k])}" for k in keys)


def parse_result_line(line: str) -> dict[str, str]:
    """Inverse of result_line (values stay strings)."""
    assert line.startswith("RESULT "), line
    out = {}
    for tok in line[len("RESULT "):].split():
        k, _, v = tok.partition("=")
        out[k] = v
    return out


# --- CSV -----------------------------------------------------------------------------------------------------


class ResultsCSV:
    """Append-only CSV; each row is flushed and fsynced as soon as its point finishes."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def read(self) -> list[dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        # a row cut short by a crash mid-write has missing trailing fields: drop it
        return [r for r in rows if r.get("timestamp")]

    def done_keys(self) -> set[str]:
        return {r["point_key"] for r in self.read() if r.get("point_key")}

    def append(self, row: dict[str, Any]) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != COLUMNS:
                raise RuntimeError(
                    f"{self.path} has a different column layout (written by another bench version); "
                    f"use another out_dir or csv_name"
                )
            self._repair_tail()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _csv_value(row.get(k, "")) for k in COLUMNS})
            f.flush()
            os.fsync(f.fileno())

    def _repair_tail(self) -> None:
        """Make sure the file ends with a newline (a crash mid-row would glue the next row to it)."""
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return v


def typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for k in FLOAT_COLUMNS:
        v = row.get(k, "")
        out[k] = float(v) if v not in ("", None, "-") else None
    for k in INT_COLUMNS:
        v = row.get(k, "")
        out[k] = int(float(v)) if v not in ("", None, "-") else None
    return out


# --- table ---------------------------------------------------------------------------------------------------


def _baselines(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(shape, topk, impl) -> the null 0.0 row (the same computation in either mode)."""
    base = {}
    for r in rows:
        if r["null_target"] == 0.0:
            base.setdefault((r["shape"], r["topk"], r["impl"]), r)
    return base


def summary_table(rows: Iterable[dict[str, Any]]) -> str:
    """tokens/s and gain vs null 0.0 per shape x topk x mode x impl (rows: typed CSV rows of one sweep)."""
    rows = list(rows)
    if not rows:
        return "(no results)"
    base = _baselines(rows)
    modes = sorted({r["null_mode"] for r in rows if r["null_target"] > 0.0})
    stock = {(r["shape"], r["topk"]): r for r in rows if r["impl"] == "stock_levanter"}
    lines = []
    hdr = (f"{'shape':<22} {'topk':>4} {'mode':<16} {'impl':<15} {'null':>5} {'realized':>8} "
           f"{'time_s':>9} {'tokens/s':>12} {'TFLOP/s':>8} {'gain':>6} {'ideal':>6} {'vs_stock':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    order = {"null_moe": 0, "masked_null": 1, "stock_levanter": 2}

    def sort_key(r):
        return (r["tokens"], r["hidden"], r["mlp_dim"], r["experts"], r["topk"], order.get(r["impl"], 9))

    groups: dict[tuple, list] = defaultdict(list)
    for r in sorted(rows, key=sort_key):
        if r["null_target"] == 0.0:
            targets = modes or [r["null_mode"]]
            if r["impl"] == "stock_levanter":
                targets = ["-"]
            for m in targets:
                groups[(r["shape"], r["topk"], r["impl"], m)].append(r)
        else:
            groups[(r["shape"], r["topk"], r["impl"], r["null_mode"])].append(r)
    for (shape, k, impl, mode), rs in sorted(
        groups.items(), key=lambda kv: (sort_key(kv[1][0]), kv[0][3])
    ):
        b = base.get((shape, k, impl))
        st = stock.get((shape, k))
        for r in sorted(rs, key=lambda r: r["null_target"]):
            gain = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
            p = r["null_target"]
            ideal = f"{1 / (1 - p):.2f}x" if r["impl"] != "stock_levanter" else "-"
            vs = f"{r['tokens_per_s'] / st['tokens_per_s']:.2f}x" if st and impl != "stock_levanter" else "-"
            lines.append(
                f"{shape:<22} {k:>4} {mode:<16} {impl:<15} {p:>5.2f} {r['null_realized']:>8.4f} "
                f"{r['time_s']:>9.4g} {r['tokens_per_s']:>12,.0f} {r['tflops']:>8.4f} {gain:>6} {ideal:>6} {vs:>8}"
            )
        lines.append("")
    lines.append("gain: tokens/s vs null 0.0 (same shape, topk, impl); ideal: 1/(1-p), expert compute alone; "
                 "vs_stock: tokens/s vs stock Levanter at the same shape and topk")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------------


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def make_plots(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """tokens/s vs null fraction (one line per topk x impl; one panel per mode), one PNG per shape; plus
    a forward / backward time split per shape when the split was measured. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    by_shape: dict[str, list] = defaultdict(list)
    for r in rows:
        by_shape[r["shape"]].append(r)
    styles = {"null_moe": "-", "masked_null": "--", "stock_levanter": ":"}
    markers = {"null_moe": "o", "masked_null": "s", "stock_levanter": "*"}
    for shape, rs in by_shape.items():
        modes = sorted({r["null_mode"] for r in rs if r["null_target"] > 0.0}) or sorted({r["null_mode"] for r in rs})
        base = _baselines(rs)
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False, sharey=True)
        topks = sorted({r["topk"] for r in rs})
        cmap = plt.get_cmap("viridis")
        for ax, mode in zip(axes[0], modes):
            for ci, k in enumerate(topks):
                color = cmap(ci / max(1, len(topks) - 1) * 0.85)
                for impl in ("null_moe", "masked_null", "stock_levanter"):
                    pts = [r for r in rs if r["topk"] == k and r["impl"] == impl
                           and (r["null_mode"] == mode or r["null_target"] == 0.0)]
                    if not pts:
                        continue
                    if (shape, k, impl) in base and base[(shape, k, impl)] not in pts:
                        pts.append(base[(shape, k, impl)])
                    pts = sorted({r["null_target"]: r for r in pts}.values(), key=lambda r: r["null_target"])
                    ax.plot([r["null_target"] for r in pts], [r["tokens_per_s"] for r in pts],
                            linestyle=styles[impl], marker=markers[impl], color=color,
                            label=f"topk={k} {impl}")
            ax.set_title(f"{shape}  ({mode})")
            ax.set_xlabel("null route fraction (target)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("tokens/s")
        axes[0][-1].legend(fontsize=8, loc="best")
        p0 = rs[0]
        fig.suptitle(f"null-routed MoE layer, {p0.get('pass')} {p0.get('dtype')} backend={p0.get('backend')}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"tokens_per_s_{_safe(shape)}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

        split = [r for r in rs if r.get("time_fwd_s") is not None and r["impl"] == "null_moe"]
        if split:
            mode0 = modes[0]
            split = [r for r in split if r["null_mode"] == mode0 or r["null_target"] == 0.0]
            fig, ax = plt.subplots(figsize=(max(6, len(split) * 0.5), 4.5))
            split = sorted(split, key=lambda r: (r["topk"], r["null_target"]))
            xs = list(range(len(split)))
            fwd = [r["time_fwd_s"] for r in split]
            bwd = [max(0.0, r["time_s"] - r["time_fwd_s"]) for r in split]
            ax.bar(xs, fwd, label="forward")
            ax.bar(xs, bwd, bottom=fwd, label="backward (fwd+bwd - fwd)")
            ax.set_xticks(xs)
            ax.set_xticklabels([f"k{r['topk']}\np{r['null_target']:.1f}" for r in split], fontsize=7)
            ax.set_ylabel("seconds")
            ax.set_title(f"{shape} null_moe time split ({mode0})")
            ax.legend()
            fig.tight_layout()
            path = os.path.join(out_dir, f"time_split_{_safe(shape)}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def anchor_style_markdown(rows: list[dict[str, Any]], impl: str = "null_moe") -> str:
    """A markdown table in the layout of the TPU anchor table (docs: /work/shared/anchors/README.md): per shape x
    topk x mode, tokens/s at null 0.0, 0.1 and the largest fraction, and the gain from 0.0 to it."""
    rs = [r for r in rows if r["impl"] == impl]
    if not rs:
        return ""
    base = _baselines(rs)
    top = max(r["null_target"] for r in rs)
    lines = [
        f"| shape | topk | mode | tokens/s @0.0 | tokens/s @0.1 | tokens/s @{top:.1f} | {top:.1f} vs 0.0 | 0.1 vs 0.0 | ideal expert-only |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = sorted({(r["tokens"], r["hidden"], r["mlp_dim"], r["experts"], r["shape"], r["topk"], r["null_mode"])
                   for r in rs if r["null_target"] > 0})
    for *_, shape, k, mode in keys:
        b = base.get((shape, k, impl))
        at = {r["null_target"]: r for r in rs if r["shape"] == shape and r["topk"] == k and r["null_mode"] == mode}
        r1, rt = at.get(0.1), at.get(top)
        if b is None or rt is None:
            continue
        cell = lambda r: f"{r['tokens_per_s']:,.0f}" if r else "-"  # noqa: E731
        g1 = f"{r1['tokens_per_s'] / b['tokens_per_s']:.2f}x" if r1 else "-"
        lines.append(
            f"| {shape} | {k} | {mode} | {cell(b)} | {cell(r1)} | {cell(rt)} | "
            f"{rt['tokens_per_s'] / b['tokens_per_s']:.2f}x | {g1} | {1 / (1 - top):.0f}x |"
        )
    return "\n".join(lines)
