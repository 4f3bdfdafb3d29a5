"""Training transforms (timm ``create_transform``), evaluation transforms and Mixup/CutMix from the config."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from yacs.config import CfgNode

from errors import ConfigError

# Evaluation has no random interpolation; like upstream, "random" evaluates with bilinear.
EVAL_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "random": InterpolationMode.BILINEAR,
}
EVAL_CROP_PCT = 0.875  # TEST.CROP: resize the short side to IMG_SIZE / 0.875, then centre-crop IMG_SIZE


def _check(config: CfgNode) -> None:
    if config.DATA.INTERPOLATION not in EVAL_INTERPOLATION:
        raise ConfigError(
            f"DATA.INTERPOLATION {config.DATA.INTERPOLATION!r} must be one of {sorted(EVAL_INTERPOLATION)}."
        )
    scale = tuple(config.AUG.SCALE)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"AUG.SCALE {scale} must be (min, max) area fractions with 0 < min <= max <= 1.")
    if not 0 <= config.AUG.HFLIP <= 1:
        raise ConfigError(f"AUG.HFLIP {config.AUG.HFLIP} must be a probability in [0, 1].")


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel; 0 (or fewer) bits give a black image.

    timm's RandAugment asks for 0 bits at its top magnitude (``inc1`` at level 10, which ``mstd0.5`` around
    ``m9`` reaches in ~2 % of draws: ~0.15 % of images, one batch of 128 in six). Pillow before 13 returned
    black, as the recipe expects; Pillow 13 raises ``ValueError``, which would stop training in its first batches.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def augment_ops(transform: Callable) -> Iterator[AugmentOp]:
    """The timm augmentation ops inside a (composed) transform."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, (RandAugment, AugMixAugment)):
            yield from t.ops
        elif isinstance(t, AutoAugment):
            yield from (op for sub_policy in t.policy for op in sub_policy)


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """The image transform of the training (``is_train``) or evaluation split: PIL RGB image -> normalised tensor."""
    _check(config)
    size, interp = config.DATA.IMG_SIZE, config.DATA.INTERPOLATION
    if is_train:
        aa = config.AUG.AUTO_AUGMENT
        transform = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=aa if aa and aa.lower() != "none" else None,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=interp,
        )
        for op in augment_ops(transform):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
        return transform
    mode = EVAL_INTERPOLATION[interp]
    if config.TEST.CROP:
        resize = [transforms.Resize(int(size / EVAL_CROP_PCT), interpolation=mode), transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=mode)]
    return transforms.Compose(
        [*resize, transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    )


def build_mixup(config: CfgNode, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (mixes images, returns soft smoothed targets) when Mixup or CutMix is on, else None."""
    a = config.AUG
    if not (a.MIXUP > 0 or a.CUTMIX > 0 or a.CUTMIX_MINMAX is not None):
        return None
    if a.MIXUP_MODE not in ("batch", "pair", "elem"):
        raise ConfigError(f"AUG.MIXUP_MODE {a.MIXUP_MODE!r} must be batch, pair or elem.")
    if config.DATA.BATCH_SIZE % 2:
        raise ConfigError(
            f"Mixup/CutMix mixes each batch with its reverse, so DATA.BATCH_SIZE ({config.DATA.BATCH_SIZE}) must be "
            f"even; change --batch-size or turn AUG.MIXUP and AUG.CUTMIX off."
        )
    return Mixup(
        mixup_alpha=a.MIXUP,
        cutmix_alpha=a.CUTMIX,
        cutmix_minmax=tuple(a.CUTMIX_MINMAX) if a.CUTMIX_MINMAX is not None else None,
        prob=a.MIXUP_PROB,
        switch_prob=a.MIXUP_SWITCH_PROB,
        mode=a.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=num_classes,
    )
