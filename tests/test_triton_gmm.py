"""null_moe.triton_gmm against a per-group dense reference: forward, dX and dW, null rows, dtypes, block edges.

On CPU the kernels run in Pallas interpret mode at tiny shapes (the whole file takes well under a minute); the
Triton lowering itself is checked on CPU too, by lowering for CUDA without compiling. Tests marked
``accelerator`` compile and run the real Triton kernels and are skipped unless the default backend is a GPU
(``scripts/gpu/device_check.sh`` runs them there).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _import_triton_gmm():
    """null_moe.triton_gmm; loaded from its file alone when the package cannot be imported (the kernel module
    needs jax only, while ``null_moe/__init__`` pulls in haliax, which a bare GPU machine may lack)."""
    try:
        from null_moe import triton_gmm as module

        return module
    except ImportError:  # pragma: no cover - only on machines without haliax
        path = pathlib.Path(__file__).resolve().parents[1] / "src" / "null_moe" / "triton_gmm.py"
        spec = importlib.util.spec_from_file_location("null_moe_triton_gmm_standalone", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


TG = _import_triton_gmm()
triton_gmm = TG.triton_gmm

ON_GPU = jax.default_backend() == "gpu"

# One row count and weight shape for all CPU cases, so each (dtype, blocks) traces and compiles once and the
# group sizes vary as data. K and N are not multiples of the blocks used below, nor is R_TOTAL.
R_TOTAL, K, N, E = 44, 20, 24, 5

GROUPS = {
    "random_with_empty": [9, 0, 17, 3, 6],  # sum 35 < R_TOTAL
    "all_real": [8, 9, 10, 7, 10],  # sum 44 = R_TOTAL
    "no_real": [0, 0, 0, 0, 0],
    "one_expert_all": [0, 0, 44, 0, 0],
    "odd_sizes": [1, 15, 0, 13, 2],  # neither sizes nor offsets multiples of the tile
    "single_rows": [1, 1, 0, 1, 1],
}

# (block_m, block_n, block_k): the CPU tests use tiny tiles so that every group spans several tiles and K/N edges
# are masked.
BLOCKS = [(8, 16, 8), (16, 8, 16)]


def _reference(x, w, gs, cot):
    """Per-group dense loop in float64: (y, dx, dw) with zeros past the real rows."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    cot = np.asarray(cot, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    start = 0
    for e, size in enumerate(np.asarray(gs)):
        rows = slice(start, start + int(size))
        y[rows] = x[rows] @ w[e]
        dx[rows] = cot[rows] @ w[e].T
        dw[e] = x[rows].T @ cot[rows]
        start += int(size)
    return y, dx, dw


def _inputs(key, dtype, rows=R_TOTAL, k=K, n=N, e=E):
    kx, kw, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    cot = jax.random.normal(kc, (rows, n), jnp.float32).astype(dtype)
    return x, w, cot


def _poison_past(a, real):
    """NaN in every row at or past ``real``: those rows belong to no expert and must not leak."""
    rows = jnp.arange(a.shape[0])[:, None]
    return jnp.where(rows >= real, jnp.nan, a).astype(a.dtype)


def _value_and_grads_fn(**kwargs):
    @jax.jit
    def run(x, w, gs, cot):
        y, vjp = jax.vjp(lambda x, w: triton_gmm(x, w, gs, **kwargs), x, w)
        dx, dw = vjp(cot)
        return y, dx, dw

    return run


_RUNS: dict = {}


def _run(blocks, **extra):
    key = (blocks, tuple(sorted(extra.items())))
    if key not in _RUNS:
        bm, bn, bk = blocks
        _RUNS[key] = _value_and_grads_fn(block_m=bm, block_n=bn, block_k=bk, **extra)
    return _RUNS[key]


def _check(outs, x, w, gs, cot, *, tol):
    y, dx, dw = (np.asarray(a, np.float32) for a in outs)
    real = int(np.sum(gs))
    y_ref, dx_ref, dw_ref = _reference(x[:real], w, gs, cot[:real])
    assert y.shape == (x.shape[0], w.shape[2]) and dx.shape == x.shape and dw.shape == w.shape
    # Rows past the real ones: exact zeros, whatever x and the cotangent hold there (NaN here).
    assert np.all(y[real:] == 0) and np.all(dx[real:] == 0)
    for got, want in ((y[:real], y_ref), (dx[:real], dx_ref), (dw, dw_ref)):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    # Experts with no rows get an exactly zero weight gradient.
    for e, size in enumerate(np.asarray(gs)):
        if size == 0:
            assert np.all(dw[e] == 0)


