"""The fused GPU expert path (null_moe.triton_fused) against per-token references, in Pallas interpret mode on CPU.

- the raw op: outputs and the gradients of x, the gate weights and every expert weight, at null fractions 0 / 0.5
  / 0.9 / every slot, f32 and bf16, sizes that no tile divides, tiny and default tiles; NaN in the rows of
  tokens whose slots are all null (x and the cotangent) must not leak;
- the intermediate per-slot buffers are written on real rows only (interpret mode leaves unwritten rows NaN);
- the layer with ``gmm_backend="triton"`` (fused by default) against tests/reference.py's dense per-token
  reference: outputs, aux losses, gradients of x, every weight and the router, both null modes, f32 and bf16;
- lowered for CUDA on this CPU host, the layer's forward + backward holds the Triton kernels, and no op outside
  them reads or writes a per-slot float tensor ([T k, D], [T k, F] or [T, k, D]);
- without Pallas' Triton backend, ``auto`` falls back and an explicit ``triton`` is a clear error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from null_moe import NullMoEConfig, NullRoutedMoE
from null_moe import experts as X
from null_moe import gmm as G
from null_moe import triton_fused as TF
from null_moe.dispatch import make_dispatch
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]
TINY = TF.FusedTiles(block_m=8, block_f=8, block_d=8, block_k=8, block_r=8, block_t=4)
# T, k, D, F, E: D and F divisible by none of the tiny tiles' sizes, T not by block_t.
T, K, D, F, E = 23, 3, 12, 20, 5


def _slot_reference(x, ids, wts, w1, w2, w3, act=jax.nn.silu):
    """Dense per-slot reference (f32): every slot's own expert weights gathered, null slots masked to zero."""
    real = ids < w1.shape[0]
    e = jnp.where(real, ids, 0)
    a = jnp.einsum("td,tkdf->tkf", x, w1[e])
    b = jnp.einsum("td,tkdf->tkf", x, w3[e])
    y = jnp.einsum("tkf,tkfd->tkd", act(a) * b, w2[e])
    y = jnp.where(real[..., None], y, 0.0)
    return jnp.einsum("tk,tkd->td", jnp.where(real, wts, 0.0), y)


def _routing(seed, null_frac, t=T, k=K, e=E):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, e, size=(t, k))
    null = rng.random((t, k)) < null_frac
    if 0 < null_frac < 1:
        null[0] = True  # one all-null token
        null[1] = False  # one token with every slot real
    ids = np.where(null, e, ids)
    wts = rng.random((t, k)).astype(np.float32) * (ids < e)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(wts)


def _weights(key, dtype, d=D, f=F, e=E):
    k1, k2, k3 = jax.random.split(key, 3)
    w1 = jax.random.normal(k1, (e, d, f)) / np.sqrt(d)
    w2 = jax.random.normal(k2, (e, f, d)) / np.sqrt(f)
    w3 = jax.random.normal(k3, (e, d, f)) / np.sqrt(d)
    return w1.astype(dtype), w2.astype(dtype), w3.astype(dtype)


def _fused_op(ids, wts, x, w1, w2, w3, tiles, act=jax.nn.silu):
    d = make_dispatch(ids, wts, w1.shape[0])
    inv = d.inv_idx.reshape(x.shape[0], -1)
    return TF.triton_expert_mlp(x, d.token_idx, inv, d.row_weights, d.group_sizes, w1, w2, w3, act, tiles=tiles,
                                interpret=True)


_VJP = {}


def _value_and_grads(tiles, act=jax.nn.silu):
    """jit of (out, grads wrt x, wts, w1, w2, w3) for a cotangent, cached per (tiles, act)."""
    key = (tiles, act)
    if key not in _VJP:

        @jax.jit
        def run(ids, wts, x, w1, w2, w3, cot):
            out, vjp = jax.vjp(lambda *a: _fused_op(ids, *a, tiles, act), wts, x, w1, w2, w3)
            return out, vjp(cot)

        _VJP[key] = run
    return _VJP[key]


