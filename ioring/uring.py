"""The io_uring backend: one linked chain per batch, completions via eventfd.

The only module that imports the io_uring binding (PyPI `liburing`). Facts it
relies on are measured in shared/notes/iouring-from-python.md:

- every operation but the last carries IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS,
  so a good chain posts exactly one CQE (the last operation's), and a failing
  operation (error or short write) posts its own CQE and cancels the rest,
  which post none: any CQE ends its chain;
- the kernel reads write buffers later, so each chain's buffers and Iovecs
  stay referenced here until its CQE is reaped;
- arguments are validated before `io_uring_get_sqe`, so a failing `prep_*`
  never leaves a stray SQE behind.
"""

from __future__ import annotations

import errno
import os

try:
    import liburing
except ImportError:  # not x86_64, or the wheel is missing
    liburing = None

from ioring.chain import (FDATASYNC, ChainResult, Operation, errno_result,
                          short_write_result)
from ioring.errors import BackendUnavailableError

# Submission queue entries. A batch chain has at most 6 operations (two data
# writes around the wrap, two table writes, the header, fdatasync) and each
# ring keeps one chain in flight, so 64 leaves room for 10 chains.
URING_QUEUE_ENTRY_COUNT = 64
CHAIN_OPERATION_COUNT_MAX = 16
# Operation index lives in the low bits of user_data, the chain tag above.
_INDEX_BITS = 8

assert CHAIN_OPERATION_COUNT_MAX <= URING_QUEUE_ENTRY_COUNT
assert CHAIN_OPERATION_COUNT_MAX < (1 << _INDEX_BITS)


class UringBackend:
    """Runs chains as linked io_uring submissions.

    Resource handling: owns an io_uring instance and an eventfd registered
    with it; `close()` waits for chains in flight, then releases both.

    Error handling: a refused io_uring (EPERM under seccomp or
    kernel.io_uring_disabled, ENOSYS) raises BackendUnavailableError at
    construction; a failed operation becomes a ChainResult with its errno.
    """

    name = "uring"

    def __init__(self) -> None:
        if liburing is None:
            raise BackendUnavailableError("the liburing Python binding is not installed")
        self._ring = liburing.Ring()
        try:
            liburing.io_uring_queue_init(URING_QUEUE_ENTRY_COUNT, self._ring, 0)
        except OSError as error:
            raise BackendUnavailableError(
                f"io_uring_queue_init failed: {os.strerror(error.errno)} "
                f"[{errno.errorcode.get(error.errno, error.errno)}]; io_uring is disabled "
                "or blocked (seccomp, kernel.io_uring_disabled)") from error
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        liburing.io_uring_register_eventfd(self._ring, self.completion_fd)
        self._cqe = liburing.Cqe()
        # tag -> (operations, iovecs): keeps buffers alive until reaped.
        self._in_flight: dict[int, tuple[list[Operation], list]] = {}
        self._closed = False

    def submit(self, fd: int, operations: list[Operation], tag: int) -> None:
        assert not self._closed
        assert 0 < len(operations) <= CHAIN_OPERATION_COUNT_MAX
        assert tag not in self._in_flight
        if liburing.io_uring_sq_space_left(self._ring) < len(operations):
            # Never split a linked chain across submits: make room first.
            self._submit()
            assert liburing.io_uring_sq_space_left(self._ring) >= len(operations)
        # Iovec over the bytes object itself: an Iovec over a memoryview never
        # releases its hold on the buffer (measured: every batch leaked).
        iovecs = [liburing.Iovec([op.data]) if op is not FDATASYNC else None
                  for op in operations]
        last = len(operations) - 1
        for index, (op, iovec) in enumerate(zip(operations, iovecs)):
            sqe = liburing.io_uring_get_sqe(self._ring)
            assert sqe is not None
            if op is FDATASYNC:
                liburing.io_uring_prep_fsync(sqe, fd, liburing.IORING_FSYNC_DATASYNC)
            else:
                liburing.io_uring_prep_writev(sqe, fd, iovec, op.offset)
            if index != last:
                sqe.flags = liburing.IOSQE_IO_LINK | liburing.IOSQE_CQE_SKIP_SUCCESS
            sqe.user_data = (tag << _INDEX_BITS) | index
        self._in_flight[tag] = (list(operations), iovecs)
        self._submit()

    def _submit(self) -> None:
        while True:
            try:
                liburing.io_uring_submit(self._ring)
                return
            except InterruptedError:
                continue

    def reap(self) -> list[ChainResult]:
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass
        results = []
        while True:
            try:
                liburing.io_uring_peek_cqe(self._ring, self._cqe)
            except BlockingIOError:
                return results
            cqe = self._cqe[0]
            user_data = cqe.user_data
            try:
                res = cqe.res
            except OSError as error:  # the binding raises for negative results
                res = -error.errno
            liburing.io_uring_cqe_seen(self._ring, cqe)
            results.append(self._result(user_data, res))

    def _result(self, user_data: int, res: int) -> ChainResult:
        tag, index = user_data >> _INDEX_BITS, user_data & ((1 << _INDEX_BITS) - 1)
        operations, _ = self._in_flight.pop(tag)
        op = operations[index]
        if res < 0:
            return errno_result(tag, index, -res, op)
        if op is not FDATASYNC and res != len(op.data):
            return short_write_result(tag, index, res, len(op.data))
        if index != len(operations) - 1:  # only a failure posts a middle CQE
            return short_write_result(tag, index, res, len(op.data))
        return ChainResult(tag)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        if self._closed:
            return
        import select
        while self._in_flight:  # buffers must outlive the kernel's use of them
            select.select([self.completion_fd], [], [])
            self.reap()
        liburing.io_uring_queue_exit(self._ring)
        os.close(self.completion_fd)
        self._closed = True
