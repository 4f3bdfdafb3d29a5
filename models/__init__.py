"""DFvT models: ``build_model(config)`` builds the configured variant."""

from . import registry  # noqa: F401  (registers dfvt_tiny/small/base with timm)
from .build import build_model
from .dfvt import DFvT

__all__ = ["DFvT", "build_model"]
