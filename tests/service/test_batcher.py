"""The group-commit writer (service/batcher.py), unit-tested in one Trio run.

A `GatedRing` stands in for the ring file: a submitted chain stays in flight
until the test completes it (a byte on the pipe that is its completion fd),
so "what gathered while a chain was in flight" is decided by the test, and
`wait_all_tasks_blocked()` shows where the writer and the publishers stand.
One test runs the writer against a real ring file (thread backend).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from ringtail.ioring import RingError, open_ring
from ringtail.ioring.batch import BatchTicket
from ringtail.ioring.format import CAPACITY_RECORD_COUNT_MAX, PRODUCER_SLOT_COUNT, Layout
from ringtail.ioring.producers import (PRODUCER_ACK_COUNT_MAX, PRODUCER_CHAIN_WRITE_COUNT_MAX,
                                       ProducerAck, empty_table)
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.batcher import (PENDING_RECORD_COUNT_MAX, ProducerWindowPassed,
                                      TenantWriter)

TIMEOUT_S = 30  # a hang guard, never a synchronisation


@contextlib.asynccontextmanager
async def running(writer: TenantWriter):
    """The writer's task runs for the block (a nursery, yielded, and at most
    TIMEOUT_S); at the block's end the writer is closed and its task finishes
    what is queued."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            yield nursery
            writer.close()


def records(count: int, fill: int) -> bytes:
    """`count` 64-byte records whose every byte is `fill` (the writer does not look)."""
    return bytes([fill]) * (count * RECORD_SIZE_BYTES)


