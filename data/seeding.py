"""The input pipeline's random draws as a function of where they happen, not of what ran before.

Each training image is augmented under generators seeded from ``(SEED, epoch, image index)`` and each batch is
randomly erased on the device under ones seeded from ``(SEED, epoch, rank, batch index)``. So the augmentation of an
epoch does not depend on the number of loader workers, on prefetching, or on where a run was interrupted — a run
continued from a mid-epoch checkpoint sees exactly the images the uninterrupted run saw — and the pipeline never
draws from the main process's generators, which stay with the model (stochastic depth), Mixup and distillation.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import STOP_SIGNALS


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixed from ``parts`` (NumPy's ``SeedSequence``: nearby tuples give unrelated streams)."""
    high, low = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body with Python's, NumPy's and ``device``'s torch generator seeded from ``seed``, then put their
    states back, so the caller's streams are as if the body had not run."""
    device = torch.device(device)
    generators = [torch.default_generator] + ([_generator(device)] if device.type != "cpu" else [])
    saved = random.getstate(), np.random.get_state(), [g.get_state() for g in generators]
    random.seed(seed)
    np.random.seed(seed % 2**32)
    for g in generators:
        g.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        for g, state in zip(generators, saved[2], strict=True):
            g.set_state(state)


class SeededSamples(Dataset):
    """``dataset[i]`` drawn under generators seeded from ``(seed, epoch, i)`` (:func:`isolated_rng`).

    Call :meth:`set_epoch` before each epoch's loader iterator is created (loader workers copy the dataset then).
    Other attributes (``samples``, ``classes``, ...) are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with isolated_rng(derive_seed(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:  # copying and unpickling look before __init__
            raise AttributeError(name)
        return getattr(self.dataset, name)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader worker start-up: leave SIGINT (Ctrl-C reaches a terminal's whole process group) and SIGUSR1 (SLURM's
    warning, sent to every process of a step) to the main process, which finishes its step and saves before it stops
    the workers. SIGTERM keeps its default: it is how the loader (and Python's exit) ends a worker that is stuck."""
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
