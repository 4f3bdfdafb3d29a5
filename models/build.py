"""``build_model(config)``: the model a config describes, after checking the config can build it."""

from __future__ import annotations

from yacs.config import CfgNode

from config import check_config
from errors import ConfigError

from .dfvt import DFvT


def _check(config: CfgNode, num_classes: int) -> None:
    """The config's rules and relations (:func:`config.check_config`, the layout included), and the head size."""
    check_config(config)
    if num_classes < 0:
        raise ConfigError(f"MODEL.NUM_CLASSES {num_classes} must be >= 0 (0 gives pooled features).")


def build_model(config: CfgNode, num_classes: int | None = None) -> DFvT:
    """The DFvT described by ``config.MODEL`` and ``config.DATA.IMG_SIZE``, freshly initialised.

    ``num_classes`` (e.g. what the data decided, :class:`data.DataInfo`) overrides ``MODEL.NUM_CLASSES``.
    """
    num_classes = config.MODEL.NUM_CLASSES if num_classes is None else num_classes
    _check(config, num_classes)
    m = config.MODEL.DFVT
    return DFvT(
        img_size=config.DATA.IMG_SIZE,
        patch_size=m.PATCH_SIZE,
        in_chans=m.IN_CHANS,
        num_classes=num_classes,
        embed_dim=m.EMBED_DIM,
        depths=tuple(m.DEPTHS),
        num_heads=tuple(m.NUM_HEADS),
        window_size=m.WINDOW_SIZE,
        mlp_ratio=m.MLP_RATIO,
        qkv_bias=m.QKV_BIAS,
        qk_scale=m.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=m.APE,
        patch_norm=m.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        fast_path=m.FAST_PATH,
    )
