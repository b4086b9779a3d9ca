"""Does the realized null fraction meet its target? Trains a grid of runs and measures how each one's routing tracks p.

    python -m experiments.speedrun.null_control_sweep --config_path configs/speedrun/tiny_cpu.yaml \\
        --out_dir out/null_control/tiny --null_control bias --null_route_frac 0.25 0.5 0.75 --lbl_coef 0.01 0.05
    # anything after -- goes to every training run, e.g. -- --model.num_experts_per_tok 4 --trainer.num_train_steps 400
    # --devices 8 simulates 8 CPU devices (XLA_FLAGS), for the expert-parallel config

Every run is the training CLI (``python -m experiments.speedrun.custom_mixtral``) as a subprocess, with offline W&B
under ``<out_dir>/runs/<run id>/``; its checkpoints are deleted once its row is written. ``results.csv`` gets one row
per run (rerunning the same command skips the run ids it already holds), ``summary.md`` the table. Per run, from the
step-by-step ``moe/null_frac`` and ``moe/experts_per_token`` (means over layers) of the W&B history:

- ``realized_second_half``: mean real experts per token over the second half of the steps, against the target
  k (1 - p) (``rel_error``, signed);
- ``settle_step``: the first step from which the trailing ``window``-step mean of the null fraction stays within
  ``tolerance`` of p until the end (None if it never does), against ``num_train_steps / 4``;
- ``max_dev_after_quarter``: the largest distance of that trailing mean from p after the first quarter;
  ``step_std_after_quarter``: the per-step null fraction's standard deviation there (mostly batch-to-batch noise:
  the routing of the 16-sequence batch a step sees);
- ``dropped_after_20``: mean ``moe/dropped_frac`` over the steps after step 20 (expert parallelism with a capacity);
- the last step's ``moe/null_bias`` per layer and the final eval loss.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from experiments.speedrun.quality.results import load_results, write_rows_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIELDS = [
    "run_id", "config", "null_control", "null_route_frac", "lbl_coef", "null_bias_rate", "balance_pool",
    "num_experts_per_tok", "steps", "target_experts", "realized_second_half", "rel_error", "null_frac_second_half",
    "null_frac_second_half_layers", "settle_step", "quarter", "max_dev_after_quarter", "step_std_after_quarter",
    "dropped_after_20", "null_bias_final_layers", "eval_loss", "wall_s",
]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values up to each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def control_metrics(null_frac: Sequence[float], experts: Sequence[float], *, k: int, p: float, window: int = 10,
                    tolerance: float = 0.03) -> dict:
    """How one run's per-step realized null fraction and real experts per token track the target p."""
    steps = len(null_frac)
    if steps == 0 or len(experts) != steps:
        raise ValueError(f"need one null_frac and experts_per_token value per step, got {steps} and {len(experts)}")
    half, quarter = steps // 2, steps // 4
    target = k * (1.0 - p)
    second = experts[half:]
    realized = sum(second) / len(second)
    smooth = trailing_mean(null_frac, window)
    settle = None
    for s in range(steps - 1, -1, -1):  # the first step from which every later smoothed value is within tolerance
        if abs(smooth[s] - p) > tolerance:
            break
        settle = s
    after = null_frac[quarter:]
    mean_after = sum(after) / len(after)
    return {
        "steps": steps,
        "target_experts": target,
        "realized_second_half": realized,
        "rel_error": (realized - target) / target if target else float("nan"),
        "null_frac_second_half": sum(null_frac[half:]) / len(null_frac[half:]),
        "settle_step": settle,
        "quarter": quarter,
        "max_dev_after_quarter": max(abs(v - p) for v in smooth[quarter:]),
        "step_std_after_quarter": math.sqrt(sum((v - mean_after) ** 2 for v in after) / len(after)),
    }


def _series(history: list[dict], key: str) -> dict[int, float]:
    return {int(h["_step"]): float(h[key]) for h in history if key in h and h[key] is not None}


def read_run(run_dir: str, *, window: int, tolerance: float) -> dict:
    """The row of one finished run, read from its offline W&B files."""
    from experiments.speedrun.wandb_offline import find_run_dirs, read_wandb_records

    dirs = find_run_dirs(os.path.join(run_dir, "wandb"))
    if len(dirs) != 1:
        raise RuntimeError(f"expected one W&B run under {run_dir}, found {len(dirs)}")
    rec = read_wandb_records(dirs[0])
    model = rec["config"]["model"]
    k, p = int(model["num_experts_per_tok"]), float(model["null_route_frac"])
    nf, ex = _series(rec["history"], "moe/null_frac"), _series(rec["history"], "moe/experts_per_token")
    steps = sorted(nf)
    row = control_metrics([nf[s] for s in steps], [ex[s] for s in steps], k=k, p=p, window=window,
                          tolerance=tolerance)
    half = len(steps) // 2
    layers = int(model["num_layers"])
    per_layer = []
    for i in range(layers):
        s = _series(rec["history"], f"moe/layer{i}/null_frac")
        vals = [s[t] for t in steps[half:] if t in s]
        per_layer.append(f"{sum(vals) / len(vals):.4f}" if vals else "")
    row["null_frac_second_half_layers"] = "/".join(per_layer)
    biases = []
    for i in range(layers):
        s = _series(rec["history"], f"moe/layer{i}/null_bias")
        biases.append(f"{s[max(s)]:+.4f}" if s else "")
    row["null_bias_final_layers"] = "/".join(b for b in biases if b)
    dropped = _series(rec["history"], "moe/dropped_frac")
    late = [v for s, v in dropped.items() if s >= 20]
    row["dropped_after_20"] = sum(late) / len(late) if late else None
    evals = _series(rec["history"], "eval/loss")
    row["eval_loss"] = evals[max(evals)] if evals else None
    row.update(null_control=model.get("null_control", "loss"), null_route_frac=p, lbl_coef=model.get("lbl_coef"),
               null_bias_rate=model.get("null_bias_rate"), balance_pool=model.get("balance_pool", "all"),
               num_experts_per_tok=k)
    return row


