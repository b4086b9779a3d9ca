"""The end-of-sweep summary: the table, the markdown in the layout of the TPU anchor table, and the plots.

All of it reads typed rows (scripts/bench/schema), fresh and resumed alike. A point whose null mode cannot
matter (null 0, or ``learned``) serves every mode: it is the baseline of each.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Iterable, get_args

from scripts.bench import anchors
from scripts.bench.config import Impl

IMPL_ORDER = {name: i for i, name in enumerate(get_args(Impl))}
SHARED_MODE = "learned"


def _shape_key(r) -> tuple:
    return (r["tokens"], r["hidden"], r["mlp_dim"], r["experts"])


def _shared(r) -> bool:
    return r["null_target"] == 0.0 or r["null_mode"] == SHARED_MODE


def _modes(rows) -> list[str]:
    return sorted({r["null_mode"] for r in rows if not _shared(r)}) or sorted({r["null_mode"] for r in rows})


def _baselines(rows) -> dict[tuple, dict[str, Any]]:
    """(shape, topk, impl) -> the null 0.0 row."""
    base = {}
    for r in rows:
        if r["null_target"] == 0.0:
            base.setdefault((r["shape"], r["topk"], r["impl"]), r)
    return base


def _stock(rows) -> dict[tuple, dict[str, Any]]:
    return {(r["shape"], r["topk"]): r for r in rows if r["impl"] == "stock_levanter"}


def _ratio(a: dict, b: dict | None) -> str:
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"


def summary_table(rows: Iterable[dict[str, Any]]) -> str:
    """tokens/s and gains per shape x topk x mode x impl x null fraction."""
    rows = list(rows)
    if not rows:
        return "(no results)"
    base, stock, modes = _baselines(rows), _stock(rows), _modes(rows)
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        targets = ["-"] if r["impl"] == "stock_levanter" else (modes if _shared(r) else [r["null_mode"]])
        for m in targets:
            groups[(r["shape"], r["topk"], r["impl"], m)].append(r)
    hdr = (f"{'shape':<22} {'topk':>4} {'mode':<16} {'impl':<15} {'null':>5} {'realized':>8} "
           f"{'time_s':>9} {'tokens/s':>12} {'TFLOP/s':>8} {'gain':>6} {'ideal':>6} {'vs_stock':>8}")
    lines = [hdr, "-" * len(hdr)]
    for (shape, k, impl, mode), rs in sorted(groups.items(), key=lambda kv: (
            _shape_key(kv[1][0]), kv[0][1], IMPL_ORDER.get(kv[0][2], 9), kv[0][3])):
        b, st = base.get((shape, k, impl)), stock.get((shape, k))
        for r in sorted(rs, key=lambda r: r["null_target"]):
            p = r["null_target"]
            ideal = f"{1 / (1 - p):.2f}x" if impl != "stock_levanter" else "-"
            vs = _ratio(r, st) if impl != "stock_levanter" else "-"
            lines.append(f"{shape:<22} {k:>4} {mode:<16} {impl:<15} {p:>5.2f} {r['null_realized']:>8.4f} "
                         f"{r['time_s']:>9.4g} {r['tokens_per_s']:>12,.0f} {r['tflops']:>8.4f} {_ratio(r, b):>6} "
                         f"{ideal:>6} {vs:>8}")
        lines.append("")
    lines.append("gain: tokens/s vs null 0.0 (same shape, topk, impl); ideal: 1/(1-p), expert compute alone; "
                 "vs_stock: tokens/s vs stock Levanter at the same shape and topk")
    return "\n".join(lines)


def comm_table(rows: Iterable[dict[str, Any]]) -> str:
    """Expert-parallel points: bytes one device sends per step (compiled HLO) vs its null 0.0 point and vs
    compact_psum at the same shape, topk and null fraction, with the dropped fraction. Empty without EP rows."""
    rows = [r for r in rows if r.get("ep_size", 1) > 1]
    if not rows:
        return ""
    base = _baselines(rows)
    psum = {(r["shape"], r["topk"], r["null_target"]): r for r in rows if r["impl"] == "compact_psum"}
    hdr = (f"{'shape':<22} {'topk':>4} {'impl':<13} {'ep':>3} {'cf':>5} {'transport':<17} {'null':>5} "
           f"{'comm MiB':>10} {'vs null 0':>9} {'vs psum':>8} {'dropped':>8}")
    lines = [hdr, "-" * len(hdr)]
    for r in sorted(rows, key=lambda r: (_shape_key(r), r["topk"], IMPL_ORDER.get(r["impl"], 9), r["null_mode"],
                                         r["null_target"])):
        b, ps = base.get((r["shape"], r["topk"], r["impl"])), psum.get((r["shape"], r["topk"], r["null_target"]))
        vs0 = f"{r['comm_bytes'] / b['comm_bytes']:.3f}" if b and b["comm_bytes"] else "-"
        vsp = f"{r['comm_bytes'] / ps['comm_bytes']:.3f}" if ps and ps["comm_bytes"] else "-"
        cf = "-" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        lines.append(f"{r['shape']:<22} {r['topk']:>4} {r['impl']:<13} {r['ep_size']:>3} {cf:>5} {r['transport']:<17} "
                     f"{r['null_target']:>5.2f} {r['comm_bytes'] / 2**20:>10.3f} {vs0:>9} {vsp:>8} "
                     f"{r['dropped_frac']:>8.4f}")
    lines.append("comm: bytes one device sends per step, read from the compiled step's collectives (all-to-all "
                 "(n-1)/n of its buffer, all-reduce 2(n-1)/n); on simulated CPU devices the times mean little")
    return "\n".join(lines)


def anchor_style_markdown(rows: list[dict[str, Any]], impl: str = "null_moe") -> str:
    """null_moe per shape x topk x mode: tokens/s at null 0.0, 0.1 and the largest fraction, the gains, and the
    TPU sweep's gain (scripts/bench/anchors.py) where it has the same expert count and topk."""
    rs = [r for r in rows if r["impl"] == impl]
    if not rs:
        return ""
    base = _baselines(rs)
    top = max(r["null_target"] for r in rs)
    lines = [f"| shape | topk | mode | tokens/s @0.0 | tokens/s @0.1 | tokens/s @{top:.1f} | {top:.1f} vs 0.0 "
             f"| 0.1 vs 0.0 | ideal expert-only | TPU sweep 0.9 vs 0.0 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    keys = sorted({(_shape_key(r), r["shape"], r["topk"], r["null_mode"]) for r in rs if r["null_target"] > 0})
    for _, shape, k, mode in keys:
        b = base.get((shape, k, impl))
        at = {r["null_target"]: r for r in rs if r["shape"] == shape and r["topk"] == k
              and (r["null_mode"] == mode or r["null_mode"] == SHARED_MODE)}
        r1, rt = at.get(0.1), at.get(top)
        if b is None or rt is None:
            continue
        tpu = anchors.tpu_gain(b["experts"], k) if abs(top - 0.9) < 1e-9 else None

        def cell(r):
            return f"{r['tokens_per_s']:,.0f}" if r else "-"

        lines.append(f"| {shape} | {k} | {mode} | {cell(b)} | {cell(r1)} | {cell(rt)} | {_ratio(rt, b)} | "
                     f"{_ratio(r1, b) if r1 else '-'} | {1 / (1 - top):.0f}x | {f'{tpu:.2f}x' if tpu else '-'} |")
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------------------


def plot_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """What the tokens/s plots draw: shape -> mode (one panel each) -> series, each a dict of ``label``,
    ``kind`` (impl, ``ideal`` or ``stock``), ``topk``, ``x`` (null fractions) and ``y`` (tokens/s).

    ``ideal`` is null_moe's null-0 tokens/s scaled by 1 / (1 - p), what expert compute alone would give;
    ``stock`` is stock Levanter at null 0, a flat reference line over the fractions of its topk.
    """
    out: dict[str, dict[str, list[dict]]] = {}
    by_shape: dict[str, list] = defaultdict(list)
    for r in rows:
        by_shape[r["shape"]].append(r)
    for shape, rs in by_shape.items():
        stock = _stock(rs)
        panels: dict[str, list[dict]] = {}
        for mode in _modes(rs):
            series = []
            for k in sorted({r["topk"] for r in rs}):
                xs_all = sorted({r["null_target"] for r in rs if r["topk"] == k and r["impl"] != "stock_levanter"})
                for impl in ("null_moe", "masked_null"):
                    pts = {r["null_target"]: r for r in rs if r["topk"] == k and r["impl"] == impl
                           and (r["null_mode"] == mode or _shared(r))}
                    if not pts:
                        continue
                    xs = sorted(pts)
                    series.append(dict(label=f"topk={k} {impl}", kind=impl, topk=k, x=xs,
                                       y=[pts[x]["tokens_per_s"] for x in xs]))
                    if impl == "null_moe" and 0.0 in pts:
                        y0, grid = pts[0.0]["tokens_per_s"], [xs[-1] * i / 40 for i in range(41)]
                        series.append(dict(label=f"topk={k} ideal 1/(1-p)", kind="ideal", topk=k, x=grid,
                                           y=[y0 / (1 - x) for x in grid]))
                st = stock.get((shape, k))
                if st is not None:
                    xs = xs_all or [0.0]
                    series.append(dict(label=f"topk={k} stock Levanter (null 0)", kind="stock", topk=k,
                                       x=[xs[0], xs[-1]], y=[st["tokens_per_s"]] * 2))
            panels[mode] = series
        out[shape] = panels
    return out


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


_STYLE = {"null_moe": ("-", "o"), "masked_null": ("--", "s"), "ideal": (":", None), "stock": ("-.", None)}


def make_plots(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """tokens/s vs null fraction per shape (one panel per mode; null_moe, its ideal curve, masked_null and stock
    Levanter where they ran), plus a forward / backward split per shape when it was measured. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    first = {}
    for r in rows:
        first.setdefault(r["shape"], r)
    for shape, panels in plot_series(rows).items():
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True)
        topks = sorted({s["topk"] for series in panels.values() for s in series})
        cmap = plt.get_cmap("viridis")
        for ax, (mode, series) in zip(axes[0], panels.items()):
            for s in series:
                color = cmap(topks.index(s["topk"]) / max(1, len(topks) - 1) * 0.85)
                ls, marker = _STYLE[s["kind"]]
                ax.plot(s["x"], s["y"], linestyle=ls, marker=marker, color=color, label=s["label"],
                        alpha=0.6 if s["kind"] in ("ideal", "stock") else 1.0)
            ax.set_title(f"{shape}  ({mode})")
            ax.set_xlabel("null route fraction (target)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("tokens/s")
        axes[0][-1].legend(fontsize=7, loc="best")
        p0 = first[shape]
        fig.suptitle(f"null-routed MoE layer, {p0['pass']} {p0['dtype']} backend={p0['backend']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"tokens_per_s_{_safe(shape)}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    for shape in first:
        path = _split_plot(plt, [r for r in rows if r["shape"] == shape], shape, out_dir)
        if path:
            paths.append(path)
    return paths


def _split_plot(plt, rs, shape: str, out_dir: str):
    split = [r for r in rs if r.get("time_fwd_s") is not None and r["impl"] == "null_moe"]
    if not split:
        return None
    mode = _modes(split)[0]
    split = sorted((r for r in split if r["null_mode"] == mode or _shared(r)),
                   key=lambda r: (r["topk"], r["null_target"]))
    fig, ax = plt.subplots(figsize=(max(6, len(split) * 0.5), 4.5))
    xs = list(range(len(split)))
    fwd = [r["time_fwd_s"] for r in split]
    ax.bar(xs, fwd, label="forward")
    ax.bar(xs, [max(0.0, r["time_s"] - r["time_fwd_s"]) for r in split], bottom=fwd, label="backward (fwd+bwd - fwd)")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"k{r['topk']}\np{r['null_target']:.1f}" for r in split], fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title(f"{shape} null_moe time split ({mode})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"time_split_{_safe(shape)}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
