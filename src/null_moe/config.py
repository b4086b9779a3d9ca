"""NullMoEConfig: the one frozen config every part of the layer reads.

Axes follow Levanter's Mixtral: "embed", "mlp", "experts", "top_experts". The null slots get their own axis
only where something is laid out over them (the expanded router logits, axis "expanded_experts").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, get_args

import haliax as hax

GmmBackend = Literal["auto", "tiled", "megablox", "tokamax", "ragged_dot"]
GMM_BACKENDS: tuple[str, ...] = get_args(GmmBackend)

ACTIVATIONS = ("silu", "gelu", "relu")


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


def expected_real_experts(n_real: int, n_null: int, k: int, take_until_null: bool) -> float:
    """Expected real experts per token under balanced routing (every pool entry equally likely).

    The k slots are k draws without replacement from N real and M null entries. Independent slots: k N/(N+M).
    take_until_null: slot j is real only if slots 0..j all are, i.e. sum_j prod_{i<=j} (N-i)/(N+M-i).
    """
    total = n_real + n_null
    if n_null == 0:
        return float(k)
    if not take_until_null:
        return k * n_real / total
    expected, run = 0.0, 1.0
    for j in range(k):
        run *= max(n_real - j, 0) / (total - j)
        expected += run
    return expected


@dataclasses.dataclass(frozen=True)
class NullMoEConfig:
    """Shape and routing semantics of one null-routed MoE layer (see DESIGN.md, Semantics).

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
        gmm_backend: grouped-matmul backend; "auto" picks per platform (see null_moe.gmm.resolve_backend).
        activation: expert activation ("silu" as in Mixtral).
        tile_rows: row tile of the "tiled" CPU backend; None uses the measured default.
        fused_experts: on the "tiled" backend, run gather, the three projections and combine as one fused
            kernel (default); False composes dispatch, three ``grouped_matmul`` calls and combine, as the other
            backends always do.
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
    gmm_backend: GmmBackend = "auto"
    activation: str = "silu"
    tile_rows: Optional[int] = None
    fused_experts: bool = True

    def __post_init__(self):
        for name in ("hidden_dim", "intermediate_dim", "n_routed_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], got {k!r}"
            )
        p = self.null_route_frac
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) or math.isnan(p):
            raise ValueError(f"null_route_frac must be in [0, 1), got {p!r}")
        m = self.num_null_experts
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise ValueError(f"num_null_experts must be a non-negative integer or None, got {m!r}")
        if self.gmm_backend not in GMM_BACKENDS:
            raise ValueError(f"gmm_backend must be one of {GMM_BACKENDS}, got {self.gmm_backend!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("lbl_coef", "rzl_coef"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
        if not isinstance(self.fused_experts, bool):
            raise ValueError(f"fused_experts must be a bool, got {self.fused_experts!r}")
        t = self.tile_rows
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 8 or t % 8):
            raise ValueError(f"tile_rows must be a positive multiple of 8 or None, got {t!r}")

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_null(self) -> int:
        """M, the number of null copies in the router pool (0 disables null routing)."""
        return num_null_slots(self.n_routed_experts, self.null_route_frac, self.num_null_experts)

    @property
    def expected_real_experts_per_token(self) -> float:
        """Expected real experts per token under balanced routing; k when M = 0. Used for FLOP counts."""
        return expected_real_experts(
            self.n_routed_experts, self.num_null, self.num_experts_per_tok, self.take_until_null
        )

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
    def TopExperts(self) -> hax.Axis:
        return hax.Axis("top_experts", self.num_experts_per_tok)

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
