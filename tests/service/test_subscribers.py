"""Subscriptions (service/subscribers.py), unit-tested against a real ring file.

Each test opens a ring in tmp_path (thread backend) behind a `Tenant`, runs
`run_subscription` in the test's own Trio run with collecting `send` and
`send_records` callables, and steps it with `wait_all_tasks_blocked()`:
start positions, filters (vectorised selection and sparse sequences), End,
the live tail, and the Gap a subscriber gets when it falls behind the ring.
"""

from __future__ import annotations

import dataclasses
import sys
import tracemalloc

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from ringtail.ioring import open_ring
from ringtail.ioring.record import RECORD_SIZE_BYTES, SlotRecord
from ringtail.service.protocol import End, ErrorCode, Gap, RemoteProtocolError, StartKind, Subscribe
from ringtail.service.limits import MALLOC_MMAP_THRESHOLD_BYTES
from ringtail.service import subscribers
from ringtail.service.protocol import encode_records_frame
from ringtail.service.connection import RECEIVE_SMALL_SIZE_BYTES
from ringtail.service.subscribers import (REPLAY_COPIED_FRAME_RECORD_COUNT_MAX,
                                          REPLAY_FRAME_RECORD_COUNT_MAX,
                                          REPLAY_READ_BUFFER_SIZE_BYTES,
                                          REPLAY_READ_RECORD_COUNT_MAX, RecordFilter,
                                          SubscriptionCounters, run_subscription, start_position)
from ringtail.service.tenants import Tenant
from tests.service.conftest import RecordFactory, split_records

TENANT = 4
TIMEOUT_S = 30  # a hang guard, never a synchronisation


@dataclasses.dataclass
class Sent:
    """What a subscription sent: Records frames as (first, sequences, records), and events."""

    frames: list[tuple[int, tuple[int, ...] | None, bytes]] = dataclasses.field(
        default_factory=list)
    events: list[object] = dataclasses.field(default_factory=list)  # Gap/End, and "records"
    gate: trio.Event | None = None  # while not set, send_records blocks (a stalled socket)
    # What each send_records call was handed: a view of the subscription's
    # read buffer, valid until the call returns (frames keep copies).
    handed: list[object] = dataclasses.field(default_factory=list)
    keep_handed: bool = True  # False: keep nothing of the subscription's buffer

    async def send(self, event) -> None:
        self.events.append(event)

    async def send_records(self, first_sequence: int, records: bytes, sequences) -> None:
        self.frames.append((first_sequence, sequences, bytes(records)))
        if self.keep_handed:
            self.handed.append(records)
        self.events.append("records")
        if self.gate is not None:
            await self.gate.wait()

    @property
    def records(self) -> list[tuple[int, bytes]]:
        """(sequence, record) of every record sent, in order."""
        found = []
        for first, sequences, data in self.frames:
            rows = split_records(data)
            numbers = sequences if sequences is not None else range(first, first + len(rows))
            found.extend(zip(numbers, rows, strict=True))
        return found


@pytest.fixture
def tenant(tmp_path):
    ring = open_ring(tmp_path / "tenant.ring", capacity=8192, tenant_id=TENANT, io="threads",
                     sync="none")
    with ring:
        yield Tenant(TENANT, ring)


def append(tenant: Tenant, data: bytes) -> None:
    """Append and commit, outside the writer (no subscriber is woken)."""
    for offset in range(0, len(data), tenant.ring.batch_record_count_max * RECORD_SIZE_BYTES):
        tenant.ring.append(data[offset:offset + tenant.ring.batch_record_count_max
                                * RECORD_SIZE_BYTES])


async def replay(tenant: Tenant, subscribe: Subscribe) -> Sent:
    sent = Sent()
    with trio.fail_after(TIMEOUT_S):
        await run_subscription(tenant, subscribe, sent.send, sent.send_records)
    return sent


# -- start positions ------------------------------------------------------------------


