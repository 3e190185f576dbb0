"""Group commit: one tenant's publish requests become one ring batch per write.

Publishers (every connection of the tenant) call `await writer.publish(records)`
which queues the records and returns a `PublishRequest`; its `done` event is
set when the records are durable (under the ring's sync mode) or failed.
The writer task pulls: while a chain is in flight, new requests gather; when
the chain completes, everything gathered (up to the ring's batch maximum)
goes out as the next chain. Never one write per request.

Bounded: at most PENDING_RECORD_COUNT_MAX records wait per tenant; a publisher
that would exceed it waits (backpressure) until the writer frees space.

Exactly once (docs/PROTOCOL.md 4.12): a request of a producer (a Hello with a
producer id) carries its producer sequence. A resend of a batch the ring's
producer slots remember is answered with its original sequences without
writing; a resend of one still queued or in flight (from a connection that
died) shares that request. The acks of the producers' requests a chain
completes are written in that chain (ioring/producers.py), so the window is
as durable as the records.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable

import trio

from ringtail.ioring import RingError, RingFile
from ringtail.ioring.producers import PRODUCER_ACK_COUNT_MAX, PRODUCER_CHAIN_WRITE_COUNT_MAX, ProducerAck
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.histogram import (BATCH_RECORD_COUNT_BOUNDS, LATENCY_NS_BOUNDS, Histogram,
                                        HistogramSnapshot)

log = logging.getLogger("ringtail.batcher")

# Records waiting for the writer, per tenant: 16,384 x 64 B = 1 MiB. Enough
# for four full publish batches to gather behind one in flight; past it,
# publishers wait, so daemon memory stays bounded when the disk is slow.
PENDING_RECORD_COUNT_MAX = 16_384


@dataclasses.dataclass(eq=False, slots=True)
class PublishRequest:
    """One publish frame's records on their way to disk."""

    records: bytes
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    first_sequence: int = -1
    last_sequence: int = -1
    error: RingError | None = None
    enqueued_ns: int = 0
    producer_id: int = 0  # 0: not a producer's batch (at least once)
    producer_sequence: int = 0
    duplicate: bool = False  # answered from the producer window, not written again

    @property
    def record_count(self) -> int:
        return len(self.records) // RECORD_SIZE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class WriterStatistics:
    batches: int
    records: int
    duplicate_batches: int  # producers' resends answered with their original Ack
    pending_records: int
    failed: bool
    # For metrics (service/metrics.py): records per batch, submit -> durable
    # per batch (the write + fdatasync chain), enqueue -> durable per request.
    batch_record_count: HistogramSnapshot
    commit_latency_ns: HistogramSnapshot
    ack_latency_ns: HistogramSnapshot


class ProducerWindowPassed(Exception):
    """A producer's batch is older than its window: refused, never stored (the message says why)."""


