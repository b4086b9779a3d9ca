"""NullRoutedMoE against the dense reference, stock Levanter at p = 0, and the degenerate cases."""

from __future__ import annotations

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pathlib import Path

from null_moe import NullMoEConfig, NullRoutedMoE
from tests import reference as ref

Batch, Pos = hax.Axis("batch", 2), hax.Axis("position", 6)


def _layer_and_input(cfg, seed=0, null_bias=0.0):
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(seed))
    x = hax.random.normal(jax.random.PRNGKey(seed + 100), (Batch, Pos, cfg.Embed))
    if null_bias:
        # push the null logit up along x's mean direction so that some tokens go all-null
        w = layer.null_gate.weight.array + null_bias * jnp.ones_like(layer.null_gate.weight.array)
        layer = eqx.tree_at(lambda l: l.null_gate.weight, layer, hax.named(w, layer.null_gate.weight.axes))
    return layer, x


def _loss_and_parts(layer, x, cot):
    y, extras = layer(x)
    loss = hax.sum(y * cot).scalar() + extras["load_balancing_loss"].scalar() + extras["router_z_loss"].scalar()
    return loss, (y, extras)


@eqx.filter_jit
def _layer_grads(layer, x, cot):
    (loss, aux), grads = eqx.filter_value_and_grad(
        lambda l, x: _loss_and_parts(l, x, cot), has_aux=True
    )(layer, x)
    gx = jax.grad(lambda x: _loss_and_parts(layer, x, cot)[0])(x)
    return loss, aux, grads, gx


def _reference_grads(layer, x, cot, selection_bias=0.0):
    """The dense reference; ``selection_bias`` is added to the null copies' logits for choosing the slots only."""
    cfg = layer.config
    x_flat = ref.flat_tokens(layer, x)
    logits = ref.expanded_logits(cfg, x_flat, *ref.raw_params(layer)[:2])
    selection = np.asarray(logits).copy()
    selection[:, cfg.n_routed_experts:] += selection_bias
    pool_ids, null = ref.route_per_token(cfg, np.asarray(jax.nn.softmax(jnp.asarray(selection), axis=-1)))
    cot_flat = ref.flat_tokens(layer, cot)

    def loss(layer, x_flat):
        y, lbl, rzl = ref.dense_forward(layer, x_flat, pool_ids, null)
        return jnp.sum(y * cot_flat) + lbl + rzl, (y, lbl, rzl)

    (value, (y, lbl, rzl)), (g_layer, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x_flat)
    expert_of_slot = np.where(null, cfg.n_routed_experts, pool_ids)
    return value, y, lbl, rzl, g_layer, g_x, ref.reference_stats(cfg, expert_of_slot)



