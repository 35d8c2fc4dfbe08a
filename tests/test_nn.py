"""Tests for kfac_tn.nn: SampledConv1d/2d/3d and convert_sampled.

The forward pass, the input gradient and the bias gradient must match torch's ConvNd exactly;
the weight gradient must be the sampled estimator for the same draw; the saved activations
must be only the kept part of the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_tn
from kfac_tn.nn import (
    MaskReLU,
    SampledConv1d,
    SampledConv2d,
    SampledConv3d,
    convert_mask_relu,
    convert_sampled,
)
from kfac_tn.tn.sampled import draw_sample, sampled_conv_weight_vjp

SAMPLED = {1: SampledConv1d, 2: SampledConv2d, 3: SampledConv3d}
TORCH = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class LayerCase:
    """A layer configuration (constructor kwargs) and its input spatial size."""

    nd: int
    spatial: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    c_in: int = 4
    c_out: int = 6

    @property
    def id(self) -> str:
        args = "-".join(f"{k}={v}" for k, v in self.kwargs.items()).replace(" ", "")
        return f"{self.nd}d-{args}"

    def pair(self, keep_prob: float, axis: str, mode: str = "position", seed: int = 0):
        """A torch conv and a sampled conv with identical parameters (float64)."""
        torch.manual_seed(0)
        ref = TORCH[self.nd](self.c_in, self.c_out, dtype=torch.float64, **self.kwargs)
        gen = torch.Generator().manual_seed(seed)
        layer = SAMPLED[self.nd](
            self.c_in, self.c_out, dtype=torch.float64, keep_prob=keep_prob, axis=axis,
            spatial_mode=mode, generator=gen, **self.kwargs,
        )  # fmt: skip
        layer.load_state_dict(ref.state_dict())
        return ref, layer

    def input(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, self.c_in, *self.spatial, generator=gen, dtype=torch.float64)
        return x.requires_grad_(True)


LAYERS = [
    LayerCase(1, (11,), dict(kernel_size=3, padding=1)),
    LayerCase(1, (12,), dict(kernel_size=4, padding="same", dilation=2, groups=2)),
    LayerCase(1, (10,), dict(kernel_size=3, stride=2, padding=2, padding_mode="circular")),
    LayerCase(2, (9, 8), dict(kernel_size=3, padding=1, bias=False)),
    LayerCase(2, (9, 10), dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), groups=2)),
    LayerCase(2, (8, 8), dict(kernel_size=2, padding="same"), c_out=4),  # asymmetric padding
    LayerCase(2, (8, 9), dict(kernel_size=3, padding=1, padding_mode="reflect")),
    LayerCase(2, (7, 7), dict(kernel_size=3, padding=1, groups=4), c_out=8),  # depthwise
    LayerCase(3, (5, 6, 4), dict(kernel_size=3, padding=1)),
    LayerCase(3, (6, 5, 5), dict(kernel_size=2, stride=2, groups=2, padding_mode="replicate")),
]
AXES = [("spatial", "position"), ("spatial", "dims"), ("channel", "position")]
AXIS_IDS = ["spatial-position", "spatial-dims", "channel"]


def _padded(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Input and padding argument of the zero-padded convolution the layer computes."""
    if layer.padding_mode == "zeros":
        return x, layer.padding
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0


@pytest.mark.parametrize("axis,mode", AXES, ids=AXIS_IDS)
@pytest.mark.parametrize("case", LAYERS, ids=[c.id for c in LAYERS])
def test_forward_exact_and_backward_uses_estimator(case: LayerCase, axis: str, mode: str):
    ref, layer = case.pair(0.4, axis, mode, seed=5)
    x = case.input()
    y_ref, y = ref(x), layer(x)
    assert y.grad_fn is not None and "SampledConv" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)

    v = torch.randn_like(y)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    ref_params = [p for p in (ref.weight, ref.bias) if p is not None]
    gx, gw, *gb = torch.autograd.grad(y, [x, *params], v)
    gx_ref, _, *gb_ref = torch.autograd.grad(y_ref, [x, *ref_params], v)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)  # input gradient exact
    for a, b in zip(gb, gb_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # bias gradient exact
    # weight gradient: the functional estimator with the same draw
    xp, padding = _padded(layer, x.detach())
    expected = sampled_conv_weight_vjp(
        xp, v, layer.kernel_size, layer.stride, padding, layer.dilation, layer.groups,
        keep_prob=0.4, axis=axis, spatial_mode=mode, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    torch.testing.assert_close(gw, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "case", LAYERS[:3] + LAYERS[7:9], ids=[c.id for c in LAYERS[:3] + LAYERS[7:9]]
)
def test_exact_paths(case: LayerCase):
    """keep_prob=1, eval mode, no_grad and a frozen weight fall back to torch's convolution."""
    x = case.input()
    ref, layer = case.pair(1.0, "spatial")
    v = torch.randn_like(ref(x))
    exact = torch.autograd.grad(ref(x), [x, ref.weight], v)
    y = layer(x)
    assert "SampledConv" not in type(y.grad_fn).__name__
    for a, b in zip(torch.autograd.grad(y, [x, layer.weight], v), exact):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    _, layer = case.pair(0.3, "spatial")
    layer.eval()
    y = layer(x)
    assert "SampledConv" not in type(y.grad_fn).__name__
    torch.testing.assert_close(torch.autograd.grad(y, layer.weight, v)[0], exact[1])
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))
    layer.weight.requires_grad_(False)
    y = layer(x)
    assert "SampledConv" not in type(y.grad_fn).__name__
    torch.testing.assert_close(torch.autograd.grad(y, x, v)[0], exact[0])


