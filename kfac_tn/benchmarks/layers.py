"""Convolution layers of the nine benchmark CNNs, extracted from the models themselves.

The paper's benchmark (design.md §5) runs every routine over the conv layers of three DeepOBS
networks (3c3d, 2c2d, All-CNN-C) and six torchvision ImageNet networks. This module builds each
ImageNet network on the ``meta`` device (no memory, no weight initialisation cost; the small
DeepOBS networks on CPU, where meta kernels would cost more in first-use overhead than they save),
runs one forward pass with forward-pre-hooks on every convolution to record the input shapes, and
returns one :class:`ConvLayer` per unique configuration of a network. Extraction of all nine
networks takes a few seconds (mostly importing torchvision), so nothing is cached on disk.

The DeepOBS networks come from :mod:`kfac_tn.training.models` (layouts of design.md §5;
TensorFlow's asymmetric 'same' padding of DeepOBS's strided layers is replaced there by PyTorch's
symmetric padding with the same output size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from math import prod

import torch
from torch import nn

from kfac_tn.tn.spec import ConvSpec, conv_spec
from kfac_tn.training.models import AllCNNC, Net2c2d, Net3c3d

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("general", "mixed", "dense", "down")
"""Layer categories of the paper's benchmark, in plotting order."""


@dataclass(frozen=True)
class ConvLayer:
    """One convolution layer configuration of a benchmark network.

    Attributes:
        net: Network name (a key of :data:`NETS`).
        name: Module path of the first layer in ``net`` with this configuration.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        input_spatial: Spatial input size ``(I_1, ..., I_N)`` (without batch and channels).
        kernel_size: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        padding: Symmetric zero padding per spatial dimension.
        dilation: Dilation per spatial dimension.
        groups: Number of channel groups.
        bias: Whether the layer has a bias.
        category: ``general`` | ``mixed`` | ``dense`` | ``down`` (from
            :attr:`kfac_tn.tn.spec.ConvSpec.layer_category`).
        count: How many layers of ``net`` share this configuration.
    """

    net: str
    name: str
    in_channels: int
    out_channels: int
    input_spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    category: str
    count: int = field(default=1, compare=False)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions ``N``."""
        return len(self.input_spatial)

    @property
    def spec(self) -> ConvSpec:
        """The validated :class:`~kfac_tn.tn.spec.ConvSpec` of this layer."""
        return conv_spec(
            self.input_spatial,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Spatial output size ``(O_1, ..., O_N)``."""
        return self.spec.out_spatial

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Weight shape ``[C_out, C_in / G, *K]``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def key(self) -> tuple:
        """Hyperparameters and input shape, without names: the deduplication key."""
        return (
            self.in_channels,
            self.out_channels,
            self.input_spatial,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias,
        )

    @property
    def label(self) -> str:
        """Short human-readable description, e.g. ``3x224x224 ->64 k7x7 s2 p3``."""
        parts = [
            "x".join(str(v) for v in (self.in_channels, *self.input_spatial)),
            f"->{self.out_channels}",
            "k" + "x".join(map(str, self.kernel_size)),
        ]
        if any(s != 1 for s in self.stride):
            parts.append("s" + "x".join(map(str, self.stride)))
        if any(p != 0 for p in self.padding):
            parts.append("p" + "x".join(map(str, self.padding)))
        if any(d != 1 for d in self.dilation):
            parts.append("d" + "x".join(map(str, self.dilation)))
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        return " ".join(parts)

    def unfolded_numel(self, batch_size: int) -> int:
        """Return the number of entries of the unfolded input ``[N, C_in·ΠK, ΠO]``."""
        return batch_size * self.in_channels * prod(self.kernel_size) * prod(self.output_spatial)

    def to_dict(self) -> dict:
        """JSON-serialisable representation (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ConvLayer:
        """Inverse of :meth:`to_dict`."""
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision  # optional dependency (extra 'vision'), imported lazily

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


@dataclass(frozen=True)
class NetEntry:
    """A benchmark network: how to build it, its input shape (without batch), where to trace it."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    source: str
    device: str = "meta"


NETS: dict[str, NetEntry] = {
    "3c3d": NetEntry(Net3c3d, (3, 32, 32), "DeepOBS cifar10_3c3d (kfac_tn.models)", "cpu"),
    "2c2d": NetEntry(Net2c2d, (1, 28, 28), "DeepOBS fmnist_2c2d (kfac_tn.models)", "cpu"),
    "all_cnn_c": NetEntry(AllCNNC, (3, 32, 32), "DeepOBS cifar100_allcnnc (kfac_tn.models)", "cpu"),
    "alexnet": NetEntry(_torchvision("alexnet"), (3, 224, 224), "torchvision"),
    "resnet18": NetEntry(_torchvision("resnet18"), (3, 224, 224), "torchvision"),
    "resnext101_32x8d": NetEntry(_torchvision("resnext101_32x8d"), (3, 224, 224), "torchvision"),
    "convnext_base": NetEntry(_torchvision("convnext_base"), (3, 224, 224), "torchvision"),
    "inception_v3": NetEntry(
        _torchvision("inception_v3", init_weights=False), (3, 299, 299), "torchvision"
    ),
    "mobilenet_v2": NetEntry(_torchvision("mobilenet_v2"), (3, 224, 224), "torchvision"),
}
"""The nine networks of the paper's benchmark (design.md §5), in the paper's order."""

