"""Subscriptions against a real daemon: the history/live seam, where a
subscription starts (oldest, latest, a sequence, a time), filters, End, and the
Gap a subscriber gets when it falls behind the ring.

Waiting is always on protocol events (acks, Records frames), never on time.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import trio

from ringtail.ioring.record import SlotRecord
from ringtail.service.client import Client
from ringtail.service.protocol import End, Gap, Records, StartKind, Subscribe, Welcome, encode_event
from tests.service.conftest import (DaemonProcess, RawPeer, RecordFactory, frame_records,
                                    read_all, short_socket_dir, split_records, write_config)
from tests.service.test_metrics import METRICS_URL, http_get, samples, value

TENANT = 11
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One `ringtail serve` (default options) for the tests that need nothing of
    their own but a tenant: each gets a tenant nobody else uses (`tenant`), and
    what they check lives in that tenant's ring and subscriptions."""
    tmp_path = tmp_path_factory.mktemp("subscribe")
    server = DaemonProcess(os.fspath(tmp_path / "data"),
                           os.path.join(short_socket_dir(tmp_path), "subscribe.sock"), {},
                           cwd=os.fspath(tmp_path))
    try:
        yield server.start()
    finally:
        server.close()


_tenant_ids = itertools.count(100)


@pytest.fixture
def tenant() -> int:
    """A tenant id no other test of this module uses."""
    return next(_tenant_ids)


class Published:
    """Every acknowledged record by sequence, and the acks in order."""

    def __init__(self):
        self.by_sequence: dict[int, bytes] = {}
        self.acks = []

    def add(self, ack, records: bytes) -> None:
        assert ack.last_sequence - ack.first_sequence + 1 == len(records) // 64
        for offset, record in enumerate(split_records(records)):
            assert ack.first_sequence + offset not in self.by_sequence
            self.by_sequence[ack.first_sequence + offset] = record
        self.acks.append(ack)

    @property
    def last_sequence(self) -> int:
        return max(self.by_sequence)


class Follower:
    """A follow subscription that collects records until told where to stop."""

    def __init__(self):
        self.records: list[tuple[int, bytes]] = []
        self.gaps: list[Gap] = []
        self.first_frame = trio.Event()
        self.target: int | None = None
        self.reached = trio.Event()

    @property
    def last_seen(self) -> int:
        return self.records[-1][0] if self.records else -1

    def stop_at(self, sequence: int) -> None:
        self.target = sequence
        self._check()

    def _check(self) -> None:
        if self.target is not None and self.last_seen >= self.target:
            self.reached.set()

    async def run(self, socket_path: str, tenant_id: int, start=StartKind.OLDEST,
                  start_value: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with await Client.connect(socket_path, tenant_id) as client:
            task_status.started()
            async for event in client.subscribe(start, start_value, follow=True):
                if isinstance(event, Records):
                    self.records.extend(frame_records(event))
                    self.first_frame.set()
                    self._check()
                elif isinstance(event, Gap):
                    self.gaps.append(event)
                else:
                    raise AssertionError(f"a follow subscription got {event!r}")


async def test_follower_started_while_publishing_sees_every_sequence_once_in_order(
        shared_daemon, tenant):
    server = shared_daemon
    factory = RecordFactory(tenant, seed=21)
    rng = random.Random(21)
    published = Published()
    follower = Follower()

    async def publish(client: Client, batch_count: int) -> None:
        batches = [factory.records(rng.randint(1, 300)) for _ in range(batch_count)]
        for batch, ack in zip(batches, await client.publish_many(batches)):
            published.add(ack, batch)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            async with await Client.connect(server.socket_path, tenant) as one, \
                    await Client.connect(server.socket_path, tenant) as two:
                await publish(one, 20)  # history
                nursery.start_soon(follower.run, server.socket_path, tenant)
                await follower.first_frame.wait()  # replaying now: keep publishing
                async with trio.open_nursery() as publishers:
                    publishers.start_soon(publish, one, 40)
                    publishers.start_soon(publish, two, 40)
            follower.stop_at(published.last_sequence)
            await follower.reached.wait()
            nursery.cancel_scope.cancel()

    assert follower.gaps == []
    assert [sequence for sequence, _ in follower.records] == list(
        range(published.last_sequence + 1))
    assert dict(follower.records) == published.by_sequence


async def test_start_at_latest_sees_only_records_published_after_it(shared_daemon, tenant):
    server = shared_daemon
    factory = RecordFactory(tenant, seed=22)
    published = Published()
    follower = Follower()
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, tenant) as client:
            history = factory.records(500)
            published.add(await client.publish(history), history)
            async with trio.open_nursery() as nursery:
                await nursery.start(follower.run, server.socket_path, tenant, StartKind.LATEST)
                # Publish until the subscription shows it is live, then a few more.
                while not follower.first_frame.is_set():
                    batch = factory.records(7)
                    published.add(await client.publish(batch), batch)
                for _ in range(5):
                    batch = factory.records(7)
                    published.add(await client.publish(batch), batch)
                follower.stop_at(published.last_sequence)
                await follower.reached.wait()
                nursery.cancel_scope.cancel()

    first = follower.records[0][0]
    assert first >= 500, "LATEST replayed history"
    assert first in {ack.first_sequence for ack in published.acks[1:]}
    assert [sequence for sequence, _ in follower.records] == list(
        range(first, published.last_sequence + 1))
    assert all(published.by_sequence[sequence] == record
               for sequence, record in follower.records)


