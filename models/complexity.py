"""Model size and cost figures for logs: parameters, the paper's analytic FLOPs and a measured count."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of PyTorch's CPU attention kernel, which the counter has no formula for (it has the CUDA ones)."""
    return sdpa_flop_count(query, key, value)


# Counted like the matmuls the straightforward path runs, so both paths give the same figure.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def measured_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """FLOPs of one forward pass of a single image, counted by ``torch.utils.flop_counter``.

    The counter covers matrix multiplications, attention kernels and convolutions, 2 FLOPs per multiply-add,
    so it reads about twice the paper's analytic (multiply-accumulate) figure.
    """
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
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
