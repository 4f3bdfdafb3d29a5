"""The built-in demo dataset: scikit-learn's 8x8 handwritten digits written once as an ImageFolder tree."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from errors import DataError

DEFAULT_ROOT = Path("datasets") / "digits"  # under the current directory, when DATA.DATA_PATH is empty
MARKER = ".digits_complete.json"  # written last, inside the tree: its presence means the tree is complete
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def _is_complete(root: Path) -> bool:
    return (root / MARKER).is_file()


def _write_tree(dest: Path) -> dict[str, int]:
    """Write ``dest/{train,val}/<digit>/<index>.png`` (8x8 grayscale, 0..16 scaled to 0..255); return counts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(
        index, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    counts = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for label in range(10):
            (dest / split / str(label)).mkdir(parents=True)
        for i in sorted(idx.tolist()):
            Image.fromarray(pixels[i], mode="L").save(dest / split / str(digits.target[i]) / f"{i:04d}.png")
        counts[split] = len(idx)
    return counts


def prepare_digits(root: str | os.PathLike | None = None) -> Path:
    """Write the digits tree into ``root`` (default ``datasets/digits``) unless already complete; return the root.

    The tree is written to a temporary sibling folder and renamed into place, so an interrupted or concurrent
    run never leaves (or reads) a half-written dataset.
    """
    root = Path(root) if root else DEFAULT_ROOT
    if _is_complete(root):
        return root
    # (Checked in this order, a tree another process has just renamed into place is seen as complete.)
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not _is_complete(root):
        raise DataError(
            f"{root} exists but is not a complete digits dataset (no {MARKER}); delete it, or set DATA.DATA_PATH "
            f"(--data-path) to an empty or new folder for DATA.DATASET digits."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        counts = _write_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": "sklearn.datasets.load_digits", **counts}) + "\n")
        try:
            os.replace(tmp, root)  # atomic; fails if another process has already put a non-empty tree there
        except OSError:
            if not _is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
