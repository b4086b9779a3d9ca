"""``summary.md``: the study's tables (per arm, paired comparisons, bracket-gap shares) and what was cut."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from experiments.speedrun.quality.config import QualityConfig
from experiments.speedrun.quality.stats import summarize

__all__ = ["summary_markdown", "write_outputs"]


def _pm(ms: tuple, digits: int = 4) -> str:
    m, sd = ms[0], ms[1]
    if math.isnan(m):
        return "-"
    if math.isnan(sd):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _signed_pm(m: float, sd: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:+.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def summary_markdown(cfg: QualityConfig, s: dict, cut: Optional[list[dict]] = None) -> str:
    """The markdown of summary.md. ``cut``: runs the time budget left out (``{"run_id", "reason"}`` each)."""
    lines = [f"# Quality study `{cfg.name}`", ""]
    lines.append(f"{cfg.num_train_steps} steps per run; seeds {list(cfg.seeds)}; base config `{cfg.base_config}`"
                 + (f" with overrides `{json.dumps(cfg.overrides)}`" if cfg.overrides else "")
                 + f"; final eval loss on the held-out split, {cfg.max_eval_batches} fixed eval batches. "
                 f"{s['n_rows']} of {len(cfg.arms) * len(cfg.seeds)} runs done.")
    lines.append(f"Train tokens per run: {', '.join(map(str, s['train_tokens']))}"
                 f" ({'the same for every run' if s['same_train_tokens'] else 'NOT the same for every run'}); data "
                 f"order per seed {'identical across arms' if s['same_data_order'] else 'DIFFERS across arms'} "
                 f"(fingerprint of the first and last training batch). Mean ± std over seeds (sample std).")
    if cut:
        budget = f" (time_budget_s={cfg.time_budget_s:g})" if cfg.time_budget_s is not None else ""
        lines += ["", f"**Cut**{budget}: {len(cut)} run(s) did not finish, so the tables below hold fewer seeds "
                      f"for their arms:", ""]
        lines += [f"- `{c['run_id']}`: {c['reason']}" for c in cut]
    lines += ["", "## Per arm", "",
              "| arm | k | p | expected real experts/token | realized (mean over training) | realized (last step) "
              "| all-null tokens | load violation (last) | eval loss | seeds | wall s/run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in s["arms"].items():
        flag = " ⚠" if a["off_target"] else ""
        extra = f" ({', '.join(f'{k}={v}' for k, v in a['overrides'].items())})" if a["overrides"] else ""
        lines.append(f"| {name}{extra} | {a['k']} | {a['p']:.3g} | {a['expected']:.3f} | {_pm(a['realized'], 3)}{flag} "
                     f"| {_pm(a['realized_final'], 3)} | {_pm(a['all_null'], 3)} | {_pm(a['load_violation'], 3)} "
                     f"| {_pm(a['eval_loss'])} | {len(a['seeds'])} | {_pm(a['wall_s'], 0)} |")
    if s["paired"]:
        lines += ["", "## Null arms against their matched-compute baseline (paired by seed)", "",
                  "Difference = null arm's eval loss - baseline's, same seed (negative: the null arm is better). "
                  "Win only if the mean is below zero by more than 2 std; loss if above zero by more than 2 std; "
                  "else tie.", "",
                  "| arm | baseline | paired diff (expected compute) | verdict | per seed | at realized compute "
                  "| verdict (realized) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, p in s["paired"].items():
            r = p["realized"]
            per_seed = ", ".join(f"{d:+.4f}" for d in p["diffs"])
            lines.append(f"| {name} | {p['baseline']} | {_signed_pm(p['mean'], p['std'])} | **{p['verdict']}** | "
                         f"{per_seed} | {_signed_pm(r['mean'], r['std'])} | {r['verdict']} |")
        lines += ["", "*At realized compute*: against the p = 0 arms of the same seed interpolated (linearly in "
                  "log2 k) at the null arm's realized mean real experts per token."]
        off = [n for n, a in s["arms"].items() if a["off_target"]]
        for n in off:
            a = s["arms"][n]
            lines.append(f"- ⚠ **{n}** realized {a['realized'][0]:.3f} real experts per token against a target of "
                         f"{a['expected']:.3f} ({100 * (a['realized'][0] / a['expected'] - 1):+.1f}%, more than "
                         f"{100 * cfg.realized_tolerance:.0f}% off): compare it at realized compute (last columns).")
        if not off:
            lines.append(f"- Every null arm realized its target within {100 * cfg.realized_tolerance:.0f}%.")
    b = s["brackets"]
    if b is not None:
        gm, gsd, gn = b["gap"]
        lines += ["", f"## Share of the bracket gap ({b['low']} -> {b['high']})", "",
                  f"Bracket gap (eval loss of {b['low']} - {b['high']}, paired by seed): {_signed_pm(gm, gsd)} "
                  f"over {gn} seed{'s' if gn != 1 else ''}; "
                  + ("no seed noise to compare it with (one seed)." if math.isnan(b["max_seed_std"])
                     else f"the largest per-arm seed std is {b['max_seed_std']:.4f}"
                     + (f", so the gap is {gm / b['max_seed_std']:.1f}x the seed noise."
                        if b["max_seed_std"] and not math.isnan(gm) else ".")),
                  "", "Share = (loss(k_low) - loss(arm)) / (loss(k_low) - loss(k_high)): 0 = no better than k_low, "
                  "1 = as good as k_high.", "",
                  "| arm | expected real experts/token | share (of means) | share (paired, per seed) |",
                  "| --- | --- | --- | --- |"]
        for name, sh in b["shares"].items():
            pm = sh["paired"]
            share_txt = "-" if math.isnan(sh["of_means"]) else f"{sh['of_means']:.2f}"
            lines.append(f"| {name} | {s['arms'][name]['expected']:.3f} | {share_txt} | {_pm(pm, 2)} |")
    lines += ["", ("Plots: `eval_loss_vs_step.png`, `eval_loss_vs_experts.png`. " if cfg.plots else "")
              + "Per-run rows: `results.csv`.", ""]
    return "\n".join(lines)


def write_outputs(cfg: QualityConfig, rows: list[dict], *, cut: Optional[list[dict]] = None, log=print) -> None:
    """summary.md (and the plots, if ``cfg.plots`` and any run finished) in ``cfg.out_dir``."""
    out_dir = os.path.abspath(cfg.out_dir)
    s = summarize(cfg, rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(cfg, s, cut))
    if rows and cfg.plots:
        from experiments.speedrun.quality.plots import plot

        plot(cfg, rows, s, out_dir)
    log(f"wrote {os.path.join(cfg.out_dir, 'summary.md')} ({len(rows)} runs)")
