"""The layer under a mesh: 8 simulated CPU devices, tokens over data, weights fsdp over data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("take_until_null", [0, 1])
def test_sharded_equals_single_device(take_until_null):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_layer_check.py"), str(take_until_null)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, diff in result["diffs"].items():
        assert diff <= 1e-5, (name, diff)
    # each device sorts its own 1/8 of the slots: no sort over every token anywhere
    assert result["sort_sizes"], result
    assert max(result["sort_sizes"]) <= result["global_slots"] // 8, result
