"""The GPU check (scripts/gpu) on CPU: device_check.sh end to end at tiny shapes (every section: versions, the
accelerator tests, the JAX timings with the Triton kernels in Pallas interpret mode, the PyTorch peers, a training
run and the bench CLI, then the summary), the summary's goal checks on made-up rows, and quality_check.sh end to end
in its CPU mode (the GPU quality study at tiny shapes).

These runs check the plumbing (files, columns, sections, statuses), not speed.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from scripts.gpu import results as R
from scripts.gpu import summary as S

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE_CHECK = ROOT / "scripts" / "gpu" / "device_check.sh"

pytestmark = pytest.mark.slow


def _read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_device_check_tiny_runs_every_section(tmp_path):
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        DEVICE_CHECK_TINY="1",
        NULL_MOE_SITE=str(tmp_path / "site"),
        JAX_PLATFORMS="cpu",
        # one expert path and one grouped matmul keep the CPU run short; the GPU run times them all
        MEASURE_ARGS="--layer-paths triton --gmm-backends triton",
    )
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(DEVICE_CHECK), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    log = (out / "device_check.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    for section in ("environment", "versions", "tests", "measure", "torch", "train", "bench"):
        assert f"--- {section}: ok" in log, (section, log[-4000:])
    assert "=== done: status 0" in log
    # OUT stays flat and small: what comes back from a device machine is at most 8 files, 2 folders down
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files
    assert {"device_check.log", "gpu_results.csv", "summary.md", "train.log", "bench_results.csv"} <= set(files)

    header, rows = _read_csv(out / R.CSV_NAME)
    assert header == R.COLUMNS
    assert [r["section"] for r in rows if r["section"] == "env"] == ["env"]
    layer = [r for r in rows if r["section"] == "layer" and r["median_ms"]]
    assert {(r["mode"], r["real_frac_or_null"]) for r in layer} == {
        (m, p) for m in ("independent", "take_until_null") for p in ("0.0", "0.5", "0.9", "1.0")
    }
    assert all(r["backend"] == "triton" and "expert_path=fused" in r["note"] and "calls" in r["timing"] for r in layer)
    gmm = {(r["backend"], r["pass"], r["real_frac_or_null"]) for r in rows if r["section"] == "gmm" and r["median_ms"]}
    assert ("dense", "fwd", "1.0") in gmm and ("triton", "fwd", "1.0") in gmm
    assert {("triton", "fwdbwd", f) for f in ("1.0", "0.5", "0.1")} <= gmm
    # without CUDA the PyTorch peers record a skip, not a failure
    assert any(r["section"] == "torch_layer" and r["note"].startswith("skipped") for r in rows)

    train = (out / "train.log").read_text()
    assert "step 4/4  loss" in train or "step 4/4" in train, train[-2000:]
    _, bench = _read_csv(out / "bench_results.csv")
    assert {r["null_target"] for r in bench} == {"0.0", "0.5", "0.9"} and all(float(r["tokens_per_s"]) > 0 for r in bench)

    summary = (out / "summary.md").read_text()
    for heading in ("## Goal checks", "## The layer", "## The grouped matmul", "## Training", "## Bench"):
        assert heading in summary
    assert "| train | ok" in summary and "Steps: 4" in summary


def test_summary_goal_checks_read_the_right_rows(tmp_path):
    """The goal checks compare the right rows in the right direction (made-up figures)."""
    res = R.Results(tmp_path)
    layer = dict(section="layer", backend="triton", dtype="bf16", pass_="fwdbwd", mode="independent")
    for p, ms in ((0.0, 20.0), (0.5, 10.0), (0.9, 2.5), (1.0, 0.9)):
        res.add(**layer, real_frac_or_null=p, median_ms=ms)
    res.add(**{**layer, "mode": "take_until_null"}, real_frac_or_null=0.0, median_ms=20.0)
    res.add(**{**layer, "mode": "take_until_null"}, real_frac_or_null=1.0, median_ms=1.5)  # 7.5%: not met
    for p, ms in ((0.0, 30.0), (0.5, 11.0), (0.9, 3.5)):
        res.add(section="torch_layer", backend="torch_layer", mode="independent", real_frac_or_null=p, median_ms=ms,
                pass_="fwdbwd")
    res.add(section="gmm", backend="triton", dtype="bf16", real_frac_or_null=1.0, pass_="fwd", median_ms=2.0, ratio=0.9)
    res.add(section="gmm", backend="triton", dtype="bf16", real_frac_or_null=0.1, pass_="fwdbwd", median_ms=1.2)
    res.add(section="torch_gmm", backend="torch_grouped_mm", real_frac_or_null=0.1, pass_="fwdbwd", median_ms=1.0)
    res.close()
    checks = {c: (v, ok) for c, v, _, ok in S.goal_checks(R.read(tmp_path))}
    assert checks["layer, every slot null: time / null-0 time (independent)"] == ("0.045", True)
    assert checks["layer, every slot null: time / null-0 time (take_until_null)"][1] is False
    assert checks["layer tokens/s, null 0.9 vs 0 (independent)"] == ("8.00x", True)
    assert checks["layer tokens/s, null 0.5 vs 0 (independent)"] == ("2.00x", True)
    assert checks["layer tokens/s vs the PyTorch layer, null 0.0 (independent)"] == ("1.50x", True)
    assert checks["layer tokens/s vs the PyTorch layer, null 0.5 (independent)"] == ("1.10x", False)
    assert checks["layer tokens/s vs the PyTorch layer, null 0.9 (independent)"] == ("1.40x", True)
    assert checks["grouped matmul triton forward, 100% real: of dense speed"] == ("0.90", True)
    assert checks["grouped matmul triton fwd+bwd at 10% real: ms vs torch._grouped_mm"] == ("1.200 vs 1.000", False)
    text = S.summary(tmp_path, [("measure", "ok (1 s)")])
    assert "| measure | ok (1 s) |" in text and "| triton | 20.000 | 10.000 | 2.500 | 0.900 | 2.00x | 8.00x |" in text


def test_results_reject_unknown_columns(tmp_path):
    res = R.Results(tmp_path)
    with pytest.raises(ValueError, match="unknown result columns"):
        res.add(section="layer", speed=1.0)
    res.close()


def test_torch_peers_that_cannot_run_fail_the_gpu_run_not_the_tiny_one(tmp_path, monkeypatch):
    """Without torch (or CUDA) the PyTorch peers cannot run: the tiny CPU run records the skip and exits 0, the GPU
    run records it and exits 1, so device_check reports the section FAILED instead of 'ok'."""
    import builtins

    from scripts.gpu import torch_peers

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    for tiny, want in ((True, 0), (False, 1)):
        out = tmp_path / ("tiny" if tiny else "gpu")
        assert torch_peers.main(["--out", str(out), *(["--tiny"] if tiny else [])]) == want
        rows = R.read(out)
        assert [r["note"].startswith("skipped: torch not importable") for r in rows if r["section"] == "torch_layer"] \
            == [True]


def test_inputs_null_law_is_the_layers():
    """scripts/gpu/inputs.py keeps a numpy copy of the per-slot null law so the PyTorch process never imports JAX;
    the copy must stay the layer's (null_moe.routing.slot_null_prob) for every mode and k, or the two frameworks
    would be timed on different null fractions."""
    from null_moe import routing
    from scripts.gpu import inputs

    for mode in ("independent", "take_until_null"):
        for k in (1, 2, 4, 8):
            for p in (0.0, 0.1, 0.5, 0.9, 0.99):
                assert inputs.slot_null_prob(p, k, mode) == routing.slot_null_prob(p, k, mode), (mode, k, p)
    assert inputs.slot_null_prob(1.0, 8, "independent") == 1.0  # the GPU check's every-slot-null point


QUALITY_CHECK = ROOT / "scripts" / "gpu" / "quality_check.sh"


def test_gpu_study_config_runs_the_issue_arms_in_order():
    """configs/quality/gpu_study.yaml: the arms k2, k4-p0.5 and the brackets k1, k4, in that order of importance,
    arm by arm (every seed of an arm before the next), 2 seeds, 4 runs at a time."""
    from experiments.speedrun.quality.config import parse_config

    cfg = parse_config(["--config_path", "configs/quality/gpu_study.yaml"])
    assert [(a.name, a.num_experts_per_tok, a.null_route_frac) for a in cfg.arms] == [
        ("k2", 2, 0.0), ("k4-p0.5", 4, 0.5), ("k1", 1, 0.0), ("k4", 4, 0.0)]
    assert cfg.seeds == [0, 1] and cfg.order == "arm" and cfg.parallel_runs == 4
    assert list(cfg.brackets) == ["k1", "k4"]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_quality_check_tiny_end_to_end(tmp_path):
    """scripts/gpu/quality_check.sh in its CPU mode: the GPU study's arms and parallel runs at tiny shapes, 2 steps
    per run, one seed (QUALITY_CHECK_ARGS, which the GPU command takes too; the config's seeds and order are
    checked above). OUT is flat and holds the six files; every run finished (a generous budget here: the 2-core
    test machine is shared)."""
    import tarfile

    env = dict(os.environ)
    env.update(PYTHON=sys.executable, QUALITY_CHECK_TINY="1", QUALITY_CHECK_BUDGET_S="1500",
               QUALITY_CHECK_WORK=str(tmp_path / "work"), NULL_MOE_SITE=str(tmp_path / "site"), JAX_PLATFORMS="cpu",
               QUALITY_CHECK_ARGS="--seeds [0]")
    for key in ("XLA_FLAGS", "WANDB_DIR", "WANDB_MODE"):
        env.pop(key, None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(QUALITY_CHECK), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    log = (out / "quality_check.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_loss_vs_experts.png", "eval_loss_vs_step.png", "quality_check.log", "results.csv", "runs.tar.gz",
        "summary.md"]
    for step in ("=== environment", "=== versions", "=== tiny mode", "=== study (budget", "=== outputs",
                 "=== done: status 0"):
        assert step in log, step
    assert "4 to run (2 steps each, 2 at a time)" in log and "study exit code: 0" in log
    _, rows = _read_csv(out / "results.csv")
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, "0") for a in ("k2", "k4-p0.5", "k1", "k4"))
    assert {r["train_tokens"] for r in rows} == {str(2 * 8 * 64)}
    summary = (out / "summary.md").read_text()
    assert "# Quality study `gpu_study`" in summary and "4 of 4 runs done" in summary
    assert "| k4-p0.5 | k2 |" in summary and "## Share of the bracket gap (k1 -> k4)" in summary
    assert "no seed noise to compare it with (one seed)" in summary and "nan" not in summary
    assert "Cut" not in summary
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("/train.log") for n in names) == 4 and sum(n.endswith("/metrics.json") for n in names) == 4
