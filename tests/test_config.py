"""NullMoEConfig validation: bad values fail at construction, naming the field."""

from __future__ import annotations

import pytest

from null_moe import NullMoEConfig
from null_moe.config import expected_real_experts, num_null_slots

BASE = dict(hidden_dim=8, intermediate_dim=16, n_routed_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("null_route_frac", -0.1),
        ("null_route_frac", 1.0),
        ("null_route_frac", 1.5),
        ("null_route_frac", float("nan")),
        ("num_experts_per_tok", 5),
        ("num_experts_per_tok", 0),
        ("num_null_experts", -1),
        ("gmm_backend", "cublas"),
        ("activation", "tanh"),
        ("hidden_dim", 0),
        ("n_routed_experts", -2),
        ("lbl_coef", -1.0),
        ("tile_rows", 12),
        ("fused_experts", "yes"),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NullMoEConfig(**{**BASE, field: value})


def test_num_null_slots():
    assert num_null_slots(16, 0.0, None) == 0
    assert num_null_slots(16, 0.5, None) == 16
    assert num_null_slots(16, 0.9, None) == 144
    assert num_null_slots(16, 0.01, None) == 1  # at least one null copy once p > 0
    assert num_null_slots(16, 0.5, 3) == 3
    cfg = NullMoEConfig(**{**BASE, "null_route_frac": 0.5})
    assert cfg.num_null == 4 and cfg.ExpandedExperts.size == 8


def test_expected_real_experts():
    assert expected_real_experts(8, 0, 4, True) == 4.0
    assert expected_real_experts(8, 8, 4, False) == pytest.approx(2.0)
    # take_until_null: P(slot j real) = prod_{i<=j} (N - i) / (N + M - i)
    n, m = 4, 4
    want = 4 / 8 + 4 / 8 * 3 / 7
    assert expected_real_experts(n, m, 2, True) == pytest.approx(want)
    assert NullMoEConfig(**BASE).expected_real_experts_per_token == 2.0


def test_config_is_frozen():
    cfg = NullMoEConfig(**BASE)
    with pytest.raises(Exception):
        cfg.null_route_frac = 0.5  # type: ignore[misc]