async def test_each_start_kind_begins_where_it_says(tenant):
    factory = RecordFactory(TENANT, seed=1)
    data = factory.records(500)
    append(tenant, data)
    stamps = [SlotRecord.decode(record).timestamp_ns for record in split_records(data)]
    cases = [(Subscribe(StartKind.OLDEST), 0),
             (Subscribe(StartKind.LATEST), 500),
             (Subscribe(StartKind.SEQUENCE, 123), 123),
             (Subscribe(StartKind.SEQUENCE, 500), 500),  # at the cursor: nothing, then End
             (Subscribe(StartKind.TIME, stamps[321]), 321),  # a record's own timestamp
             (Subscribe(StartKind.TIME, stamps[321] - 1), 321),  # between two records
             (Subscribe(StartKind.TIME, stamps[0] - 10**9), 0),
             (Subscribe(StartKind.TIME, stamps[-1] + 1), 500)]
    for subscribe, first in cases:
        assert start_position(tenant, subscribe) == first, subscribe
        sent = await replay(tenant, subscribe)
        assert sent.records == list(zip(range(first, 500), split_records(data)[first:])), (
            subscribe)
        assert sent.events[-1] == End(500), subscribe
        assert all(sequences is None for _, sequences, _ in sent.frames), "unfiltered: dense"


async def test_a_start_sequence_past_the_cursor_is_bad_subscribe(tenant):
    append(tenant, RecordFactory(TENANT).records(10))
    with pytest.raises(RemoteProtocolError, match=r"start sequence 11 is past the tenant's "
                                                  r"next_sequence 10") as raised:
        await replay(tenant, Subscribe(StartKind.SEQUENCE, 11))
    assert raised.value.code == ErrorCode.BAD_SUBSCRIBE


async def test_replay_is_read_in_steps_of_the_read_maximum_sent_in_even_frames(tenant):
    data = RecordFactory(TENANT, seed=2).records(REPLAY_READ_RECORD_COUNT_MAX + 100)
    append(tenant, data)
    sent = await replay(tenant, Subscribe())
    # A whole read goes in even frames of at most REPLAY_FRAME_RECORD_COUNT_MAX.
    pieces = -(-REPLAY_READ_RECORD_COUNT_MAX // REPLAY_FRAME_RECORD_COUNT_MAX)
    size = -(-REPLAY_READ_RECORD_COUNT_MAX // pieces)
    firsts = list(range(0, REPLAY_READ_RECORD_COUNT_MAX, size))
    expected = [(first, min(size, REPLAY_READ_RECORD_COUNT_MAX - first)) for first in firsts]
    expected.append((REPLAY_READ_RECORD_COUNT_MAX, 100))  # the next read: what is left
    assert [(first, len(records) // RECORD_SIZE_BYTES)
            for first, _, records in sent.frames] == expected
    assert b"".join(records for _, _, records in sent.frames) == data
    assert sent.events == ["records"] * len(expected) + [End(REPLAY_READ_RECORD_COUNT_MAX + 100)]


async def test_a_follower_that_caught_up_holds_no_read_buffer(tenant):
    data = RecordFactory(TENANT, seed=8).records(REPLAY_READ_RECORD_COUNT_MAX + 100)
    append(tenant, data)
    sent = Sent(keep_handed=False)
    tracemalloc.start()
    try:
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_subscription, tenant, Subscribe(follow=True), sent.send,
                                   sent.send_records)
                await wait_all_tasks_blocked()  # replayed all, waits for a commit
                held = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(True, subscribers.__file__)]).statistics("filename"))
                nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert len(sent.records) == REPLAY_READ_RECORD_COUNT_MAX + 100
    assert held < REPLAY_READ_BUFFER_SIZE_BYTES // 8, f"{held} bytes still held while idle"


