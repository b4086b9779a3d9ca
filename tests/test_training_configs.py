"""Every config in configs/speedrun parses through the training CLI's parser (Levanter's TrainLmConfig with a
single tracker config), takes the documented overrides, trains on the local stdlib-source corpus, and the hardware
ones build abstractly (eqx.filter_eval_shape: shapes only, no memory) with the expected parameter counts and FLOPs
per token. A broken config fails here, not on a pod."""

from __future__ import annotations

import glob
import math
import os

import equinox as eqx
import haliax as hax
import jax
import pytest

from levanter.models.mixtral import MixtralConfig as StockMixtralConfig

from experiments.speedrun import train
from experiments.speedrun.custom_mixtral import MixtralConfig
from null_moe.gmm import resolve_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "speedrun")
VOCAB = 2048  # the local tokenizer's vocabulary (data_cache/stdlib_src/tokenizer)

# seed shape -> (hidden, mlp, experts); every one has a null run and its p = 0 twin, on TPU and on GPU
SEEDS = {
    "h2048_m1408_e60": (2048, 1408, 60),
    "h2048_m2048_e64": (2048, 2048, 64),
    "h3072_m3072_e128": (3072, 3072, 128),
}
HARDWARE = [f"{seed}_{hw}_{variant}" for seed in SEEDS for hw in ("tpu", "gpu") for variant in ("null", "p0")]


def _load(name: str, *args: str):
    return train.parse_config(["--config_path", os.path.join(CONFIG_DIR, f"{name}.yaml"), *args])


EXPERT_PARALLEL = [f"{name}_ep" for name in HARDWARE] + ["tiny_cpu_ep"]


def test_every_config_is_covered():
    names = {os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert names == set(HARDWARE) | {"tiny_cpu", "tiny_cpu_ep_capacity", "tiny_gpu"} | set(EXPERT_PARALLEL)


def test_tiny_gpu_config_is_the_gpu_checks_short_run():
    """tiny_gpu: one GPU, bf16, the fused Triton kernels by auto, a fractional warmup, and fewer tokens than one
    pass over the local corpus (about 3.7 M training tokens), so the GPU check's run never runs out of data."""
    cfg = _load("tiny_gpu")
    m = cfg.model
    assert isinstance(m, MixtralConfig) and 0 < m.null_route_frac < 1 and m.num_null >= m.num_experts_per_tok
    assert m.gmm_backend == "auto" and resolve_backend(m.gmm_backend, platform="gpu") == "triton"
    assert jax.numpy.dtype(cfg.trainer.mp.compute_dtype) == jax.numpy.bfloat16
    assert cfg.trainer.require_accelerator is not False
    assert 0 < cfg.optimizer.warmup < 1
    tokens = cfg.trainer.num_train_steps * cfg.trainer.train_batch_size * m.seq_len
    assert tokens < 3_000_000
    assert cfg.trainer.steps_per_eval == cfg.trainer.num_train_steps  # one eval, at the end


def test_capacity_config_is_tiny_ep_with_a_capacity():
    """tiny_cpu_ep_capacity: tiny_cpu_ep's model and mesh, with a 1.25 capacity, the per-sequence balance loss and
    32 sequences per device (what keeps its dropped fraction low; docs/EXPERT_PARALLEL.md)."""
    cfg, ep = _load("tiny_cpu_ep_capacity"), _load("tiny_cpu_ep")
    assert (cfg.model.capacity_factor, cfg.model.balance_scope, cfg.model.lbl_coef) == (1.25, "sequence", 0.2)
    assert ep.model.capacity_factor is None and ep.model.balance_scope == "batch"
    for field in ("hidden_dim", "intermediate_dim", "n_routed_experts", "num_experts_per_tok", "null_route_frac",
                  "num_layers", "seq_len"):
        assert getattr(cfg.model, field) == getattr(ep.model, field), field
    assert cfg.trainer.axis_resources.get("experts") == "replica" and cfg.trainer.replica_ici_axis_size == 4
    assert cfg.trainer.train_batch_size // 8 == 32  # sequences per device on 8 devices
    moe = cfg.model.moe_config()
    assert (moe.capacity_factor, moe.balance_scope) == (1.25, "sequence")


@pytest.mark.parametrize("name", EXPERT_PARALLEL)
def test_expert_parallel_configs_map_experts_onto_a_batch_axis(name):
    """Each *_ep config is its twin plus an expert mesh axis: experts -> replica, which also shards the batch."""
    cfg = _load(name)
    twin = _load(name[: -len("_ep")])
    assert cfg.trainer.axis_resources.get("experts") == "replica"
    assert cfg.trainer.replica_ici_axis_size > 1
    for field in ("hidden_dim", "intermediate_dim", "n_routed_experts", "num_experts_per_tok", "null_route_frac",
                  "gmm_backend"):
        assert getattr(cfg.model, field) == getattr(twin.model, field), field
    cfg.model.moe_config()  # the EP fields validate through NullMoEConfig


@pytest.mark.parametrize("name", ["tiny_cpu", "h2048_m1408_e60_tpu_null", "h3072_m3072_e128_gpu_p0"])
def test_documented_overrides_parse(name):
    """The commands in the configs' comments and docs/TRAINING.md: tracker mode / project, run id, base path."""
    cfg = _load(name, "--trainer.tracker.mode", "offline", "--trainer.tracker.project", "elsewhere",
                "--trainer.id", "r1", "--trainer.checkpointer.base_path", "gs://bucket/ckpt")
    assert (cfg.trainer.tracker.mode, cfg.trainer.tracker.project) == ("offline", "elsewhere")
    assert cfg.trainer.id == "r1" and cfg.trainer.checkpointer.base_path == "gs://bucket/ckpt"


@pytest.mark.parametrize("name", HARDWARE + ["tiny_cpu", "tiny_cpu_ep_capacity"])
def test_configs_train_on_the_local_stdlib_source_corpus(name):
    data = _load(name).data
    assert data.tokenizer == "data_cache/stdlib_src/tokenizer"
    assert list(data.train_urls) == ["data_cache/stdlib_src/train.jsonl"]
    assert list(data.validation_urls) == ["data_cache/stdlib_src/validation.jsonl"]
    assert data.cache_dir == "data_cache/stdlib_src/cache"


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_config_settings(name):
    cfg = _load(name)
    seed, hw, variant = name.rsplit("_", 2)
    m = cfg.model
    assert isinstance(m, MixtralConfig)
    assert (m.hidden_dim, m.intermediate_dim, m.n_routed_experts) == SEEDS[seed]
    assert m.lbl_coef and m.rzl_coef
    assert jax.numpy.dtype(cfg.trainer.mp.compute_dtype) == jax.numpy.bfloat16
    assert cfg.trainer.require_accelerator is not False
    # a backend that skips null rows on that hardware: megablox on TPU, this project's Triton kernels on GPU (what
    # auto resolves to there); ragged_dot computes every group densely, and tokamax is not what auto picks
    assert m.gmm_backend in (("megablox",) if hw == "tpu" else ("auto", "triton")), m.gmm_backend
    assert resolve_backend(m.gmm_backend, platform=hw) == ("megablox" if hw == "tpu" else "triton")
    if variant == "null":
        assert 0 < m.null_route_frac < 1
    else:
        assert m.null_route_frac == 0 and m.num_null == 0
    # the twin differs only in null_route_frac
    twin = _load(f"{seed}_{hw}_{'p0' if variant == 'null' else 'null'}")
    assert (twin.model.__class__, twin.trainer.train_batch_size) == (m.__class__, cfg.trainer.train_batch_size)
    diff = {f for f in m.__dataclass_fields__ if getattr(m, f) != getattr(twin.model, f)}
    assert diff == {"null_route_frac"}


def _abstract_param_count(model_cfg: MixtralConfig) -> int:
    model = eqx.filter_eval_shape(model_cfg.build, hax.Axis("vocab", VOCAB), key=jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model) if hasattr(x, "shape"))


