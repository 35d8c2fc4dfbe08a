"""Hyperparameter specs: output sizes vs torch, structural categories, validation messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kfac_tn.tn import DimCategory, conv_spec, conv_transpose_spec

SIZES = [
    ("k3_p1", (9, 8), dict(kernel_size=3, padding=1)),
    ("k4_s3_d2", (13, 11), dict(kernel_size=4, stride=3, dilation=2)),
    ("same_even", (7, 6), dict(kernel_size=(2, 4), padding="same")),
    ("valid", (7, 6), dict(kernel_size=(2, 3), padding="valid")),
    ("k1_s2", (7, 8), dict(kernel_size=1, stride=2)),
]


@pytest.mark.parametrize("spatial,kw", [s[1:] for s in SIZES], ids=[s[0] for s in SIZES])
def test_output_size_matches_torch(spatial, kw):
    spec = conv_spec(spatial, **kw)
    w = torch.zeros(1, 1, *spec.kernel_size)
    y = F.conv2d(
        torch.zeros(1, 1, *spatial),
        w,
        None,
        kw.get("stride", 1),
        kw.get("padding", 0),
        kw.get("dilation", 1),
    )
    assert spec.out_spatial == tuple(y.shape[2:])


def test_same_padding_is_left_floor():
    dims = conv_spec((8,), 4, padding="same", dilation=3).dims
    assert (dims[0].pad_left, dims[0].pad_right) == (4, 5)


TRANSPOSE = [
    ("s2_p1_op1", (5, 4), dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    ("d2_op1", (4, 4), dict(kernel_size=2, dilation=2, output_padding=1)),
]


@pytest.mark.parametrize("spatial,kw", [s[1:] for s in TRANSPOSE], ids=[s[0] for s in TRANSPOSE])
def test_transpose_output_size_matches_torch(spatial, kw):
    spec = conv_transpose_spec(spatial, **kw)
    y = F.conv_transpose2d(
        torch.zeros(1, 1, *spatial),
        torch.zeros(1, 1, *spec.kernel_size),
        None,
        kw.get("stride", 1),
        kw.get("padding", 0),
        kw.get("output_padding", 0),
        1,
        kw.get("dilation", 1),
    )
    assert spec.in_spatial == tuple(y.shape[2:])
    assert spec.out_spatial == tuple(spatial)
    assert spec.transpose


CATEGORIES = [
    ("1x1", (8, 8), dict(kernel_size=1), "dense", (DimCategory.DENSE,) * 2),
    ("patchify", (8, 8), dict(kernel_size=4, stride=4), "dense", (DimCategory.DENSE,) * 2),
    ("2x2s2", (8, 8), dict(kernel_size=2, stride=2), "dense", (DimCategory.DENSE,) * 2),
    ("1x1s2", (7, 7), dict(kernel_size=1, stride=2), "down", (DimCategory.DOWN,) * 2),
    ("k2s3", (10, 11), dict(kernel_size=2, stride=3), "down", (DimCategory.DOWN,) * 2),
    (
        "1x7",
        (9, 9),
        dict(kernel_size=(1, 7), padding=(0, 3)),
        "mixed",
        (DimCategory.DENSE, DimCategory.GENERAL),
    ),
    ("3x3p1", (9, 9), dict(kernel_size=3, padding=1), "general", (DimCategory.GENERAL,) * 2),
    ("3x3s2", (9, 9), dict(kernel_size=3, stride=2), "general", (DimCategory.GENERAL,) * 2),
]


@pytest.mark.parametrize(
    "spatial,kw,layer,dims", [c[1:] for c in CATEGORIES], ids=[c[0] for c in CATEGORIES]
)
def test_categories(spatial, kw, layer, dims):
    spec = conv_spec(spatial, **kw)
    assert spec.categories == dims
    assert spec.layer_category == layer


def test_used_inputs_slices_off_the_tail():
    (dim,) = conv_spec((11,), 2, stride=3).dims  # outputs at 0, 3, 6, 9 -> inputs 0..10
    assert dim.out_size == 4 and dim.used_inputs == 11
    (dim,) = conv_spec((10,), 4, stride=4).dims  # 2 patches, inputs 8, 9 unused
    assert dim.used_inputs == 8


BAD = [
    ("stride_zero", lambda: conv_spec((8,), 3, stride=0), "stride"),
    ("dilation_zero", lambda: conv_spec((8,), 3, dilation=0), "dilation"),
    ("kernel_zero", lambda: conv_spec((8,), 0), "kernel_size"),
    ("kernel_len", lambda: conv_spec((8, 8), (3, 3, 3)), "kernel_size"),
    ("negative_padding", lambda: conv_spec((8,), 3, padding=-1), "padding"),
    ("same_strided", lambda: conv_spec((8,), 3, stride=2, padding="same"), "padding"),
    ("padding_string", lambda: conv_spec((8,), 3, padding="full"), "padding"),
    ("kernel_too_large", lambda: conv_spec((4,), 7, padding=1), "kernel_size"),
    ("groups_zero", lambda: conv_spec((8,), 3, groups=0), "groups"),
    ("groups_bool", lambda: conv_spec((8,), 3, groups=True), "groups"),
    ("transpose_padding_string", lambda: conv_transpose_spec((4,), 3, padding="same"), "padding"),
    (
        "output_padding_large",
        lambda: conv_transpose_spec((4,), 3, stride=2, output_padding=2),
        "output_padding",
    ),
    ("empty_input", lambda: conv_spec((), 3), "input size"),
]


@pytest.mark.parametrize("call,argname", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_hyperparameters_name_the_argument(call, argname):
    with pytest.raises(ValueError, match=f"Invalid {argname}"):
        call()