async def test_start_at_sequence_replays_from_it_and_ends_at_the_cursor(shared_daemon, tenant):
    server = shared_daemon
    factory = RecordFactory(tenant, seed=23)
    data = factory.records(1000)
    async with await Client.connect(server.socket_path, tenant) as client:
        await client.publish_many([data[:640 * 64], data[640 * 64:]])
    replay = await read_all(server.socket_path, tenant, StartKind.SEQUENCE, 437)
    assert replay.sequences == list(range(437, 1000))
    assert replay.data == data[437 * 64:]
    assert replay.end == End(1000) and replay.gaps == []

    at_cursor = await read_all(server.socket_path, tenant, StartKind.SEQUENCE, 1000)
    assert at_cursor.records == [] and at_cursor.end == End(1000)


async def test_start_at_time_begins_at_the_first_record_not_older_than_it(shared_daemon, tenant):
    server = shared_daemon
    factory = RecordFactory(tenant, seed=24)
    data = factory.records(2000)
    async with await Client.connect(server.socket_path, tenant) as client:
        await client.publish_many([data[i:i + 300 * 64] for i in range(0, len(data), 300 * 64)])
    timestamps = [SlotRecord.decode(record).timestamp_ns for record in split_records(data)]
    assert timestamps == sorted(set(timestamps))

    for start_time, expected_first in [
            (timestamps[1234], 1234),  # exactly a record's timestamp
            (timestamps[1234] - 1, 1234),  # between two records' timestamps
            (timestamps[1233] + 1, 1234),
            (timestamps[0] - 10**9, 0),  # before everything: the oldest
            (timestamps[1999], 1999)]:
        replay = await read_all(server.socket_path, tenant, StartKind.TIME, start_time)
        assert replay.sequences == list(range(expected_first, 2000)), start_time
        assert replay.data == data[expected_first * 64:]

    after_everything = await read_all(server.socket_path, tenant, StartKind.TIME,
                                      timestamps[-1] + 1)
    assert after_everything.records == [] and after_everything.end == End(2000)


