"""The errors a user can meet. Each message names the input (key, file or folder), what is wrong and the fix;
the entry points print it as one line, without a traceback, and exit with status 2."""

from __future__ import annotations


class DFvTError(Exception):
    """Base of the user-facing errors (one readable message, no traceback)."""


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
