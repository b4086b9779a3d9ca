"""The null_mixtral LmConfig and model: parsing and validation (through the training CLI's parser), FLOPs,
equivalence with stock Levanter Mixtral at p = 0, gradients through the logged aux losses, inference mode; the
CLI's one-line config errors, the step-aligned tracker and the run monitor (progress lines, realized FLOPs).
In-process, tiny shapes."""

from __future__ import annotations

import dataclasses
import io
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

from experiments.speedrun import levanter_pin_workarounds as pin
from experiments.speedrun import train
from experiments.speedrun.custom_mixtral import MixtralConfig, NullMixtralLMHeadModel, moe_stats_to_log
from experiments.speedrun.monitor import RunMonitor, default_progress_every

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
    """The training CLI's parser (what `python -m experiments.speedrun.train` uses)."""
    return train.parse_config(["--config_path", TINY_YAML, *args])


# --- config --------------------------------------------------------------------------------------------------
def test_registered_under_null_mixtral_and_tiny_yaml_parses():
    assert LmConfig.get_choice_class("null_mixtral") is MixtralConfig
    cfg = _parse()
    assert isinstance(cfg.model, MixtralConfig)
    assert cfg.model.null_route_frac == 0.5 and cfg.model.lbl_coef and cfg.model.rzl_coef
    assert cfg.trainer.require_accelerator is False
    assert cfg.trainer.tracker.mode == "offline"
    assert cfg.progress_every is None
    # overrides pass through draccus
    cfg = _parse(["--model.null_route_frac", "0.3", "--model.take_until_null", "true", "--trainer.num_train_steps", "7",
                  "--progress_every", "3"])
    assert cfg.model.null_route_frac == 0.3 and cfg.model.take_until_null and cfg.trainer.num_train_steps == 7
    assert cfg.progress_every == 3
    # Levanter's own TrainLmConfig parses the same file (the CLI's config class only narrows trainer.tracker)
    stock = draccus.parse(config_class=TrainLmConfig, config_path=TINY_YAML, args=[])
    assert stock.model == _parse().model


def test_tracker_overrides_parse(capsys):
    """--trainer.tracker.mode / .project (documented everywhere) work with the CLI's parser; the rest of the
    YAML's tracker section is kept. Levanter types trainer.tracker as TrackerConfig | Tuple[TrackerConfig, ...],
    which draccus can only take as a whole value: its own parser rejects the override."""
    cfg = _parse(["--trainer.tracker.mode", "online", "--trainer.tracker.project", "my-proj",
                  "--trainer.tracker.entity", "me"])
    tracker = cfg.trainer.tracker
    assert (tracker.mode, tracker.project, tracker.entity) == ("online", "my-proj", "me")
    assert tracker.tags == ["null_mixtral", "tiny_cpu"] and tracker.save_code is False
    assert type(tracker).__name__ == "WandbConfig"
    with pytest.raises(SystemExit):
        draccus.parse(config_class=TrainLmConfig, config_path=TINY_YAML, args=["--trainer.tracker.mode", "online"])
    assert "unrecognized arguments: --trainer.tracker.mode online" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.null_route_frac", "1.5"], "model.null_route_frac must be in [0, 1), got 1.5"),
        (["--model.null_route_frac", "1.0"], "model.null_route_frac must be in [0, 1), got 1.0"),
        (["--model.null_route_frac", "-0.1"], "model.null_route_frac must be in [0, 1), got -0.1"),
        (["--model.num_experts_per_tok", "9"], "model.num_experts_per_tok must be in [1, n_routed_experts=8], got 9"),
        (["--model.num_null_experts", "-1"], "model.num_null_experts"),
        (["--model.num_kv_heads", "3"], "model.num_heads=4 must be divisible by num_kv_heads=3"),
        (["--model.gmm_backend", "cuda_magic"], "argument --model.gmm_backend: invalid choice: 'cuda_magic'"),
        (["--model.bogus", "1"], "unrecognized arguments: --model.bogus 1"),
        (["--trainer.num_train_steps", "abc"], "trainer.num_train_steps: Couldn't parse 'abc' into an int"),
        (["--model.take_until_null", "maybe"], "model.take_until_null: Couldn't parse 'maybe' into a bool"),
    ],
)
@pytest.mark.fast
def test_invalid_values_fail_at_parse_time_naming_the_field(args, message):
    with pytest.raises(train.ConfigError) as info:
        _parse(args)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.fast
