"""null-moe: null routing for Mixtral-style MoE layers on Haliax named axes."""

from .config import ACTIVATIONS, GMM_BACKENDS, NullMoEConfig
from .dispatch import Dispatch, make_dispatch
from .experts import expert_mlp
from .gmm import grouped_matmul, resolve_backend
from .layers import ExpertMlp, NullRoutedMoE
from .routing import NULL_MODES, Routing

__all__ = [
    "ACTIVATIONS",
    "GMM_BACKENDS",
    "NULL_MODES",
    "Dispatch",
    "ExpertMlp",
    "NullMoEConfig",
    "NullRoutedMoE",
    "Routing",
    "expert_mlp",
    "grouped_matmul",
    "make_dispatch",
    "resolve_backend",
]
