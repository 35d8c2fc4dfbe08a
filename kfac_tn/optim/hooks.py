"""Capture hooks: layer inputs and output gradients, and the model output. Plumbing only, no math.

Per layer, a forward pre-hook keeps the input (only when ``active(module)`` says so — the
optimizer makes that true on factor-update steps in training mode with gradients enabled), and a
forward hook hands ``(input, output)`` to ``on_forward``. If that returns a callback, it is
registered as a tensor hook on the *output*, so it receives the gradient w.r.t. the layer output
during backward. A tensor hook, unlike ``register_full_backward_hook``, works when the next
module modifies the output in place (``ReLU(inplace=True)``): it sees the gradient of the value
the layer produced. The kept input is released in the forward hook and the callback is released
with the autograd graph, so nothing captured outlives the step.

A forward hook on the whole model hands its output to ``on_output`` (the optimizer uses it for
the loss scale and for its own Monte-Carlo / type-2 backward passes).

The hooks are objects of module-level classes that pickle (and deep-copy) as inert hooks, so
``torch.save(model)``, ``pickle.dumps(model)`` and ``copy.deepcopy(model)`` work with an optimizer
attached, as with SGD; a copy never captures for the original's optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GradCallback", "HookSet"]

GradCallback = Callable[[Tensor], None]


class _InertHook:
    """What a capture hook becomes when its module is pickled or copied: it does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class _Hook:
    """Base of the capture hooks: callable, and pickled/copied as :class:`_InertHook`."""

    def __reduce__(self) -> tuple[type, tuple]:
        return _InertHook, ()


class _PreHook(_Hook):
    def __init__(self, hooks: HookSet, module: nn.Module, active: Callable[[nn.Module], bool]):
        self.hooks, self.module, self.active = hooks, module, active

    def __call__(self, mod: nn.Module, args: tuple) -> None:
        if mod is self.module and args and isinstance(args[0], Tensor) and self.active(mod):
            self.hooks._inputs[id(mod)] = args[0]


class _ForwardHook(_Hook):
    def __init__(
        self,
        hooks: HookSet,
        module: nn.Module,
        on_forward: Callable[[nn.Module, Tensor, Tensor], GradCallback | None],
    ):
        self.hooks, self.module, self.on_forward = hooks, module, on_forward

    def __call__(self, mod: nn.Module, args: tuple, output: Any) -> None:
        if mod is not self.module:
            return
        x = self.hooks._inputs.pop(id(mod), None)
        if x is None or not isinstance(output, Tensor):
            return
        callback = self.on_forward(mod, x, output)
        if callback is not None and output.requires_grad:
            output.register_hook(_NoReturn(callback))


class _ModelInputHook(_Hook):
    def __init__(self, model: nn.Module, on_input: Callable[[tuple, dict], None]):
        self.model, self.on_input = model, on_input

    def __call__(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if mod is self.model:
            self.on_input(args, kwargs)


class _ModelHook(_Hook):
    def __init__(self, model: nn.Module, on_output: Callable[[object], None]):
        self.model, self.on_output = model, on_output

    def __call__(self, mod: nn.Module, args: tuple, output: object) -> None:
        if mod is self.model:
            self.on_output(output)


class _NoReturn:
    """Tensor hook calling ``callback(grad)`` without ever replacing the gradient."""

    def __init__(self, callback: GradCallback) -> None:
        self.callback = callback

    def __call__(self, grad: Tensor) -> None:
        self.callback(grad)


class HookSet:
    """The hooks of one optimizer; :meth:`remove` detaches all of them."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._inputs: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def add_layer(
        self,
        module: nn.Module,
        *,
        active: Callable[[nn.Module], bool],
        on_forward: Callable[[nn.Module, Tensor, Tensor], GradCallback | None],
    ) -> None:
        """Register the hooks of one layer.

        Args:
            module: The layer (its first positional argument is the captured input).
            active: Called in the pre-hook; capture this forward pass only if it returns True.
            on_forward: Called with ``(module, input, output)`` after the forward pass; may return
                a callback for the gradient w.r.t. the output.
        """
        self._handles.append(module.register_forward_pre_hook(_PreHook(self, module, active)))
        self._handles.append(module.register_forward_hook(_ForwardHook(self, module, on_forward)))

    def add_model(self, model: nn.Module, on_output: Callable[[object], None]) -> None:
        """Hand every output of ``model`` to ``on_output`` (after all layer hooks of that pass)."""
        self._handles.append(model.register_forward_hook(_ModelHook(model, on_output)))

    def add_model_input(self, model: nn.Module, on_input: Callable[[tuple, dict], None]) -> None:
        """Hand the ``(args, kwargs)`` of every call of ``model`` to ``on_input`` (before it)."""
        handle = model.register_forward_pre_hook(_ModelInputHook(model, on_input), with_kwargs=True)
        self._handles.append(handle)

    def remove(self) -> None:
        """Remove every hook and drop any kept input."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
