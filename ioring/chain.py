"""A write chain and the small interface every I/O backend offers.

A chain is an ordered list of `Write` and `FDATASYNC` operations against one
file descriptor. A backend runs the operations in order, stops at the first
failure (the rest are cancelled and never reach the file), and reports one
`ChainResult` per chain through `completion_fd`, an eventfd that becomes
readable when results are waiting. The caller reaps results with `reap()`.

Backends: `UringBackend` (ioring/uring.py, one linked io_uring chain) and
`ThreadBackend` (ioring/threads.py, os.pwrite + os.fdatasync on a worker
thread). `open_backend()` (ioring/backend.py) picks one once, at open.

Resource handling: the backend keeps every buffer of a chain referenced until
the chain's result is reaped; callers must not mutate a buffer after submit
(pass `bytes`, which cannot be mutated).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Protocol



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
