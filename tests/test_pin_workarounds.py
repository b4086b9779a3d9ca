"""Small pieces of experiments/speedrun/levanter_pin_workarounds.py checked on their own."""

from __future__ import annotations

from experiments.speedrun import levanter_pin_workarounds as pin


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_h200_gets_levanter_flops_and_nothing_else_changes(monkeypatch):
    from levanter.utils import flop_utils

    monkeypatch.setattr(flop_utils, "_simplify_device_kind", flop_utils._simplify_device_kind)  # restored after
    assert flop_utils.device_hardware_flops(_Device("NVIDIA H200")) is None  # the pinned Levanter's gap
    h100 = flop_utils.device_hardware_flops(_Device("NVIDIA H100 80GB HBM3"))
    assert pin.h200_flops_known() is True
    assert pin.h200_flops_known() is False  # idempotent
    assert flop_utils.device_hardware_flops(_Device("NVIDIA H200")) == flop_utils.DEVICE_AVAILABLE_FLOPS["h200-sxm"]["bf16"]
    assert flop_utils.device_hardware_flops(_Device("NVIDIA H100 80GB HBM3")) == h100
    assert flop_utils.device_hardware_flops(_Device("cpu")) is None
