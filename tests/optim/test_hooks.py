"""Capture hooks: inputs only when active, output gradients with in-place activations, removal."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from torch import nn

from kfac_tn.capture import HookSet


def make(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(inplace=inplace), nn.Conv2d(3, 2, 1), nn.ReLU(inplace=inplace)
    ).double()


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_inplace"])
def test_output_gradient_and_input_are_the_layers(inplace):
    model = make(inplace)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    seen: dict[str, torch.Tensor] = {}
    hooks = HookSet()
    for name in ("0", "2"):

        def on_forward(module, inp, out, name=name):
            seen["in" + name] = inp.detach().clone()
            seen["out" + name] = out.detach().clone()  # before any in-place ReLU
            return lambda g: seen.__setitem__("grad" + name, g)

        hooks.add_layer(model.get_submodule(name), active=lambda m: True, on_forward=on_forward)
    model(x).square().sum().backward()

    # reference: autograd on an out-of-place copy of the model
    ref = make(False)
    h0 = ref[0](x)
    h0.retain_grad()
    h2 = ref[2](torch.relu(h0))
    h2.retain_grad()
    torch.relu(h2).square().sum().backward()
    assert_close(seen["in0"], x)
    assert_close(seen["out0"], h0)
    assert_close(seen["grad0"], h0.grad)
    assert_close(seen["grad2"], h2.grad)
    assert not hooks._inputs  # nothing kept after the forward pass


def test_inactive_layers_capture_nothing_and_remove_detaches():
    model = make(False)
    calls = []
    hooks = HookSet()
    hooks.add_layer(model[0], active=lambda m: False, on_forward=lambda *a: calls.append(1))
    hooks.add_model(model, lambda out: calls.append(2))
    model(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert calls == [2]
    assert len(hooks) == 3
    hooks.remove()
    model(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert calls == [2] and len(hooks) == 0
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_hooks_are_inert_in_a_deep_copy_of_the_model():
    model = make(False)
    calls = []
    hooks = HookSet()
    hooks.add_layer(model[0], active=lambda m: True, on_forward=lambda *a: calls.append("layer"))
    hooks.add_model(model, lambda out: calls.append("model"))
    clone = copy.deepcopy(model)
    clone(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert calls == []
    model(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert calls == ["layer", "model"]


def test_no_grad_output_registers_no_tensor_hook():
    model = make(False)
    grads = []
    hooks = HookSet()
    hooks.add_layer(model[0], active=lambda m: True, on_forward=lambda m, i, o: grads.append)
    with torch.no_grad():
        out = model(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert not out.requires_grad and grads == []
    hooks.remove()