@jax.jit
def _reference_value_and_grads(ids, wts, x, w1, w2, w3, cot):
    out, vjp = jax.vjp(lambda *a: _slot_reference(a[1], ids, a[0], *a[2:]), wts, x, w1, w2, w3)
    return out, vjp(cot)


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), f"{what}: not finite"
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got - want))) / scale
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


RAW_CASES = [
    pytest.param(p, dtype, marks=[pytest.mark.fast] if dtype == "float32" and p in (0.5, 1.0) else [])
    for dtype in ("float32", "bfloat16")
    for p in (0.0, 0.5, 0.9, 1.0)
]


@pytest.mark.parametrize("null_frac,dtype", RAW_CASES)
def test_raw_op_matches_per_slot_reference(null_frac, dtype):
    dtype = jnp.dtype(dtype)
    ids, wts = _routing(int(null_frac * 10), null_frac)
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(int(null_frac * 10)), 3)
    x = jax.random.normal(kx, (T, D)).astype(dtype)
    w1, w2, w3 = _weights(kw, dtype)
    cot = jax.random.normal(kc, (T, D)).astype(dtype)
    all_null = np.all(np.asarray(ids) == E, axis=1)
    # NaN in the rows no expert may read: tokens whose every slot is null, in x and in the cotangent.
    x_p = jnp.where(jnp.asarray(all_null)[:, None], jnp.nan, x).astype(dtype)
    cot_p = jnp.where(jnp.asarray(all_null)[:, None], jnp.nan, cot).astype(dtype)
    out, (d_wts, dx, dw1, dw2, dw3) = _value_and_grads(TINY)(ids, wts, x_p, w1, w2, w3, cot_p)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    clean = jnp.where(jnp.asarray(all_null)[:, None], 0.0, f32(x))
    clean_cot = jnp.where(jnp.asarray(all_null)[:, None], 0.0, f32(cot))
    ref_out, (r_wts, r_dx, r_dw1, r_dw2, r_dw3) = _reference_value_and_grads(
        ids, wts, clean, f32(w1), f32(w2), f32(w3), clean_cot
    )
    assert out.dtype == dtype and dx.dtype == dtype and dw1.dtype == dtype and d_wts.dtype == wts.dtype
    # f32: TF32-free interpret mode, tight; bf16: inputs, a, b, h, y rounded to bf16 along the way.
    tol = 2e-5 if dtype == jnp.float32 else 4e-2
    _close(out, ref_out, tol, "out")
    _close(dx, r_dx, tol, "dx")
    _close(d_wts, r_wts, tol, "gate weights")
    for name, got, want in (("w1", dw1, r_dw1), ("w2", dw2, r_dw2), ("w3", dw3, r_dw3)):
        _close(got, want, tol, name)
    # tokens without a real slot: exactly zero output and zero dx
    assert np.all(np.asarray(out, np.float32)[all_null] == 0)
    assert np.all(np.asarray(dx, np.float32)[all_null] == 0)
    # experts without a real row: exactly zero weight gradients
    unused = [e for e in range(E) if not np.any(np.asarray(ids) == e)]
    for e in unused:
        assert np.all(np.asarray(dw1, np.float32)[e] == 0) and np.all(np.asarray(dw2, np.float32)[e] == 0)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_default_tiles_and_each_activation(act):
    """The shipped (GPU-sized) tiles on a problem smaller than one tile, and every activation's in-kernel form."""
    fn = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}[act]
    ids, wts = _routing(7, 0.5)
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(kx, (T, D))
    w1, w2, w3 = _weights(kw, jnp.float32)
    cot = jax.random.normal(kc, (T, D))
    out, grads = _value_and_grads(TF.DEFAULT_TILES, fn)(ids, wts, x, w1, w2, w3, cot)

    @jax.jit
    def reference(ids, wts, x, w1, w2, w3, cot):
        o, vjp = jax.vjp(lambda *a: _slot_reference(a[1], ids, a[0], *a[2:], act=fn), wts, x, w1, w2, w3)
        return o, vjp(cot)

    ref_out, ref_grads = reference(ids, wts, x, w1, w2, w3, cot)
    _close(out, ref_out, 2e-5, "out")
    for name, got, want in zip(("wts", "x", "w1", "w2", "w3"), grads, ref_grads):
        _close(got, want, 2e-5, name)


