"""CPU smoke runs of the GPU check (scripts/gpu): measure.py --tiny and device_check.sh end to end, tiny shapes.

On CPU the Triton kernel runs in Pallas interpret mode and the layer uses the ``tiled`` backend; these runs
check the plumbing (CSV columns, sections, summary), not speed.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEASURE = ROOT / "scripts" / "gpu" / "measure.py"
DEVICE_CHECK = ROOT / "scripts" / "gpu" / "device_check.sh"


def _measure_module():
    spec = importlib.util.spec_from_file_location("gpu_measure", MEASURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_measure_tiny_writes_csv_and_summary(tmp_path):
    cmd = [sys.executable, str(MEASURE), "--tiny", "--backend", "tiled", "--dtypes", "bf16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header, rows = _read_csv(tmp_path / "gpu_results.csv")
    assert header == _measure_module().COLUMNS
    assert [r["section"] for r in rows if r["section"] == "env"] == ["env"]
    assert "jax=" in rows[0]["note"]

    gmm = [r for r in rows if r["section"] == "gmm"]
    got = {(r["backend"], r["pass"], r["real_frac_or_null"]) for r in gmm if r["median_ms"]}
    for pass_name in ("fwd", "fwdbwd"):
        assert ("dense", pass_name, "1.0") in got
        for backend in ("triton", "ragged_dot"):
            for frac in ("1.0", "0.5", "0.1"):
                assert (backend, pass_name, frac) in got
    assert all(float(r["median_ms"]) > 0 and r["ratio"] for r in gmm if r["median_ms"])

    layer = [r for r in rows if r["section"] == "layer"]
    assert len(layer) == 8, layer
    assert {(r["mode"], r["real_frac_or_null"]) for r in layer} == {
        (m, p) for m in ("independent", "take_until_null") for p in ("0.0", "0.1", "0.5", "0.9")
    }
    assert all(float(r["tokens_per_s"]) > 0 and r["backend"] == "tiled" for r in layer)

    summary = (tmp_path / "summary.md").read_text()
    assert "### Goal checks" in summary and "layer tokens/s null 0.9 vs 0.0" in summary
    assert "### Goal checks" in proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_device_check_tiny_end_to_end(tmp_path):
    env = _env()
    env.update(
        PYTHON=sys.executable,
        DEVICE_CHECK_TINY="1",
        MEASURE_ARGS="--dtypes f32 --sections gmm --gmm-backends triton",
        NULL_MOE_SITE=str(tmp_path / "site"),
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(DEVICE_CHECK), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log = (out / "device_check.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    for step in ("=== wheels", "=== versions", "=== accelerator tests", "=== measure", "=== done: status 0"):
        assert step in log
    assert "pytest exit code: 0" in log and "measure exit code: 0" in log
    _, rows = _read_csv(out / "gpu_results.csv")
    assert any(r["backend"] == "triton" and r["dtype"] == "f32" and r["median_ms"] for r in rows)
    assert (out / "summary.md").exists()


def test_summary_goal_checks(tmp_path):
    """The goal checks read the right rows and compare in the right direction."""
    m = _measure_module()
    results = m.Results(tmp_path)
    gmm = {"section": "gmm", "backend": "triton", "dtype": "bf16", "shape": "R=1 K=1 N=1 E=1", "median_ms": 1.0}
    results.add(**gmm, real_frac_or_null=1.0, pass_="fwd", ratio=0.8)
    results.add(**gmm, real_frac_or_null=0.5, pass_="fwdbwd", ratio=0.6)
    results.add(**gmm, real_frac_or_null=0.1, pass_="fwdbwd", ratio=0.1)
    layer = {"section": "layer", "backend": "triton", "shape": "T", "mode": "independent", "pass_": "fwdbwd"}
    results.add(**layer, dtype="bf16", real_frac_or_null=0.9, median_ms=1.0, ratio=4.5)
    results.add(**layer, dtype="f32", real_frac_or_null=0.9, median_ms=1.0, ratio=1.0)
    text = m.summary(results)
    results.close()
    checks = [line for line in text.splitlines() if line.startswith(("| triton", "| layer tokens"))]
    assert len(checks) == 4  # the f32 layer row is not a goal
    assert "0.7 of dense speed" in checks[0] and checks[0].endswith("| yes |")
    assert "50% real" in checks[1] and checks[1].endswith("| NO |")
    assert "10% real" in checks[2] and checks[2].endswith("| yes |")
    assert checks[3].endswith("| yes |")
