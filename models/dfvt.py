"""DFvT: Doubly-Fused ViT (Gao et al., "Doubly-Fused ViT: Fuse Information from Vision
Transformer Doubly with Local Representation", ECCV 2022).

A four-stage hierarchy in which every stage runs a convolutional branch (local detail and
down-sampling) beside a window-attention branch. The two are fused at the stage input by
addition and inside every transformer block by the learned DANE gate.

Module and parameter names equal the ``state_dict`` keys of the released checkpoints.

Two execution paths compute the same function from the same parameters, chosen by ``fast_path``
(``DFvT.set_fast_path``): the straightforward one, written like the upstream code, and the
default fast one, which
- keeps the convolutional branch channels-last from the stem on, so token and map form are views
  of one another and the convolutions, max-pool and BatchNorms run in their fast layout;
- gathers space-to-depth in one copy, and windows and heads of q, k, v in one copy;
- adds relative position bias and shift mask as one additive mask, in ``scaled_dot_product_attention``
  (or, on CPU when the mask needs a gradient, in plain matmuls: SDPA's math kernel is slower there);
- on CPU, runs pointwise convolutions of channels-last maps as one matrix product, folds eval-mode
  BatchNorm into the preceding convolution from the current parameters on every call (nothing is
  cached), differentiates training-mode BatchNorm with its own backward where PyTorch's
  channels-last kernel is slow (DFvT-T's 24 stem channels), and applies SiLU in place where
  autograd does not need it;
- blends the DANE gate with one ``lerp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

SHIFT_MASK_VALUE = -100.0


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``B × (H·W) × C`` tokens (row-major) to a ``B × C × H × W`` map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``B × C × H × W`` map to ``B × (H·W) × C`` tokens (row-major)."""
    return x.flatten(2).transpose(1, 2)


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """Stack the four 2×2 sub-grids of a ``B × C × H × W`` map on the channel axis.

    Order: (even rows, even cols), (odd rows, even cols), (even rows, odd cols),
    (odd rows, odd cols), giving ``B × 4C × H/2 × W/2``.
    """
    return torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=1)


def space_to_depth_channels_last(x: torch.Tensor) -> torch.Tensor:
    """:func:`space_to_depth` in one gather; a channels-last input gives a channels-last output."""
    b, c, h, w = x.shape
    grid = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)
    # Channel index (col parity, row parity, c) reproduces the sub-grid order of space_to_depth.
    return grid.permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)


