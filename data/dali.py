"""``DATA.LOADER dali``: NVIDIA DALI decodes and augments the images — on the GPU (``device="mixed"``: the hardware
JPEG decoder where there is one) or, without a GPU, on the CPU — and hands uint8 ``N x 3 x H x W`` batches to
:class:`data.device.DeviceLoader`, which normalises and randomly erases them on the device as for the torch loader.

The order of the images is the torch loader's own: each epoch's batches are cut from the same samplers
(``DistributedSampler`` shuffled by ``SEED + epoch``, sharded by rank, ``drop_last`` for training; every validation
image exactly once across processes), and a run continued mid-epoch starts at the same batch. The files are read in
Python (cheap) and decoded by DALI; a new DALI pipeline, seeded from ``(SEED, epoch, rank)``, runs each epoch.
The augmentation is DALI's, not bit-for-bit timm's (see the README's list of differences).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
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
            import nvidia.dali.auto_aug.rand_augment  # noqa: F401 (loaded here, used by the training pipeline)
            import nvidia.dali.fn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"DATA.LOADER dali needs NVIDIA DALI, which is not installed ({e}); install it with `{INSTALL}`, or set "
            f"DATA.LOADER torch."
        ) from e
    return nvidia.dali


def rand_augment_settings(policy: str) -> tuple[int, int] | None:
    """``(n, m)`` of a timm ``rand-...`` policy (``rand-m9-mstd0.5-inc1``: 2 ops of magnitude 9), None for ``none``;
    other policy families have no DALI counterpart here (a :class:`ConfigError`)."""
    text = policy.strip().lower()
    if text in ("", "none"):
        return None
    parts = text.split("-")
    if parts[0] != "rand":
        raise ConfigError(
            f"AUG.AUTO_AUGMENT {policy!r}: DATA.LOADER dali runs RandAugment (rand-...) only; use a rand- policy, "
            f"none, or DATA.LOADER torch."
        )
    n, m = 2, 10
    for part in parts[1:]:
        if match := re.fullmatch(r"([a-z]+)([\d.]+)", part):
            if match[1] == "m":
                m = int(float(match[2]))
            elif match[1] == "n":
                n = int(match[2])
    return n, m


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
    from nvidia.dali.auto_aug import rand_augment

    size = config.DATA.IMG_SIZE
    on_gpu = device.type == "cuda"
    decoder = "mixed" if on_gpu else "cpu"
    cubic = types.INTERP_CUBIC if config.DATA.INTERPOLATION == "bicubic" else types.INTERP_LINEAR
    augment = rand_augment_settings(config.AUG.AUTO_AUGMENT) if train else None
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
                    images = rand_augment.rand_augment(images, n=augment[0], m=augment[1], shape=[size, size])
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
