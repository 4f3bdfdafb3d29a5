"""Reading and decoding images: to a PIL RGB image (the upstream pipeline) or to a uint8 ``3×H×W`` tensor (the fast
one), with a :class:`DataError` naming the source on failure."""

from __future__ import annotations

import io
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


UNREADABLE_FIX = "; remove or replace the file"


def unreadable_message(source: str, err: Exception) -> str:
    """The one line for an image that cannot be read: the file, why (PIL's "cannot identify image file <_io...>"
    as what it means), and the fix."""
    reason = "not an image file PIL can identify" if isinstance(err, UnidentifiedImageError) else str(err)
    return f"cannot read image {source}: {reason}{UNREADABLE_FIX}"


def _unreadable(source: str, err: Exception) -> DataError:
    return DataError(unreadable_message(source, err))


def to_rgb(img: Image.Image, source: str) -> Image.Image:
    """``img`` as 8-bit RGB, high bit depths scaled by their real range instead of clipped.

    PIL's ``convert("RGB")`` clips 16-bit greyscale (mode ``I;16``/``I``) to 255, so a 16-bit PNG turns white, and
    floating-point TIFFs (mode ``F``) in [0, 1] turn black. Here 16-bit values are scaled by 255 / 65535; floats in
    [0, 1] by 255, floats in [0, 255] are kept; other ranges (or non-finite values) raise :class:`DataError` naming
    ``source`` rather than guess.
    """

    def refuse(what: str) -> DataError:
        return DataError(f"cannot read image {source}: {what}; convert it to 8-bit (or 16-bit integer) first")

    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise refuse(f"integer pixels in [{values.min():g}, {values.max():g}], beyond 16 bits")
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise refuse("floating-point pixels that are not finite (NaN or inf)")
        low, high = values.min(), values.max()
        if low < 0 or high > 255:
            raise refuse(f"floating-point pixels in [{low:g}, {high:g}], neither [0, 1] nor [0, 255]")
        scale = 255.0 if high <= 1 else 1.0
        return Image.fromarray(np.rint(values * scale).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as RGB (the ImageFolder loader); raises :class:`DataError` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return to_rgb(Image.open(f), os.fspath(path))
    except DataError:  # already names the source (to_rgb)
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise _unreadable(os.fspath(path), e) from e


def decode_rgb_image(data: bytes, source: str) -> Image.Image:
    """Encoded image ``data`` as RGB; ``source`` describes where the bytes came from, for the error message."""
    try:
        return to_rgb(Image.open(io.BytesIO(data)), source)
    except DataError:  # already names the source (to_rgb)
        raise
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
            array = np.array(to_rgb(img, image.source))  # a writable copy
        return torch.from_numpy(array).permute(2, 0, 1)
    except DataError:  # already names the source (to_rgb)
        raise
    except Exception as e:  # torchvision raises RuntimeError on corrupt or truncated JPEGs
        raise _unreadable(image.source, e) from e
