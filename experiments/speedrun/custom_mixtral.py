"""Null-routed Mixtral for Levanter: a ``LmConfig`` (type ``null_mixtral``) and its model.

The model is Levanter's Mixtral (``levanter.models.mixtral``) with the MoE block replaced by
``null_moe.NullRoutedMoE``: attention, RMS norms, embeddings and the LM head are Levanter's own classes. No
routing math lives here; this file only builds a ``NullMoEConfig`` from its fields, wires the layer into the
decoder stack, sums the aux losses, logs the layer's statistics and counts FLOPs (see docs/TRAINING.md).

Differences from stock ``levanter.models.mixtral`` that matter in training:

- everything logged from inside the jitted step goes through ``jax.lax.stop_gradient`` (stock Mixtral's
  ``jit_log`` of raw aux losses crashes under ``grad`` with "IO callbacks do not support JVP");
- in inference mode (Levanter's eval) the aux losses are not added to the loss and nothing is logged, so
  ``eval/loss`` is the pure LM loss and eval batches do not overwrite the training routing stats;
- ``flops_per_token`` counts the *expected real* experts per token, k (1 - p)
  (``NullMoEConfig.expected_real_experts_per_token``), so Levanter's ``throughput/*flops*`` and MFU do not count
  null slots; ``flops_per_token(..., real_experts_per_token=e)`` gives the count for a realized e (the training
  CLI logs it every step);
- not an ``HFCompatConfig``: Levanter never builds an ``HFCheckpointConverter`` for it, so nothing fetches a
  reference config or tokenizer from the Hugging Face hub (the null gate has no HF counterpart anyway).

Training: ``python -m experiments.speedrun.custom_mixtral --config_path configs/speedrun/tiny_cpu.yaml [...]``
runs the training CLI of ``experiments/speedrun/train.py`` (``python -m experiments.speedrun.train`` is the same).
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m experiments.speedrun.custom_mixtral ...` (the documented command) runs the training CLI. It hands
    # over before anything below is defined, so `null_mixtral` is registered once, by the importable module.
    from experiments.speedrun.train import main as _train_main

    raise SystemExit(_train_main())

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Type, Union

import equinox as eqx
import jax
import jax.random as jrandom

import haliax as hax
import haliax.nn as hnn
from haliax import Axis, NamedArray
from haliax._src.scan import ScanCheckpointSpec
from haliax.jax_utils import maybe_rng_split, named_call, shaped_rng_split
from haliax.nn.scan import BlockSeq, Stacked

import levanter.tracker
from levanter.layers.attention import Attention, AttentionBackend, AttentionConfig, AttentionMask
from levanter.layers.rotary import DefaultRotaryEmbeddingsConfig, RotaryEmbeddingsConfig
from levanter.models.llama import LlamaEmbedding, LlamaMlp
from levanter.models.lm_model import LmConfig, LmHeadModel
from levanter.utils.activation import ActivationFunctionEnum

from null_moe.config import (
    ACTIVATIONS,
    DEFAULT_NULL_BIAS_RATE,
    BalancePool,
    BalanceScope,
    EpTransport,
    GmmBackend,
    NullControl,
    NullMoEConfig,
)

from experiments.speedrun.levanter_pin_workarounds import log_moe_stats

logger = logging.getLogger(__name__)

__all__ = [
    "MixtralConfig",
    "NullMixtralDecoderLayer",
    "NullMixtralTransformer",
    "NullMixtralLMHeadModel",
    "moe_stats_to_log",
]


@LmConfig.register_subclass("null_mixtral")
@dataclass(frozen=True)
class MixtralConfig(LmConfig["NullMixtralLMHeadModel"]):
    """Mixtral with null routing (DESIGN.md). Defaults are the first seed shape (hidden 2048 / mlp 1408 / 60).

    Mixtral fields (as in ``levanter.models.mixtral.MixtralConfig``):
        seq_len, hidden_dim, intermediate_dim (per expert), num_layers, num_heads, num_kv_heads, head_dim,
        activation_function, initializer_range, layer_norm_epsilon, tie_word_embeddings, input_embedding_norm,
        n_routed_experts (N), num_experts_per_tok (k), n_shared_experts (dense SwiGLU experts every token
        uses), lbl_coef / rzl_coef (None turns a loss off), attention and scan settings, rope.
        balance_scope: "batch" (Levanter's load-balancing loss over all tokens) or "sequence" (the loss per
            sequence, averaged: every sequence is pushed to its share of experts and nulls).
    Null routing (passed to ``null_moe.NullMoEConfig``):
        null_route_frac: p in [0, 1), target fraction of slots routed to null (0 = stock Mixtral routing).
        take_until_null: slots after a token's first null slot are null too (0..k real experts per token).
        num_null_experts: M null copies in the router pool; None derives M = round(N p / (1 - p)).
        renormalize_real: real gate weights renormalised to sum to 1 (stock Mixtral does).
        gmm_backend: auto | tiled | megablox | triton | tokamax | ragged_dot; auto picks per platform (the fused
            Triton expert kernels on GPU). The backend that actually runs is logged into the run config as
            ``moe/gmm_backend``, and whether its fused expert kernels run as ``moe/expert_path``.
        tile_rows: row tile of the CPU ``tiled`` backend (None = measured default).
        capacity_factor, ep_transport, ep_dedup: expert parallelism (when the trainer's axis_resources map
            ``experts`` to a mesh axis that also shards the batch, e.g. ``experts: replica``); None = dropless.
        null_control: "loss" (the load-balancing loss alone steers the null share) or "bias" (a per-layer bias
            on the null copies' selection scores, moved after every step by null_bias_rate x (p - realized null
            fraction); the training CLI installs that update, see ``experiments/speedrun/null_bias.py``).
        null_bias_rate: the bias's step size; balance_pool: "all" (N + M) or "real" (needs null_control bias).
    Logging:
        log_moe_stats: log routing statistics (moe/...) every step; log_expert_loads: also per-expert loads.
    """

    seq_len: int = 2048
    hidden_dim: int = 2048
    intermediate_dim: int = 1408
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: Optional[int] = None
    activation_function: ActivationFunctionEnum = ActivationFunctionEnum.silu
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    input_embedding_norm: bool = False

    n_routed_experts: int = 60
    num_experts_per_tok: int = 4
    n_shared_experts: int = 0

    lbl_coef: Optional[float] = 0.01
    rzl_coef: Optional[float] = 0.001
    balance_scope: BalanceScope = "batch"

    # null routing
    null_route_frac: float = 0.0
    take_until_null: bool = False
    num_null_experts: Optional[int] = None
    renormalize_real: bool = True
    gmm_backend: GmmBackend = "auto"
    tile_rows: Optional[int] = None
    capacity_factor: Optional[float] = None
    ep_transport: EpTransport = "auto"
    ep_dedup: bool = True
    null_control: NullControl = "loss"
    null_bias_rate: float = DEFAULT_NULL_BIAS_RATE
    balance_pool: BalancePool = "all"

    # attention
    upcast_attn: bool = False
    attn_backend: Optional[AttentionBackend] = None
    flash_attention_block_size: Optional[int] = None
    rope: RotaryEmbeddingsConfig = dataclasses.field(default_factory=DefaultRotaryEmbeddingsConfig)

    gradient_checkpointing: ScanCheckpointSpec = True
    scan_layers: bool = True
    use_bias: bool = False
    use_layer_norm_weight: bool = True

    log_moe_stats: bool = True
    log_expert_loads: bool = True

    # informational only (Levanter's train_lm takes the tokenizer from data.tokenizer)
    tokenizer: Optional[str] = None

    def __post_init__(self):
        for name in ("seq_len", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and isinstance(self.hidden_dim, int) and self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads} (or set head_dim)"
            )
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be a non-negative integer, got {self.n_shared_experts!r}")
        if self.activation_name not in ACTIVATIONS:
            raise ValueError(
                f"activation_function must be one of {ACTIVATIONS} for the expert MLP, got {self.activation_name!r}"
            )
        # Validates every MoE field (hidden_dim, intermediate_dim, n_routed_experts, num_experts_per_tok,
        # null_route_frac, num_null_experts, lbl_coef, rzl_coef, balance_scope, gmm_backend, tile_rows, EP fields)
        # and names the field.
        self.moe_config()

    # --- the MoE layer's config: the only place the null-routing fields go ------------------------------------
    @property
    def activation_name(self) -> str:
        act = self.activation_function
        return act.value if isinstance(act, ActivationFunctionEnum) else str(act)

    def moe_config(self) -> NullMoEConfig:
        return NullMoEConfig(
            hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            null_route_frac=self.null_route_frac,
            take_until_null=self.take_until_null,
            num_null_experts=self.num_null_experts,
            renormalize_real=self.renormalize_real,
            lbl_coef=self.lbl_coef,
            rzl_coef=self.rzl_coef,
            balance_scope=self.balance_scope,
            gmm_backend=self.gmm_backend,
            activation=self.activation_name,
            tile_rows=self.tile_rows,
            capacity_factor=self.capacity_factor,
            ep_transport=self.ep_transport,
            ep_dedup=self.ep_dedup,
            null_control=self.null_control,
            null_bias_rate=self.null_bias_rate,
            balance_pool=self.balance_pool,
        )

    @property
    def num_null(self) -> int:
        return self.moe_config().num_null

    @property
    def expected_real_experts_per_token(self) -> float:
        return self.moe_config().expected_real_experts_per_token

    def resolved_gmm_backend(self) -> str:
        from null_moe.gmm import resolve_backend

        return resolve_backend(self.gmm_backend)

    def expert_path(self) -> str:
        """"fused" where the backend's fused expert kernels run (tiled on CPU, triton on GPU), else "unfused"."""
        from null_moe.experts import expert_path

        return expert_path(self.resolved_gmm_backend(), self.moe_config().fused_experts)

    # --- axes (same names as Levanter's Mixtral) --------------------------------------------------------------
    Pos = property(lambda self: Axis(name="position", size=self.seq_len))
    KeyPos = property(lambda self: self.Pos.alias("key_position"))
    Embed = property(lambda self: Axis(name="embed", size=self.hidden_dim))
    Heads = property(lambda self: Axis(name="heads", size=self.num_heads))
    KVHeads = property(lambda self: Axis(name="kv_heads", size=self.num_kv_heads))
    Layers = property(lambda self: Axis(name="layers", size=self.num_layers))
    Experts = property(lambda self: Axis(name="experts", size=self.n_routed_experts))
    TopExperts = property(lambda self: Axis(name="top_experts", size=self.num_experts_per_tok))
    Mlp = property(lambda self: Axis(name="mlp", size=self.intermediate_dim))
    HeadSize = property(lambda self: Axis(name="head_size", size=self.head_size))

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_dim // self.num_heads

    @property
    def model_type(self) -> Type["NullMixtralLMHeadModel"]:
        return NullMixtralLMHeadModel

    def mk_LayerNorm(self, axis: Axis) -> hnn.RmsNorm:
        return hnn.RmsNorm.init(
            axis, eps=self.layer_norm_epsilon, use_weight=self.use_layer_norm_weight, use_bias=self.use_bias
        )

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(
            Embed=self.Embed,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            upcast_attn=self.upcast_attn,
            attn_backend=self.attn_backend,
            flash_attention_block_size=self.flash_attention_block_size,
            rope=self.rope,
        )

    def build(self, Vocab: Axis, *, key) -> "NullMixtralLMHeadModel":
        # The backend that actually runs goes into the run config (W&B config: moe/gmm_backend, ...).
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "No global tracker set" outside a run
                levanter.tracker.log_hyperparameters(self.moe_hyperparameters())
        except Exception:  # no tracker (plain use outside a run): nothing to log into
            logger.debug("could not log MoE hyperparameters", exc_info=True)
        return super().build(Vocab, key=key)

    def moe_hyperparameters(self) -> dict:
        hp = {
            "moe/gmm_backend": self.resolved_gmm_backend(),
            "moe/gmm_backend_requested": self.gmm_backend,
            "moe/expert_path": self.expert_path(),
            "moe/num_null_experts": self.num_null,
            "moe/null_route_frac_target": self.null_route_frac,
            "moe/take_until_null": self.take_until_null,
            "moe/null_control": self.null_control,
            "moe/expected_real_experts_per_token": self.expected_real_experts_per_token,
            "mesh/device_count": jax.device_count(),
        }
        try:  # the device mesh the model is built under (Levanter's trainer sets it)
            mesh = hax.partitioning._resolve_mesh()
            if mesh is not None and not getattr(mesh, "empty", False):
                hp["mesh/shape"] = {str(k): int(v) for k, v in dict(mesh.shape).items()}
        except Exception:
            pass
        return hp

    # --- FLOPs and parameters ---------------------------------------------------------------------------------
    @property
    def expert_flops_per_assignment(self) -> float:
        """Forward FLOPs of one token through one routed expert: 2 (multiply-add) x 3 matrices (w1, w3, w2) x D x F."""
        return float(2 * 3 * self.hidden_dim * self.intermediate_dim)

    def flops_per_token(
        self, vocab_size: int, context_length: Optional[int] = None, *, real_experts_per_token: Optional[float] = None
    ) -> float:
        """Forward FLOPs per token (Levanter multiplies by 3 for forward + backward).

        Routed-expert FLOPs count ``real_experts_per_token`` real experts per token and layer; by default the
        expected number, k (1 - p) (``NullMoEConfig.expected_real_experts_per_token``): a null slot costs
        nothing. Pass a realized mean (``moe/experts_per_token``) to count what a step actually computed.
        ``context_length`` (the attention span) defaults to ``seq_len``; newer Levanter passes it.
        """
        seq = self.seq_len if context_length is None else context_length
        D, F, L, H, KV, hd = (self.hidden_dim, self.intermediate_dim, self.num_layers, self.num_heads,
                              self.num_kv_heads, self.head_size)
        if real_experts_per_token is None:
            real_experts_per_token = self.expected_real_experts_per_token
        # Levanter's lm_flops_per_token, term by term, with k replaced by the real experts per token (and head_dim
        # allowed to differ from hidden / heads). Equal to it at p = 0.
        mlp = self.expert_flops_per_assignment * real_experts_per_token + 2 * 3 * D * F * self.n_shared_experts
        if self.n_routed_experts > 1:
            mlp += 2 * D * self.n_routed_experts  # router
        if self.num_null > 0:
            mlp += 2 * D  # the null gate (one logit)
        qkv_proj = 2 * D * (H * hd + 2 * KV * hd)
        out_proj = 2 * H * hd * D
        attn = (2 * seq**2 * H * hd + 3 * seq * seq * H + 2 * seq * seq * hd * H) / seq
        lm_head = 2 * D * vocab_size
        flops = L * (mlp + qkv_proj + out_proj + attn) + lm_head
        return float(flops)

    def total_trainable_params(self, vocab_size: int) -> int:
        """Parameter count, as built (checked against the abstract model in tests)."""
        D, F, H, KV, hs = self.hidden_dim, self.intermediate_dim, self.num_heads, self.num_kv_heads, self.head_size
        attn = D * hs * H + 2 * D * hs * KV + hs * H * D
        if self.use_bias:
            attn += hs * H + 2 * hs * KV + D
        router = D * self.n_routed_experts + D  # real gate + null gate (the MoE layer has no biases)
        if self.null_control == "bias":
            router += 1  # the null-fraction controller's bias (one scalar per layer)
        experts = 3 * self.n_routed_experts * D * F
        shared = 3 * self.n_shared_experts * D * F
        if self.use_bias and self.n_shared_experts:
            shared += 2 * self.n_shared_experts * F + D
        norms = 2 * ((D if self.use_layer_norm_weight else 0) + (D if self.use_bias else 0))
        layer = attn + router + experts + shared + norms
        embed = vocab_size * D
        head = 0 if self.tie_word_embeddings else vocab_size * D
        per_norm = (D if self.use_layer_norm_weight else 0) + (D if self.use_bias else 0)
        final_norm = per_norm
        emb_norm = per_norm if self.input_embedding_norm else 0
        return self.num_layers * layer + embed + head + final_norm + emb_norm

    def active_params_per_token(self, vocab_size: int) -> float:
        """Parameters a token touches on average: experts counted at their expected real number per token."""
        D, F = self.hidden_dim, self.intermediate_dim
        inactive = 3 * D * F * (self.n_routed_experts - self.expected_real_experts_per_token)
        return self.total_trainable_params(vocab_size) - self.num_layers * inactive


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def _moe_layer_cls():
    from null_moe import NullRoutedMoE

    return NullRoutedMoE


