"""The ImageNet folder layout (``<root>/<split>/<class>/<image>``): checks with readable errors, then ImageFolder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from errors import DataError

from .images import load_rgb_image

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` (searched recursively, like ImageFolder) holds a file with an image extension."""
    pending = [folder]
    while pending:  # stops at the first image instead of listing whole folders
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    return True
    return False


def check_split_folder(root: Path, split: str) -> list[str]:
    """The sorted class names of ``root/split``; raises :class:`DataError` if the folder or a class is unusable."""
    split_dir = root / split
    if not split_dir.is_dir():
        hint = " (zip files found: add --zip, i.e. DATA.ZIP_MODE True)" if (root / f"{split}.zip").is_file() else ""
        raise DataError(
            f"data path {root} has no '{split}' folder ({split_dir} is missing){hint}; "
            f"expected the ImageNet layout {LAYOUT}."
        )
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(
            f"{split_dir} holds no class folders; put each class's images in its own sub-folder ({LAYOUT})."
        )
    for name in classes:
        if not _has_image(split_dir / name):
            raise DataError(
                f"class folder {split_dir / name} has no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                f"add images or remove the folder."
            )
    return classes


def check_same_classes(root: Path, train: list[str], val: list[str]) -> None:
    """Raise :class:`DataError` naming the classes found in only one of the train and val folders."""
    if train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    raise DataError(
        f"{root / 'train'} and {root / 'val'} must hold the same class folders; only in train: {only_train or 'none'}, "
        f"only in val: {only_val or 'none'}. Add or remove class folders so both splits match."
    )


class MappedImageFolder(ImageFolder):
    """``ImageFolder`` whose class folders get the labels ``class_to_idx`` gives (a class map) instead of their sorted
    positions; the samples keep ImageFolder's order (by folder name, then file name)."""

    def __init__(
        self, root: str, class_to_idx: dict[str, int], transform: Callable | None, loader: Callable[[str], Any]
    ) -> None:
        self._class_to_idx = dict(class_to_idx)
        super().__init__(root, transform=transform, loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class names ordered by label, and the labels of the map."""
        return sorted(self._class_to_idx, key=lambda name: (self._class_to_idx[name], name)), dict(self._class_to_idx)


def build_image_folder(
    root: Path,
    split: str,
    transform: Callable | None,
    loader: Callable[[str], Any] = load_rgb_image,
    class_to_idx: dict[str, int] | None = None,
) -> ImageFolder:
    """``ImageFolder`` over ``root/split`` (run :func:`check_split_folder` first); ``loader`` reads one file (PIL RGB
    by default; ``images.read_encoded`` for the fast pipeline); ``class_to_idx`` labels the class folders (default:
    their sorted positions, as ImageFolder does)."""
    if class_to_idx is None:
        return ImageFolder(str(root / split), transform=transform, loader=loader)
    return MappedImageFolder(str(root / split), class_to_idx, transform, loader)
