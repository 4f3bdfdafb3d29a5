"""Checkpoint files: atomic saving, safe loading, and restoring a run's state from them."""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that a crash at any moment leaves the old file or the new one, never a torn one.

    Writes a temporary file in the same folder, flushes and fsyncs it, renames it over ``path``
    and fsyncs the folder so the rename itself is durable.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_file(path: str) -> Any:
    """Read a checkpoint file on the CPU without executing pickled code (``weights_only``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path given to --resume/--pretrained.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({reason}); the file is truncated, corrupt or not a PyTorch "
            f"checkpoint: use another checkpoint."
        ) from e
