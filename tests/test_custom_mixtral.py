"""The null_mixtral LmConfig and model: parsing and validation, FLOPs, equivalence with stock Levanter Mixtral
at p = 0, gradients through the logged aux losses, inference mode. In-process, tiny shapes."""

from __future__ import annotations

import dataclasses
import math
import os

import draccus
import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import levanter.tracker
from levanter.layers.attention import AttentionMask
from levanter.main.train_lm import TrainLmConfig
from levanter.models.lm_model import LmConfig, LmExample, compute_next_token_loss
from levanter.models.mixtral import MixtralConfig as StockMixtralConfig
from levanter.models.mixtral import MixtralLMHeadModel as StockMixtralLMHeadModel
from levanter.tracker.tracker import DictTracker
from levanter.utils.tree_utils import inference_mode

from experiments.speedrun import custom_mixtral
from experiments.speedrun.custom_mixtral import MixtralConfig, NullMixtralLMHeadModel, moe_stats_to_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "speedrun", "tiny_cpu.yaml")

SMALL = dict(
    seq_len=16,
    hidden_dim=32,
    intermediate_dim=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    gradient_checkpointing=False,
    tile_rows=8,
)
VOCAB = hax.Axis("vocab", 64)


def _parse(args=()):
    return draccus.parse(config_class=TrainLmConfig, config_path=TINY_YAML, args=list(args))


def _root_causes(exc: BaseException):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


# --- config --------------------------------------------------------------------------------------------------
def test_registered_under_null_mixtral_and_tiny_yaml_parses():
    assert LmConfig.get_choice_class("null_mixtral") is MixtralConfig
    cfg = _parse()
    assert isinstance(cfg.model, MixtralConfig)
    assert cfg.model.null_route_frac == 0.5 and cfg.model.lbl_coef and cfg.model.rzl_coef
    assert cfg.trainer.require_accelerator is False
    assert cfg.trainer.tracker.mode == "offline"
    # overrides pass through draccus
    cfg = _parse(["--model.null_route_frac", "0.3", "--model.take_until_null", "true", "--trainer.num_train_steps", "7"])
    assert cfg.model.null_route_frac == 0.3 and cfg.model.take_until_null and cfg.trainer.num_train_steps == 7


@pytest.mark.parametrize(
    "args, field",
    [
        (["--model.null_route_frac", "1.0"], "null_route_frac"),
        (["--model.null_route_frac", "-0.1"], "null_route_frac"),
        (["--model.num_experts_per_tok", "9"], "num_experts_per_tok"),  # tiny has N = 8
        (["--model.num_null_experts", "-1"], "num_null_experts"),
        (["--model.gmm_backend", "cuda_magic"], "gmm_backend"),
    ],
)
def test_invalid_values_fail_at_parse_time_naming_the_field(args, field, capsys):
    with pytest.raises((Exception, SystemExit)) as info:  # argparse rejects Literal choices with SystemExit
        _parse(args)
    messages = [str(e) for e in _root_causes(info.value)] + [capsys.readouterr().err]
    assert any(field in m for m in messages), messages


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="null_route_frac"):
        MixtralConfig(**SMALL, null_route_frac=1.0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MixtralConfig(**{**SMALL, "num_experts_per_tok": 5})
    with pytest.raises(ValueError, match="num_kv_heads"):
        MixtralConfig(**{**SMALL, "num_kv_heads": 3})


def test_moe_config_carries_every_null_field():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.25, take_until_null=True, num_null_experts=3,
                        renormalize_real=False, lbl_coef=None, gmm_backend="ragged_dot")
    m = cfg.moe_config()
    assert (m.hidden_dim, m.intermediate_dim, m.n_routed_experts, m.num_experts_per_tok) == (32, 48, 4, 2)
    assert (m.null_route_frac, m.take_until_null, m.num_null_experts, m.renormalize_real) == (0.25, True, 3, False)
    assert m.lbl_coef is None and m.rzl_coef == 0.001 and m.gmm_backend == "ragged_dot" and m.tile_rows == 8
    assert cfg.num_null == 3


