"""Cost models: the impl="auto" choice of the factors and the expand strategy (kfac_tn.tn.cost)."""

from __future__ import annotations

import pytest
import torch

import kfac_tn.tn as tn
from kfac_tn.tn import cost
from kfac_tn.tn.cost import CALIBRATIONS


def test_choose_impl_public():
    spec = tn.conv_spec((8, 8), 3, padding=1)
    assert tn.choose_impl("reduce", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    assert tn.choose_impl("expand", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    # InceptionV3's 7x1 on 17x17: correlating before applying Π needs ~0.4x the GEMM's FLOPs;
    # on CPU the lag products need ~0.14x (measured 70 ms tn, 30 ms lag, one thread)
    inception = tn.conv_spec((17, 17), (7, 1), padding=(3, 0))
    assert tn.choose_impl("expand", inception, 32, 128, torch.float32, "cuda") == "tn"
    for cal in CALIBRATIONS.values():
        impl = tn.choose_impl("expand", inception, 32, 128, torch.float32, "cpu", calibration=cal)
        assert impl == "tn_simplified"
        assert tn.expand_strategy(inception, 32, 128, "cpu", calibration=cal) == "lag"
    assert tn.expand_strategy(inception, 32, 128, "cuda") == "gemm"
    with pytest.raises(ValueError, match="Invalid kind"):
        tn.choose_impl("kfc", spec, 2, 3, torch.float32, "cpu")


# (calibration, layer input [N, C, S, S], kernel, padding, auto's path): the measured winners
# of `python -m kfac_tn.benchmarks.expand_strategies` on a machine of that kind (one thread)
AUTO_CHOICES = [
    ("AVX2", (128, 3, 32, 32), 5, 0, "gemm"),  # 3c3d conv1 (RGB): few channels
    ("AVX512", (128, 3, 32, 32), 5, 0, "lag"),  # 13 ms against 22 (gemm) and 28 (plain)
    ("AVX512", (64, 64, 4, 4), 3, 1, "lag"),  # digits conv3: 3.1 ms against 6.0 (plain)
    ("AVX512", (64, 64, 7, 7), 5, 2, "lag"),  # 27 ms against 80 (plain)
    ("AVX512", (128, 16, 7, 7), (1, 7), (0, 3), "plain"),  # 0.7 ms against 0.9 (lag)
    ("AVX512", (32, 1, 28, 28), 5, 2, "gemm"),  # 2c2d conv1: 0.9 ms against 1.1 / 2.2
]


@pytest.mark.parametrize(
    "capability,shape,kernel,padding,expected",
    AUTO_CHOICES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-k{c[2]}" for c in AUTO_CHOICES],
)
def test_auto_path_per_calibration(capability, shape, kernel, padding, expected):
    """Regression: with AVX2's constants on an AVX-512 CPU, auto ran the plain network on the
    main job's conv3 (2x slower than the lag products, 10 of the step's 44 ms)."""
    n, c = shape[:2]
    spec = tn.conv_spec(shape[2:], kernel, padding=padding)
    cal = CALIBRATIONS[capability]
    impl = tn.choose_impl("expand", spec, n, c, torch.float32, "cpu", calibration=cal)
    path = "plain" if impl == "tn" else tn.expand_strategy(spec, n, c, "cpu", calibration=cal)
    assert path == expected


@pytest.mark.parametrize(
    "capability,expected", [("AVX2", "AVX2"), ("AVX512", "AVX512"), ("DEFAULT", "AVX2")]
)
def test_cpu_calibration_follows_the_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cost.cpu_calibration.cache_clear()
    try:
        assert cost.cpu_calibration() is CALIBRATIONS[expected]
    finally:
        cost.cpu_calibration.cache_clear()
