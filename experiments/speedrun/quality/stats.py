"""The study's statistics, from the rows of results.csv: per arm mean +- std over seeds, each null arm's paired
(same seed) difference against its matched-expected-compute baseline with a verdict, the same at realized
compute (p = 0 arms interpolated in log2 k), and the share of the k_low -> k_high bracket gap each arm recovers."""

from __future__ import annotations

import math
import statistics
from typing import Optional

from experiments.speedrun.quality.config import QualityConfig

__all__ = ["interp_dense", "mean_std", "summarize", "value_of", "verdict"]


def value_of(row: dict, key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std, len(values)


def verdict(mean: float, std: float, n: int) -> str:
    """win: mean < 0 by more than 2 std; loss: mean > 0 by more than 2 std; else tie (and n < 2: undecided)."""
    if n < 2 or math.isnan(std):
        return "undecided (fewer than 2 seeds)"
    if mean + 2 * std < 0:
        return "win"
    if mean - 2 * std > 0:
        return "loss"
    return "tie"


def interp_dense(dense: list[tuple[float, float]], x: float) -> Optional[float]:
    """Loss of the p = 0 arms (k, loss), linearly interpolated in log2(k) at x experts per token (None outside)."""
    dense = sorted(dense)
    for (k0, l0), (k1, l1) in zip(dense, dense[1:]):
        if k0 <= x <= k1 and k1 > k0:
            t = (math.log2(x) - math.log2(k0)) / (math.log2(k1) - math.log2(k0))
            return l0 + t * (l1 - l0)
    if dense and abs(x - dense[0][0]) < 1e-9:
        return dense[0][1]
    return None


def summarize(cfg: QualityConfig, rows: list[dict]) -> dict:
    """The numbers of summary.md, as a dict (per arm, paired comparisons, brackets)."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
    arms = {}
    for a in cfg.arms:
        seeds = by_arm.get(a.name, {})
        loss = mean_std([value_of(r, "eval_loss") for r in seeds.values()])
        realized = mean_std([value_of(r, "realized_experts_per_token") for r in seeds.values()])
        expected = cfg.expected_real(a)
        arms[a.name] = {
            "k": a.num_experts_per_tok, "p": float(a.null_route_frac), "expected": expected,
            "eval_loss": loss, "realized": realized,
            "realized_final": mean_std([value_of(r, "realized_experts_per_token_final") for r in seeds.values()]),
            "all_null": mean_std([value_of(r, "all_null_frac") for r in seeds.values()]),
            "load_violation": mean_std([value_of(r, "load_violation_max_final") for r in seeds.values()]),
            "train_tokens": sorted({r["train_tokens"] for r in seeds.values()}),
            "wall_s": mean_std([value_of(r, "wall_s") for r in seeds.values()]),
            "seeds": sorted(seeds),
            "off_target": (not math.isnan(realized[0]) and a.is_null
                           and abs(realized[0] - expected) / expected > cfg.realized_tolerance),
            "overrides": a.model,
        }
    # paired comparisons against the matched-expected-compute baseline
    dense_names = [a.name for a in cfg.arms if not a.is_null and not a.model]
    paired = {}
    for a in cfg.arms:
        base = cfg.baseline_of(a)
        if base is None:
            continue
        common = sorted(set(by_arm.get(a.name, {})) & set(by_arm.get(base, {})))
        diffs = [value_of(by_arm[a.name][s], "eval_loss") - value_of(by_arm[base][s], "eval_loss") for s in common]
        m, sd, n = mean_std(diffs)
        entry = {"baseline": base, "diffs": diffs, "seeds": common, "mean": m, "std": sd, "n": n,
                 "verdict": verdict(m, sd, n)}
        # at realized compute: the p = 0 arms of the same seed, interpolated in log2(k) at the realized value
        rdiffs = []
        for s in sorted(by_arm.get(a.name, {})):
            dense = [(float(cfg.arm(d).num_experts_per_tok), value_of(by_arm[d][s], "eval_loss"))
                     for d in dense_names if s in by_arm.get(d, {})]
            ref = interp_dense(dense, value_of(by_arm[a.name][s], "realized_experts_per_token"))
            if ref is not None:
                rdiffs.append(value_of(by_arm[a.name][s], "eval_loss") - ref)
        rm, rsd, rn = mean_std(rdiffs)
        # no p = 0 arms bracketing the realized compute: nothing to compare with (not a seed shortfall)
        rv = verdict(rm, rsd, rn) if len(dense_names) >= 2 else "- (no p = 0 arms to interpolate)"
        entry["realized"] = {"diffs": rdiffs, "mean": rm, "std": rsd, "n": rn, "verdict": rv}
        paired[a.name] = entry
    brackets = None
    pair = cfg.bracket_arms()
    if pair is not None:
        lo, hi = pair
        common = sorted(set(by_arm.get(lo, {})) & set(by_arm.get(hi, {})))
        gaps = [value_of(by_arm[lo][s], "eval_loss") - value_of(by_arm[hi][s], "eval_loss") for s in common]
        gm, gsd, gn = mean_std(gaps)
        shares = {}
        for a in cfg.arms:
            per_seed = []
            for s in common:
                if s in by_arm.get(a.name, {}):
                    g = value_of(by_arm[lo][s], "eval_loss") - value_of(by_arm[hi][s], "eval_loss")
                    if g != 0:
                        per_seed.append((value_of(by_arm[lo][s], "eval_loss") - value_of(by_arm[a.name][s], "eval_loss")) / g)
            lo_m, hi_m, a_m = arms[lo]["eval_loss"][0], arms[hi]["eval_loss"][0], arms[a.name]["eval_loss"][0]
            of_means = (lo_m - a_m) / (lo_m - hi_m) if (lo_m - hi_m) not in (0,) and not math.isnan(lo_m - hi_m) \
                else float("nan")
            shares[a.name] = {"of_means": of_means, "paired": mean_std(per_seed)}
        seed_stds = [v["eval_loss"][1] for v in arms.values() if not math.isnan(v["eval_loss"][1])]
        brackets = {"low": lo, "high": hi, "gap": (gm, gsd, gn), "shares": shares,
                    "max_seed_std": max(seed_stds) if seed_stds else float("nan")}
    fingerprints: dict[int, set] = {}
    tokens = set()
    for r in rows:
        fingerprints.setdefault(int(r["seed"]), set()).add(r.get("data_fingerprint"))
        tokens.add(r.get("train_tokens"))
    return {"arms": arms, "paired": paired, "brackets": brackets,
            "same_data_order": all(len(v) == 1 for v in fingerprints.values()),
            "same_train_tokens": len(tokens) <= 1, "train_tokens": sorted(tokens), "n_rows": len(rows)}
