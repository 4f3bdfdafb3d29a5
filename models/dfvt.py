"""DFvT: Doubly-Fused ViT (Gao et al., "Doubly-Fused ViT: Fuse Information from Vision Transformer Doubly with Local
Representation", ECCV 2022).

A four-stage hierarchy in which every stage runs a convolutional branch (local detail and down-sampling) beside a
window-attention branch. The two are fused at the stage input by addition and inside every transformer block by the
learned DANE gate. The classes below follow the forward pass: stem, convolutional branch, window attention, DANE
gate, block, stage, DFvT. Module and parameter names equal the ``state_dict`` keys of the released checkpoints.

Each layer is written once, the way the paper describes it. Two layers also have a faster computation of the same
function from the same parameters (:mod:`models.fast_ops`), picked in their ``forward`` by ``fast_path`` (a build
argument, on by default): :class:`ConvStack` (channels-last convolutions, folded eval BatchNorm, in-place SiLU) and
:class:`WindowAttention` (windows and heads gathered in one copy, ``scaled_dot_product_attention`` with one additive
mask). ``fast_path=False`` runs the plain computation everywhere; the tests check both against each other.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_ops

SHIFT_MASK_VALUE = -100.0  # logit added between positions a cyclic shift brought into one window


# ----------------------------------------------------------------------------------------------- layouts


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``B × (H·W) × C`` tokens (row-major) to a ``B × C × H × W`` map (a view: channels-last strides)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``B × C × H × W`` map to ``B × (H·W) × C`` tokens (row-major; a view of a channels-last map)."""
    return x.flatten(2).transpose(1, 2)


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """Stack the four 2×2 sub-grids of a ``B × C × H × W`` map on the channel axis, giving ``B × 4C × H/2 × W/2``.

    Order: (even rows, even cols), (odd rows, even cols), (even rows, odd cols), (odd rows, odd cols); pixel
    ``(2i + dy, 2j + dx)`` of channel ``k`` goes to channel ``(2·dx + dy)·C + k`` at ``(i, j)``. Computed as one
    gather into a channels-last result (5-9 % of a CPU train step faster than concatenating four slices).
    """
    b, c, h, w = x.shape
    grid = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)  # b, i, dy, j, dx, k
    return grid.permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)


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


# ----------------------------------------------------------------------------------------------- convolutions


class ConvStack(nn.Sequential):
    """Convolutions, BatchNorms and SiLUs applied in order.

    Args:
        layers: the modules, in order (an ``OrderedDict`` names them).
        fast_path: run them through :func:`models.fast_ops.conv_stack` (same function, faster).
    """

    def __init__(self, *layers: nn.Module | OrderedDict, fast_path: bool = True) -> None:
        super().__init__(*layers)
        self.fast_path = fast_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path:
            return fast_ops.conv_stack(x, self)
        return super().forward(x)


def conv_bn_act(channels: int, stride: int = 1, depthwise: bool = False) -> list[nn.Module]:
    """A bias-free 1×1 (or depthwise 3×3) convolution, BatchNorm and SiLU."""
    if depthwise:
        conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
    else:
        conv = nn.Conv2d(channels, channels, 1, bias=False)
    return [conv, nn.BatchNorm2d(channels), nn.SiLU()]


