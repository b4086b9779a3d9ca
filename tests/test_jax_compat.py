"""The core on a newer JAX: APIs that JAX 0.11 removed and haliax 1.4.dev453 still calls are restored by
null_moe.jax_compat, only where missing, with one log line.

The newer JAX is simulated on the pinned one by deleting the public names before null_moe is imported (in a
child process, so this test's own JAX stays intact).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(name)s %(message)s")
    import jax, jax.numpy as jnp
    REMOVE = sys.argv[1] == "remove"
    if REMOVE:
        del jax.core.is_constant_dim   # removed in JAX 0.11 (haliax's einsum calls it)
        del jnp.fix                    # removed in newer JAX (hax.fix calls it)
        assert getattr(jax.core, "is_constant_dim", None) is None and getattr(jnp, "fix", None) is None
    import haliax as hax
    from null_moe import NullMoEConfig, NullRoutedMoE, jax_compat
    assert jax_compat.missing_apis() == [], jax_compat.missing_apis()
    assert jax_compat.apply() == []    # idempotent: nothing left to restore, nothing logged again
    cfg = NullMoEConfig(hidden_dim=16, intermediate_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5)
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    x = hax.random.normal(jax.random.PRNGKey(1), (hax.Axis("batch", 2), hax.Axis("position", 8), cfg.Embed))
    y, extras = layer(x)                                      # the router's hax einsum needs is_constant_dim
    g = jax.grad(lambda l: hax.sum(l(x)[0] ** 2).scalar())(layer)
    assert bool(jnp.all(jnp.isfinite(y.array)))
    assert jnp.array_equal(hax.fix(hax.named(jnp.array([-1.5, 2.5]), "a")).array, jnp.array([-1.0, 2.0]))
    print("OK", float(jnp.sum(y.array)))
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.fast
def test_removed_apis_are_restored_once_and_the_layer_runs():
    removed = _run("remove")
    assert removed.returncode == 0, removed.stdout[-2000:] + removed.stderr[-3000:]
    restored = [line for line in removed.stdout.splitlines() if line.startswith("LOG null_moe")]
    assert len(restored) == 1, removed.stdout  # said once, however often apply() runs
    assert "jax.core.is_constant_dim" in restored[0] and "jax.numpy.fix" in restored[0]

    intact = _run("keep")  # the pinned JAX has both: nothing is patched, nothing is said
    assert intact.returncode == 0, intact.stderr[-3000:]
    assert not [line for line in intact.stdout.splitlines() if line.startswith("LOG null_moe")]
    # Same numbers either way: the restored functions are JAX's own.
    assert removed.stdout.split("OK")[-1] == intact.stdout.split("OK")[-1]
