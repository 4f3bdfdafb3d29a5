"""``DATA.SKIP_UNREADABLE``: a training image that cannot be read is replaced by the next readable one of the same
shard, the unreadable files are collected from the loader workers for the log, and a run stops when more than 1 % of
an epoch's images are unreadable.

Wiring (one :class:`SkipUnreadable` per process, around the training dataset only)::

    skip = SkipUnreadable(ds_train, shard_indices=None)   # or range(rank, n, world) with the ``part`` zip cache
    ds_train = SeededSamples(skip, seed)                  # if per-image seeding is used: outside, so the
                                                          # replacement is augmented with the drawn image's seed
    ... build the sampler and the DataLoader over ds_train as before ...
    for epoch in ...:
        train_one_epoch(...)                              # the loader's iterator ends: its workers have exited
        skipped = skip.drain()                            # [UnreadableImage(index, message)], this process's
        for item in skipped: logger.warning(...)          # one line per file: item.message names it
        count = all-reduce sum of len(skipped)            # images = all-reduce sum of the images the epoch
        check_unreadable(count, images)                   # fetched from its first step: steps x batch per rank;
    skip.close()                                          # DataError (one line) past 1 %, on every rank alike;
                                                          # close is optional (the folder goes at exit anyway)

The sampler's shard is not needed: every process can read every image, and the default order ``i + 1, i + 2, ...``
(wrapping round) keeps the replacement independent of the epoch's shuffle (``DistributedSampler`` draws a new shard
each epoch). With ``DATA.CACHE_MODE part`` pass ``range(rank, len(dataset), world)``, the indices this process holds
in memory, so a replacement is not read from the zip. A rank counts the unreadable images it met, drawn or tried in
place of one; summed over ranks, a file two ranks met (the unreadable neighbour of another) counts once per rank.

Exact resume: the replacement of image ``i`` depends only on ``i`` and on which files are unreadable, and it is drawn
with the random state image ``i``'s own attempt left (a failed candidate's draws are undone), whatever this process met
before, so an epoch replayed from its start or continued from the middle yields the same samples. The wrapper itself
holds no state a checkpoint needs; what an epoch met before a mid-epoch checkpoint is the engine's to keep (its
``EpochProgress.unreadable``), so the epoch's report and its 1 % rule cover the whole epoch after a resume.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from errors import DataError

MAX_UNREADABLE_PERCENT = 1
RECORD = ".rec"


class UnreadableImage(NamedTuple):
    """An image that could not be read: its dataset index and the :class:`DataError` message naming the file."""

    index: int
    message: str


def too_many_unreadable(count: int, images: int) -> bool:
    """Whether ``count`` unreadable images are more than 1 % of ``images``."""
    return count * 100 > images * MAX_UNREADABLE_PERCENT


def check_unreadable(count: int, epoch_images: int) -> None:
    """Raise :class:`DataError` (one line) when ``count`` unreadable images are more than 1 % of the ``epoch_images``
    an epoch drew (sum both over the processes first, so every rank stops alike)."""
    if not too_many_unreadable(count, epoch_images):
        return
    share = 100 * count / epoch_images if epoch_images > 0 else 100.0
    raise DataError(
        f"{count} of {epoch_images} training images ({share:.2f} %) were unreadable this epoch, more than the "
        f"{MAX_UNREADABLE_PERCENT} % DATA.SKIP_UNREADABLE skips; fix or remove them (the log names each one)."
    )


def _rng_state() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def _remove_folder(folder: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker's copy
        shutil.rmtree(folder, ignore_errors=True)


class SkipUnreadable(Dataset):
    """``dataset[i]``, or, when that raises :class:`DataError`, the next index after ``i`` whose image can be read.

    The candidates follow ``shard_indices`` from ``i``'s place on, wrapping round (an ``i`` outside the shard, and
    every ``i`` when ``shard_indices`` is None, follows ``i + 1, i + 2, ...`` modulo ``len(dataset)``). Only
    :class:`DataError` is skipped; any other error propagates.

    Each unreadable image is noted once per process (until :meth:`drain`) as a small file in a private folder made
    at construction (under ``folder``, default the temporary directory), so the notes of loader workers, forked or
    spawned, reach :meth:`drain` in the main process even when the workers have exited. A failed read also costs
    nothing the second time in a process: the process remembers it and does not read the file again as a candidate.
    (Loader workers must be fresh each epoch, ``persistent_workers`` False, for each epoch to note its images.)

    A search that meets more than 1 % of ``len(dataset)`` unreadable images in a row raises :class:`DataError` at
    once (the epoch's 1 % rule would stop the run anyway), so an unmounted or wrong folder fails fast.

    Other attributes (``samples``, ``classes``, ``set_epoch``, ...) are the wrapped dataset's.
    """

    def __init__(
        self,
        dataset: Dataset,
        shard_indices: Iterable[int] | None = None,
        folder: str | os.PathLike | None = None,
    ) -> None:
        self.dataset = dataset
        n = len(dataset)
        self._order: np.ndarray | None = None
        if shard_indices is not None:
            order = np.asarray(list(shard_indices), dtype=np.int64)
            if order.size and (order.min() < 0 or order.max() >= n):
                raise ValueError(f"shard_indices must lie in [0, {n}), the dataset's indices")
            self._sorted = np.argsort(order, kind="stable")
            self._keys = order[self._sorted]
            if np.any(self._keys[1:] == self._keys[:-1]):
                raise ValueError("shard_indices must not repeat an index")
            self._order = order
        self.folder = tempfile.mkdtemp(prefix="dfvt-unreadable-", dir=folder)
        self._finalizer = weakref.finalize(self, _remove_folder, self.folder, os.getpid())
        self._pid, self._known = os.getpid(), {}

    # ------------------------------------------------------------------------------------------- the dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DataError as err:
            first = self._note(index, str(err))
        n, met = len(self.dataset), 1
        for candidate in self._candidates(index):
            if candidate not in self._known_here():
                state = _rng_state()
                try:
                    return self.dataset[candidate]
                except DataError as err:
                    self._note(candidate, str(err))
                    _set_rng_state(state)  # as if the candidate had not been tried: no history in the draws
            met += 1
            if too_many_unreadable(met, n):
                raise DataError(
                    f"{met} training images in a row are unreadable, more than the {MAX_UNREADABLE_PERCENT} % of "
                    f"the {n} that DATA.SKIP_UNREADABLE skips; fix or remove them, starting with: {first}"
                )
        raise DataError(
            f"all {met} images this process may use in place of an unreadable one are unreadable; fix or remove them, "
            f"starting with: {first}"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:  # copying and unpickling look before __init__
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_finalizer", None)  # the folder belongs to the process that made it
        state["_known"], state["_pid"] = {}, None
        return state

    def _candidates(self, index: int) -> Iterator[int]:
        """The indices tried in place of ``index``, in order."""
        if self._order is not None:
            at = int(np.searchsorted(self._keys, index))
            if at < len(self._keys) and self._keys[at] == index:
                place, size = int(self._sorted[at]), len(self._order)
                return (int(self._order[(place + k) % size]) for k in range(1, size))
        n = len(self.dataset)
        return ((index + k) % n for k in range(1, n))

    # ------------------------------------------------------------------------------------------- the notes

    def _known_here(self) -> dict[int, str]:
        """This process's unreadable images (a forked worker starts afresh)."""
        if self._pid != os.getpid():
            self._pid, self._known = os.getpid(), {}
        return self._known

    def _note(self, index: int, message: str) -> str:
        """Remember ``index`` as unreadable and, the first time in this process, write its note; returns the message."""
        known = self._known_here()
        if index in known:
            return known[index]
        message = " ".join(message.split("\n"))
        try:
            os.makedirs(self.folder, exist_ok=True)  # in case a temp cleaner removed it
            fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{index}\t{message}\n")
            os.replace(path, path[: -len(".tmp")] + RECORD)  # whole, or not there: drain never reads half a note
        except OSError as e:
            raise DataError(
                f"cannot note the unreadable image ({message}) in {self.folder}: {e}; free space there or point "
                f"TMPDIR at a writable folder."
            ) from e
        known[index] = message
        return message

    def drain(self) -> list[UnreadableImage]:
        """The unreadable images met since the last call (in this process and its loader workers), once each, by index.

        Call it once after each epoch's loader iteration has ended (its workers have exited, so every note is written);
        a note written later is returned by the next call. It also lets this process note each image again, so every
        epoch names its unreadable images even without loader workers.
        """
        found: dict[int, str] = {}
        try:
            names = sorted(name for name in os.listdir(self.folder) if name.endswith(RECORD))
        except FileNotFoundError:
            names = []
        for name in names:
            path = os.path.join(self.folder, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            os.remove(path)
            for line in text.splitlines():
                index, _, message = line.partition("\t")
                found.setdefault(int(index), message)
        self._known_here().clear()
        return [UnreadableImage(index, found[index]) for index in sorted(found)]

    def close(self) -> None:
        """Remove the notes folder (done at exit otherwise); the wrapper should not be used after."""
        finalizer = self.__dict__.get("_finalizer")
        if finalizer is not None:
            finalizer()