def test_unbatched_input():
    case = LAYERS[3]
    ref, layer = case.pair(0.5, "spatial")
    x = case.input()[0].detach().requires_grad_(True)
    y = layer(x)
    assert y.shape == ref(x).shape
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(ref(x).sum(), x)[0], rtol=0, atol=1e-12)


def test_autocast_matches_torch_conv_dtype_and_grads():
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = SampledConv2d(4, 6, 3, padding=1, keep_prob=0.5)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), layer(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


# --- saved activation memory ------------------------------------------------------------


def _saved_activation_numel(layer: nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
    """Total numel of the non-parameter tensors saved for backward, and their sizes."""
    param_ptrs = {p.data_ptr() for p in layer.parameters()}
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in param_ptrs:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(sizes), sizes


@pytest.mark.parametrize("axis,mode", AXES, ids=AXIS_IDS)
def test_saved_memory_falls_with_keep_prob(axis: str, mode: str):
    x = torch.randn(4, 16, 24, 24, requires_grad=True)
    exact_numel, _ = _saved_activation_numel(nn.Conv2d(16, 16, 3, padding=1), x)
    assert exact_numel == x.numel()  # torch saves the full input
    means = {}
    for keep_prob in (0.75, 0.5, 0.25):
        fractions = []
        for seed in range(4):
            layer = SampledConv2d(
                16, 16, 3, padding=1, keep_prob=keep_prob, axis=axis, spatial_mode=mode,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            total, sizes = _saved_activation_numel(layer, x)
            assert x.numel() not in sizes, "a full-size input copy was saved"
            # exactly the kept entries plus the kept indices
            sample_gen = torch.Generator().manual_seed(seed)
            sample = draw_sample(x.shape, keep_prob, axis, spatial_mode=mode, generator=sample_gen)
            kept = round(sample.kept_fraction * x.numel())
            assert total == kept + sum(i.numel() for i in sample.indices)
            fractions.append(total / x.numel())
        means[keep_prob] = sum(fractions) / len(fractions)
    assert means[0.75] > means[0.5] > means[0.25]
    assert means[0.25] < 0.5


# --- conversion -------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2)
        )
        self.head = nn.Conv2d(8, 4, 1)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.head(self.features(x)))
        return self.fc(x.mean((2, 3)))


def test_convert_sampled_replaces_matching_convs_and_shares_parameters():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 10, 10)
    before = net(x)
    old = [net.features[0], net.features[2], net.head]
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    out = convert_sampled(net, 0.5, "channel", layers="features.*")
    assert out is net
    assert isinstance(net.features[0], SampledConv2d) and isinstance(net.features[2], SampledConv2d)
    assert type(net.head) is nn.Conv2d and type(net.up) is nn.ConvTranspose2d
    assert net.features[0].weight is old[0].weight and net.features[2].bias is old[1].bias
    assert net.features[0].axis == "channel" and net.features[0].keep_prob == 0.5
    assert isinstance(net.features[0], nn.Conv2d)  # KFAC's isinstance registry still matches
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    # the optimizer built before conversion still updates the (shared) parameters
    w0 = net.features[0].weight.detach().clone()
    net(x).sum().backward()
    sgd.step()
    assert not torch.equal(net.features[0].weight, w0)
    # re-conversion updates settings; a list of patterns; the root itself
    convert_sampled(net, 0.25, layers=["features.0", "head"])
    assert net.features[0].keep_prob == 0.25 and net.features[2].keep_prob == 0.5
    assert isinstance(net.head, SampledConv2d)
    root = convert_sampled(nn.Conv1d(2, 2, 3), 0.5)
    assert isinstance(root, SampledConv1d)
    assert "keep_prob=0.5" in repr(root)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(keep_prob=0.0), "keep_prob"),
        (dict(keep_prob=2), "keep_prob"),
        (dict(keep_prob=0.5, axis="width"), "axis"),
        (dict(keep_prob=0.5, spatial_mode="x"), "spatial_mode"),
    ],
    ids=["keep_prob=0", "keep_prob=2", "axis", "spatial_mode"],
)
def test_invalid_arguments_raise(kwargs: dict, name: str):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        SampledConv2d(2, 2, 3, **kwargs)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        convert_sampled(_Net(), **kwargs)


