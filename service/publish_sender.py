"""The Publisher's sender, sans-IO: records in, Publish frames out, Acks and Errors in.

`PublishSender` holds the publisher's side of the protocol for one connection
at a time and every batch not yet answered, across connections. It has no
socket, no thread and no clock (the caller passes `now`, in seconds of any
monotonic clock); like `ringtail.service.protocol.Connection`, bytes go in and
bytes come out::

    sender = PublishSender(buffer, Hello(tenant_id, token, name), peer="ringtail.sock")
    sock.sendall(sender.start_connection())          # the Hello
    while not sender.ready:                           # until the Welcome
        sender.receive_data(sock.recv(RECEIVE_SIZE_BYTES), now)
    while True:
        sock.sendall(sender.data_to_send(now))        # Publish frames the window allows
        sock.sendall(sender.receive_data(sock.recv(...), now))   # Acks in, Pongs out
    ...
    sender.connection_lost()                          # then start_connection() again

What it does:

- Cutting: it takes publish() chunks from its `RecordSource` (the Publisher's
  PublishBuffer) and cuts them into batches of at most the Welcome's
  `publish_record_count_max` records (`check_records=True`: after dropping the
  records the daemon would refuse, counted as rejected). A batch's records are
  fixed when it is cut: every resend is byte-identical.
- Window: at most `window_batch_count_max` (UNACKED_BATCH_COUNT_MAX) batches
  are sent and unanswered on a connection; `data_to_send()` cuts nothing more
  until an Ack or Error frees a place.
- Acks resolve their batch's records as acked; the source's flush ordinal
  follows the oldest batch still kept, so flush() waits for earlier batches
  even when a later one is answered first.
- Resend: `connection_lost()` marks every batch in flight for resending; on
  the next connection, unsent kept batches go first, in their original order,
  before anything new is cut. A Welcome with a smaller
  publish_record_count_max splits the kept batches, in order.
- Refusals (non-fatal Error frames, one batch each): QUOTA_EXCEEDED and
  STORAGE_FAILED are transient: the batch is resent after a backoff
  (`send_not_before`), up to TRANSIENT_RETRY_COUNT_MAX times, then rejected.
  BATCH_TOO_LARGE lowers the batch size to half the refused batch (rounded
  down) and splits it (and every unsent kept batch over the new size), in
  order, for the rest of the connection; a one-record
  batch refused so is rejected. Any other code rejects the batch's records,
  never resent; the error is the source's last_error.
- Fatal Error frames, EOF and protocol violations end the connection:
  `receive_data()` raises ConnectionEndedError with the reason.

Exactly once (docs/PROTOCOL.md 4.12): when the Hello names a producer id,
each batch gets a producer sequence the first time it is sent, and keeps it
across resends after a lost connection, so the daemon answers a batch it
already stored with the original Ack. A batch refused with a non-fatal
Error was not stored: it loses its number and gets a new one when it is
sent again (so a resend after a backoff is never taken for one the window
has passed). The window (`window_batch_count_max`) is at most the daemon's
PRODUCER_ACK_COUNT_MAX, so every batch it can resend is in the daemon's
window.

Ordering: without transient refusals and BATCH_TOO_LARGE, batches are stored
in cut order; a refused batch resent later may be stored after batches cut
after it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import numpy

from ringtail.ioring.producers import PRODUCER_ACK_COUNT_MAX
from ringtail.ioring.record import (RECORD_DTYPE, RECORD_FAULT_MAGIC, RECORD_MAGIC,
                                    RECORD_SIZE_BYTES, check_records)
from ringtail.service.errors import RingtailError, connection_lost_error
from ringtail.service.protocol import (CLIENT, CLOSED, NEED_DATA, PUBLISH_RECORD_COUNT_MAX, Ack,
                                       Connection, Error, ErrorCode, Hello, Ping, Pong, Publish,
                                       RemoteProtocolError, Welcome)
from ringtail.service.publish_buffer import TAKE_CHUNK_COUNT_MAX

__all__ = [
    "RETRY_DELAY_S_MAX", "RETRY_DELAY_S_MIN", "TRANSIENT_CODES", "TRANSIENT_RETRY_COUNT_MAX",
    "UNACKED_BATCH_COUNT_MAX", "ConnectionEndedError", "PublishSender", "RecordSource",
    "SenderStatistics",
]

log = logging.getLogger("ringtail.publisher")

# Publish batches sent and not yet answered, per connection: 16 x 256 KiB =
# 4 MiB on the wire at most. Below the daemon's CONNECTION_UNACKED_BATCH_COUNT_MAX
# (64), so the daemon never stops reading us; enough to cover the fsync of one
# group commit while the next gathers.
UNACKED_BATCH_COUNT_MAX = 16
# Every batch a producer can resend is among its last PRODUCER_ACK_COUNT_MAX
# stored ones, which the daemon remembers (docs/PROTOCOL.md 4.12).
assert UNACKED_BATCH_COUNT_MAX <= PRODUCER_ACK_COUNT_MAX
# Resends of one batch refused with a transient code (QUOTA_EXCEEDED,
# STORAGE_FAILED), with a capped doubling delay between them (RETRY_DELAY_S_MIN
# x 2^retry, at most RETRY_DELAY_S_MAX; the Publisher's reconnect backoff),
# before its records are counted as rejected.
TRANSIENT_RETRY_COUNT_MAX = 8
RETRY_DELAY_S_MIN = 0.02
RETRY_DELAY_S_MAX = 2.0
TRANSIENT_CODES = frozenset({ErrorCode.QUOTA_EXCEEDED, ErrorCode.STORAGE_FAILED})

assert 0 < RETRY_DELAY_S_MIN <= RETRY_DELAY_S_MAX
assert 1 <= UNACKED_BATCH_COUNT_MAX <= 64  # the daemon's CONNECTION_UNACKED_BATCH_COUNT_MAX


class RecordSource(Protocol):
    """Where the sender takes records and reports what became of them (PublishBuffer)."""

    def take(self, chunk_count_max: int) -> list[bytes]:
        """Up to `chunk_count_max` chunks of whole records, oldest first; [] if none."""

    def resolve(self, count: int, *, acked: bool, unresolved_ordinal: int,
                error: Exception | None = None) -> None:
        """`count` taken records were acked or rejected; the oldest unresolved has this ordinal."""

    def note_error(self, error: Exception) -> None:
        """A failure worth showing as last_error that resolved nothing."""

    def count_resent(self, count: int) -> None:
        """`count` records are being sent again."""


class ConnectionEndedError(ConnectionError):
    """The connection is unusable: reconnect, and the kept batches are resent.

    Attributes:
        reason: the daemon's fatal Error (a RingtailError: SHUTTING_DOWN on an
            orderly stop), RingtailError CONNECTION_LOST when it ended without
            one (EOF), a RemoteProtocolError (the daemon broke the protocol),
            or None when the message says it all (an answer to a batch that is
            not in flight).
    """

    def __init__(self, reason: Exception | str):
        super().__init__(str(reason))
        self.reason = reason if isinstance(reason, Exception) else None

    @property
    def report(self) -> Exception:
        """What statistics() shows for it: the reason, or this error itself."""
        return self.reason if self.reason is not None else self


class _Batch:
    """One Publish batch: its records are fixed when it is cut and resent as they are."""

    __slots__ = ("batch_id", "records", "count", "ordinal", "sent", "resend", "retry_count",
                 "producer_sequence")

    def __init__(self, batch_id: int, records: bytes, ordinal: int):
        self.batch_id = batch_id
        self.producer_sequence: int | None = None  # set when first sent (producers only)
        self.records = records
        self.count = len(records) // RECORD_SIZE_BYTES
        self.ordinal = ordinal  # ordinal of the first taken record this batch answers for
        self.sent = False  # sent on the current connection, answer pending
        self.resend = False  # was sent before; the next send is a resend
        self.retry_count = 0  # transient refusals so far


@dataclasses.dataclass(frozen=True, slots=True)
class SenderStatistics:
    """What the sender holds now; counts are batches unless named otherwise."""

    kept_batch_ids: tuple[int, ...]  # unanswered (in flight or to be sent), oldest first
    in_flight_batch_count: int  # sent on this connection, answer pending
    staged_record_count: int  # taken from the source, not yet cut into batches
    batch_record_count_max: int  # records per batch now (Welcome, lowered by BATCH_TOO_LARGE)
    send_not_before: float  # `now` before which nothing is sent (transient refusal)


class PublishSender:
    """The publisher's protocol state: batches kept until answered, across connections.

    Args:
        source: takes records from, and reports to, a RecordSource.
        hello: the Hello sent on every connection (tenant, token, name).
        peer: the daemon's address, for messages ("" if unknown).
        check_records: drop, before sending, the records the daemon would
            refuse (bad magic, another tenant), counting them rejected, so
            one bad record does not sink its whole batch.
        window_batch_count_max: batches in flight at most per connection.

    Resource handling:
        Holds every batch taken and not answered: at most
        window_batch_count_max batches in flight plus those kept from a lost
        connection (bounded by the source's buffer bound), and one staged
        take of at most TAKE_CHUNK_COUNT_MAX chunks not yet cut. One codec
        (protocol.Connection) per connection. Nothing to close.

    Error handling:
        receive_data() raises ConnectionEndedError when the connection is over
        (a fatal Error, EOF, a protocol violation, an answer to a batch not in
        flight); the caller then calls connection_lost(). A non-fatal Error is
        handled here (resent, split or rejected; see the module docstring)
        and reported to the source, never raised. data_to_send() and
        start_connection() raise nothing but LocalProtocolError, which is a
        bug in this module.
    """

    def __init__(self, source: RecordSource, hello: Hello, *, peer: str = "",
                 check_records: bool = True,
                 window_batch_count_max: int = UNACKED_BATCH_COUNT_MAX):
        assert 1 <= window_batch_count_max <= UNACKED_BATCH_COUNT_MAX
        self._source = source
        self._hello = hello
        self._peer = peer
        self._check_records = check_records
        self._window = window_batch_count_max
        self._connection: Connection | None = None
        self._batches: dict[int, _Batch] = {}  # unanswered batches, oldest first
        self._in_flight = 0  # batches in _batches sent on the current connection
        self._staged: memoryview | None = None  # taken from the source, not yet cut
        self._staged_offset = 0  # bytes of _staged already cut
        self._cut_ordinal = 0  # ordinal of the first taken record not yet cut
        self._next_batch_id = 1
        self._producer = hello.producer_id  # 0: no producer, at least once
        self._next_producer_sequence = 0
        self._batch_record_count_max = PUBLISH_RECORD_COUNT_MAX
        self.send_not_before = 0.0  # `now` before which nothing is sent (transient refusal)
        self._rejection_logged = False  # log the first rejection; count the others

    # -- connection lifecycle -------------------------------------------------------

    def start_connection(self) -> bytes:
        """A new connection: returns the Hello to send first."""
        assert self._connection is None, "connection_lost() first"
        self._connection = Connection(CLIENT)
        return self._connection.send(self._hello)

    @property
    def ready(self) -> bool:
        """The Welcome came: batches may be sent."""
        return self._connection is not None and self._connection.welcome is not None

    def connection_lost(self) -> None:
        """The connection is gone (or was never made): resend everything in flight on the next."""
        self._connection = None
        for batch in self._batches.values():
            if batch.sent:
                batch.sent = False
                batch.resend = True
        self._in_flight = 0
        self.send_not_before = 0.0

    # -- bytes in -------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Handle bytes from the daemon (b"": EOF); returns what to send back (Pongs).

        Raises:
            ConnectionEndedError: the connection is over; see the class docstring.
        """
        connection = self._connection
        assert connection is not None, "start_connection() first"
        connection.receive_data(data)
        replies = []
        while True:
            try:
                event = connection.next_event()
            except RemoteProtocolError as violation:
                if data:
                    raise ConnectionEndedError(violation) from None
                # After EOF the codec only refuses the partial frame the daemon
                # left: it died (or was cut off) in the middle of a write.
                buffered = connection.statistics().buffered_bytes
                raise ConnectionEndedError(connection_lost_error(
                    self._peer, f"it ended {buffered} bytes into a frame")) from None
            if event is NEED_DATA:
                return b"".join(replies)
            if event is CLOSED:
                raise ConnectionEndedError(connection_lost_error(
                    self._peer, "" if connection.welcome else "during the handshake"))
            event_type = type(event)
            if event_type is Ack:
                self._on_ack(event)
            elif event_type is Error:
                self._on_error(event, now)
            elif event_type is Ping:
                replies.append(connection.send(Pong(event.nonce)))
            elif event_type is Welcome:
                self._on_welcome(event)

    def _on_welcome(self, welcome: Welcome) -> None:
        self._batch_record_count_max = min(welcome.publish_record_count_max,
                                           PUBLISH_RECORD_COUNT_MAX)
        self._split_kept_batches()

    def _on_ack(self, ack: Ack) -> None:
        batch = self._batches.get(ack.batch_id)
        if batch is None or not batch.sent:
            raise ConnectionEndedError(f"the daemon acknowledged batch {ack.batch_id}, which is "
                                       "not in flight on this connection")
        if ack.last_sequence - ack.first_sequence + 1 != batch.count:
            log.warning("ringtail publisher: batch %d of %d records acknowledged as "
                        "sequences %d..%d", batch.batch_id, batch.count, ack.first_sequence,
                        ack.last_sequence)
        del self._batches[ack.batch_id]
        self._in_flight -= 1
        self._resolve(batch.count, acked=True)

    def _on_error(self, event: Error, now: float) -> None:
        error = RingtailError.from_event(event)
        if event.fatal or not self.ready:
            raise ConnectionEndedError(error)
        batch = self._batches.get(event.batch_id)
        if batch is None or not batch.sent:
            raise ConnectionEndedError(f"the daemon refused batch {event.batch_id}, which is "
                                       f"not in flight on this connection: {error}")
        self._in_flight -= 1
        batch.sent = False
        batch.producer_sequence = None  # refused, so not stored: a resend is a new batch
        if event.code in TRANSIENT_CODES and batch.retry_count < TRANSIENT_RETRY_COUNT_MAX:
            self._source.note_error(error)
            batch.retry_count += 1
            batch.resend = True
            self.send_not_before = now + min(RETRY_DELAY_S_MIN * 2 ** batch.retry_count,
                                             RETRY_DELAY_S_MAX)
            return
        if event.code == ErrorCode.BATCH_TOO_LARGE and batch.count > 1:
            self._source.note_error(error)
            batch.resend = True
            self._batch_record_count_max = min(self._batch_record_count_max,
                                               batch.count // 2)  # >= 1: count > 1 here
            self._split_kept_batches()
            return
        self._log_rejection(f"{batch.count} records rejected: {error}")
        del self._batches[batch.batch_id]
        self._resolve(batch.count, acked=False, error=error)

    # -- bytes out ------------------------------------------------------------------

    def can_take(self, now: float) -> bool:
        """data_to_send(now) would take new records from the source if it had some.

        False while paused after a transient refusal, while the window is full,
        or while taken records wait to be cut: the caller need not be woken
        by new records then.
        """
        return (self.ready and now >= self.send_not_before
                and self._in_flight < self._window and self._staged is None)

    def data_to_send(self, now: float) -> bytes:
        """Publish frames for every kept unsent batch, then new ones, while the window has room.

        Returns b"" before the Welcome and while paused (`now < send_not_before`).
        """
        if not self.ready or now < self.send_not_before:
            return b""
        frames = []
        for batch in self._batches.values():
            if self._in_flight >= self._window:
                return b"".join(frames)
            if not batch.sent:
                frames.append(self._send(batch))
        while self._in_flight < self._window:
            batch = self._cut_batch()
            if batch is None:
                break
            frames.append(self._send(batch))
        return b"".join(frames)

    def _send(self, batch: _Batch) -> bytes:
        if batch.resend:
            batch.resend = False
            self._source.count_resent(batch.count)
        batch.sent = True
        self._in_flight += 1
        if self._producer and batch.producer_sequence is None:
            batch.producer_sequence = self._next_producer_sequence
            self._next_producer_sequence += 1
        return self._connection.send(Publish(batch.batch_id, batch.records,
                                             batch.producer_sequence))

    def _cut_batch(self) -> _Batch | None:
        """The next batch from the taken records (checked, if asked), or None."""
        while True:
            if self._staged is None:
                chunks = self._source.take(TAKE_CHUNK_COUNT_MAX)
                if not chunks:
                    return None
                self._staged = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                self._staged_offset = 0
            start = self._staged_offset
            end = min(start + self._batch_record_count_max * RECORD_SIZE_BYTES,
                      len(self._staged))
            view = self._staged[start:end]
            if end == len(self._staged):
                self._staged = None
            else:
                self._staged_offset = end
            ordinal = self._cut_ordinal
            self._cut_ordinal += (end - start) // RECORD_SIZE_BYTES
            if not self._check_records:
                records, bad_count, error = bytes(view), 0, None
            else:
                records, bad_count, error = self._checked(view)
            batch = None
            if records:
                batch = self._new_batch(records, ordinal)
                self._batches[batch.batch_id] = batch
            if bad_count:  # after the batch is listed: flush() must still wait for it
                self._resolve(bad_count, acked=False, error=error)
            if batch is not None:
                return batch

    def _new_batch(self, records: bytes, ordinal: int) -> _Batch:
        batch = _Batch(self._next_batch_id, records, ordinal)
        self._next_batch_id += 1
        return batch

    def _checked(self, view: memoryview) -> tuple[bytes, int, RingtailError | None]:
        """The records of `view` the daemon would take, how many it would refuse, and why.

        The check is the daemon's own (ioring.record.check_records).
        """
        tenant_id = self._hello.tenant_id
        fault = check_records(view, tenant_id)
        if fault is None:
            return bytes(view), 0, None
        if fault.fault == RECORD_FAULT_MAGIC:
            error = RingtailError(
                ErrorCode.BAD_RECORD_MAGIC,
                f"{fault.bad_count} records rejected before sending; the first has magic "
                f"0x{fault.value:08x}, expected 0x{RECORD_MAGIC:08x}; "
                "fix the record encoder")
        else:
            error = RingtailError(
                ErrorCode.WRONG_TENANT,
                f"{fault.bad_count} records rejected before sending; the first has tenant_id "
                f"{fault.value} but this publisher is tenant "
                f"{tenant_id}; publish each tenant's records with its own Publisher")
        self._log_rejection(str(error))
        array = numpy.frombuffer(view, dtype=RECORD_DTYPE)
        good = (array["magic"] == RECORD_MAGIC) & (array["tenant_id"] == tenant_id)
        return array[good].tobytes(), fault.bad_count, error

    def _log_rejection(self, message: str) -> None:
        """Warn once (a bad encoder would flood the log); the source counts them all."""
        if self._rejection_logged:
            log.debug("ringtail publisher: %s", message)
            return
        self._rejection_logged = True
        log.warning("ringtail publisher: %s (further rejections are only counted: see "
                    "statistics().rejected)", message)

    def _resolve(self, count: int, *, acked: bool, error: Exception | None = None) -> None:
        if self._batches:
            ordinal = next(iter(self._batches.values())).ordinal
        else:
            ordinal = self._cut_ordinal
        self._source.resolve(count, acked=acked, unresolved_ordinal=ordinal, error=error)

    def _split_kept_batches(self) -> None:
        """Split every kept batch not in flight that is over the batch size, in order."""
        limit_size = self._batch_record_count_max * RECORD_SIZE_BYTES
        if all(len(batch.records) <= limit_size or batch.sent
               for batch in self._batches.values()):
            return
        batches: dict[int, _Batch] = {}
        for batch in self._batches.values():
            if len(batch.records) <= limit_size or batch.sent:
                batches[batch.batch_id] = batch
                continue
            for start in range(0, len(batch.records), limit_size):
                # Every part answers for the batch's first ordinal: the whole
                # range stays unresolved until all parts are answered.
                part = self._new_batch(batch.records[start:start + limit_size], batch.ordinal)
                part.resend = batch.resend
                batches[part.batch_id] = part
        self._batches = batches

    # -- inspection -----------------------------------------------------------------

    @property
    def in_flight_batch_count(self) -> int:
        return self._in_flight

    def statistics(self) -> SenderStatistics:
        staged = 0 if self._staged is None else len(self._staged) - self._staged_offset
        return SenderStatistics(tuple(self._batches), self._in_flight,
                                staged // RECORD_SIZE_BYTES, self._batch_record_count_max,
                                self.send_not_before)
