"""Decoding image files and bytes to RGB, with a :class:`DataError` naming the source on failure."""

from __future__ import annotations

import io
import os

from PIL import Image

from errors import DataError


def _unreadable(source: str, err: Exception) -> DataError:
    return DataError(f"cannot read image {source}: {err}; remove or replace the file")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as RGB (the ImageFolder loader); raises :class:`DataError` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise _unreadable(os.fspath(path), e) from e


def decode_rgb_image(data: bytes, source: str) -> Image.Image:
    """Encoded image ``data`` as RGB; ``source`` describes where the bytes came from, for the error message."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:
        raise _unreadable(source, e) from e
