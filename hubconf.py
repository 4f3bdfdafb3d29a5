"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "dfvt_tiny", source="local", weights=PATH_OR_NONE)``.

``weights`` is a local checkpoint (this repo's or the upstream format, read safely and loaded
strictly; a head with another ``num_classes`` is re-initialised) or None for random weights.
Nothing is downloaded. Other keywords (``num_classes``, ``drop_path_rate``, ``img_size``, ...)
override the variant's ``configs/<size>.yaml``; see ``models/registry.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from models.registry import create as _create  # private: torch.hub.list shows every public callable

if TYPE_CHECKING:
    from models.dfvt import DFvT

dependencies = ["torch", "timm", "yacs"]


def dfvt_tiny(weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
    """DFvT-T (3.97 M parameters, 72.95 % ImageNet-1K top-1), from ``weights`` if given."""
    return _create("dfvt_tiny", weights=weights, **kwargs)


def dfvt_small(weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
    """DFvT-S (11.23 M parameters, 78.29 % ImageNet-1K top-1), from ``weights`` if given."""
    return _create("dfvt_small", weights=weights, **kwargs)


def dfvt_base(weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
    """DFvT-B (37.33 M parameters, 81.98 % ImageNet-1K top-1), from ``weights`` if given."""
    return _create("dfvt_base", weights=weights, **kwargs)
