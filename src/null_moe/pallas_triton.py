"""What every Pallas-Triton kernel of this project shares: version-tolerant load/store, launch parameters, whether
the backend exists at all, and the one place that decides interpret mode per lowering platform.

Interpret mode is chosen per *lowering* platform, not from ``jax.default_backend()``: :func:`pallas_call` puts the
compiled kernel and its interpret-mode twin under ``jax.lax.platform_dependent``, so a program lowered for CUDA
(also on a CPU-only host, ``jit(f).trace(...).lower(lowering_platforms=("cuda",))``) holds the Triton kernels,
and the same program run on CPU runs the interpret-mode loops. Only the branch for the platform being lowered is
lowered.

JAX deprecated Pallas' Triton backend in 0.11 (Mosaic GPU replaces it). :func:`triton_available` says whether this
JAX still has it; the backend choice (``null_moe.gmm.resolve_backend``) falls back when it does not. Works with jax
0.7.2 and 0.11.x.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
except ImportError:  # pragma: no cover - a jax without Pallas
    pl = None

try:  # the Triton-specific Pallas API (masked load/store, CompilerParams): jax 0.4.3x .. 0.11
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - removed from this jax
    plgpu = None

#: Lowering platforms that run the compiled Triton kernels; every other platform runs interpret mode.
GPU_PLATFORMS = ("cuda", "rocm")


def triton_available() -> bool:
    """Whether this JAX still has Pallas' Triton backend with the API the kernels use (masked load and store)."""
    return pl is not None and plgpu is not None and hasattr(plgpu, "load") and hasattr(plgpu, "store")


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params under whichever name this jax spells them.

    ``jax.experimental.pallas.triton.CompilerParams`` (jax >= 0.6, still so in 0.11); earlier releases called it
    ``TritonCompilerParams`` (in ``pallas.triton`` or ``pallas`` itself). Returns None when none is found, and
    then Pallas uses its Triton defaults (4 warps, 3 stages).
    """
    for module in (plgpu, pl):
        if module is None:
            continue
        for name in ("CompilerParams", "TritonCompilerParams"):
            cls = getattr(module, name, None)
            if cls is None:
                continue
            try:
                return cls(num_warps=num_warps, num_stages=num_stages)
            except TypeError:  # pallas.CompilerParams is an abstract base in newer jax
                continue
    return None


def load(ref_view, mask=None):
    """Loads a ref view ``ref.at[...]``; lanes where ``mask`` is False are not read and come back as 0.

    ``ref.at`` may index with integer arrays (a gather: ``x_ref.at[rows[:, None], cols[None, :]]``) or with
    ``pl.ds`` slices, not both in one view (interpret mode cannot mix them).
    """
    kwargs = {} if mask is None else {"mask": mask, "other": 0}
    if plgpu is not None and hasattr(plgpu, "load"):
        return plgpu.load(ref_view, **kwargs)
    if hasattr(pl, "load"):  # pragma: no cover - jax < 0.5 spelling
        return pl.load(ref_view, (), **kwargs)
    if mask is None:  # pragma: no cover
        return ref_view[...]
    raise NotImplementedError("this jax has no masked Pallas load")  # pragma: no cover


def store(ref_view, value, mask=None):
    """Stores ``value`` into a ref view, only where ``mask`` is True (everywhere when it is None)."""
    kwargs = {} if mask is None else {"mask": mask}
    if plgpu is not None and hasattr(plgpu, "store"):
        plgpu.store(ref_view, value, **kwargs)
    elif hasattr(pl, "store"):  # pragma: no cover - jax < 0.5 spelling
        pl.store(ref_view, (), value, **kwargs)
    elif mask is None:  # pragma: no cover
        ref_view[...] = value
    else:  # pragma: no cover
        raise NotImplementedError("this jax has no masked Pallas store")


def multiple_of(x, m: int):
    fn = getattr(pl, "multiple_of", None)
    return fn(x, m) if fn is not None else x


def and_(a, b):
    """a & b where either may be None (no constraint)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def iota(shape: tuple[int, ...], dim: int):
    """int32 indices along ``dim`` of an array of ``shape`` (inside a kernel)."""
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def pallas_call(
    kernel: Callable,
    *,
    out_shape: Any,
    grid: tuple[int, ...],
    name: str,
    interpret: Optional[bool],
    num_warps: int,
    num_stages: int,
) -> Callable:
    """``pl.pallas_call`` whose interpret mode follows the lowering platform.

    ``interpret``: True / False force interpret mode / the compiled kernel on every platform; None compiles for
    the GPU platforms (:data:`GPU_PLATFORMS`) and interprets elsewhere, decided per lowering platform by
    ``jax.lax.platform_dependent``.
    """

    def run(interp: bool, *args):
        kwargs: dict = {"interpret": interp}
        if not interp:
            params = compiler_params(num_warps, num_stages)
            if params is not None:
                kwargs["compiler_params"] = params
        return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, name=name, **kwargs)(*args)

    def call(*args):
        if interpret is not None:
            return run(bool(interpret), *args)
        compiled = functools.partial(run, False)
        branches = {platform: compiled for platform in GPU_PLATFORMS}
        return lax.platform_dependent(*args, default=functools.partial(run, True), **branches)

    return call
