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
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GradCallback", "HookSet"]

GradCallback = Callable[[Tensor], None]


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
        key = id(module)

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            # ``mod is module`` keeps the hooks inert in deep copies of the model
            if mod is module and args and isinstance(args[0], Tensor) and active(mod):
                self._inputs[key] = args[0]

        def forward_hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
            x = self._inputs.pop(key, None)
            if x is None or not isinstance(output, Tensor):
                return
            callback = on_forward(mod, x, output)
            if callback is not None and output.requires_grad:
                output.register_hook(_no_return(callback))

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        self._handles.append(module.register_forward_hook(forward_hook))

    def add_model(self, model: nn.Module, on_output: Callable[[object], None]) -> None:
        """Hand every output of ``model`` to ``on_output`` (after all layer hooks of that pass)."""

        def hook(mod: nn.Module, args: tuple, output: object) -> None:
            if mod is model:
                on_output(output)

        self._handles.append(model.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook and drop any kept input."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()


def _no_return(callback: GradCallback) -> Callable[[Tensor], None]:
    """Wrap ``callback`` so the tensor hook never replaces the gradient."""

    def hook(grad: Tensor) -> None:
        callback(grad)

    return hook
