#!/usr/bin/env python
"""OUT/summary.md for the whole GPU check: section statuses, the goal checks, the layer and grouped-matmul tables
(with the PyTorch peers beside them), the training run and the bench sweep.

    python scripts/gpu/summary.py OUT --section versions=ok --section tests=ok:"12 passed" ...

Reads OUT/gpu_results.csv (measure.py, torch_peers.py), OUT/train.log (the training CLI's progress lines) and
OUT/bench_results.csv (the bench CLI's CSV). Every ratio in it comes from one run of the check; how each figure
was timed is in the CSV's ``timing`` column. Prints the summary too.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.gpu import inputs  # noqa: E402
from scripts.gpu.results import read  # noqa: E402

# The goals (bf16, the first seed shape, forward + backward).
GOAL_ALL_NULL_FRAC = 0.05  # every slot null: at most this fraction of the null-0 step time
GOAL_SPEEDUP = {0.9: 7.0, 0.5: 1.9}  # tokens/s over null 0
GOAL_VS_TORCH = 1.2  # tokens/s over the PyTorch layer's, at null 0, 0.5, 0.9
GOAL_GMM_DENSE = 0.80  # grouped matmul forward at 100% real rows, of dense speed


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _find(rows, **want):
    return [r for r in rows if all(str(r.get(k)) == str(v) for k, v in want.items())]


def _ms(rows, **want):
    hits = [r for r in _find(rows, **want) if _num(r["median_ms"]) is not None]
    return _num(hits[0]["median_ms"]) if hits else None


def goal_checks(rows: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(check, value, goal, met) for every goal the rows allow checking."""
    checks = []
    for mode in inputs.MODES:
        base = _ms(rows, section="layer", backend="triton", dtype="bf16", real_frac_or_null="0.0", mode=mode)
        if base is None:
            continue
        all_null = _ms(rows, section="layer", backend="triton", dtype="bf16", real_frac_or_null="1.0", mode=mode)
        if all_null is not None:
            v = all_null / base
            checks.append((f"layer, every slot null: time / null-0 time ({mode})", f"{v:.3f}",
                           f"<= {GOAL_ALL_NULL_FRAC}", v <= GOAL_ALL_NULL_FRAC))
        for p, goal in GOAL_SPEEDUP.items():
            ms = _ms(rows, section="layer", backend="triton", dtype="bf16", real_frac_or_null=str(p), mode=mode)
            if ms is not None:
                v = base / ms
                checks.append((f"layer tokens/s, null {p} vs 0 ({mode})", f"{v:.2f}x", f">= {goal}x", v >= goal))
        for p in (0.0, 0.5, 0.9):
            ours = _ms(rows, section="layer", backend="triton", dtype="bf16", real_frac_or_null=str(p), mode=mode)
            torch = _ms(rows, section="torch_layer", real_frac_or_null=str(p), mode=mode)
            if ours is not None and torch is not None:
                v = torch / ours
                checks.append((f"layer tokens/s vs the PyTorch layer, null {p} ({mode})", f"{v:.2f}x",
                               f">= {GOAL_VS_TORCH}x", v >= GOAL_VS_TORCH))
    for backend in ("triton", "triton_skip"):
        r = _find(rows, section="gmm", backend=backend, dtype="bf16", real_frac_or_null="1.0", **{"pass": "fwd"})
        v = _num(r[0]["ratio"]) if r else None
        if v is not None:
            checks.append((f"grouped matmul {backend} forward, 100% real: of dense speed", f"{v:.2f}",
                           f">= {GOAL_GMM_DENSE}", v >= GOAL_GMM_DENSE))
        for frac in inputs.REAL_FRACS:
            ours = _ms(rows, section="gmm", backend=backend, dtype="bf16", real_frac_or_null=str(frac),
                       **{"pass": "fwdbwd"})
            torch = _ms(rows, section="torch_gmm", real_frac_or_null=str(frac), **{"pass": "fwdbwd"})
            if ours is not None and torch is not None:
                checks.append((f"grouped matmul {backend} fwd+bwd at {int(frac * 100)}% real: ms vs torch._grouped_mm",
                               f"{ours:.3f} vs {torch:.3f}", "<=", ours <= torch))
    return checks


def _layer_table(rows) -> list[str]:
    lines = []
    for mode in inputs.MODES:
        paths = [(s, b) for s, b in (("layer", "triton"), ("layer", "triton_unfused"), ("layer", "tokamax"),
                                     ("layer", "tiled"), ("torch_layer", "torch_layer"))
                 if _find(rows, section=s, backend=b, mode=mode)]
        if not paths:
            continue
        head = "| path | " + " | ".join(f"null {p}" for p in inputs.NULLS) + " | null 0.5 vs 0 | null 0.9 vs 0 |"
        lines += [f"Forward + backward, ms per step ({mode}):", "", head, "|" + " --- |" * (len(inputs.NULLS) + 3)]
        for section, backend in paths:
            ms = {p: _ms(rows, section=section, backend=backend, real_frac_or_null=str(p), mode=mode)
                  for p in inputs.NULLS}
            cells = [f"{ms[p]:.3f}" if ms[p] is not None else "-" for p in inputs.NULLS]
            gains = [f"{ms[0.0] / ms[p]:.2f}x" if ms[0.0] and ms[p] else "-" for p in (0.5, 0.9)]
            lines.append(f"| {backend} | " + " | ".join(cells + gains) + " |")
        lines.append("")
    return lines


