"""Between the workers and the model: uint8 images collated into one channels-last batch (in shared memory inside a
worker), then moved to the device, normalised (and randomly erased) there; on CUDA the next batch is prepared on a
side stream while the model works on the current one."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, get_worker_info

from errors import DataError

from .samplers import ResumableSampler
from .seeding import derive_seed, isolated_rng


def collate_uint8(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(uint8 3×H×W image, label), ...]`` -> ``(uint8 N×3×H×W batch in channels-last memory, int64 labels)``.

    Channels-last is the layout decoders and PIL produce and the model's fast path computes in, so no image is
    transposed on its way. Inside a loader worker the batch is allocated in shared memory, as the default collate
    does, so it reaches the main process without another copy.
    """
    images, labels = zip(*batch, strict=True)
    c, h, w = images[0].shape
    for image in images:
        if image.shape != (c, h, w):
            raise DataError(f"images of one batch differ in size ({tuple(image.shape)} vs {(c, h, w)})")
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(len(images) * h * w * c)
        out = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (len(images), h, w, c))
    else:
        out = torch.empty((len(images), h, w, c), dtype=torch.uint8)
    for slot, image in zip(out, images, strict=True):
        slot.copy_(image.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - mean) / std``: torchvision's ``ToTensor`` + ``Normalize`` in their
    order, so the same pixels give bit-identical inputs. ``mean`` and ``std`` broadcast over the channel axis."""
    return images.float().div_(255).sub_(mean).div_(std)


class DeviceLoader:
    """Iterate ``loader`` and yield model-ready ``(images, targets)`` on ``device``.

    uint8 image batches become ``(x / 255 - mean) / std`` in float32 — the operations of torchvision's ``ToTensor`` +
    ``Normalize`` in their order, so the same pixels give bit-identical inputs — then ``erasing`` (timm's
    ``RandomErasing``, per sample) runs on them. Float batches (the upstream pipeline, already normalised and erased
    in the workers) are only moved.

    On CUDA, batch ``i + 1`` is copied (from pinned memory, ``non_blocking``) and normalised on a side stream while
    the caller's stream computes on batch ``i``; the streams wait on each other, as timm's ``PrefetchLoader`` does.
    timm's class is not used because it always normalises (float batches too) and divides by ``255 × std`` in one
    step, which differs from the float pipeline in the last bit.

    With a ``seed``, each batch is erased under generators seeded from ``(seed, epoch, rank, batch index)``
    (:mod:`data.seeding`): the same whatever the prefetching or the batch a run continues from, and without drawing
    from the caller's generators. :meth:`set_epoch` positions the next pass (epoch, first batch).
    """

    def __init__(
        self,
        loader: DataLoader,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        erasing: RandomErasing | None = None,
        seed: int | None = None,
        rank: int = 0,
    ) -> None:
        self.loader, self.device, self.erasing = loader, torch.device(device), erasing
        self.seed, self.rank, self.epoch, self.first_batch = seed, rank, 0, 0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self._stream = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next pass is ``epoch`` (the sampler's and the dataset's too) and starts at batch ``first_batch``."""
        sampler, dataset = self.loader.sampler, self.loader.dataset
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(epoch, first_batch * (self.loader.batch_size or 1))
        elif first_batch:
            raise ValueError("only a ResumableSampler can start an epoch part-way")
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if hasattr(self.loader, "set_epoch"):  # a DALI loader seeds its pipeline by epoch
            self.loader.set_epoch(epoch)
        self.epoch, self.first_batch = epoch, first_batch

    def prepare(self, images: torch.Tensor, targets: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Host batch number ``index`` of the epoch -> the model's input on the device."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize_uint8(images, self.mean, self.std)
            if self.erasing is not None:
                if self.seed is None:
                    images = self.erasing(images)
                else:
                    with isolated_rng(derive_seed(self.seed, self.epoch, self.rank, index), self.device):
                        images = self.erasing(images)
        return images, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for index, (images, targets) in enumerate(self.loader, start=self.first_batch):
                yield self.prepare(images, targets, index)
            return
        if self._stream is None:  # one stream for the loader's life: the allocator caches blocks per stream
            self._stream = torch.cuda.Stream(device=self.device)
        consumer = torch.cuda.current_stream(self.device)
        pending = None
        for index, (images, targets) in enumerate(self.loader, start=self.first_batch):
            # Memory the consumer freed may be reused below: let its queued work finish before writing into it.
            self._stream.wait_stream(consumer)
            with torch.cuda.stream(self._stream):
                for tensor in (images, targets):
                    if tensor.is_cuda:  # made on the consumer's stream (DALI): not reused until read here
                        tensor.record_stream(self._stream)
                ready = self.prepare(images, targets, index)
            if pending is not None:
                yield pending
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self._stream)
            pending = ready
        if pending is not None:
            yield pending

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, erasing={self.erasing is not None}, {len(self)} batches)"
