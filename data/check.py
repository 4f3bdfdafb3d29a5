"""Finding unreadable images before a run needs them: the validation split before training starts (headers, and a
full decode of files that look cut short), or every image of both splits fully (``main.py --check-data``)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from errors import DataError

from .images import EncodedImage, decode_rgb_image
from .zip_dataset import ZipImageDataset

# How a complete file of these formats ends; a file that does not end so is decoded to be sure (some writers leave
# bytes after the end marker, which decoders accept).
_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL = 64


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset inside the training wrappers (per-image seeding, unreadable-image skipping)."""
    while "dataset" in vars(dataset) and not isinstance(dataset, ZipImageDataset):
        dataset = vars(dataset)["dataset"]
    return dataset


def _source(dataset: Dataset, index: int) -> tuple[str, EncodedImage | None]:
    """Where image ``index`` is, and its bytes when they come from a zip (a folder image is opened in place)."""
    if isinstance(dataset, ZipImageDataset):
        image = dataset.encoded(index)
        return image.source, image
    return os.fspath(dataset.samples[index][0]), None


def _looks_complete(head: Image.Image, tail: bytes) -> bool:
    ending = _ENDINGS.get(head.format or "")
    return ending is None or ending in tail


def check_image(dataset: Dataset, index: int, full: bool) -> str | None:
    """None if image ``index`` of ``dataset`` (an ImageFolder or a zip dataset) is readable, else the one-line
    :class:`DataError` message naming it. ``full``: decode it; otherwise read its header and its last bytes, and
    decode it only when it does not end as its format should (a file cut short by a failed copy)."""
    source, image = _source(base_dataset(dataset), index)
    try:
        if image is None:
            with open(source, "rb") as f:
                data = f.read() if full else None
                if data is None:
                    head = Image.open(f)
                    f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL))
                    tail = f.read()
                    if _looks_complete(head, tail):
                        return None
                    f.seek(0)
                    data = f.read()
            image = EncodedImage(data, source)
        elif not full:
            with Image.open(io.BytesIO(image.data)) as head:
                if _looks_complete(head, image.data[-_TAIL:]):
                    return None
        decode_rgb_image(image.data, image.source).load()
    except DataError as e:
        return str(e)
    except Exception as e:  # PIL's errors, OSError
        return f"cannot read image {source}: {e}; remove or replace the file"
    return None


def check_images(dataset: Dataset, indices: Iterable[int], full: bool) -> tuple[int, list[str]]:
    """How many of ``indices`` were checked, and the messages of the unreadable ones (:func:`check_image`)."""
    problems, count = [], 0
    for index in indices:
        count += 1
        problem = check_image(dataset, index, full)
        if problem:
            problems.append(problem)
    return count, problems


def problems_line(split: str, root: Path, count: int, problems: list[str], total_bad: int, shown: int = 3) -> str:
    """One line for a check that found ``total_bad`` unreadable images among ``count`` of ``split`` (``problems``:
    the messages this process has)."""
    more = f" (and {total_bad - min(shown, len(problems))} more)" if total_bad > min(shown, len(problems)) else ""
    return (
        f"{total_bad} of {count} {split} images under {root} are unreadable: {' | '.join(problems[:shown])}{more}; "
        f"remove or replace them (main.py ... --check-data reads and names every one)"
    )
