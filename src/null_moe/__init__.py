"""null-moe: null routing for Mixtral-style MoE layers on Haliax named axes."""

from .config import GMM_BACKENDS, NullMoEConfig
from .gmm import expert_mlp, grouped_matmul, resolve_backend
from .layers import ExpertMlp, NullRoutedMoE
from .routing import NULL_MODES, Routing

__all__ = [
    "GMM_BACKENDS",
    "NULL_MODES",
    "ExpertMlp",
    "NullMoEConfig",
    "NullRoutedMoE",
    "Routing",
    "expert_mlp",
    "grouped_matmul",
    "resolve_backend",
]
