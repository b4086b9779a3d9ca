"""NullMoEConfig validation: bad values fail at construction, naming the field."""

from __future__ import annotations

import pytest

from null_moe import NullMoEConfig
from null_moe.config import num_null_slots

pytestmark = pytest.mark.fast  # the fast tier (scripts/run_tests.sh --fast)

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
        ("lbl_coef", float("nan")),
        ("rzl_coef", float("inf")),
        ("rzl_coef", True),
        ("take_until_null", "yes"),
        ("tile_rows", 12),
        ("fused_experts", "yes"),
        ("balance_scope", "device"),
        ("null_control", "pid"),
        ("null_bias_rate", 0.0),
        ("null_bias_rate", -0.5),
        ("null_bias_rate", float("inf")),
        ("null_bias_rate", True),
        ("balance_pool", "null"),
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


@pytest.mark.parametrize("take_until_null", [False, True])
def test_expected_real_experts_is_k_times_one_minus_p_in_both_modes(take_until_null):
    for p, want in ((0.0, 2.0), (0.5, 1.0), (0.75, 0.5)):
        cfg = NullMoEConfig(**{**BASE, "null_route_frac": p, "take_until_null": take_until_null})
        assert cfg.expected_real_experts_per_token == pytest.approx(want)


def test_num_null_experts_must_agree_with_null_route_frac():
    """p is the switch: M = 0 with p > 0 would silently turn null routing off, M > 0 with p = 0 would turn it on."""
    with pytest.raises(ValueError, match="num_null_experts must be >= 1"):
        NullMoEConfig(**{**BASE, "null_route_frac": 0.5, "num_null_experts": 0})
    with pytest.raises(ValueError, match="num_null_experts=4 needs null_route_frac > 0"):
        NullMoEConfig(**{**BASE, "num_null_experts": 4})
    assert NullMoEConfig(**{**BASE, "num_null_experts": 0}).num_null == 0
    assert NullMoEConfig(**{**BASE, "null_route_frac": 0.5, "num_null_experts": 2}).num_null == 2


def test_config_is_frozen():
    cfg = NullMoEConfig(**BASE)
    with pytest.raises(Exception):
        cfg.null_route_frac = 0.5  # type: ignore[misc]


def test_null_control_fields():
    """The bias controller needs null slots; balance_pool 'real' needs the bias (else nothing steers the null share)."""
    cfg = NullMoEConfig(**BASE)
    assert (cfg.null_control, cfg.balance_pool) == ("loss", "all") and cfg.null_bias_rate > 0
    assert NullMoEConfig(**{**BASE, "null_route_frac": 0.5, "null_control": "bias", "balance_pool": "real"})
    with pytest.raises(ValueError, match="null_control='bias' needs null_route_frac > 0"):
        NullMoEConfig(**{**BASE, "null_control": "bias"})
    with pytest.raises(ValueError, match="balance_pool='real' needs null_control='bias'"):
        NullMoEConfig(**{**BASE, "null_route_frac": 0.5, "balance_pool": "real"})
