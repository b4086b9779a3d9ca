"""The inputs every timing process of the GPU check shares, from numpy and fixed seeds, so that the JAX layer and
its PyTorch peer run on the same shapes, null masks and group sizes (numpy only: no framework is imported).
"""

from __future__ import annotations

import numpy as np

#: The first seed shape: tokens, hidden, mlp (per expert), experts, top-k.
LAYER = {"tokens": 32768, "hidden": 2048, "mlp": 1408, "experts": 60, "k": 8}
LAYER_TINY = {"tokens": 64, "hidden": 32, "mlp": 48, "experts": 4, "k": 2}
#: The grouped matmul alone at the layer's w1 shape: T k rows x hidden -> mlp, experts.
GMM = {"rows": 262144, "k": 2048, "n": 1408, "experts": 60}
GMM_TINY = {"rows": 192, "k": 32, "n": 48, "experts": 4}
#: Null fractions of the layer section (1.0: every slot null) and real-row fractions of the gmm section.
NULLS = (0.0, 0.5, 0.9, 1.0)
MODES = ("independent", "take_until_null")
REAL_FRACS = (1.0, 0.5, 0.1)


def slot_null_prob(null_frac: float, k: int, mode: str) -> float:
    """Per-slot mask probability giving an expected null fraction ``null_frac`` (null_moe.routing's law)."""
    if mode == "independent" or k == 1 or null_frac in (0.0, 1.0):
        return float(null_frac)

    def expected(q):
        return sum(1.0 - (1.0 - q) ** (j + 1) for j in range(k)) / k

    lo, hi = 0.0, null_frac
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(mid) < null_frac else (lo, mid)
    return 0.5 * (lo + hi)


def null_mask(tokens: int, k: int, null_frac: float, mode: str, seed: int) -> np.ndarray:
    """[tokens, k] bool, True = null. independent: exactly round(p T k) slots, uniformly; take_until_null: each
    token's real slots are a prefix, its length drawn from the per-slot law (expected null fraction p)."""
    rng = np.random.default_rng(seed)
    if null_frac >= 1.0:
        return np.ones((tokens, k), bool)
    if mode == "independent":
        flat = np.zeros(tokens * k, bool)
        flat[rng.permutation(tokens * k)[: int(round(null_frac * tokens * k))]] = True
        return flat.reshape(tokens, k)
    q = slot_null_prob(null_frac, k, mode)
    survive = (1.0 - q) ** np.arange(1, k + 1)
    u = rng.random(tokens)
    real = (u[:, None] < survive[None, :]).sum(axis=1)
    return np.arange(k)[None, :] >= real[:, None]


def layer_masks(dims: dict, seed: int = 0) -> dict:
    """{(null_frac, mode): mask} for every null fraction and mode of the layer section."""
    return {(p, mode): null_mask(dims["tokens"], dims["k"], p, mode, seed + int(p * 1000) + 7 * i)
            for i, mode in enumerate(MODES) for p in NULLS}


def group_sizes(rows: int, experts: int, real_frac: float, seed: int = 1) -> np.ndarray:
    """[experts] int32 rows per expert: the first real_frac of one fixed random assignment (each expert keeps about
    real_frac of its rows, as null routing leaves them)."""
    ids = np.random.default_rng(seed).integers(0, experts, size=rows)
    return np.bincount(ids[: int(round(real_frac * rows))], minlength=experts).astype(np.int32)


def shape_label(dims: dict) -> str:
    if "tokens" in dims:
        return f"T={dims['tokens']} D={dims['hidden']} F={dims['mlp']} E={dims['experts']} k={dims['k']}"
    return f"R={dims['rows']} K={dims['k']} N={dims['n']} E={dims['experts']}"
