"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "dfvt_tiny", source="local", weights=PATH_OR_NONE)``.

``weights`` is a local checkpoint (this repo's or the upstream format, read safely and loaded strictly; a head with
another ``num_classes`` is re-initialised) or None for random weights. Nothing is downloaded. Other keywords
(``num_classes``, ``drop_path_rate``, ``img_size``, ...) override the variant's ``configs/<size>.yaml``; see
``models/registry.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from models.registry import create as _create  # private names: torch.hub.list shows every public callable
from models.variants import VARIANTS as _VARIANTS

if TYPE_CHECKING:  # torch.hub.list would show these callables
    from typing import Any

    from models.dfvt import DFvT

dependencies = ["torch", "timm", "yacs"]


def _hub_entry(variant: str):
    def entry(weights: str | os.PathLike | None = None, **kwargs: Any) -> DFvT:
        return _create(variant, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__doc__ = f"{_VARIANTS[variant].summary()}; from ``weights`` (a local checkpoint) if given."
    return entry


dfvt_tiny = _hub_entry("dfvt_tiny")
dfvt_small = _hub_entry("dfvt_small")
dfvt_base = _hub_entry("dfvt_base")