# --- FLOPs ---------------------------------------------------------------------------------------------------
def _stock_twin(cfg: MixtralConfig) -> StockMixtralConfig:
    return StockMixtralConfig(
        seq_len=cfg.seq_len, hidden_dim=cfg.hidden_dim, intermediate_dim=cfg.intermediate_dim,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
    )


def test_flops_at_p0_equal_stock_levanter_mixtral():
    cfg = MixtralConfig(**SMALL)
    assert cfg.flops_per_token(1000) == pytest.approx(_stock_twin(cfg).flops_per_token(1000), rel=1e-12)


@pytest.mark.parametrize("p, take_until_null", [(0.5, False), (0.3, False), (0.5, True)])
def test_flops_count_expected_real_experts(p, take_until_null):
    base = MixtralConfig(**SMALL)
    cfg = dataclasses.replace(base, null_route_frac=p, take_until_null=take_until_null)
    D, F, L, k = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_layers, cfg.num_experts_per_tok
    e = cfg.expected_real_experts_per_token
    if not take_until_null:
        # balanced routing over N real + M null entries: k N / (N + M), about k (1 - p)
        assert e == pytest.approx(k * cfg.n_routed_experts / (cfg.n_routed_experts + cfg.num_null))
    assert 0 < e < k
    saved = L * 6 * D * F * (k - e)  # 2 (mul-add) x 3 matrices x D x F per skipped assignment
    null_gate = L * 2 * D
    assert cfg.flops_per_token(1000) == pytest.approx(base.flops_per_token(1000) - saved + null_gate, rel=1e-12)


def test_flops_accepts_context_length_both_ways():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    assert cfg.flops_per_token(1000) == cfg.flops_per_token(1000, cfg.seq_len)
    assert cfg.flops_per_token(1000, context_length=cfg.seq_len) == cfg.flops_per_token(1000)
    assert cfg.flops_per_token(1000, 4 * cfg.seq_len) > cfg.flops_per_token(1000)  # attention grows with context


# --- model ---------------------------------------------------------------------------------------------------
def _tokens(cfg, batch=2, seed=0):
    Batch = hax.Axis("batch", batch)
    ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, cfg.seq_len), 0, VOCAB.size)
    return hax.named(ids, (Batch, cfg.Pos))


def _example(cfg, batch=2):
    tokens = _tokens(cfg, batch)
    loss_mask = hax.ones(tokens.axes, dtype=jnp.int32)
    return LmExample(tokens=tokens, loss_mask=loss_mask, attn_mask=AttentionMask.causal())


def test_flops_match_levanter_formula_term_by_term():
    from levanter.utils.flop_utils import lm_flops_per_token

    for p, shared in ((0.0, 0), (0.5, 1)):
        cfg = MixtralConfig(**SMALL, null_route_frac=p, n_shared_experts=shared)
        ref = lm_flops_per_token(
            hidden_dim=cfg.hidden_dim, intermediate_dim=cfg.intermediate_dim, num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads, num_heads=cfg.num_heads, seq_len=cfg.seq_len, vocab_size=1000, glu=True,
            num_experts=cfg.n_routed_experts, num_shared_experts=shared,
            num_experts_per_tok=cfg.expected_real_experts_per_token,
        ) + (cfg.num_layers * 2 * cfg.hidden_dim if p > 0 else 0)
        assert cfg.flops_per_token(1000) == pytest.approx(ref, rel=1e-12)


def test_build_param_count_matches_formula():
    for p, shared, bias in ((0.0, 0, False), (0.5, 0, False), (0.5, 1, True)):
        cfg = MixtralConfig(**SMALL, null_route_frac=p, n_shared_experts=shared, use_bias=bias)
        model = eqx.filter_eval_shape(cfg.build, VOCAB, key=jax.random.PRNGKey(0))
        n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model) if hasattr(x, "shape"))
        assert n == cfg.total_trainable_params(VOCAB.size)
        assert isinstance(model, NullMixtralLMHeadModel)