def _stock(m: MixtralConfig) -> StockMixtralConfig:
    return StockMixtralConfig(
        seq_len=m.seq_len, hidden_dim=m.hidden_dim, intermediate_dim=m.intermediate_dim, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, n_routed_experts=m.n_routed_experts,
        num_experts_per_tok=m.num_experts_per_tok,
    )


@pytest.mark.parametrize("seed", list(SEEDS))
def test_hardware_configs_build_abstractly(seed):
    """Parameter counts (abstract build == formula == stock Levanter Mixtral + one null-gate row per layer)
    and FLOPs per token (p = 0: stock Levanter's count; null run: experts at k (1 - p) real per token)."""
    null = _load(f"{seed}_tpu_null").model
    p0 = _load(f"{seed}_tpu_p0").model
    n_null = _abstract_param_count(null)
    n_p0 = _abstract_param_count(p0)
    stock_params = _stock(p0).total_trainable_params(VOCAB)
    # parameters do not depend on p: the null gate exists in both (it is unused when M = 0)
    assert n_null == n_p0 == null.total_trainable_params(VOCAB) == stock_params + p0.num_layers * p0.hidden_dim

    # FLOPs: p = 0 is stock Levanter's number; the null run removes the skipped expert work
    assert p0.flops_per_token(VOCAB) == pytest.approx(_stock(p0).flops_per_token(VOCAB), rel=1e-12)
    D, F, L, k = null.hidden_dim, null.intermediate_dim, null.num_layers, null.num_experts_per_tok
    N, M = null.n_routed_experts, null.num_null
    e = null.expected_real_experts_per_token
    assert e == pytest.approx(k * (1 - null.null_route_frac))
    assert M == N  # p = 0.5: M = round(N p / (1 - p)) null copies
    expected = p0.flops_per_token(VOCAB) - L * 6 * D * F * (k - e) + L * 2 * D
    assert null.flops_per_token(VOCAB) == pytest.approx(expected, rel=1e-12)
    # and the GPU configs are the same models
    assert _load(f"{seed}_gpu_null").model.flops_per_token(VOCAB) == pytest.approx(null.flops_per_token(VOCAB))


def test_tiny_cpu_config_builds_and_is_small():
    cfg = _load("tiny_cpu")
    m = cfg.model
    assert m.null_route_frac == 0.5 and m.lbl_coef and m.rzl_coef
    assert cfg.trainer.require_accelerator is False and cfg.trainer.ray.auto_start_cluster is False
    assert cfg.trainer.tracker.mode == "offline"
    assert _abstract_param_count(m) == m.total_trainable_params(VOCAB) < 5_000_000


def test_training_md_override_example_sets_take_until_null_where_it_acts():
    """docs/TRAINING.md's override example turns take_until_null on; it must parse, and with M < k, since with
    M >= k learned routing already takes until null and the flag would change nothing."""
    with open(os.path.join(ROOT, "docs", "TRAINING.md")) as f:
        text = f.read()
    block = text.split("# any draccus override passes through:\n", 1)[1].split("```", 1)[0]
    argv = block.replace("\\\n", " ").split()
    assert argv[:3] == ["python", "-m", "experiments.speedrun.custom_mixtral"], argv
    m = train.parse_config(argv[3:]).model
    assert m.take_until_null and m.moe_config().num_null < m.num_experts_per_tok
