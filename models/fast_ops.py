"""Faster computations of two DFvT layers: the same function from the same parameters, used when the layer's
``fast_path`` is on (see :mod:`models.dfvt`). Nothing derived from a parameter is cached: every call reads the
live parameters, so optimizer steps and ``load_state_dict`` apply at once.

What each piece is worth, measured on a 2-core CPU with torch 2.14.1 (fp32, eval batch 32, train step batch 16;
the fast path with that piece turned off, in one process, alternating repetitions):

- channels-last maps from the stem on (so tokens and maps are views of one another): eval 1.20-1.38x,
  train step 1.10-1.20x;
- eval-mode BatchNorm folded into the preceding convolution, on the CPU: eval 1.11-1.26x (on a GPU the fold's
  small kernels cost more launches than the BatchNorm they replace, so it is CPU-only);
- SiLU in place where autograd does not need its input: eval 1.06-1.15x;
- windows and heads of q, k, v gathered in one copy, relative position bias and shift mask as one additive mask
  in ``scaled_dot_product_attention``.

Dropped after measuring (each within 4 % of a step, or slower): pointwise convolutions of channels-last maps as
one matrix product (now 6-14 % slower than PyTorch's kernel), an own BatchNorm backward for few channels
(within 2 %), plain matmul attention on the CPU when the mask needs a gradient (within 4 %), and the DANE blend as
one ``lerp`` (within 3 %).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def folded_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution with BatchNorm folded into its weight and bias."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _foldable(x: torch.Tensor, conv: nn.Module, bn: nn.Module | None) -> bool:
    return (
        x.device.type == "cpu"
        and isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.affine
        and bn.running_var is not None
    )


def conv_stack(x: torch.Tensor, modules: Iterable[nn.Module]) -> torch.Tensor:
    """Apply ``modules`` (convolutions, BatchNorms, SiLUs, ...) in order to ``x`` in channels-last layout.

    On the CPU an eval-mode BatchNorm right after a convolution is folded into it (:func:`folded_conv_bn`); a SiLU
    runs in place when its input is an intermediate of the stack (never the caller's tensor) that autograd does not
    need.
    """
    layers = list(modules)
    x = source = x.contiguous(memory_format=torch.channels_last)
    i = 0
    while i < len(layers):
        layer, following = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if _foldable(x, layer, following):
            x = folded_conv_bn(x, layer, following)
            i += 2
            continue
        if isinstance(layer, nn.SiLU) and x is not source:
            x = F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))
        else:
            x = layer(x)
        i += 1
    return x


def window_attention(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    heads: int,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention inside the windows of a grid, from its query/key/value projection.

    ``qkv``: ``B × r × r × 3C``; ``bias``: ``heads × N × N`` relative position bias (``N = window²``); ``mask``:
    ``nW × N × N`` shift mask or None. Returns the heads merged back on the grid, ``B × r × r × C`` (before the
    output projection). Equal to partitioning into windows, attending in each and reversing the partition.
    """
    b, r, _, c3 = qkv.shape
    c = c3 // 3
    n, d, nw = window * window, c // heads, r // window
    qkv = qkv.view(b, nw, window, nw, window, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    if mask is None:  # one bias for every window: windows join the batch
        q, k, v = qkv.reshape(3, b * nw * nw, heads, n, d).unbind(0)
        attn_mask = bias.unsqueeze(0)
    else:  # one mask per window: windows join the heads, so the mask broadcasts over the batch only
        q, k, v = qkv.reshape(3, b, nw * nw * heads, n, d).unbind(0)
        attn_mask = (mask.unsqueeze(1) + bias).reshape(1, -1, n, n)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p, scale=scale)
    return x.view(b, nw, nw, heads, window, window, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, r, r, c)
