"""JAX APIs that the pinned Haliax (1.4.dev453) calls and newer JAX removed, restored where they are missing.

The core runs on the pinned CPU stack (jax 0.7.2) and on the GPU machines' jax 0.11.x. Haliax 1.4.dev453 calls
two JAX functions that JAX 0.11 removed:

- ``jax.core.is_constant_dim`` (deprecated in 0.10, removed in 0.11): every ``hax.einsum`` / ``hax.dot`` calls it,
  so without it the layer fails at its first router matmul. JAX still defines it as
  ``jax._src.core.is_constant_dim`` (its own einsum uses that).
- ``jax.numpy.fix`` (``hax.fix``): the same function as ``jax.numpy.trunc`` (rounds toward zero).

:func:`apply` puts each one back only where the public name is missing and the replacement exists, and logs one
line (logger ``null_moe``) the first time it changes anything. ``null_moe/__init__`` calls it on import, before
any Haliax op can run. Delete an entry once Haliax no longer calls the removed name.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp

logger = logging.getLogger("null_moe")

_MISSING = object()


def _private_is_constant_dim() -> Optional[Callable]:
    try:
        from jax._src import core as _core
    except ImportError:  # pragma: no cover - jax without the private module
        return None
    return getattr(_core, "is_constant_dim", None)


def _has(module, name: str) -> bool:
    # A removed name raises AttributeError through JAX's deprecation __getattr__; a deprecated one still resolves
    # (with a warning), and then nothing needs restoring.
    try:
        return getattr(module, name, _MISSING) is not _MISSING
    except Exception:  # noqa: BLE001 - a deprecation hook that raises something else: treat as missing
        return False


#: (module, public name, where the replacement comes from, the replacement) for every restored API.
def _patches():
    return (
        (jax.core, "is_constant_dim", "jax._src.core.is_constant_dim", _private_is_constant_dim),
        (jnp, "fix", "jax.numpy.trunc", lambda: getattr(jnp, "trunc", None)),
    )


def missing_apis() -> list[str]:
    """Dotted names of the APIs this module restores that the running JAX lacks (after :func:`apply`: none)."""
    return [f"{module.__name__}.{name}" for module, name, _, _ in _patches() if not _has(module, name)]


def apply() -> list[str]:
    """Restores every missing API that has a replacement; returns what it restored (empty on the pinned jax).

    Idempotent: a second call finds nothing missing and logs nothing.
    """
    restored = []
    for module, name, source, replacement in _patches():
        if _has(module, name):
            continue
        fn = replacement()
        if fn is None:
            logger.warning("null_moe: %s.%s is missing and %s is not available either", module.__name__, name, source)
            continue
        setattr(module, name, fn)
        restored.append(f"{module.__name__}.{name} (from {source})")
    if restored:
        logger.warning(
            "null_moe: jax %s lacks APIs that haliax calls; restored %s", jax.__version__, ", ".join(restored)
        )
    return restored