def _copy_into_stock(ours: NullMixtralLMHeadModel, stock: StockMixtralLMHeadModel) -> StockMixtralLMHeadModel:
    """Our p = 0 model's weights in stock Levanter's Mixtral (same module names; ours adds the null gate)."""
    pairs = [
        (lambda m: m.embeddings.token_embeddings.weight, lambda m: m.embeddings.token_embeddings.weight),
        (lambda m: m.lm_head.weight, lambda m: m.lm_head.weight),
        (lambda m: m.transformer.norm.weight, lambda m: m.transformer.norm.weight),
    ]
    S = "transformer.layers.stacked."
    for path in ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
                 "block_sparse_moe.gate.weight", "block_sparse_moe.experts.w1.weight",
                 "block_sparse_moe.experts.w2.weight", "block_sparse_moe.experts.w3.weight"]:
        get = lambda m, path=path: _getpath(m, S + path)  # noqa: E731
        pairs.append((get, get))
    for get_ours, get_stock in pairs:
        src, dst = get_ours(ours), get_stock(stock)
        assert src.axes == dst.axes or set(a.name for a in src.axes) == set(a.name for a in dst.axes), (src.axes, dst.axes)
        stock = eqx.tree_at(get_stock, stock, src.rearrange(dst.axes))
    return stock


def _getpath(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_p0_model_matches_stock_levanter_mixtral():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.0, attn_backend=None)
    stock_cfg = dataclasses.replace(_stock_twin(cfg), gradient_checkpointing=False, flash_attention_block_size=None)
    ours = cfg.build(VOCAB, key=jax.random.PRNGKey(1))
    stock = StockMixtralLMHeadModel.init(VOCAB, stock_cfg, key=jax.random.PRNGKey(2))
    stock = _copy_into_stock(ours, stock)
    tokens = _tokens(cfg)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with hax.partitioning.set_mesh(mesh):
        x_ours, aux_ours = ours.activations(tokens, AttentionMask.causal())
        x_stock, aux_stock = stock.activations(tokens, AttentionMask.causal())
    np.testing.assert_allclose(x_ours.rearrange(x_stock.axes).array, x_stock.array, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(aux_ours.array), float(aux_stock.array), rtol=1e-4)


def test_grad_through_logged_aux_losses_and_logged_keys():
    """Stock Levanter Mixtral crashes here ("IO callbacks do not support JVP"); everything we log is
    stop_gradient'ed, so jit(grad) with a live tracker works and the stats reach the tracker."""
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    model = cfg.build(VOCAB, key=jax.random.PRNGKey(0))
    example = _example(cfg)
    tracker = DictTracker()
    levanter.tracker.set_global_tracker(tracker)
    try:
        @eqx.filter_jit
        def loss_and_grad(m):
            return eqx.filter_value_and_grad(lambda mm: compute_next_token_loss(mm, example).array)(m)

        loss, grads = loss_and_grad(model)
        jax.block_until_ready(loss)
        jax.effects_barrier()
    finally:
        levanter.tracker.set_global_tracker(None)
    assert np.isfinite(float(loss))
    g = grads.transformer.layers.stacked.block_sparse_moe
    assert float(jnp.abs(g.gate.weight.array).sum()) > 0 and float(jnp.abs(g.null_gate.weight.array).sum()) > 0
    logged = tracker.metrics
    for key in ["moe/null_frac", "moe/experts_per_token", "moe/all_null_frac", "moe/load_violation_max",
                "moe/routing_entropy", "moe/load_balancing_loss", "moe/router_z_loss", "moe/layer0/null_frac",
                "moe/layer1/expert3_load", "moe/expert0_load", "train/load_balancing_loss", "train/router_z_loss"]:
        assert key in logged, (key, sorted(logged)[:20])
        assert np.isfinite(float(logged[key]))
    assert 0.0 <= float(logged["moe/null_frac"]) <= 1.0
    loads = sum(float(logged[f"moe/layer0/expert{j}_load"]) for j in range(cfg.n_routed_experts))
    assert loads == pytest.approx(1.0, abs=1e-5)


