"""Loading weights into a DFvT: strictly, with a message that names what does not fit and the config that would,
or (for fine-tuning) strictly except a classifier with another class count, which is re-initialised.

Files are read with :func:`checkpoint.load_file`, which never runs pickled code (upstream files included)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from checkpoint import load_file, model_state_of
from errors import CheckpointError

from .variants import suggest_config

HEAD_KEYS = ("head.weight", "head.bias")


def load_model_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: str, ignore: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``model`` strictly (except keys in ``ignore``), or raise :class:`CheckpointError`
    naming the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own and k not in ignore]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in ignore and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", wrong))
            if items
        )
        raise CheckpointError(f"Checkpoint {path} does not fit this model ({details}); {suggest_config(state)}.")
    model.load_state_dict({k: v for k, v in state.items() if k not in ignore}, strict=not ignore)


def load_pretrained(model: nn.Module, path: str | os.PathLike, logger: logging.Logger) -> None:
    """Weights only, for fine-tuning or inference: strict, except a classifier whose class count differs,
    which is re-initialised (and logged)."""
    path = os.fspath(path)
    state = model_state_of(load_file(path), path)
    own = model.state_dict()
    head = tuple(k for k in HEAD_KEYS if k in state or k in own)
    if any(k not in state or k not in own or state[k].shape != own[k].shape for k in head):
        load_model_weights(model, state, path, ignore=head)
        model.reset_classifier(model.num_classes)
        classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        logger.info(f"{path}: head re-initialised ({classes} classes in the file, {model.num_classes} here)")
    else:
        load_model_weights(model, state, path)
    logger.info(f"Loaded weights from {path} (strict: every key and shape matched)")
