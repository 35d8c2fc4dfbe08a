"""Independent float64 references for Kronecker blocks: unfolded inputs from autograd Jacobians.

Nothing here uses ``kfac_tn``: the unfolded input of a (transposed) convolution is read off the
Jacobian of the layer output w.r.t. its weight (the layer is linear in the weight), the output
gradients come from ``torch.autograd.grad``, and the damped Kronecker solve is a dense
``torch.linalg.solve``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, replace_all_batch_norm_modules_

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CLASSES = 3


class Readout(nn.Module):
    """Fixed random projection of the flattened layer output to class logits (no parameters)."""

    def __init__(self, features: int, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer(
            "R", torch.randn(features, CLASSES, generator=generator, dtype=torch.float64)
        )

    def forward(self, y: Tensor) -> Tensor:
        return y.flatten(1) @ self.R


def per_sample_gradients(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor):
    """``∇_p ℓ_n`` of the per-sample cross-entropy losses, for each ``p`` in ``params``.

    From ``torch.func.jacrev`` of the vector of per-sample losses of the whole batch (so batch
    statistics, e.g. of BatchNorm, are those of the batch; running statistics are not touched):
    ``[N, *p.shape]`` per parameter.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    model = replace_all_batch_norm_modules_(copy.deepcopy(model))
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update(dict(model.named_buffers()))

    def losses(*values: Tensor) -> Tensor:
        out = functional_call(model, {**state, **dict(zip(keys, values))}, (x,))
        return F.cross_entropy(out, y, reduction="none")

    return jacrev(losses, argnums=tuple(range(len(params))))(*(p.detach() for p in params))


def groups_of(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def unfolded_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """Columns ``u [G, N, O, d_A]`` (bias-augmented) with ``y_g[n, c, o] = W_g[c] · u[g, n, o]``.

    For Linear the shared positions ``O`` are the dimensions between batch and features.
    """
    bias = getattr(layer, "bias", None)
    if isinstance(layer, nn.Linear):
        u = x.reshape(x.shape[0], -1, x.shape[-1])[None]
    else:
        params = {"weight": layer.weight.detach()}
        if bias is not None:
            params["bias"] = bias.detach()

        def f(w: Tensor) -> Tensor:
            return functional_call(layer, {**params, "weight": w}, (x,))

        jac = jacrev(f)(layer.weight.detach())  # [N, C_out, *O, *weight.shape]
        n, c_out = jac.shape[:2]
        jac = jac.reshape(n, c_out, -1, *layer.weight.shape)  # [N, C_out, O, *w]
        g = groups_of(layer)
        cols = []
        for group in range(g):
            if isinstance(layer, TRANSPOSE):
                c_in_g = layer.weight.shape[0] // g
                c_out_g = layer.weight.shape[1]
                c = group * c_out_g  # first output channel of the group
                block = jac[:, c, :, group * c_in_g : (group + 1) * c_in_g, 0]  # [N, O, Cin/G, *K]
            else:
                c = group * (c_out // g)
                block = jac[:, c, :, c]  # [N, O, C_in/G, *K]
            cols.append(block.reshape(n, block.shape[1], -1))
        u = torch.stack(cols)
    if bias is not None:
        u = torch.cat([u, u.new_ones(*u.shape[:-1], 1)], dim=-1)
    return u


def input_factor(layer: nn.Module, x: Tensor, approx: str) -> Tensor:
    """``[G, d_A, d_A]``: expand ``1/(N O) Σ u u^T``, reduce ``1/N Σ ū ū^T``."""
    u = unfolded_inputs(layer, x)  # [G, N, O, d]
    if approx == "reduce":
        u = u.mean(2, keepdim=True)
    n_rows = u.shape[1] * u.shape[2]
    flat = u.reshape(u.shape[0], -1, u.shape[-1])
    return flat.transpose(1, 2) @ flat / n_rows


def grad_factor(layer: nn.Module, g: Tensor, approx: str) -> Tensor:
    """``[G, d_G, d_G]`` unnormalised: expand ``Σ_{n,o} g g^T``, reduce ``Σ_n (Σ_o g)(Σ_o g)^T``."""
    n = g.shape[0]
    if isinstance(layer, nn.Linear):
        rows = g.reshape(n, -1, g.shape[-1])  # [N, O, C]
    else:
        rows = g.reshape(n, g.shape[1], -1).transpose(1, 2)  # [N, O, C]
    if approx == "reduce":
        rows = rows.sum(1, keepdim=True)
    grp = groups_of(layer)
    rows = rows.reshape(-1, grp, rows.shape[-1] // grp).transpose(0, 1)  # [G, N·O, C/G]
    return rows.transpose(1, 2) @ rows


def weight_matrices(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Arrange (gradient-)tensors as ``[G, d_G, d_A]`` (bias last column), test-side layout."""
    g = groups_of(layer)
    if isinstance(layer, nn.Linear):
        m = weight[None]
    elif isinstance(layer, TRANSPOSE):
        c_in, c_out_g = weight.shape[:2]
        m = torch.stack(
            [
                weight[grp * (c_in // g) : (grp + 1) * (c_in // g)]
                .transpose(0, 1)
                .reshape(c_out_g, -1)
                for grp in range(g)
            ]
        )
    else:
        m = weight.reshape(g, weight.shape[0] // g, -1)
    if bias is not None:
        m = torch.cat([m, bias.reshape(g, -1, 1)], dim=-1)
    return m


def damped_kronecker_solve(A: Tensor, G: Tensor, M: Tensor, damping: float) -> Tensor:
    """``(A ⊗ G + δ I)^{-1} vec(M)`` per group, dense (column-stacking vec)."""
    out = []
    for a, g, m in zip(A, G, M):
        K = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
        v = torch.linalg.solve(K, m.T.reshape(-1))
        out.append(v.reshape(a.shape[0], g.shape[0]).T)
    return torch.stack(out)


def kronecker_inverse_apply(A_inv: Tensor, G_inv: Tensor, M: Tensor) -> Tensor:
    """``(A_inv ⊗ G_inv) vec(M)`` per group via the dense Kronecker product."""
    out = []
    for a, g, m in zip(A_inv, G_inv, M):
        v = torch.kron(a, g) @ m.T.reshape(-1)
        out.append(v.reshape(a.shape[0], g.shape[0]).T)
    return torch.stack(out)
