"""``DATA.LOADER dali``: NVIDIA DALI decodes and augments the images — on the GPU (``device="mixed"``: the hardware
JPEG decoder where there is one) or, without a GPU, on the CPU — and hands uint8 ``N x 3 x H x W`` batches to
:class:`data.device.DeviceLoader`, which normalises and randomly erases them on the device as for the torch loader.

The order of the images is the torch loader's own: each epoch's batches are cut from the same samplers
(``DistributedSampler`` shuffled by ``SEED + epoch``, sharded by rank, ``drop_last`` for training; every validation
image exactly once across processes), and a run continued mid-epoch starts at the same batch. The files are read in
Python (cheap) and decoded by DALI; a new DALI pipeline, seeded from ``(SEED, epoch, rank)``, runs each epoch.
RandAugment is timm's, rebuilt from DALI's auto-augment blocks; the augmentation is still not timm's bit for bit (see
the README's list of differences).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN
from torch.utils.data import Dataset, Sampler
from yacs.config import CfgNode

from errors import ConfigError, DataError

from .check import encoded_image
from .images import EncodedImage, image_size
from .seeding import derive_seed
from .transforms import eval_resize_side

INSTALL = "pip install -r requirements-dali.txt"


@contextmanager
def _without_dali_deprecations() -> Iterator[None]:
    """DALI's RandAugment module calls its own deprecated operator aliases, and DALI shows those warnings under a
    filter of its own (``simplefilter("default")``), past any ``ignore`` of ours: record them, drop the deprecation
    warnings raised inside DALI (not the user's to act on), and pass every other warning on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "nvidia.dali" in w.filename.replace("/", ".")):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def import_dali() -> Any:
    """The ``nvidia.dali`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        with _without_dali_deprecations():
            import nvidia.dali
            import nvidia.dali.auto_aug.augmentations  # noqa: F401 (loaded here, used by the training pipeline)
            import nvidia.dali.fn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"DATA.LOADER dali needs NVIDIA DALI, which is not installed ({e}); install it with `{INSTALL}`, or set "
            f"DATA.LOADER torch."
        ) from e
    return nvidia.dali


# timm's RandAugment (``timm.data.auto_augment``), rebuilt from DALI's public auto-augment blocks. timm's magnitude m
# means the fraction m / 10 of each op's range (its ``_LEVEL_DENOM``); DALI's own ``rand_augment`` would read m as a
# bin of 31 (m9: 9/30 of the range). Here a magnitude is a bin of LEVEL_STEPS per unit (m9: bin 900 of 0..1000), and
# a magnitude drawn with ``mstd`` noise lands on the nearest bin.
LEVEL_DENOM = 10  # timm's _LEVEL_DENOM
LEVEL_STEPS = 100  # magnitude bins per unit of timm's magnitude (a 0.01 grid)
FILL = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)  # timm's img_mean: (124, 116, 104)

# timm's _RAND_TRANSFORMS, in its order; with inc1 (_RAND_INCREASING_TRANSFORMS) the ops of _INCREASING get the
# "Increasing" variant, whose strength grows with the magnitude.
_RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_INCREASING = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_SIGNED = _GEOMETRIC + tuple(f"{n}Increasing" for n in _INCREASING)  # the ops whose argument timm randomly negates


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm ``rand-...`` policy: ``n`` ops an image, each drawn uniformly (with replacement) from :attr:`ops` and
    applied with probability ``p``, at magnitude ``m`` (or, with ``mstd`` > 0, a magnitude drawn per op from
    normal(m, mstd); ``inf``: uniform in [0, m]) clipped to [0, mmax or 10]; ``increasing``: timm's ``inc1``."""

    n: int = 2
    m: int = 10
    mstd: float = 0.0
    mmax: int | None = None
    increasing: bool = False
    p: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        """timm's op names for the policy (``_RAND_INCREASING_TRANSFORMS`` with inc1, else ``_RAND_TRANSFORMS``)."""
        return tuple(f"{n}Increasing" if self.increasing and n in _INCREASING else n for n in _RAND_OPS)

    @property
    def upper(self) -> int:
        """The largest magnitude (timm's ``magnitude_max or _LEVEL_DENOM``)."""
        return self.mmax or LEVEL_DENOM

    @property
    def num_bins(self) -> int:
        return self.upper * LEVEL_STEPS + 1


def rand_augment_settings(policy: str) -> RandAugmentPolicy | None:
    """The :class:`RandAugmentPolicy` of a timm ``rand-...`` string (``rand-m9-mstd0.5-inc1``: 2 ops of magnitude 9
    with noise 0.5, the increasing op set), parsed as timm's ``rand_augment_transform`` parses it; None for
    ``none``. Other policy families and timm's other op sets (``t...``) have no DALI counterpart here (a one-line
    :class:`ConfigError`)."""
    text = policy.strip().lower()
    if text in ("", "none"):
        return None
    parts = text.split("-")
    use = "use a rand- policy with timm's default op set, none, or DATA.LOADER torch"
    if parts[0] != "rand":
        raise ConfigError(f"AUG.AUTO_AUGMENT {policy!r}: DATA.LOADER dali runs RandAugment (rand-...) only; {use}.")
    fields: dict[str, Any] = {}
    for part in parts[1:]:
        if part.startswith("t"):
            raise ConfigError(
                f"AUG.AUTO_AUGMENT {policy!r}: DATA.LOADER dali runs timm's default RandAugment op sets (inc0/inc1) "
                f"only, not the {part!r} op set; {use}."
            )
        if (match := re.fullmatch(r"(\D*)(\d.*)", part)) is None:  # timm skips a section without a number
            continue
        key, value = match.groups()
        try:
            if key == "mstd":
                fields["mstd"] = float("inf") if float(value) > 100 else float(value)  # timm: > 100 means uniform
            elif key in ("m", "n", "mmax"):
                fields[key] = int(value)
            elif key == "inc":
                fields["increasing"] = bool(int(value))
            elif key == "p":
                fields["p"] = float(value)
            else:
                raise ValueError(f"unknown section {part!r}")
        except ValueError as e:
            raise ConfigError(f"AUG.AUTO_AUGMENT {policy!r}: not a timm RandAugment policy ({e}).") from None
    settings = RandAugmentPolicy(**fields)
    if not 0.0 <= settings.p <= 1.0:
        raise ConfigError(f"AUG.AUTO_AUGMENT {policy!r}: the probability p of each op must lie in [0, 1].")
    return settings


def timm_op_arg(name: str, level: float, negate: bool = False) -> float | int | None:
    """The argument timm's RandAugment op ``name`` gets at magnitude ``level`` (already clipped), computed as its
    ``_*_level_to_arg`` computes it; ``negate``: the sign timm's ``_randomly_negate`` drew (ignored by unsigned ops).
    Degrees for Rotate, the shear factor, the fraction of the side for TranslateX/YRel, the enhance factor, the bits
    Posterize keeps, Solarize's threshold, SolarizeAdd's increment; None for AutoContrast, Equalize, Invert."""
    frac = level / LEVEL_DENOM
    sign = -1 if negate and name in _SIGNED else 1
    base = name.removesuffix("Increasing")
    if name == "Rotate":
        return sign * (frac * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (frac * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (frac * 0.45)  # timm's translate_pct default
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return max(0.1, 1.0 + sign * (frac * 0.9)) if name != base else frac * 1.8 + 0.1
    if base == "Posterize":
        return 4 - int(frac * 4) if name != base else int(frac * 4)
    if base == "Solarize":
        threshold = min(256, int(frac * 256))
        return 256 - threshold if name != base else threshold
    if name == "SolarizeAdd":
        return min(128, int(frac * 110))
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    raise ValueError(f"not a timm RandAugment op: {name}")


def _affine(name: str, arg: float, height: int, width: int) -> np.ndarray:
    """The destination-to-source matrix of a geometric op, as Pillow's ``Image.transform`` data that timm passes
    (for Rotate: Pillow's ``rotate``, counter-clockwise by ``arg`` degrees about the image's centre)."""
    if name == "Rotate":
        t = math.radians(arg)
        cos, sin = math.cos(t), math.sin(t)
        cx, cy = width / 2.0, height / 2.0
        rows = [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]]
    else:
        rows = {
            "ShearX": [[1, arg, 0], [0, 1, 0]],
            "ShearY": [[1, 0, 0], [arg, 1, 0]],
            "TranslateXRel": [[1, 0, arg * width], [0, 1, 0]],
            "TranslateYRel": [[1, 0, 0], [0, 1, arg * height]],
        }[name]
    return np.array(rows, dtype=np.float32)


def _posterize_mask(bits: int) -> np.ndarray:
    """The AND mask keeping the top ``bits`` bits (0 or fewer: a black image, as timm's Pillow op gives)."""
    return np.uint8(255 if bits >= 8 else ~(2 ** (8 - bits) - 1) & 255)


def _sharpness_kernel(factor: float) -> np.ndarray:
    """Pillow's ``ImageEnhance.Sharpness``: a blend of its SMOOTH filter and the image, as one 3x3 kernel."""
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float64) / 13
    identity = np.zeros((3, 3))
    identity[1, 1] = 1
    return (factor * identity + (1 - factor) * smooth).astype(np.float32)


@functools.cache
def op_param(name: str, height: int, width: int, signed_bin: int) -> np.ndarray:
    """What DALI's op ``name`` is given at ``signed_bin`` (magnitude ``|signed_bin| / LEVEL_STEPS``; negative where
    timm's random sign drew a minus), for ``height x width`` images: timm's argument (:func:`timm_op_arg`) in the
    form the DALI op takes — a destination-to-source affine matrix, an enhance factor, a 3x3 sharpness kernel, a
    posterize mask, a threshold, an increment."""
    arg = timm_op_arg(name, abs(int(signed_bin)) / LEVEL_STEPS, negate=signed_bin < 0)
    if name in _GEOMETRIC:
        return _affine(name, arg, height, width)
    convert = {
        "Sharpness": _sharpness_kernel,
        "Posterize": _posterize_mask,
        "Solarize": np.int32,
        "SolarizeAdd": np.uint8,  # DALI adds it to uint8 pixels below 128: no overflow up to 128
    }.get(name.removesuffix("Increasing"), np.float32)
    return np.asarray(convert(arg))


@functools.cache
def _param_table(name: str, height: int, width: int, signed_bins: tuple[int, ...]) -> np.ndarray:
    return np.stack([op_param(name, height, width, signed_bin) for signed_bin in signed_bins])


def signed_bins(policy: RandAugmentPolicy) -> tuple[int, ...]:
    """The signed magnitude bins that :func:`rand_augment`'s per-image index picks from: ``(k, -k)`` for a fixed
    magnitude bin k (the index is the sign), else ``(0, -0, 1, -1, ..., top, -top)`` (the index is 2 * bin + sign)."""
    if policy.mstd == 0:
        k = min(policy.m, policy.upper) * LEVEL_STEPS
        return k, -k
    return tuple(t for k in range(policy.num_bins) for t in (k, -k))


def rand_augment_ops(policy: RandAugmentPolicy, height: int, width: int, fill=FILL, names=None) -> list:
    """DALI augmentations (``nvidia.dali.auto_aug.core.augmentation``) of ``policy.ops`` (or ``names``), in that
    order, each named as timm names it, for ``height x width`` images. Called with ``index`` (a per-image index into
    ``bins``, a tuple of signed magnitude bins: :func:`signed_bins`), an op uses the parameter timm's op gets at
    that magnitude and sign (:func:`op_param`). Rotate, shear and translate resample bilinearly with Pillow's geometry
    and fill the pixels whose source lies outside the image with the per-channel ``fill`` (timm's mean pixel);
    Sharpness keeps the one-pixel border as Pillow does; the other ops are DALI's own blocks. Pure Python (no DALI
    operator runs until the ops are called): build them once, outside the pipeline definition.

    The parameters come from a table indexed per image rather than through DALI's ``mag_range`` machinery, which
    converts a Python call per bin under AutoGraph when the pipeline is traced (seconds an epoch for 101 bins)."""
    dali = import_dali()
    fn, types = dali.fn, dali.types
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation
    from nvidia.dali.pipeline import do_not_convert

    table = do_not_convert(_param_table)  # plain Python, called while the pipeline is traced
    fill = np.array(fill, np.uint8)

    def warp(data, matrix):
        # Pillow's bilinear transform: taps clamped to the image, and the fill wherever the sampled point itself is
        # outside it. DALI's warp_affine fills with one value, so the fill is pasted where a nearest-neighbour warp
        # of an all-ones plane (filled with 0) says "outside".
        warped = fn.warp_affine(data, matrix=matrix, interp_type=types.INTERP_LINEAR, inverse_map=True)
        one = types.Constant(1, dtype=types.UINT8)
        ones = data[:, :, 0:1] * types.Constant(0, dtype=types.UINT8) + one
        inside = fn.warp_affine(ones, matrix=matrix, fill_value=0, interp_type=types.INTERP_NN, inverse_map=True)
        return warped * inside + types.Constant(fill, device=data.device) * (one - inside)

    def sharpen(data, kernel):
        # Pillow's Sharpness filters the inner pixels only and keeps the one-pixel border as it was.
        inner = fn.filter(data, kernel, mode="valid")
        middle = fn.cat(data[1:-1, 0:1], inner, data[1:-1, -1:], axis=1)
        return fn.cat(data[0:1], middle, data[-1:], axis=0)

    # The op taking timm's parameter, and where the parameters live: None for the images' device (operands of
    # arithmetic or of the filter), "cpu" for operator arguments (as DALI's own blocks keep them).
    appliers = {
        "Posterize": (a.posterize.op, None),
        "Solarize": (a.solarize.op, None),
        "SolarizeAdd": (a.solarize_add.op, None),
        "Color": (a.color.op, "cpu"),
        "Contrast": (a.contrast.op, "cpu"),
        "Brightness": (a.brightness.op, "cpu"),
        "Sharpness": (sharpen, None),
        **dict.fromkeys(_GEOMETRIC, (warp, "cpu")),
    }
    fixed = {"AutoContrast": a.auto_contrast, "Equalize": a.equalize, "Invert": a.invert}

    def make(name: str):
        if name in fixed:
            return fixed[name].augmentation(name=name)
        apply, where = appliers[name.removesuffix("Increasing")]

        def op(data, _, index, bins):
            params = types.Constant(table(name, height, width, bins), device=where or data.device)
            return apply(data, params[index])

        return augmentation(op, name=name)

    return [make(name) for name in (policy.ops if names is None else names)]


def rand_augment_draws(policy: RandAugmentPolicy, num_ops: int):
    """Per image, for each of the ``policy.n`` layers: the op's index in ``range(num_ops)`` — uniform, drawn
    independently for each layer (timm: ``np.random.choice`` with replacement), replaced by ``num_ops`` (no op) with
    probability ``1 - p`` — and the index into :func:`signed_bins`: the sign (timm's ``_randomly_negate``: minus
    with probability 1/2), plus, with magnitude noise, twice the magnitude bin (normal(m, mstd) or, for an infinite
    mstd, uniform in [0, m], clipped to [0, upper], rounded to the nearest bin)."""
    dali = import_dali()
    fn, types = dali.fn, dali.types
    from nvidia.dali import math as dmath

    shape = (policy.n,)
    op = fn.random.uniform(values=list(range(num_ops)), shape=shape, dtype=types.INT32)
    if policy.p < 1:
        applied = fn.random.coin_flip(probability=policy.p, shape=shape, dtype=types.INT32)
        op = op * applied + num_ops * (1 - applied)
    sign = fn.random.coin_flip(probability=0.5, shape=shape, dtype=types.INT32)
    if policy.mstd == 0:
        return op, sign
    if math.isinf(policy.mstd):
        level = fn.random.uniform(range=[0.0, float(policy.m)], shape=shape)
    else:
        level = fn.random.normal(mean=float(policy.m), stddev=policy.mstd, shape=shape)
    level = dmath.clamp(level, 0.0, float(policy.upper))
    return op, fn.cast(dmath.floor(level * LEVEL_STEPS + 0.5), dtype=types.INT32) * 2 + sign


def rand_augment(images, policy: RandAugmentPolicy, ops: list):
    """timm's RandAugment on a DALI batch of uint8 ``HWC`` images: ``policy.n`` layers, each applying one of ``ops``
    (:func:`rand_augment_ops`) or, with probability ``1 - p``, none. The pipeline needs ``enable_conditionals``."""
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select

    if policy.n == 0:
        return images
    op, index = rand_augment_draws(policy, len(ops))
    choices, bins = [*ops, a.identity], signed_bins(policy)
    for layer in range(policy.n):
        images = select(choices, op[layer], images, index=index[layer], bins=bins)
    return images


def _read(dataset: Dataset, index: int) -> np.ndarray:
    """The still-encoded bytes of image ``index`` (an ImageFolder file or a zip member), for DALI's decoder."""
    return np.frombuffer(encoded_image(dataset, index).data, dtype=np.uint8)


class DaliLoader:
    """Batches of one split through DALI: uint8 ``N x 3 x H x W`` images and int64 labels, on the pipeline's device.

    Args:
        dataset: the ImageFolder or zip dataset (its files and labels; its transforms are not used).
        sampler: the torch loader's sampler for this split (the order and the shard).
        batch_size, drop_last: as for a ``DataLoader``.
        build: ``build(epoch, source)`` -> a DALI pipeline reading ``source`` (an external source of batches).
        device: where the pipeline's outputs are (CUDA with ``device="mixed"``, else the CPU).
    """

    def __init__(
        self, dataset: Dataset, sampler: Sampler[int], batch_size: int, drop_last: bool, build, device: torch.device
    ) -> None:
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self._build, self.device, self.epoch = build, device, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> list[list[int]]:
        indices = list(self.sampler)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if not batches:
            return
        pipe = self._build(self.epoch, self.dataset, batches)
        with _without_dali_deprecations():
            pipe.build()
        for batch in batches:
            try:
                images, labels = pipe.run()
            except DataError:  # from the external source (an image header it could not read): already one line
                raise
            except RuntimeError as e:  # DALI's pipeline errors: a multi-line report, the cause after "encountered:"
                cause = str(e).split("encountered:")[-1].strip().splitlines()
                raise DataError(
                    f"DALI could not read a batch of images (the first: {self.dataset.samples[batch[0]][0]}): "
                    f"{cause[0] if cause else e}; find the file with main.py ... --check-data, or use DATA.LOADER torch"
                ) from e
            yield _to_torch(images, self.device), _to_torch(labels, torch.device("cpu")).view(-1).long()
        del pipe


def centre_crop_geometry(width: int, height: int, short: int, crop: int) -> tuple[int, int, int, int]:
    """``(resized height, resized width, crop top, crop left)`` of torchvision's eval resize (short side to ``short``,
    the long side ``int(short * long / short_side)``) and centre crop (``int(round((side - crop) / 2))``)."""
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    return new_h, new_w, int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))


