"""Images inside a zip archive listed by a map file (``member<TAB>label`` per line), with optional in-memory cache."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from config import CACHE_MODES
from errors import DataError

from .images import EncodedImage, decode_rgb_image


def parse_map_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``(member, label)`` pairs of a map file; blank lines are skipped, bad lines raise :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"map file {path} does not exist; zip mode needs it, one 'member<TAB>label' line per image.")
    samples: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                try:
                    label = int(parts[1]) if len(parts) == 2 and parts[0] else -1
                except ValueError:
                    label = -1
                if label < 0:
                    raise DataError(
                        f"{path} line {lineno} is malformed: {line[:200]!r}; each line must be "
                        f"'relative/path<TAB>label' with a tab and a non-negative integer label."
                    )
                samples.append((parts[0], label))
    except UnicodeDecodeError as e:
        raise DataError(f"map file {path} is not UTF-8 text ({e}); rewrite it as 'member<TAB>label' lines.") from e
    if not samples:
        raise DataError(f"map file {path} lists no images; add one 'member<TAB>label' line per image.")
    return samples


class ZipImageDataset(Dataset):
    """Image ``i`` is member ``samples[i][0]`` of ``zip_path``, decoded to RGB, with label ``samples[i][1]``.

    ``cache_mode``: ``no`` reads from the zip on each access; ``full`` reads every member's bytes up front;
    ``part`` reads only this process's shard (indices ``i % world_size == rank``). Uncached items are read
    lazily. The zip handle is opened on first use in each process, never pickled or shared across a fork.
    ``samples`` (the parsed map, from :func:`parse_map_file`) saves parsing the map again. ``decode(bytes, source)``
    turns a member's bytes into the transform's input (PIL RGB by default; ``images.EncodedImage`` for the fast
    pipeline).
    """

    def __init__(
        self,
        zip_path: str | os.PathLike,
        map_path: str | os.PathLike,
        transform: Callable | None = None,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
        samples: list[tuple[str, int]] | None = None,
        decode: Callable[[bytes, str], Any] = decode_rgb_image,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode {cache_mode!r} must be one of {CACHE_MODES}")
        self.zip_path, self.map_path = Path(zip_path), Path(map_path)
        self.transform, self.cache_mode, self.decode = transform, cache_mode, decode
        if not self.zip_path.is_file():
            raise DataError(f"zip file {self.zip_path} does not exist; zip mode reads the images from it.")
        self.samples = parse_map_file(self.map_path) if samples is None else samples
        self.targets = [label for _, label in self.samples]
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        sizes = self._check_members()
        if cache_mode == "full":
            cached: Iterable[int] = range(len(self.samples))
        elif cache_mode == "part":
            cached = range(rank, len(self.samples), world_size)
        else:
            cached = ()
        self._fill_cache(list(cached), sizes)

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{self.zip_path} is not a readable zip archive ({e}); recreate it.") from e

    def _check_members(self) -> list[int]:
        """Uncompressed size of every listed member; raises :class:`DataError` naming a member not in the zip."""
        with self._open() as zf:
            infos = {info.filename: info.file_size for info in zf.infolist()}
        sizes = []
        for member, _ in self.samples:
            if member not in infos:
                raise DataError(
                    f"{self.map_path} lists {member!r}, which is not in {self.zip_path}; map paths must be the member "
                    f"names inside the zip (see 'unzip -l {self.zip_path}'). Fix the map or the zip."
                )
            sizes.append(infos[member])
        return sizes

    def _fill_cache(self, indices: list[int], sizes: list[int]) -> None:
        """Read the bytes of ``indices`` into one contiguous buffer (fork-friendly: no per-item Python objects)."""
        self._slot = np.full(len(self.samples), -1, dtype=np.int64)
        self._offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        self._offsets[1:] = np.cumsum([sizes[i] for i in indices], dtype=np.int64)
        self._buffer = np.empty(int(self._offsets[-1]), dtype=np.uint8)
        if not indices:
            return
        with self._open() as zf:
            for slot, i in enumerate(indices):
                data = self._read_member(zf, self.samples[i][0])
                start, end = self._offsets[slot], self._offsets[slot + 1]
                self._buffer[start:end] = np.frombuffer(data, dtype=np.uint8)
                self._slot[i] = slot

    @property
    def cached_indices(self) -> list[int]:
        """Indices whose bytes are held in memory."""
        return np.flatnonzero(self._slot >= 0).tolist()

    def _read_member(self, zf: zipfile.ZipFile, member: str) -> bytes:
        try:
            return zf.read(member)
        except (zipfile.BadZipFile, OSError, KeyError) as e:
            raise DataError(f"cannot read member {member!r} of {self.zip_path} ({e}); recreate the zip.") from e

    def _zipfile(self) -> zipfile.ZipFile:
        """This process's handle on the zip (reopened after a fork)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = self._open(), os.getpid()
        return self._zip

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = state["_zip_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def encoded(self, index: int) -> EncodedImage:
        """Image ``index`` still encoded: from the cache, or read from the zip."""
        member = self.samples[index][0]
        slot = int(self._slot[index])
        if slot >= 0:
            data = self._buffer[self._offsets[slot] : self._offsets[slot + 1]].tobytes()
        else:
            data = self._read_member(self._zipfile(), member)
        return EncodedImage(data, f"{member} in {self.zip_path}")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        encoded = self.encoded(index)
        image = self.decode(encoded.data, encoded.source)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]
