"""Our io_uring binding (ioring/uring_abi.py, ioring/uring.py) against the kernel.

The chain semantics the engine relies on (shared/notes/iouring-from-python.md)
are checked on the binding itself, for real: one CQE per good chain, a failing
operation cancels the rest, a short write stops the linked operations after
it, CQ overflow is flushed, EINTR surfaces as InterruptedError. One fault
cannot be made for real on this kernel: Linux 6.x never answers a submission
with EBUSY/EAGAIN (it keeps overflowed CQEs instead), so the full-queue test
makes the kernel "busy" by refusing io_uring_enter in a wrapper, and says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import select
import signal
import subprocess
import sys
import textwrap

import pytest

from ringtail.ioring import uring_abi
from ringtail.ioring.chain import FDATASYNC, Write
from ringtail.ioring.uring import (BACKLOG_CHAIN_COUNT_MAX, CHAIN_OPERATION_COUNT_MAX,
                                   URING_QUEUE_ENTRY_COUNT, UringBackend)

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data_fd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)


ORDERINGS = {
    "native": None,
    # aarch64's path (libatomic load-acquire/store-release), run here against
    # the real kernel; qemu-aarch64 cannot (it has no io_uring).
    "libatomic": "aarch64",
}


@pytest.fixture(params=sorted(ORDERINGS))
def ring(request):
    machine = ORDERINGS[request.param]
    ring = uring_abi.Ring(8, None if machine is None else uring_abi._Ordering(machine))
    assert ("libatomic" in ring.ordering) == (machine is not None)
    yield ring
    ring.close()


def _wait(backend: UringBackend, count: int) -> list:
    results = []
    while len(results) < count:
        # The timeout only guards against a hang; it is not a timing assertion.
        assert select.select([backend.completion_fd], [], [], 10)[0], "no completion in 10 s"
        results += backend.reap()
    return results


def _prepare(ring: uring_abi.Ring, fd: int, opcode: int, user_data: int, *, data: bytes = b"",
             offset: int = 0, link: bool = False) -> None:
    sqe = ring.sqe_claim()
    sqe.opcode, sqe.fd, sqe.user_data, sqe.off = opcode, fd, user_data, offset
    if data:
        sqe.addr, sqe.len = uring_abi.buffer_address(data), len(data)
    if opcode == uring_abi.IORING_OP_FSYNC:
        sqe.op_flags = uring_abi.IORING_FSYNC_DATASYNC
    if link:
        sqe.flags = uring_abi.IOSQE_IO_LINK | uring_abi.IOSQE_CQE_SKIP_SUCCESS


def _drain_until(ring: uring_abi.Ring, count: int) -> list[tuple[int, int]]:
    completions = ring.cq_drain()
    while len(completions) < count:
        ring.enter(0, min_complete=1)
        completions += ring.cq_drain()
    return completions


# -- the kernel ABI -------------------------------------------------------------


def test_the_ring_is_set_up_with_the_features_chains_need(ring):
    assert ring.sq_entries == 8 and ring.cq_entries == 16
    assert ring.features & uring_abi.IORING_FEATURES_REQUIRED == uring_abi.IORING_FEATURES_REQUIRED
    assert ring.sq_space_left() == 8
    assert ring.cq_drain() == []


def test_a_good_linked_chain_posts_exactly_one_completion_the_last(ring, data_fd):
    first, second = b"a" * 4096, b"b" * 128
    _prepare(ring, data_fd, uring_abi.IORING_OP_WRITE, 1, data=first, link=True)
    _prepare(ring, data_fd, uring_abi.IORING_OP_WRITE, 2, data=second, offset=4096, link=True)
    _prepare(ring, data_fd, uring_abi.IORING_OP_FSYNC, 3)
    assert ring.enter(ring.sq_publish()) == 3
    assert _drain_until(ring, 1) == [(3, 0)]
    assert ring.cq_drain() == []  # and no other
    assert os.pread(data_fd, 5000, 0) == first + second


def test_a_failing_operation_posts_its_error_and_cancels_the_rest_silently(ring, data_fd,
                                                                             tmp_path):
    read_only = os.open(tmp_path / "data", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _prepare(ring, read_only, uring_abi.IORING_OP_WRITE, 1, data=b"x" * 64, link=True)
        _prepare(ring, data_fd, uring_abi.IORING_OP_WRITE, 2, data=b"y" * 64, offset=64,
                 link=True)
        _prepare(ring, data_fd, uring_abi.IORING_OP_FSYNC, 3)
        ring.enter(ring.sq_publish())
        assert _drain_until(ring, 1) == [(1, -errno.EBADF)]
        assert ring.cq_drain() == []  # the cancelled rest post nothing (CQE_SKIP_SUCCESS)
        assert os.pread(data_fd, 128, 0) == b""  # the linked write never ran
    finally:
        os.close(read_only)


def test_enter_interrupted_by_a_signal_raises_interrupted_error_and_loses_nothing(ring):
    """For real: a blocking wait for a read of an empty pipe, interrupted by SIGALRM."""
    read_end, write_end = os.pipe()
    buffer = ctypes.create_string_buffer(16)
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        sqe = ring.sqe_claim()
        sqe.opcode, sqe.fd, sqe.user_data = uring_abi.IORING_OP_READ, read_end, 9
        sqe.addr, sqe.len = ctypes.addressof(buffer), 16
        assert ring.enter(ring.sq_publish()) == 1
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # until the wait is interrupted
        with pytest.raises(InterruptedError, match=r"^\[Errno 4\] io_uring_enter: "
                                                   r"Interrupted system call \[EINTR\]$"):
            ring.enter(0, min_complete=1)
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.write(write_end, b"after EINTR")
        assert _drain_until(ring, 1) == [(9, 11)]
        assert buffer.raw[:11] == b"after EINTR"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(read_end)
        os.close(write_end)


def test_completions_past_the_completion_ring_are_flushed_not_lost(data_fd):
    """Far more chains in flight than CQ entries: the kernel keeps the overflow (NODROP)."""
    backend = UringBackend(entries=CHAIN_OPERATION_COUNT_MAX)
    try:
        count = 40 * CHAIN_OPERATION_COUNT_MAX  # CQ holds 2 x entries
        for tag in range(count):
            backend.submit(data_fd, [Write(tag * 64, tag.to_bytes(64, "little"))], tag)
        results = _wait(backend, count)
        assert sorted((r.tag, r.ok) for r in results) == [(tag, True) for tag in range(count)]
        assert os.pread(data_fd, 64 * count, 0) == b"".join(
            tag.to_bytes(64, "little") for tag in range(count))
    finally:
        backend.close()


# -- the backend ------------------------------------------------------------------


class _BusyKernel:
    """Makes io_uring_enter answer EBUSY (a pre-5.19 kernel with CQEs backed up).

    A fake, because this kernel (6.x) never refuses a submission for a full
    completion queue; everything else in the test is the real io_uring.
    """

    def __init__(self, ring, errno_value: int):
        self.ring, self.errno_value, self.busy, self.refused = ring, errno_value, True, 0
        self.real_enter = ring.enter
        ring.enter = self.enter

    def enter(self, to_submit, min_complete=0, flags=0):
        if self.busy:
            self.refused += 1
            raise uring_abi.os_error(self.errno_value, "io_uring_enter")
        return self.real_enter(to_submit, min_complete, flags)


@pytest.mark.parametrize("errno_value", [errno.EBUSY, errno.EAGAIN])
def test_chains_that_do_not_fit_a_full_submission_queue_wait_whole_and_in_order(
        data_fd, errno_value):
    backend = UringBackend(entries=CHAIN_OPERATION_COUNT_MAX)
    busy = _BusyKernel(backend._ring, errno_value)
    try:
        chain_length = 6  # data, data, table, table, header, fdatasync: the engine's longest
        count = 5
        for tag in range(count):
            operations = [Write((tag * chain_length + index) * 64, bytes([tag * 8 + index]) * 64)
                          for index in range(chain_length - 1)] + [FDATASYNC]
            backend.submit(data_fd, operations, tag)
        statistics = backend.statistics()
        # Two chains fit the 16-entry queue (12 SQEs); the rest wait, never split.
        assert (statistics.chains_in_flight, statistics.chains_backlogged) == (5, 3)
        assert backend._ring.sq_space_left() == CHAIN_OPERATION_COUNT_MAX - 2 * chain_length
        assert busy.refused > 0 and statistics.enter_retries == busy.refused
        busy.busy = False
        backend._flush()  # what the next submit or reap does
        results = _wait(backend, count)
        # Separate chains may complete in any order (the kernel links only
        # within a chain; the engine keeps one chain per ring in flight).
        assert sorted((r.tag, r.ok) for r in results) == [(tag, True) for tag in range(count)]
        assert backend.statistics().chains_backlogged == 0
        stored = os.pread(data_fd, 64 * chain_length * count, 0)
        for tag in range(count):  # every chain's writes landed where they belong
            for index in range(chain_length - 1):
                offset = (tag * chain_length + index) * 64
                assert stored[offset:offset + 64] == bytes([tag * 8 + index]) * 64, (tag, index)
    finally:
        backend.close()


def test_enter_retries_eintr_then_leaves_the_chain_queued(data_fd):
    backend = UringBackend()
    busy = _BusyKernel(backend._ring, errno.EINTR)
    try:
        backend.submit(data_fd, [Write(0, b"q" * 64), FDATASYNC], 1)
        assert busy.refused == 16  # ENTER_RETRY_COUNT_MAX tries, then wait for the next call
        busy.busy = False
        assert backend.reap() == []  # nothing completed yet, but the reap re-submits
        assert [(r.tag, r.ok) for r in _wait(backend, 1)] == [(1, True)]
    finally:
        backend.close()


def test_the_backlog_and_queue_limits_relate():
    assert CHAIN_OPERATION_COUNT_MAX <= URING_QUEUE_ENTRY_COUNT
    assert BACKLOG_CHAIN_COUNT_MAX >= 1


def test_a_short_write_stops_the_linked_header_after_it(tmp_path):
    """For real: RLIMIT_FSIZE cuts the data write; the linked 'header' never lands."""
    path = os.fspath(tmp_path / "data")
    child = textwrap.dedent(f"""
        import json, resource, select, signal
        import os
        from ringtail.ioring.chain import FDATASYNC, Write
        from ringtail.ioring.uring import UringBackend
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o600)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096 + 100, resource.RLIM_INFINITY))
        backend = UringBackend()
        backend.submit(fd, [Write(4096, b"d" * 512), Write(0, b"H" * 128), FDATASYNC], 5)
        results = []
        while not results:
            select.select([backend.completion_fd], [], [])
            results = backend.reap()
        backend.close()
        print(json.dumps([(r.tag, r.errno, r.message) for r in results]))
    """)
    out = subprocess.run([sys.executable, "-c", child], cwd=REPOSITORY_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ('[[5, 5, "short write: operation 0 wrote 100 of 512 '
                                  'bytes"]]')
    with open(path, "rb") as file:
        stored = file.read()
    assert stored[:128] == bytes(128)  # the header write after it was cancelled
    assert stored[4096:] == b"d" * 100
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # parent kept
