"""Shared fixtures: tiny ImageFolder trees of real JPEG files, and their zip-mode version."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("a", "b", "c"),
    n_train: int = 4,
    n_val: int = 3,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<class>/<i>.jpg`` random-noise RGB JPEGs of ``size`` (width, height); return root."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def write_zip_dataset(folder: Path, dest: Path) -> Path:
    """The zip-mode version of an ImageFolder tree: ``{split}.zip`` + ``{split}_map.txt`` (member<TAB>label)."""
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        classes = sorted(p.name for p in (folder / split).iterdir())
        lines = []
        with zipfile.ZipFile(dest / f"{split}.zip", "w") as zf:
            for label, name in enumerate(classes):
                for img in sorted((folder / split / name).iterdir()):
                    member = f"{name}/{img.name}"
                    zf.write(img, member)
                    lines.append(f"{member}\t{label}\n")
        (dest / f"{split}_map.txt").write_text("".join(lines))
    return dest


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """A factory: ``make_image_folder(name="data", **kwargs)`` writes a tree under tmp_path (see write_image_folder)."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def image_folder(make_image_folder: Callable[..., Path]) -> Path:
    """An ImageFolder root: 3 classes (a, b, c), 4 train and 3 val 40x48 RGB JPEGs each."""
    return make_image_folder()