def _assert_matches(layer, got, want):
    """The layer's (loss, y, extras, grads, dx) against _reference_grads' figures: outputs, aux losses, routing
    statistics, the loss, and the gradients of x and of every parameter (finite)."""
    loss, y, extras, grads, gx = got
    r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats = want
    np.testing.assert_allclose(ref.flat_tokens(layer, y), r_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(extras["load_balancing_loss"].array, r_lbl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(extras["router_z_loss"].array, r_rzl, rtol=1e-5, atol=1e-7)
    for name, value in r_stats.items():
        np.testing.assert_allclose(np.asarray(extras[name].array), value, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, r_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.flat_tokens(layer, gx), r_gx, atol=1e-5, rtol=1e-4)
    for name, a, b in zip(["gate", "null_gate", "w1", "w2", "w3"], ref.raw_params(grads), ref.raw_params(r_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=name)
        assert np.all(np.isfinite(a)), name

CASES = [
    # (p, k, N, num_null, take_until_null, renormalize_real)
    (0.0, 1, 4, None, False, True),
    (0.1, 2, 8, None, False, True),  # M = 1 < k
    (0.5, 4, 8, None, False, True),  # M = 8 >= k
    (0.5, 4, 8, None, True, True),
    (0.9, 8, 8, None, False, False),  # M = 72
    (0.9, 8, 8, None, True, True),
    (0.5, 2, 4, 1, True, False),  # M = 1 < k, explicit
    (0.3, 4, 6, 3, False, True),
]


@pytest.mark.fast
@pytest.mark.parametrize("p,k,n,m,tun,renorm", CASES)
def test_layer_matches_dense_reference(p, k, n, m, tun, renorm):
    cfg = NullMoEConfig(
        hidden_dim=8,
        intermediate_dim=16,
        n_routed_experts=n,
        num_experts_per_tok=k,
        null_route_frac=p,
        num_null_experts=m,
        take_until_null=tun,
        renormalize_real=renorm,
        tile_rows=8,
    )
    layer, x = _layer_and_input(cfg, seed=int(p * 10) + k)
    cot = hax.random.normal(jax.random.PRNGKey(7), x.axes)
    loss, (y, extras), grads, gx = _layer_grads(layer, x, cot)
    r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats = _reference_grads(layer, x, cot)

    _assert_matches(layer, (loss, y, extras, grads, gx), (r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats))
    if p > 0:
        assert 0 < float(extras["null_frac"].array) <= 1


def test_layer_as_shipped_matches_dense_reference():
    """tile_rows left at its default (the tests above pin 8): 1024 tokens x 4 slots give each expert hundreds of
    rows, so the fused kernel runs big tiles, small tiles and (here) M = 1 < k null slots, forward and backward."""
    from null_moe.tiled import DEFAULT_TILE_ROWS

    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=4,
                        null_route_frac=0.25)
    assert cfg.tile_rows is None and cfg.fused_experts and cfg.num_null == 1
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(30))
    axes = (hax.Axis("batch", 4), hax.Axis("position", 256), cfg.Embed)
    x, cot = hax.random.normal(jax.random.PRNGKey(31), axes), hax.random.normal(jax.random.PRNGKey(32), axes)
    loss, (y, extras), grads, gx = _layer_grads(layer, x, cot)
    r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats = _reference_grads(layer, x, cot)
    rows = np.asarray(extras["expert_loads"].array) * 4 * 1024 * (1 - float(extras["null_frac"].array))
    assert rows.max() > DEFAULT_TILE_ROWS and 0.05 < float(extras["null_frac"].array) < 0.5, rows

    np.testing.assert_allclose(ref.flat_tokens(layer, y), r_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, r_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.flat_tokens(layer, gx), r_gx, atol=1e-5, rtol=1e-4)
    for name, a, b in zip(["gate", "null_gate", "w1", "w2", "w3"], ref.raw_params(grads), ref.raw_params(r_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))), rtol=1e-4, err_msg=name)


def test_p0_equals_stock_levanter_block():
    from jax.sharding import Mesh
    from levanter.models.mixtral import MixtralConfig, MixtralSparseMoeBlock

    lc = MixtralConfig(
        seq_len=Pos.size, hidden_dim=16, intermediate_dim=32, n_routed_experts=6, num_experts_per_tok=2,
        num_heads=2, num_kv_heads=2,
    )
    block = MixtralSparseMoeBlock.init(lc, key=jax.random.PRNGKey(0))
    cfg = NullMoEConfig(hidden_dim=16, intermediate_dim=32, n_routed_experts=6, num_experts_per_tok=2)  # as shipped
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(1))
    layer = eqx.tree_at(
        lambda l: (l.gate, l.experts.w1, l.experts.w2, l.experts.w3),
        layer,
        (block.gate, block.experts.w1, block.experts.w2, block.experts.w3),
    )
    x = hax.random.normal(jax.random.PRNGKey(2), (Batch, lc.Pos, lc.Embed))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with hax.partitioning.set_mesh(mesh):
        y_stock, e_stock = block(x)
    y, e = layer(x)
    # not bit for bit (the expert matmuls sum in another order): float32 rounding, 6e-8 measured on |y| up to 1.3
    assert float(jnp.max(jnp.abs((y - y_stock).array))) <= 1e-6 * max(1.0, float(jnp.max(jnp.abs(y_stock.array))))
    for name in ("load_balancing_loss", "router_z_loss"):
        np.testing.assert_allclose(e[name].array, e_stock[name].array, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(e["expert_loads"].array, e_stock["expert_loads"].array, atol=1e-7)
    assert float(e["null_frac"].array) == 0.0 and float(e["experts_per_token"].array) == 2.0


def _all_null_layer(cfg):
    layer, x = _layer_and_input(cfg, seed=3)
    # positive inputs and a large positive null gate: the null logit is far above every real logit, so every
    # slot of every token is null (k <= M)
    x = hax.named(jnp.abs(x.array), x.axes)
    w = hax.named(jnp.full_like(layer.null_gate.weight.array, 100.0), layer.null_gate.weight.axes)
    return eqx.tree_at(lambda l: l.null_gate.weight, layer, w), x


@pytest.mark.fast
def test_all_null_batch_gives_zero_output_and_finite_grads():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5, tile_rows=8)
    layer, x = _all_null_layer(cfg)
    cot = hax.random.normal(jax.random.PRNGKey(7), x.axes)
    loss, (y, extras), grads, gx = _layer_grads(layer, x, cot)
    assert float(extras["null_frac"].array) == 1.0
    assert float(extras["all_null_frac"].array) == 1.0
    assert np.all(np.asarray(y.array) == 0.0)
    for leaf in jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)) + [gx.array]:
        assert np.all(np.isfinite(np.asarray(leaf)))
    w1, w2, w3 = grads.experts.raw_weights()
    assert np.all(np.asarray(w1) == 0) and np.all(np.asarray(w2) == 0) and np.all(np.asarray(w3) == 0)