DEEPOBS_NETS: tuple[str, ...] = ("3c3d", "2c2d", "all_cnn_c")


def _check_nets(nets: Iterable[str] | None) -> list[str]:
    if nets is None:
        return list(NETS)
    nets = list(nets)
    for net in nets:
        if net not in NETS:
            raise ValueError(f"Invalid net: {net!r} (allowed: {', '.join(NETS)})")
    return nets


def _symmetric_padding(module: nn.Module, name: str, spatial: Sequence[int]) -> tuple[int, ...]:
    """Resolve a conv module's padding into symmetric ints (string paddings included)."""
    padding = module.padding
    if isinstance(padding, str):
        spec = conv_spec(spatial, module.kernel_size, module.stride, padding, module.dilation)
        pads = [(d.pad_left, d.pad_right) for d in spec.dims]
        if any(left != right for left, right in pads):
            raise ValueError(
                f"Invalid padding of layer {name!r}: {padding!r} resolves to asymmetric {pads}, "
                f"which the benchmark's torch baselines cannot express"
            )
        return tuple(left for left, _ in pads)
    return tuple(int(p) for p in padding)


def extract_conv_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    net: str = "",
    *,
    dedupe: bool = True,
    device: str = "meta",
) -> list[ConvLayer]:
    """Record the configuration of every ``Conv1d/2d/3d`` a forward pass of ``model`` runs.

    The model is moved to ``device`` (on ``meta`` no memory is allocated and nothing is
    computed), put in eval mode, and run once on a zero tensor of shape ``[1, *input_shape]``;
    forward-pre-hooks record each convolution's input shape. Layers the forward pass does not
    call (e.g. InceptionV3's auxiliary classifier in eval mode) are not recorded. Transposed
    convolutions are not part of the nine networks and are not recorded.

    Args:
        model: The network. It is moved to ``device`` (its parameters are replaced in place).
        input_shape: Input shape without the batch dimension, e.g. ``(3, 224, 224)``.
        net: Network name stored in each row.
        dedupe: Merge layers with identical hyperparameters and input shape (the first module
            name is kept and ``count`` holds the multiplicity).
        device: Device of the forward pass (``meta`` for large models).

    Returns:
        The layers in the order the forward pass first reaches them.
    """
    model = model.to(device).eval()
    records: list[ConvLayer] = []
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            spatial = tuple(int(s) for s in x.shape[2:])
            padding = _symmetric_padding(module, name, spatial)
            spec = conv_spec(
                spatial, module.kernel_size, module.stride, padding, module.dilation, module.groups
            )
            records.append(
                ConvLayer(
                    net=net,
                    name=name,
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    input_spatial=spatial,
                    kernel_size=tuple(module.kernel_size),
                    stride=tuple(module.stride),
                    padding=padding,
                    dilation=tuple(module.dilation),
                    groups=module.groups,
                    bias=module.bias is not None,
                    category=spec.layer_category,
                )
            )

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()

    if not dedupe:
        return records
    unique: dict[tuple, ConvLayer] = {}
    counts: dict[tuple, int] = {}
    for layer in records:
        unique.setdefault(layer.key, layer)
        counts[layer.key] = counts.get(layer.key, 0) + 1
    return [ConvLayer(**{**asdict(layer), "count": counts[key]}) for key, layer in unique.items()]


def benchmark_layers(nets: Iterable[str] | None = None, *, dedupe: bool = True) -> list[ConvLayer]:
    """Extract the conv layers of the benchmark networks.

    Args:
        nets: Network names (keys of :data:`NETS`); ``None`` for all nine.
        dedupe: Merge identical configurations within each network.

    Returns:
        The layers, network by network, in forward order.

    Raises:
        ValueError: If a network name is unknown.
        ImportError: If a torchvision network is requested and torchvision is missing.
    """
    layers: list[ConvLayer] = []
    for net in _check_nets(nets):
        entry = NETS[net]
        with torch.device(entry.device):
            model = entry.build()
        found = extract_conv_layers(
            model, entry.input_shape, net, dedupe=dedupe, device=entry.device
        )
        log.debug("%s: %d conv layer configurations", net, len(found))
        layers.extend(found)
    return layers
