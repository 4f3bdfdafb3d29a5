"""Loading weights into a DFvT: strictly, with a message that names what does not fit and the config that would,
or (for fine-tuning) strictly except a classifier with another class count, which is re-initialised.

Weights trained at one image size or window size load into a model built for another, as in Swin's
``load_pretrained``: each relative position bias table is resized bicubically on its ``(2w-1) x (2w-1)`` grid per
head, and the buffers derived from the layout (relative position index, shift mask) are the model's own, rebuilt
for its layout. Files are read with :func:`checkpoint.load_file`, which never runs pickled code (upstream files
included)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from checkpoint import load_file, model_state_of
from errors import CheckpointError

from .build import build_model
from .dfvt import DFvT
from .variants import suggest_config

HEAD_KEYS = ("head.weight", "head.bias")
BIAS_TABLE = "relative_position_bias_table"
# Buffers computed from the window layout at build time; a file's copies are replaced by the model's own.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


def resize_bias_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A ``(2w-1)² × heads`` relative position bias table resized to ``length = (2w'-1)²`` rows: bicubic
    interpolation of each head's ``(2w-1) × (2w-1)`` grid (``F.interpolate``, default ``align_corners``)."""
    side, new_side = math.isqrt(table.shape[0]), math.isqrt(length)
    if side * side != table.shape[0] or new_side * new_side != length:
        raise ValueError(f"bias tables of {table.shape[0]} and {length} rows are not square grids")
    heads = table.shape[1]
    work = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32  # bicubic needs these
    grid = table.detach().to(work).permute(1, 0).reshape(1, heads, side, side)
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic")
    return resized.reshape(heads, length).permute(1, 0).contiguous().to(table.dtype)


def fit_to_layout(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """``state`` adapted to the window layout of the model whose state_dict is ``own``: bias tables of another
    window size resized (:func:`resize_bias_table`), derived buffers taken from ``own``. Returns the new state and
    one note per distinct resize, e.g. ``5 relative position bias tables resized from 13x13 to 23x23 per head``."""
    state = {k: v for k, v in state.items() if not (k.endswith(DERIVED_BUFFERS) and k not in own)}
    resized: dict[tuple[int, int], list[str]] = {}
    for key, value in own.items():
        if key.endswith(DERIVED_BUFFERS):
            state[key] = value
        elif key.endswith(BIAS_TABLE) and key in state and state[key].shape != value.shape:
            old = state[key]
            if old.dim() == 2 and old.shape[1] == value.shape[1]:  # same heads: another window size
                state[key] = resize_bias_table(old, value.shape[0])
                resized.setdefault((old.shape[0], value.shape[0]), []).append(key.removesuffix("." + BIAS_TABLE))
    notes = []
    for (old_rows, new_rows), keys in resized.items():
        a, b = math.isqrt(old_rows), math.isqrt(new_rows)
        window = f"window {(a + 1) // 2} -> {(b + 1) // 2}"
        notes.append(
            f"{len(keys)} relative position bias table{'s' if len(keys) > 1 else ''} resized bicubically from "
            f"{a}x{a} to {b}x{b} per head "
            f"({window}): {', '.join(keys)}"
        )
    return state, notes


# Why weights are loaded, for the class-count hint: "evaluate" (--eval, predict.py, export.py: the data must fit the
# file's classes) or "resume" (continuing training: a new class count is a fine-tuning run, --pretrained).
PURPOSES = ("evaluate", "resume")


def _head_mismatch_hint(path: str, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], purpose: str) -> str:
    file_classes, model_classes = state["head.weight"].shape[0], own["head.weight"].shape[0]
    problem = (
        f"Checkpoint {path} has a {file_classes}-class head and this model {model_classes} classes: a class-count "
        f"mismatch, not another variant."
    )
    if purpose == "resume":
        return (
            f"{problem} --resume continues a run on the classes it was trained on; to train on these "
            f"{model_classes} classes, start a new run from it with --pretrained {path} (the head is re-initialised; "
            f"DATA.DATASET folder counts the class folders)."
        )
    names = f"ImageNet synsets or 0..{file_classes - 1}" if file_classes == 1000 else f"0..{file_classes - 1}"
    return (
        f"{problem} To evaluate it, give the data its {file_classes} classes: DATA.DATASET imagenet "
        f"(MODEL.NUM_CLASSES {file_classes}) with class folders named {names} (DATA.CLASS_MAP auto) or a "
        f"DATA.CLASS_MAP file mapping your folders to its classes, all of them or a subset."
    )