def test_one_all_null_token_among_real_ones():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5, take_until_null=True, tile_rows=8)
    layer, x = _layer_and_input(cfg, seed=5)
    u_dir = layer.null_gate.weight.array[0]
    arr = x.array.at[0, 0].set(40.0 * u_dir / jnp.linalg.norm(u_dir))  # token (0, 0): null logit dominates
    x = hax.named(arr, x.axes)
    cot = hax.random.normal(jax.random.PRNGKey(7), x.axes)
    loss, (y, extras), grads, gx = _layer_grads(layer, x, cot)
    routing = layer.route(x)
    assert bool(jnp.all(routing.expert_ids[0] == cfg.n_routed_experts))
    assert bool(jnp.any(routing.expert_ids[1:] < cfg.n_routed_experts))
    assert np.all(np.asarray(y.array[0, 0]) == 0.0)
    assert float(jnp.abs(y.array[1:]).max()) > 0
    r_loss, r_y, *_ = _reference_grads(layer, x, cot)
    np.testing.assert_allclose(ref.flat_tokens(layer, y), r_y, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(gx.array)))


@pytest.mark.fast
def test_null_slots_get_no_rows():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5, tile_rows=8)
    layer, x = _layer_and_input(cfg, seed=9)
    routing = layer.route_forced(x, key=jax.random.PRNGKey(0), null_frac=0.5, mode="independent")
    from null_moe.dispatch import make_dispatch

    d = make_dispatch(routing.expert_ids, routing.weights, cfg.n_routed_experts)
    n_null = int(jnp.sum(routing.expert_ids == cfg.n_routed_experts))
    assert 0 < n_null < routing.expert_ids.size
    assert int(d.num_real) == routing.expert_ids.size - n_null
    assert d.group_sizes.shape == (cfg.n_routed_experts,)
    # rows past R are exactly the null slots
    assert np.all(np.asarray(routing.expert_ids).ravel()[np.asarray(d.sort_idx)[int(d.num_real):]] == cfg.n_routed_experts)


def test_forced_routing_through_layer_hits_target():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=8, num_experts_per_tok=4, tile_rows=64)
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    x = hax.random.normal(jax.random.PRNGKey(1), (hax.Axis("token", 4096), cfg.Embed))
    for mode in ("independent", "take_until_null"):
        routing = layer.route_forced(x, key=jax.random.PRNGKey(2), null_frac=0.5, mode=mode)
        _, extras = layer.apply(x, routing)
        assert abs(float(extras["null_frac"].array) - 0.5) <= 0.01, mode


@pytest.mark.fast
def test_input_shape_errors_name_the_axis():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
    # the layer's own message, not Haliax's: it names the size the config expects
    with pytest.raises(ValueError, match="'embed' axis has size 9, but the layer's hidden_dim is 8"):
        layer(hax.zeros((Batch, hax.Axis("embed", 9))))
    with pytest.raises(ValueError, match="'embed' axis of size hidden_dim=8"):
        layer(hax.zeros((Batch, hax.Axis("hidden", 8))))
    with pytest.raises(ValueError, match="no tokens"):
        layer(hax.zeros((hax.Axis("batch", 0), cfg.Embed)))
    with pytest.raises(ValueError, match="no tokens"):
        layer.route_forced(hax.zeros((hax.Axis("batch", 2), hax.Axis("position", 0), cfg.Embed)),
                           key=jax.random.PRNGKey(0), null_frac=0.5)
    with pytest.raises(TypeError, match="NamedArray"):
        layer(jnp.zeros((4, 8)))


