"""null-moe: null routing for Mixtral-style MoE layers on Haliax named axes."""

from . import jax_compat as _jax_compat

_jax_compat.apply()  # before any Haliax op: restores what newer JAX removed and haliax still calls

# ruff: noqa: E402
from .config import ACTIVATIONS, EP_TRANSPORTS, GMM_BACKENDS, NullMoEConfig
from .dispatch import Dispatch, make_dispatch
from .experts import expert_mlp
from .gmm import grouped_matmul, resolve_backend
from .layers import ExpertMlp, NullRoutedMoE
from .routing import NULL_MODES, Routing
from .transport import block_capacity, ep_expert_mlp, resolve_transport

__all__ = [
    "ACTIVATIONS",
    "EP_TRANSPORTS",
    "GMM_BACKENDS",
    "NULL_MODES",
    "Dispatch",
    "ExpertMlp",
    "NullMoEConfig",
    "NullRoutedMoE",
    "Routing",
    "block_capacity",
    "ep_expert_mlp",
    "expert_mlp",
    "grouped_matmul",
    "make_dispatch",
    "resolve_backend",
    "resolve_transport",
]