async def test_filters_return_exactly_the_matching_records_with_their_sequences(
        shared_daemon, tenant):
    server = shared_daemon
    factory = RecordFactory(tenant, seed=25)
    data = factory.records(6000)  # more than one replay read (4,096 records)
    async with await Client.connect(server.socket_path, tenant) as client:
        await client.publish_many([data[i:i + 1000 * 64] for i in range(0, len(data), 1000 * 64)])
    decoded = [(sequence, SlotRecord.decode(record), record)
               for sequence, record in enumerate(split_records(data))]

    cases = [
        (dict(opcodes=[1, 3, 12]), lambda r: r.opcode in (1, 3, 12)),
        (dict(epoch_min=3, epoch_max=5), lambda r: 3 <= r.epoch <= 5),
        (dict(failure_only=True), lambda r: r.has_failure_evidence),
        (dict(opcodes=[2, 7], epoch_max=4, failure_only=True),
         lambda r: r.opcode in (2, 7) and r.epoch <= 4 and r.has_failure_evidence),
        (dict(opcodes=[99]), lambda r: False),
    ]
    for filters, matches in cases:
        expected = [(sequence, record) for sequence, slot, record in decoded if matches(slot)]
        assert len(expected) < len(decoded)
        replay = await read_all(server.socket_path, tenant, **filters)
        assert replay.records == expected, filters
        assert all(frame.sequences is not None for frame in replay.frames), "filtered: sparse"
        assert replay.end == End(6000) and replay.gaps == []


async def test_replay_without_follow_ends_with_end_even_when_empty(shared_daemon, tenant):
    server = shared_daemon
    empty = await read_all(server.socket_path, tenant)
    assert empty.records == [] and empty.end == End(0)
    factory = RecordFactory(tenant, seed=26)
    async with await Client.connect(server.socket_path, tenant) as client:
        ack = await client.publish(factory.records(10))
    full = await read_all(server.socket_path, tenant)
    assert full.sequences == list(range(10)) and full.end == End(ack.last_sequence + 1)
    latest = await read_all(server.socket_path, tenant, StartKind.LATEST)
    assert latest.records == [] and latest.end == End(10)


async def test_start_before_the_oldest_retained_record_gets_a_gap_first(daemon):
    server = daemon(capacity=256)
    factory = RecordFactory(TENANT, seed=27)
    data = factory.records(1000)
    async with await Client.connect(server.socket_path, TENANT) as client:
        await client.publish_many([data[i:i + 90 * 64] for i in range(0, len(data), 90 * 64)])
    replay = await read_all(server.socket_path, TENANT, StartKind.SEQUENCE, 10)
    oldest = replay.sequences[0]
    assert 10 < oldest and 1000 - oldest <= 256
    assert replay.gaps == [Gap(10, oldest - 1)]
    assert replay.sequences == list(range(oldest, 1000))
    assert replay.data == data[oldest * 64:]


