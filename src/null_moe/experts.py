"""The routed experts: dispatch -> per-expert gated MLP -> combine, for flat tokens on one device.

This module composes the pure stages; it holds no kernel and no routing. ``gmm.py`` provides the grouped
matmul backends, ``dispatch.py`` the row movements, ``tiled.py`` the fused CPU kernel and ``triton_fused.py`` the
fused GPU kernels. :func:`expert_path` is the one place that says whether the fused path runs. Raw arrays
throughout.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from .dispatch import Dispatch, combine_rows, dispatch_rows, make_dispatch
from .gmm import grouped_matmul, resolve_backend
from .tiled import DEFAULT_TILE_ROWS, tiled_expert_mlp
from .triton_fused import triton_expert_mlp

#: Backends with a fused expert path: gather, the three projections and the weighted combine in their own kernels.
FUSED_BACKENDS = ("tiled", "triton")


def expert_path(backend: str, fused: bool) -> str:
    """"fused" when ``backend`` (a resolved gmm backend) runs the fused expert kernels for ``fused=True``, else
    "unfused" (dispatch -> three grouped matmuls -> combine)."""
    return "fused" if fused and backend in FUSED_BACKENDS else "unfused"


def gated_mlp_rows(
    xs: jax.Array,
    group_sizes: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    backend: str,
    tile_rows: Optional[int] = None,
) -> jax.Array:
    """act(xs w1[e]) * (xs w3[e]) @ w2[e] on expert-sorted rows [R, D] -> [R, D]; zeros past sum(group_sizes)."""
    a = grouped_matmul(xs, w1, group_sizes, backend=backend, tile_rows=tile_rows)
    b = grouped_matmul(xs, w3, group_sizes, backend=backend, tile_rows=tile_rows)
    return grouped_matmul(act(a) * b, w2, group_sizes, backend=backend, tile_rows=tile_rows)


def expert_mlp(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    backend: str = "auto",
    tile_rows: Optional[int] = None,
    fused: bool = True,
) -> jax.Array:
    """Routed gated-expert output for flat tokens: sum_j weights[t, j] * expert_{ids[t, j]}(x_t).

    Args:
        x: [T, D] tokens.
        expert_ids: [T, k] int, real expert id or N (= w1.shape[0]) for a null slot.
        weights: [T, k] gate weights (0 on null slots).
        w1, w3: [E, D, F]; w2: [E, F, D]; act: the gate activation.
        backend: grouped-matmul backend, resolved by :func:`null_moe.gmm.resolve_backend`.
        fused: on ``tiled`` and ``triton``, run gather, the three projections and the weighted combine in the
            backend's fused kernels (:func:`null_moe.tiled.tiled_expert_mlp` on CPU,
            :func:`null_moe.triton_fused.triton_expert_mlp` on GPU); otherwise dispatch, three grouped matmuls and
            combine run as separate stages (always so on the other backends).
    Returns:
        [T, D]. Null slots reach no expert matmul, forward or backward.
    """
    name = resolve_backend(backend)
    with jax.named_scope("dispatch"):
        d = make_dispatch(expert_ids, weights, w1.shape[0])
    return experts_on_dispatch(x, d, w1, w2, w3, act, backend=name, tile_rows=tile_rows, fused=fused)


def experts_on_dispatch(
    x: jax.Array,
    d: Dispatch,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    backend: str,
    tile_rows: Optional[int] = None,
    fused: bool = True,
) -> jax.Array:
    """:func:`expert_mlp` for a dispatch already made: [T, D] tokens -> [T, D] routed output."""
    if expert_path(backend, fused) == "fused":
        if backend == "tiled":
            with jax.named_scope("experts_tiled_fused"):
                return tiled_expert_mlp(
                    x, d.token_idx, d.row_weights, d.group_sizes, w1, w2, w3, tile_rows or DEFAULT_TILE_ROWS, act
                )
        with jax.named_scope("experts_triton_fused"):
            inv = d.inv_idx.reshape(x.shape[0], -1)
            return triton_expert_mlp(x, d.token_idx, inv, d.row_weights, d.group_sizes, w1, w2, w3, act)
    with jax.named_scope("dispatch"):
        xs = dispatch_rows(x, d)
    with jax.named_scope(f"experts_{backend}"):
        ys = gated_mlp_rows(xs, d.group_sizes, w1, w2, w3, act, backend=backend, tile_rows=tile_rows)
    with jax.named_scope("combine"):
        return combine_rows(ys, d, x.shape[0])