def test_aux_loss_is_the_sum_over_layers_and_inference_mode_drops_it():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    model = cfg.build(VOCAB, key=jax.random.PRNGKey(0))
    example = _example(cfg)
    x, aux = model.activations(example.tokens, example.attn_mask)
    extras = model.routing_extras(example.tokens, example.attn_mask)
    expected = hax.sum(extras["load_balancing_loss"] + extras["router_z_loss"], axis=cfg.Layers.name)
    assert float(aux.array) == pytest.approx(float(expected.array), rel=1e-6)
    assert float(aux.array) > 0
    stats = moe_stats_to_log(extras, cfg)
    assert float(stats["train/load_balancing_loss"]) == pytest.approx(
        float(hax.sum(extras["load_balancing_loss"], axis=cfg.Layers.name).array), rel=1e-6)

    inf = inference_mode(model, True)
    assert inf.inference and not model.inference
    x_inf = inf.activations(example.tokens, example.attn_mask)
    assert not isinstance(x_inf, tuple)
    np.testing.assert_allclose(x_inf.array, x.array, rtol=1e-6)
    train_loss = float(compute_next_token_loss(model, example).array)
    eval_loss = float(compute_next_token_loss(inf, example).array)
    assert train_loss == pytest.approx(eval_loss + float(aux.array), rel=1e-5)
    # logits path (Levanter's generic __call__)
    logits = model(example.tokens, example.attn_mask)
    assert logits.resolve_axis("vocab").size == VOCAB.size


def test_log_expert_loads_off_drops_per_expert_keys():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5, log_expert_loads=False)
    model = cfg.build(VOCAB, key=jax.random.PRNGKey(0))
    stats = moe_stats_to_log(model.routing_extras(_tokens(cfg)), cfg)
    assert "moe/null_frac" in stats and not any("_load" in k and "/expert" in k for k in stats)


def test_step_aligned_tracker_files_stats_under_the_step_that_produced_them():
    """The jitted step does not know its number: its stats are buffered by the host callback and merged into
    the trainer's next log call that has a step (the step that produced them); leftovers flush at finish."""
    inner = DictTracker()
    tracker = custom_mixtral.StepAlignedTracker(inner)
    try:
        custom_mixtral._host_moe_stats({"moe/null_frac": np.float32(0.25)})
        tracker.log({"train/loss": 1.0}, step=3)
        tracker.log({"throughput/x": 2.0}, step=3)  # later logs of the same step: nothing pending any more
        assert inner.metrics["step_3"] == {"throughput/x": 2.0}
        custom_mixtral._host_moe_stats({"moe/null_frac": np.float32(0.5)})
        tracker.log({"train/loss": 0.9}, step=4)
        assert inner.metrics["step_4"] == {"moe/null_frac": 0.5, "train/loss": 0.9}
        custom_mixtral._host_moe_stats({"moe/null_frac": np.float32(0.75)})
    finally:
        tracker.finish()
    assert inner.metrics["step_4"] == {"moe/null_frac": 0.75}  # flushed at the last step seen
    assert custom_mixtral._STEP_ALIGNED_TRACKERS == 0
    # without an aligned tracker the stats go straight to the current tracker (jit_log semantics)
    plain = DictTracker()
    levanter.tracker.set_global_tracker(plain)
    try:
        custom_mixtral._host_moe_stats({"moe/null_frac": np.float32(0.125)})
    finally:
        levanter.tracker.set_global_tracker(None)
    assert plain.metrics == {"moe/null_frac": 0.125}