# ---------------------------------------------------------------------------------------------------------------
# The schedule.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_m", [1, 8, 128])
def test_tile_schedule_covers_every_row_once(block_m):
    """Real tiles cover each expert's rows exactly once and zero tiles the null region, within the static length."""
    rng = np.random.default_rng(block_m)
    schedule = jax.jit(TG.tile_schedule, static_argnums=(1, 2))
    for _ in range(12):
        e = int(rng.choice([1, 3, 6]))
        total = int(rng.choice([0, 7, 45]))
        sizes = rng.multinomial(int(rng.integers(0, total + 1)), np.ones(e) / e) if total else np.zeros(e, int)
        sched = np.asarray(schedule(jnp.asarray(sizes, jnp.int32), total, block_m))
        assert sched.shape == (3, TG.max_row_tiles(total, e, block_m))
        kind, start, end = sched
        owner = np.full(total, -1)
        ends = np.cumsum(sizes)
        for t in range(sched.shape[1]):
            if kind[t] == e + 1:  # idle
                continue
            rows = np.arange(start[t], min(start[t] + block_m, end[t]))
            assert rows.size > 0
            assert np.all(owner[rows] == -1), "a row is written by two tiles"
            owner[rows] = kind[t]
        expect = np.full(total, e)  # the null region is kind E (zero tiles)
        for g in range(e):
            expect[ends[g] - sizes[g] : ends[g]] = g
        np.testing.assert_array_equal(owner, expect)
        # Idle entries come last.
        busy = kind != e + 1
        assert not np.any(busy[np.argmin(busy) :]) or np.all(busy)


# ---------------------------------------------------------------------------------------------------------------
# Interpret-mode correctness (CPU).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("case", sorted(GROUPS))
def test_matches_reference_f32(case, blocks):
    gs = np.asarray(GROUPS[case], np.int32)
    real = int(gs.sum())
    x, w, cot = _inputs(jax.random.PRNGKey(0), jnp.float32)
    x, cot = _poison_past(x, real), _poison_past(cot, real)
    outs = _run(blocks, interpret=True)(x, w, jnp.asarray(gs), cot)
    _check(outs, x, w, gs, cot, tol=1e-4)


def test_random_configs_f32_and_bf16():
    """Random group sizes (empty experts included) over a few seeds, in f32 and bf16 (loose tolerance)."""
    rng = np.random.default_rng(0)
    for seed in range(4):
        real = int(rng.integers(0, R_TOTAL + 1))
        probs = rng.dirichlet(np.full(E, 0.5))
        gs = rng.multinomial(real, probs).astype(np.int32)
        for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 6e-2)):
            x, w, cot = _inputs(jax.random.PRNGKey(seed), dtype)
            x, cot = _poison_past(x, real), _poison_past(cot, real)
            outs = _run(BLOCKS[seed % 2], interpret=True)(x, w, jnp.asarray(gs), cot)
            assert outs[0].dtype == dtype and outs[1].dtype == dtype and outs[2].dtype == dtype
            # The reference sees the same bf16-rounded inputs; the kernel accumulates in f32 and rounds once.
            _check(outs, x.astype(jnp.float32), w.astype(jnp.float32), gs, cot.astype(jnp.float32), tol=tol)


def test_default_blocks_and_interpret_default():
    """Default (GPU-sized) blocks on a tiny problem, with ``interpret=None`` resolving to interpret mode off GPU."""
    if ON_GPU:
        pytest.skip("interpret=None compiles the Triton kernel on GPU; covered by the accelerator tests")
    gs = np.asarray([3, 0, 30], np.int32)
    x, w, cot = _inputs(jax.random.PRNGKey(3), jnp.float32, rows=40, k=24, n=40, e=3)
    x, cot = _poison_past(x, 33), _poison_past(cot, 33)
    @jax.jit
    def run(x, w, gs, cot):
        y, vjp = jax.vjp(lambda x, w: triton_gmm(x, w, gs), x, w)
        return (y, *vjp(cot))

    _check(run(x, w, jnp.asarray(gs), cot), x, w, gs, cot, tol=1e-4)


