"""null_moe.host_malloc: mode detection and the re-exec that applies the allocator tunables."""

import os
import subprocess
import sys

import pytest

from null_moe import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_current_mode_reads_every_tunable(monkeypatch):
    for k in host_malloc.RESIDENT_ENV:
        monkeypatch.delenv(k, raising=False)
    assert host_malloc.current_mode() == "default"
    for k, v in host_malloc.RESIDENT_ENV.items():
        monkeypatch.setenv(k, v)
    assert host_malloc.current_mode() == "resident"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # one tunable off: not resident
    assert host_malloc.current_mode() == "default"


def test_auto_is_resident_only_for_a_cpu_jax(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.resolve("auto") == "resident"
    for platforms in ("tpu", "cuda", "cuda,cpu"):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_malloc.resolve("auto") == "default"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(host_malloc.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert host_malloc.resolve("auto") == "default"  # a TPU runtime is installed: JAX may use it
    monkeypatch.setattr(host_malloc.importlib.util, "find_spec", lambda name: None)
    assert host_malloc.resolve("auto") == "resident"
    assert host_malloc.resolve("default") == "default" and host_malloc.resolve("resident") == "resident"


def test_reexec_rejects_unknown_mode_and_skips_default(monkeypatch):
    with pytest.raises(ValueError, match="host_malloc"):
        host_malloc.reexec_if_needed("tcmalloc")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
    host_malloc.reexec_if_needed("default")
    for k, v in host_malloc.RESIDENT_ENV.items():
        monkeypatch.setenv(k, v)
    host_malloc.reexec_if_needed("resident")  # already resident: nothing to do


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_reexec_sets_tunables_before_the_program_runs():
    prog = (
        "import sys; from null_moe import host_malloc as h; "
        "h.reexec_if_needed(sys.argv[1]); print('MODE', h.current_mode(), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in host_malloc.RESIDENT_ENV}
    env["JAX_PLATFORMS"] = "cpu"
    for mode, expect in (("resident", "resident"), ("default", "default"), ("auto", "resident")):
        out = subprocess.run([sys.executable, "-c", prog, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        # arguments survive the re-exec unchanged
        assert out.stdout.strip() == f"MODE {expect} [{mode!r}]", out.stdout


@pytest.mark.parametrize("script", ["compare_fused", "probe_cpu"])
def test_timing_scripts_parse_their_command_line(script):
    out = subprocess.run([sys.executable, "-m", f"scripts.bench.{script}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--rounds" in out.stdout and "--host_malloc" in out.stdout
