"""Reading and decoding images: to a PIL RGB image (the upstream pipeline) or to a uint8 ``3×H×W`` tensor (the fast
one), with a :class:`DataError` naming the source on failure."""

from __future__ import annotations

import io
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from errors import DataError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision deprecates its codecs in 0.29 (for TorchCodec); PIL decodes everything then
    decode_jpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImage(NamedTuple):
    """An image file's bytes, still encoded, and where they came from (for error messages)."""

    data: bytes
    source: str


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


def read_encoded(path: str | os.PathLike) -> EncodedImage:
    """The bytes of the file at ``path``, undecoded (the fast pipeline's ImageFolder loader)."""
    try:
        with open(path, "rb") as f:
            return EncodedImage(f.read(), os.fspath(path))
    except OSError as e:
        raise _unreadable(os.fspath(path), e) from e


def image_size(image: EncodedImage) -> tuple[int, int]:
    """``(width, height)`` from the file's header alone (PIL reads no pixels for this)."""
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            return img.size
    except Exception as e:
        raise _unreadable(image.source, e) from e


def decode_uint8(image: EncodedImage, reduce: int = 1) -> torch.Tensor:
    """The image as an RGB ``uint8`` tensor of shape ``(3, H, W)``; with ``reduce`` 2, 4 or 8, a JPEG is decoded at
    about ``1/reduce`` of its size by libjpeg's DCT-domain scaling (PIL's ``draft``), 1.3-1.9x faster than a full
    decode of a large file (other formats ignore ``reduce``).

    JPEGs are decoded by torchvision's libjpeg-turbo (1.5x faster than PIL here, bit-identical pixels for RGB,
    greyscale and CMYK files); every other format goes through PIL's ``convert("RGB")``, as in the upstream pipeline.
    torchvision 0.29 marks its decoders deprecated (in favour of TorchCodec, which needs FFmpeg); requirements.txt
    pins 0.29.1, its deprecation warning is silenced here, and without ``decode_jpeg`` PIL decodes JPEGs too.
    """
    try:
        if reduce > 1 and image.data[:3] == JPEG_MAGIC:
            with Image.open(io.BytesIO(image.data)) as img:
                width, height = img.size
                img.draft("RGB", (-(-width // reduce), -(-height // reduce)))
                array = np.array(img.convert("RGB"))
            return torch.from_numpy(array).permute(2, 0, 1)
        if decode_jpeg is not None and image.data[:3] == JPEG_MAGIC:
            encoded = torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(image.data)) as img:
            array = np.array(img.convert("RGB"))  # a writable copy
        return torch.from_numpy(array).permute(2, 0, 1)
    except Exception as e:  # torchvision raises RuntimeError on corrupt or truncated JPEGs
        raise _unreadable(image.source, e) from e