@pytest.mark.fast
def test_backend_is_reported():
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    assert NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0)).backend == "tiled"


def test_route_forced_with_explicit_mask_matches_keyed_draw():
    from null_moe.routing import forced_null_mask

    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    layer, x = _layer_and_input(cfg, seed=4)
    key = jax.random.PRNGKey(11)
    keyed = layer.route_forced(x, key=key, null_frac=0.5, mode="take_until_null")
    mask = forced_null_mask(key, Batch.size * Pos.size, 2, 0.5, "take_until_null")
    explicit = layer.route_forced(x, null_mask=mask)
    for a, b in zip(keyed, explicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="null_mask"):
        layer.route_forced(x, null_mask=mask[:3])


def test_unfused_tiled_path_matches_fused():
    """fused_experts=False runs dispatch -> grouped_matmul x3 -> combine on the same tiled backend."""
    import dataclasses

    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=0.5, tile_rows=8)
    layer, x = _layer_and_input(cfg, seed=6)
    cot = hax.random.normal(jax.random.PRNGKey(7), x.axes)
    unfused = dataclasses.replace(layer, config=dataclasses.replace(cfg, fused_experts=False))
    _assert_same_outputs_and_grads(layer, unfused, x, cot)


@pytest.mark.parametrize("null_frac", [0.0, 0.5])
def test_triton_backend_layer_matches_tiled(null_frac):
    """gmm_backend="triton" (Pallas interpret mode off GPU) gives the tiled layer's outputs and gradients."""
    import dataclasses

    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        null_route_frac=null_frac, tile_rows=8, gmm_backend="tiled")
    layer, x = _layer_and_input(cfg, seed=12)
    cot = hax.random.normal(jax.random.PRNGKey(13), x.axes)
    triton = dataclasses.replace(layer, config=dataclasses.replace(cfg, gmm_backend="triton"))
    assert triton.backend == "triton"
    _assert_same_outputs_and_grads(layer, triton, x, cot)