def conv2d(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` and ``bias``; a pointwise one of a channels-last map is one
    matrix product over the pixels (on CPU faster than the convolution kernel, above all in the backward pass)."""
    pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
    if pointwise and x.is_contiguous(memory_format=torch.channels_last):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of a channels-last map, with a backward pass that reduces over wide rows.

    PyTorch's CPU backward kernel for channels-last maps vectorises over the channels and is slow for a count like
    DFvT-T's 24 stem channels (about 3x its NCHW time). Here the ``pixels × C`` matrix is read as rows of ``k·C``
    values (``k`` pixels), so every pass runs over long contiguous rows. The forward is PyTorch's own kernel,
    running statistics included.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        b, c, h, w = x.shape
        pixels, k = b * h * w, 1
        while 2 * k * c <= 256 and pixels % (2 * k) == 0:
            k *= 2
        grad = grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, k * c)
        centred = x.permute(0, 2, 3, 1).reshape(-1, k * c) - mean.repeat(k)
        grad_bias = grad.sum(0).view(k, c).sum(0)
        grad_weight = (grad * centred).sum(0).view(k, c).sum(0) * invstd  # sum of grad × normalised x
        # d/dx = weight·invstd·(grad − mean(grad) − x̂·mean(grad·x̂)), with x̂ = centred·invstd
        scale = weight * invstd
        grad_x = torch.addcmul((-scale * grad_bias / pixels).repeat(k), grad, scale.repeat(k))
        grad_x.addcmul_(centred, (-scale * invstd * grad_weight / pixels).repeat(k))
        return grad_x.view(b, h, w, c).permute(0, 3, 1, 2), grad_weight, grad_bias, None, None, None, None


def batch_norm(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """``bn(x)``; in training, through :class:`ChannelsLastBatchNorm` where PyTorch's CPU kernel is slow.

    That is a channels-last map on CPU with fewer than 32 channels, not a multiple of 16 (measured, forward and
    backward in isolation: 12 ms instead of 22 for DFvT-T's 24-channel stem at batch 16; with 16, 32 or 40
    channels PyTorch's kernel is the faster one).
    """
    c = x.shape[1]
    if (
        not isinstance(bn, nn.BatchNorm2d)
        or not (bn.training and bn.track_running_stats and bn.affine and bn.momentum is not None)
        or x.device.type != "cpu"
        or x.dtype != bn.weight.dtype
        or c >= 32
        or c % 16 == 0
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return bn(x)
    bn.num_batches_tracked.add_(1)
    return ChannelsLastBatchNorm.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` with :func:`conv2d` and :func:`batch_norm`; on CPU an eval-mode BatchNorm is folded into the
    convolution's weights at run time.

    The fold saves a pass over the activation on CPU; on a GPU its five small kernels per call cost more
    launches than the one BatchNorm kernel they replace.
    """
    if x.device.type != "cpu" or not isinstance(bn, nn.BatchNorm2d):
        return bn(conv(x))
    if bn.training or bn.running_var is None:
        return batch_norm(conv2d(x, conv, conv.weight, conv.bias), bn)
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv2d(x, conv, conv.weight * scale.view(-1, 1, 1, 1), bias)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd does not need ``x`` (``x`` must be a fresh intermediate)."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def run_conv_stack(x: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    """Apply ``layers`` (convolutions, BatchNorms, SiLUs) with :func:`conv_bn` and :func:`silu`."""
    modules = list(layers)
    i = 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d):
            x = conv_bn(x, module, modules[i + 1])
            i += 2
            continue
        x = silu(x) if isinstance(module, nn.SiLU) else module(x)
        i += 1
    return x


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``B × H × W × C`` to ``(B·nW) × window² × C``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW) × window² × C`` to ``B × H × W × C``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def get_relative_position_index(window: int) -> torch.Tensor:
    """Index into the ``(2w-1)²`` bias table for every pair of tokens in a window (``w² × w²``, int64)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def get_shift_attention_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (``nW × w² × w²``) hiding pairs that a cyclic shift brought into one window."""
    cuts = (0, resolution - window, resolution - shift, resolution)
    labels = torch.zeros(resolution, resolution)
    region = 0
    for r0, r1 in zip(cuts[:-1], cuts[1:], strict=True):
        for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
            labels[r0:r1, c0:c1] = region
            region += 1
    windows = window_partition(labels[None, :, :, None], window).squeeze(-1)
    differs = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(differs.shape).masked_fill(differs, SHIFT_MASK_VALUE)


class Mlp(nn.Module):
    """Token-wise two-layer perceptron with exact GELU.

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        drop: dropout after each linear layer.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with relative position bias.

    Args:
        dim: channels.
        window_size: side of the square window.
        num_heads: attention heads (``dim`` must be divisible by it).
        qkv_bias: learn a bias for the query/key/value projection.
        qk_scale: override of the default scale ``head_dim ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias for one window, ``heads × w² × w²``."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B·nW) × N × C`` windows; ``mask``: ``nW × N × N`` additive mask or ``None``."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))

    def forward_grid(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fast equivalent of partition, :meth:`forward` and reverse on a ``B × r × r × C`` grid.

        The projections run on the grid, windows and heads are gathered in one copy, and the relative
        position bias plus the shift ``mask`` (``nW × N × N``) form one additive mask, rebuilt from the
        parameter on every call.
        """
        b, r, _, c = x.shape
        w, heads = self.window_size, self.num_heads
        n, d, nw = w * w, c // heads, r // w
        qkv = self.qkv(x).view(b, nw, w, nw, w, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        bias = self.relative_position_bias()
        if mask is None:  # one bias for every window: windows join the batch
            q, k, v = qkv.reshape(3, b * nw * nw, heads, n, d).unbind(0)
            bias = bias.unsqueeze(0)
        else:  # one mask per window: windows join the heads, so the mask broadcasts over the batch only
            q, k, v = qkv.reshape(3, b, nw * nw * heads, n, d).unbind(0)
            bias = (mask.unsqueeze(1) + bias).reshape(1, -1, n, n)
        if bias.requires_grad and x.device.type == "cpu":
            # SDPA differentiates a mask only in its math kernel, which is slower on CPU than these four ops.
            x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)) @ v
        else:
            drop = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=self.scale)
        x = x.view(b, nw, nw, heads, w, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, r, r, c)
        return self.proj_drop(self.proj(x))


class DANEGate(nn.Module):
    """DANE fusion: a spatial logit from the conv partner and a channel logit from the tokens
    decide, per token and channel, how much of the partner replaces the token.

    Args:
        dim: channels of both inputs.
        reduction: bottleneck ratio of the channel branch.
    """

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.fast_path = True  # blend with one lerp (see DFvT.set_fast_path)
        hidden = dim // reduction
        self.fc_spatial = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1, bias=False))
        self.fc_channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        logit = self.fc_spatial(c) + self.fc_channel(x.mean(dim=1, keepdim=True))
        if self.fast_path:
            # x + m (c - x) in one kernel; lerp does not promote dtypes (autocast mixes them), so align them.
            dtype = torch.promote_types(torch.promote_types(x.dtype, c.dtype), logit.dtype)
            return torch.lerp(x.to(dtype), c.to(dtype), logit.sigmoid_().to(dtype))
        gate = torch.sigmoid(logit)
        return c * gate + x * (1 - gate)


class DFvTBlock(nn.Module):
    """Transformer block: window attention, DANE fusion with the conv partner, MLP.

    Args:
        dim: channels.
        resolution: side of the square token grid.
        num_heads: attention heads.
        window_size: requested window (shrunk to ``resolution`` when larger or equal).
        shift_size: cyclic shift of the windows (0 for none; forced to 0 with one window).
        mlp_ratio: hidden/input channels of the MLP.
        qkv_bias, qk_scale: see :class:`WindowAttention`.
        drop, attn_drop: dropout rates.
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution <= window_size:
            window_size, shift_size = resolution, 0
        self.resolution = resolution
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        self.fast_path = True  # attention through WindowAttention.forward_grid (see DFvT.set_fast_path)
        if shift_size > 0:
            self.register_buffer("attn_mask", get_shift_attention_mask(resolution, window_size, shift_size))
        else:
            self.attn_mask = None
        self.select = DANEGate(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted) window attention over ``B × L × C`` tokens."""
        b, _, c = x.shape
        r, w, s = self.resolution, self.window_size, self.shift_size
        x = x.view(b, r, r, c)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        if self.fast_path:
            x = self.attn.forward_grid(x, self.attn_mask)
        else:
            x = window_reverse(self.attn(window_partition(x, w), self.attn_mask), w, r, r)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x.reshape(b, r * r, c)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attend(self.norm1(x)))
        x = self.select(x, c)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def flops(self) -> float:
        """Analytic count of the paper's convention (see docs)."""
        c, r, n = self.attn.dim, self.resolution, self.window_size**2
        num_windows = r * r / n
        return (
            c * r * r
            + num_windows * (n * c * 3 * c + 2 * n * n * c + n * c * c)
            + c * r * r
            + c * (c // 16) * 2 * r * r
            + 2 * r * r * c * c * self.mlp_ratio
            + c * r * r
        )


class TokenReduction(nn.Module):
    """Channel doubling between stages: LayerNorm then a bias-free Linear ``C → 2C``, token-wise.

    Unlike a Swin patch merge it keeps the resolution; the next stage's pooling and strided
    convolution down-sample in space.

    Args:
        dim: input channels.
        resolution: side of the token grid (for the FLOP count).
    """

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.reduction = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))

    def flops(self) -> float:
        r2 = self.resolution**2
        return r2 * self.dim + r2 * self.dim * 2 * self.dim


