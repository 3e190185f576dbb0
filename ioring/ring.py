"""RingFile: one tenant's ring file — batched durable appends and verified reads.

A batch becomes one chain (planned and checked by ioring/batch.py; see ioring/chain.py)::

    [slot copies] -> data write(s) -> chunk-table write(s) -> header copy -> fdatasync

The producer slot copies (ioring/producers.py) come first when the batch
completes publish batches of producers: the acks a resend is answered with.

The chain is submitted without waiting; its result arrives on
`completion_fd`. Only when `reap()` sees the whole chain succeed does the
durable cursor (`next_sequence`) advance and the batch count as committed.
One chain is in flight per ring at a time; the caller gathers the next batch
meanwhile (group commit).

Write rules that make crashes safe (docs/FORMAT.md):

- records go to slots the ring has already given up: never onto a retained,
  acknowledged record;
- the chunk entry of a chunk that already holds acknowledged records is
  written to the *other* table copy, so a torn entry write leaves the old,
  still-valid entry in place;
- the header goes to copy (generation mod 2), so the previous header copy
  survives a torn header write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import secrets
import select
import time
from typing import Callable

from ringtail.ioring.batch import BatchPlan, BatchTicket, check_header_successor, check_plan, plan_batch
from ringtail.ioring.backend import open_backend
from ringtail.ioring.chain import FDATASYNC, Backend, Operation, Write
from ringtail.ioring.errors import (RingBusyError, RingClosedError, RingFailedError,
                                    RingFormatError, RingLockedError)
from ringtail.ioring.files import write_file_atomically
from ringtail.ioring.format import (CHUNK_RECORD_COUNT, HEADER_COPY_OFFSETS, PRODUCER_SLOT_COUNT,
                                    Header, Layout, capacity_problem, chunk_hasher)
from ringtail.ioring.producers import (PRODUCER_CHAIN_WRITE_COUNT_MAX, ProducerAck, ProducerPlan,
                                       ProducerTable)
from ringtail.ioring.reader import ChunkTable, read_verified
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.recovery import RecoveryReport, is_sealed, recover, unsealed_batch_first

SYNC_CHOICES = ("batch", "none")
# Operations the first chain after a seal starts with: the unsealed header and
# (sync="batch") its fdatasync. With BATCH_CHAIN_OPERATION_COUNT_MAX and
# PRODUCER_CHAIN_WRITE_COUNT_MAX slot writes that is at most 16, io_uring's
# CHAIN_OPERATION_COUNT_MAX (asserted by tests/ioring/test_seal_and_cursor.py,
# as the uring module loads lazily).
UNSEAL_OPERATION_COUNT_MAX = 2


@dataclasses.dataclass(frozen=True, slots=True)
class RingStatistics:
    backend: str
    sync: str
    capacity: int
    oldest_sequence: int
    next_sequence: int
    batches_committed: int
    records_committed: int
    fdatasync_count: int
    in_flight: bool


class RingFile:
    """One ring file, open for appending and reading.

    Use `open_ring()` to get one.

    Resource handling: owns the file descriptor and an I/O backend (an
    io_uring instance or a worker thread, each with an eventfd). `close()`
    waits for a chain in flight, then releases them; use it as a context
    manager.

    Error handling: a failed chain puts the ring in a failed state: `reap()`
    raises RingFailedError, and so does every later `submit()`. The durable
    cursor never moves past a failed chain. Reopen the file to recover.
    """

    def __init__(self, path: str, fd: int, header: Header, layout: Layout,
                 table: ChunkTable, report: RecoveryReport, backend: Backend, sync: str,
                 observer: Callable[[list[Operation]], None] | None,
                 producers: ProducerTable):
        self.path = path
        # The producer slots (exactly-once window); none in a version 1 file.
        self.producers = producers
        self._fd = fd
        self._header = header
        self.layout = layout
        self._table = table
        self.recovery_report = report
        self._backend = backend
        self.sync = sync
        self._observer = observer
        self.oldest_sequence = header.oldest_sequence
        self.next_sequence = header.next_sequence
        self._pending: BatchPlan | None = None
        self._pending_producers: ProducerPlan | None = None
        # The header the pending plan continues from: the committed one, or the
        # unsealed successor of a seal that the plan's chain writes first.
        self._pending_base: Header | None = None
        self._failure: RingFailedError | None = None
        self._closed = False
        self._tail_hasher = self._load_tail_hasher()
        self._tag = 0
        self._batches = self._records = self._fdatasyncs = 0

    # -- properties ------------------------------------------------------------

    @property
    def backend(self) -> str:
        """Which I/O backend is active: "uring" or "threads"."""
        return self._backend.name

    @property
    def completion_fd(self) -> int:
        """Readable when a submitted chain has completed: then call `reap()`."""
        return self._backend.completion_fd

    @property
    def capacity(self) -> int:
        return self._header.capacity

    @property
    def tenant_id(self) -> int:
        return self._header.tenant_id

    @property
    def created_ns(self) -> int:
        return self._header.created_ns

    @property
    def batch_record_count_max(self) -> int:
        return self.layout.batch_record_count_max

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    @property
    def failed(self) -> RingFailedError | None:
        return self._failure

    def statistics(self) -> RingStatistics:
        return RingStatistics(self.backend, self.sync, self.capacity, self.oldest_sequence,
                              self.next_sequence, self._batches, self._records,
                              self._fdatasyncs, self.in_flight)

    # -- writing -------------------------------------------------------------------

    def submit(self, records: bytes,
               acks: tuple[tuple[int, ProducerAck], ...] = ()) -> BatchTicket:
        """Start writing a batch of whole records; returns at once.

        `records` must be immutable `bytes`: the kernel reads it later.
        Records being evicted by this batch stop being readable now.
        `acks`: (producer id, ack) of each producer's publish batch this batch
        completes (its records at or below this batch's last sequence), for at
        most PRODUCER_CHAIN_WRITE_COUNT_MAX producers; they become durable with
        it (ignored by a ring without producer slots).

        Raises:
            RingBusyError: a chain is still in flight (reap it first).
            RingFailedError: an earlier chain failed.
            RingClosedError: the ring was closed.
            ValueError: empty, not whole records, or over the batch maximum.
        """
        self._check_writable()
        if self._pending is not None:
            raise RingBusyError(f"{self.path}: a batch is in flight; reap it before submitting")
        if not isinstance(records, bytes):
            raise TypeError("records must be bytes (immutable until the chain completes)")
        count, remainder = divmod(len(records), RECORD_SIZE_BYTES)
        if remainder or not 0 < count <= self.batch_record_count_max:
            raise ValueError(
                f"a batch is 1..{self.batch_record_count_max} whole {RECORD_SIZE_BYTES}-byte "
                f"records; got {len(records)} bytes; split it into smaller batches")
        # The committed state the plan continues from (paired with _commit).
        assert (self.oldest_sequence, self.next_sequence) == (
            self._header.oldest_sequence, self._header.next_sequence)
        self._tag += 1
        ticket = BatchTicket(self._tag, self.next_sequence, count)
        base, operations = self._unseal()
        plan = plan_batch(ticket, records, self.layout, base, self._table,
                          self._tail_hasher, self.sync)
        check_plan(plan, self.layout, base, self._table, self.sync)
        producers = self.producers.plan(acks, plan.header.generation, ticket.next_sequence,
                                        base.file_id, self.layout)
        assert len(producers.writes) <= PRODUCER_CHAIN_WRITE_COUNT_MAX
        assert all(ack.last_sequence < ticket.next_sequence for _, ack in acks), acks
        self.oldest_sequence = plan.header.oldest_sequence
        operations.extend(producers.writes)  # before the records (ioring/producers.py)
        operations.extend(plan.operations)
        if self._observer is not None:
            self._observer(operations)
        self._backend.submit(self._fd, operations, ticket.tag)
        self._pending, self._pending_base = plan, base
        self._pending_producers = producers
        return ticket

    def _unseal(self) -> tuple[Header, list[Operation]]:
        """The header a new batch continues from, and the operations its chain
        starts with.

        On a sealed file (docs/FORMAT.md, "The seal") the first batch's chain
        first writes an unsealed header, one generation on, and (sync="batch")
        an fdatasync: its records, which may evict the oldest chunks, land
        only after the file stopped saying "nothing follows". Opening costs no
        write, and the batch's own header follows one generation later.
        """
        header = self._header
        if not is_sealed(header):
            return header, []
        unsealed = dataclasses.replace(
            header, generation=header.generation + 1,
            batch_first_sequence=unsealed_batch_first(header.oldest_sequence,
                                                      header.next_sequence))
        check_header_successor(header, unsealed)
        operations: list[Operation] = [
            Write(HEADER_COPY_OFFSETS[unsealed.copy_index], unsealed.encode())]
        if self.sync == "batch":
            operations.append(FDATASYNC)
        assert len(operations) <= UNSEAL_OPERATION_COUNT_MAX
        return unsealed, operations

    def reap(self) -> list[BatchTicket]:
        """Collect finished chains; return the batches now committed.

        Raises:
            RingFailedError: the chain failed; nothing of it counts as written.
        """
        if self._closed:
            raise RingClosedError(f"{self.path}: ring is closed")
        committed = []
        for result in self._backend.reap():
            pending = self._pending
            assert pending is not None and result.tag == pending.ticket.tag
            self._pending = None
            if not result.ok:
                self._failure = RingFailedError(
                    self.path, result.errno,
                    chain_failure_message(self.path, result.errno, result.message,
                                          pending.ticket))
                raise self._failure
            self._commit(pending)
            committed.append(pending.ticket)
        if self._failure is not None:
            raise self._failure
        return committed

    def _commit(self, plan: BatchPlan) -> None:
        # The plan's facts again, against the state the commit is applied to
        # (paired with submit): a planning bug is caught at both ends. The base
        # is the committed header, or the unsealed successor of a seal.
        base, header = self._pending_base, self._header
        assert base is header or (is_sealed(header) and base.generation == header.generation + 1
                                  and base.batch_first_sequence < base.next_sequence), (base, header)
        check_plan(plan, self.layout, base, self._table, self.sync)
        assert self.oldest_sequence == plan.header.oldest_sequence
        assert self.next_sequence == self._header.next_sequence
        for position, encoded in plan.entries:
            self._table.install(plan.table_index, position, encoded)
        self.producers.install(self._pending_producers)
        self._tail_hasher = plan.tail_hasher
        self._header = plan.header
        self.next_sequence = plan.header.next_sequence
        self._batches += 1
        self._records += plan.ticket.record_count
        if self.sync == "batch":  # the batch's, and the unsealing's before it
            self._fdatasyncs += 1 if base is header else 2

    def wait(self) -> list[BatchTicket]:
        """Block until the chain in flight completes (for tools and tests)."""
        committed = []
        while self._pending is not None:
            select.select([self.completion_fd], [], [])
            committed.extend(self.reap())
        return committed

    def append(self, records: bytes,
               acks: tuple[tuple[int, ProducerAck], ...] = ()) -> BatchTicket:
        """Submit one batch and wait for it: the blocking convenience."""
        ticket = self.submit(records, acks)
        self.wait()
        return ticket

    # -- reading -----------------------------------------------------------------

    def read(self, first_sequence: int, count: int, cached_only: bool = False) -> bytes:
        """Committed records [first_sequence, first_sequence + count), verified.

        `cached_only`: from the page cache only, never waiting for the disk
        (for an event loop; see reader.read_verified); returns a bytearray.

        Raises:
            RingRangeError: part of the range is not retained.
            RingCorruptError: stored bytes failed their checks (names the offset).
            BlockingIOError: `cached_only` and not all of it is in the page cache.
        """
        if self._closed:
            raise RingClosedError(f"{self.path}: ring is closed")
        return read_verified(self._fd, self.path, self._table, self._header.file_id,
                             first_sequence, count, self.oldest_sequence, self.next_sequence,
                             cached_only)

    def file_ranges(self, first_sequence: int, count: int) -> list[tuple[int, int]]:
        """(offset, size) file ranges holding these records, in order (at most two)."""
        ranges = []
        sequence, end = first_sequence, first_sequence + count
        while sequence < end:
            slot = sequence % self.capacity
            run = min(end - sequence, self.capacity - slot)
            ranges.append((self.layout.record_offset(sequence), run * RECORD_SIZE_BYTES))
            sequence += run
        return ranges

    # -- lifecycle --------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise RingClosedError(f"{self.path}: ring is closed")
        if self._failure is not None:
            raise self._failure

    def _load_tail_hasher(self):
        next_sequence = self.next_sequence
        if next_sequence % CHUNK_RECORD_COUNT == 0 or next_sequence == self.oldest_sequence:
            return None
        start = next_sequence - next_sequence % CHUNK_RECORD_COUNT
        records = self.read(start, next_sequence - start) if start >= self.oldest_sequence \
            else None
        if records is None:
            return None
        hasher = chunk_hasher(self._header.file_id, start)
        hasher.update(records)
        return hasher

    def close(self) -> None:
        """Wait for a chain in flight, then release the backend and the file."""
        if self._closed:
            return
        try:
            if self._pending is not None and self._failure is None:
                try:
                    self.wait()
                except RingFailedError:
                    pass  # already recorded in self._failure; closing anyway
            if self._failure is None:
                self._seal()
        finally:
            self._closed = True
            self._backend.close()
            os.close(self._fd)

    def _seal(self) -> None:
        """On a clean close, confirm the last batch: a header whose
        batch_first_sequence is the cursor. Recovery then has no tail to
        doubt, so damage there later is a read error, never a silent cut."""
        if self._header.batch_first_sequence == self.next_sequence:
            return
        header = dataclasses.replace(self._header, generation=self._header.generation + 1,
                                     batch_first_sequence=self.next_sequence)
        check_header_successor(self._header, header)
        assert (header.oldest_sequence, header.next_sequence) == (
            self.oldest_sequence, self.next_sequence)
        os.pwrite(self._fd, header.encode(), HEADER_COPY_OFFSETS[header.copy_index])
        os.fdatasync(self._fd)
        self._header = header

    def __enter__(self) -> "RingFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# What to do about a failed chain, by errno; any other errno gets the last line.
_CHAIN_FAILURE_ADVICE = {
    errno.ENOSPC: "the file system holding {directory} is full: free space there (or move "
                  "the data dir to a larger one)",
    errno.EDQUOT: "the disk quota of the user running the daemon is exhausted on "
                  "{directory}: raise it or free space",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg, SMART) and "
               "`ringtail verify {path}`",
}
_CHAIN_FAILURE_ADVICE_OTHER = "check the disk, the file system holding {directory} and " \
    "the daemon's limits (ulimit -f)"
# A short write (the kernel wrote part of it, no errno) on a file system with
# less free space than this is reported as ENOSPC: a batch's writes are at most
# 256 KiB of records plus its entries, and free-space counts lag allocation.
SHORT_WRITE_FULL_DISK_FREE_BYTES_MAX = 1 << 20


def chain_failure_message(path: str, errno_value: int, detail: str, ticket: BatchTicket) -> str:
    """A failed chain's message, cause first: the errno's name and meaning, what
    to do, then which batch and which operation (`detail`). STORAGE_FAILED
    carries it to the publisher.

    A short write carries EIO (chain.short_write_result) but no device error:
    on a full file system (io_uring reports running out of space as a short
    write) it is named ENOSPC with the free bytes seen, else "short write".
    """
    cause = f"{errno.errorcode.get(errno_value, f'errno {errno_value}')} " \
        f"({os.strerror(errno_value)})"
    if errno_value == errno.EIO and detail.startswith("short write"):
        errno_value = 0
        cause = "short write"
        with contextlib.suppress(OSError):
            stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
            free = stat.f_bavail * stat.f_frsize
            if free < SHORT_WRITE_FULL_DISK_FREE_BYTES_MAX:
                errno_value = errno.ENOSPC
                cause = f"ENOSPC ({os.strerror(errno.ENOSPC)}: {free} bytes free)"
    advice = _CHAIN_FAILURE_ADVICE.get(errno_value, _CHAIN_FAILURE_ADVICE_OTHER).format(
        directory=os.path.dirname(os.path.abspath(path)), path=path)
    return (f"{cause}: batch {ticket.first_sequence}..{ticket.last_sequence} is not "
            f"durable; {advice}, then restart the daemon: the ring refuses writes until "
            f"it is reopened, and recovery then keeps what of the batch verifies ({detail})")


def make_data_directory(path: str) -> None:
    """Create the directory that holds the ring files (mode 0700), if missing.

    Raises:
        NotADirectoryError: something else is at `path` (or above it); the
            message names it, what it is, and what to do (no errno prefix).
        OSError: it cannot be created (permissions, read-only file system).
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = path
        while blocker and not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        kind = "a symlink" if os.path.islink(blocker) else "a directory" \
            if os.path.isdir(blocker) else "a file"
        raise NotADirectoryError(
            f"data dir {path} cannot be a directory: {blocker} is {kind}; point --data-dir "
            "(or data_dir in the config) at a directory, or move it away") from None


def create_ring_file(path: str, capacity: int, tenant_id: int, *,
                     first_sequence: int = 0) -> None:
    """Write a new, empty ring file atomically (`<path>.creating`, fsync, link).

    `first_sequence` is its cursor (oldest and next sequence): 0 for a new
    tenant; a snapshot's first sequence for a restore (ioring/restore.py).

    Raises:
        RingFormatError: the capacity is out of bounds.
        FileExistsError: `path` exists (it is left as it is).
    """
    problem = capacity_problem(capacity)
    if problem:
        raise RingFormatError(path, problem)
    layout = Layout(capacity, PRODUCER_SLOT_COUNT)
    header = Header(generation=1, capacity=capacity, oldest_sequence=first_sequence,
                    next_sequence=first_sequence, batch_first_sequence=first_sequence,
                    tenant_id=tenant_id, created_ns=time.time_ns(),
                    file_id=int.from_bytes(secrets.token_bytes(8), "little"),
                    producer_slot_count=PRODUCER_SLOT_COUNT)

    def fill(fd: int) -> None:
        # Allocate the blocks now (not a sparse file): a full disk fails here,
        # at creation, instead of failing a batch later.
        os.posix_fallocate(fd, 0, layout.file_size_bytes)
        for generation in (0, 1):
            copy = dataclasses.replace(header, generation=generation)
            os.pwrite(fd, copy.encode(), HEADER_COPY_OFFSETS[copy.copy_index])

    temporary = f"{path}.creating"
    # Only a complete file gets the ring's name, so a `.creating` file that is
    # already there was left by a creation that crashed: never a ring.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    write_file_atomically(path, fill, replace=False, temporary_path=temporary)


def lock_writer(fd: int, path: str) -> None:
    """Hold an exclusive flock for as long as the ring is open: one writer per file.

    Raises:
        RingLockedError: another process (another daemon) has the ring open.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RingLockedError(
            path, "another process has this ring file open for writing (a second daemon "
                  "on the same data directory?); stop it, or give each daemon its own "
                  "--data-dir") from None


def is_locked_by_writer(fd: int) -> bool:
    """True while some process holds the ring open for writing (offline tools use it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def open_ring(path: str | os.PathLike, *, capacity: int | None = None, tenant_id: int = 0,
              io: str = "auto", sync: str = "batch",
              observer: Callable[[list[Operation]], None] | None = None) -> RingFile:
    """Open (recovering) or create a ring file.

    Args:
        path: the ring file.
        capacity: records; if given and the file does not exist, it is created.
        tenant_id: stored in a new file; checked against an existing one.
        io: "auto" (io_uring, falling back to threads), "uring" or "threads".
        sync: "batch" (fdatasync per batch) or "none".
        observer: called with each chain's operations before submission
            (tests use it to enumerate crash states).

    Raises:
        FileNotFoundError: no file and no capacity.
        RingFormatError: not a ring file, unsupported version, bad geometry, or
            the file belongs to another tenant.
        RingCorruptError: both header copies are damaged.
        BackendUnavailableError: io="uring" and io_uring is refused.
    """
    path = os.fspath(path)
    if sync not in SYNC_CHOICES:
        raise ValueError(f"sync={sync!r} is not one of {', '.join(SYNC_CHOICES)}")
    created = False
    # Validates io before any file is made; `auto` probes beside the file.
    backend = open_backend(io, os.path.dirname(os.path.abspath(path)))
    fd = -1
    opened = False
    try:
        if capacity is not None and not os.path.exists(path):
            create_ring_file(path, capacity, tenant_id)
            created = True
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        lock_writer(fd, path)
        recovery = recover(fd, path)
        header, report = recovery.header, recovery.report
        if header.tenant_id != tenant_id:
            raise RingFormatError(
                path, f"ring file belongs to tenant {header.tenant_id}, not {tenant_id}; "
                      "check the data directory and the tenant id")
        if created:
            report = dataclasses.replace(report, created=True)
        if recovery.changed:
            header = _persist_recovered(fd, recovery)
        opened = True
    finally:
        if not opened:
            if fd >= 0:
                os.close(fd)
            backend.close()
    return RingFile(path, fd, header, recovery.layout, recovery.table, report, backend, sync,
                    observer, recovery.producers)


def _persist_recovered(fd: int, recovery) -> Header:
    """Make a recovery decision durable before any new batch is written.

    Stale entries are erased (and synced) first, then the new header copy is
    written (and synced): a crash in between leaves the old header, from which
    recovery decides the same again. The new header is never a seal (its last
    record is its tail), so a batch in flight after it that evicts head chunks
    is recovered as an eviction, not reported as damage.
    """
    for offset, data in recovery.scrub_writes:
        os.pwrite(fd, data, offset)
    if recovery.scrub_writes:
        os.fdatasync(fd)
    recovered = recovery.header
    header = dataclasses.replace(
        recovered, generation=recovered.generation + 1,
        batch_first_sequence=unsealed_batch_first(recovered.oldest_sequence,
                                                  recovered.next_sequence))
    check_header_successor(recovery.header, header)
    os.pwrite(fd, header.encode(), HEADER_COPY_OFFSETS[header.copy_index])
    os.fdatasync(fd)
    return header
