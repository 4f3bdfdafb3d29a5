"""Knowledge distillation from a teacher's logits (``TRAIN.DISTILL``): DeiT's soft and hard losses applied to DFvT's
single head (no distillation token), the teacher frozen in eval mode.

``build_teacher`` builds the teacher a config names (one of this repo's config files, a DFvT variant name, or a timm
model name) and loads its weights strictly from ``TRAIN.DISTILL.CHECKPOINT``, read with :func:`checkpoint.load_file`
(no pickled code runs). :class:`DistillationLoss` wraps the usual criterion: the teacher sees the same (Mixup/CutMix
mixed) images as the student, under the caller's autocast and without gradients, and the loss is
``(1 - ALPHA) * base + ALPHA * distill``, with both terms returned for logging.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from yacs.config import CfgNode

from checkpoint import load_file, model_state_of
from config import DISTILL_TYPES, load_config
from errors import CheckpointError, ConfigError
from models import VARIANTS, load_checkpoint_model

CONFIG_SUFFIXES = (".yaml", ".yml")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz")
# The student's input normalisation (data/build.py normalises every batch with ImageNet's mean and std).
STUDENT_MEAN, STUDENT_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


# ----------------------------------------------------------------------------------------------- the loss


def check_settings(kind: str, alpha: float, tau: float) -> None:
    """Raise :class:`ConfigError` naming the ``TRAIN.DISTILL`` key when ``kind``, ``alpha`` or ``tau`` is unusable."""
    if kind not in DISTILL_TYPES:
        raise ConfigError(f"TRAIN.DISTILL.TYPE {kind!r} must be soft or hard.")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"TRAIN.DISTILL.ALPHA {alpha} must be in [0, 1] (the weight of the distillation term).")
    if not tau > 0.0:
        raise ConfigError(f"TRAIN.DISTILL.TAU {tau} must be positive (the soft loss's temperature).")


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft distillation term: ``KL(softmax(teacher/tau) || softmax(student/tau))`` summed over the batch and
    the classes, times ``tau²``, divided by the number of logits (batch × classes, as DeiT normalises; a per-sample
    ``batchmean`` would be ``classes`` times larger)."""
    log_student = F.log_softmax(student / tau, dim=1)
    log_teacher = F.log_softmax(teacher / tau, dim=1)
    divergence = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return divergence * (tau * tau) / student.numel()


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation term: cross-entropy of the student against the teacher's top-1 class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base_criterion(outputs, targets) + alpha * distill``, the distillation term comparing the
    student's logits with the teacher's on the same inputs (DeiT's losses on a single head).

    The teacher runs on ``inputs`` (the mixed images under Mixup/CutMix, whose soft ``targets`` go to the base
    criterion) without gradients, in eval mode whatever mode this module is put in, and inside whatever autocast
    context the caller has open; the losses themselves are computed in float32.

    Args:
        base_criterion: the usual loss, called as ``base_criterion(outputs, targets)`` on float32 logits.
        teacher: the frozen teacher (see :func:`build_teacher`); its logits must have the student's classes.
        kind: ``"soft"`` (:func:`soft_distillation`) or ``"hard"`` (:func:`hard_distillation`).
        alpha: weight of the distillation term, in [0, 1].
        tau: temperature of the soft term (the hard term does not use it).
    """

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        check_settings(kind, alpha, tau)
        self.base_criterion = base_criterion
        self.teacher = teacher.eval()
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)

    def train(self, mode: bool = True) -> DistillationLoss:
        """Set the mode of the base criterion; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and ``{"base": ..., "distill": ...}``, both terms unweighted and detached (device tensors,
        for logging; nothing here synchronises with the host)."""
        if self.teacher.training:  # someone called .train() on it directly
            self.teacher.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs.detach())
        with torch.autocast(device_type=outputs.device.type, enabled=False):
            student, teacher_logits = outputs.float(), teacher_outputs.float()
            base = self.base_criterion(student, targets)
            if self.kind == "soft":
                distill = soft_distillation(student, teacher_logits, self.tau)
            else:
                distill = hard_distillation(student, teacher_logits)
            loss = base * (1.0 - self.alpha) + distill * self.alpha
        return loss, {"base": base.detach(), "distill": distill.detach()}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, alpha={self.alpha}, tau={self.tau}"


def with_distillation(config: CfgNode, criterion: nn.Module, teacher: nn.Module | None) -> nn.Module:
    """``criterion`` wrapped in a :class:`DistillationLoss` with the ``TRAIN.DISTILL`` settings, or ``criterion``
    itself when there is no teacher."""
    if teacher is None:
        return criterion
    d = config.TRAIN.DISTILL
    return DistillationLoss(criterion, teacher, d.TYPE, d.ALPHA, d.TAU)


# ----------------------------------------------------------------------------------------------- the teacher


class Renormalized(nn.Module):
    """A teacher whose inputs are re-normalised from the student's mean/std to its own before its forward pass
    (as timm's distillation does for teachers trained with another normalisation)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        student_mean = torch.tensor(STUDENT_MEAN).view(1, -1, 1, 1)
        student_std = torch.tensor(STUDENT_STD).view(1, -1, 1, 1)
        own_mean, own_std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t = x * scale + shift
        self.register_buffer("scale", student_std / own_std, persistent=False)
        self.register_buffer("shift", (student_mean - own_mean) / own_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def _is_config(teacher: str) -> bool:
    return teacher.lower().endswith(CONFIG_SUFFIXES) or os.path.isfile(teacher)


def _dfvt_teacher(config: CfgNode, path: str, checkpoint: str, num_classes: int) -> tuple[nn.Module, Any]:
    """The DFvT ``path`` (a config file) describes, built at the student's image size, with ``checkpoint``'s
    weights (strict; bias tables of another window size resized) and class count."""
    try:
        teacher_config = load_config(path, ["DATA.IMG_SIZE", str(config.DATA.IMG_SIZE)])
    except ConfigError as e:
        raise ConfigError(f"TRAIN.DISTILL.TEACHER {path}: {e}") from e
    try:
        model, ckpt, _ = load_checkpoint_model(teacher_config, checkpoint)
    except ConfigError as e:
        raise ConfigError(f"TRAIN.DISTILL.TEACHER {path} at the student's DATA.IMG_SIZE: {e}") from e
    except CheckpointError as e:
        raise CheckpointError(f"Teacher {path}: {e}") from e
    if model.num_classes != num_classes:
        raise ConfigError(_class_count_message(checkpoint, model.num_classes, num_classes))
    return model, ckpt


def _class_count_message(checkpoint: str, teacher_classes: int, num_classes: int) -> str:
    return (
        f"TRAIN.DISTILL.CHECKPOINT {checkpoint} predicts {teacher_classes} classes and the student {num_classes}: "
        f"the teacher must predict the student's classes, in its order (fine-tune the teacher on this data first)."
    )


def _unknown_timm_name(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(
        f"TRAIN.DISTILL.TEACHER {name!r} is neither a config file nor a timm model name{hint}; give a timm model "
        f"name, a DFvT variant ({', '.join(VARIANTS)}) or a config file such as configs/small.yaml."
    )


def _timm_teacher(config: CfgNode, name: str, checkpoint: str, num_classes: int) -> tuple[nn.Module, Any]:
    """timm's ``name`` with ``num_classes`` outputs and ``checkpoint``'s weights, loaded strictly."""
    if not timm.is_model(name):
        raise _unknown_timm_name(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=config.MODEL.DFVT.IN_CHANS)
    ckpt = load_file(checkpoint)
    if isinstance(ckpt, dict) and "model" not in ckpt and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]  # timm's train.py layout (after clean_checkpoint.py)
    state = model_state_of(ckpt, checkpoint)
    own = model.state_dict()
    classifier = {id(p) for p in model.get_classifier().parameters()}
    head_keys = [k for k, p in model.named_parameters() if id(p) in classifier]
    for key in head_keys:
        if key in state and state[key].dim() >= 1 and state[key].shape[0] != own[key].shape[0]:
            raise ConfigError(_class_count_message(checkpoint, state[key].shape[0], num_classes))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", wrong))
            if items
        )
        raise CheckpointError(
            f"Checkpoint {checkpoint} does not fit the teacher {name} ({details}); TRAIN.DISTILL.CHECKPOINT must hold "
            f"the weights of TRAIN.DISTILL.TEACHER."
        )
    model.load_state_dict(state, strict=True)
    mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    channels = config.MODEL.DFVT.IN_CHANS
    if mean and std and len(mean) == len(std) == len(STUDENT_MEAN) == channels:
        if tuple(mean) != tuple(STUDENT_MEAN) or tuple(std) != tuple(STUDENT_STD):
            model = Renormalized(model, mean, std)
    return model, ckpt


def _check_forward(teacher: nn.Module, config: CfgNode, device: torch.device, name: str, num_classes: int) -> None:
    """One image through the teacher at the student's input size: a clear error now rather than at the first step."""
    size, channels = config.DATA.IMG_SIZE, config.MODEL.DFVT.IN_CHANS
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, channels, size, size, device=device))
    except Exception as e:  # any failure of a foreign model's forward pass is the same user error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"TRAIN.DISTILL.TEACHER {name} cannot take the student's {channels}x{size}x{size} inputs ({first})."
        ) from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"TRAIN.DISTILL.TEACHER {name} returns {shape} for one image, not (1, {num_classes}) logits.")