class DFvTStage(nn.Module):
    """The transformer branch of one stage: blocks sharing one fusion partner, then a channel doubling.

    Args:
        dim: channels.
        resolution: side of the token grid.
        depth: number of blocks.
        num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop: see :class:`DFvTBlock`.
        drop_path: one rate per block.
        downsample: end with a :class:`TokenReduction`.
        use_checkpoint: recompute the blocks in the backward pass to save memory.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: list[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            DFvTBlock(
                dim,
                resolution,
                num_heads,
                window_size=window_size,
                shift_size=0 if j % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[j],
            )
            for j in range(depth)
        )
        self.downsample = TokenReduction(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # The fusion partner is an input of every block, so it must be passed through
                # the checkpoint too (the upstream call dropped it).
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.downsample(x) if self.downsample is not None else x

    def flops(self) -> float:
        total = sum(block.flops() for block in self.blocks)
        return total + (self.downsample.flops() if self.downsample is not None else 0.0)


def conv_bn_act(channels: int, stride: int = 1, depthwise: bool = False, out_channels: int | None = None) -> list:
    """A bias-free 1×1 (or depthwise 3×3) convolution, BatchNorm and SiLU, as a flat list of modules."""
    out_channels = out_channels or channels
    if depthwise:
        conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
    else:
        conv = nn.Conv2d(channels, out_channels, 1, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.SiLU()]


class ConvBranch(nn.Module):
    """The convolutional branch of one stage.

    Returns the local map (input resolution) and, as tokens, its strided projection.

    Args:
        dim: channels.
        resolution: side of the input map (for the FLOP count).
        stride: 2 to halve the resolution, 1 to keep it.
    """

    def __init__(self, dim: int, resolution: int, stride: int) -> None:
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.stride = stride
        self.fast_path = True  # conv_bn and in-place SiLU (see DFvT.set_fast_path)
        self.conv1x1_1 = nn.Sequential(
            *conv_bn_act(dim), *conv_bn_act(dim, depthwise=True), *conv_bn_act(dim, depthwise=True)
        )
        self.conv1 = nn.Sequential(*conv_bn_act(dim, stride=stride, depthwise=True))
        self.conv1x1_2 = nn.Sequential(*conv_bn_act(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fast_path:
            local = run_conv_stack(x, self.conv1x1_1)
            return local, map_to_tokens(run_conv_stack(run_conv_stack(local, self.conv1), self.conv1x1_2))
        local = self.conv1x1_1(x)
        return local, map_to_tokens(self.conv1x1_2(self.conv1(local)))

    def flops(self) -> float:
        h = w = self.resolution
        c = self.dim
        h2 = w2 = h / 2 if self.stride == 2 else h
        total = h * w * c * c + h * w * c
        total += 2 * h * w * c * 9 + 2 * h * w * c
        total += h2 * w2 * c * 9 + h2 * w2 * c
        total += h2 * w2 * c * c + h2 * w2 * c
        if self.stride == 2:
            total += h2 * w2 * 4 * c * 9 + h2 * w2 * 4 * c * c + 5 * h2 * w2 * c
        return total


def multiresolution_conv(dim: int) -> nn.Sequential:
    """Projection of the space-to-depth map (``4C``) back to ``C``: depthwise 3×3, BN, 1×1, BN."""
    return nn.Sequential(
        nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4 * dim, bias=False),
        nn.BatchNorm2d(4 * dim),
        nn.Conv2d(4 * dim, dim, 1, bias=False),
        nn.BatchNorm2d(dim),
    )


class PatchEmbed(nn.Module):
    """Convolutional stem: two stride-2 3×3 convolutions, each with BatchNorm and SiLU (4× down-sampling).

    Args:
        img_size: side of the square input image.
        in_chans: input channels.
        embed_dim: output channels ``E``.
        patch_norm: apply the BatchNorms (on in DFvT).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True) -> None:
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.resolution = img_size // 4
        self.fast_path = True  # channels-last output, conv_bn and in-place SiLU (see DFvT.set_fast_path)
        self.proj1 = nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1)
        self.proj2 = nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(embed_dim) if patch_norm else nn.Identity()
        self.norm1 = nn.BatchNorm2d(embed_dim // 2) if patch_norm else nn.Identity()
        self.act = nn.SiLU()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expected shape when ``x`` is not ``B × in_chans × img × img``."""
        expected = f"B x {self.in_chans} x {self.img_size} x {self.img_size}"
        if x.ndim != 4:
            raise ValueError(f"DFvT expects a 4-D image batch of shape {expected}, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"DFvT expects {self.in_chans} input channels ({expected}), got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); convert the images or set MODEL.DFVT.IN_CHANS."
            )
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"DFvT was built for {self.img_size}x{self.img_size} images ({expected}), got "
                f"{x.shape[2]}x{x.shape[3]}; resize the input or build the model with DATA.IMG_SIZE {x.shape[2]}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.fast_path:
            x = silu(conv_bn(x.contiguous(memory_format=torch.channels_last), self.proj1, self.norm1))
            return silu(conv_bn(x, self.proj2, self.norm))
        x = self.act(self.norm1(self.proj1(x)))
        return self.act(self.norm(self.proj2(x)))

    def flops(self) -> float:
        p, e = self.resolution, self.embed_dim
        return (
            (p / 2) * (p / 2) * (e / 2) * 3 * 9
            + (p / 4) * (p / 4) * e * (e / 2) * 9
            + (p / 4) * (p / 4) * e
            + (p / 2) * (p / 2) * (e / 2)
        )


class DFvT(nn.Module):
    """Doubly-Fused ViT.

    Args:
        img_size: side of the square input (224 for the released models).
        patch_size: stem down-sampling (4).
        in_chans: input channels.
        num_classes: classes of the head; 0 gives pooled features.
        embed_dim: channels ``E`` of the first stage.
        depths: transformer blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side.
        mlp_ratio: MLP hidden/input channels.
        qkv_bias: learn a query/key/value bias.
        qk_scale: override of ``head_dim ** -0.5``.
        drop_rate, attn_drop_rate: dropout rates.
        drop_path_rate: stochastic depth, rising linearly over the blocks up to this value.
        ape: add a learned absolute position embedding after the stem.
        patch_norm: BatchNorm in the stem.
        use_checkpoint: gradient checkpointing of the transformer blocks.
        fast_path: run the fast path (same function and parameters; see :meth:`set_fast_path`).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (1, 1, 2, 1),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.fast_path = fast_path
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.ape = ape

        self.patch_embed = PatchEmbed(img_size, in_chans, embed_dim, patch_norm)
        stem_res = self.patch_embed.resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, stem_res * stem_res, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # Stage i takes R_i × R_i maps; all but the last halve the resolution.
        self.stage_resolutions = [stem_res // 2**i for i in range(self.num_layers)]
        last = self.num_layers - 1
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            dim = embed_dim * 2**i
            r = self.stage_resolutions[i] // 2 if i < last else self.stage_resolutions[i]
            self.layers.append(
                DFvTStage(
                    dim,
                    r,
                    depths[i],
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    drop_rate,
                    attn_drop_rate,
                    dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < last,
                    use_checkpoint=use_checkpoint,
                )
            )
        self.convlayers = nn.ModuleList(
            ConvBranch(embed_dim * 2**i, self.stage_resolutions[i], stride=2 if i < last else 1)
            for i in range(self.num_layers)
        )
        self.multiresolution_conv = nn.ModuleList(multiresolution_conv(embed_dim * 2**i) for i in range(last))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_fast_path(fast_path)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.use_checkpoint = enable

    @torch.jit.ignore
    def set_fast_path(self, enable: bool = True) -> None:
        """Run the fast path (default) or the straightforward, upstream-like one (see the module docstring).

        Both compute the same function from the same parameters and buffers; the state_dict is unchanged.
        """
        for module in self.modules():
            if hasattr(module, "fast_path"):
                module.fast_path = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one for ``num_classes`` (0: identity)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``B × 3 × H × W`` to the normalised final tokens ``B × L × num_features``."""
        x = map_to_tokens(self.patch_embed(x))
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        last = self.num_layers - 1
        for i, (conv, stage) in enumerate(zip(self.convlayers, self.layers, strict=True)):
            res = self.stage_resolutions[i]
            x_map = tokens_to_map(x, res, res)
            local, t = conv(x_map)
            if i < last:
                p = map_to_tokens(F.max_pool2d(x_map, 3, stride=2, padding=1))
                if self.fast_path:
                    c = run_conv_stack(space_to_depth_channels_last(local), self.multiresolution_conv[i])
                else:
                    c = self.multiresolution_conv[i](space_to_depth(local))
                x = stage(p + t, map_to_tokens(c))
            else:
                x = stage(x + t, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final tokens to logits (or to pooled features when ``pre_logits``)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops(self) -> float:
        """The paper's analytic FLOP count (multiply-accumulates, hand-counted) at the built image size."""
        total = self.patch_embed.flops()
        total += sum(stage.flops() for stage in self.layers)
        total += sum(conv.flops() for conv in self.convlayers)
        p = self.patch_embed.resolution
        total += self.num_features * (p * p // 2**self.num_layers) + self.num_features * self.num_classes
        return total
