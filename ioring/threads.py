"""The fallback backend: os.pwrite + os.fdatasync on one worker thread.

Same interface and same completion signal (an eventfd) as the io_uring
backend, for systems where io_uring is refused (container seccomp profiles,
kernel.io_uring_disabled). One worker thread per backend; chains run in
submission order.
"""

from __future__ import annotations

import collections
import os
import queue
import threading

from ringtail.ioring.chain import (FDATASYNC, ChainResult, Operation, errno_result,
                                   short_write_result)

# Chains waiting for the worker. The engine keeps one chain in flight per
# ring, so this bound is never reached in normal use; it only caps memory.
THREAD_QUEUE_CHAIN_COUNT_MAX = 64


class ThreadBackend:
    """Runs chains on a worker thread and signals an eventfd per result.

    Resource handling: owns an eventfd and a thread; `close()` stops the
    thread after the queued chains finish and closes the eventfd.
    """

    name = "threads"

    def __init__(self) -> None:
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queue: queue.Queue = queue.Queue(THREAD_QUEUE_CHAIN_COUNT_MAX)
        self._results: collections.deque[ChainResult] = collections.deque()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="ioring-writer", daemon=True)
        self._thread.start()

    def submit(self, fd: int, operations: list[Operation], tag: int) -> None:
        self._queue.put((fd, list(operations), tag))

    def reap(self) -> list[ChainResult]:
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass
        with self._lock:
            results = list(self._results)
            self._results.clear()
        return results

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.completion_fd >= 0:
            os.close(self.completion_fd)
            self.completion_fd = -1

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            result = run_chain(*item)
            item = None  # drop the chain's buffers before reporting it done
            with self._lock:
                self._results.append(result)
            os.eventfd_write(self.completion_fd, 1)


def run_chain(fd: int, operations: list[Operation], tag: int) -> ChainResult:
    """Run operations in order with plain syscalls; stop at the first failure."""
    for index, op in enumerate(operations):
        try:
            if op is FDATASYNC:
                os.fdatasync(fd)
                continue
            written = os.pwrite(fd, op.data, op.offset)
        except OSError as error:
            return errno_result(tag, index, error.errno, op)
        if written != len(op.data):
            return short_write_result(tag, index, written, len(op.data))
    return ChainResult(tag)
