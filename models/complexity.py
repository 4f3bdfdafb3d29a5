"""Model size and cost figures for logs: parameters, the paper's analytic FLOPs and a measured count."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def measured_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """FLOPs of one forward pass of a single image, counted by ``torch.utils.flop_counter``.

    The counter covers matrix multiplications and convolutions, 2 FLOPs per multiply-add, so
    it reads about twice the paper's analytic (multiply-accumulate) figure.
    """
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def complexity_summary(model: nn.Module, img_size: int, in_chans: int = 3) -> str:
    """One log line: trainable parameters, analytic GFLOPs (paper convention) and measured GFLOPs."""
    analytic = model.flops() / 1e9 if hasattr(model, "flops") else float("nan")
    measured = measured_flops(model, img_size, in_chans) / 1e9
    return (
        f"params {count_parameters(model):,} | analytic GFLOPs (paper's hand count) {analytic:.4f} | "
        f"measured GFLOPs (torch FlopCounterMode, 2 per multiply-add) {measured:.4f}"
    )
