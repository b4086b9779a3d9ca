"""The fast test tier: `scripts/run_tests.sh --fast` hands pytest `-m fast`, and the tests marked `fast` cover what
the tier promises (the layer against its reference with gradients, routing, dispatch, the tiled and Triton grouped
matmuls, config errors, one training run through the CLI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.fast


def test_run_tests_sh_turns_fast_into_a_marker_selection(tmp_path):
    """run_tests.sh in a copy whose .venv python only prints its arguments (ensure_venv.sh sees an installed,
    up-to-date .venv and installs nothing)."""
    (tmp_path / "scripts").mkdir()
    for name in ("run_tests.sh", "ensure_venv.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), tmp_path / "scripts" / name)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
    (venv / "bin" / "python").chmod(0o755)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), venv / ".null_moe_installed")

    def args(*extra):
        proc = subprocess.run(["bash", str(tmp_path / "scripts" / "run_tests.sh"), *extra], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG ")]

    fast = args("--fast", "tests/test_gmm.py", "-x")
    assert fast[:2] == ["-m", "pytest"] and "--fast" not in fast
    assert fast[-4:] == ["-m", "fast", "tests/test_gmm.py", "-x"]
    everything = args()
    assert "fast" not in everything and everything[:2] == ["-m", "pytest"]


def test_the_fast_tier_covers_what_it_promises():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                           "fast", "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for needed in (
        "tests/test_layers.py::test_layer_matches_dense_reference",  # outputs and gradients vs the dense reference
        "tests/test_routing.py::test_learned_routing_matches_loop",
        "tests/test_dispatch.py::test_custom_vjps_match_autodiff_of_plain_gathers",
        "tests/test_gmm.py::test_tiled_matches_reference",
        "tests/test_triton_gmm.py::test_matches_reference_f32",
        "tests/test_triton_fused.py::test_raw_op_matches_per_slot_reference",  # the fused GPU path, interpret mode
        "tests/test_jax_compat.py::test_removed_apis_are_restored_once_and_the_layer_runs",  # the GPU machines' JAX
        "tests/test_config.py::",
        "tests/test_custom_mixtral.py::test_cli_config_errors_are_one_line_with_exit_code_2",
        "tests/test_preflight.py::test_schedule_errors_name_the_field",
        "tests/test_preflight.py::test_four_step_tiny_run_exits_0",  # the one training run
    ):
        assert any(i.startswith(needed) for i in ids), needed
    # the long end-to-end runs stay out of the tier
    assert not any(i.startswith(("tests/test_training.py", "tests/test_training_ep.py", "tests/test_bench_ep.py"))
                   for i in ids)
