"""Tests of the conv-layer extraction for the benchmark (kfac_tn.benchmarks.layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_tn.benchmarks.layers import (
    CATEGORIES,
    DEEPOBS_NETS,
    NETS,
    ConvLayer,
    benchmark_layers,
    extract_conv_layers,
)


class _Toy(nn.Module):
    """Repeats one configuration (dedupe), has a 1x1 (dense), 1x1/s2 (down) and 1x3 (mixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)  # same config as a
        self.c = nn.Conv2d(4, 6, 1, bias=False)  # dense
        self.d = nn.Conv2d(6, 8, 1, stride=2)  # down
        self.e = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), groups=2)  # mixed
        self.f = nn.Conv1d(8, 2, 2, stride=2, dilation=1)  # 1-d dense
        self.unused = nn.Conv2d(3, 3, 3)  # never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.e(self.d(self.c(self.b(self.a(x)))))
        return self.f(x.flatten(2))


TOY_EXPECTED = [
    # name, in, out, spatial, kernel, stride, padding, groups, bias, category, count
    ("a", 4, 4, (10, 10), (3, 3), (1, 1), (1, 1), 1, True, "general", 2),
    ("c", 4, 6, (10, 10), (1, 1), (1, 1), (0, 0), 1, False, "dense", 1),
    ("d", 6, 8, (10, 10), (1, 1), (2, 2), (0, 0), 1, True, "down", 1),
    ("e", 8, 8, (5, 5), (1, 3), (1, 1), (0, 1), 2, True, "mixed", 1),
    ("f", 8, 2, (25,), (2,), (2,), (0,), 1, True, "dense", 1),
]


def test_extract_toy_model_dedupes_and_classifies():
    layers = extract_conv_layers(_Toy(), (4, 10, 10), "toy")
    got = [
        (
            la.name,
            la.in_channels,
            la.out_channels,
            la.input_spatial,
            la.kernel_size,
            la.stride,
            la.padding,
            la.groups,
            la.bias,
            la.category,
            la.count,
        )
        for la in layers
    ]
    assert got == TOY_EXPECTED
    assert all(la.net == "toy" for la in layers)
    assert layers[-1].output_spatial == (12,)  # K = S = 2 on 25 inputs: last input unused


def test_extract_without_dedupe_keeps_every_call():
    layers = extract_conv_layers(_Toy(), (4, 10, 10), "toy", dedupe=False)
    assert [la.name for la in layers] == ["a", "b", "c", "d", "e", "f"]
    assert all(la.count == 1 for la in layers)


@pytest.mark.parametrize("net", DEEPOBS_NETS, ids=DEEPOBS_NETS)
def test_recorded_shapes_match_a_real_forward(net):
    """Meta-device extraction == input/output shapes seen by hooks on a real CPU forward."""
    entry = NETS[net]
    model = entry.build().eval()
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(
                lambda m, args, out: seen.append((tuple(args[0].shape[1:]), tuple(out.shape[2:])))
            )
    with torch.no_grad():
        model(torch.zeros(2, *entry.input_shape))
    layers = benchmark_layers([net], dedupe=False)
    assert [((la.in_channels, *la.input_spatial), la.output_spatial) for la in layers] == seen


DEEPOBS_EXPECTED = {
    "3c3d": [
        ((3, 32, 32), 64, (5, 5), (1, 1), (0, 0)),
        ((64, 14, 14), 96, (3, 3), (1, 1), (0, 0)),
        ((96, 6, 6), 128, (3, 3), (1, 1), (1, 1)),
    ],
    "2c2d": [
        ((1, 28, 28), 32, (5, 5), (1, 1), (2, 2)),
        ((32, 14, 14), 64, (5, 5), (1, 1), (2, 2)),
    ],
    "all_cnn_c": [
        ((3, 32, 32), 96, (3, 3), (1, 1), (1, 1)),
        ((96, 32, 32), 96, (3, 3), (1, 1), (1, 1)),
        ((96, 32, 32), 96, (3, 3), (2, 2), (1, 1)),
        ((96, 16, 16), 192, (3, 3), (1, 1), (1, 1)),
        ((192, 16, 16), 192, (3, 3), (1, 1), (1, 1)),
        ((192, 16, 16), 192, (3, 3), (2, 2), (1, 1)),
        ((192, 8, 8), 192, (3, 3), (1, 1), (0, 0)),
        ((192, 6, 6), 192, (1, 1), (1, 1), (0, 0)),
        ((192, 6, 6), 100, (1, 1), (1, 1), (0, 0)),
    ],
}