def test_per_slot_buffers_are_written_on_real_rows_only():
    """Interpret mode leaves unwritten outputs NaN: the up kernel's a, b, h and the down kernel's y hold values on
    the R real rows and nothing past them (the work follows R, not T k)."""
    ids, wts = _routing(3, 0.7)
    x = jax.random.normal(jax.random.PRNGKey(3), (T, D))
    w1, w2, w3 = _weights(jax.random.PRNGKey(4), jnp.float32)
    d = make_dispatch(ids, wts, E)
    run = TF._Run(TINY, True, "silu")
    a, b, h = jax.jit(lambda: TF._up(x, d.token_idx, d.group_sizes, w1, w3, run))()
    y = jax.jit(lambda: TF._down(h, d.row_weights, d.group_sizes, w2, run))()
    real = int(d.num_real)
    assert 0 < real < T * K
    for name, buf in (("a", a), ("b", b), ("h", h), ("y", y)):
        buf = np.asarray(buf)
        assert np.all(np.isfinite(buf[:real])), name
        assert np.all(np.isnan(buf[real:])), f"{name}: a null row was written"


def test_expert_mlp_routes_triton_to_the_fused_path(monkeypatch):
    """expert_mlp with backend="triton" runs the fused kernels unless fused=False, and both equal the reference."""
    calls = []
    original = TF.triton_expert_mlp
    monkeypatch.setattr(X, "triton_expert_mlp", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    ids, wts = _routing(5, 0.5)
    x = jax.random.normal(jax.random.PRNGKey(5), (T, D))
    w1, w2, w3 = _weights(jax.random.PRNGKey(6), jnp.float32)
    want = _slot_reference(x, ids, wts, w1, w2, w3)
    for fused in (True, False):
        calls.clear()
        got = X.expert_mlp(x, ids, wts, w1, w2, w3, jax.nn.silu, backend="triton", fused=fused)
        assert len(calls) == (1 if fused else 0)
        _close(got, want, 2e-5, f"fused={fused}")
    assert X.expert_path("triton", True) == "fused" and X.expert_path("triton", False) == "unfused"
    assert X.expert_path("ragged_dot", True) == "unfused"


def test_rejects_bad_arguments():
    ids, wts = _routing(1, 0.5)
    x = jnp.ones((T, D))
    w1, w2, w3 = _weights(jax.random.PRNGKey(1), jnp.float32)
    d = make_dispatch(ids, wts, E)
    inv = d.inv_idx.reshape(T, K)
    args = (x, d.token_idx, inv, d.row_weights, d.group_sizes)
    with pytest.raises(ValueError, match="power of two"):
        TF.triton_expert_mlp(*args, w1, w2, w3, tiles=TINY, interpret=False)
    with pytest.raises(ValueError, match="positive integer"):
        TF.triton_expert_mlp(*args, w1, w2, w3, tiles=TF.FusedTiles(block_t=0), interpret=True)
    with pytest.raises(ValueError, match="inv_idx"):
        TF.triton_expert_mlp(x, d.token_idx, inv[:-1], d.row_weights, d.group_sizes, w1, w2, w3, interpret=True)
    with pytest.raises(ValueError, match="w2"):
        TF.triton_expert_mlp(*args, w1, w3, w3, interpret=True)
    with pytest.raises(ValueError, match="activations"):
        TF.triton_expert_mlp(*args, w1, w2, w3, jnp.tanh, interpret=True)


# ---------------------------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------------------------
Batch, Pos = hax.Axis("batch", 2), hax.Axis("position", 5)

LAYER_CASES = [
    # (p, k, N, take_until_null, dtype)
    (0.0, 2, 4, False, "float32"),
    (0.5, 4, 6, False, "float32"),  # M = 6 >= k
    (0.5, 4, 6, True, "float32"),
    (0.3, 4, 5, True, "float32"),  # M = 2 < k: take_until_null changes the routing
    (0.9, 3, 4, False, "float32"),
    (0.5, 4, 6, False, "bfloat16"),
]


def _layer_loss(layer, x, cot):
    y, extras = layer(x)
    aux = extras["load_balancing_loss"].scalar() + extras["router_z_loss"].scalar()
    return hax.sum(y.astype(jnp.float32) * cot).scalar() + aux, (y, extras)


@eqx.filter_jit
def _layer_grads(layer, x, cot):
    (loss, (y, extras)), (g_layer, g_x) = eqx.filter_value_and_grad(
        lambda lx: _layer_loss(lx[0], lx[1], cot), has_aux=True
    )((layer, x))
    return loss, y, extras, g_layer, g_x


@pytest.mark.parametrize("p,k,n,tun,dtype", LAYER_CASES)
def test_layer_matches_dense_reference(p, k, n, tun, dtype):
    dtype = jnp.dtype(dtype)
    cfg = NullMoEConfig(hidden_dim=12, intermediate_dim=20, n_routed_experts=n, num_experts_per_tok=k,
                        null_route_frac=p, take_until_null=tun, gmm_backend="triton")
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(11))
    assert layer.backend == "triton" and layer.expert_path == "fused"
    x = hax.random.normal(jax.random.PRNGKey(12), (Batch, Pos, cfg.Embed))
    cot = hax.random.normal(jax.random.PRNGKey(13), (Batch, Pos, cfg.Embed))
    if dtype != jnp.float32:
        layer = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layer)
        x = x.astype(dtype)
    loss, y, extras, g_layer, g_x = _layer_grads(layer, x, cot)

    # reference: routing decided per token in numpy, experts dense, in f32 from the same (rounded) parameters
    layer32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, layer)
    x_flat = ref.flat_tokens(layer32, x.astype(jnp.float32))
    logits = ref.expanded_logits(cfg, x_flat, *ref.raw_params(layer32)[:2])
    pool_ids, null = ref.route_per_token(cfg, np.asarray(jax.nn.softmax(logits, axis=-1)))
    cot_flat = ref.flat_tokens(layer32, cot)

    def ref_loss(layer, x_flat):
        y, lbl, rzl = ref.dense_forward(layer, x_flat, pool_ids, null)
        return jnp.sum(y * cot_flat) + lbl + rzl, (y, lbl, rzl)

    (r_loss, (r_y, r_lbl, r_rzl)), (r_layer, r_x) = jax.value_and_grad(ref_loss, (0, 1), has_aux=True)(
        layer32, x_flat
    )
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    _close(ref.flat_tokens(layer, y).astype(jnp.float32), r_y, tol, "y")
    _close(extras["load_balancing_loss"].array, r_lbl, tol, "load balancing loss")
    _close(extras["router_z_loss"].array, r_rzl, tol, "router z-loss")
    _close(ref.flat_tokens(layer, g_x).astype(jnp.float32), r_x, tol, "dx")
    for name, get in (
        ("gate", lambda l: l.gate.weight.array),
        ("null_gate", lambda l: l.null_gate.weight.array),
        ("w1", lambda l: l.experts.w1.weight.array),
        ("w2", lambda l: l.experts.w2.weight.array),
        ("w3", lambda l: l.experts.w3.weight.array),
    ):
        if name == "null_gate" and cfg.num_null == 0:
            continue
        _close(get(g_layer).astype(jnp.float32), get(r_layer), tol, name)