def test_cli_config_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    """train.main (in-process: no allocator re-exec) prints one `error: ...` line and returns 2 before any
    compute, for a bad value, an unknown field, a bad type, a missing config file and an unknown key in the YAML."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  type: null_mixtral\n  bogus_field: 1\n")
    cases = [
        (["--config_path", TINY_YAML, "--model.null_route_frac", "1.5"],
         "error: model.null_route_frac must be in [0, 1), got 1.5"),
        (["--config_path", TINY_YAML, "--model.bogus", "1"], "error: unrecognized arguments: --model.bogus 1"),
        (["--config_path", TINY_YAML, "--trainer.num_train_steps", "x"],
         "error: trainer.num_train_steps: Couldn't parse 'x' into an int"),
        (["--config_path", str(tmp_path / "missing.yaml")],
         f"error: config file not found: {tmp_path / 'missing.yaml'}"),
        (["--config_path", str(bad_yaml)], "error: model: The fields `bogus_field` are not valid for MixtralConfig"),
    ]
    for args, expected in cases:
        assert train.main(args) == train.EXIT_CONFIG_ERROR, args
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [expected], (args, captured.err[-2000:])
        assert captured.out == ""


@pytest.mark.fast
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
    assert (m.null_control, m.null_bias_rate, m.balance_pool) == ("loss", 2.0, "all")
    m = MixtralConfig(**SMALL, null_route_frac=0.5, null_control="bias", null_bias_rate=0.3,
                      balance_pool="real").moe_config()
    assert (m.null_control, m.null_bias_rate, m.balance_pool) == ("bias", 0.3, "real")
    with pytest.raises(ValueError, match="null_bias_rate"):
        MixtralConfig(**SMALL, null_route_frac=0.5, null_control="bias", null_bias_rate=0.0)


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


@pytest.mark.parametrize("p, take_until_null", [(0.5, False), (0.3, False), (0.5, True), (0.3, True)])
def test_flops_count_expected_real_experts(p, take_until_null):
    base = MixtralConfig(**SMALL)
    cfg = dataclasses.replace(base, null_route_frac=p, take_until_null=take_until_null)
    D, F, L, k = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_layers, cfg.num_experts_per_tok
    e = cfg.expected_real_experts_per_token
    assert e == pytest.approx(k * (1 - p))  # k (1 - p) in both modes
    saved = L * 6 * D * F * (k - e)  # 2 (mul-add) x 3 matrices x D x F per skipped assignment
    null_gate = L * 2 * D
    assert cfg.flops_per_token(1000) == pytest.approx(base.flops_per_token(1000) - saved + null_gate, rel=1e-12)


def test_flops_for_a_realized_number_of_experts():
    """flops_per_token(..., real_experts_per_token=e) swaps k (1 - p) for e, and nothing else."""
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    D, F, L = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_layers
    assert cfg.expert_flops_per_assignment == 6 * D * F
    expected = cfg.flops_per_token(1000)
    assert cfg.flops_per_token(1000, real_experts_per_token=cfg.expected_real_experts_per_token) == expected
    for e in (0.0, 0.7, 1.3, 2.0):
        realized = cfg.flops_per_token(1000, real_experts_per_token=e)
        assert realized - expected == pytest.approx(L * 6 * D * F * (e - cfg.expected_real_experts_per_token))
    assert cfg.flops_per_token(1000, 4 * cfg.seq_len, real_experts_per_token=1.0) > cfg.flops_per_token(
        1000, real_experts_per_token=1.0)


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
    for p, shared, bias, control in ((0.0, 0, False, "loss"), (0.5, 0, False, "loss"), (0.5, 1, True, "loss"),
                                     (0.5, 0, False, "bias")):
        cfg = MixtralConfig(**SMALL, null_route_frac=p, n_shared_experts=shared, use_bias=bias, null_control=control)
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
    tracker = pin.StepAlignedTracker(inner)
    try:
        pin._host_moe_stats({"moe/null_frac": np.float32(0.25)})
        tracker.log({"train/loss": 1.0}, step=3)
        tracker.log({"throughput/x": 2.0}, step=3)  # later logs of the same step: nothing pending any more
        assert inner.metrics["step_3"] == {"throughput/x": 2.0}
        pin._host_moe_stats({"moe/null_frac": np.float32(0.5)})
        tracker.log({"train/loss": 0.9}, step=4)
        assert inner.metrics["step_4"] == {"moe/null_frac": 0.5, "train/loss": 0.9}
        pin._host_moe_stats({"moe/null_frac": np.float32(0.75)})
    finally:
        tracker.finish()
    assert inner.metrics["step_4"] == {"moe/null_frac": 0.75}  # flushed at the last step seen
    assert pin._STEP_ALIGNED_TRACKERS == 0
    # without an aligned tracker the stats go straight to the current tracker (jit_log semantics)
    plain = DictTracker()
    levanter.tracker.set_global_tracker(plain)
    try:
        pin._host_moe_stats({"moe/null_frac": np.float32(0.125)})
    finally:
        levanter.tracker.set_global_tracker(None)
    assert plain.metrics == {"moe/null_frac": 0.125}


class _RecordingTracker(DictTracker):
    def __init__(self):
        super().__init__()
        self.rows = []
        self.summary = {}
        self.finished = False

    def log(self, metrics, *, step, commit=None):
        self.rows.append((step, dict(metrics)))

    def log_summary(self, metrics):
        self.summary.update(metrics)

    def finish(self):
        self.finished = True


def _step_logs(monitor, step, *, loss, per_layer, tokens_per_second=1000.0):
    """What the trainer logs for one step, in Levanter's order (routing stats arrive with the first call)."""
    stats = {f"moe/layer{i}/experts_per_token": e for i, e in enumerate(per_layer)}
    stats["moe/experts_per_token"] = sum(per_layer) / len(per_layer)
    stats["moe/null_frac"] = 1 - stats["moe/experts_per_token"] / 2
    monitor.log({**stats, "train/loss": loss, "global_step": step}, step=step)
    monitor.log({"throughput/tokens_per_second": tokens_per_second, "throughput/duration": 0.1}, step=step)
    monitor.log({"throughput/loading_time": 0.01}, step=step)