@pytest.mark.parametrize("net", DEEPOBS_NETS, ids=DEEPOBS_NETS)
def test_deepobs_layers_match_design(net):
    """The DeepOBS layer tables of design.md §5."""
    layers = benchmark_layers([net])
    got = [
        (
            (la.in_channels, *la.input_spatial),
            la.out_channels,
            la.kernel_size,
            la.stride,
            la.padding,
        )
        for la in layers
    ]
    assert got == DEEPOBS_EXPECTED[net]


def test_to_dict_round_trip():
    layer = extract_conv_layers(_Toy(), (4, 10, 10), "toy")[3]
    data = layer.to_dict()
    assert isinstance(data["kernel_size"], list)
    assert ConvLayer.from_dict(data) == layer
    assert ConvLayer.from_dict(data).count == layer.count


def test_unfolded_numel_and_label():
    layer = extract_conv_layers(_Toy(), (4, 10, 10), "toy")[2]  # d: 6x10x10 -> 8, k1 s2
    assert layer.unfolded_numel(3) == 3 * 6 * 1 * 5 * 5
    assert layer.weight_shape == (8, 6, 1, 1)
    assert layer.label == "6x10x10 ->8 k1x1 s2x2"


def test_unknown_net_raises():
    with pytest.raises(ValueError, match="Invalid net: 'resnet19'.*resnet18"):
        benchmark_layers(["resnet19"])


@pytest.fixture(scope="module")
def all_layers() -> list[ConvLayer]:
    pytest.importorskip("torchvision")
    return benchmark_layers()


def test_all_nine_nets_extracted(all_layers):
    nets = {la.net for la in all_layers}
    assert nets == set(NETS)
    # design.md §5: about 130 unique configurations in all
    assert 115 <= len(all_layers) <= 145, len(all_layers)
    for net in NETS:
        keys = [la.key for la in all_layers if la.net == net]
        assert len(keys) == len(set(keys)), f"duplicates left in {net}"
    assert {la.category for la in all_layers} == set(CATEGORIES)


def test_known_torchvision_layers(all_layers):
    by_name = {(la.net, la.name): la for la in all_layers}
    stem = by_name[("resnet18", "conv1")]
    assert (stem.in_channels, stem.input_spatial, stem.out_channels) == (3, (224, 224), 64)
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == (
        (7, 7),
        (2, 2),
        (3, 3),
        False,
    )
    assert stem.category == "general"
    down = by_name[("resnet18", "layer2.0.downsample.0")]
    assert (down.input_spatial, down.kernel_size, down.stride, down.category) == (
        (56, 56),
        (1, 1),
        (2, 2),
        "down",
    )
    patchify = by_name[("convnext_base", "features.0.0")]
    assert (patchify.kernel_size, patchify.stride, patchify.category) == ((4, 4), (4, 4), "dense")
    depthwise = by_name[("convnext_base", "features.1.0.block.0")]
    assert depthwise.groups == depthwise.in_channels == 128
    assert by_name[("inception_v3", "Conv2d_1a_3x3.conv")].input_spatial == (299, 299)
    mixed = [la for la in all_layers if la.category == "mixed"]
    assert mixed and {la.net for la in mixed} == {"inception_v3"}
    assert {la.kernel_size for la in mixed} <= {(1, 7), (7, 1), (1, 3), (3, 1)}
    assert {la.net for la in all_layers if la.category == "down"} == {
        "resnet18",
        "resnext101_32x8d",
    }