class TenantWriter:
    """Owns the write side of one ring: queue, batching, commit notifications.

    Resource handling: `run()` is the writer task (start it in the nursery of
    the owner); `close()` lets it finish every queued request, then return.
    Error handling: a failed chain fails its requests and every later one with
    the ring's RingFailedError; the daemon keeps serving other tenants.
    """

    def __init__(self, ring: RingFile, on_commit: Callable[[int, bytes], None]):
        self.ring = ring
        self._on_commit = on_commit
        self._queue: collections.deque[tuple[PublishRequest, int]] = collections.deque()
        self._pending_records = 0
        self._work = trio.Event()
        self._space = trio.Event()
        self._closing = False
        self._batches = 0
        self._records = 0
        self._duplicates = 0
        # Producers' requests queued or in flight, by (producer id, sequence):
        # a resend from a new connection shares the request.
        self._producer_pending: dict[tuple[int, int], PublishRequest] = {}
        # One observe per batch (and one per request for acks): a bisect and
        # three int adds, nothing per record.
        self._batch_record_count = Histogram(BATCH_RECORD_COUNT_BOUNDS)
        self._commit_latency_ns = Histogram(LATENCY_NS_BOUNDS)
        self._ack_latency_ns = Histogram(LATENCY_NS_BOUNDS)

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(self._batches, self._records, self._duplicates,
                                self._pending_records,
                                self.ring.failed is not None,
                                self._batch_record_count.snapshot(),
                                self._commit_latency_ns.snapshot(),
                                self._ack_latency_ns.snapshot())

    async def publish(self, records: bytes, producer_id: int = 0,
                      producer_sequence: int = 0) -> PublishRequest:
        """Queue records (waiting for space if the tenant is over its bound).

        With a `producer_id`, a batch the producer window knows is not queued:
        the request returned is the earlier one, or one already done with the
        original sequences (`duplicate`).

        Raises:
            ProducerWindowPassed: the producer sequence is older than every
                batch of the producer the window holds (it may be stored).
        """
        request = PublishRequest(records, enqueued_ns=time.perf_counter_ns(),
                                 producer_id=producer_id, producer_sequence=producer_sequence)
        count = request.record_count
        assert 0 < count <= PENDING_RECORD_COUNT_MAX
        if producer_id:
            known = self._known(request)
            if known is not None:
                return known
        while self._pending_records and self._pending_records + count > PENDING_RECORD_COUNT_MAX:
            if self._space.is_set():
                self._space = trio.Event()
            await self._space.wait()
        if producer_id:  # again: a resend may have come while this one waited
            known = self._known(request)
            if known is not None:
                return known
        if self.ring.failed is not None or self._closing:
            request.error = self.ring.failed or RingError("tenant writer is closed")
            request.done.set()
            return request
        self._queue.append((request, 0))
        self._pending_records += count
        if producer_id:
            self._producer_pending[producer_id, producer_sequence] = request
        self._work.set()
        return request

    def has_room(self, record_count: int) -> bool:
        """Whether publish() of `record_count` records would queue them at once
        (no wait for room, hence no checkpoint in it)."""
        return not (self._pending_records
                    and self._pending_records + record_count > PENDING_RECORD_COUNT_MAX)

    def _known(self, request: PublishRequest) -> PublishRequest | None:
        """The answer the producer window has for `request`, or None if it is new."""
        key = (request.producer_id, request.producer_sequence)
        pending = self._producer_pending.get(key)
        if pending is not None:
            self._duplicates += 1
            return pending
        ack, count, oldest = self.ring.producers.find(request.producer_id,
                                                      request.producer_sequence)
        if ack is not None:
            self._duplicates += 1
            request.first_sequence, request.last_sequence = ack.first_sequence, \
                ack.last_sequence
            request.duplicate = True
            request.done.set()
            return request
        if count == PRODUCER_ACK_COUNT_MAX and request.producer_sequence < oldest:
            raise ProducerWindowPassed(
                f"producer {request.producer_id:#x} sent producer_sequence "
                f"{request.producer_sequence}, older than the {PRODUCER_ACK_COUNT_MAX} stored "
                f"batches the daemon remembers for it (oldest {oldest}): it "
                "may already be stored, so it is neither stored nor acknowledged; keep at most "
                f"{PRODUCER_ACK_COUNT_MAX} batches unacknowledged per producer")
        return None

    def close(self) -> None:
        """Finish what is queued, then let `run()` return."""
        self._closing = True
        self._work.set()

    async def run(self) -> None:
        fd = self.ring.completion_fd
        batch_max = self.ring.batch_record_count_max
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._work = trio.Event()
                await self._work.wait()
                continue
            parts, data = self._take(batch_max)
            submitted_ns = time.perf_counter_ns()
            try:
                ticket = self.ring.submit(data, self._producer_acks(parts))
                # Buffers belong to the kernel until reaped: never abandon a
                # chain in flight, even when cancelled.
                with trio.CancelScope(shield=True):
                    while self.ring.in_flight:
                        await trio.lowlevel.wait_readable(fd)
                        self.ring.reap()
            except RingError as error:
                log.error("ring %s failed: %s", self.ring.path, error)
                self._fail(parts, error)
                continue
            durable_ns = time.perf_counter_ns()
            self._resolve(parts, ticket.first_sequence, durable_ns)
            self._batches += 1
            self._records += ticket.record_count
            self._batch_record_count.observe(ticket.record_count)
            self._commit_latency_ns.observe(durable_ns - submitted_ns)
            self._on_commit(ticket.first_sequence, data)

    def _producer_acks(self, parts) -> tuple[tuple[int, ProducerAck], ...]:
        """(producer, ack) of each producer's request this chain completes."""
        acks = []
        sequence = self.ring.next_sequence
        for request, start, count in parts:
            if request.producer_id and start + count == request.record_count:
                first = sequence if start == 0 else request.first_sequence
                acks.append((request.producer_id, ProducerAck(
                    request.producer_sequence, first, request.record_count)))
            sequence += count
        return tuple(acks)

    def _take(self, batch_max: int) -> tuple[list[tuple[PublishRequest, int, int]], bytes]:
        """Pop up to batch_max records: (request, first index, count) per part.

        At most PRODUCER_CHAIN_WRITE_COUNT_MAX producers per chain (each costs
        a slot write in it); the next producer's request starts the next chain.
        A producer's request that does not fit whole starts the next chain too
        (split only when it alone exceeds batch_max).
        """
        parts = []
        buffers = []
        room = batch_max
        producers: set[int] = set()
        while self._queue and room:
            request, start = self._queue[0]
            if request.producer_id:
                # A producer's request is never split over chains unless it
                # alone is over the ring's batch maximum: a crash between the
                # chains would keep a part the window does not know of, and
                # the resend would store that part twice.
                if parts and request.record_count - start > room:
                    break
                if request.producer_id not in producers:
                    if len(producers) == PRODUCER_CHAIN_WRITE_COUNT_MAX:
                        break
                    producers.add(request.producer_id)
            count = min(request.record_count - start, room)
            if start == 0 and count == request.record_count:
                buffers.append(request.records)
                self._queue.popleft()
            else:
                buffers.append(request.records[start * RECORD_SIZE_BYTES:
                                               (start + count) * RECORD_SIZE_BYTES])
                if start + count == request.record_count:
                    self._queue.popleft()
                else:
                    self._queue[0] = (request, start + count)
            parts.append((request, start, count))
            room -= count
        taken = batch_max - room
        self._pending_records -= taken
        self._space.set()
        return parts, buffers[0] if len(buffers) == 1 else b"".join(buffers)

    def _resolve(self, parts, first_sequence: int, durable_ns: int) -> None:
        sequence = first_sequence
        for request, start, count in parts:
            if start == 0:
                request.first_sequence = sequence
            sequence += count
            if start + count == request.record_count:
                request.last_sequence = sequence - 1
                if request.producer_id:
                    del self._producer_pending[request.producer_id, request.producer_sequence]
                request.done.set()
                self._ack_latency_ns.observe(durable_ns - request.enqueued_ns)

    def _fail(self, parts, error: RingError) -> None:
        for request, _, _ in parts:
            request.error = error
            request.done.set()
        while self._queue:
            request, _ = self._queue.popleft()
            request.error = error
            request.done.set()
        self._producer_pending.clear()  # all failed: nothing of them is stored
        self._pending_records = 0
        self._space.set()
