"""Subscriptions: replay history from the ring file, then follow it live.

A subscription is a position in the tenant's sequence space. It reads
committed records from the ring file (verified, a chunk run at a time) and
sends them; when it reaches the cursor it waits for the next commit and sends
that commit's records from the writer's memory (the bytes just written and
made durable, Tenant.take_commit), or reads again if it was not at the cursor
when the commit came. History and live tail are one loop over one position
(a hand-off starts exactly at it and moves it past the commit), so the seam
has no gap and no duplicate by construction, and a subscriber never holds up
a publisher: the writer only sets an event. The subscriber's buffer is one
read of at most REPLAY_READ_RECORD_COUNT_MAX records (or the one commit it
was handed) plus the socket's buffer. One that falls
behind the oldest retained record gets a Gap naming the lost range and goes
on from the oldest.

Start at a time means the record's own `timestamp_ns` (the publisher's
clock), found by binary search over the retained range: O(log n) reads,
assuming timestamps are non-decreasing in sequence order (they are when one
host's clock stamps them; with skewed publishers, the start is approximate).

The public API, for the daemon's connection handler and for any in-process
subscriber (a web page's event stream) alike::

    tenant = daemon.registry.get(tenant_id, create=False)  # an opened Tenant
    with daemon.gate.subscriber_slot(tenant_id):          # the tenant's cap
        await run_subscription(tenant, Subscribe(start=StartKind.LATEST, follow=True),
                               send, send_records, daemon.subscriptions)

- `run_subscription(tenant, subscribe, send, send_records, counters=None,
  frame_record_count_max=REPLAY_FRAME_RECORD_COUNT_MAX)`
  streams until the end (no follow) or until cancelled; `send` gets Gap and
  End events, `send_records(first_sequence, records, sequences)` gets each
  read's records (64-byte rows; `sequences` is None when every sequence from
  `first_sequence` on is present, else one per record). `records` may be a
  view of the subscription's read buffer, valid until that await returns
  (the next read goes into the same buffer): a consumer that keeps records
  copies them. Its awaits are the backpressure: a slow consumer only ever
  holds one read (REPLAY_READ_RECORD_COUNT_MAX records), never a publisher.
- `SubscriptionCounters` counts what subscriptions sent (records, bytes,
  gaps, per tenant); pass the daemon's (`Daemon.subscriptions`) to have
  them in its statistics and metrics. `statistics()` returns a frozen
  `SubscriptionStatistics`.
- `RecordFilter` selects records by opcode, epoch range and failure.

Nothing of a replay waits for the disk or runs long on the event loop
(issue 9, item 5): a read (at most REPLAY_READ_RECORD_COUNT_MAX records,
~0.6 ms of pread and BLAKE3 checks here) runs on the loop only when the page
cache holds all of it (preadv RWF_NOWAIT), else on a worker thread; and every
read is followed by a checkpoint, so a filter that passes nothing still lets
every other tenant's writer, acks and handshakes run between reads. A read on
a thread races the tenant's writer (which runs on the loop): a chunk the
writer evicts or extends meanwhile fails its check there. Such a failure is
never reported from the thread: the failing chunk is read again on the loop,
where the ring cannot move, and only a failure there is damage.

Damage (docs/PROTOCOL.md 4.5): every verified record before the first chunk
that fails its checks is delivered, then RingCorruptError (file and offset)
ends the subscription; the connection handler sends it as STORAGE_FAILED.

Cancelling the caller's scope ends a subscription at its next await; the
connection handler waits for a frame already being written (see
service/connection.py, `end_subscription`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Awaitable, Callable, Mapping

import numpy
import trio

from ringtail.ioring import RingCorruptError, RingRangeError
from ringtail.ioring.format import CHUNK_RECORD_COUNT
from ringtail.ioring.reader import read_buffer_size_bytes, read_ring_into
from ringtail.ioring.record import RECORD_DTYPE, RECORD_SIZE_BYTES
from ringtail.service.protocol import End, ErrorCode, Gap, RemoteProtocolError, StartKind, Subscribe
from ringtail.service.tenants import Tenant

# Records read (and verified) per step: 4,096 x 64 B = 256 KiB per
# subscriber in flight; large enough that replay costs no per-record Python.
# A read of that size from the page cache costs ~0.6 ms of CPU here (pread
# and BLAKE3; a filter ~0.2 ms more): the most one step of a replay holds the
# event loop. A read that would wait for the disk runs on a worker thread.
REPLAY_READ_RECORD_COUNT_MAX = 4096
# One read buffer per subscription, reused by every read of a replay (reads
# into it with preadv; verified and sent from it): 260 KiB (the records of
# one read and one chunk more for a start inside a chunk), held while the
# subscription reads and let go when it waits for a commit, so an idle
# follower holds none. A fresh buffer per read was an mmap, its page faults
# and a munmap each time (glibc's mmap threshold, service/limits.py).
REPLAY_READ_BUFFER_SIZE_BYTES = read_buffer_size_bytes(REPLAY_READ_RECORD_COUNT_MAX)
assert REPLAY_READ_BUFFER_SIZE_BYTES == (REPLAY_READ_RECORD_COUNT_MAX
                                         + CHUNK_RECORD_COUNT) * RECORD_SIZE_BYTES
# Records handed to one send_records call at most, unfiltered: a whole read.
# The connection sends a frame's header and this view of the read buffer in
# one sendmsg on a plain socket (service/connection.py), so a frame costs no
# copy, whatever its size; it was capped at 1,792 records while every frame
# was a copy (below). Measured end to end (replay of 1 M-3 M records from
# oldest, daemon CPU): see docs/BENCHMARKS.md, issue 13 round 2.
REPLAY_FRAME_RECORD_COUNT_MAX = REPLAY_READ_RECORD_COUNT_MAX
# Records per send_records call where the frame is a copy: sparse (filtered)
# frames always, and every frame of a consumer that copies the records into a
# frame (a TLS stream: the connection passes it as `frame_record_count_max`).
# A read is sent in even pieces of at most this many, so the frame (8 + 8 B
# of header and 64 B per record, or 12 B and 72 B per record when sparse,
# 129,036 B at most, plus the bytes object's own ~33 B) stays under glibc's
# mmap threshold (MALLOC_MMAP_THRESHOLD_BYTES, 128 KiB; service/limits.py
# imports this module, so tests/service/test_subscribers.py asserts the
# relation): it comes from the heap, not from a fresh mmap with page faults
# per frame as a 256 KiB frame did (unfiltered replay ~140-240 -> ~90-112 ns
# per record in one process, when every frame was a copy).
REPLAY_COPIED_FRAME_RECORD_COUNT_MAX = 1792
assert REPLAY_COPIED_FRAME_RECORD_COUNT_MAX <= REPLAY_FRAME_RECORD_COUNT_MAX
_TIMESTAMP_OFFSET = RECORD_DTYPE.fields["timestamp_ns"][1]


@dataclasses.dataclass(frozen=True, slots=True)
class RecordFilter:
    """Opcode set, inclusive epoch range, failure-only: all must hold."""

    opcodes: frozenset[int] = frozenset()
    epoch_min: int = 0
    epoch_max: int = 0xFFFF_FFFF
    failure_only: bool = False

    @classmethod
    def from_subscribe(cls, subscribe: Subscribe) -> "RecordFilter":
        return cls(frozenset(subscribe.opcodes), subscribe.epoch_min, subscribe.epoch_max,
                   subscribe.failure_only)

    @property
    def passes_everything(self) -> bool:
        return (not self.opcodes and self.epoch_min == 0 and self.epoch_max == 0xFFFF_FFFF
                and not self.failure_only)

    def select(self, data: bytes) -> numpy.ndarray:
        """Indices of the records in `data` that pass (vectorised, no per-record Python)."""
        records = numpy.frombuffer(data, dtype=RECORD_DTYPE)
        mask = numpy.ones(len(records), dtype=bool)
        if self.opcodes:
            mask &= numpy.isin(records["opcode"],
                               numpy.fromiter(self.opcodes, dtype=numpy.uint32))
        if self.epoch_min or self.epoch_max != 0xFFFF_FFFF:
            epochs = records["epoch"]
            mask &= (epochs >= self.epoch_min) & (epochs <= self.epoch_max)
        if self.failure_only:
            mask &= ((records["slot_status"] != 0) | (records["failure_class"] != 0)
                     | (records["backend_code"] != 0) | (records["output_digest"] != 0))
        return numpy.flatnonzero(mask)


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """What subscriptions sent, by tenant id (tenants that sent anything)."""

    records_out: Mapping[int, int]  # records handed to the consumer's send
    bytes_out: Mapping[int, int]
    gaps: Mapping[int, int]  # Gap events: a subscriber fell behind eviction


class SubscriptionCounters:
    """The counts of every subscription of one daemon; one dict add per read,
    never per record. Bounded by TENANT_COUNT_MAX keys."""

    def __init__(self):
        self._records_out: dict[int, int] = {}
        self._bytes_out: dict[int, int] = {}
        self._gaps: dict[int, int] = {}

    def _sent(self, tenant_id: int, records: bytes) -> None:
        self._records_out[tenant_id] = (self._records_out.get(tenant_id, 0)
                                        + len(records) // RECORD_SIZE_BYTES)
        self._bytes_out[tenant_id] = self._bytes_out.get(tenant_id, 0) + len(records)

    def _gap(self, tenant_id: int) -> None:
        self._gaps[tenant_id] = self._gaps.get(tenant_id, 0) + 1

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(MappingProxyType(dict(self._records_out)),
                                      MappingProxyType(dict(self._bytes_out)),
                                      MappingProxyType(dict(self._gaps)))


def timestamp_at(tenant: Tenant, sequence: int) -> int:
    record = tenant.ring.read(sequence, 1)
    return int.from_bytes(record[_TIMESTAMP_OFFSET:_TIMESTAMP_OFFSET + 8], "little")


def start_position(tenant: Tenant, subscribe: Subscribe) -> int:
    ring = tenant.ring
    kind = subscribe.start
    if kind == StartKind.OLDEST:
        return ring.oldest_sequence
    if kind == StartKind.LATEST:
        return ring.next_sequence
    if kind == StartKind.SEQUENCE:
        if subscribe.start_value > ring.next_sequence:  # docs/PROTOCOL.md 4.5
            raise RemoteProtocolError(
                ErrorCode.BAD_SUBSCRIBE,
                f"start sequence {subscribe.start_value} is past the tenant's next_sequence "
                f"{ring.next_sequence}; start at most there, or use LATEST")
        return subscribe.start_value
    low, high = ring.oldest_sequence, ring.next_sequence  # first record with ts >= T
    while low < high:
        middle = (low + high) // 2
        if timestamp_at(tenant, middle) < subscribe.start_value:
            low = middle + 1
        else:
            high = middle
    return low


async def find_start(tenant: Tenant, subscribe: Subscribe) -> int:
    """`start_position`, with a TIME start's binary search (up to ~24 verified
    reads, each maybe a disk wait) on a worker thread. A search the writer
    disturbed there (a read evicted or extended under it) is done again on
    the loop, where the ring cannot move."""
    if subscribe.start != StartKind.TIME:
        return start_position(tenant, subscribe)
    try:
        return await trio.to_thread.run_sync(start_position, tenant, subscribe)
    except (RingRangeError, RingCorruptError):
        return start_position(tenant, subscribe)


SendEvent = Callable[[object], Awaitable[None]]
SendRecords = Callable[[int, bytes, "tuple[int, ...] | None"], Awaitable[None]]


async def run_subscription(tenant: Tenant, subscribe: Subscribe, send: SendEvent,
                           send_records: SendRecords,
                           counters: SubscriptionCounters | None = None, *,
                           frame_record_count_max: int = REPLAY_FRAME_RECORD_COUNT_MAX
                           ) -> None:
    """Stream records until the end (no follow) or cancellation.

    `send` takes Gap and End events; `send_records(first, records, sequences)`
    sends a Records frame without building an event (the replay hot path).
    `counters` (optional) counts records, bytes and gaps, each counted as
    handed to `send_records` / `send`, before that await returns: a consumer
    that has them finds them counted. `frame_record_count_max`: records per
    unfiltered send_records call at most (REPLAY_COPIED_FRAME_RECORD_COUNT_MAX
    for a consumer that copies them into a frame).

    Raises:
        RingCorruptError: stored bytes failed verification, after every verified
            record before them was sent (the caller reports it).
        RemoteProtocolError: BAD_SUBSCRIBE, a start the tenant cannot serve.
    """
    counters = counters if counters is not None else SubscriptionCounters()
    tenant_id = tenant.tenant_id
    ring = tenant.ring
    record_filter = RecordFilter.from_subscribe(subscribe)
    unfiltered = record_filter.passes_everything
    position = await find_start(tenant, subscribe)
    buffer: memoryview | None = None  # REPLAY_READ_BUFFER_SIZE_BYTES, see there
    while True:
        oldest = ring.oldest_sequence
        if position < oldest:
            counters._gap(tenant_id)
            await send(Gap(position, oldest - 1))
            position = oldest
            continue
        next_sequence = ring.next_sequence
        if position >= next_sequence:
            if not subscribe.follow:
                await send(End(position))
                return
            buffer = data = None  # an idle follower holds no read buffer
            await tenant.wait_beyond(position)
            # Live hand-off: the batch just committed at the cursor, from the
            # writer's memory (Tenant.take_commit), not read back and
            # verified from the file; a follower that was behind reads it.
            committed = tenant.take_commit(position)
            if committed is not None:
                await _send_read(tenant_id, position, committed, record_filter, unfiltered,
                                 send_records, counters, frame_record_count_max)
                position += len(committed) // RECORD_SIZE_BYTES
            continue
        count = min(next_sequence - position, REPLAY_READ_RECORD_COUNT_MAX)
        if buffer is None or buffer.nbytes < read_buffer_size_bytes(count):
            # A live step of a few records takes a small (heap) buffer; the
            # first whole step of a replay the one it reuses to the end.
            buffer = memoryview(bytearray(
                REPLAY_READ_BUFFER_SIZE_BYTES if count == REPLAY_READ_RECORD_COUNT_MAX
                else read_buffer_size_bytes(count)))
        data, damage = await read_until_damage(ring, position, count, buffer)
        count = len(data) // RECORD_SIZE_BYTES
        if count:
            await _send_read(tenant_id, position, data, record_filter, unfiltered,
                             send_records, counters, frame_record_count_max)
        position += count
        if damage is not None:
            raise damage
        # Every read yields, whether or not anything passed the filter.
        await trio.lowlevel.checkpoint()


async def _send_read(tenant_id: int, position: int, data: memoryview | bytes,
                     record_filter: RecordFilter, unfiltered: bool, send_records: SendRecords,
                     counters: SubscriptionCounters, frame_record_count_max: int) -> None:
    """Send one read's records (those passing the filter) in even pieces. A
    function of its own so that no view of the read buffer outlives it (a
    follower lets the buffer go while it waits)."""
    if unfiltered:
        count = len(data) // RECORD_SIZE_BYTES
        step = _piece_size(count, frame_record_count_max)
        for start in range(0, count, step):
            piece = data[start * RECORD_SIZE_BYTES:(start + step) * RECORD_SIZE_BYTES]
            counters._sent(tenant_id, piece)
            await send_records(position + start, piece, None)
        return
    selected = record_filter.select(data)
    if not len(selected):
        return
    records = numpy.frombuffer(data, dtype=RECORD_DTYPE)
    step = _piece_size(len(selected), REPLAY_COPIED_FRAME_RECORD_COUNT_MAX)  # sparse: a copy
    for start in range(0, len(selected), step):
        chosen = selected[start:start + step]
        rows = records[chosen].tobytes()
        counters._sent(tenant_id, rows)
        await send_records(position + int(chosen[0]), rows, tuple((chosen + position).tolist()))


def _piece_size(count: int, piece_max: int) -> int:
    """Records per send_records call: `count` in even pieces of at most `piece_max`."""
    pieces = -(-count // piece_max)
    return -(-count // pieces)


def _read_prefix(ring, first: int, count: int, buffer: memoryview, cached_only: bool = False
                 ) -> tuple[bytes | memoryview, int]:
    """Verified records from `first`: all `count` (a view of `buffer`), or
    those before the first chunk that failed, and how many records that
    chunk asked for (0: none failed). Evicted meanwhile: what was read before.

    Raises:
        BlockingIOError: `cached_only` and not all of it is in the page cache.
    """
    try:
        return read_ring_into(ring, first, count, buffer, cached_only), 0
    except RingRangeError:
        return b"", 0
    except RingCorruptError:
        pass
    pieces = []  # the rare path (damage, or a race on a thread): fresh buffers
    position, end = first, first + count
    while position < end:  # chunk by chunk: find the first that fails
        step = min(end, (position // CHUNK_RECORD_COUNT + 1) * CHUNK_RECORD_COUNT) - position
        try:
            pieces.append(ring.read(position, step, cached_only))
        except RingRangeError:
            return b"".join(pieces), 0
        except RingCorruptError:
            return b"".join(pieces), step
        position += step
    return b"".join(pieces), 0  # whole this time: the writer had moved


async def read_until_damage(ring, first: int, count: int, buffer: memoryview
                            ) -> tuple[bytes | memoryview, RingCorruptError | None]:
    """Verified records [first, first + count), read into `buffer` (sized by
    `read_buffer_size_bytes(count)`; the records come as a view of it unless
    a chunk failed on the first try), read here when the page cache
    holds them all (no disk wait), else on a worker thread, as far as they go:
    all of them, fewer (evicted meanwhile: the caller's next turn sends a
    Gap), or those before a damaged chunk and its RingCorruptError (file and
    offset).

    A chunk that fails on the thread is read again here, on the loop, where
    the writer cannot move under it (one chunk, CHUNK_RECORD_COUNT records at
    most): only a failure here is damage.
    """
    try:
        data, failed_count = _read_prefix(ring, first, count, buffer, cached_only=True)
    except BlockingIOError:  # it would wait for the disk
        # Not abandoned on cancel: the thread is done with `buffer` when this returns.
        data, failed_count = await trio.to_thread.run_sync(_read_prefix, ring, first, count,
                                                           buffer)
    if not failed_count:
        return data, None
    at = first + len(data) // RECORD_SIZE_BYTES
    try:
        return bytes(data) + ring.read(at, failed_count), None  # a race with the writer
    except RingRangeError:
        return data, None
    except RingCorruptError as error:
        return data, error