class _Feed:
    """The external source of one epoch: each call gives the next batch's encoded files and labels and, for the
    evaluation (``geometry``: the resized short side and the crop), each image's resized size and crop corner,
    computed from its header as torchvision computes them, so both loaders cut the same pixels."""

    def __init__(self, dataset: Dataset, batches: list[list[int]], geometry: tuple[int, int] | None = None) -> None:
        self.dataset, self.batches, self.geometry = dataset, batches, geometry

    def __iter__(self) -> Iterator[tuple[np.ndarray | list[np.ndarray], ...]]:
        for batch in self.batches:
            files = [_read(self.dataset, i) for i in batch]
            labels = np.array([self.dataset.samples[i][1] for i in batch], dtype=np.int64)
            if self.geometry is None:
                yield files, labels
                continue
            sizes, corners = [], []
            for i, data in zip(batch, files, strict=True):
                width, height = image_size(EncodedImage(data.tobytes(), str(self.dataset.samples[i][0])))
                new_h, new_w, top, left = centre_crop_geometry(width, height, *self.geometry)
                sizes.append(np.array([new_h, new_w], dtype=np.float32))
                corners.append(np.array([top, left], dtype=np.float32))
            yield files, labels, sizes, corners


def _to_torch(batch: Any, device: torch.device) -> torch.Tensor:
    """A DALI batch of equal-shape samples as one torch tensor on ``device``."""
    tensor = batch.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor))