@pytest.mark.fast
def test_no_rows_and_grad_through_jax_grad():
    """R_total = 0 returns an empty array; jax.grad of a scalar loss goes through the custom VJP."""
    x = jnp.zeros((0, K), jnp.float32)
    w = jnp.ones((E, K, N), jnp.float32)
    assert triton_gmm(x, w, jnp.zeros((E,), jnp.int32), interpret=True).shape == (0, N)

    gs = jnp.asarray(GROUPS["odd_sizes"], jnp.int32)
    x, w, cot = _inputs(jax.random.PRNGKey(5), jnp.float32)
    loss = lambda x, w: jnp.sum(triton_gmm(x, w, gs, interpret=True, block_m=8, block_n=16, block_k=8) * cot)  # noqa: E731
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    _, dx_ref, dw_ref = _reference(x, w, np.asarray(gs), cot)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.fast
def test_rejects_bad_arguments():
    x, w, _ = _inputs(jax.random.PRNGKey(0), jnp.float32)
    gs = jnp.asarray(GROUPS["all_real"], jnp.int32)
    with pytest.raises(ValueError, match="power of two"):
        triton_gmm(x, w, gs, interpret=False, block_m=8)
    with pytest.raises(ValueError, match="power of two"):
        triton_gmm(x, w, gs, interpret=False, block_n=48)
    with pytest.raises(ValueError, match="positive integer"):
        triton_gmm(x, w, gs, interpret=True, block_k=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        triton_gmm(x, w[:, :-1], gs, interpret=True)
    with pytest.raises(ValueError, match="expected"):
        triton_gmm(x[None], w, gs, interpret=True)


def test_triton_compiler_params_found():
    """Whatever this jax calls them, the Triton launch parameters are found and carry the values given."""
    params = TG._triton_compiler_params(8, 4)
    assert params is not None
    assert params.num_warps == 8 and params.num_stages == 4


# ---------------------------------------------------------------------------------------------------------------
# The Triton lowering, checked on CPU by lowering for CUDA (the Triton IR is built in Python; nothing compiles).
# ---------------------------------------------------------------------------------------------------------------
def _lower_for_cuda(dtype, rows, k, n, e, **blocks):
    args = (
        jax.ShapeDtypeStruct((rows, k), dtype),
        jax.ShapeDtypeStruct((e, k, n), dtype),
        jax.ShapeDtypeStruct((e,), jnp.int32),
        jax.ShapeDtypeStruct((rows, n), dtype),
    )

    def fwd_bwd(x, w, gs, cot):
        y, vjp = jax.vjp(lambda x, w: triton_gmm(x, w, gs, interpret=False, **blocks), x, w)
        return y, vjp(cot)

    traced = jax.jit(fwd_bwd).trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "dtype,shape,blocks",
    [
        (jnp.bfloat16, (512, 256, 384, 8), {}),
        (jnp.float32, (512, 256, 384, 8), {}),
        (jnp.bfloat16, (300, 200, 300, 3), {"block_m": 16, "block_n": 32, "block_k": 16}),  # K, N edges masked
    ],
)
def test_lowers_to_three_triton_kernels_for_cuda(dtype, shape, blocks):
    try:
        text = _lower_for_cuda(dtype, *shape, **blocks)
    except Exception as err:  # pragma: no cover - a jaxlib built without the Triton dialect
        if "triton" in str(err).lower() and "not" in str(err).lower() and "available" in str(err).lower():
            pytest.skip(f"this jaxlib cannot lower Pallas-Triton: {err}")
        raise
    # forward, dX and dW: one Triton custom call each.
    assert text.count("__gpu$xla.gpu.triton") == 3


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled Triton kernels.
# ---------------------------------------------------------------------------------------------------------------
def _relative_error(got, want):
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


@pytest.mark.accelerator
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.default_backend() == 'gpu')")
@pytest.mark.parametrize(
    "dtype,shape,blocks",
    [
        ("bfloat16", (4096, 512, 384, 8), {}),  # default blocks
        ("bfloat16", (1000, 200, 300, 5), {}),  # K, N and R_total not multiples of the blocks
        ("float32", (1000, 200, 300, 5), {}),  # f32 (TF32 on the tensor cores), its own default blocks
        ("bfloat16", (777, 96, 160, 6), {"block_m": 16, "block_n": 32, "block_k": 16}),  # smallest tiles
    ],
)
def test_gpu_compiled_matches_reference(dtype, shape, blocks):
    dtype = jnp.dtype(dtype)
    rows, k, n, e = shape
    rng = np.random.default_rng(rows + k)
    real_rows = []
    for frac in (1.0, 0.5, 0.1):
        real = int(frac * rows)
        sizes = rng.multinomial(real, rng.dirichlet(np.full(e, 0.7))).astype(np.int32)
        if e > 2:
            sizes[1] += sizes[0]  # one expert with no rows
            sizes[0] = 0
        real_rows.append(sizes)
    x, w, cot = _inputs(jax.random.PRNGKey(rows), dtype, rows=rows, k=k, n=n, e=e)
    run = _value_and_grads_fn(interpret=False, **blocks)
    # bf16 inputs: f32 accumulation, one rounding of the output; f32 inputs run as TF32 on the tensor cores.
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
    for sizes in real_rows:
        real = int(sizes.sum())
        xp, cp = _poison_past(x, real), _poison_past(cot, real)
        y, dx, dw = (np.asarray(a.astype(jnp.float32)) for a in run(xp, w, jnp.asarray(sizes), cp))
        y_ref, dx_ref, dw_ref = _reference(
            np.asarray(x.astype(jnp.float32))[:real], np.asarray(w.astype(jnp.float32)), sizes,
            np.asarray(cot.astype(jnp.float32))[:real],
        )
        assert np.all(y[real:] == 0) and np.all(dx[real:] == 0)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
        assert np.all(dw[0] == 0)  # the expert with no rows
        if not real:
            assert np.all(dw == 0)
            continue
        assert _relative_error(y[:real], y_ref) < tol
        assert _relative_error(dx[:real], dx_ref) < tol
        assert _relative_error(dw, dw_ref) < tol
