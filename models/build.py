"""``build_model(config)``: the model a config describes, after checking the config can build it."""

from __future__ import annotations

from yacs.config import CfgNode

from errors import ConfigError

from .dfvt import DFvT

STEM_STRIDE = 4  # two stride-2 convolutions


def _check_architecture(config: CfgNode, num_classes: int) -> None:
    """Raise :class:`ConfigError` naming the key when the architecture keys are inconsistent."""
    m = config.MODEL.DFVT
    depths, heads = list(m.DEPTHS), list(m.NUM_HEADS)
    if config.MODEL.TYPE != "dfvt":
        raise ConfigError(f"MODEL.TYPE {config.MODEL.TYPE!r} is not supported; this repo builds MODEL.TYPE dfvt.")
    if len(depths) != len(heads):
        raise ConfigError(
            f"MODEL.DFVT.DEPTHS {depths} and MODEL.DFVT.NUM_HEADS {heads} must have one entry per stage "
            f"(got {len(depths)} and {len(heads)})."
        )
    if len(depths) < 2 or any(d < 1 for d in depths):
        raise ConfigError(f"MODEL.DFVT.DEPTHS {depths} needs at least 2 stages, each with at least one block.")
    if m.PATCH_SIZE != STEM_STRIDE:
        raise ConfigError(f"MODEL.DFVT.PATCH_SIZE {m.PATCH_SIZE} is not supported: the DFvT stem down-samples by 4.")
    if m.EMBED_DIM < 16 or m.EMBED_DIM % 2:
        raise ConfigError(
            f"MODEL.DFVT.EMBED_DIM {m.EMBED_DIM} must be even and at least 16 (the DANE gate divides it by 16)."
        )
    for i, h in enumerate(heads):
        dim = m.EMBED_DIM * 2**i
        if h < 1 or dim % h:
            raise ConfigError(
                f"MODEL.DFVT.NUM_HEADS[{i}] = {h} does not divide the {dim} channels of stage {i} "
                f"(MODEL.DFVT.EMBED_DIM {m.EMBED_DIM} x 2^{i})."
            )
    if m.WINDOW_SIZE < 1:
        raise ConfigError(f"MODEL.DFVT.WINDOW_SIZE {m.WINDOW_SIZE} must be positive.")
    img = config.DATA.IMG_SIZE
    step = STEM_STRIDE * 2 ** (len(depths) - 1)
    if img <= 0 or img % step:
        raise ConfigError(
            f"DATA.IMG_SIZE {img} cannot be tiled: with {len(depths)} stages it must be a multiple of {step}."
        )
    stem = img // STEM_STRIDE
    for i in range(len(depths)):
        r = stem // 2 ** (i + 1) if i < len(depths) - 1 else stem // 2**i
        if r > m.WINDOW_SIZE and r % m.WINDOW_SIZE:
            raise ConfigError(
                f"DATA.IMG_SIZE {img} gives a {r}x{r} token grid in stage {i}, which MODEL.DFVT.WINDOW_SIZE "
                f"{m.WINDOW_SIZE} windows cannot tile; use an image size whose stage grids are multiples of the "
                f"window (e.g. 224 for window 7)."
            )
    if num_classes < 0:
        raise ConfigError(f"MODEL.NUM_CLASSES {num_classes} must be >= 0 (0 gives pooled features).")
    if not 0.0 <= config.MODEL.DROP_PATH_RATE < 1.0:
        raise ConfigError(f"MODEL.DROP_PATH_RATE {config.MODEL.DROP_PATH_RATE} must be in [0, 1).")


def build_model(config: CfgNode, num_classes: int | None = None) -> DFvT:
    """The DFvT described by ``config.MODEL`` and ``config.DATA.IMG_SIZE``, freshly initialised.

    ``num_classes`` (e.g. what the data decided, :class:`data.DataInfo`) overrides ``MODEL.NUM_CLASSES``.
    """
    num_classes = config.MODEL.NUM_CLASSES if num_classes is None else num_classes
    _check_architecture(config, num_classes)
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