def _pipeline_factory(config: CfgNode, train: bool, device: torch.device, threads: int, rank: int):
    """``build(epoch, source)`` for the training or the evaluation pipeline of ``config``."""
    dali = import_dali()
    fn, types = dali.fn, dali.types

    size = config.DATA.IMG_SIZE
    on_gpu = device.type == "cuda"
    decoder = "mixed" if on_gpu else "cpu"
    cubic = types.INTERP_CUBIC if config.DATA.INTERPOLATION == "bicubic" else types.INTERP_LINEAR
    augment = rand_augment_settings(config.AUG.AUTO_AUGMENT) if train else None
    augment_ops = rand_augment_ops(augment, size, size) if augment is not None else []
    jitter = config.AUG.COLOR_JITTER if train and augment is None else 0.0  # timm: colour jitter without RandAugment
    scale_size = eval_resize_side(config)

    geometry = (scale_size, size) if not train and config.TEST.CROP else None

    def build(epoch: int, dataset: Dataset, batches: list[list[int]]):
        with _without_dali_deprecations():
            return _build(epoch, _Feed(dataset, batches, geometry))

    def _build(epoch: int, source: _Feed):
        seed = derive_seed(config.SEED, epoch, rank) % 2**31

        @dali.pipeline_def(
            batch_size=config.DATA.BATCH_SIZE,
            num_threads=max(1, threads),
            device_id=device.index if on_gpu else None,
            seed=seed,
            enable_conditionals=augment is not None,
            prefetch_queue_depth=2,
        )
        def pipeline():
            outputs = fn.external_source(source=source, num_outputs=4 if geometry else 2, batch=True, cycle="raise")
            files, labels = outputs[:2]
            if train:
                images = fn.decoders.image_random_crop(
                    files,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=list(config.AUG.SCALE),
                    random_aspect_ratio=[3 / 4, 4 / 3],
                    num_attempts=10,
                )
                images = fn.resize(images, resize_x=size, resize_y=size, interp_type=cubic, antialias=True)
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=config.AUG.HFLIP))
                if augment is not None:
                    images = rand_augment(images, augment, augment_ops)
                elif jitter > 0:  # torchvision's ColorJitter(j, j, j): each factor uniform in [max(0, 1 - j), 1 + j]
                    factor = [max(0.0, 1.0 - jitter), 1.0 + jitter]
                    images = fn.color_twist(
                        images,
                        brightness=fn.random.uniform(range=factor),
                        contrast=fn.random.uniform(range=factor),
                        saturation=fn.random.uniform(range=factor),
                    )
            else:
                images = fn.decoders.image(files, device=decoder, output_type=types.RGB)
                if geometry:
                    sizes, corners = outputs[2:]
                    images = fn.resize(images, size=sizes, interp_type=cubic, antialias=True)
                    images = fn.slice(
                        images,
                        corners,
                        [float(size), float(size)],
                        axis_names="HW",
                        normalized_anchor=False,
                        normalized_shape=False,
                    )
                else:
                    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=cubic, antialias=True)
            images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW, still uint8
            return images, labels

        return pipeline()

    return build


def build_dali_loaders(
    config: CfgNode, dataset: Dataset, sampler: Sampler[int], device: torch.device, threads: int, rank: int, train: bool
) -> DaliLoader:
    """The DALI loader of one split for one process (``threads``: DALI's CPU threads, ``DATA.NUM_WORKERS``
    resolved); its pipeline runs on ``device`` when that is a GPU, else on the CPU."""
    if device.type == "cuda":  # DALI's device_id: the GPU's number ("cuda" alone means the current one)
        pipe_device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    else:
        pipe_device = torch.device("cpu")
    build = _pipeline_factory(config, train, pipe_device, threads, rank)
    return DaliLoader(dataset, sampler, config.DATA.BATCH_SIZE, train, build, pipe_device)