def test_run_monitor_logs_realized_flops_and_prints_progress():
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    inner, out = _RecordingTracker(), io.StringIO()
    monitor = RunMonitor(inner, model_config=cfg, vocab_size=VOCAB.size, num_train_steps=4, every=1, out=out,
                         hparams={"host/malloc": "resident"})
    assert inner.metrics["hparams"] == {"host/malloc": "resident"}
    monitor.log_summary({"throughput/theoretical_flops": 1e12})
    _step_logs(monitor, 0, loss=8.0, per_layer=[1.5, 0.5], tokens_per_second=2000.0)
    _step_logs(monitor, 1, loss=7.5, per_layer=[1.25, 0.75])
    rows = [m for s, m in inner.rows if "throughput/tokens_per_second" in m]
    D, F, L = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_layers
    first = rows[0]
    # forward + backward = 3 x forward; forward = 2 x 3 x D x F per real assignment, summed over layers
    assert first["throughput/realized_expert_flops_per_token"] == pytest.approx(3 * 6 * D * F * (1.5 + 0.5))
    assert first["throughput/realized_flops_per_token"] == pytest.approx(
        3 * cfg.flops_per_token(VOCAB.size, real_experts_per_token=1.0))
    assert first["throughput/expected_flops_per_token"] == pytest.approx(3 * cfg.flops_per_token(VOCAB.size))
    assert first["throughput/realized_gflops_per_second"] == pytest.approx(
        first["throughput/realized_flops_per_token"] * 2000.0 / 1e9)
    assert first["throughput/realized_mfu"] == pytest.approx(
        first["throughput/realized_flops_per_token"] * 2000.0 / 1e12 * 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 1/4  loss 8.0000") and lines[1].startswith("step 2/4")
    assert "null_frac 0.500" in lines[0] and "experts/tok 1.000" in lines[0] and "tok/s 2,000" in lines[0]
    assert monitor.steps_done == 2
    monitor.finish()  # stopped at 2 of 4 steps: the data ran out
    assert inner.summary["run/steps_done"] == 2 and inner.summary["run/data_exhausted"] is True and inner.finished


def test_run_monitor_prints_every_n_steps_plus_first_and_last():
    assert default_progress_every(16) == 1 and default_progress_every(200) == 2 and default_progress_every(5000) == 50
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    out = io.StringIO()
    monitor = RunMonitor(_RecordingTracker(), model_config=cfg, vocab_size=VOCAB.size, num_train_steps=10, every=4,
                         out=out)
    for step in range(3, 10):  # a resumed run: its first step is 3
        if step == 5:
            monitor.log({"eval/loss": 4.5}, step=step)  # an eval step is always printed
        _step_logs(monitor, step, loss=5.0, per_layer=[1.0, 1.0])
    monitor.log({"train/loss": 5.0}, step=9)  # Levanter's forced end-of-run hooks log the last step again ...
    monitor.log({"eval/loss": 4.25}, step=9)  # ... and run the eval once more
    monitor.log({"throughput/tokens_per_second": 1.0}, step=9)
    monitor.finish()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "6/10", "8/10", "10/10", "10/10"]
    assert "eval_loss 4.5000" in lines[1] and lines[4] == "step 10/10  eval_loss 4.2500"