def _assert_same_outputs_and_grads(layer_a, layer_b, x, cot):
    _, (y_a, _), g_a, gx_a = _layer_grads(layer_a, x, cot)
    _, (y_b, _), g_b, gx_b = _layer_grads(layer_b, x, cot)
    np.testing.assert_allclose(y_a.array, y_b.array, atol=1e-5)
    np.testing.assert_allclose(gx_a.array, gx_b.array, atol=1e-5)
    for a, b in zip(ref.raw_params(g_a), ref.raw_params(g_b)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sequence_balance_scope_is_the_mean_of_each_sequences_loss():
    """balance_scope="sequence": the load-balancing loss of each sequence alone (a loop over the batch with the
    batch-scope layer), averaged; statistics and outputs unchanged. One token axis: one group, as "batch"."""
    kw = dict(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2, null_route_frac=0.5,
              tile_rows=8)
    seq_layer, x = _layer_and_input(NullMoEConfig(**kw, balance_scope="sequence"), seed=5)
    batch_layer, _ = _layer_and_input(NullMoEConfig(**kw), seed=5)
    assert seq_layer.balance_groups(x) == Batch.size and batch_layer.balance_groups(x) == 1
    y_seq, e_seq = seq_layer(x)
    y_batch, e_batch = batch_layer(x)
    per_seq = [float(batch_layer(x[Batch.name, i])[1]["load_balancing_loss"].array) for i in range(Batch.size)]
    np.testing.assert_allclose(float(e_seq["load_balancing_loss"].array), np.mean(per_seq), rtol=1e-6)
    assert abs(float(e_seq["load_balancing_loss"].array) - float(e_batch["load_balancing_loss"].array)) > 1e-6
    np.testing.assert_array_equal(np.asarray(y_seq.array), np.asarray(y_batch.array))
    for name in ("null_frac", "expert_loads", "router_z_loss"):
        np.testing.assert_array_equal(np.asarray(e_seq[name].array), np.asarray(e_batch[name].array))
    flat = x.rearrange((Batch, Pos, x.axes[-1])).array.reshape(-1, 8)
    x_tok = hax.named(flat, (hax.Axis("token", flat.shape[0]), seq_layer.config.Embed))
    assert seq_layer.balance_groups(x_tok) == 1
    np.testing.assert_allclose(float(seq_layer(x_tok)[1]["load_balancing_loss"].array),
                               float(e_batch["load_balancing_loss"].array), rtol=1e-6)


# --- null_control ---------------------------------------------------------------------------------------------------
GOLDEN = Path(__file__).parent / "data" / "loss_control_golden.npz"
# (p, k, N, M, take_until_null, renormalize_real, balance_scope): the cases of the golden file, in its order
GOLDEN_CASES = [
    (0.5, 2, 8, None, False, True, "batch"),
    (0.25, 4, 6, 1, True, True, "sequence"),
    (0.75, 3, 4, None, False, False, "batch"),
]


def test_loss_control_equals_the_layer_before_null_control():
    """null_control="loss" (the default) is today's layer: outputs, routing, every extra and every gradient equal
    those the layer computed before null_control existed (tests/data/loss_control_golden.npz, written by the layer
    at commit bddc338 on the dev CPU: bit for bit there; a last-ulp tolerance for other CPUs)."""
    golden = np.load(GOLDEN)
    B, P = hax.Axis("batch", 3), hax.Axis("position", 8)
    for i, (p, k, n, m, tun, renorm, scope) in enumerate(GOLDEN_CASES):
        cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=n, num_experts_per_tok=k,
                            null_route_frac=p, num_null_experts=m, take_until_null=tun, renormalize_real=renorm,
                            balance_scope=scope, tile_rows=8)
        assert cfg.null_control == "loss"
        layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(10 + i))
        assert layer.null_bias is None  # no new parameter: checkpoints and optimizer state are as before
        x = hax.random.normal(jax.random.PRNGKey(20 + i), (B, P, cfg.Embed))
        cot = hax.random.normal(jax.random.PRNGKey(30 + i), (B, P, cfg.Embed))

        def loss(l, x):
            y, ex = l(x)
            return hax.sum(y * cot).scalar() + ex["load_balancing_loss"].scalar() + ex["router_z_loss"].scalar(), (y, ex)

        (v, (y, ex)), (g, gx) = eqx.filter_jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
        routing = eqx.filter_jit(lambda l, x: l.route(x))(layer, x)
        ours = {"loss": v, "y": y.array, "gx": gx.array, "expert_ids": routing.expert_ids, "weights": routing.weights,
                **{f"extras/{name}": val.array for name, val in ex.items()},
                **{f"grad/{name}": getattr(g, attr[0]).weight.array if len(attr) == 1 else
                   getattr(g.experts, attr[1]).weight.array
                   for name, attr in (("gate", ("gate",)), ("null_gate", ("null_gate",)), ("w1", ("experts", "w1")),
                                      ("w2", ("experts", "w2")), ("w3", ("experts", "w3")))}}
        want = {key.split("/", 1)[1]: golden[key] for key in golden.files if key.startswith(f"c{i}/")}
        assert set(ours) == set(want), (i, set(ours) ^ set(want))
        for name, value in ours.items():
            value = np.asarray(value)
            if value.dtype.kind in "iub":
                np.testing.assert_array_equal(value, want[name], err_msg=f"case {i} {name}")
            else:
                np.testing.assert_allclose(value, want[name], rtol=2e-6, atol=1e-7, err_msg=f"case {i} {name}")


BIAS_CASES = [
    # (p, k, N, M, take_until_null, renormalize_real, bias)
    (0.5, 2, 8, None, False, True, 0.8),
    (0.3, 4, 6, 3, True, True, 1.5),  # M = 3 < k
    (0.9, 8, 8, None, False, False, -1.0),
]


