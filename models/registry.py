"""DFvT in timm's model registry: ``timm.create_model("dfvt_tiny" | "dfvt_small" | "dfvt_base", ...)``.

Importing ``models`` registers the three variants of :data:`models.variants.VARIANTS`; nothing of timm is changed.
Each is built from its own ``configs/<size>.yaml`` (one source of truth for the architecture); the keyword arguments
in :data:`KWARG_TO_CONFIG_KEY` override the config. Ways to load a checkpoint:

* ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` and torch.hub's
  ``weights=PATH`` (``hubconf.py``, or :func:`create`): our entry point reads the file with
  :func:`checkpoint.load_file` (never unpickling code; upstream files with a pickled config included) and loads it
  strictly, except a classifier with another class count, which is re-initialised.
* ``timm.create_model(name, checkpoint_path=PATH)`` is timm's own loader: ``torch.load(weights_only=True)``, the
  ``model`` (or ``model_ema``) entry, a strict ``load_state_dict``. It reads this repo's checkpoints and raw
  ``state_dict`` files with the same class count; it refuses upstream files (their pickled config is not a weight)
  and a head of another size. Use the first way for those.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from yacs.config import CfgNode

from config import load_config
from errors import CheckpointError

from .build import build_model
from .dfvt import DFvT
from .variants import VARIANTS
from .weights import load_pretrained

_logger = logging.getLogger(__name__)

# Keyword arguments of the entry points: the config key each overrides, and its type.
KWARG_TO_CONFIG_KEY = {
    "num_classes": ("MODEL.NUM_CLASSES", int),
    "drop_rate": ("MODEL.DROP_RATE", float),
    "drop_path_rate": ("MODEL.DROP_PATH_RATE", float),
    "img_size": ("DATA.IMG_SIZE", int),
    "window_size": ("MODEL.DFVT.WINDOW_SIZE", int),
    "in_chans": ("MODEL.DFVT.IN_CHANS", int),
}


def _default_cfg(variant: str) -> dict[str, Any]:
    """timm's pretrained config of a released checkpoint: its file name, input and classifier."""
    return {
        "file": f"{variant}.pth",  # the release's file name; no URL is reachable from here
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,  # the window layout is built for one input size
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj1",
        "classifier": "head",
        "paper_name": "Doubly-Fused ViT: Fuse Information from Vision Transformer Doubly with Local Representation",
    }


# register_model reads the pretrained configs from this module attribute.
default_cfgs = {variant: _default_cfg(variant) for variant in VARIANTS}


def _square_side(img_size: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(img_size, int):
        return img_size
    sides = set(img_size)
    if len(sides) != 1:
        raise ValueError(f"img_size {tuple(img_size)} is not square; DFvT takes square inputs (e.g. img_size=224).")
    return int(sides.pop())


def variant_config(variant: str, **kwargs: Any) -> CfgNode:
    """``configs/<size>.yaml`` of ``variant`` with the overrides of :data:`KWARG_TO_CONFIG_KEY` applied."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown DFvT variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    unknown = sorted(set(kwargs) - set(KWARG_TO_CONFIG_KEY))
    if unknown:
        raise TypeError(
            f"{variant}() got unsupported keyword argument(s) {', '.join(unknown)}; "
            f"it takes {', '.join(KWARG_TO_CONFIG_KEY)}."
        )
    opts = []
    for name, value in kwargs.items():
        key, kind = KWARG_TO_CONFIG_KEY[name]
        opts += [key, kind(_square_side(value) if name == "img_size" else value)]
    return load_config(str(VARIANTS[variant].config_path), opts)


def _build(variant: str, **kwargs: Any) -> DFvT:
    """The model class handed to timm's ``build_model_with_cfg``: the variant's config, overridden by ``kwargs``."""
    return build_model(variant_config(variant, **kwargs))


def create(variant: str, pretrained: bool = False, weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
    """``variant`` built through timm (so it carries its ``pretrained_cfg``), then loaded from ``weights`` if given.

    ``pretrained=True`` loads the file named by the pretrained config (``pretrained_cfg_overlay=dict(file=PATH)``
    points it at a local copy). ``device``/``dtype`` move the model; the other keywords go to :func:`variant_config`.
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} has no timm feature-extraction wrapper; use model.forward_features(x).")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = build_model_with_cfg(functools.partial(_build, variant), variant, pretrained=False, **kwargs)
    side = model.patch_embed.img_size
    if side != model.pretrained_cfg["input_size"][-1]:  # built for another size: the data config follows it
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, side, side), "pool_size": (side // 32,) * 2}
    if pretrained:
        file = model.pretrained_cfg.get("file")
        if not file or not os.path.isfile(file):
            raise CheckpointError(
                f"Pretrained weights {file!r} for {variant} are not on this machine and cannot be downloaded; "
                f"get the release checkpoint and pass pretrained_cfg_overlay=dict(file=PATH)."
            )
        load_pretrained(model, file, _logger)
    if weights is not None:
        load_pretrained(model, weights, _logger)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def _entry_point(variant: str):
    """A registered ``variant(pretrained=False, **kwargs)`` function, documented with the paper's figures."""

    def entry(pretrained: bool = False, **kwargs: Any) -> DFvT:
        return create(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__doc__ = f"{VARIANTS[variant].summary()}."
    entry.__module__ = __name__
    return register_model(entry)


dfvt_tiny = _entry_point("dfvt_tiny")
dfvt_small = _entry_point("dfvt_small")
dfvt_base = _entry_point("dfvt_base")