def summary_markdown(rows: list[dict]) -> str:
    head = ("| run | control | p | lbl | k | steps | target experts/tok | realized (2nd half) | error | settled at "
            "(quarter) | max dev of 10-step mean after quarter | per-step std | dropped after 20 | final bias | "
            "eval loss |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for r in rows:
        err = float(r["rel_error"]) * 100
        settle = r["settle_step"] if r["settle_step"] not in (None, "") else "never"
        dropped = r.get("dropped_after_20")
        lines.append(
            f"| {r['run_id']} | {r['null_control']} | {float(r['null_route_frac']):g} | {float(r['lbl_coef']):g} | "
            f"{r['num_experts_per_tok']} | {r['steps']} | {float(r['target_experts']):.3f} | "
            f"{float(r['realized_second_half']):.3f} | {err:+.1f}% | {settle} ({r['quarter']}) | "
            f"{float(r['max_dev_after_quarter']):.3f} | {float(r['step_std_after_quarter']):.3f} | "
            f"{'' if dropped in (None, '') else f'{float(dropped) * 100:.2f}%'} | {r['null_bias_final_layers']} | "
            f"{'' if r['eval_loss'] in (None, '') else format(float(r['eval_loss']), '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def _run_id(config_path: str, control: str, p: float, lbl: float, tag: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0]
    return f"{name}{'-' + tag if tag else ''}-{control}-p{p:g}-lbl{lbl:g}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m experiments.speedrun.null_control_sweep",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--config_path", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--null_control", nargs="+", default=["bias"], choices=["loss", "bias"])
    ap.add_argument("--null_route_frac", nargs="+", type=float, default=[0.5])
    ap.add_argument("--lbl_coef", nargs="+", type=float, default=[0.05])
    ap.add_argument("--tag", default="", help="added to the run ids (e.g. k4)")
    ap.add_argument("--devices", type=int, default=1, help="simulated CPU devices (XLA_FLAGS)")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--keep_checkpoints", action="store_true")
    args = ap.parse_args(argv)
    if not os.path.exists(args.config_path):
        print(f"error: config file not found: {args.config_path}", file=sys.stderr)
        return 2

    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, "results.csv")
    rows = load_results(results)
    done = {r["run_id"] for r in rows}
    for control in args.null_control:
        for lbl in args.lbl_coef:
            for p in args.null_route_frac:
                run_id = _run_id(args.config_path, control, p, lbl, args.tag)
                if run_id in done:
                    print(f"{run_id}: done, skipped", flush=True)
                    continue
                run_dir = os.path.join(args.out_dir, "runs", run_id)
                shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again from scratch
                os.makedirs(os.path.join(run_dir, "wandb"))
                ckpt = os.path.abspath(os.path.join(args.out_dir, "checkpoints"))
                shutil.rmtree(os.path.join(ckpt, run_id), ignore_errors=True)
                cmd = [sys.executable, "-m", "experiments.speedrun.custom_mixtral", "--config_path", args.config_path,
                       "--trainer.id", run_id, "--trainer.checkpointer.base_path", ckpt,
                       "--trainer.tracker.mode", "offline", "--model.null_control", control,
                       "--model.null_route_frac", str(p), "--model.lbl_coef", str(lbl), *extra]
                env = dict(os.environ, WANDB_DIR=os.path.join(run_dir, "wandb"), WANDB_SILENT="true")
                env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
                if args.devices > 1:
                    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
                with open(os.path.join(run_dir, "command.txt"), "w") as f:
                    f.write(" ".join(cmd) + "\n")
                print(f"{run_id}: training", flush=True)
                t0 = time.time()
                with open(os.path.join(run_dir, "train.log"), "w") as log:
                    rc = subprocess.run(cmd, cwd=os.getcwd(), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    print(f"error: {run_id} exited {rc}; see {os.path.join(run_dir, 'train.log')}", file=sys.stderr)
                    return 1
                row = read_run(run_dir, window=args.window, tolerance=args.tolerance)
                row.update(run_id=run_id, config=args.config_path, wall_s=round(time.time() - t0, 1))
                rows.append(row)
                write_rows_atomically(results, rows, FIELDS)
                if not args.keep_checkpoints:
                    shutil.rmtree(os.path.join(ckpt, run_id), ignore_errors=True)
                print(f"{run_id}: realized {row['realized_second_half']:.4f} real experts/token (target "
                      f"{row['target_experts']:.4f}, {row['rel_error'] * 100:+.2f}%), settled at step "
                      f"{row['settle_step']}", flush=True)
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(rows))
    print(summary_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
