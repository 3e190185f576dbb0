"""A write chain and the small interface every I/O backend offers.

A chain is an ordered list of `Write` and `FDATASYNC` operations against one
file descriptor. A backend runs the operations in order, stops at the first
failure (the rest are cancelled and never reach the file), and reports one
`ChainResult` per chain through `completion_fd`, an eventfd that becomes
readable when results are waiting. The caller reaps results with `reap()`.

Backends: `UringBackend` (ioring/uring.py, one linked io_uring chain) and
`ThreadBackend` (ioring/threads.py, os.pwrite + os.fdatasync on a worker
thread). `open_backend()` picks one once, at open.

Resource handling: the backend keeps every buffer of a chain referenced until
the chain's result is reaped; callers must not mutate a buffer after submit
(pass `bytes`, which cannot be mutated).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import tempfile
from typing import Protocol

from ringtail.ioring.errors import BackendUnavailableError

log = logging.getLogger("ioring")

IO_CHOICES = ("auto", "uring", "threads")


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    offset: int
    data: bytes

    def __post_init__(self):
        assert self.offset >= 0 and len(self.data) > 0
        assert type(self.data) is bytes  # immutable, and what the uring Iovec holds


class _Fdatasync:
    def __repr__(self) -> str:
        return "FDATASYNC"


FDATASYNC = _Fdatasync()

Operation = Write | _Fdatasync


@dataclasses.dataclass(frozen=True, slots=True)
class ChainResult:
    """Outcome of one chain: errno 0 means every operation completed fully."""

    tag: int
    errno: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.errno == 0


def short_write_result(tag: int, index: int, written: int, wanted: int) -> ChainResult:
    return ChainResult(tag, errno.EIO,
                       f"short write: operation {index} wrote {written} of {wanted} bytes")


def errno_result(tag: int, index: int, errno_value: int, op: Operation) -> ChainResult:
    what = "fdatasync" if op is FDATASYNC else f"write of {len(op.data)} bytes at {op.offset}"
    return ChainResult(tag, errno_value,
                       f"{what} (operation {index}) failed: {os.strerror(errno_value)} "
                       f"[{errno.errorcode.get(errno_value, errno_value)}]")


class Backend(Protocol):
    name: str
    completion_fd: int

    def submit(self, fd: int, operations: list[Operation], tag: int) -> None: ...
    def reap(self) -> list[ChainResult]: ...
    def close(self) -> None: ...


# The io_uring probe's verdict, once per process (ioring/probe.py): later rings
# reuse it, so the probe runs and a fallback is logged once per process.
_probe_result = None


def probe_once(directory: str | os.PathLike | None = None):
    """The process's io_uring ProbeResult, probing (in a child) the first time.

    Logs the fallback line once, on the first probe that fails.
    """
    global _probe_result
    if _probe_result is None:
        from ringtail.ioring.probe import probe_uring
        result = probe_uring(directory if directory is not None else tempfile.gettempdir())
        if not result.ok:
            log.warning("%s", result.fallback_line())
        _probe_result = result
    return _probe_result


def open_backend(io: str, probe_directory: str | os.PathLike | None = None) -> Backend:
    """Choose the backend once.

    `threads` is the thread backend. `uring` sets up io_uring in this process
    (the caller chose it; the daemon probes first, see service/server.py).
    `auto` probes io_uring once per process in a child (ioring/probe.py, on a
    temporary file in `probe_directory`), then uses it, or falls back to the
    thread backend with one log line naming the cause.

    Raises:
        BackendUnavailableError: `io="uring"` and io_uring is refused here.
        ValueError: `io` is not one of IO_CHOICES.
    """
    if io not in IO_CHOICES:
        raise ValueError(f"io={io!r} is not one of {', '.join(IO_CHOICES)}")
    from ringtail.ioring.threads import ThreadBackend
    if io == "threads" or (io == "auto" and not probe_once(probe_directory).ok):
        return ThreadBackend()
    from ringtail.ioring import uring
    try:
        return uring.UringBackend()
    except BackendUnavailableError as error:
        if io == "uring":
            raise
        # The probe passed, yet this ring cannot have one (file descriptors,
        # memory): this ring alone uses threads.
        log.warning("io_uring unavailable for this ring (%s); %s", error,
                    "using the thread backend")
        return ThreadBackend()