def test_a_copied_replay_frame_stays_under_the_mmap_threshold():
    # A frame the connection copies per send_records (sparse: the larger; any
    # frame on TLS) comes from the heap, not a fresh mmap (service/subscribers.py).
    count = REPLAY_COPIED_FRAME_RECORD_COUNT_MAX
    sparse = encode_records_frame(0, bytes(RECORD_SIZE_BYTES * count),
                                  tuple(range(0, 2 * count, 2)))
    assert sys.getsizeof(sparse) < MALLOC_MMAP_THRESHOLD_BYTES
    assert REPLAY_COPIED_FRAME_RECORD_COUNT_MAX < REPLAY_READ_RECORD_COUNT_MAX
    # A frame sent as header + view is not copied: a whole read per frame.
    assert REPLAY_FRAME_RECORD_COUNT_MAX == REPLAY_READ_RECORD_COUNT_MAX
    # The connection's small receive (a bytes object per receive) is heap too.
    assert RECEIVE_SMALL_SIZE_BYTES + sys.getsizeof(b"") < MALLOC_MMAP_THRESHOLD_BYTES


async def test_a_consumer_that_copies_frames_gets_a_read_in_even_pieces(tenant):
    data = RecordFactory(TENANT, seed=9).records(REPLAY_READ_RECORD_COUNT_MAX)
    append(tenant, data)
    sent = Sent()
    with trio.fail_after(TIMEOUT_S):
        await run_subscription(tenant, Subscribe(), sent.send, sent.send_records,
                               frame_record_count_max=REPLAY_COPIED_FRAME_RECORD_COUNT_MAX)
    pieces = -(-REPLAY_READ_RECORD_COUNT_MAX // REPLAY_COPIED_FRAME_RECORD_COUNT_MAX)
    sizes = [len(records) // RECORD_SIZE_BYTES for _, _, records in sent.frames]
    assert len(sizes) == pieces and max(sizes) - min(sizes) < pieces  # even: one size, the last less
    assert max(sizes) <= REPLAY_COPIED_FRAME_RECORD_COUNT_MAX
    assert b"".join(records for _, _, records in sent.frames) == data


async def test_a_filter_that_passes_a_whole_read_sends_it_in_even_frames(tenant):
    data = RecordFactory(TENANT, seed=7).records(REPLAY_READ_RECORD_COUNT_MAX)
    append(tenant, data)
    sent = await replay(tenant, Subscribe(epoch_max=0xFFFF_FFFE))  # a filter all pass
    assert sent.records == list(enumerate(split_records(data)))
    assert all(len(sequences) <= REPLAY_COPIED_FRAME_RECORD_COUNT_MAX
               for _, sequences, _ in sent.frames)
    assert len(sent.frames) == -(-REPLAY_READ_RECORD_COUNT_MAX
                                 // REPLAY_COPIED_FRAME_RECORD_COUNT_MAX)


async def test_a_replay_reads_every_step_into_one_buffer_and_sends_from_it(tenant):
    # Unaligned start (inside a chunk), a whole step, a short last one.
    total = 2 * REPLAY_READ_RECORD_COUNT_MAX - 100  # within the fixture's ring (8,192)
    data = RecordFactory(TENANT, seed=6).records(total)
    append(tenant, data)
    sent = await replay(tenant, Subscribe(StartKind.SEQUENCE, 37))
    assert sent.records == list(zip(range(37, total), split_records(data)[37:]))
    pieces = -(-REPLAY_READ_RECORD_COUNT_MAX // REPLAY_FRAME_RECORD_COUNT_MAX)
    assert len(sent.handed) == 2 * pieces  # two reads, each sent in `pieces` frames
    buffers = {id(view.obj) for view in sent.handed}
    assert all(isinstance(view, memoryview) for view in sent.handed)
    assert len(buffers) == 1, "one read buffer for the whole replay, not one per read"
    assert len(sent.handed[0].obj) == REPLAY_READ_BUFFER_SIZE_BYTES


# -- filters ----------------------------------------------------------------------------


FILTER_CASES = {
    "opcodes": (dict(opcodes=frozenset({1, 3, 12})), lambda r: r.opcode in (1, 3, 12)),
    "epoch_range": (dict(epoch_min=3, epoch_max=5), lambda r: 3 <= r.epoch <= 5),
    "failure_only": (dict(failure_only=True), lambda r: r.has_failure_evidence),
    "all_at_once": (dict(opcodes=frozenset({2, 7}), epoch_max=4, failure_only=True),
                    lambda r: r.opcode in (2, 7) and r.epoch <= 4 and r.has_failure_evidence),
    "nothing_matches": (dict(opcodes=frozenset({99})), lambda r: False),
}


@pytest.mark.parametrize("filters,matches", list(FILTER_CASES.values()), ids=list(FILTER_CASES))
async def test_a_filter_sends_exactly_the_matching_records_with_their_sequences(
        tenant, filters, matches):
    data = RecordFactory(TENANT, seed=3).records(REPLAY_READ_RECORD_COUNT_MAX + 500)
    append(tenant, data)
    rows = split_records(data)
    expected = [(sequence, record) for sequence, record in enumerate(rows)
                if matches(SlotRecord.decode(record))]
    assert len(expected) < len(rows)

    subscribe = Subscribe(**filters)
    record_filter = RecordFilter.from_subscribe(subscribe)
    assert not record_filter.passes_everything
    assert record_filter.select(data).tolist() == [sequence for sequence, _ in expected]

    sent = await replay(tenant, subscribe)
    assert sent.records == expected
    assert all(sequences is not None for _, sequences, _ in sent.frames), "filtered: sparse"
    assert all(first == sequences[0] for first, sequences, _ in sent.frames)
    assert sent.events[-1] == End(len(rows))


def test_the_default_filter_passes_everything():
    assert RecordFilter.from_subscribe(Subscribe()).passes_everything
    assert not RecordFilter(epoch_max=7).passes_everything


# -- the live tail and falling behind ------------------------------------------------------


async def test_a_follower_sends_new_commits_as_the_writer_makes_them(tenant):
    factory = RecordFactory(TENANT, seed=4)
    history = factory.records(20)
    append(tenant, history)
    sent = Sent()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tenant.writer.run)
            nursery.start_soon(run_subscription, tenant, Subscribe(follow=True), sent.send,
                               sent.send_records)
            await wait_all_tasks_blocked()
            assert sent.records == list(enumerate(split_records(history)))  # then it waits

            live = factory.records(7)
            request = await tenant.writer.publish(live)
            await request.done.wait()
            await wait_all_tasks_blocked()
            assert sent.records == list(enumerate(split_records(history + live)))
            assert not any(isinstance(event, (Gap, End)) for event in sent.events)
            # Waiting at the cursor, it was handed the commit's bytes (the
            # history came as views of its read buffer), and the tenant let
            # them go once its one waiting follower took them.
            assert all(isinstance(view, memoryview) for view in sent.handed[:-1])
            assert type(sent.handed[-1]) is bytes and sent.handed[-1] == live
            assert tenant.take_commit(20) is None
            nursery.cancel_scope.cancel()
            tenant.writer.close()


async def test_followers_at_the_cursor_are_handed_each_commit_filtered_or_not(tenant):
    factory = RecordFactory(TENANT, seed=11)
    plain, filtered = Sent(), Sent()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tenant.writer.run)
            nursery.start_soon(run_subscription, tenant, Subscribe(follow=True), plain.send,
                               plain.send_records)
            nursery.start_soon(run_subscription, tenant,
                               Subscribe(follow=True, failure_only=True),
                               filtered.send, filtered.send_records)
            await wait_all_tasks_blocked()
            published = b""
            for count in (1, 5, 64, 200):
                data = factory.records(count)
                request = await tenant.writer.publish(data)
                await request.done.wait()
                await wait_all_tasks_blocked()
                published += data
                assert plain.records == list(enumerate(split_records(published)))
            nursery.cancel_scope.cancel()
            tenant.writer.close()
    assert all(type(records) is bytes for records in plain.handed)  # all handed, none read
    expected = RecordFilter(failure_only=True)
    rows = split_records(published)
    assert filtered.records == [(index, rows[index]) for index in
                                expected.select(published).tolist()]
    assert 0 < len(filtered.records) < len(rows)


async def test_a_follower_that_falls_behind_the_ring_gets_a_gap_then_the_oldest(tmp_path):
    capacity = 256
    with open_ring(tmp_path / "small.ring", capacity=capacity, tenant_id=TENANT, io="threads",
                   sync="none") as ring:
        tenant = Tenant(TENANT, ring)
        factory = RecordFactory(TENANT, seed=5)
        history = factory.records(100)
        append(tenant, history)
        sent = Sent(gate=trio.Event())  # its first frame blocks, as on a full socket
        counters = SubscriptionCounters()
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tenant.writer.run)
                nursery.start_soon(run_subscription, tenant, Subscribe(follow=True), sent.send,
                                   sent.send_records, counters)
                await wait_all_tasks_blocked()
                assert sent.records == list(enumerate(split_records(history)))

                # Publishers go on while the subscriber is stuck: the ring wraps.
                later = factory.records(4 * capacity)
                requests = [await tenant.writer.publish(later[offset:offset + 64 * 64])
                            for offset in range(0, len(later), 64 * 64)]
                for request in requests:
                    await request.done.wait()
                assert all(request.error is None for request in requests)
                oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
                assert next_sequence == 100 + 4 * capacity and oldest > 100

                sent.gate.set()
                await wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
                tenant.writer.close()

    everything = split_records(history + later)
    # Stuck in a send when the commits came, it read every record from the file.
    assert all(isinstance(view, memoryview) for view in sent.handed)
    assert sent.events == ["records", Gap(100, oldest - 1),
                           *["records"] * (len(sent.frames) - 1)]
    assert sent.records == (list(enumerate(everything[:100]))
                            + list(zip(range(oldest, next_sequence), everything[oldest:])))
    counted = counters.statistics()
    assert counted.gaps == {TENANT: 1}
    assert counted.records_out == {TENANT: len(sent.records)}
    assert counted.bytes_out == {TENANT: len(sent.records) * RECORD_SIZE_BYTES}


def test_a_dense_frame_in_parts_is_the_frame_with_the_records_not_copied():
    # The connection sends (head, payload) with one sendmsg on a plain socket.
    from ringtail.service.protocol._frames import encode_records_frame_parts
    records = RecordFactory(TENANT, seed=10).records(REPLAY_FRAME_RECORD_COUNT_MAX)
    view = memoryview(bytearray(records))
    head, payload = encode_records_frame_parts(5, view)
    assert payload is view
    assert head + bytes(payload) == encode_records_frame(5, records)
    sequences = tuple(range(0, 2 * 3, 2))
    head, payload = encode_records_frame_parts(0, records[:3 * RECORD_SIZE_BYTES], sequences)
    assert (head, payload) == (encode_records_frame(0, records[:3 * RECORD_SIZE_BYTES],
                                                    sequences), b"")


async def test_a_commit_is_handed_only_at_its_first_sequence_and_once_per_waiter(tenant):
    factory = RecordFactory(TENANT, seed=12)
    append(tenant, factory.records(20))
    taken = []

    async def follower(position: int, at: int) -> None:
        await tenant.wait_beyond(position)
        taken.append(tenant.take_commit(at))

    live = factory.records(3)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tenant.writer.run)
            nursery.start_soon(follower, 20, 20)
            nursery.start_soon(follower, 20, 21)  # not at the commit's first sequence
            await wait_all_tasks_blocked()
            request = await tenant.writer.publish(live)
            await request.done.wait()
            await wait_all_tasks_blocked()
            tenant.writer.close()
    assert sorted(taken, key=lambda item: item is None) == [live, None]
    assert tenant.take_commit(20) is None  # both waiters took it: let go
