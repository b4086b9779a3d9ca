"""Grouped matmul over expert-sorted rows, with work proportional to the real rows.

Rows of ``x`` are sorted by expert: expert e owns rows [offset_e, offset_e + group_sizes[e]); rows at or past
R = sum(group_sizes) belong to no expert (null slots) and are "don't care" for callers. Every backend returns
zeros there and gives them zero cotangent, so nothing from those rows can poison results or gradients.

Backends (chosen in exactly one place, :func:`resolve_backend`):

- ``tiled``: this project's CPU kernels (null_moe.tiled). Each expert's rows are cut into tiles; a loop with a
  dynamic trip count visits only the tiles that hold real rows, so forward, dX and dW all cost O(R), not O(T k).
- ``megablox``: the TPU Pallas kernel that Haliax's ``gmm_sharded`` wraps; it visits only tiles of real groups.
- ``triton``: this project's Pallas-Triton kernel (null_moe.triton_gmm) for NVIDIA GPUs: programs past the
  real rows exit early, forward, dX and dW. On other platforms it runs in Pallas interpret mode (tests). The
  layer's default on GPU runs the fused expert kernels of null_moe.triton_fused instead (null_moe.experts).
- ``tokamax``: tokamax's ``ragged_dot`` (selectable when installed); its kernels leave rows past R unwritten,
  so they are masked here like megablox's.
- ``ragged_dot``: ``jax.lax.ragged_dot``; the reference. On CPU it runs every group densely whatever R is, and
  XLA on NVIDIA rewrites it to a masked dense dot over every group.

All raw arrays here: ``x`` [R, K], ``w`` [E, K, N], ``group_sizes`` [E] int32.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import jax
import jax.numpy as jnp

from .config import GMM_BACKENDS
from .pallas_triton import triton_available
from .tiled import DEFAULT_TILE_ROWS, tiled_gmm
from .triton_gmm import triton_gmm

# ---------------------------------------------------------------------------------------------------------------
# Backend choice: the one place that maps a request + platform to what runs.
# ---------------------------------------------------------------------------------------------------------------
def _tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def resolve_backend(requested: str = "auto", platform: Optional[str] = None) -> str:
    """The backend that runs for ``requested`` on ``platform`` (default: ``jax.default_backend()``).

    auto: cpu -> tiled, tpu -> megablox, gpu -> triton; where this JAX no longer has Pallas' Triton backend
    (deprecated in JAX 0.11), gpu -> tokamax if installed, else ragged_dot (the unfused path). Explicit names run
    as asked (``triton`` off GPU runs in Pallas interpret mode); ``tokamax`` needs the package and ``triton``
    Pallas' Triton backend.
    """
    if requested not in GMM_BACKENDS:
        raise ValueError(f"gmm_backend must be one of {GMM_BACKENDS}, got {requested!r}")
    platform = (platform or jax.default_backend()).lower()
    if requested != "auto":
        if requested == "tokamax" and not _tokamax_available():
            raise ValueError("gmm_backend='tokamax' needs the tokamax package (pip install tokamax)")
        if requested == "triton" and not triton_available():
            raise ValueError(
                f"gmm_backend='triton' needs Pallas' Triton backend, which jax {jax.__version__} does not have; "
                "gmm_backend='auto' picks what this jax offers"
            )
        return requested
    if platform == "tpu":
        return "megablox"
    if platform in ("gpu", "cuda", "rocm"):
        if triton_available():
            return "triton"
        return "tokamax" if _tokamax_available() else "ragged_dot"
    return "tiled"


def _real_row_mask(num_rows: int, group_sizes: jax.Array) -> jax.Array:
    return jnp.arange(num_rows) < jnp.sum(group_sizes)


# ---------------------------------------------------------------------------------------------------------------
# Other backends, with rows past the real ones guarded.
# ---------------------------------------------------------------------------------------------------------------
@jax.custom_vjp
def _zero_cotangent_past(x, group_sizes):
    """Identity on x whose cotangent is zeroed on rows >= sum(group_sizes).

    megablox leaves those rows of dX uninitialised (NaN seen on CPU); without this guard they would reach the
    dispatch gather's transpose and poison the gradient of every token.
    """
    return x


def _zero_cotangent_past_fwd(x, group_sizes):
    return x, group_sizes


def _zero_cotangent_past_bwd(group_sizes, g):
    keep = _real_row_mask(g.shape[0], group_sizes)[:, None]
    return jnp.where(keep, g, 0), None


_zero_cotangent_past.defvjp(_zero_cotangent_past_fwd, _zero_cotangent_past_bwd)


def _megablox_gmm(x, w, group_sizes):
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    rows, k_in = x.shape
    n_out = w.shape[2]
    tm = 512 if rows >= 512 else max(8, -(-rows // 8) * 8)
    padded = -(-rows // tm) * tm
    xp = jnp.pad(x, ((0, padded - rows), (0, 0))) if padded != rows else x
    tiling = (tm, min(k_in, 1024), min(n_out, 1024))
    out = megablox_gmm(
        xp,
        w,
        group_sizes.astype(jnp.int32),
        preferred_element_type=x.dtype,
        tiling=tiling,
        interpret=jax.default_backend() != "tpu",
    )
    return out[:rows]


def _tokamax_gmm(x, w, group_sizes):
    import tokamax

    return tokamax.ragged_dot(x, w, group_sizes.astype(jnp.int32))


def _ragged_dot_gmm(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=x.dtype)


_GUARDED = {"megablox": _megablox_gmm, "tokamax": _tokamax_gmm, "ragged_dot": _ragged_dot_gmm}


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------------------------
def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    tile_rows: Optional[int] = None,
) -> jax.Array:
    """Per-expert matmul over expert-sorted rows.

    Args:
        x: [R, K] rows sorted by expert; rows >= sum(group_sizes) belong to no expert.
        w: [E, K, N] one weight per expert.
        group_sizes: [E] int rows per expert, sum <= R.
        backend: see :func:`resolve_backend`.
        tile_rows: row tile of the tiled backend (default :data:`DEFAULT_TILE_ROWS`).

    Returns:
        [R, N]: x[r] @ w[expert(r)] on real rows; zeros past them (and zero cotangent there).
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"expected x [R, K], w [E, K, N], group_sizes [E]; got {x.shape}, {w.shape}, {group_sizes.shape}")
    if x.shape[1] != w.shape[1] or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}")
    name = resolve_backend(backend)
    with jax.named_scope(f"gmm_{name}"):
        if name == "tiled":
            return tiled_gmm(x, w, group_sizes, tile_rows or DEFAULT_TILE_ROWS)
        if name == "triton":  # exact zeros and zero cotangent past the real rows by construction
            return triton_gmm(x, w, group_sizes)
        x = _zero_cotangent_past(x, group_sizes)
        out = _GUARDED[name](x, w, group_sizes)
        return jnp.where(_real_row_mask(x.shape[0], group_sizes)[:, None], out, 0)
