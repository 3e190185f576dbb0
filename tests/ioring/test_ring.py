"""RingFile against a model: appends, wrap-around, reopen, verified reads.

The stateful test drives a real ring file (both backends, for real) and keeps
a trivial model beside it: every published record in sequence order, plus the
oldest retained sequence computed with the documented chunk-granular eviction
(`Layout.oldest_after_append`). Plain tests below pin the edges: empty rings,
bad arguments, closed rings, file ranges, statistics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from ringtail.ioring.chain import FDATASYNC, Write
from ringtail.ioring.errors import (RingBusyError, RingClosedError, RingFormatError,
                                    RingRangeError)
from ringtail.ioring.format import (CAPACITY_RECORD_COUNT_MAX, CAPACITY_RECORD_COUNT_MIN,
                                    CHUNK_RECORD_COUNT, HEADER_COPY_OFFSETS,
                                    HEADER_SIZE_BYTES, Layout, decode_entry, decode_header,
                                    entry_matches)
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.ring import create_ring_file, open_ring

from .conftest import TENANT_ID, make_records

SMALL_CAPACITIES = (128, 192, 256, 320, 512)


# -- the model-based test -------------------------------------------------------


class RingMachine(RuleBasedStateMachine):
    """One ring file and its model. Subclasses pick the backend (`io`)."""

    io = "uring"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="ringtail-model-")
        self.ring = None

    # -- set-up and helpers ----------------------------------------------------

    @initialize(capacity=st.sampled_from(SMALL_CAPACITIES))
    def create(self, capacity: int) -> None:
        self.layout = Layout(capacity)
        self.path = os.path.join(self.directory, "model.ring")
        self.chains: list[list] = []
        self.published = bytearray()  # record bytes, sequence order, from 0
        self.oldest = 0
        self.number = 0  # record numbers never repeat, so a mix-up shows
        self.next_seen_max = 0
        self.ring = self._open(capacity=capacity)
        assert self.ring.recovery_report.created
        self.newest_header_copy = self.ring.recovery_report.header_copy

    def _open(self, **kwargs):
        return open_ring(self.path, tenant_id=TENANT_ID, io=self.io,
                         observer=self.chains.append, **kwargs)

    @property
    def next_sequence(self) -> int:
        return len(self.published) // RECORD_SIZE_BYTES

    def _expected(self, first: int, count: int) -> bytes:
        return bytes(self.published[first * RECORD_SIZE_BYTES:
                                    (first + count) * RECORD_SIZE_BYTES])

    def _new_records(self, count: int) -> bytes:
        records = make_records(self.number, count)
        self.number += count
        return records

    def _check_chain(self, operations: list, records: bytes, first: int) -> None:
        """The chain of a batch obeys the write rules (DESIGN "required properties" 4)."""
        layout = self.layout
        count = len(records) // RECORD_SIZE_BYTES
        end = first + count
        new_oldest = layout.oldest_after_append(self.oldest, end)
        writes = [op for op in operations if isinstance(op, Write)]
        assert operations[-1] is FDATASYNC
        if operations.count(FDATASYNC) == 2:
            # The first chain after a seal starts with an unsealed header, one
            # generation on, made durable before any record is written.
            unseal, barrier = operations[0], operations[1]
            assert barrier is FDATASYNC and unseal.offset in HEADER_COPY_OFFSETS
            copy = HEADER_COPY_OFFSETS.index(unseal.offset)
            assert copy != self.newest_header_copy, "the seal was overwritten by its unsealing"
            header = decode_header(unseal.data)
            assert (header.oldest_sequence, header.batch_first_sequence,
                    header.next_sequence) == (self.oldest, first - 1, first)
            self.newest_header_copy = copy
            writes = writes[1:]
        else:
            assert operations.count(FDATASYNC) == 1
        header_write = writes[-1]
        assert header_write.offset in HEADER_COPY_OFFSETS
        copy = HEADER_COPY_OFFSETS.index(header_write.offset)
        assert copy != self.newest_header_copy, "the newest header copy was overwritten"
        header = decode_header(header_write.data)
        assert (header.oldest_sequence, header.next_sequence,
                header.batch_first_sequence) == (new_oldest, end, first)
        data_writes = [w for w in writes if w.offset >= layout.data_offset]
        assert b"".join(w.data for w in data_writes) == records
        # No data write touches the slot of a record that stays retained.
        kept = {sequence % layout.capacity for sequence in range(new_oldest, first)}
        for write in data_writes:
            first_slot = (write.offset - layout.data_offset) // RECORD_SIZE_BYTES
            slots = range(first_slot, first_slot + len(write.data) // RECORD_SIZE_BYTES)
            assert kept.isdisjoint(slots), "a write overlaps a retained acknowledged record"
        self.newest_header_copy = copy

    def _commit_to_model(self, records: bytes) -> None:
        self.published += records
        self.oldest = self.layout.oldest_after_append(self.oldest, self.next_sequence)

    # -- rules ---------------------------------------------------------------------

    @rule(data=st.data())
    def append_batch(self, data) -> None:
        count = data.draw(st.integers(1, self.layout.batch_record_count_max), label="count")
        records = self._new_records(count)
        first = self.next_sequence
        ticket = self.ring.append(records)
        assert (ticket.first_sequence, ticket.record_count) == (first, count)
        self._check_chain(self.chains[-1], records, first)
        self._commit_to_model(records)

    @rule(data=st.data())
    def submit_then_read_while_in_flight(self, data) -> None:
        count = data.draw(st.integers(1, self.layout.batch_record_count_max), label="count")
        records = self._new_records(count)
        first = self.next_sequence
        ticket = self.ring.submit(records)
        assert self.ring.in_flight
        self._check_chain(self.chains[-1], records, first)
        # Records the batch evicts stop being readable at submit; the rest stay.
        new_oldest = self.layout.oldest_after_append(self.oldest, first + count)
        assert self.ring.oldest_sequence == new_oldest
        assert self.ring.next_sequence == first
        if new_oldest < first:
            start = data.draw(st.integers(new_oldest, first - 1), label="start")
            stop = data.draw(st.integers(start + 1, first), label="stop")
            assert self.ring.read(start, stop - start) == self._expected(start, stop - start)
        with pytest.raises(RingRangeError, match="are not all retained"):
            self.ring.read(first, 1)  # the batch in flight is not readable yet
        assert self.ring.wait() == [ticket]
        assert not self.ring.in_flight
        self._commit_to_model(records)

    @rule()
    def reopen(self) -> None:
        self.ring.close()
        self.ring = self._open()
        report = self.ring.recovery_report
        assert not report.created
        assert report.dropped_tail is None and report.dropped_head is None
        assert report.rolled_forward is None and report.other_copy_problem is None
        assert (report.oldest_sequence, report.next_sequence) == (self.oldest,
                                                                 self.next_sequence)
        # The close sealed a non-empty ring; the open writes nothing (the first
        # batch's chain unseals it: _check_chain).
        assert report.sealed == (self.next_sequence > self.oldest)
        self.newest_header_copy = report.header_copy

    @precondition(lambda self: self.next_sequence > self.oldest)
    @rule(data=st.data())
    def read_retained_range(self, data) -> None:
        start = data.draw(st.integers(self.oldest, self.next_sequence - 1), label="start")
        stop = data.draw(st.integers(start + 1, self.next_sequence), label="stop")
        assert self.ring.read(start, stop - start) == self._expected(start, stop - start)

    @rule(data=st.data())
    def read_outside_retained_range(self, data) -> None:
        candidates = [self.next_sequence, self.next_sequence + 1]
        if self.oldest > 0:
            candidates.append(data.draw(st.integers(0, self.oldest - 1), label="evicted"))
        start = data.draw(st.sampled_from(candidates), label="start")
        with pytest.raises(RingRangeError, match="are not all retained") as caught:
            self.ring.read(start, 1)
        assert (caught.value.oldest_sequence, caught.value.next_sequence) == (
            self.oldest, self.next_sequence)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def cursor_matches_model(self) -> None:
        assert self.ring.oldest_sequence == self.oldest
        assert self.ring.next_sequence == self.next_sequence
        assert self.ring.next_sequence - self.ring.oldest_sequence <= self.layout.capacity

    @invariant()
    def sequences_never_go_backwards(self) -> None:
        assert self.ring.next_sequence >= self.next_seen_max
        self.next_seen_max = self.ring.next_sequence

    def teardown(self) -> None:
        try:
            if self.ring is not None:
                self.ring.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


class UringRingMachine(RingMachine):
    io = "uring"


class ThreadsRingMachine(RingMachine):
    io = "threads"


TestRingModelUring = UringRingMachine.TestCase
TestRingModelUring.settings = MACHINE_SETTINGS
TestRingModelThreads = ThreadsRingMachine.TestCase
TestRingModelThreads.settings = MACHINE_SETTINGS


# -- plain tests ------------------------------------------------------------------


def test_new_ring_is_empty_and_reopens_empty(io, ring_path):
    before_ns = time.time_ns()
    with open_ring(ring_path, capacity=256, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert report.created and report.summary() == f"created empty ring {ring_path}"
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 0)
        assert (ring.capacity, ring.tenant_id, ring.backend) == (256, TENANT_ID, io)
        assert before_ns <= ring.created_ns <= time.time_ns()
        created_ns = ring.created_ns
    assert os.path.getsize(ring_path) == Layout(256).file_size_bytes
    assert not os.path.exists(ring_path + ".creating")
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert not report.created
        assert (report.oldest_sequence, report.next_sequence) == (0, 0)
        assert report.dropped_tail is None and report.dropped_head is None
        assert "empty" in report.summary()
        assert ring.created_ns == created_ns
        with pytest.raises(RingRangeError, match=r"retained: 0\.\.-1"):
            ring.read(0, 1)


def test_ring_wraps_several_times_and_every_retained_record_reads_back(io, ring_path):
    capacity = 256
    layout = Layout(capacity)
    assert layout.batch_record_count_max == 96
    published = bytearray()
    oldest = 0
    sizes = [1, 63, 64, 65, 96, 5, 90, 96, 3, 64, 95, 96, 96, 7] * 2
    with open_ring(ring_path, capacity=capacity, tenant_id=TENANT_ID, io=io) as ring:
        for size in sizes:
            first = len(published) // RECORD_SIZE_BYTES
            records = make_records(first, size)
            ticket = ring.append(records)
            published += records
            next_sequence = first + size
            oldest = layout.oldest_after_append(oldest, next_sequence)
            assert (ticket.first_sequence, ticket.last_sequence) == (first, next_sequence - 1)
            assert (ring.oldest_sequence, ring.next_sequence) == (oldest, next_sequence)
            retained = bytes(published[oldest * RECORD_SIZE_BYTES:])
            assert ring.read(oldest, next_sequence - oldest) == retained
    assert len(published) // RECORD_SIZE_BYTES > 5 * capacity  # it did wrap, often
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert (ring.oldest_sequence, ring.next_sequence) == (oldest, next_sequence)
        # record by record, so every chunk and both sides of the wrap are read alone
        for sequence in range(oldest, next_sequence):
            assert ring.read(sequence, 1) == make_records(sequence, 1)


def test_eviction_is_a_whole_chunk_at_a_time(io, ring_path):
    with open_ring(ring_path, capacity=192, tenant_id=TENANT_ID, io=io) as ring:
        for first in (0, 64, 128):
            ring.append(make_records(first, 64))
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 192)  # full, nothing lost
        ring.append(make_records(192, 1))  # first record of chunk 3 evicts chunk 0
        assert (ring.oldest_sequence, ring.next_sequence) == (64, 193)
        ring.append(make_records(193, 63))  # the rest of chunk 3 evicts nothing more
        assert (ring.oldest_sequence, ring.next_sequence) == (64, 256)
        assert ring.read(64, 192) == make_records(64, 192)


def test_reads_outside_the_retained_range_raise_range_error(io, ring_path):
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io) as ring:
        for first in range(0, 300, 30):
            ring.append(make_records(first, 30))
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        assert (oldest, next_sequence) == (192, 300)
        with pytest.raises(RingRangeError,
                           match=r"^sequences 191\.\.191 are not all retained "
                                 r"\(retained: 192\.\.299\); read from oldest_sequence"):
            ring.read(oldest - 1, 1)
        with pytest.raises(RingRangeError, match=r"^sequences 300\.\.300 are not all"):
            ring.read(next_sequence, 1)
        with pytest.raises(RingRangeError, match=r"^sequences 192\.\.300 are not all"):
            ring.read(oldest, next_sequence - oldest + 1)
        with pytest.raises(RingRangeError, match=r"^sequences 0\.\.9 are not all") as caught:
            ring.read(0, 10)
        error = caught.value
        assert (error.first_sequence, error.count, error.oldest_sequence,
                error.next_sequence) == (0, 10, 192, 300)
        assert ring.read(oldest, next_sequence - oldest) == make_records(192, 108)


def test_submit_while_a_chain_is_in_flight_raises_busy(io, ring_path):
    with open_ring(ring_path, capacity=256, tenant_id=TENANT_ID, io=io) as ring:
        ticket = ring.submit(make_records(0, 10))
        with pytest.raises(RingBusyError,
                           match=r"a batch is in flight; reap it before submitting"):
            ring.submit(make_records(10, 10))
        assert ring.wait() == [ticket]
        assert ring.next_sequence == 10  # the refused batch took no sequences
        assert ring.append(make_records(10, 10)).first_sequence == 10
        assert ring.read(0, 20) == make_records(0, 20)


@pytest.mark.parametrize("size_bytes", [0, 1, 63, 65, 64 * 192 + 64],
                         ids=["empty", "one-byte", "short-record", "record-and-a-byte",
                              "over-batch-max"])
def test_batch_of_wrong_size_is_rejected(io, ring_path, size_bytes):
    with open_ring(ring_path, capacity=448, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.batch_record_count_max == 192
        with pytest.raises(ValueError,
                           match=rf"^a batch is 1\.\.192 whole 64-byte records; got "
                                 rf"{size_bytes} bytes; split it into smaller batches$"):
            ring.submit(bytes(size_bytes))
        assert (ring.next_sequence, ring.in_flight) == (0, False)
        ring.append(make_records(0, 192))  # the maximum itself is fine
        assert ring.read(0, 192) == make_records(0, 192)


def test_batch_max_is_half_of_capacity_less_one_chunk_and_at_most_the_global_max(
        io, ring_path):
    # A batch and the one before it, plus a chunk, must fit in the ring (format.py).
    assert Layout(128).batch_record_count_max == 32
    assert Layout(448).batch_record_count_max == 192
    assert Layout(CAPACITY_RECORD_COUNT_MAX).batch_record_count_max == 4096
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io) as ring:
        with pytest.raises(ValueError, match=r"^a batch is 1\.\.32 whole"):
            ring.submit(make_records(0, 33))
        for first in range(0, 192, 32):
            ring.append(make_records(first, 32))
        assert (ring.oldest_sequence, ring.next_sequence) == (64, 192)
        assert ring.read(64, 128) == make_records(64, 128)


def test_batch_must_be_immutable_bytes(io, ring_path):
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io) as ring:
        with pytest.raises(TypeError, match=r"^records must be bytes \(immutable"):
            ring.submit(bytearray(make_records(0, 1)))
        assert ring.next_sequence == 0


def test_sync_none_issues_no_fdatasync(io, ring_path):
    chains = []
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io, sync="none",
                   observer=chains.append) as ring:
        for first in range(0, 150, 30):
            ring.append(make_records(first, 30))
        statistics = ring.statistics()
        assert (statistics.sync, statistics.fdatasync_count) == ("none", 0)
        assert (statistics.batches_committed, statistics.records_committed) == (5, 150)
    assert len(chains) == 5
    assert all(FDATASYNC not in chain for chain in chains)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:  # page cache survives
        assert ring.read(ring.oldest_sequence, 150 - ring.oldest_sequence) == \
            make_records(ring.oldest_sequence, 150 - ring.oldest_sequence)


def test_sync_batch_ends_every_chain_with_one_fdatasync(io, ring_path):
    chains = []
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io,
                   observer=chains.append) as ring:
        for first in range(0, 150, 30):
            ring.append(make_records(first, 30))
        statistics = ring.statistics()
        assert (statistics.sync, statistics.fdatasync_count) == ("batch", 5)
        assert statistics.backend == io and not statistics.in_flight
    for chain in chains:
        # data, chunk table, then the header, then fdatasync: the ack waits for all.
        assert chain[-1] is FDATASYNC and chain.count(FDATASYNC) == 1
        assert chain[-2].offset in HEADER_COPY_OFFSETS
        assert len(chain[-2].data) == HEADER_SIZE_BYTES


def test_unknown_sync_mode_is_rejected_before_any_file_is_made(ring_path):
    with pytest.raises(ValueError, match=r"^sync='always' is not one of batch, none$"):
        open_ring(ring_path, capacity=128, sync="always")
    assert not os.path.exists(ring_path)


def test_unknown_io_is_rejected_before_any_file_is_made(ring_path):
    with pytest.raises(ValueError, match=r"^io='bogus' is not one of auto, uring, threads$"):
        open_ring(ring_path, capacity=128, io="bogus")
    assert not os.path.exists(ring_path)


@pytest.mark.parametrize("capacity, message", [
    (0, r"capacity 0 is below CAPACITY_RECORD_COUNT_MIN \(128\); use at least 128 records"),
    (64, r"capacity 64 is below CAPACITY_RECORD_COUNT_MIN \(128\); use at least 128"),
    # 100 is both too small and not a multiple of 64: the minimum is reported.
    (100, r"capacity 100 is below CAPACITY_RECORD_COUNT_MIN \(128\)"),
    (200, r"capacity 200 is not a multiple of CHUNK_RECORD_COUNT \(64\); round it to 192"),
    (CAPACITY_RECORD_COUNT_MAX + 64,
     rf"capacity {CAPACITY_RECORD_COUNT_MAX + 64} exceeds CAPACITY_RECORD_COUNT_MAX "
     rf"\({CAPACITY_RECORD_COUNT_MAX}\); use a smaller capacity"),
])
def test_capacity_out_of_bounds_is_rejected_and_no_file_is_made(ring_path, capacity, message):
    with pytest.raises(RingFormatError, match=message) as caught:
        open_ring(ring_path, capacity=capacity, tenant_id=TENANT_ID)
    assert caught.value.path == ring_path
    assert str(caught.value).startswith(f"{ring_path}: ")
    assert not os.path.exists(ring_path)
    assert not os.path.exists(ring_path + ".creating")


def test_capacity_bounds_are_accepted(ring_path):
    with open_ring(ring_path, capacity=CAPACITY_RECORD_COUNT_MIN, io="threads") as ring:
        assert ring.capacity == CAPACITY_RECORD_COUNT_MIN


def test_a_creation_left_by_a_crash_is_replaced_not_reused(ring_path):
    with open(ring_path + ".creating", "wb") as leftover:  # crashed mid-creation
        leftover.write(b"half a ring")
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io="threads") as ring:
        ring.append(make_records(0, 3))
    assert os.path.getsize(ring_path) == Layout(128).file_size_bytes
    assert sorted(os.listdir(os.path.dirname(ring_path))) == [os.path.basename(ring_path)]


def test_creating_over_an_existing_file_is_refused_and_leaves_it(ring_path):
    with open(ring_path, "wb") as other:  # e.g. made by another process meanwhile
        other.write(b"not ours")
    with pytest.raises(FileExistsError, match="tenant.ring exists; it was left as it is"):
        create_ring_file(ring_path, 128, TENANT_ID)
    with open(ring_path, "rb") as other:
        assert other.read() == b"not ours"
    assert sorted(os.listdir(os.path.dirname(ring_path))) == [os.path.basename(ring_path)]


def test_opening_another_tenants_ring_is_rejected(io, ring_path):
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io) as ring:
        ring.append(make_records(0, 3))
    with pytest.raises(RingFormatError,
                       match=rf"ring file belongs to tenant {TENANT_ID}, not 8; check the "
                             r"data directory and the tenant id"):
        open_ring(ring_path, tenant_id=8, io=io)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:  # untouched
        assert ring.read(0, 3) == make_records(0, 3)


def test_opening_a_missing_file_without_capacity_raises_file_not_found(ring_path):
    with pytest.raises(FileNotFoundError):
        open_ring(ring_path, tenant_id=TENANT_ID)
    assert not os.path.exists(ring_path)


def _pread_ranges(path: str, ranges: list[tuple[int, int]]) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, size, offset) for offset, size in ranges)
    finally:
        os.close(fd)


def test_file_ranges_hold_exactly_the_bytes_read_returns(io, ring_path):
    capacity = 128
    layout = Layout(capacity)
    with open_ring(ring_path, capacity=capacity, tenant_id=TENANT_ID, io=io) as ring:
        for first in range(0, 250, 25):
            ring.append(make_records(first, 25))
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        assert (oldest, next_sequence) == (128, 250)
        for first in range(oldest, next_sequence):
            for count in (1, 7, next_sequence - first):
                if first + count > next_sequence:
                    continue
                ranges = ring.file_ranges(first, count)
                assert _pread_ranges(ring_path, ranges) == ring.read(first, count)
                assert sum(size for _, size in ranges) == count * RECORD_SIZE_BYTES
        # 128..249 occupy slots 0..121: no wrap inside; 200..249 then 250.. would.
        ring.append(make_records(250, 20))  # slots 122..127 then 0..13
        ranges = ring.file_ranges(245, 20)
        assert ranges == [(layout.record_offset(245), 11 * RECORD_SIZE_BYTES),
                          (layout.data_offset, 9 * RECORD_SIZE_BYTES)]
        assert _pread_ranges(ring_path, ranges) == ring.read(245, 20) == make_records(245, 20)


def test_closed_ring_refuses_every_operation(io, ring_path):
    ring = open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io)
    ring.append(make_records(0, 5))
    ring.close()
    ring.close()  # closing twice is harmless
    for operation in (lambda: ring.submit(make_records(5, 1)),
                      lambda: ring.append(make_records(5, 1)),
                      lambda: ring.read(0, 1),
                      ring.reap):
        with pytest.raises(RingClosedError, match=rf"^{ring_path}: ring is closed$"):
            operation()


def test_close_waits_for_the_chain_in_flight(io, ring_path):
    ring = open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io)
    ring.submit(make_records(0, 30))
    ring.close()
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.dropped_tail is None
        assert ring.read(0, 30) == make_records(0, 30)


def test_recovery_report_of_a_cleanly_closed_ring_drops_nothing(io, ring_path):
    with open_ring(ring_path, capacity=320, tenant_id=TENANT_ID, io=io) as ring:
        for first in range(0, 500, 100):
            ring.append(make_records(first, 100))
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        # Created at generation 1, one per batch, one more when close confirms
        # the last batch.
        generation_copy = (len(range(0, 500, 100)) + 1) % 2
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert not report.created
        assert report.dropped_tail is None and report.dropped_head is None
        assert report.rolled_forward is None and report.other_copy_problem is None
        assert (report.oldest_sequence, report.next_sequence) == (oldest, next_sequence)
        assert (report.header_copy, report.header_generation) == (1 - generation_copy, 7)
        summary = report.summary()
        assert f"retained {oldest}..{next_sequence - 1}" in summary
        assert "dropped" not in summary and "lost" not in summary and "recovered" not in summary
        assert ring.read(oldest, next_sequence - oldest) == \
            make_records(oldest, next_sequence - oldest)


def _current_entry_copy(path: str, layout: Layout, chunk: int, count: int) -> int:
    """Which table copy on disk holds a verifying entry for `count` records of `chunk`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_id = decode_header(os.pread(fd, HEADER_SIZE_BYTES, 0)).file_id
        first = chunk * CHUNK_RECORD_COUNT
        records = os.pread(fd, count * RECORD_SIZE_BYTES, layout.record_offset(first))
        found = [copy for copy in (0, 1)
                 if entry_matches(decode_entry(os.pread(fd, 32, layout.entry_offset(copy, chunk))),
                                  file_id, first, records)]
    finally:
        os.close(fd)
    assert len(found) == 1, found
    return found[0]


def test_extending_a_partial_chunk_writes_its_entry_to_the_other_table_copy(io, ring_path):
    # DESIGN property 4: a torn write may only damage the batch in flight, so the
    # entry that covers acknowledged records of a partial chunk is never rewritten.
    layout = Layout(192)
    chains = []
    with open_ring(ring_path, capacity=192, tenant_id=TENANT_ID, io=io,
                   observer=chains.append) as ring:
        ring.append(make_records(0, 10))
        for first, count in ((10, 20), (30, 40), (70, 30), (100, 40)):  # each starts mid-chunk
            chunk = first // CHUNK_RECORD_COUNT
            current = _current_entry_copy(ring_path, layout, chunk, first % CHUNK_RECORD_COUNT)
            ring.append(make_records(first, count))
            entry_offset = layout.entry_offset(current, chunk)
            for write in chains[-1]:
                if isinstance(write, Write):
                    assert not write.offset <= entry_offset < write.offset + len(write.data), (
                        f"batch at {first} rewrote the acknowledged entry of chunk {chunk}")
        assert ring.read(0, 140) == make_records(0, 140)