def test_layer_every_slot_null_forced():
    """Forced routing with every slot null: zero output, finite gradients, zero expert-weight gradients."""
    cfg = NullMoEConfig(hidden_dim=12, intermediate_dim=20, n_routed_experts=4, num_experts_per_tok=2,
                        gmm_backend="triton")
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    x = hax.random.normal(jax.random.PRNGKey(1), (Batch, Pos, cfg.Embed))
    mask = jnp.ones((Batch.size * Pos.size, 2), bool)

    def loss(layer, x):
        y, _ = layer.apply(x, layer.route_forced(x, null_mask=mask))
        return hax.sum(y * y).scalar() + hax.sum(y).scalar(), y

    (value, y), (g_layer, g_x) = eqx.filter_jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(layer, x)
    assert np.all(np.asarray(y.array) == 0) and float(value) == 0
    for leaf in jax.tree_util.tree_leaves(eqx.filter(g_layer, eqx.is_inexact_array)):
        assert np.all(np.asarray(leaf) == 0)
    assert np.all(np.asarray(g_x.array) == 0)


# ---------------------------------------------------------------------------------------------------------------
# Lowered for CUDA on this host.
# ---------------------------------------------------------------------------------------------------------------
_TYPE = re.compile(r"tensor<([0-9x]+)x(f32|bf16|f16)>")


