"""Cost models: the impl="auto" choice of the factors and the expand strategy (kfac_tn.tn.cost)."""

from __future__ import annotations

import pytest
import torch

import kfac_tn.tn as tn


def test_choose_impl_public():
    spec = tn.conv_spec((8, 8), 3, padding=1)
    assert tn.choose_impl("reduce", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    assert tn.choose_impl("expand", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    # InceptionV3's 7x1 on 17x17: correlating before applying Π needs ~0.4x the GEMM's FLOPs;
    # on CPU the lag products need ~0.14x (measured 70 ms tn, 30 ms lag, one thread)
    inception = tn.conv_spec((17, 17), (7, 1), padding=(3, 0))
    assert tn.choose_impl("expand", inception, 32, 128, torch.float32, "cuda") == "tn"
    assert tn.choose_impl("expand", inception, 32, 128, torch.float32, "cpu") == "tn_simplified"
    assert tn.expand_strategy(inception, 32, 128, "cpu") == "lag"
    assert tn.expand_strategy(inception, 32, 128, "cuda") == "gemm"
    with pytest.raises(ValueError, match="Invalid kind"):
        tn.choose_impl("kfc", spec, 2, 3, torch.float32, "cpu")
