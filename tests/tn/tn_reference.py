"""Slow, independent references for the TN engine tests (loops over taps, explicit Π).

Nothing here imports ``kfac_tn.tn``: index patterns are built with Python loops and
unfolding is done by slicing per kernel tap, so the references share no code with the engine.
"""

from __future__ import annotations

import itertools
import math
import string

import torch
import torch.nn.functional as F


def pattern(in_size: int, out_size: int, k: int, s: int, d: int, p_left: int) -> torch.Tensor:
    """Π[k, o, i] = 1 iff i = s·o + d·k - p_left and 0 <= i < in_size, by Python loops."""
    pi = torch.zeros(k, out_size, in_size, dtype=torch.float64)
    for kk in range(k):
        for o in range(out_size):
            i = s * o + d * kk - p_left
            if 0 <= i < in_size:
                pi[kk, o, i] = 1.0
    return pi


def pad_pairs(padding, kernel, dilation, n):
    """Resolve padding (int / tuple / pairs / 'same' / 'valid') into (left, right) pairs."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        return [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)
        ]
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def expand(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def unfold(x, kernel, stride=1, padding=0, dilation=1):
    """Reference unfold ``[N, C, *I] -> [N, C·ΠK, ΠO]`` by slicing the padded input per tap."""
    n = x.ndim - 2
    kernel, stride, dilation = expand(kernel, n), expand(stride, n), expand(dilation, n)
    pads = pad_pairs(padding, kernel, dilation, n)
    flat = [v for pr in reversed(pads) for v in pr]
    xp = F.pad(x, flat)
    outs = [
        (xp.shape[2 + j] - dilation[j] * (kernel[j] - 1) - 1) // stride[j] + 1 for j in range(n)
    ]
    cols = []
    for taps in itertools.product(*(range(k) for k in kernel)):
        sl = tuple(
            slice(dilation[j] * t, dilation[j] * t + stride[j] * (outs[j] - 1) + 1, stride[j])
            for j, t in enumerate(taps)
        )
        cols.append(xp[(slice(None), slice(None), *sl)])
    u = torch.stack(cols, 2)  # [N, C, ΠK, *O]
    return u.reshape(x.shape[0], x.shape[1] * math.prod(kernel), -1)


def unfold_transpose(x, kernel, stride=1, padding=0, output_padding=0, dilation=1):
    """Reference transpose-unfold ``[N, C, *O] -> [N, C·ΠK, ΠI]`` with loop-built Π's."""
    n = x.ndim - 2
    kernel, stride, dilation = expand(kernel, n), expand(stride, n), expand(dilation, n)
    padding, output_padding = expand(padding, n), expand(output_padding, n)
    out = x.reshape(x.shape[0], x.shape[1], *x.shape[2:])  # [N, C, *O]
    letters = string.ascii_letters
    ins = []
    for j in range(n):
        o = x.shape[2 + j]
        i = (o - 1) * stride[j] - 2 * padding[j] + dilation[j] * (kernel[j] - 1) + 1
        i += output_padding[j]
        ins.append(i)
    pis = [
        pattern(ins[j], x.shape[2 + j], kernel[j], stride[j], dilation[j], padding[j])
        for j in range(n)
    ]
    o_l, k_l, i_l = letters[:n], letters[n : 2 * n], letters[2 * n : 3 * n]
    eq = "yz" + o_l + "," + ",".join(k_l[j] + o_l[j] + i_l[j] for j in range(n))
    eq += "->yz" + k_l + i_l
    out = torch.einsum(eq, x, *pis)
    return out.reshape(x.shape[0], x.shape[1] * math.prod(kernel), -1)


def columns(x, case) -> torch.Tensor:
    """Unfolded columns ``[N, G, C/G·ΠK, L]`` of a (transposed) convolution case."""
    if case.transpose:
        u = unfold_transpose(
            x, case.kernel_size, case.stride, case.padding, case.output_padding, case.dilation
        )
    else:
        u = unfold(x, case.kernel_size, case.stride, case.padding, case.dilation)
    return u.reshape(x.shape[0], case.groups, -1, u.shape[-1])


def kfac_expand(x, case, bias=False):
    """(1/(N·L)) Σ_{n,l} u u^T per group, optional ones row appended."""
    u = columns(x, case)
    if bias:
        u = torch.cat([u, torch.ones_like(u[:, :, :1])], 2)
    return torch.einsum("ngdl,ngel->gde", u, u) / (u.shape[0] * u.shape[-1])


def kfac_reduce(x, case, bias=False):
    """(1/N) Σ_n ū ū^T per group, ū the mean over positions, optional ones entry appended."""
    u = columns(x, case).mean(-1)
    if bias:
        u = torch.cat([u, torch.ones_like(u[:, :, :1])], 2)
    return torch.einsum("ngd,nge->gde", u, u) / u.shape[0]


def kernel(case) -> tuple[int, ...]:
    """Kernel size of a case as a tuple."""
    nd = len(case.x_shape) - 2
    return expand(case.kernel_size, nd)


def conv(x, w, case):
    """Reference N-d convolution: loop-sliced unfold times the flattened kernel, per group."""
    n, g = x.shape[0], case.groups
    u = unfold(x, case.kernel_size, case.stride, case.padding, case.dilation)
    u = u.reshape(n, g, -1, u.shape[-1])
    wm = w.reshape(g, w.shape[0] // g, -1)
    nd = x.ndim - 2
    kern, stride, dilation = kernel(case), expand(case.stride, nd), expand(case.dilation, nd)
    pads = pad_pairs(case.padding, kern, dilation, nd)
    out = [
        (x.shape[2 + j] + sum(pads[j]) - dilation[j] * (kern[j] - 1) - 1) // stride[j] + 1
        for j in range(nd)
    ]
    return torch.einsum("gdk,ngko->ngdo", wm, u).reshape(n, w.shape[0], *out)


def torch_conv(x, w, case, bias=None):
    """``F.convNd`` (asymmetric padding applied explicitly), or :func:`conv` for N > 3."""
    nd = x.ndim - 2
    if nd > 3:
        y = conv(x, w, case)
        return y if bias is None else y + bias.view(1, -1, *([1] * nd))
    pads = pad_pairs(case.padding, kernel(case), expand(case.dilation, nd), nd)
    xp = F.pad(x, [v for pr in reversed(pads) for v in pr])
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(xp, w, bias, case.stride, 0, case.dilation, case.groups)


def torch_conv_transpose(x, w, case):
    """``F.conv_transposeNd``, or for N > 3 the loop-built transpose-unfold times the weight.

    Returns ``[N, C_out, *I]``.
    """
    nd = x.ndim - 2
    if nd <= 3:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return fn(
            x, w, None, case.stride, case.padding, case.output_padding, case.groups, case.dilation
        )
    n, g = x.shape[0], case.groups
    u = unfold_transpose(
        x, case.kernel_size, case.stride, case.padding, case.output_padding, case.dilation
    )
    u = u.reshape(n, g, -1, u.shape[-1])  # [N, G, Ci·ΠK, ΠI]
    wm = w.reshape(g, x.shape[1] // g, w.shape[1], -1).transpose(1, 2).reshape(g, w.shape[1], -1)
    y = torch.einsum("gdk,ngki->ngdi", wm, u)
    kern, stride, dilation = kernel(case), expand(case.stride, nd), expand(case.dilation, nd)
    padding, out_pad = expand(case.padding, nd), expand(case.output_padding, nd)
    size = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1 + op
        for o, s, p, d, k, op in zip(x.shape[2:], stride, padding, dilation, kern, out_pad)
    ]
    return y.reshape(n, g * w.shape[1], *size)
