"""The released DFvT variants and the paper's figures for them, in one place: the timm registry, torch.hub and the
wrong-variant hints read this table, and the tests check the README and the reference fixtures against it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from config import CONFIGS_DIR, load_config


@dataclass(frozen=True)
class Variant:
    """One released variant: its names, its config and the paper's figures (ImageNet-1K, 224x224)."""

    name: str  # timm / torch.hub entry point
    title: str  # as the paper writes it
    config: str  # file in configs/
    params: int  # trainable parameters
    gflops: float  # the paper's analytic count (multiply-accumulates), as the upstream flops() returns it
    top1: float  # ImageNet-1K top-1 (%)

    @property
    def config_path(self) -> Path:
        return CONFIGS_DIR / self.config

    def summary(self) -> str:
        """One line for docstrings and logs."""
        return (
            f"{self.title}: {self.params / 1e6:.2f} M parameters, {self.gflops:.2f} analytic GFLOPs, "
            f"{self.top1:.2f} % ImageNet-1K top-1 at 224x224"
        )


VARIANTS = {
    v.name: v
    for v in (
        Variant("dfvt_tiny", "DFvT-T", "tiny.yaml", 3_967_627, 0.27142848, 72.95),
        Variant("dfvt_small", "DFvT-S", "small.yaml", 11_225_485, 0.814258944, 78.29),
        Variant("dfvt_base", "DFvT-B", "base.yaml", 37_331_136, 2.503752704, 81.98),
    )
}


def architecture_of(state: dict[str, torch.Tensor]) -> tuple | None:
    """(embed dim, depths, heads, MLP ratio) read off a DFvT state_dict, or None if it is not one."""
    try:
        embed = state["patch_embed.proj2.weight"].shape[0]
        depths, heads = [], []
        i = 0
        while f"layers.{i}.blocks.0.norm1.weight" in state:
            depths.append(len({k.split(".")[3] for k in state if k.startswith(f"layers.{i}.blocks.")}))
            heads.append(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
            i += 1
        mlp = state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed
    except (KeyError, IndexError, ZeroDivisionError):
        return None
    return embed, tuple(depths), tuple(heads), mlp


def suggest_config(state: dict[str, torch.Tensor]) -> str:
    """A hint naming the released variant (and its config) whose architecture the weights have, if any."""
    arch = architecture_of(state)
    if arch is None:
        return "these weights are not a DFvT model"
    for variant in VARIANTS.values():
        m = load_config(str(variant.config_path)).MODEL.DFVT
        if (m.EMBED_DIM, tuple(m.DEPTHS), tuple(m.NUM_HEADS), m.MLP_RATIO) == arch:
            return f"this looks like {variant.title}: use configs/{variant.config}"
    embed, depths, heads, mlp = arch
    return f"its architecture is EMBED_DIM {embed}, DEPTHS {list(depths)}, NUM_HEADS {list(heads)}, MLP_RATIO {mlp}"
