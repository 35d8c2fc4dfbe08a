"""Networks for the training front end.

Built-in: the DeepOBS test problems 3c3d, 2c2d and All-CNN-C (design.md §5), a small CNN for the
8x8 digits, and a convolutional autoencoder whose decoder uses ``ConvTranspose2d``. Any torchvision
classification model is available by name; ResNets additionally take a width multiplier and the
CIFAR stem (3x3/s1 first conv, no max-pool).

All built-ins are parameterised by input channels, image size and number of classes; dense layer
sizes after the conv trunk are computed from a dry run, so any input size that survives the
poolings works.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kfac_tn.training.config import BUILTIN_MODELS, WIDTH_RESNETS, ModelConfig

__all__ = [
    "AllCNNC",
    "ConvAutoencoder",
    "DigitsCNN",
    "Net2c2d",
    "Net3c3d",
    "build_model",
    "is_reconstruction",
]

logger = logging.getLogger(__name__)


def _w(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _flat_dim(trunk: nn.Module, in_channels: int, image_size: int, name: str) -> int:
    try:
        with torch.no_grad():
            return trunk(torch.zeros(1, in_channels, image_size, image_size)).numel()
    except RuntimeError as exc:
        raise ValueError(
            f"data.image_size: {image_size} is too small for model.name {name!r} ({exc})"
        ) from exc


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 (or upsampled) digits: 3 convs (3x3) with one 2x2 max-pool, then linear.

    Input ``[N, C, S, S]`` -> logits ``[N, num_classes]``.
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: float = 1.0
    ) -> None:
        super().__init__()
        c1, c2 = _w(32, width), _w(64, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(
            _flat_dim(self.features, in_channels, image_size, "digits_cnn"), num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images ``[N, C, S, S]``.

        Returns:
            Logits ``[N, num_classes]``.
        """
        return self.classifier(self.features(x))


class Net3c3d(nn.Module):
    """DeepOBS 3c3d network.

    conv 64 k5 valid, pool 3/2, conv 96 k3 valid, pool 3/2, conv 128 k3 p1, pool 3/2, dense
    512 -> 256 -> classes, ReLU (pools use 'same'-style padding 1 like DeepOBS).
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: float = 1.0
    ) -> None:
        super().__init__()
        c1, c2, c3 = _w(64, width), _w(96, width), _w(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Flatten(),
        )
        flat = _flat_dim(self.features, in_channels, image_size, "3c3d")
        self.classifier = nn.Sequential(
            nn.Linear(flat, _w(512, width)),
            nn.ReLU(),
            nn.Linear(_w(512, width), _w(256, width)),
            nn.ReLU(),
            nn.Linear(_w(256, width), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images ``[N, C, S, S]``.

        Returns:
            Logits ``[N, num_classes]``.
        """
        return self.classifier(self.features(x))