class NullMixtralDecoderLayer(eqx.Module):
    config: MixtralConfig = eqx.field(static=True)
    self_attn: Attention
    block_sparse_moe: eqx.Module  # null_moe.NullRoutedMoE
    input_layernorm: hnn.RmsNorm
    post_attention_layernorm: hnn.RmsNorm
    shared_mlp: Optional[LlamaMlp]

    @staticmethod
    def init(config: MixtralConfig, *, key) -> "NullMixtralDecoderLayer":
        k_attn, k_moe, k_mlp = jrandom.split(key, 3)
        attn = Attention.init(config.attention_config(), key=k_attn)
        moe = _moe_layer_cls().init(config.moe_config(), key=k_moe)
        ln_1 = config.mk_LayerNorm(config.Embed)
        ln_2 = config.mk_LayerNorm(config.Embed)
        shared_mlp = None
        if config.n_shared_experts > 0:
            shared_mlp = LlamaMlp.init(
                config.Embed,
                config.Mlp.resize(config.intermediate_dim * config.n_shared_experts),
                config.activation_function,
                key=k_mlp,
                use_bias=config.use_bias,
            )
        return NullMixtralDecoderLayer(config, attn, moe, ln_1, ln_2, shared_mlp)

    @named_call
    def __call__(self, x: NamedArray, mask: Optional[NamedArray | AttentionMask], *, key=None):
        k_attn, k_mlp, k_moe = maybe_rng_split(key, 3)
        residual = x
        x = self.input_layernorm(x)
        x = residual + self.self_attn(x=x, mask=mask, key=k_attn)

        residual = x
        x = self.post_attention_layernorm(x)
        moe_output, extras = self.block_sparse_moe(x, key=k_moe)
        output = residual + moe_output
        if self.shared_mlp is not None:
            output = output + self.shared_mlp(x, key=k_mlp)
        return output, extras