async def test_stalled_subscriber_gets_a_gap_then_resumes_and_never_slows_publishers(
        daemon, tmp_path):
    """A follower that stops reading while publishers complete a fixed workload
    many times larger than its socket buffer and the ring (capacity 256).

    Never slowed, without a clock: the follower's pace is zero, so publishers
    held to it in any way (the writer waiting for subscribers, a pending bound
    that counts unsent records) would never finish. They do: every batch is
    acknowledged, the same count as on a tenant without a subscriber, with
    nothing left pending, while the daemon has handed the stalled follower
    fewer records than were acknowledged by more than the ring holds. Then the
    follower, reading again, gets the records it was sent, a Gap naming exactly
    the lost range, and contiguous records from the oldest retained one up to
    the last acknowledged."""
    capacity = 256
    config = write_config(tmp_path, 'metrics_listen = "127.0.0.1:0"\n')
    server = daemon(capacity=capacity, config=config)
    metrics_url = METRICS_URL.search(server.run_stderr).group(1) + "/metrics"
    stalled_tenant, free_tenant = 31, 32
    # What the stalled follower's socket can hold is bounded by the daemon's send
    # buffer (net.core.wmem_default for a Unix socket): publish five times that.
    with open("/proc/sys/net/core/wmem_default") as file:
        socket_buffer_size = int(file.read())
    rng = random.Random(28)
    batch_sizes = [rng.randint(1, 128) for _ in range(300)]  # ~19,000 records
    while sum(batch_sizes) * 64 < 5 * socket_buffer_size:
        batch_sizes.append(rng.randint(1, 128))

    stalled_factory = RecordFactory(stalled_tenant, seed=28)
    published = Published()
    history = stalled_factory.records(50)
    with trio.fail_after(TIMEOUT_S * 2):  # a hang guard: publishers held up never finish
        async with await Client.connect(server.socket_path, stalled_tenant) as client:
            published.add(await client.publish(history), history)

        # Subscribe, take one frame (the subscription runs), then stop reading.
        follower = await RawPeer.connect(server.socket_path)
        assert isinstance(await follower.hello(stalled_tenant), Welcome)
        await follower.send(encode_event(Subscribe(StartKind.OLDEST, follow=True)))
        first = await follower.read_frame()
        assert isinstance(first, Records) and first.first_sequence == 0

        ack_counts: dict[int, tuple[int, int]] = {}

        async def publisher(tenant_id: int) -> None:
            factory = RecordFactory(tenant_id, seed=tenant_id)
            async with await Client.connect(server.socket_path, tenant_id) as client:
                batches = [factory.records(size) for size in batch_sizes]
                acks = await client.publish_many(batches)
                if tenant_id == stalled_tenant:
                    for ack, batch in zip(acks, batches):
                        published.add(ack, batch)
            ack_counts[tenant_id] = (len(acks), sum(a.last_sequence - a.first_sequence + 1
                                                    for a in acks))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher, stalled_tenant)
            nursery.start_soon(publisher, free_tenant)
        # Publishing is over and the follower has read nothing since its first frame.
        status, text = await trio.to_thread.run_sync(http_get, metrics_url)
        assert status == 200, text
        while_stalled = samples(text)
        # Publishing is over, so the ring stands still while the follower reads.
        async with await Client.connect(server.socket_path, stalled_tenant) as probe:
            final_oldest = probe.welcome.oldest_sequence
            assert probe.welcome.next_sequence == published.last_sequence + 1

        # Now read: everything the daemon sent, then what it sends next.
        stream = frame_records(first)
        gaps = []
        while not stream or stream[-1][0] < published.last_sequence:
            event = await follower.read_frame()
            if isinstance(event, Records):
                stream.extend(frame_records(event))
            else:
                assert isinstance(event, Gap), event
                gaps.append((len(stream), event))
        status, text = await trio.to_thread.run_sync(http_get, metrics_url)
        assert status == 200, text
        after_reading = samples(text)
        await follower.aclose()

    # Every batch acknowledged, with and without a stalled subscriber alike.
    assert ack_counts[stalled_tenant] == ack_counts[free_tenant] == (
        len(batch_sizes), sum(batch_sizes))
    for tenant_id in (stalled_tenant, free_tenant):
        assert value(while_stalled, "ringtail_pending_records", tenant=tenant_id) == 0
    # The follower was really stalled: the publishers got acks for more than a
    # ring's worth of records beyond everything the daemon had handed it.
    handed_while_stalled = value(while_stalled, "ringtail_records_out_total",
                                 tenant=stalled_tenant)
    acknowledged = published.last_sequence + 1
    assert acknowledged - handed_while_stalled > capacity, (acknowledged, handed_while_stalled)
    # ... which counts what the follower receives: afterwards, exactly its stream.
    assert value(after_reading, "ringtail_records_out_total",
                 tenant=stalled_tenant) == len(stream)

    assert gaps, "a follower this far behind must be told what it lost"
    # The stream and its gaps tile 0..last exactly once, in order.
    expected_next = 0
    position = 0
    for index, gap in gaps + [(len(stream), None)]:
        for sequence, record in stream[position:index]:
            assert sequence == expected_next, "records must be contiguous between gaps"
            assert record == published.by_sequence[sequence]
            expected_next += 1
        position = index
        if gap is not None:
            assert gap.first_lost_sequence == expected_next
            assert gap.last_lost_sequence >= gap.first_lost_sequence
            expected_next = gap.last_lost_sequence + 1
    assert expected_next == published.last_sequence + 1
    last_index, last_gap = gaps[-1]
    assert last_gap.last_lost_sequence + 1 == final_oldest, (
        "after its last gap the follower resumes at the oldest retained record")
    assert len(stream) - last_index == published.last_sequence + 1 - final_oldest
    assert server.alive
