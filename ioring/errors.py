"""Typed errors of the storage engine.

A shallow tree: `RingError` is the base. "You closed it" (`RingClosedError`) is
kept apart from "it broke under you" (`RingFailedError`, `RingCorruptError`).
Every message says what failed, the bad value, the limit, and what to do.
"""

from __future__ import annotations

import os


class RingError(Exception):
    """Base of every error the ioring engine raises on purpose."""


class RingFormatError(RingError):
    """A file is not a ring file ringtail can open (magic, version, size, capacity)."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class RingLockedError(RingFormatError):
    """Another process has the ring file open for writing."""


class VrrlFormatError(RingFormatError):
    """A VRRL0001 replay log with a bad header or size."""


class RingCorruptError(RingError):
    """Stored bytes failed their checksum or their position check.

    Never returned as data: the reader raises this instead.
    """

    def __init__(self, path: str | os.PathLike, offset: int, message: str):
        self.path = os.fspath(path)
        self.offset = offset
        super().__init__(f"{self.path} at byte offset {offset}: {message}")


class RingClosedError(RingError):
    """The ring was closed by its owner; no more reads or writes."""


class RingFailedError(RingError):
    """A write chain failed (EIO, ENOSPC, short write): the ring refuses writes.

    The durable cursor did not advance; reopen the ring to recover.
    """

    def __init__(self, path: str | os.PathLike, errno_value: int, message: str):
        self.path = os.fspath(path)
        self.errno = errno_value
        super().__init__(f"{self.path}: {message}")


class RingBusyError(RingError):
    """A batch was submitted while the previous chain is still in flight."""


class BackendUnavailableError(RingError):
    """The requested I/O backend cannot be used on this system."""


class RingRangeError(RingError):
    """A read asked for sequences that are not retained (evicted or not yet written)."""

    def __init__(self, first_sequence: int, count: int, oldest: int, next_sequence: int):
        self.first_sequence = first_sequence
        self.count = count
        self.oldest_sequence = oldest
        self.next_sequence = next_sequence
        super().__init__(
            f"sequences {first_sequence}..{first_sequence + count - 1} are not all "
            f"retained (retained: {oldest}..{next_sequence - 1}); read from "
            f"oldest_sequence or later and below next_sequence")