def load_model_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str,
    ignore: tuple[str, ...] = (),
    logger: logging.Logger | None = None,
    purpose: str = "evaluate",
) -> list[str]:
    """Load ``state`` into ``model`` strictly (except keys in ``ignore``), adapting weights of another window layout
    (:func:`fit_to_layout`; the notes are logged to ``logger`` and returned), or raise :class:`CheckpointError`
    naming the missing, unexpected and mis-shaped keys and what would fit. ``purpose`` (one of :data:`PURPOSES`)
    picks the fix a class-count mismatch suggests: data that fits the file's classes for ``evaluate``,
    ``--pretrained`` for ``resume``."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r} must be one of {', '.join(PURPOSES)}")
    own = model.state_dict()
    state, notes = fit_to_layout(own, state)
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own and k not in ignore]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in ignore and state[k].shape != own[k].shape
    ]
    if wrong and not missing and not unexpected and {k.split(" ")[0] for k in wrong} <= set(HEAD_KEYS):
        raise CheckpointError(_head_mismatch_hint(path, state, own, purpose))
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", wrong))
            if items
        )
        raise CheckpointError(f"Checkpoint {path} does not fit this model ({details}); {suggest_config(state)}.")
    model.load_state_dict({k: v for k, v in state.items() if k not in ignore}, strict=not ignore)
    for note in notes:
        (logger or logging.getLogger(__name__)).info(f"{path}: {note}")
    return notes


def loaded_message(path: str, notes: list[str]) -> str:
    """The log line after a strict load of ``path`` (``notes``: what :func:`load_model_weights` adapted)."""
    how = "every key and shape matched" if not notes else "every key matched, bias tables resized as logged"
    return f"Loaded weights from {path} (strict: {how})"


def load_pretrained(model: nn.Module, path: str | os.PathLike, logger: logging.Logger) -> None:
    """Weights only, for fine-tuning or inference: strict, except a classifier whose class count differs,
    which is re-initialised (and logged)."""
    path = os.fspath(path)
    state = model_state_of(load_file(path), path)
    own = model.state_dict()
    head = tuple(k for k in HEAD_KEYS if k in state or k in own)
    if any(k not in state or k not in own or state[k].shape != own[k].shape for k in head):
        notes = load_model_weights(model, state, path, ignore=head, logger=logger)
        model.reset_classifier(model.num_classes)
        classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        logger.info(f"{path}: head re-initialised ({classes} classes in the file, {model.num_classes} here)")
    else:
        notes = load_model_weights(model, state, path, logger=logger)
    logger.info(loaded_message(path, notes))


def load_checkpoint_model(config: CfgNode, path: str | os.PathLike) -> tuple[DFvT, Any, list[str]]:
    """The eval-mode model ``config`` describes, with the class count of the checkpoint at ``path`` (the rows of its
    ``head.weight``; 0, pooled features, when it has none), loaded strictly (:func:`load_model_weights`) from the
    file's ``model`` weights, or its weight average ``model_ema`` with ``TEST.USE_EMA``.
    Returns the model, the file's content (for its class names) and the load notes (tables resized)."""
    path = os.fspath(path)
    ckpt = load_file(path)
    state = model_state_of(ckpt, path, "model_ema" if config.TEST.USE_EMA else "model")
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = build_model(config, num_classes=num_classes)
    notes = load_model_weights(model, state, path)
    return model.eval(), ckpt, notes