class GatedRing:
    """The part of RingFile the writer uses; a chain completes on `complete()`."""

    def __init__(self, batch_record_count_max: int = 4096):
        self.batch_record_count_max = batch_record_count_max
        self.path = "gated.ring"
        self.failed = None
        self.next_sequence = 0
        self.submitted: list[bytes] = []  # each chain's records, in order
        self.submitted_acks: list[tuple] = []  # each chain's (producer, ack) pairs
        # The real producer window, installed when a chain completes.
        self.producers = empty_table(PRODUCER_SLOT_COUNT)
        self._pending: BatchTicket | None = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)

    @property
    def completion_fd(self) -> int:
        return self._read_fd

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def submit(self, data: bytes, acks: tuple = ()) -> BatchTicket:
        assert self._pending is None, "the writer submitted a chain while one was in flight"
        assert 0 < len(data) // RECORD_SIZE_BYTES <= self.batch_record_count_max
        assert len({producer for producer, _ in acks}) <= PRODUCER_CHAIN_WRITE_COUNT_MAX
        self._pending = BatchTicket(len(self.submitted) + 1, self.next_sequence,
                                    len(data) // RECORD_SIZE_BYTES)
        self.submitted.append(data)
        self.submitted_acks.append(acks)
        return self._pending

    def complete(self) -> None:
        """Let the chain in flight finish (the writer reaps it when it next runs)."""
        assert self._pending is not None, "no chain is in flight"
        os.write(self._write_fd, b"x")

    def reap(self) -> list[BatchTicket]:
        try:
            os.read(self._read_fd, 1)
        except BlockingIOError:
            return []
        ticket, self._pending = self._pending, None
        self.next_sequence = ticket.next_sequence
        self.producers.install(self.producers.plan(
            self.submitted_acks[ticket.tag - 1], ticket.tag, ticket.next_sequence, 0,
            Layout(CAPACITY_RECORD_COUNT_MAX)))
        return [ticket]

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


@pytest.fixture
def ring():
    gated = GatedRing()
    yield gated
    gated.close()


async def test_requests_gathered_while_a_chain_is_in_flight_go_out_as_one_chain(ring):
    commits: list[tuple[int, bytes]] = []
    writer = TenantWriter(ring, lambda first, data: commits.append((first, data)))
    async with running(writer):
        first = await writer.publish(records(3, 1))
        await wait_all_tasks_blocked()
        assert ring.submitted == [first.records]  # the first goes out alone, at once

        gathered = [await writer.publish(records(count, fill))
                    for count, fill in ((2, 2), (5, 3), (1, 4))]
        await wait_all_tasks_blocked()
        assert len(ring.submitted) == 1, "nothing more may go out while a chain is in flight"
        assert writer.statistics().pending_records == 8
        assert not any(request.done.is_set() for request in [first, *gathered])

        ring.complete()
        await first.done.wait()
        assert (first.first_sequence, first.last_sequence, first.error) == (0, 2, None)
        await wait_all_tasks_blocked()
        # Everything that gathered, in publish order, as the next single chain.
        assert ring.submitted[1:] == [b"".join(request.records for request in gathered)]
        assert not any(request.done.is_set() for request in gathered)
        assert writer.statistics().pending_records == 0

        ring.complete()
        for request in gathered:
            await request.done.wait()
        assert [(r.first_sequence, r.last_sequence) for r in gathered] == [
            (3, 4), (5, 9), (10, 10)]
        assert all(request.error is None for request in gathered)

    assert commits == [(0, first.records), (3, ring.submitted[1])]
    statistics = writer.statistics()
    assert (statistics.batches, statistics.records, statistics.pending_records) == (2, 11, 0)
    assert statistics.batch_record_count.count == 2


async def test_a_request_larger_than_the_batch_maximum_spans_chains():
    ring = GatedRing(batch_record_count_max=4)
    try:
        writer = TenantWriter(ring, lambda first, data: None)
        async with running(writer):
            request = await writer.publish(records(10, 7))
            chains = 0
            while not request.done.is_set():
                await wait_all_tasks_blocked()
                chains += 1
                ring.complete()
                await wait_all_tasks_blocked()
        assert [len(data) // RECORD_SIZE_BYTES for data in ring.submitted] == [4, 4, 2]
        assert chains == 3
        assert (request.first_sequence, request.last_sequence) == (0, 9)
    finally:
        ring.close()


async def test_a_publisher_over_the_pending_bound_waits_until_the_writer_takes_records(ring):
    writer = TenantWriter(ring, lambda first, data: None)
    batch = ring.batch_record_count_max
    assert PENDING_RECORD_COUNT_MAX % batch == 0
    async with running(writer) as nursery:
        await writer.publish(records(batch, 1))  # taken at once: in flight
        await wait_all_tasks_blocked()
        for fill in range(PENDING_RECORD_COUNT_MAX // batch):  # exactly the bound
            await writer.publish(records(batch, 2 + fill))
        assert writer.statistics().pending_records == PENDING_RECORD_COUNT_MAX

        late: list = []

        async def late_publisher() -> None:
            late.append(await writer.publish(records(1, 99)))

        nursery.start_soon(late_publisher)
        await wait_all_tasks_blocked()
        assert late == [], "a publish over the pending bound must wait"
        assert writer.statistics().pending_records == PENDING_RECORD_COUNT_MAX

        ring.complete()  # the writer takes the next chain's records: room for one
        await wait_all_tasks_blocked()
        assert len(late) == 1
        assert writer.statistics().pending_records == PENDING_RECORD_COUNT_MAX - batch + 1
        for _ in range(PENDING_RECORD_COUNT_MAX // batch + 1):
            ring.complete()
            await wait_all_tasks_blocked()
        await late[0].done.wait()
        assert late[0].first_sequence == batch + PENDING_RECORD_COUNT_MAX


async def test_a_closed_writer_refuses_new_requests_after_finishing_queued_ones(ring):
    writer = TenantWriter(ring, lambda first, data: None)
    async with running(writer):
        queued = await writer.publish(records(2, 1))
        await wait_all_tasks_blocked()
        writer.close()
        refused = await writer.publish(records(1, 2))
        assert refused.done.is_set()
        assert isinstance(refused.error, RingError)
        assert str(refused.error) == "tenant writer is closed"
        ring.complete()  # run() returns once the queued request is durable
    assert (queued.first_sequence, queued.last_sequence, queued.error) == (0, 1, None)
    assert ring.submitted == [queued.records]


async def test_the_writer_on_a_real_ring_stores_every_request_at_its_acknowledged_sequences(
        tmp_path):
    with open_ring(tmp_path / "tenant.ring", capacity=4096, tenant_id=5, io="threads",
                   sync="none") as real_ring:
        writer = TenantWriter(real_ring, lambda first, data: None)
        requests = []
        async with running(writer):
            for fill in range(1, 41):
                requests.append(await writer.publish(records(fill, fill)))
            for request in requests:
                await request.done.wait()
        assert all(request.error is None for request in requests)
        assert requests[0].first_sequence == 0
        for before, after in zip(requests, requests[1:]):
            assert after.first_sequence == before.last_sequence + 1
        for request in requests:
            assert real_ring.read(request.first_sequence, request.record_count) == request.records
        statistics = writer.statistics()
        assert statistics.records == sum(range(1, 41)) == real_ring.next_sequence
        # The writer's count of chains is the ring's own count of commits (group
        # commit may merge requests, so the number itself is not fixed).
        assert statistics.batches == real_ring.statistics().batches_committed


# -- exactly once: the producer window (docs/PROTOCOL.md 4.12) -------------------------


async def test_a_producer_resend_is_answered_with_the_original_sequences_not_written(ring):
    writer = TenantWriter(ring, lambda first, data: None)
    async with running(writer):
        other = await writer.publish(records(2, 9))  # not a producer's: no ack kept
        await wait_all_tasks_blocked()
        first = await writer.publish(records(3, 1), producer_id=77, producer_sequence=5)
        ring.complete()
        await other.done.wait()
        await wait_all_tasks_blocked()
        ring.complete()
        await first.done.wait()
        assert ring.submitted_acks == [(), ((77, ProducerAck(5, 2, 3)),)]

        again = await writer.publish(records(3, 1), producer_id=77, producer_sequence=5)
        assert again.done.is_set() and again.duplicate and again.error is None
        assert (again.first_sequence, again.last_sequence) == (2, 4)
        # Another producer's same number, and this producer's next, are new batches.
        new = [await writer.publish(records(1, 2), producer_id=78, producer_sequence=5),
               await writer.publish(records(1, 3), producer_id=77, producer_sequence=6)]
        await wait_all_tasks_blocked()
        ring.complete()
        for request in new:
            await request.done.wait()
        assert [(r.first_sequence, r.duplicate) for r in new] == [(5, False), (6, False)]
    assert len(ring.submitted) == 3
    assert writer.statistics().duplicate_batches == 1


async def test_a_resend_while_the_first_copy_is_in_flight_shares_its_answer(ring):
    writer = TenantWriter(ring, lambda first, data: None)
    async with running(writer):
        blocker = await writer.publish(records(1, 0))
        await wait_all_tasks_blocked()
        queued = await writer.publish(records(2, 1), producer_id=7, producer_sequence=0)
        resent = await writer.publish(records(2, 1), producer_id=7, producer_sequence=0)
        assert resent is queued  # queued, not yet written: one request, two answers
        ring.complete()
        await blocker.done.wait()
        await wait_all_tasks_blocked()
        in_flight = await writer.publish(records(2, 1), producer_id=7, producer_sequence=0)
        assert in_flight is queued  # in flight now: still the same request
        ring.complete()
        await queued.done.wait()
    assert [len(chain) // RECORD_SIZE_BYTES for chain in ring.submitted] == [1, 2]
    assert (queued.first_sequence, queued.last_sequence) == (1, 2)
    assert writer.statistics().duplicate_batches == 2


async def test_a_sequence_older_than_a_full_window_is_refused_not_stored(ring):
    writer = TenantWriter(ring, lambda first, data: None)
    async with running(writer):
        for sequence in range(10, 10 + PRODUCER_ACK_COUNT_MAX):
            request = await writer.publish(records(1, 1), producer_id=3,
                                           producer_sequence=sequence)
            await wait_all_tasks_blocked()
            ring.complete()
            await request.done.wait()
        # The oldest batch the window holds is still answered from it; one
        # below it may have been stored, so it is refused.
        assert (await writer.publish(records(1, 1), producer_id=3,
                                     producer_sequence=10)).duplicate
        with pytest.raises(ProducerWindowPassed, match="producer 0x3 sent producer_sequence 9,"
                           " older than the 16 stored batches the daemon remembers for it"
                           r" \(oldest 10\)"):
            await writer.publish(records(1, 1), producer_id=3, producer_sequence=9)
    assert len(ring.submitted) == PRODUCER_ACK_COUNT_MAX


async def test_a_chain_carries_at_most_eight_producers_and_splits_no_producer_request_that_fits():
    ring = GatedRing(batch_record_count_max=64)
    try:
        writer = TenantWriter(ring, lambda first, data: None)
        async with running(writer):
            blocker = await writer.publish(records(1, 0))
            await wait_all_tasks_blocked()
            requests = [await writer.publish(records(1, p), producer_id=100 + p,
                                             producer_sequence=p)
                        for p in range(PRODUCER_CHAIN_WRITE_COUNT_MAX + 1)]
            # 60 records that fit no chain already holding some: never split.
            whole = await writer.publish(records(60, 6), producer_id=101, producer_sequence=40)
            big = await writer.publish(records(100, 5), producer_id=100, producer_sequence=50)
            for _ in range(8):  # complete each chain as it comes
                await wait_all_tasks_blocked()
                if ring.in_flight:
                    ring.complete()
            await wait_all_tasks_blocked()
            assert all(r.done.is_set() for r in [blocker, *requests, whole, big])
    finally:
        ring.close()
    # Chains: the blocker; 8 producers; the ninth and the 60 (61 of 64: the
    # 100-record request is not split to fill the 3 left); then that request,
    # over the chain maximum on its own, in two parts.
    assert [len(chain) // RECORD_SIZE_BYTES for chain in ring.submitted] == [1, 8, 61, 64, 36]
    assert [len(acks) for acks in ring.submitted_acks] == [0, 8, 2, 0, 1]
    assert ring.submitted_acks[2] == ((108, ProducerAck(8, 9, 1)), (101, ProducerAck(40, 10, 60)))
    # The split request's ack rides with its last part, naming its whole range.
    assert ring.submitted_acks[4] == ((100, ProducerAck(50, 70, 100)),)
    assert (big.first_sequence, big.last_sequence) == (70, 169)