def build_teacher(
    config: CfgNode,
    device: torch.device,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    logger: logging.Logger | None = None,
) -> nn.Module | None:
    """The frozen teacher ``TRAIN.DISTILL`` describes, or None when ``TRAIN.DISTILL.TEACHER`` is empty.

    ``TEACHER`` is a config file of this repo (a name ending in .yaml/.yml, or an existing file), a DFvT variant name
    (its config) or a timm model name. A DFvT teacher is built at the student's ``DATA.IMG_SIZE`` and loaded like
    ``--eval`` weights (ours or upstream files; bias tables of another window size resized); a timm teacher is
    ``timm.create_model(name, pretrained=False, num_classes=num_classes)`` loaded strictly (a ``model`` or
    ``state_dict`` entry, or a raw state_dict), its inputs re-normalised when its ``pretrained_cfg`` mean/std differ
    from the student's. ``TRAIN.DISTILL.CHECKPOINT`` is required and read with :func:`checkpoint.load_file`.

    The teacher must predict ``num_classes`` classes (:class:`ConfigError` otherwise); when its checkpoint lists class
    names that differ from ``class_names`` (the data's), ``logger`` gets a warning. Returned in eval mode, without
    gradients, on ``device``.
    """
    d = config.TRAIN.DISTILL
    name, checkpoint = str(d.TEACHER).strip(), str(d.CHECKPOINT).strip()
    if not name:
        return None
    check_settings(d.TYPE, d.ALPHA, d.TAU)
    if not checkpoint:
        raise ConfigError(
            f"TRAIN.DISTILL.TEACHER {name} needs its trained weights in TRAIN.DISTILL.CHECKPOINT (a randomly "
            f"initialised teacher teaches nothing)."
        )
    if os.path.isfile(name) and name.lower().endswith(WEIGHT_SUFFIXES):
        raise ConfigError(
            f"TRAIN.DISTILL.TEACHER {name} is a weights file: put it in TRAIN.DISTILL.CHECKPOINT and name the "
            f"teacher's architecture (a config file or a timm model name) in TRAIN.DISTILL.TEACHER."
        )
    if _is_config(name):
        model, ckpt = _dfvt_teacher(config, name, checkpoint, num_classes)
    elif name in VARIANTS:
        model, ckpt = _dfvt_teacher(config, str(VARIANTS[name].config_path), checkpoint, num_classes)
    else:
        model, ckpt = _timm_teacher(config, name, checkpoint, num_classes)
    model.eval().requires_grad_(False)
    model.to(device)
    _check_forward(model, config, device, name, num_classes)
    log = logger or logging.getLogger(__name__)
    stored = ckpt.get("class_names") if isinstance(ckpt, dict) else None
    if class_names and stored and list(stored) != list(class_names):
        at = next((i for i, (a, b) in enumerate(zip(stored, class_names, strict=False)) if a != b), None)
        where = f"output {at}: {stored[at]!r} vs {class_names[at]!r}" if at is not None else "their counts differ"
        log.warning(
            f"TRAIN.DISTILL.CHECKPOINT {checkpoint} lists other class names than the data ({where}); make sure the "
            f"teacher's outputs are the student's classes in the same order"
        )
    params = sum(p.numel() for p in model.parameters())
    log.info(
        f"Distillation: teacher {name} ({params / 1e6:.2f} M parameters, weights {checkpoint}), {d.TYPE} loss, "
        f"ALPHA {d.ALPHA:g}" + (f", TAU {d.TAU:g}" if d.TYPE == "soft" else "")
    )
    return model
