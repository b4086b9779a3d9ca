"""The null-fraction sweep's measures (experiments/speedrun/null_control_sweep.py) on hand-made series."""

from __future__ import annotations

import pytest

from experiments.speedrun.null_control_sweep import control_metrics, main, summary_markdown, trailing_mean


def test_trailing_mean():
    assert trailing_mean([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert trailing_mean([4.0], 10) == [4.0]


def test_control_metrics_on_a_series_that_settles():
    """k = 2, p = 0.5, 40 steps: 0.2 for 8 steps, then 0.5 exactly, except one spike at step 30 that the 4-step mean
    keeps within 0.03 (0.6 / 4 = 0.025 above p) and experts per token 2 (1 - null fraction)."""
    frac = [0.2] * 8 + [0.5] * 32
    frac[30] = 0.6
    experts = [2 * (1 - f) for f in frac]
    m = control_metrics(frac, experts, k=2, p=0.5, window=4, tolerance=0.03)
    assert m["steps"] == 40 and m["quarter"] == 10 and m["target_experts"] == 1.0
    # the trailing 4-step mean is 0.2, 0.2, ..., (0.2 * 3 + 0.5) / 4 at step 8, ..., 0.5 from step 11 on
    assert m["settle_step"] == 11
    assert m["max_dev_after_quarter"] == pytest.approx(max(0.025, abs((0.2 + 3 * 0.5) / 4 - 0.5)))
    second = experts[20:]
    assert m["realized_second_half"] == pytest.approx(sum(second) / 20)
    assert m["rel_error"] == pytest.approx(sum(second) / 20 - 1.0)  # below target: negative
    assert m["rel_error"] < 0
    assert m["null_frac_second_half"] == pytest.approx(sum(frac[20:]) / 20)


def test_control_metrics_never_settles_and_summary_renders():
    frac = [0.3] * 20
    m = control_metrics(frac, [1.4] * 20, k=2, p=0.5)
    assert m["settle_step"] is None and m["rel_error"] == pytest.approx(0.4)
    assert m["step_std_after_quarter"] == pytest.approx(0.0)
    row = {**m, "run_id": "r", "null_control": "loss", "null_route_frac": 0.5, "lbl_coef": 0.01,
           "num_experts_per_tok": 2, "dropped_after_20": None, "null_bias_final_layers": "", "eval_loss": 4.5}
    table = summary_markdown([row])
    assert "| r | loss | 0.5 | 0.01 | 2 | 20 | 1.000 | 1.400 | +40.0% | never (5) |" in table
    with pytest.raises(ValueError, match="one null_frac"):
        control_metrics([0.5], [], k=2, p=0.5)


def test_missing_config_is_exit_2(tmp_path, capsys):
    assert main(["--config_path", str(tmp_path / "nope.yaml"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err
