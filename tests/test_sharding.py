"""The layer under a mesh: 8 simulated CPU devices, tokens over data, weights fsdp over data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "take_until_null,num_null",
    [(0, "auto"), (1, "1")],  # N = 4, k = 2, p = 0.5: auto gives M = 4 >= k; M = 1 < k is where the flag acts
)
def test_sharded_equals_single_device(take_until_null, num_null):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_layer_check.py"), str(take_until_null), num_null],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, diff in result["diffs"].items():
        assert diff <= 1e-5, (name, diff)
    assert 0 < result["null_frac"] < 1, result
    if take_until_null:
        # M < k: the flag really changes the routing being compared (with M >= k it would change nothing)
        assert result["num_null"] < 2 and result["flag_changes"] > 0, result
    # each device sorts its own 1/8 of the slots: every sort in the compiled step (any type, rank or operand
    # count) has at most that many elements, and the router's top-k sees only the device's own 1/8 of the tokens
    assert result["sort_sizes"] and result["topk_rows"], result
    assert max(result["sort_sizes"]) <= result["global_slots"] // 8, result
    assert max(result["topk_rows"]) <= result["tokens"] // 8, result