def _gmm_table(rows) -> list[str]:
    backends = [b for b in ("dense", "triton", "triton_skip", "tokamax", "torch_grouped_mm")
                if _find(rows, backend=b)]
    if not backends:
        return []
    lines = ["| grouped matmul, ms | fwd 100% | fwd+bwd 100% | 50% | 10% |", "| --- | --- | --- | --- | --- |"]
    for b in backends:
        section = "torch_gmm" if b == "torch_grouped_mm" else "gmm"
        cells = [_ms(rows, section=section, backend=b, real_frac_or_null="1.0", **{"pass": "fwd"})]
        cells += [_ms(rows, section=section, backend=b, real_frac_or_null=str(f), **{"pass": "fwdbwd"})
                  for f in inputs.REAL_FRACS]
        lines.append(f"| {b} | " + " | ".join(f"{c:.3f}" if c is not None else "-" for c in cells) + " |")
    return lines + [""]


_STEP = re.compile(r"^step (\d+)/(\d+)\s+(.*)$")


def _train_lines(path: pathlib.Path) -> list[str]:
    if not path.exists():
        return ["(no train.log)", ""]
    steps, evals, notes = [], [], []
    for line in path.read_text(errors="replace").splitlines():
        m = _STEP.match(line.strip())
        if m:
            fields = dict(re.findall(r"([a-z_/]+) ([-0-9.,%]+)", m.group(3)))
            (evals if "eval_loss" in fields and "loss" not in fields else steps).append((int(m.group(1)), fields))
        elif line.startswith(("error:", "jax ", "host_malloc", "null_moe:")) or "Traceback" in line:
            notes.append(line.strip()[:200])
    if not steps:
        return ["No training step finished.", *notes, ""]

    def med(key):
        vals = [float(f[key].rstrip("%").replace(",", "")) for _, f in steps[len(steps) // 4:] if key in f]
        return statistics.median(vals) if vals else None

    last_step, last = steps[-1]
    out = [f"Steps: {last_step}; first loss {steps[0][1].get('loss')}, last loss {last.get('loss')}"
           + (f", final eval loss {evals[-1][1]['eval_loss']}" if evals else "") + "."]
    for key, what in (("tok/s", "tokens/s"), ("mfu", "MFU % (expected FLOPs)"), ("realized_mfu", "MFU % (realized)"),
                      ("null_frac", "null fraction"), ("experts/tok", "real experts per token")):
        v = med(key)
        if v is not None:
            out.append(f"- median {what} over the last three quarters of the steps: {v:,.4g}")
    return out + notes[-3:] + [""]


def _bench_lines(path: pathlib.Path) -> list[str]:
    if not path.exists():
        return ["(no bench_results.csv)", ""]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return ["(empty bench_results.csv)", ""]
    lines = ["| shape | k | mode | backend | null | tokens/s | vs null 0 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {}
    for r in rows:
        if _num(r.get("null_target")) == 0.0:
            base[(r["shape"], r["topk"], r["null_mode"])] = _num(r["tokens_per_s"])
    for r in rows:
        tps = _num(r.get("tokens_per_s"))
        b = base.get((r["shape"], r["topk"], r["null_mode"]))
        gain = f"{tps / b:.2f}x" if tps and b else "-"
        lines.append(f"| {r['shape']} | {r['topk']} | {r['null_mode']} | {r.get('backend', '')} | {r['null_target']} | "
                     f"{tps:,.0f} | {gain} |" if tps else f"| {r['shape']} | {r['topk']} | {r['null_mode']} | - | - | - | - |")
    return lines + [""]


def summary(out: pathlib.Path, sections: list[tuple[str, str]]) -> str:
    rows = read(out)
    lines = ["# GPU check", ""]
    env = _find(rows, section="env")
    if env:
        lines += [f"Environment: {env[-1]['note']}", ""]
    if sections:
        lines += ["| section | status |", "| --- | --- |"] + [f"| {n} | {s} |" for n, s in sections] + [""]
    checks = goal_checks(rows)
    layer_shapes = sorted({r["shape"] for r in _find(rows, section="layer") if r["shape"]})
    gmm_shapes = sorted({r["shape"] for r in _find(rows, section="gmm") if r["shape"]})
    lines += [f"## Goal checks (bf16, forward + backward; layer {', '.join(layer_shapes) or '-'})", "",
              "| check | value | goal | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {v} | {g} | {'yes' if ok else 'NO'} |" for c, v, g, ok in checks] or ["| (no data) | | | |"]
    lines += ["", "## The layer", ""] + (_layer_table(rows) or ["(no layer rows)", ""])
    lines += [f"## The grouped matmul ({', '.join(gmm_shapes) or '-'})", ""] + (_gmm_table(rows) or ["(no rows)", ""])
    failures = [r for r in rows if r["section"] != "env" and not r["median_ms"] and r["note"]]
    if failures:
        lines += ["Not measured:", ""] + [f"- {r['section']} {r['backend']} {r['pass']}: {r['note']}" for r in failures]
        lines.append("")
    lines += ["## Training (the training CLI)", ""] + _train_lines(out / "train.log")
    lines += ["## Bench (the bench CLI)", ""] + _bench_lines(out / "bench_results.csv")
    lines += ["Timing: every figure is the median over interleaved rounds; each sample ran enough back-to-back calls to",
              "hold >= 20 ms of device work (per-call time recorded); see the CSV's timing column. Ratios come from",
              "this one run."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--section", action="append", default=[], help="name=status, in order")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    sections = [tuple(s.split("=", 1)) if "=" in s else (s, "") for s in args.section]
    text = summary(out, sections)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
