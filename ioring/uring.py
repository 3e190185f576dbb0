"""The io_uring backend: one linked chain per batch, completions via eventfd.

The only module that imports the io_uring binding (ioring/uring_abi.py, our
own ctypes binding of the kernel ABI; the decision and its measurements are in
docs/OPERATIONS.md "io_uring"). Facts it relies on are measured in
shared/notes/iouring-from-python.md:

- every operation but the last carries IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS,
  so a good chain posts exactly one CQE (the last operation's), and a failing
  operation (error or short write) posts its own CQE and cancels the rest,
  which post none: any CQE ends its chain;
- the kernel reads write buffers later, so each chain's buffers stay
  referenced here until its CQE is reaped (IORING_OP_WRITE takes the address
  of the `bytes` payload itself: no iovec to keep alive);
- a chain is never split across submissions, and one that does not fit the
  submission queue waits in a bounded software queue, in order, until the
  kernel has consumed earlier entries.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import select

from ringtail.ioring import uring_abi
from ringtail.ioring.chain import (FDATASYNC, ChainResult, Operation, errno_result,
                                   short_write_result)
from ringtail.ioring.errors import BackendUnavailableError

# Submission queue entries. A batch chain has at most 6 operations (two data
# writes around the wrap, two table writes, the header, fdatasync) and each
# ring keeps one chain in flight, so 64 leaves room for 10 chains. Memory:
# 64 SQEs x 64 B + 128 CQEs x 16 B, about 8 KiB of locked kernel memory.
URING_QUEUE_ENTRY_COUNT = 64
CHAIN_OPERATION_COUNT_MAX = 16
# Chains waiting for room in the submission queue (only when the kernel has
# not consumed earlier ones: EBUSY/EAGAIN, or many chains submitted at once).
# The engine keeps one chain in flight per ring, so this is never reached in
# normal use; it caps memory (each holds up to one batch's buffers).
BACKLOG_CHAIN_COUNT_MAX = 1024
# io_uring_enter retried at once on EINTR at most this many times in a row
# before the chain is left queued for the next submit or reap.
ENTER_RETRY_COUNT_MAX = 16
# close() re-checks for refused submissions this often while it waits.
CLOSE_POLL_INTERVAL_S = 0.1
# Operation index lives in the low bits of user_data, the chain tag above.
_INDEX_BITS = 8
# Every operation of a chain but the last: run the next only if this one
# succeeded, and post no completion when it does.
_LINKED = uring_abi.IOSQE_IO_LINK | uring_abi.IOSQE_CQE_SKIP_SUCCESS
# io_uring_enter answers meaning "nothing was lost, try again later".
_RETRY_LATER_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR})

assert CHAIN_OPERATION_COUNT_MAX <= URING_QUEUE_ENTRY_COUNT
assert CHAIN_OPERATION_COUNT_MAX < (1 << _INDEX_BITS)

# Refusals at set-up, by errno: what it means here and what to do.
SETUP_REFUSALS: dict[int, str] = {
    errno.EPERM: "io_uring is blocked: a seccomp profile (Docker >= 25 and containerd 2 "
                 "defaults) or sysctl kernel.io_uring_disabled; allow io_uring_setup, "
                 "io_uring_enter and io_uring_register, or run with --io threads",
    errno.ENOSYS: "this kernel (or sandbox: gVisor, qemu-user) has no io_uring; "
                  "run with --io threads",
    errno.EINVAL: "this kernel's io_uring rejected the set-up (too old?); "
                  "Linux 5.17 or later is needed, or run with --io threads",
    errno.ENOMEM: "no memory for the io_uring rings (RLIMIT_MEMLOCK on kernels before "
                  "5.12); raise LimitMEMLOCK or run with --io threads",
    errno.EMFILE: "the process is out of file descriptors; raise LimitNOFILE",
    errno.ENFILE: "the system is out of file descriptors",
}


@dataclasses.dataclass(frozen=True, slots=True)
class UringStatistics:
    chains_submitted: int
    chains_completed: int
    chains_in_flight: int
    chains_backlogged: int  # waiting for submission-queue room right now
    backlog_waits: int  # chains that ever had to wait for room
    enter_retries: int  # io_uring_enter answered EINTR, EAGAIN or EBUSY
    ordering: str


class UringBackend:
    """Runs chains as linked io_uring submissions.

    Resource handling: owns an io_uring instance and an eventfd registered
    with it; `close()` waits for chains in flight, then releases both.

    Error handling: a refused io_uring (EPERM under seccomp or
    kernel.io_uring_disabled, ENOSYS, EINVAL) raises BackendUnavailableError
    at construction, naming the errno and the fix; a failed operation becomes
    a ChainResult with its errno.
    """

    name = "uring"

    def __init__(self, entries: int = URING_QUEUE_ENTRY_COUNT) -> None:
        assert CHAIN_OPERATION_COUNT_MAX <= entries
        try:
            self._ring = uring_abi.Ring(entries)
        except OSError as error:
            reason = SETUP_REFUSALS.get(error.errno, "run with --io threads")
            raise BackendUnavailableError(f"{error.strerror}; {reason}") from error
        try:
            self.completion_fd = _eventfd()
            self._ring.register_eventfd(self.completion_fd)
        except OSError as error:
            self._ring.close()
            raise BackendUnavailableError(f"{error}; run with --io threads") from error
        # tag -> operations: keeps the buffers alive until the chain is reaped.
        self._in_flight: dict[int, list[Operation]] = {}
        self._backlog: collections.deque[tuple[int, int, list[Operation]]] = collections.deque()
        self._submitted = self._completed = self._backlog_waits = self._enter_retries = 0
        self._closed = False

    def submit(self, fd: int, operations: list[Operation], tag: int) -> None:
        assert not self._closed
        assert 0 < len(operations) <= CHAIN_OPERATION_COUNT_MAX
        assert tag not in self._in_flight
        assert len(self._backlog) < BACKLOG_CHAIN_COUNT_MAX, "BACKLOG_CHAIN_COUNT_MAX reached"
        self._in_flight[tag] = list(operations)
        self._submitted += 1
        if self._backlog or self._ring.sq_space_left() < len(operations):
            self._backlog_waits += 1
        self._backlog.append((fd, tag, self._in_flight[tag]))
        self._flush()

    def _flush(self) -> None:
        """Move whole chains from the backlog into the SQ, in order, and enter."""
        ring = self._ring
        while self._backlog:
            fd, tag, operations = self._backlog[0]
            if ring.sq_space_left() < len(operations):
                if not self._enter(ring.sq_publish()):
                    return  # the kernel is busy: the next submit or reap retries
                if ring.sq_space_left() < len(operations):
                    return
            self._backlog.popleft()
            self._prepare(fd, tag, operations)
        self._enter(ring.sq_publish())

    def _prepare(self, fd: int, tag: int, operations: list[Operation]) -> None:
        last = len(operations) - 1
        write = self._ring.sqe_write
        for index, op in enumerate(operations):
            flags = 0 if index == last else _LINKED
            user_data = (tag << _INDEX_BITS) | index
            if op is FDATASYNC:
                write(uring_abi.IORING_OP_FSYNC, flags, fd, 0, 0, 0,
                      uring_abi.IORING_FSYNC_DATASYNC, user_data)
            else:
                write(uring_abi.IORING_OP_WRITE, flags, fd, op.offset,
                      uring_abi.buffer_address(op.data), len(op.data), 0, user_data)

    def _enter(self, pending: int) -> bool:
        """Hand `pending` SQEs to the kernel. False: it asked us to come back later."""
        retries = 0
        while pending:
            try:
                pending -= self._ring.enter(pending)
            except OSError as error:
                if error.errno not in _RETRY_LATER_ERRNOS:
                    raise
                self._enter_retries += 1
                retries += 1
                if error.errno != errno.EINTR or retries >= ENTER_RETRY_COUNT_MAX:
                    return False
        return True

    def reap(self) -> list[ChainResult]:
        try:
            _eventfd_drain(self.completion_fd)
        except BlockingIOError:
            pass
        results = [self._result(user_data, res) for user_data, res in self._ring.cq_drain()]
        if self._backlog or self._ring.sq_pending():
            self._flush()  # an earlier enter was refused; completions free room
        return results

    def _result(self, user_data: int, res: int) -> ChainResult:
        tag, index = user_data >> _INDEX_BITS, user_data & ((1 << _INDEX_BITS) - 1)
        operations = self._in_flight.pop(tag)
        self._completed += 1
        op = operations[index]
        if res < 0:
            return errno_result(tag, index, -res, op)
        if op is not FDATASYNC and res != len(op.data):
            return short_write_result(tag, index, res, len(op.data))
        if index != len(operations) - 1:  # only a failure posts a middle CQE
            return short_write_result(tag, index, res, len(op.data))
        return ChainResult(tag)

    def statistics(self) -> UringStatistics:
        return UringStatistics(self._submitted, self._completed, len(self._in_flight),
                               len(self._backlog), self._backlog_waits, self._enter_retries,
                               self._ring.ordering)

    def wait_for_completion(self, timeout_s: float | None = None) -> None:
        """Block until the completion fd is readable (close() and tests; never on a loop)."""
        select.select([self.completion_fd], [], [], timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        while self._in_flight:  # buffers must outlive the kernel's use of them
            if self._backlog or self._ring.sq_pending():
                self._flush()
            # Bounded wait: a refused enter (EBUSY) leaves SQEs to re-submit.
            self.wait_for_completion(CLOSE_POLL_INTERVAL_S)
            self.reap()
        self._ring.close()
        os.close(self.completion_fd)
        self._closed = True


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _eventfd_drain(fd: int) -> None:
    os.eventfd_read(fd)