def _is_plumbing(line: str) -> bool:
    """``lax.platform_dependent`` lowers to a ``stablehlo.case`` on a constant platform index whose one branch holds
    the kernel: its ``return`` and the case's result type forward the kernel's outputs and move no data (XLA folds
    a case on a constant)."""
    line = line.strip()
    return line.startswith("stablehlo.return") or line.startswith("}) : (tensor<i32>) ->")


def _per_slot_float_ops(text: str, per_slot_shapes: set) -> list[str]:
    """Lines of the lowered module, other than the Triton custom calls, that read or write a per-slot float tensor."""
    hits = []
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" in line or _is_plumbing(line):
            continue
        shapes = {tuple(int(v) for v in m.group(1).split("x")) for m in _TYPE.finditer(line)}
        if shapes & per_slot_shapes:
            hits.append(line.strip()[:200])
    return hits


def _lower_layer_for_cuda(fused: bool):
    t, k, d, f, n = 48, 4, 40, 56, 6  # T k = 192 rows; no other dimension of the step equals 192, 40 or 56
    cfg = NullMoEConfig(hidden_dim=d, intermediate_dim=f, n_routed_experts=n, num_experts_per_tok=k,
                        gmm_backend="triton", fused_experts=fused)
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    layer = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, layer)
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    x = hax.named(jnp.zeros((t, d), jnp.bfloat16), (hax.Axis("batch", t), cfg.Embed))
    mask = jnp.zeros((t, k), bool)

    def step(params, x, mask):
        model = eqx.combine(params, static)
        y, _ = model.apply(x, model.route_forced(x, null_mask=mask))
        return jnp.sum(y.array.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.value_and_grad(step, argnums=(0, 1)))
    text = grad.trace(params, x, mask).lower(lowering_platforms=("cuda",)).as_text()
    per_slot = {(t * k, d), (t * k, f), (t, k, d)}
    return text, per_slot


def test_cuda_lowering_holds_the_kernels_and_no_per_slot_float_op():
    try:
        text, per_slot = _lower_layer_for_cuda(fused=True)
    except Exception as err:  # pragma: no cover - a jaxlib that cannot lower Pallas-Triton for CUDA
        pytest.skip(f"this jaxlib cannot lower Pallas-Triton for CUDA on this host: {type(err).__name__}: {err}")
    names = set(re.findall(r'name = "(null_moe_fused_[a-z0-9_]+)"', text)) or set(re.findall(r"null_moe_fused_[a-z0-9_]+", text))
    # forward: up, down, combine; backward: down_bwd, dw2, dx_rows, combine, dw13
    for kernel in ("up", "down", "combine", "down_bwd", "dw2", "dx_rows", "dw13"):
        assert any(name.startswith(f"null_moe_fused_{kernel}") for name in names), (kernel, names)
    assert text.count("__gpu$xla.gpu.triton") >= 8
    assert "stablehlo.while" not in text  # interpret mode would lower each kernel to loops
    hits = _per_slot_float_ops(text, per_slot)
    assert hits == [], "\n".join(hits)

    # the unfused Triton path, for contrast, does move per-slot rows outside its kernels
    text, per_slot = _lower_layer_for_cuda(fused=False)
    assert _per_slot_float_ops(text, per_slot)


