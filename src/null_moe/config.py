"""NullMoEConfig: the one frozen config every part of the layer reads.

Axes follow Levanter's Mixtral: "embed", "mlp", "experts". The null slots get their own axis only where
something is laid out over them (the expanded router logits, axis "expanded_experts").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Optional, get_args

import haliax as hax
import jax

GmmBackend = Literal["auto", "tiled", "megablox", "triton", "tokamax", "ragged_dot"]
GMM_BACKENDS: tuple[str, ...] = get_args(GmmBackend)

EpTransport = Literal["auto", "all_to_all", "ragged_all_to_all"]
EP_TRANSPORTS: tuple[str, ...] = get_args(EpTransport)

BalanceScope = Literal["batch", "sequence"]
BALANCE_SCOPES: tuple[str, ...] = get_args(BalanceScope)

NullControl = Literal["loss", "bias"]
NULL_CONTROLS: tuple[str, ...] = get_args(NullControl)

BalancePool = Literal["all", "real"]
BALANCE_POOLS: tuple[str, ...] = get_args(BalancePool)

#: Default step size of the null-bias controller: b <- b + rate (p - realized null fraction), per training step.
DEFAULT_NULL_BIAS_RATE = 2.0

Activation = Literal["silu", "gelu", "relu"]
#: The one activation table: config name -> function applied to the gate projection.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def num_null_slots(n_routed_experts: int, null_route_frac: float, num_null_experts: Optional[int]) -> int:
    """M, the number of null copies in the router pool.

    M = num_null_experts if given, else max(1, round(N p / (1 - p))) for p > 0 and 0 for p = 0: with data
    sparsity rho = 1 - p this is M = N (1 - rho) / rho, so balanced routing sends about p of the slots to null.
    """
    if num_null_experts is not None:
        return num_null_experts
    if null_route_frac == 0.0:
        return 0
    return max(1, round(n_routed_experts * null_route_frac / (1.0 - null_route_frac)))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class NullMoEConfig:
    """Shape and routing semantics of one null-routed MoE layer (docs/DESIGN.md, "Semantics").

    Attributes:
        hidden_dim: D, size of the "embed" axis.
        intermediate_dim: F, size of each expert's "mlp" axis.
        n_routed_experts: N real experts.
        num_experts_per_tok: k slots per token (1 <= k <= N).
        null_route_frac: p in [0, 1), target fraction of slots that go to null.
        take_until_null: in descending score order, every slot after the first null slot is null too.
        num_null_experts: M null copies in the router pool; derived from p when None.
        renormalize_real: divide real gate weights by their sum (where > 0), as stock Mixtral does.
        lbl_coef, rzl_coef: load-balancing and router z-loss coefficients; None turns a loss off.
        balance_scope: over which tokens the load-balancing loss measures loads: "batch" (all tokens of the
            call, Levanter's loss) or "sequence" (each entry of the input's leading token axis, e.g. each
            sequence of a [batch, position] input, then the mean over them). "sequence" also pushes every
            sequence to its share of null and real slots, which keeps the rows one device sends under expert
            parallelism close to the expectation its capacity is sized from (docs/EXPERT_PARALLEL.md).
        gmm_backend: grouped-matmul backend; "auto" picks per platform (see null_moe.gmm.resolve_backend).
        activation: expert activation ("silu" as in Mixtral).
        tile_rows: row tile of the "tiled" CPU backend; None uses the measured default.
        fused_experts: on the "tiled" backend, run gather, the three projections and combine as one fused
            kernel (default); False composes dispatch, three ``grouped_matmul`` calls and combine, as the other
            backends always do.
        capacity_factor: expert parallelism only (null_moe.transport): None is dropless (send buffers sized for
            the worst case); a float sizes each (source, destination) block at about ``capacity_factor`` times
            the expected real rows, and real slots that overflow are dropped (they contribute zero, like a null
            slot) and counted in ``extras["dropped_frac"]``.
        ep_transport: expert parallelism only: "all_to_all" (padded blocks, runs everywhere),
            "ragged_all_to_all" (sends exactly the real rows; TPU/GPU), or "auto" (see
            null_moe.transport.resolve_transport).
        ep_dedup: expert parallelism only: send a token once per destination device, carrying the gate weights
            of all its slots there (True), or once per real slot (False).
        null_control: what makes the realized null fraction meet p under learned routing. "loss": the
            load-balancing loss alone (its N + M pool pulls the null share toward p). "bias": in addition, a
            per-layer bias b added to the M null copies' scores for the top-k selection only (gate weights, the
            aux losses' probs and the z-loss stay on the unbiased logits), moved after every training step by
            b <- b + null_bias_rate (p - realized null fraction) (docs/DESIGN.md, "Null-fraction control").
        null_bias_rate: step size of that update (> 0; only read under null_control="bias").
        balance_pool: the load-balancing loss's pool under learned routing: "all" (the N real experts and the M
            null copies, so the loss also pulls the null share toward p) or "real" (the N real experts among
            themselves, their softmax over the real logits and their share of the real assignments; nothing in the
            loss then steers the null share, so "real" needs null_control="bias").
    """

    hidden_dim: int
    intermediate_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    null_route_frac: float = 0.0
    take_until_null: bool = False
    num_null_experts: Optional[int] = None
    renormalize_real: bool = True
    lbl_coef: Optional[float] = 0.01
    rzl_coef: Optional[float] = 0.001
    balance_scope: BalanceScope = "batch"
    gmm_backend: GmmBackend = "auto"
    activation: Activation = "silu"
    tile_rows: Optional[int] = None
    fused_experts: bool = True
    capacity_factor: Optional[float] = None
    ep_transport: EpTransport = "auto"
    ep_dedup: bool = True
    null_control: NullControl = "loss"
    null_bias_rate: float = DEFAULT_NULL_BIAS_RATE
    balance_pool: BalancePool = "all"

    def __post_init__(self):
        for name in ("hidden_dim", "intermediate_dim", "n_routed_experts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        k = self.num_experts_per_tok
        if not _is_int(k) or not 1 <= k <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], got {k!r}"
            )
        p = self.null_route_frac
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not (0.0 <= p < 1.0):
            raise ValueError(f"null_route_frac must be in [0, 1), got {p!r}")
        m = self.num_null_experts
        if m is not None:
            if not _is_int(m) or m < 0:
                raise ValueError(f"num_null_experts must be a non-negative integer or None, got {m!r}")
            # p is the switch: p = 0 promises stock routing, p > 0 promises null slots. A count that contradicts
            # it would silently change what the config says, so it is an error rather than a quiet override.
            if p == 0.0 and m > 0:
                raise ValueError(
                    f"num_null_experts={m} needs null_route_frac > 0 (null_route_frac=0 means stock routing, no null slots)"
                )
            if p > 0.0 and m == 0:
                raise ValueError(
                    f"num_null_experts must be >= 1 when null_route_frac > 0 (got 0 with null_route_frac={p}); "
                    "use null_route_frac=0 to turn null routing off"
                )
        if self.gmm_backend not in GMM_BACKENDS:
            raise ValueError(f"gmm_backend must be one of {GMM_BACKENDS}, got {self.gmm_backend!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("lbl_coef", "rzl_coef"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number or None, got {value!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        cf = self.capacity_factor
        if cf is not None and (
            isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0
        ):
            raise ValueError(f"capacity_factor must be a finite number > 0 or None (dropless), got {cf!r}")
        if self.ep_transport not in EP_TRANSPORTS:
            raise ValueError(f"ep_transport must be one of {EP_TRANSPORTS}, got {self.ep_transport!r}")
        if self.null_control not in NULL_CONTROLS:
            raise ValueError(f"null_control must be one of {NULL_CONTROLS}, got {self.null_control!r}")
        rate = self.null_bias_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"null_bias_rate must be a finite number > 0, got {rate!r}")
        if self.null_control == "bias" and p == 0.0:
            raise ValueError("null_control='bias' needs null_route_frac > 0 (at p = 0 there is no null slot to control)")
        if self.balance_pool not in BALANCE_POOLS:
            raise ValueError(f"balance_pool must be one of {BALANCE_POOLS}, got {self.balance_pool!r}")
        if self.balance_pool == "real" and self.null_control != "bias":
            raise ValueError(
                "balance_pool='real' needs null_control='bias' (with the real experts alone in the loss's pool, "
                "nothing would steer the null fraction)"
            )
        for name in ("take_until_null", "renormalize_real", "fused_experts", "ep_dedup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        t = self.tile_rows
        if t is not None and (not _is_int(t) or t < 8 or t % 8):
            raise ValueError(f"tile_rows must be a positive multiple of 8 or None, got {t!r}")

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_null(self) -> int:
        """M, the number of null copies in the router pool (0 disables null routing)."""
        return num_null_slots(self.n_routed_experts, self.null_route_frac, self.num_null_experts)

    @property
    def expected_real_experts_per_token(self) -> float:
        """k (1 - p): the real experts per token that null routing is calibrated to, used for FLOP counts.

        The same in both modes. Forced routing draws its masks so that the expected null fraction is p, with or
        without take_until_null. Learned routing shares one null logit among the M copies, so once one copy
        enters a token's top-k all later slots are null whenever M >= k: it is take-until-null either way, and
        the load-balancing loss pulls the null share toward p. What a run actually realized is logged next to it.
        """
        return self.num_experts_per_tok * (1.0 - self.null_route_frac)

    # --- axes ------------------------------------------------------------------------------------------------
    @property
    def Embed(self) -> hax.Axis:
        return hax.Axis("embed", self.hidden_dim)

    @property
    def Mlp(self) -> hax.Axis:
        return hax.Axis("mlp", self.intermediate_dim)

    @property
    def Experts(self) -> hax.Axis:
        return hax.Axis("experts", self.n_routed_experts)

    @property
    def NullLogit(self) -> hax.Axis:
        """The size-1 output axis of the null gate: one learned logit shared by all M null copies."""
        return hax.Axis("null_logit", 1)

    @property
    def ExpandedExperts(self) -> hax.Axis:
        """N real experts followed by M null copies."""
        return hax.Axis("expanded_experts", self.n_routed_experts + self.num_null)

    @property
    def RealCount(self) -> hax.Axis:
        """Histogram bins 0..k of real experts per token."""
        return hax.Axis("real_count", self.num_experts_per_tok + 1)
