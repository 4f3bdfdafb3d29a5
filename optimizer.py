"""The upstream optimizer: AdamW (or Nesterov SGD) over four parameter groups.

Parameters of the convolutional branch (``convlayers.*``, ``multiresolution_conv.*``) train at
``TRAIN.CONV_LR_SCALE`` × the LR, all others at 1×; in both, 1-D parameters and biases are not
weight-decayed, everything else (``relative_position_bias_table`` included) is.

The LR multiplier follows timm's convention: a group's ``"lr_scale"`` multiplies whatever value a
timm scheduler sets (``Scheduler.update_groups``), so the ratio holds at every step, warm-up and
minimum included. Each group's ``"initial_lr"`` is preset to the unscaled base LR, which timm's
schedulers take as their base value (``setdefault``), while ``"lr"`` starts at base × scale, so the
optimizer is right before the scheduler exists too.
"""

from __future__ import annotations

import torch
from torch import nn
from yacs.config import CfgNode

from errors import ConfigError
from utils import strip_wrapper_prefixes

CONV_PREFIXES = ("convlayers.", "multiresolution_conv.")  # the convolutional branch, trained at CONV_LR_SCALE
OPTIMIZERS = ("adamw", "sgd")


def is_conv_branch(name: str) -> bool:
    """Whether the (unwrapped) parameter ``name`` belongs to the convolutional branch."""
    return name.startswith(CONV_PREFIXES)


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Upstream rule: parameters of at most one dimension and biases get no weight decay."""
    return param.ndim > 1 and not name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float, conv_lr_scale: float) -> list[dict]:
    """The trainable parameters of ``model`` split into (1× | conv) × (decay | no decay) groups.

    Each group has ``params`` and ``weight_decay``; the conv groups also ``lr_scale = conv_lr_scale``.
    Order: 1× decay, 1× no decay, conv decay, conv no decay; empty groups are left out. Parameters
    with ``requires_grad`` False are skipped; wrapper prefixes are ignored when classifying.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (conv, decay): [] for conv in (False, True) for decay in (True, False)
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = strip_wrapper_prefixes(name)
        buckets[(is_conv_branch(name), is_decayed(name, param))].append(param)
    groups = []
    for (conv, decay), params in buckets.items():
        if not params:
            continue
        group: dict = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if conv:
            group["lr_scale"] = conv_lr_scale
        groups.append(group)
    return groups


def build_optimizer(config: CfgNode, model: nn.Module, base_lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``TRAIN.OPTIMIZER.NAME`` (``adamw`` or ``sgd``) over :func:`parameter_groups`.

    Every group gets ``initial_lr = base_lr`` (the value timm schedulers scale) and ``lr = base_lr × lr_scale``;
    ``base_lr`` defaults to ``TRAIN.BASE_LR`` as configured (a run passes the scaled one,
    ``lr_scheduler.linear_scaled_lrs(...).base``). AdamW uses the fused kernel when every parameter is on one device
    type, CPU or CUDA (on CPU it is about 7× faster than the per-parameter loop: 2.7 vs 19.7 ms for DFvT-T);
    SGD uses Nesterov momentum.
    """
    t = config.TRAIN
    name = str(t.OPTIMIZER.NAME).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"TRAIN.OPTIMIZER.NAME {t.OPTIMIZER.NAME!r} is not supported; choose one of: {', '.join(OPTIMIZERS)}."
        )
    base_lr = float(t.BASE_LR if base_lr is None else base_lr)
    groups = parameter_groups(model, float(t.WEIGHT_DECAY), float(t.CONV_LR_SCALE))
    for group in groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * group.get("lr_scale", 1.0)
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=base_lr, momentum=float(t.OPTIMIZER.MOMENTUM), nesterov=True, weight_decay=t.WEIGHT_DECAY
        )
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups,
        lr=base_lr,
        eps=float(t.OPTIMIZER.EPS),
        betas=tuple(float(b) for b in t.OPTIMIZER.BETAS),
        weight_decay=t.WEIGHT_DECAY,
        fused=fused or None,
    )
