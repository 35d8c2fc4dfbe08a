from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_tn.training.config import ModelConfig
from kfac_tn.training.models import AllCNNC, ConvAutoencoder, Net2c2d, Net3c3d, build_model


def conv_signature(model: nn.Module) -> list[tuple]:
    return [
        (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    ]


def linear_signature(model: nn.Module) -> list[tuple]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_3c3d_matches_deepobs():
    model = Net3c3d(3, 32, 10)
    assert conv_signature(model) == [
        ("Conv2d", 3, 64, (5, 5), (1, 1), (0, 0)),
        ("Conv2d", 64, 96, (3, 3), (1, 1), (0, 0)),
        ("Conv2d", 96, 128, (3, 3), (1, 1), (1, 1)),
    ]
    pools = [(m.kernel_size, m.stride) for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == [(3, 2)] * 3
    # 32 -conv5-> 28 -pool-> 14 -conv3-> 12 -pool-> 6 -conv3p1-> 6 -pool-> 3
    assert linear_signature(model) == [(128 * 3 * 3, 512), (512, 256), (256, 10)]


def test_2c2d_matches_deepobs():
    model = Net2c2d(1, 28, 10)
    assert conv_signature(model) == [
        ("Conv2d", 1, 32, (5, 5), (1, 1), (2, 2)),
        ("Conv2d", 32, 64, (5, 5), (1, 1), (2, 2)),
    ]
    assert linear_signature(model) == [(64 * 7 * 7, 1024), (1024, 10)]


def test_allcnnc_matches_paper():
    model = AllCNNC(3, 32, 100)
    s1, s2, p1, p0 = (1, 1), (2, 2), (1, 1), (0, 0)
    k3, k1 = (3, 3), (1, 1)
    assert conv_signature(model) == [
        ("Conv2d", 3, 96, k3, s1, p1),
        ("Conv2d", 96, 96, k3, s1, p1),
        ("Conv2d", 96, 96, k3, s2, p1),
        ("Conv2d", 96, 192, k3, s1, p1),
        ("Conv2d", 192, 192, k3, s1, p1),
        ("Conv2d", 192, 192, k3, s2, p1),
        ("Conv2d", 192, 192, k3, s1, p0),
        ("Conv2d", 192, 192, k1, s1, p0),
        ("Conv2d", 192, 100, k1, s1, p0),
    ]
    expected_params = sum(
        (ci * k[0] * k[1] + 1) * co for _, ci, co, k, _, _ in conv_signature(model)
    )
    assert sum(p.numel() for p in model.parameters()) == expected_params == 1_387_108
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.2, 0.5, 0.5]
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


SHAPE_CASES = [
    ("digits_cnn", 1, 8, 10),
    ("digits_cnn", 3, 32, 7),
    ("2c2d", 1, 28, 10),
    ("2c2d", 3, 16, 5),
    ("3c3d", 3, 32, 10),
    ("3c3d", 1, 24, 3),
    ("allcnnc", 3, 32, 100),
    ("allcnnc", 1, 16, 10),
]


@pytest.mark.parametrize(
    ("name", "c", "s", "k"), SHAPE_CASES, ids=[f"{n}-{c}x{s}-{k}" for n, c, s, k in SHAPE_CASES]
)
def test_classifier_shapes(name, c, s, k):
    model = build_model(ModelConfig(name=name, width=0.25), c, s, k)
    assert model(torch.randn(3, c, s, s)).shape == (3, k)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_autoencoder_uses_transposed_convs(size):
    model = build_model(ModelConfig(name="autoencoder"), 3, size, 10)
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == x.shape
    kinds = [t for t, *_ in conv_signature(model)]
    assert kinds == ["Conv2d", "Conv2d", "ConvTranspose2d", "ConvTranspose2d"]
    with pytest.raises(ValueError, match="data.image_size: 10 must be divisible by 4"):
        ConvAutoencoder(1, 10)


def test_too_small_input_names_image_size():
    with pytest.raises(ValueError, match="data.image_size: 8 is too small for model.name '3c3d'"):
        build_model(ModelConfig(name="3c3d"), 1, 8, 10)


def test_resnet18_cifar_stem_and_width():
    import torchvision

    full = build_model(ModelConfig(name="resnet18"), 3, 224, 10)
    reference = torchvision.models.resnet18(num_classes=10)
    assert sum(p.numel() for p in full.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    cifar = build_model(ModelConfig(name="resnet18", cifar_stem=True), 3, 32, 10)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    narrow = build_model(ModelConfig(name="resnet18", cifar_stem=True, width=0.25), 3, 32, 10)
    assert narrow.layer1[0].conv1.out_channels == 16 and narrow.layer4[1].conv2.out_channels == 128
    assert narrow.fc.in_features == 128
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_width_and_grayscale():
    model = build_model(ModelConfig(name="resnet50", width=0.125), 1, 64, 4)
    assert model.conv1.in_channels == 1 and model.fc.in_features == 64 * 4
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_other_torchvision_model():
    model = build_model(ModelConfig(name="mobilenet_v2"), 3, 32, 6)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        build_model(ModelConfig(name="mobilenet_v2"), 1, 32, 6)