# --- null_control: bias, inside Levanter's step -------------------------------------------------------------------
def _bias_model(rate=0.7, biases=(0.3, -0.2)):
    cfg = MixtralConfig(**SMALL, null_route_frac=0.5, null_control="bias", null_bias_rate=rate)
    model = cfg.build(VOCAB, key=jax.random.PRNGKey(0))
    model = eqx.tree_at(lambda m: m.transformer.layers.stacked.block_sparse_moe.null_bias, model,
                        hax.named(jnp.asarray(biases, jnp.float32), (cfg.Layers,)))
    return cfg, model


def _biases(model) -> np.ndarray:
    return np.asarray(model.transformer.layers.stacked.block_sparse_moe.null_bias.array)


def test_levanter_step_moves_each_layers_bias_by_rate_times_its_error():
    """Levanter's gradient accumulation (2 microbatches) and its take_train_step with AdamW (weight decay, gradient
    clipping, warmup): each layer's bias gets the error of the whole batch (the mean of the equal microbatches'
    errors) as its gradient and moves by exactly rate x (p - that layer's realized null fraction), whatever the
    learning rate (0 at the first warmup step); every other parameter gets the inner optimizer's update for the
    gradients without the bias, as if the bias were not there."""
    from jax.sharding import Mesh
    from levanter.grad_accum import microbatched
    from levanter.optim import AdamConfig
    from levanter.trainer_state import init_optimizer_for_trainables, take_train_step

    from experiments.speedrun.null_bias import null_bias_mask, wrap_optimizer

    cfg, model = _bias_model()
    example = _example(cfg, batch=4)
    Batch = example.tokens.resolve_axis("batch")

    @eqx.filter_jit
    def realized_of(m, tokens):
        return m.routing_extras(tokens, example.attn_mask)["null_frac"].array

    realized = np.asarray(realized_of(model, example.tokens))
    halves = [np.asarray(realized_of(model, example.tokens[Batch, hax.ds(i, 2)])) for i in (0, 2)]
    assert realized[0] != realized[1] and not np.allclose(halves[0], halves[1])  # layers and microbatches differ
    np.testing.assert_allclose((halves[0] + halves[1]) / 2, realized, atol=1e-6)

    def loss_fn(m, ex):
        return compute_next_token_loss(m, ex).scalar(), {}

    mapping = {"batch": "data"}
    with hax.partitioning.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))), hax.axis_mapping(mapping):
        grad_fn = microbatched(eqx.filter_value_and_grad(loss_fn, has_aux=True), Batch, 2, mapping, mapping)
        (_, _), grads = eqx.filter_jit(grad_fn)(model, example)
    np.testing.assert_allclose(_biases(grads), realized - 0.5, atol=1e-6)  # the control error, as the gradient

    adamw = AdamConfig(learning_rate=1e-3, weight_decay=0.1, warmup=10, max_grad_norm=1e-3)

    @eqx.filter_jit
    def two_steps(opt, grads):  # step 0 at warmup lr = 0, step 1 at lr > 0, the same gradients
        state = init_optimizer_for_trainables(opt, model)
        m1, state, _ = take_train_step(opt, model, state, grads)
        m2, _, _ = take_train_step(opt, m1, state, grads)
        return m1, m2

    ours = two_steps(wrap_optimizer(adamw.build(100), cfg.null_bias_rate), grads)
    step = 0.7 * (0.5 - realized)
    np.testing.assert_allclose(_biases(ours[0]), _biases(model) + step, atol=1e-6)
    np.testing.assert_allclose(_biases(ours[1]), _biases(model) + 2 * step, atol=1e-6)
    no_bias = jax.tree_util.tree_map(lambda g, m: jnp.zeros_like(g) if m else g, grads, null_bias_mask(grads))
    theirs = two_steps(adamw.build(100), no_bias)
    for a_model, b_model in zip(ours, theirs):
        a_tree, b_tree = eqx.filter(a_model, eqx.is_array), eqx.filter(b_model, eqx.is_array)
        for a, b, is_bias in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree),
                                 jax.tree_util.tree_leaves(null_bias_mask(a_tree))):
            if not is_bias:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(ours[1], eqx.is_array)),
                                                           jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))]
    assert max(moved) > 1e-5  # the other parameters did train at step 1


