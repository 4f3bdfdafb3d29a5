"""Checkpoint files: atomic saving and copying, safe reading (ours and the upstream format), the newest resumable file
of a run and the retention of older ones, and the random-generator states a checkpoint carries. Nothing here knows
the model (``models.weights`` loads weights into one)."""

from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch

from errors import CheckpointError
from utils import strip_wrapper_prefixes

CHECKPOINT_PATTERN = re.compile(r"ckpt_epoch_(\d+)\.pth$")


# ----------------------------------------------------------------------------------------------- saving


def _fsync_folder(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` so that a crash at any moment leaves the old ``path`` or the new one, never a torn one.

    Writes a temporary file in the same folder, flushes and fsyncs it, renames it over ``path``
    and fsyncs the folder so the rename itself is durable.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(source: str, path: str) -> None:
    """``path`` becomes a complete copy of the finished file ``source``, atomically: a hard link when the
    filesystem allows (no bytes written), else a byte copy through :func:`atomic_write`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}.{os.getpid()}.link")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        with open(source, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f))
        return
    _fsync_folder(folder)


RECOVERY_FILE = "ckpt_recovery.pth"  # the mid-epoch checkpoint (SAVE_STEPS, signals); only the newest is kept


def epoch_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``ckpt_epoch_<N>.pth`` in ``folder``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(folder, "ckpt_epoch_*.pth")):
        match = CHECKPOINT_PATTERN.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` epoch checkpoints of ``folder`` (``keep`` 0: delete none); returns the
    deleted paths. Call it only once the newest checkpoint is complete on disk."""
    if keep <= 0:
        return []
    old = [path for _, path in epoch_checkpoints(folder)[:-keep]]
    for path in old:
        os.unlink(path)
    return old


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- reading

# Globals an upstream checkpoint may name: tensor rebuilding, plain containers and yacs configs. Nothing else
# is ever imported or called while reading a file.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    ("yacs.config", "CfgNode"),
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the allow-listed globals and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load`` for files ``weights_only`` cannot read."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_file(path: str) -> Any:
    """Read a checkpoint on the CPU without ever running pickled code.

    Files of this repo load with ``weights_only=True``; upstream files (a pickled yacs ``CfgNode``
    as ``config``) go through a restricted unpickler that admits only tensors, containers and
    ``CfgNode``. Anything else raises :class:`CheckpointError` naming the file and the problem.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path given to --resume/--pretrained.")
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path} is not a file; pass the .pth file itself.")
    corrupt = (
        f"Checkpoint {path} cannot be read: the file is truncated, corrupt or not a PyTorch checkpoint "
        f"(a failed copy or download?); use another copy."
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        if not zipfile.is_zipfile(path) and "Weights only load failed" not in str(first):
            raise CheckpointError(f"{corrupt} ({_first_line(first)})") from first
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{corrupt} ({_first_line(e)})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except pickle.UnpicklingError as e:
        match = re.search(r"refused global (\S+)", str(e))
        if match:
            raise CheckpointError(
                f"Checkpoint {path} was refused: its pickle asks for {match.group(1)}, which is not a tensor, "
                f"container or config, so it could run code; nothing from it was executed. Load only checkpoints "
                f"from sources you trust."
            ) from e
        raise CheckpointError(f"{corrupt} ({_first_line(e)})") from e
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{corrupt} ({_first_line(e)})") from e


def model_state_of(ckpt: Any, path: str, key: str = "model") -> dict[str, torch.Tensor]:
    """The model ``state_dict`` inside a checkpoint (``ckpt[key]``: ``model``, or ``model_ema`` for the weight
    average) or a raw state_dict file."""
    if key != "model":
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict)):
            raise CheckpointError(
                f"Checkpoint {path} has no {key!r} weights (was it trained with TRAIN.EMA.ENABLE?); "
                f"drop TEST.USE_EMA to use its model weights."
            )
        return {strip_wrapper_prefixes(k): v for k, v in ckpt[key].items()}
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"Checkpoint {path} holds no model weights (expected a 'model' state_dict or a raw state_dict); "
            f"pass a DFvT checkpoint."
        )
    # Weights saved from a DistributedDataParallel or compiled wrapper carry name prefixes.
    return {strip_wrapper_prefixes(k): v for k, v in state.items()}


def resume_position(ckpt: dict) -> tuple[int, int]:
    """How far a training checkpoint is: (epoch to run next, optimizer steps of it already done)."""
    position = ckpt.get("position")
    if isinstance(position, dict) and position.get("epoch") == int(ckpt["epoch"]) + 1:
        return int(position["epoch"]), int(position.get("step", 0))
    return int(ckpt["epoch"]) + 1, 0


def find_resumable(folder: str, logger: logging.Logger) -> tuple[str, Any] | None:
    """The checkpoint of ``folder`` furthest into training that loads, with its contents: the newest
    ``ckpt_epoch_<N>.pth``, or the mid-epoch recovery checkpoint (:data:`RECOVERY_FILE`) when it is further.
    Broken files are skipped with a warning."""
    found = []
    recovery = os.path.join(folder, RECOVERY_FILE)
    candidates = ([recovery] if os.path.isfile(recovery) else []) + [p for _, p in reversed(epoch_checkpoints(folder))]
    for path in candidates:
        try:
            ckpt = load_file(path)
        except CheckpointError as e:
            logger.warning(f"auto-resume: skipping {path}: {e}")
            continue
        if not (isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt):
            logger.warning(f"auto-resume: skipping {path}: it holds no training state")
            continue
        found.append((resume_position(ckpt), path, ckpt))
        if path != recovery:
            break  # the newest loadable epoch checkpoint; older ones are behind it
    if not found:
        return None
    _, path, ckpt = max(found, key=lambda item: item[0])
    return path, ckpt
