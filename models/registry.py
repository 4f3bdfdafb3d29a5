"""DFvT in timm's model registry: ``timm.create_model("dfvt_tiny" | "dfvt_small" | "dfvt_base", ...)``.

Importing ``models`` registers the three variants. Each is built from its own ``configs/<size>.yaml``
(one source of truth for the architecture); the keyword arguments in :data:`KWARG_TO_CONFIG_KEY`
override the config. Weights are always read with :func:`checkpoint.load_file` (never unpickling
code, upstream files included) and loaded strictly, except a classifier with another class count,
which is re-initialised. Three ways to load a file, all through :func:`load_weights`:

* ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``: the
  variant's pretrained config names the release file (``dfvt_tiny.pth`` ...); the overlay points
  it at your copy. The entry point loads it itself, not timm (whose loader cannot read upstream
  files).
* ``timm.create_model(name, checkpoint_path=PATH)``: ``create_model`` loads ``checkpoint_path``
  after the entry point returns, through its module-level ``load_checkpoint`` (``torch.load`` with
  ``weights_only=True``, then a strict ``load_state_dict``), which refuses upstream files and a
  head of another size. :func:`_install_create_model_loader` wraps that one function so that, for
  a DFvT model and a plain call, it uses :func:`load_weights`; other models are untouched.
* ``torch.hub.load(repo, name, source="local", weights=PATH)`` (``hubconf.py``), or :func:`create`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import _factory, build_model_with_cfg, register_model
from yacs.config import CfgNode

from checkpoint import CheckpointError, load_pretrained
from config import load_config

from .build import build_model
from .dfvt import DFvT

_logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIANT_CONFIGS = {"dfvt_tiny": "tiny.yaml", "dfvt_small": "small.yaml", "dfvt_base": "base.yaml"}
# Keyword arguments of the entry points and the config keys they override.
KWARG_TO_CONFIG_KEY = {
    "num_classes": "MODEL.NUM_CLASSES",
    "drop_rate": "MODEL.DROP_RATE",
    "drop_path_rate": "MODEL.DROP_PATH_RATE",
    "img_size": "DATA.IMG_SIZE",
    "in_chans": "MODEL.DFVT.IN_CHANS",
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
default_cfgs = {variant: _default_cfg(variant) for variant in VARIANT_CONFIGS}


def _square_side(img_size: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(img_size, int):
        return img_size
    sides = set(img_size)
    if len(sides) != 1:
        raise ValueError(f"img_size {tuple(img_size)} is not square; DFvT takes square inputs (e.g. img_size=224).")
    return int(sides.pop())


def variant_config(variant: str, **kwargs: Any) -> CfgNode:
    """``configs/<size>.yaml`` of ``variant`` with the overrides of :data:`KWARG_TO_CONFIG_KEY` applied."""
    if variant not in VARIANT_CONFIGS:
        raise ValueError(f"Unknown DFvT variant {variant!r}; choose one of {', '.join(VARIANT_CONFIGS)}.")
    unknown = sorted(set(kwargs) - set(KWARG_TO_CONFIG_KEY))
    if unknown:
        raise TypeError(
            f"{variant}() got unsupported keyword argument(s) {', '.join(unknown)}; "
            f"it takes {', '.join(KWARG_TO_CONFIG_KEY)}."
        )
    config = load_config(str(CONFIGS / VARIANT_CONFIGS[variant]))
    config.defrost()
    for name, value in kwargs.items():
        *parents, leaf = KWARG_TO_CONFIG_KEY[name].split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = _square_side(value) if name == "img_size" else type(node[leaf])(value)
    config.freeze()
    return config


def _build(variant: str, **kwargs: Any) -> DFvT:
    """The model class handed to timm's ``build_model_with_cfg``: the variant's config, overridden by ``kwargs``."""
    return build_model(variant_config(variant, **kwargs))


def load_weights(model: DFvT, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into ``model`` (see :func:`checkpoint.load_pretrained`)."""
    load_pretrained(model, path, _logger)


def create(variant: str, pretrained: bool = False, weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
    """``variant`` built through timm (so it carries its ``pretrained_cfg``), then loaded from ``weights`` if given.

    ``pretrained=True`` loads the file named by the pretrained config (``pretrained_cfg_overlay=dict(file=PATH)``
    points it at a local copy). ``device``/``dtype`` move the model; the other keywords go to :func:`variant_config`.
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} has no timm feature-extraction wrapper; use model.forward_features(x).")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = build_model_with_cfg(functools.partial(_build, variant), variant, pretrained=False, **kwargs)
    if pretrained:
        file = model.pretrained_cfg.get("file")
        if not file or not os.path.isfile(file):
            raise CheckpointError(
                f"Pretrained weights {file!r} for {variant} are not on this machine and cannot be downloaded; "
                f"get the release checkpoint and pass pretrained_cfg_overlay=dict(file=PATH) or checkpoint_path=PATH."
            )
        load_weights(model, file)
    if weights is not None:
        load_weights(model, weights)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


@register_model
def dfvt_tiny(pretrained: bool = False, **kwargs: Any) -> DFvT:
    """DFvT-T: 3.97 M parameters, 0.27 analytic GFLOPs, 72.95 % ImageNet-1K top-1 at 224x224."""
    return create("dfvt_tiny", pretrained, **kwargs)


@register_model
def dfvt_small(pretrained: bool = False, **kwargs: Any) -> DFvT:
    """DFvT-S: 11.23 M parameters, 0.81 analytic GFLOPs, 78.29 % ImageNet-1K top-1 at 224x224."""
    return create("dfvt_small", pretrained, **kwargs)


@register_model
def dfvt_base(pretrained: bool = False, **kwargs: Any) -> DFvT:
    """DFvT-B: 37.33 M parameters, 2.50 analytic GFLOPs, 81.98 % ImageNet-1K top-1 at 224x224."""
    return create("dfvt_base", pretrained, **kwargs)


def _install_create_model_loader() -> None:
    """Make ``timm.create_model(..., checkpoint_path=PATH)`` load DFvT models with :func:`load_weights`.

    Only the plain call ``create_model`` makes (model and path) on a DFvT is rerouted; any other
    model, or a call with extra arguments, goes to timm's own loader unchanged.
    """
    original = _factory.load_checkpoint
    if getattr(original, "dfvt_wrapper", False):
        return

    @functools.wraps(original)
    def load_checkpoint(model: torch.nn.Module, checkpoint_path: str | os.PathLike, *args: Any, **kwargs: Any):
        if isinstance(model, DFvT) and not args and not kwargs:
            return load_weights(model, checkpoint_path)
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint.dfvt_wrapper = True
    _factory.load_checkpoint = load_checkpoint


_install_create_model_loader()