def test_state_dict_compatible_with_torch_conv():
    layer = SampledConv3d(2, 3, 2, keep_prob=0.5)
    ref = nn.Conv3d(2, 3, 2)
    ref.load_state_dict(layer.state_dict())
    layer.load_state_dict(ref.state_dict())


def test_hooks_see_full_input_and_exact_output_gradient():
    """Forward hooks get the full input; a tensor hook on the output gets the exact gradient."""
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 10, 10)
    exact_net = _Net()
    exact_net.load_state_dict(net.state_dict())
    convert_sampled(net, 0.3)
    seen: dict[str, list] = {"sampled": [], "exact": []}
    for key, model in (("sampled", net), ("exact", exact_net)):

        def hook(module, inputs, output, key=key):
            seen[key].append(inputs[0].detach().clone())
            output.register_hook(lambda g: seen[key].append(g.clone()))

        model.features[2].register_forward_hook(hook)
        model(x).sum().backward()
    assert len(seen["sampled"]) == 2
    for a, b in zip(seen["sampled"], seen["exact"]):
        torch.testing.assert_close(a, b)


def test_kfac_optimizer_on_converted_model_has_exact_factors():
    """Input and output gradients stay exact, so KFAC's factors equal the exact model's."""
    kfac_cls = getattr(kfac_tn, "KFAC", None)
    if kfac_cls is None:
        pytest.skip("kfac_tn.KFAC not available yet")
    torch.manual_seed(0)
    exact_net = _Net()
    net = _Net()
    net.load_state_dict(exact_net.state_dict())
    convert_sampled(net, 0.5, layers="features.*", generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(8, 3, 10, 10), torch.randint(0, 3, (8,))
    opts = [kfac_cls(m, lr=0.05, inverse_update_period=1) for m in (net, exact_net)]
    w0 = net.features[0].weight.detach().clone()
    losses = []
    for _ in range(2):
        for model, opt in zip((net, exact_net), opts):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        for p, p_exact in zip(
            (net.features[0].weight, net.features[2].weight, net.head.weight),
            (exact_net.features[0].weight, exact_net.features[2].weight, exact_net.head.weight),
        ):
            state, state_exact = opts[0].state[p], opts[1].state[p_exact]
            assert "A" in state and "G" in state
            torch.testing.assert_close(state["A"], state_exact["A"])
            torch.testing.assert_close(state["G"], state_exact["G"])
        # the models drift apart after the first (sampled) update, so compare the first step only
        net.load_state_dict(exact_net.state_dict())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(net.features[0].weight, w0)
    for opt in opts:
        opt.remove_hooks()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("axis,mode", AXES, ids=AXIS_IDS)
def test_cuda_matches_cpu(axis: str, mode: str):
    """Same draw (host generator) on CUDA and CPU: equal outputs and gradients."""
    case = LAYERS[4]
    grads = []
    for device in ("cpu", "cuda"):
        _, layer = case.pair(0.5, axis, mode, seed=11)
        layer.to(device)
        x = case.input().detach().to(device).requires_grad_(True)
        y = layer(x)
        v = torch.ones_like(y)
        grads.append([t.cpu() for t in (y, *torch.autograd.grad(y, [x, layer.weight], v))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- mask ReLU ----------------------------------------------------------------------------


def test_mask_relu_matches_relu_and_saves_a_bool_mask():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x[0, 0, :2] = 0.0  # the derivative at 0 is 0, as in torch
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = MaskReLU()(x)
    y_ref = torch.relu(x)
    assert torch.equal(y, y_ref)
    v = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, v)[0], torch.autograd.grad(y_ref, x, v)[0])
    assert [t.dtype for t in saved] == [torch.bool]
    with pytest.raises(ValueError, match="Invalid inplace"):
        MaskReLU(inplace=True)


def test_mask_relu_with_sampled_convs_shrinks_network_memory():
    """Standard ReLU keeps the next conv's input alive; MaskReLU + sampling frees most of it."""

    def saved_bytes(model, x):
        storages = {}

        def pack(t):
            if not isinstance(t, nn.Parameter):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sum(storages.values())

    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
        )

    x = torch.randn(8, 3, 16, 16)
    exact = saved_bytes(net(), x)
    sampled = saved_bytes(convert_sampled(net(), 0.25), x)
    both = convert_mask_relu(convert_sampled(net(), 0.25))
    assert isinstance(both[1], MaskReLU)
    masked = saved_bytes(both, x)
    assert sampled > 0.9 * exact  # the ReLU output (conv 2's input) is still saved in full
    assert masked < 0.6 * exact  # mask (1 B) + kept quarter (4 B) instead of 4 B per entry
    assert isinstance(convert_mask_relu(nn.ReLU()), MaskReLU)
