"""The study's figures: eval loss vs step (mean over seeds per arm) and final eval loss vs expected real experts
per token (hollow markers at the realized value). Curves come from each run's ``runs/<id>/metrics.json``."""

from __future__ import annotations

import json
import math
import os
import statistics

from experiments.speedrun.quality.config import QualityConfig

__all__ = ["plot"]


def _curves(out_dir: str, cfg: QualityConfig, rows: list[dict]) -> dict[str, dict[int, list]]:
    curves: dict[str, dict[int, list]] = {}
    for r in rows:
        path = os.path.join(out_dir, "runs", r["run_id"], "metrics.json")
        try:
            with open(path) as f:
                curves.setdefault(r["arm"], {})[int(r["seed"])] = json.load(f)["eval_curve"]
        except (OSError, ValueError, KeyError):
            continue
    return curves


def plot(cfg: QualityConfig, rows: list[dict], s: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = _curves(out_dir, cfg, rows)
    fig, (ax_all, ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    half = cfg.num_train_steps // 2
    for a in cfg.arms:
        per_seed = curves.get(a.name, {})
        if not per_seed:
            continue
        steps = sorted(set.intersection(*[{int(st) for st, _ in c} for c in per_seed.values()]))
        by_step = [{int(x): y for x, y in c} for c in per_seed.values()]
        means = [statistics.fmean(d[st] for d in by_step) for st in steps]
        style = "--" if a.is_null else "-"
        label = f"{a.name} (k={a.num_experts_per_tok}, p={a.null_route_frac:.2g})"
        ax_all.plot([st + 1 for st in steps], means, style, marker="o", ms=3, label=label)
        late = [(st, m) for st, m in zip(steps, means) if st + 1 >= half]
        ax.plot([st + 1 for st, _ in late], [m for _, m in late], style, marker="o", ms=3, label=label)
    ax_all.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax_all.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax_all.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax_all.set_title("whole run")
    ax.set_title(f"second half (steps >= {half})")
    for axis in (ax_all, ax):
        axis.set_xlabel("step")
        axis.set_ylabel("held-out eval loss (mean over seeds)")
        axis.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{cfg.name}: eval loss vs step")
    fig.tight_layout()
    path = os.path.join(out_dir, "eval_loss_vs_step.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = sorted((a for a in cfg.arms if not a.is_null and not a.model), key=lambda a: a.num_experts_per_tok)
    xs = [s["arms"][a.name]["expected"] for a in dense if s["arms"][a.name]["seeds"]]
    ys = [s["arms"][a.name]["eval_loss"][0] for a in dense if s["arms"][a.name]["seeds"]]
    if xs:
        ax.plot(xs, ys, "-", color="gray", alpha=0.6, label="p = 0 (fixed top-k)")
    for a in cfg.arms:
        st = s["arms"][a.name]
        if not st["seeds"]:
            continue
        m, sd = st["eval_loss"][0], st["eval_loss"][1]
        err = None if math.isnan(sd) else sd
        line = ax.errorbar([st["expected"]], [m], yerr=err, fmt="o" if not a.is_null else "s", capsize=3,
                           label=f"{a.name}")
        if a.is_null and not math.isnan(st["realized"][0]):
            ax.plot([st["realized"][0]], [m], marker="s", mfc="none", color=line[0].get_color(), ls="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real experts per token (filled: expected; hollow: realized)")
    ax.set_ylabel("final held-out eval loss (mean ± std over seeds)")
    ax.set_title(f"{cfg.name}: quality vs expert compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = os.path.join(out_dir, "eval_loss_vs_experts.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