# ---------------------------------------------------------------------------------------------------------------
# Without Pallas' Triton backend.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_auto_falls_back_when_pallas_triton_is_gone(monkeypatch):
    monkeypatch.setattr(G, "triton_available", lambda: False)
    monkeypatch.setattr(G, "_tokamax_available", lambda: False)
    assert G.resolve_backend("auto", platform="gpu") == "ragged_dot"
    monkeypatch.setattr(G, "_tokamax_available", lambda: True)
    assert G.resolve_backend("auto", platform="gpu") == "tokamax"
    assert G.resolve_backend("auto", platform="cpu") == "tiled"
    with pytest.raises(ValueError, match="Triton backend"):
        G.resolve_backend("triton", platform="gpu")


def test_import_without_pallas_triton_module():
    """With jax.experimental.pallas.triton unimportable (as in a JAX that dropped it), null_moe imports, reports
    the backend missing, auto on GPU falls back, and the CPU layer still runs."""
    child = textwrap.dedent(
        """
        import sys
        sys.modules["jax.experimental.pallas.triton"] = None   # import fails, as when JAX removes it
        import jax, haliax as hax
        from null_moe import NullMoEConfig, NullRoutedMoE, gmm, pallas_triton
        assert not pallas_triton.triton_available()
        assert gmm.resolve_backend("auto", platform="gpu") in ("tokamax", "ragged_dot")
        try:
            gmm.resolve_backend("triton", platform="gpu")
            raise SystemExit("explicit triton should fail")
        except ValueError as err:
            assert "Triton backend" in str(err)
        cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                            null_route_frac=0.5)
        layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
        x = hax.random.normal(jax.random.PRNGKey(1), (hax.Axis("t", 6), cfg.Embed))
        y, _ = layer(x)
        print("OK", layer.backend)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK tiled" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (scripts/gpu/device_check.sh runs these; skipped elsewhere).
# ---------------------------------------------------------------------------------------------------------------
ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.accelerator
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.default_backend() == 'gpu')")
@pytest.mark.parametrize(
    "dtype,dims",
    [
        ("bfloat16", (1000, 8, 200, 360, 12)),  # T, k, D, F, E: no dimension a multiple of the default tiles
        ("float32", (512, 4, 256, 384, 8)),
    ],
)
def test_gpu_compiled_matches_reference(dtype, dims):
    dtype = jnp.dtype(dtype)
    t, k, d, f, e = dims
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(t), 3)
    x = jax.random.normal(kx, (t, d)).astype(dtype)
    w1, w2, w3 = _weights(kw, dtype, d=d, f=f, e=e)
    cot = jax.random.normal(kc, (t, d)).astype(dtype)

    @jax.jit
    def ours(ids, wts, x, w1, w2, w3, cot):
        def op(wts, x, w1, w2, w3):
            dd = make_dispatch(ids, wts, e)
            return TF.triton_expert_mlp(x, dd.token_idx, dd.inv_idx.reshape(t, k), dd.row_weights, dd.group_sizes,
                                        w1, w2, w3, interpret=False)

        out, vjp = jax.vjp(op, wts, x, w1, w2, w3)
        return out, vjp(cot)

    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    # bf16: f32 accumulation, a / b / h / y rounded once each; f32 inputs run as TF32 on the tensor cores
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-2
    for null_frac in (0.0, 0.5, 0.9, 1.0):
        ids, wts = _routing(int(null_frac * 10) + t, null_frac, t=t, k=k, e=e)
        all_null = jnp.asarray(np.all(np.asarray(ids) == e, axis=1))[:, None]
        x_p = jnp.where(all_null, jnp.nan, x).astype(dtype)
        cot_p = jnp.where(all_null, jnp.nan, cot).astype(dtype)
        out, grads = ours(ids, wts, x_p, w1, w2, w3, cot_p)
        ref_out, ref_grads = _reference_value_and_grads(
            ids, wts, jnp.where(all_null, 0.0, f32(x)), f32(w1), f32(w2), f32(w3), jnp.where(all_null, 0.0, f32(cot))
        )
        if null_frac == 1.0:
            for got in (out, *grads):
                assert np.all(np.asarray(got, np.float32) == 0)
            continue
        _close(out, ref_out, tol, f"out p={null_frac}")
        for name, got, want in zip(("wts", "x", "w1", "w2", "w3"), grads, ref_grads):
            _close(got, want, tol, f"{name} p={null_frac}")