def moe_stats_to_log(extras: Dict[str, NamedArray], config: MixtralConfig) -> Dict[str, jax.Array]:
    """The flat, stop_gradient'ed dict this model logs for one step (extras stacked over the Layers axis)."""
    from null_moe.metrics import stacked_moe_log_dict

    stats = dict(stacked_moe_log_dict(extras, config.Layers, prefix="moe/"))
    if not config.log_expert_loads:
        stats = {k: v for k, v in stats.items() if not (k.endswith("_load") and "/expert" in k)}
    for name in ("load_balancing_loss", "router_z_loss"):
        if name in extras:
            # what is actually added to the training loss: the sum over layers (as stock Levanter Mixtral)
            stats[f"train/{name}"] = jax.lax.stop_gradient(hax.sum(extras[name], axis=config.Layers).array)
    return {k: jax.lax.stop_gradient(v) for k, v in stats.items()}


class NullMixtralTransformer(eqx.Module):
    config: MixtralConfig = eqx.field(static=True)
    layers: Union[Stacked[NullMixtralDecoderLayer], BlockSeq[NullMixtralDecoderLayer]]
    norm: hnn.RmsNorm

    @staticmethod
    def init(config: MixtralConfig, *, key) -> "NullMixtralTransformer":
        S = Stacked if config.scan_layers else BlockSeq
        layers = S.init(config.Layers, NullMixtralDecoderLayer, gradient_checkpointing=config.gradient_checkpointing)(
            config, key=shaped_rng_split(key, config.num_layers)
        )
        return NullMixtralTransformer(config, layers, config.mk_LayerNorm(config.Embed))

    @named_call
    def __call__(
        self, x: NamedArray, attn_mask: Optional[NamedArray | AttentionMask], *, key=None, log_stats: bool = True
    ):
        keys = maybe_rng_split(key, self.config.num_layers) if key is not None else None
        x, extras = self.layers.scan(x, mask=attn_mask, key=keys)
        x = self.norm(x)

        aux_loss = 0.0
        # null_bias_signal (null_control="bias") is 0 in value: it only hands each layer's control error to the
        # optimizer as its null_bias's gradient
        for name in ("load_balancing_loss", "router_z_loss", "null_bias_signal"):
            if name in extras:
                aux_loss = aux_loss + hax.sum(extras[name], axis=self.config.Layers)

        if log_stats and self.config.log_moe_stats:
            log_moe_stats(moe_stats_to_log(extras, self.config))

        return x, aux_loss, extras