class PatchEmbed(ConvStack):
    """Stem: two stride-2 3×3 convolutions (with bias), each followed by BatchNorm and SiLU; 4× down-sampling.

    Args:
        img_size: side of the square input image.
        in_chans: input channels.
        embed_dim: output channels ``E`` (the first convolution gives ``E/2``).
        patch_norm: apply the BatchNorms (on in DFvT).
        fast_path: see :class:`ConvStack`.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 96,
        patch_norm: bool = True,
        fast_path: bool = True,
    ) -> None:
        half = embed_dim // 2
        layers = OrderedDict(
            proj1=nn.Conv2d(in_chans, half, 3, stride=2, padding=1),
            norm1=nn.BatchNorm2d(half) if patch_norm else nn.Identity(),
            act1=nn.SiLU(),
            proj2=nn.Conv2d(half, embed_dim, 3, stride=2, padding=1),
            norm=nn.BatchNorm2d(embed_dim) if patch_norm else nn.Identity(),
            act2=nn.SiLU(),
        )
        super().__init__(layers, fast_path=fast_path)
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.resolution = img_size // 4

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
        return super().forward(x)

    def flops(self) -> float:
        p, e = self.resolution, self.embed_dim
        return (
            (p / 2) * (p / 2) * (e / 2) * 3 * 9
            + (p / 4) * (p / 4) * e * (e / 2) * 9
            + (p / 4) * (p / 4) * e
            + (p / 2) * (p / 2) * (e / 2)
        )


class ConvBranch(nn.Module):
    """The convolutional branch of one stage: the local map (input resolution) and, as tokens, its strided
    projection.

    Args:
        dim: channels.
        resolution: side of the input map (for the FLOP count).
        stride: 2 to halve the resolution, 1 to keep it.
        fast_path: see :class:`ConvStack`.
    """

    def __init__(self, dim: int, resolution: int, stride: int, fast_path: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.stride = stride
        self.conv1x1_1 = ConvStack(
            *conv_bn_act(dim), *conv_bn_act(dim, depthwise=True), *conv_bn_act(dim, depthwise=True), fast_path=fast_path
        )
        self.conv1 = ConvStack(*conv_bn_act(dim, stride=stride, depthwise=True), fast_path=fast_path)
        self.conv1x1_2 = ConvStack(*conv_bn_act(dim), fast_path=fast_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def multiresolution_conv(dim: int, fast_path: bool = True) -> ConvStack:
    """Projection of the space-to-depth map (``4C``) back to ``C``: depthwise 3×3, BN, 1×1, BN (no activation)."""
    return ConvStack(
        nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4 * dim, bias=False),
        nn.BatchNorm2d(4 * dim),
        nn.Conv2d(4 * dim, dim, 1, bias=False),
        nn.BatchNorm2d(dim),
        fast_path=fast_path,
    )


# ----------------------------------------------------------------------------------------------- transformer


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of a token grid, with relative position bias.

    Args:
        dim: channels.
        window_size: side of the square window.
        num_heads: attention heads (``dim`` must be divisible by it).
        qkv_bias: learn a bias for the query/key/value projection.
        qk_scale: override of the default scale ``head_dim ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        fast_path: attend through :func:`models.fast_ops.window_attention` (same function, faster).
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
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.fast_path = fast_path
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
        """``x``: ``B × r × r × C`` token grid; ``mask``: ``nW × N × N`` additive mask or ``None``. Returns the grid."""
        b, r, _, c = x.shape
        w, heads = self.window_size, self.num_heads
        qkv = self.qkv(x)  # token-wise, so it commutes with the window partition
        bias = self.relative_position_bias()
        if self.fast_path:
            drop = self.attn_drop.p if self.training else 0.0
            x = fast_ops.window_attention(qkv, bias, mask, w, heads, self.scale, drop)
        else:
            windows = window_partition(qkv, w)
            bw, n, _ = windows.shape
            q, k, v = windows.reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            if mask is not None:
                nw = mask.shape[0]
                attn = (attn.view(bw // nw, nw, heads, n, n) + mask[None, :, None]).view(bw, heads, n, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = window_reverse((attn @ v).transpose(1, 2).reshape(bw, n, c), w, r, r)
        return self.proj_drop(self.proj(x))


class DANEGate(nn.Module):
    """DANE fusion: a spatial logit from the conv partner ``c`` and a channel logit from the tokens ``x`` decide, per
    token and channel, how much of the partner replaces the token: ``m = σ(spatial + channel)``,
    ``out = c·m + x·(1 - m)``.

    Args:
        dim: channels of both inputs.
        reduction: bottleneck ratio of the channel branch.
    """

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = dim // reduction
        self.fc_spatial = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1, bias=False))
        self.fc_channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(self.fc_spatial(c) + self.fc_channel(x.mean(dim=1, keepdim=True)))
        return c * m + x * (1 - m)


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


class DFvTBlock(nn.Module):
    """Transformer block: (shifted) window attention, DANE fusion with the conv partner, MLP.

    Args:
        dim: channels.
        resolution: side of the square token grid.
        num_heads: attention heads.
        window_size: requested window (shrunk to ``resolution`` when larger or equal).
        shift_size: cyclic shift of the windows (0 for none; forced to 0 with one window).
        mlp_ratio: hidden/input channels of the MLP.
        qkv_bias, qk_scale, fast_path: see :class:`WindowAttention`.
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
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        if resolution <= window_size:
            window_size, shift_size = resolution, 0
        self.resolution = resolution
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if shift_size > 0:
            self.register_buffer("attn_mask", get_shift_attention_mask(resolution, window_size, shift_size))
        else:
            self.attn_mask = None
        self.select = DANEGate(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, fast_path)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted) window attention over ``B × L × C`` tokens."""
        b, length, c = x.shape
        r, s = self.resolution, self.shift_size
        x = x.view(b, r, r, c)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(x, self.attn_mask)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x.reshape(b, length, c)

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


class ChannelDoubling(nn.Module):
    """Between stages: LayerNorm then a bias-free Linear ``C → 2C``, token-wise (the upstream ``downsample``).

    Unlike a Swin patch merge it keeps the resolution; the next stage's pooling and strided convolution
    down-sample in space. (The upstream names, kept in the ``state_dict``, call it a down-sample and its linear
    layer a ``reduction``.)

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
        num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, fast_path: see :class:`DFvTBlock`.
        drop_path: one rate per block.
        downsample: end with a :class:`ChannelDoubling`.
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
        fast_path: bool = True,
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
                fast_path=fast_path,
            )
            for j in range(depth)
        )
        self.downsample = ChannelDoubling(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # The fusion partner is an input of every block, so it must pass through the checkpoint too
                # (the upstream call dropped it).
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.downsample(x) if self.downsample is not None else x

    def flops(self) -> float:
        total = sum(block.flops() for block in self.blocks)
        return total + (self.downsample.flops() if self.downsample is not None else 0.0)


# ----------------------------------------------------------------------------------------------- the network


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
        fast_path: the faster computation of :class:`ConvStack` and :class:`WindowAttention` (same function and
            parameters).
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
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.ape = ape

        self.patch_embed = PatchEmbed(img_size, in_chans, embed_dim, patch_norm, fast_path)
        stem_res = self.patch_embed.resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, stem_res * stem_res, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # Stage i takes R_i × R_i maps; all but the last halve the resolution.
        self.stage_resolutions = [stem_res // 2**i for i in range(self.num_layers)]
        last = self.num_layers - 1
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            DFvTStage(
                embed_dim * 2**i,
                self.stage_resolutions[i] // 2 if i < last else self.stage_resolutions[i],
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
                fast_path=fast_path,
            )
            for i in range(self.num_layers)
        )
        # Registered after the transformer stages, as upstream: the state_dict order and the initialisation's
        # random draws follow it.
        self.convlayers = nn.ModuleList(
            ConvBranch(embed_dim * 2**i, self.stage_resolutions[i], 2 if i < last else 1, fast_path)
            for i in range(self.num_layers)
        )
        self.multiresolution_conv = nn.ModuleList(
            multiresolution_conv(embed_dim * 2**i, fast_path) for i in range(last)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

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
                c = map_to_tokens(self.multiresolution_conv[i](space_to_depth(local)))
                x = stage(p + t, c)
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