class Net2c2d(nn.Module):
    """DeepOBS 2c2d: conv 32 k5 p2, pool 2, conv 64 k5 p2, pool 2, dense 1024 -> classes, ReLU."""

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: float = 1.0
    ) -> None:
        super().__init__()
        c1, c2 = _w(32, width), _w(64, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = _flat_dim(self.features, in_channels, image_size, "2c2d")
        self.classifier = nn.Sequential(
            nn.Linear(flat, _w(1024, width)), nn.ReLU(), nn.Linear(_w(1024, width), num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images ``[N, C, S, S]``.

        Returns:
            Logits ``[N, num_classes]``.
        """
        return self.classifier(self.features(x))


class AllCNNC(nn.Module):
    """All-CNN-C network.

    96 k3 p1, 96 k3 p1, 96 k3 s2 (p1), 192 k3 p1, 192 k3 p1, 192 k3 s2 (p1), 192 k3 valid,
    192 k1, classes k1, global average pool; ReLU after every conv but the last.

    Dropout (DeepOBS): ``0.4 * dropout`` on the input and ``dropout`` after each stride-2 conv
    (``dropout=0.5`` gives the published 0.2 / 0.5).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 100,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        del image_size  # fully convolutional
        a, b = _w(96, width), _w(192, width)
        self.net = nn.Sequential(
            nn.Dropout(0.4 * dropout),
            nn.Conv2d(in_channels, a, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(a, a, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(a, a, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(a, b, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(b, b, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(b, b, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(b, b, 3),
            nn.ReLU(),
            nn.Conv2d(b, b, 1),
            nn.ReLU(),
            nn.Conv2d(b, num_classes, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images ``[N, C, S, S]``.

        Returns:
            Logits ``[N, num_classes]``.
        """
        return self.net(x)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder: two 3x3/s2 convs down, two ``ConvTranspose2d`` 3x3/s2 up.

    ``x: [N, C, S, S] -> reconstruction [N, C, S, S]`` (S divisible by 4; linear output, trained
    with MSE against standardised images).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, width: float = 1.0) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(
                f"data.image_size: {image_size} must be divisible by 4 for the autoencoder"
            )
        c1, c2 = _w(16, width), _w(32, width)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 3, stride=2, padding=1, output_padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct a batch of images.

        Args:
            x: Images ``[N, C, S, S]``.

        Returns:
            The reconstruction ``[N, C, S, S]``.
        """
        return self.decoder(self.encoder(x))


def is_reconstruction(cfg: ModelConfig) -> bool:
    """Tell whether the model is trained on reconstruction (MSE) rather than classification.

    Args:
        cfg: The model config.

    Returns:
        ``True`` for the autoencoder.
    """
    return cfg.name == "autoencoder"


_RESNET_LAYOUT = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
    "resnet101": ("Bottleneck", [3, 4, 23, 3]),
    "resnet152": ("Bottleneck", [3, 8, 36, 3]),
}
assert tuple(_RESNET_LAYOUT) == WIDTH_RESNETS


def _scaled_resnet(name: str, width: float, num_classes: int) -> nn.Module:
    """Build a torchvision ResNet with every stage ``width`` times as wide (stem kept at 64)."""
    from torchvision.models import resnet

    block_name, layers = _RESNET_LAYOUT[name]
    block = getattr(resnet, block_name)

    class ScaledResNet(resnet.ResNet):
        """A torchvision ResNet whose stages have ``width`` times the channels."""

        def _make_layer(
            self,
            block: type[nn.Module],
            planes: int,
            blocks: int,
            stride: int = 1,
            dilate: bool = False,
        ) -> nn.Sequential:
            return super()._make_layer(block, _w(planes, width), blocks, stride, dilate)

    model = ScaledResNet(block, layers, num_classes=num_classes)
    model.fc = nn.Linear(_w(512, width) * block.expansion, num_classes)
    return model


def _torchvision_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    if cfg.name in WIDTH_RESNETS:
        if cfg.width != 1.0:
            model = _scaled_resnet(cfg.name, cfg.width, num_classes)
        else:
            model = tvm.get_model(cfg.name, weights=None, num_classes=num_classes)
        if cfg.cifar_stem or in_channels != 3:
            out = model.conv1.out_channels
            k, s, p = (3, 1, 1) if cfg.cifar_stem else (7, 2, 3)
            model.conv1 = nn.Conv2d(in_channels, out, k, stride=s, padding=p, bias=False)
            if cfg.cifar_stem:
                model.maxpool = nn.Identity()
        return model
    if cfg.cifar_stem:
        raise ValueError(f"model.cifar_stem: True is only supported for {list(WIDTH_RESNETS)}")
    if in_channels != 3:
        raise ValueError(
            f"model.name: {cfg.name!r} expects 3 input channels, the data has {in_channels}"
        )
    return tvm.get_model(cfg.name, weights=None, num_classes=num_classes)


def build_model(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Instantiate the configured network.

    Args:
        cfg: model config.
        in_channels: input channels of the data.
        image_size: input side length.
        num_classes: number of classes (ignored by the autoencoder).

    Returns:
        The model (on CPU, float32).

    Raises:
        ValueError: if the model cannot take this data.
    """
    if cfg.name == "digits_cnn":
        model = DigitsCNN(in_channels, image_size, num_classes, cfg.width)
    elif cfg.name == "3c3d":
        model = Net3c3d(in_channels, image_size, num_classes, cfg.width)
    elif cfg.name == "2c2d":
        model = Net2c2d(in_channels, image_size, num_classes, cfg.width)
    elif cfg.name == "allcnnc":
        model = AllCNNC(in_channels, image_size, num_classes, cfg.width, cfg.dropout)
    elif cfg.name == "autoencoder":
        model = ConvAutoencoder(in_channels, image_size, cfg.width)
    else:
        assert cfg.name not in BUILTIN_MODELS
        model = _torchvision_model(cfg, in_channels, num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %s parameters", cfg.name, f"{n_params:,}")
    return model


def count_conv_layers(model: nn.Module) -> int:
    """Count the convolution modules (transposed ones included) in ``model``.

    Args:
        model: Any module.

    Returns:
        The number of ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` submodules.
    """
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
