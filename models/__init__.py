"""DFvT models: ``build_model(config)`` builds the configured variant."""

from .build import build_model
from .dfvt import DFvT

__all__ = ["DFvT", "build_model"]
