"""Shared fixtures (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import write_image_folder


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