def test_null_bias_is_logged_per_layer_and_as_the_mean():
    cfg, model = _bias_model()
    stats = eqx.filter_jit(lambda m: moe_stats_to_log(m.routing_extras(_tokens(cfg)), cfg))(model)
    assert float(stats["moe/layer0/null_bias"]) == pytest.approx(0.3)
    assert float(stats["moe/layer1/null_bias"]) == pytest.approx(-0.2)
    assert float(stats["moe/null_bias"]) == pytest.approx(0.05)
    assert "moe/layer1/null_frac" in stats and "moe/null_frac" in stats
    assert not any("null_bias_signal" in k for k in stats)
    loss_cfg = MixtralConfig(**SMALL, null_route_frac=0.5)
    loss_model = loss_cfg.build(VOCAB, key=jax.random.PRNGKey(0))
    loss_stats = eqx.filter_jit(lambda m: moe_stats_to_log(m.routing_extras(_tokens(loss_cfg)), loss_cfg))(loss_model)
    assert "moe/null_frac" in loss_stats and not any("null_bias" in k for k in loss_stats)
    assert model.config.moe_hyperparameters()["moe/null_control"] == "bias"


def test_install_wraps_the_optimizer_only_under_bias_control():
    from experiments.speedrun.null_bias import install

    config = _parse(["--model.null_control", "bias", "--model.null_bias_rate", "0.25"])
    assert config.model.null_control == "bias" and config.model.null_bias_rate == 0.25
    before = type(config.optimizer).build
    assert install(config)
    opt = config.optimizer.build(100)
    params = {"null_bias": jnp.zeros(()), "w": jnp.ones(())}  # a dict key is not an attribute: nothing is a bias
    assert opt.init(params) is not None
    assert not install(_parse())
    assert type(config.optimizer).build is before  # the class is untouched; only this instance builds wrapped