class NullMixtralLMHeadModel(LmHeadModel[MixtralConfig]):
    transformer: NullMixtralTransformer
    embeddings: LlamaEmbedding
    lm_head: Optional[hnn.Linear]
    # Levanter's eval sets this through levanter.utils.tree_utils.inference_mode: no aux loss, no logging.
    inference: bool = eqx.field(default=False, static=True)

    @property
    def config(self) -> MixtralConfig:
        return self.transformer.config

    @property
    def Vocab(self) -> Axis:
        return self.embeddings.Vocab

    @property
    def vocab_size(self) -> int:
        return self.Vocab.size

    @classmethod
    def init(cls, Vocab: Axis, config: MixtralConfig, *, key) -> "NullMixtralLMHeadModel":
        k_t, k_emb, k_head = jrandom.split(key, 3)
        transformer = NullMixtralTransformer.init(config, key=k_t)
        embeddings = LlamaEmbedding.init(Vocab, config, key=k_emb)
        lm_head = None
        if not config.tie_word_embeddings:
            lm_head = hnn.Linear.init(In=config.Embed, Out=Vocab, key=k_head, use_bias=False, out_first=True)
        return NullMixtralLMHeadModel(transformer, embeddings, lm_head)

    def activations(
        self,
        input_ids: NamedArray,
        attn_mask: Optional[AttentionMask | NamedArray] = None,
        pos_ids: NamedArray | None = None,
        *,
        key=None,
    ):
        """Training: ``(activations, aux_loss)`` (Levanter's loss adds aux_loss). Inference: activations only."""
        x = self.embeddings.embed(input_ids)
        x, aux_loss, _ = self.transformer(x, attn_mask=attn_mask, key=key, log_stats=not self.inference)
        if self.inference:
            return x
        return x, aux_loss

    def routing_extras(self, input_ids: NamedArray, attn_mask=None) -> Dict[str, NamedArray]:
        """The MoE layers' extras (stacked over Layers) for a batch, without logging. For analysis and tests."""
        x = self.embeddings.embed(input_ids)
        _, _, extras = self.transformer(x, attn_mask=attn_mask, key=None, log_stats=False)
        return extras

    def __call__(
        self,
        input_ids: NamedArray,
        attn_mask: Optional[AttentionMask | NamedArray] = None,
        pos_ids: NamedArray | None = None,
        *,
        key=None,
    ) -> NamedArray:
        x = self.activations(input_ids, attn_mask, key=key)
        if isinstance(x, tuple):
            x = x[0]
        return hax.dot(x, self.get_lm_head(), axis=self.Embed)

    def get_lm_head(self) -> NamedArray:
        if self.lm_head is None:
            return self.embeddings.token_embeddings.weight
        return self.lm_head.weight

    def resize_vocab(self, new_size: int, key=None) -> "NullMixtralLMHeadModel":
        new_Vocab = self.Vocab.resize(new_size)
        k1, k2 = maybe_rng_split(key, 2)
        new_embeddings = self.embeddings.resize_embeddings(new_size, key=k1)
        if self.lm_head is not None:
            new_lm_matrix = hax.tree_util.resize_axis(self.lm_head.weight, self.Vocab, new_size, key=k2)
            new_lm_head = dataclasses.replace(self.lm_head, Out=new_Vocab, weight=new_lm_matrix)
            return dataclasses.replace(self, embeddings=new_embeddings, lm_head=new_lm_head)
        return dataclasses.replace(self, embeddings=new_embeddings)
