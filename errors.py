"""The errors a user can meet. Each message names the input (key, file or folder), what is wrong and the fix;
the entry points print it as one line, without a traceback, and exit with status 2."""

from __future__ import annotations

import re

# How torch re-raises an error from a DataLoader worker (or its pin-memory thread) in the main process:
# ``type(exc)(f"Caught {name} {where}.\nOriginal {traceback}")``, the traceback ending in ``module.Name: message``.
_CAUGHT = re.compile(r"Caught (\w+) in [^\n]*\.\nOriginal (.*)\Z", re.S)


def _worker_message(name: str, text: str) -> str | None:
    """The original message inside torch's re-raise ``text`` of a ``name`` error, or None if ``text`` is not one."""
    caught = _CAUGHT.match(text)
    if caught is None or caught.group(1) != name:
        return None
    report = caught.group(2)
    # The error's own line is the last one that starts with its name (a chained cause's lines come before it).
    heads = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}(?:: |\n|\Z)", report, re.M))
    if not heads:
        return None
    return report[heads[-1].end() :].strip("\n")


class DFvTError(Exception):
    """Base of the user-facing errors (one readable message, no traceback).

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's whole traceback as its
    message; the error then keeps only its original one-line message, the traceback in ``worker_traceback``.
    """

    worker_traceback: str | None = None

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            message = _worker_message(type(self).__name__, args[0])
            if message is not None:
                self.worker_traceback = args[0]
                args = (message,)
        super().__init__(*args)


class ConfigError(DFvTError, ValueError):
    """A config file, key or value that cannot be used; the message says which and how to fix it."""


class DataError(DFvTError, ValueError):
    """Data that cannot be used; the message names the path, what is wrong and how to fix it.

    It takes a single message argument, so a DataLoader worker can re-raise it in the main process.
    """


class CheckpointError(DFvTError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


class RunFolderBusyError(DFvTError, RuntimeError):
    """Another run holds the output folder; the message names the folder and the process holding it."""


class NonFiniteLossError(DFvTError, FloatingPointError):
    """The training loss became NaN or infinite; the message names where, and the last good checkpoint."""


class RunStopped(DFvTError):
    """A signal stopped training after a step, with a checkpoint to continue from; ``signum`` is the signal (the
    entry point exits with 128 + ``signum``, as a process killed by it would)."""

    def __init__(self, message: str, signum: int = 0) -> None:
        super().__init__(message)
        self.signum = signum
