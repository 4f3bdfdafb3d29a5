"""The recipe's image transforms, in two pipelines, and Mixup/CutMix.

- upstream (``build_transform``): PIL image -> normalised float tensor: timm's ``create_transform`` for training,
  resize + centre crop for evaluation; random erasing in the transform. The released recipe, bit for bit.
- fast (``build_uint8_transform``): encoded file -> ``uint8`` ``3×H×W`` tensor: JPEGs decoded by torchvision, the
  crop box drawn by timm's own ``RandomResizedCropAndInterpolation.get_params`` (same draws), crop and resize by
  torch's vectorised uint8 resize, then timm's flip and RandAugment objects. Normalisation and random erasing run
  later on the device, on the batch (:class:`data.device.DeviceLoader`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from yacs.config import CfgNode

from config import check_config, mixing_problem
from errors import ConfigError

from .images import EncodedImage, decode_uint8, image_size

# Evaluation has no random interpolation; like upstream, "random" evaluates with bilinear.
EVAL_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "random": InterpolationMode.BILINEAR,
}


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


def _timm_train_transform(config: CfgNode, separate: bool):
    """timm's ``create_transform`` with the recipe of ``config`` (``separate``: as its three stages)."""
    aa = config.AUG.AUTO_AUGMENT
    transform = create_transform(
        input_size=config.DATA.IMG_SIZE,
        is_training=True,
        scale=tuple(config.AUG.SCALE),
        hflip=config.AUG.HFLIP,
        color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
        auto_augment=aa if aa and aa.lower() != "none" else None,
        re_prob=config.AUG.REPROB,
        re_mode=config.AUG.REMODE,
        re_count=config.AUG.RECOUNT,
        interpolation=config.DATA.INTERPOLATION,
        separate=separate,
    )
    for op in augment_ops(transform[1] if separate else transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def _eval_resize(config: CfgNode, tensors: bool = False) -> list[Callable]:
    """Resize (+ centre crop) of the evaluation split, for PIL images or (``tensors``) uint8 tensors. Both use
    torchvision's output-size and crop arithmetic; the tensor versions are ``transforms.v2``, whose uint8 resize
    is 7x faster here than ``transforms.Resize`` on a tensor (which resizes in float)."""
    size, mode = config.DATA.IMG_SIZE, EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
    t = T2 if tensors else transforms
    if config.TEST.CROP:
        return [t.Resize(eval_resize_side(config), interpolation=mode), t.CenterCrop(size)]
    return [t.Resize((size, size), interpolation=mode)]


def eval_resize_side(config: CfgNode) -> int:
    """The short side evaluation resizes to before the centre crop: ``int(IMG_SIZE / TEST.CROP_PCT)``
    (timm's ``crop_pct``; 256 for 224 at the default 0.875)."""
    return int(config.DATA.IMG_SIZE / config.TEST.CROP_PCT)


def describe_eval_transform(config: CfgNode) -> str:
    """The evaluation resize and crop in words, for the run summary."""
    check_config(config)
    size, mode = config.DATA.IMG_SIZE, EVAL_INTERPOLATION[config.DATA.INTERPOLATION].value
    if config.TEST.CROP:
        return (
            f"resize the short side to {eval_resize_side(config)} ({mode}), centre crop {size}x{size} "
            f"(TEST.CROP_PCT {config.TEST.CROP_PCT:g})"
        )
    return f"resize to {size}x{size} ({mode}, TEST.CROP False)"


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """The upstream transform of the training (``is_train``) or evaluation split: PIL RGB image -> normalised
    float tensor (random erasing included for training)."""
    check_config(config)
    if is_train:
        return _timm_train_transform(config, separate=False)
    normalize = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return transforms.Compose([*_eval_resize(config), transforms.ToTensor(), normalize])


class DecodeResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` on an encoded image, giving a uint8 tensor.

    The box comes from timm's ``get_params`` on the header's size, and the interpolation (when it is a choice) from
    ``random.choice``, in timm's order, so a seeded run draws timm's boxes. The crop is resized by torch's uint8
    antialiased resize (4.7x faster than PIL's bicubic here; within 2 levels of PIL's, on 0.3 % of pixels). When
    the box is at least twice the output size on both sides, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain first (:func:`data.images.decode_uint8`), still at least the output size: only large files gain.
    """

    def __init__(self, rrc: RandomResizedCropAndInterpolation) -> None:
        self.size, self.scale, self.ratio, self.interpolation = list(rrc.size), rrc.scale, rrc.ratio, rrc.interpolation

    def params(self, image: EncodedImage) -> tuple[tuple[int, int, int, int], InterpolationMode]:
        """The crop box ``(top, left, height, width)`` and interpolation for ``image``, drawn as timm draws them."""
        return self._draw(*image_size(image))

    def _draw(self, width: int, height: int) -> tuple[tuple[int, int, int, int], InterpolationMode]:
        box = RandomResizedCropAndInterpolation.get_params(torch.empty(0, height, width), self.scale, self.ratio)
        mode = self.interpolation
        if isinstance(mode, (tuple, list)):
            mode = random.choice(mode)
        return box, mode

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        width, height = image_size(image)
        (top, left, h, w), mode = self._draw(width, height)
        reduce = next((r for r in (8, 4, 2) if h >= r * self.size[0] and w >= r * self.size[1]), 1)
        pixels = decode_uint8(image, reduce)
        if reduce > 1:  # the box in the reduced image's pixels (its size is the original's / reduce, rounded up)
            sy, sx = pixels.shape[1] / height, pixels.shape[2] / width
            bottom, right = min(round((top + h) * sy), pixels.shape[1]), min(round((left + w) * sx), pixels.shape[2])
            top, left = round(top * sy), round(left * sx)
            h, w = bottom - top, right - left
        # Channels-last in and out: torch's uint8 resize works on interleaved pixels, and PIL takes them uncopied.
        # The decoders give interleaved memory, so the box is copied as whole rows (2.4x faster than a strided copy).
        box = pixels.permute(1, 2, 0)[top : top + h, left : left + w].contiguous()
        return TF.resize(box.permute(2, 0, 1)[None], self.size, interpolation=mode, antialias=True)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())  # interleaved memory: no copy before PIL's


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class LazyRandAugment:
    """timm's ``RandAugment`` on a uint8 tensor, drawing what timm draws in timm's order (the ops with
    ``np.random.choice``, then each op's ``random.random() > prob`` and its magnitude), but converting the image to
    PIL and back only when an op applies: with timm's p=0.5 and two ops, a quarter of the images need no conversion."""

    def __init__(self, augment: RandAugment) -> None:
        self.augment = augment
        self.applied = {}  # id(op) -> a copy with prob 1: applies without drawing again (the draw was made here)
        for op in augment.ops:
            always = copy.copy(op)
            always.prob = 1.0
            self.applied[id(op)] = always

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ra = self.augment
        ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        image = None
        for op in ops:
            if op.prob < 1.0 and random.random() > op.prob:
                continue
            image = self.applied[id(op)](_to_pil(x) if image is None else image)
        return x if image is None else _from_pil(image)


class Uint8TrainTransform:
    """Encoded image -> augmented uint8 ``3×H×W`` tensor: :class:`DecodeResizedCrop`, timm's flips (on the tensor),
    then timm's PIL augmentations (RandAugment or colour jitter) on the ``H×W`` crop (RandAugment alone through
    :class:`LazyRandAugment`)."""

    def __init__(self, crop: DecodeResizedCrop, flips: list[Callable], pil_ops: Callable | None) -> None:
        self.crop, self.flips, self.pil_ops = crop, flips, pil_ops
        steps = getattr(pil_ops, "transforms", None)
        single = steps[0] if steps is not None and len(steps) == 1 else None
        self._augment = LazyRandAugment(single) if type(single) is RandAugment else None

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        x = self.crop(image)
        for flip in self.flips:
            x = flip(x)
        if self._augment is not None:
            x = self._augment(x)
        elif self.pil_ops is not None:
            x = _from_pil(self.pil_ops(_to_pil(x)))
        return x  # 3×H×W with interleaved (channels-last) memory; collate_uint8 batches it without transposing

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop}, {self.flips}, {self.pil_ops})"


class Uint8EvalTransform:
    """Encoded image -> uint8 ``3×H×W`` tensor: decode, then the upstream resize (+ centre crop) on the tensor."""

    def __init__(self, resize: list[Callable]) -> None:
        self.resize = T2.Compose(resize)

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        return self.resize(decode_uint8(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize})"


def build_uint8_transform(is_train: bool, config: CfgNode) -> Callable[[EncodedImage], torch.Tensor]:
    """The fast pipeline's transform: encoded image -> uint8 tensor, without normalisation and random erasing
    (the device does both on the batch).

    Training keeps timm's recipe objects (flip, RandAugment with the posterize fix, or colour jitter; RandAugment's
    rotate/shear/translate resample with the filter timm gives them: ``DATA.INTERPOLATION``, or a random one of
    bilinear/bicubic per call with ``random``) and its crop draws.
    """
    check_config(config)
    if not is_train:
        return Uint8EvalTransform(_eval_resize(config, tensors=True))
    primary, secondary, _ = _timm_train_transform(config, separate=True)
    crop, *flips = primary.transforms
    if not isinstance(crop, RandomResizedCropAndInterpolation):
        raise ConfigError(f"the fast pipeline expects timm's random resized crop first, got {crop}")
    pil_ops = secondary if secondary.transforms else None
    return Uint8TrainTransform(DecodeResizedCrop(crop), flips, pil_ops)


def build_mixup(config: CfgNode, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (mixes images, returns soft smoothed targets) when Mixup or CutMix is on, else None."""
    a = config.AUG
    if not (a.MIXUP > 0 or a.CUTMIX > 0 or a.CUTMIX_MINMAX is not None):
        return None
    if problem := mixing_problem(config):  # also a training relation of config.check_config
        raise ConfigError(f"{problem}.")
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
