"""The one exception of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used; the message names the path, what is wrong and how to fix it.

    It takes a single message argument, so a DataLoader worker can re-raise it in the main process.
    """
