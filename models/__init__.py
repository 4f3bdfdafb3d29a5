"""DFvT models: ``build_model(config)`` builds the configured variant; importing the package registers
``dfvt_tiny``, ``dfvt_small`` and ``dfvt_base`` with timm."""

from . import registry  # noqa: F401  (registers the variants with timm)
from .build import build_model
from .dfvt import DFvT
from .variants import VARIANTS
from .weights import load_checkpoint_model, load_model_weights, load_pretrained

__all__ = ["DFvT", "VARIANTS", "build_model", "load_checkpoint_model", "load_model_weights", "load_pretrained"]
