"""Training on a newer JAX, simulated on the pinned one: the workarounds of ``levanter_pin_workarounds`` (item 5)
and ``null_moe.jax_compat`` make Levanter's train_lm run where JAX changed under the pinned Levanter/Haliax.

The child process changes the pinned JAX the way JAX 0.8-0.11 did before anything imports it:
``jax.core.is_constant_dim`` and ``jnp.fix`` deleted, ``jnp.mean`` refusing a non-boolean ``where``, and
``jax.make_mesh`` defaulting to Explicit axes; then it runs the training CLI in-process for a few steps with an
eval. (The same runs were checked against a real jax 0.11.2 CPU install; see docs/TRAINING.md.) A control run with
the training workarounds switched off must fail, so the simulation is known to bite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_training import ROOT, _write_config, tiny_corpus  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    del jax.core.is_constant_dim
    del jnp.fix
    _mean = jnp.mean
    def mean(a, axis=None, dtype=None, out=None, keepdims=False, *, where=None, **kw):
        if where is not None and jnp.asarray(getattr(where, "array", where)).dtype != jnp.bool_:
            raise ValueError("jnp.mean: where must be None or a boolean array (simulated newer JAX)")
        return _mean(a, axis=axis, dtype=dtype, out=out, keepdims=keepdims, where=where, **kw)
    jnp.mean = mean
    _make_mesh = jax.make_mesh
    def make_mesh(shape, names, *, devices=None, axis_types=None):
        if axis_types is None:
            axis_types = (jax.sharding.AxisType.Explicit,) * len(shape)
        return _make_mesh(shape, names, devices=devices, axis_types=axis_types)
    jax.make_mesh = make_mesh

    from experiments.speedrun import levanter_pin_workarounds as pin, train
    if sys.argv[1] == "off":
        pin.apply_newer_jax_workarounds = lambda: []
    rc = train.main(sys.argv[2:])
    # jax 0.7.2 does not itself refuse the mixed meshes that 0.11 refuses, so check the loader's mesh directly
    import levanter.data.loader
    with levanter.data.loader.local_cpu_mesh() as mesh:
        print("loader mesh axis types:", sorted({str(t) for t in mesh.axis_types}))
    sys.exit(rc)
    """
)


def _child(workdir, mode, config):
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="offline", WANDB_DIR=workdir,
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "src")]))
    env.pop("XLA_FLAGS", None)
    args = ["--config_path", config, "--trainer.id", f"newer-jax-{mode}", "--trainer.num_train_steps", "3",
            "--optimizer.warmup", "0.3", "--trainer.steps_per_eval", "2", "--trainer.max_eval_batches", "1"]
    return subprocess.run([sys.executable, "-c", CHILD, mode, *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_training_runs_on_simulated_newer_jax(tmp_path, tiny_corpus):  # noqa: F811
    config = _write_config(str(tmp_path), tiny_corpus, watch=False)
    on = _child(str(tmp_path), "on", config)
    assert on.returncode == 0, on.stdout[-3000:] + on.stderr[-5000:]
    said = [line for line in on.stdout.splitlines() if "Levanter workarounds applied" in line]
    assert len(said) == 1, on.stdout[-3000:]
    assert "boolean where" in said[0] and "Auto mesh" in said[0]
    steps = [line for line in on.stdout.splitlines() if line.startswith("step 3/3  loss")]
    assert steps, on.stdout[-3000:]
    assert "eval_loss" in on.stdout
    assert "loader mesh axis types: ['AxisType.Auto']" in on.stdout

    off = _child(str(tmp_path), "off", config)
    assert off.returncode != 0
    assert "where must be None or a boolean array" in off.stderr or "should match the aval mesh" in off.stderr, (
        off.stderr[-3000:]
    )