@pytest.mark.parametrize("p,k,n,m,tun,renorm,bias", BIAS_CASES)
def test_null_bias_changes_the_selection_only(p, k, n, m, tun, renorm, bias):
    """With a bias b the layer equals the dense reference whose slots are chosen on logits with u + b for the null
    copies and whose gate weights, aux losses and every gradient come from the unbiased logits; b gets no gradient
    from the output or the aux losses."""
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=n, num_experts_per_tok=k,
                        null_route_frac=p, num_null_experts=m, take_until_null=tun, renormalize_real=renorm,
                        tile_rows=8, null_control="bias")
    layer, x = _layer_and_input(cfg, seed=int(p * 10) + k)
    layer = eqx.tree_at(lambda l: l.null_bias, layer, hax.named(jnp.float32(bias), ()))
    cot = hax.random.normal(jax.random.PRNGKey(7), x.axes)
    loss, (y, extras), grads, gx = _layer_grads(layer, x, cot)
    r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats = _reference_grads(layer, x, cot, selection_bias=bias)
    _, _, _, _, _, _, unbiased_stats = _reference_grads(layer, x, cot)
    assert r_stats["null_frac"] != unbiased_stats["null_frac"]  # the bias moved some slots here

    _assert_matches(layer, (loss, y, extras, grads, gx), (r_loss, r_y, r_lbl, r_rzl, r_grads, r_gx, r_stats))
    assert float(grads.null_bias.array) == 0.0
    assert float(extras["null_bias"].array) == np.float32(bias)


def test_null_bias_signal_carries_the_control_error():
    """extras["null_bias_signal"] is 0 and its gradient for null_bias is this call's realized null fraction - p."""
    cfg = NullMoEConfig(hidden_dim=8, intermediate_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                        null_route_frac=0.5, tile_rows=8, null_control="bias")
    layer, x = _layer_and_input(cfg)
    assert float(layer.null_bias.array) == 0.0 and layer.null_bias.array.dtype == jnp.float32

    def signal(l):
        _, ex = l(x)
        return ex["null_bias_signal"].scalar(), ex

    (value, ex), g = eqx.filter_jit(eqx.filter_value_and_grad(signal, has_aux=True))(layer)
    assert float(value) == 0.0
    assert float(g.null_bias.array) == pytest.approx(float(ex["null_frac"].array) - 0.5, abs=1e-7)
    assert float(g.null_bias.array) != 0.0


def test_forced_routing_ignores_null_control():
    """The bench's forced routing reads no bias and no balance pool: same weights, same mask -> the same output,
    extras and gradients under either control (the bias here is far from 0, and the pool 'real')."""
    kw = dict(hidden_dim=8, intermediate_dim=16, n_routed_experts=8, num_experts_per_tok=4, null_route_frac=0.5,
              tile_rows=8)
    loss_layer = NullRoutedMoE.init(NullMoEConfig(**kw), key=jax.random.PRNGKey(3))
    bias_layer = NullRoutedMoE.init(NullMoEConfig(**kw, null_control="bias", balance_pool="real"),
                                    key=jax.random.PRNGKey(3))
    bias_layer = eqx.tree_at(lambda l: l.null_bias, bias_layer, hax.named(jnp.float32(2.5), ()))
    for a, b in zip(ref.raw_params(loss_layer), ref.raw_params(bias_layer)):  # the bias takes no key: same init
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = hax.random.normal(jax.random.PRNGKey(4), (Batch, Pos, loss_layer.config.Embed))
    cot = hax.random.normal(jax.random.PRNGKey(5), x.axes)
    key = jax.random.PRNGKey(6)

    @eqx.filter_jit
    def forced(layer):
        def loss(l):
            y, ex = l.apply(x, l.route_forced(x, key=key, null_frac=0.5, mode="take_until_null"))
            return hax.sum(y * cot).scalar() + ex["load_balancing_loss"].scalar() + ex["router_z_loss"].scalar(), (y, ex)
        return eqx.filter_value_and_grad(loss, has_aux=True)(layer)

    (la, (ya, ea)), ga = forced(loss_layer)
    (lb, (yb, eb)), gb = forced(bias_layer)
    assert float(la) == float(lb)
    np.testing.assert_array_equal(np.asarray(ya.array), np.asarray(yb.array))
    assert set(ea) == set(eb)
    for name in ea:
        np.testing.assert_array_equal(np.asarray(ea[name].array), np.asarray(eb[name].array), err_msg=name)
    for a, b in zip(ref.raw_params(ga), ref.raw_params(gb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
