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

from .images import UNREADABLE_FIX, EncodedImage, decode_rgb_image, read_encoded, unreadable_message
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


def encoded_image(dataset: Dataset, index: int) -> EncodedImage:
    """Image ``index`` of an ImageFolder or zip dataset, still encoded (a :class:`DataError` names it if unreadable)."""
    if isinstance(dataset, ZipImageDataset):
        return dataset.encoded(index)
    return read_encoded(dataset.samples[index][0])


def _looks_complete(head: Image.Image, tail: bytes) -> bool:
    ending = _ENDINGS.get(head.format or "")
    return ending is None or ending in tail


def check_image(dataset: Dataset, index: int, full: bool) -> str | None:
    """None if image ``index`` of ``dataset`` (an ImageFolder or a zip dataset) is readable, else the one-line
    :class:`DataError` message naming it. ``full``: decode it; otherwise read its header and its last bytes, and
    decode it only when it does not end as its format should (a file cut short by a failed copy)."""
    dataset = base_dataset(dataset)
    in_place = not full and not isinstance(dataset, ZipImageDataset)  # a folder's file: header and tail only
    source = os.fspath(dataset.samples[index][0])
    try:
        image = None if in_place else encoded_image(dataset, index)
        if not full:
            if image is None:
                with open(source, "rb") as f:
                    head = Image.open(f)
                    f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL))
                    tail = f.read()
            else:
                head, tail = Image.open(io.BytesIO(image.data)), image.data[-_TAIL:]
            if _looks_complete(head, tail):
                return None
        image = image or encoded_image(dataset, index)
        decode_rgb_image(image.data, image.source).load()
    except DataError as e:
        return str(e)
    except Exception as e:  # PIL's errors, OSError
        return unreadable_message(source, e)
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
    named = " | ".join(p.removesuffix(UNREADABLE_FIX) for p in problems[:shown])  # the fix is said once, below
    return (
        f"{total_bad} of {count} {split} images under {root} are unreadable: {named}{more}; "
        f"remove or replace them (main.py ... --check-data reads and names every one)"
    )
