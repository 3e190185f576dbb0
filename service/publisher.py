"""Synchronous `Publisher` for plain Python GPU workers (no Trio in the caller).

::

    with Publisher("ringtail.sock", tenant_id=7) as publisher:
        for record in records:              # 64-byte slot records, or several concatenated
            publisher.publish(record)       # O(1): appends to a bounded buffer, returns at once
        publisher.flush(timeout=10.0)       # True once everything so far is acknowledged

The caller's `publish()` of one record checks its length, appends the bytes
object to a bounded in-process deque without taking a lock (deque.append is
atomic; the bound is read racily, so concurrent publisher threads may overshoot
it by one record each), and wakes the sender thread only when that thread is
idle (one pipe write, not one per record). Several records at once, a full
buffer, and everything else take the lock. A background thread ("sender") owns the
Unix socket (a plain `socket` with timeouts, `selectors`, and the sans-IO codec
of service/protocol.py; no Trio): it cuts the buffer into Publish batches of at
most `Welcome.publish_record_count_max` records, pipelines up to
UNACKED_BATCH_COUNT_MAX of them, and matches Acks by batch id.

Semantics
---------
Counting, in records: every record given to publish() is counted in
`published` and ends in exactly one of `acked` (the daemon made it durable),
`dropped_full` (the buffer was full; policy said drop), `rejected` (a bad
record, or a batch the daemon refused), or is still `buffered` (queued or in
flight)::

    published == acked + dropped_full + rejected + buffered

A record for which publish() raised PublisherFullError is not published and
not counted: the caller still holds it.

Buffer full (the daemon is down, slow, or unreachable, and
`buffer_record_count_max` records are waiting):

- ``policy="block"`` (default): publish() waits up to `block_timeout_s` for
  space. Then, with ``raise_on_full=True``, it raises PublisherFullError
  (records of the call that were already taken stay taken; the error says how
  many); otherwise it drops the rest of the call and counts them in
  `dropped_full`.
- ``policy="drop"``: the records that do not fit are dropped at once and
  counted in `dropped_full`.

Buffered records are never evicted to make room: what was taken is kept until
it is acknowledged or rejected (or the publisher is closed). publish() returns
how many of its records were taken; it never raises into the caller's loop
except PublisherFullError when asked, ValueError for a length that is not a
positive multiple of 64 (a bug), and PublisherClosedError after close().

Delivery is at-least-once, in publish order:

- When the connection breaks (daemon killed or restarted, socket error, a
  fatal Error frame, a protocol violation), the sender reconnects with capped
  exponential backoff (RECONNECT_DELAY_S_MIN doubling to RECONNECT_DELAY_S_MAX,
  without end while the publisher is open) and first resends, in their
  original order and with byte-identical records, every batch that was sent
  but not acknowledged. A batch that the old daemon made durable but whose Ack
  was lost is therefore stored twice: duplicates are always whole batches,
  never partial ones, and no acknowledged or buffered record goes missing.
- A batch refused with a transient code (QUOTA_EXCEEDED, STORAGE_FAILED) is
  resent after a backoff, up to TRANSIENT_RETRY_COUNT_MAX times, then counted
  as rejected. Batches sent after it may be stored before it: a transient
  refusal is the one case where ring order differs from publish order.
- Records refused for good are counted in `rejected`, dropped and never
  resent; the last error is kept in `statistics().last_error`. With
  ``check_records=True`` (default) the sender checks each record's magic and
  tenant_id before sending (vectorised, in the sender thread, the daemon's own
  check), so one bad record is dropped alone and its neighbours go through.
  With ``check_records=False`` the daemon checks, and it refuses a batch whole
  (BAD_RECORD_MAGIC, WRONG_TENANT): every record of that batch is rejected,
  and which records share a batch depends on timing.

flush(timeout) returns True once every record taken before the call has been
acknowledged, rejected or dropped (none is buffered any more): compare the
statistics to tell them apart. It returns False when the timeout passes first
(for example while the daemon is down).

Resource handling:
    A Publisher owns one sender thread, one socket (while connected), a pipe
    for waking the thread and a selector; at most `buffer_record_count_max`
    records (16 MiB at the default; about 105 bytes of Python memory per record
    published one at a time, as bytes objects are kept by reference) plus up
    to UNACKED_BATCH_COUNT_MAX batches being encoded. close() (or the `with`
    block) flushes, then stops the thread and releases everything; records
    still buffered when the close timeout passes are abandoned (they stay in
    `statistics().buffered`). The thread is a daemon thread: a process that
    exits without close() loses its buffer.

Error handling:
    The sender thread never raises into the caller: connection failures and
    daemon Error frames are counted and kept in `statistics().last_error`
    (an OSError, a ProtocolError or a service.errors.RingtailError). Why the
    last connection ended is kept apart, in `statistics().last_disconnect_error`
    (reconnect attempts overwrite last_error): the daemon's fatal Error
    (SHUTTING_DOWN on an orderly stop), or RingtailError CONNECTION_LOST when
    the connection ended without one (EOF, ECONNRESET, EPIPE: the daemon was
    killed or crashed). An unexpected exception in the sender (a bug) is
    logged, kept as last_error, and stops sending: publish() then fills the
    buffer and applies the policy.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import logging
import os
import selectors
import socket
import threading
import time

import numpy

from ringtail.ioring.record import (RECORD_DTYPE, RECORD_FAULT_MAGIC, RECORD_MAGIC,
                                    RECORD_SIZE_BYTES, check_records)
from ringtail.service import protocol
from ringtail.service.errors import RingtailError, connection_lost_error
from ringtail.service.protocol import (CLOSED, NEED_DATA, Ack, Error, ErrorCode, Hello, Ping, Pong,
                                       ProtocolError, Publish, Welcome)

__all__ = [
    "BLOCK_TIMEOUT_S_DEFAULT", "BUFFER_RECORD_COUNT_MAX", "CLOSE_TIMEOUT_S_DEFAULT",
    "CONNECT_TIMEOUT_S", "FLUSH_TIMEOUT_S_DEFAULT", "POLICIES", "RECONNECT_DELAY_S_MAX",
    "RECONNECT_DELAY_S_MIN", "SEND_TIMEOUT_S", "TRANSIENT_RETRY_COUNT_MAX",
    "UNACKED_BATCH_COUNT_MAX", "Publisher", "PublisherClosedError", "PublisherError",
    "PublisherFullError", "PublisherStatistics",
]

log = logging.getLogger("ringtail.publisher")

# Records buffered in the caller's process (queued + in flight), at most and by
# default: 262,144 x 64 B = 16 MiB of record bytes, about 4 s of a busy
# daemon's throughput, long enough to ride out a daemon restart.
# A publisher may lower it, never raise it.
BUFFER_RECORD_COUNT_MAX = 262_144
# Publish batches sent and not yet answered, per connection: 16 x 256 KiB =
# 4 MiB on the wire at most. Below the daemon's CONNECTION_UNACKED_BATCH_COUNT_MAX
# (64), so the daemon never stops reading us; enough to cover the fsync of one
# group commit while the next gathers.
UNACKED_BATCH_COUNT_MAX = 16
# Reconnect backoff after the connection broke or could not be made: doubles
# from MIN to MAX and stays there (no attempt limit: a sidecar comes back).
RECONNECT_DELAY_S_MIN = 0.02
RECONNECT_DELAY_S_MAX = 2.0
# Seconds for connect() plus the Hello/Welcome handshake.
CONNECT_TIMEOUT_S = 5.0
# Seconds one blocking send may make no progress before the connection is
# declared dead (a stopped daemon); its unacknowledged batches are then resent.
SEND_TIMEOUT_S = 30.0
# Resends of one batch refused with a transient code (QUOTA_EXCEEDED,
# STORAGE_FAILED), with the reconnect backoff between them, before its records
# are counted as rejected.
TRANSIENT_RETRY_COUNT_MAX = 8
# Chunks (publish() calls) the sender takes from the buffer under the lock
# at once: bounds how long it holds the lock (~40 ns per chunk), and gives a
# batch of PUBLISH_RECORD_COUNT_MAX records from one-record publishes.
TAKE_CHUNK_COUNT_MAX = protocol.PUBLISH_RECORD_COUNT_MAX
# Bytes read from the socket at once (the protocol's one read size).
RECEIVE_SIZE_BYTES = protocol.RECEIVE_SIZE_BYTES
BLOCK_TIMEOUT_S_DEFAULT = 1.0
FLUSH_TIMEOUT_S_DEFAULT = 30.0
CLOSE_TIMEOUT_S_DEFAULT = 30.0
POLICIES = ("block", "drop")

_TRANSIENT_CODES = frozenset({ErrorCode.QUOTA_EXCEEDED, ErrorCode.STORAGE_FAILED})
# A send or receive failing with these means the daemon's end is gone: read
# what it sent before, then report its Error frame or CONNECTION_LOST.
_PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED})

assert 0 < RECONNECT_DELAY_S_MIN <= RECONNECT_DELAY_S_MAX
assert BUFFER_RECORD_COUNT_MAX >= protocol.PUBLISH_RECORD_COUNT_MAX
assert 1 <= UNACKED_BATCH_COUNT_MAX <= 64  # the daemon's CONNECTION_UNACKED_BATCH_COUNT_MAX
# After next_event() returns NEED_DATA the codec holds less than one frame; one
# more read must fit beside it.
assert (RECEIVE_SIZE_BYTES + protocol.FRAME_HEADER_SIZE_BYTES + protocol.FRAME_SIZE_BYTES_MAX
        <= protocol.RECEIVE_BUFFER_BYTES_MAX)


class PublisherError(Exception):
    """Base of the errors the Publisher raises into its caller."""


class PublisherFullError(PublisherError):
    """The buffer stayed full for block_timeout_s (policy "block", raise_on_full=True).

    Attributes:
        accepted_count: records of this call that were taken before it gave up
            (they will be sent); the other records of the call were not.
        record_count: records in the call.
    """

    def __init__(self, message: str, accepted_count: int, record_count: int):
        super().__init__(message)
        self.accepted_count = accepted_count
        self.record_count = record_count


class PublisherClosedError(PublisherError):
    """publish() after close(): the publisher was closed by its owner."""


@dataclasses.dataclass(frozen=True, slots=True)
class PublisherStatistics:
    """A consistent snapshot; counts are records unless named otherwise.

    `published` is derived (the one-record fast path counts nothing):
    published == acked + dropped_full + rejected + buffered.
    """

    published: int  # given to publish()/publish_many(): taken or dropped
    acked: int  # acknowledged durable by the daemon (a resent batch counts once)
    dropped_full: int  # dropped because the buffer was full
    rejected: int  # refused for good (bad record, or a batch the daemon refused)
    resent: int  # records sent again (connection lost or transient refusal)
    reconnects: int  # connections made after an earlier one was lost
    buffered: int  # taken and not yet acked or rejected (queued or in flight)
    connected: bool  # the sender holds a connection now
    last_error: Exception | None  # the most recent failure (connection or rejection)
    # Why the most recent connection ended (None until one has): the daemon's
    # fatal Error (SHUTTING_DOWN when it stopped in order), RingtailError
    # CONNECTION_LOST when it ended without one, or another OSError/ProtocolError.
    last_disconnect_error: Exception | None


class _ConnectionLost(ConnectionError):
    """The connection is unusable; reconnect and resend what was not acknowledged.

    Its argument is a message, or a RingtailError (the daemon's fatal Error,
    or CONNECTION_LOST when the connection ended without one); the latter is
    what statistics().last_error and last_disconnect_error show.
    """


class _Batch:
    """One Publish batch: its records are fixed when it is cut and resent as they are."""

    __slots__ = ("batch_id", "records", "count", "ordinal", "sent", "resend", "retry_count")

    def __init__(self, batch_id: int, records: bytes, ordinal: int):
        self.batch_id = batch_id
        self.records = records
        self.count = len(records) // RECORD_SIZE_BYTES
        self.ordinal = ordinal  # ordinal of the first taken record this batch answers for
        self.sent = False  # sent on the current connection, answer pending
        self.resend = False  # was sent before; the next send is a resend
        self.retry_count = 0  # transient refusals so far


def _check_arguments(tenant_id: int, token: bytes, client_name: str, policy: str,
                     block_timeout_s: float, buffer_record_count_max: int) -> None:
    """Raise ValueError for a bad argument here, not later in the sender thread."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: use one of {', '.join(POLICIES)}")
    if not 1 <= buffer_record_count_max <= BUFFER_RECORD_COUNT_MAX:
        raise ValueError(f"buffer_record_count_max {buffer_record_count_max} is outside "
                         f"1..BUFFER_RECORD_COUNT_MAX ({BUFFER_RECORD_COUNT_MAX}); lower it")
    if not block_timeout_s >= 0:
        raise ValueError(f"block_timeout_s {block_timeout_s} must be >= 0")
    try:
        Hello(tenant_id, token, client_name)  # the codec's own checks of these fields
    except ProtocolError as error:
        raise ValueError(error.message) from None


class Publisher:
    """Publishes slot records to one tenant of a ringtail daemon, from plain threads.

    Args:
        socket_path: the daemon's Unix socket.
        tenant_id: the tenant (Hello.tenant_id); records must carry it.
        token: bearer token for the Hello (empty on the Unix socket).
        client_name: for the daemon's logs and metrics.
        policy: "block" or "drop": what publish() does when the buffer is full.
        block_timeout_s: "block": seconds publish() waits for space.
        raise_on_full: "block": raise PublisherFullError after the wait
            instead of dropping and counting.
        buffer_record_count_max: records buffered at most, 1..BUFFER_RECORD_COUNT_MAX.
        check_records: check magic and tenant_id in the sender thread, so a
            bad record is dropped alone rather than sinking its whole batch.

    Raises:
        ValueError: an argument is out of range.

    The module docstring states the delivery, counting and full-buffer semantics.

    Resource handling:
        Starts its sender thread at once (it connects in the background);
        close() or the `with` block flushes and releases it.

    Error handling:
        Nothing from the connection reaches publish(); see statistics().
    """

    def __init__(self, socket_path: str, tenant_id: int, *, token: bytes = b"",
                 client_name: str = "ringtail-publisher", policy: str = "block",
                 block_timeout_s: float = BLOCK_TIMEOUT_S_DEFAULT, raise_on_full: bool = False,
                 buffer_record_count_max: int = BUFFER_RECORD_COUNT_MAX,
                 check_records: bool = True):
        _check_arguments(tenant_id, token, client_name, policy, block_timeout_s,
                         buffer_record_count_max)
        self.socket_path = socket_path
        self.tenant_id = tenant_id
        self._token = token
        self._client_name = client_name
        self._block = policy == "block"
        self._block_timeout_s = block_timeout_s
        self._raise_on_full = raise_on_full
        self._buffer_record_count_max = buffer_record_count_max
        self._check_records = check_records

        # Shared state. The one-record fast path of publish() appends to
        # _pending without the lock (deque.append is atomic under the GIL) and
        # reads two attributes; everything else changes under _lock.
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # publishers waiting for room
        self._resolved = threading.Condition(self._lock)  # flush() waiting for acks
        self._pending: collections.deque[bytes] = collections.deque()  # taken, not yet seen
        # Records buffered (taken, not yet acked or rejected) == len(_pending)
        # + _buffered_extra: a chunk of n records adds n - 1; the sender adds 1
        # per chunk it pops and subtracts each record it resolves.
        self._buffered_extra = 0
        self._admit_limit = buffer_record_count_max  # -1 once closed (sends publish() slow)
        self._dropped_full = 0
        self._sender_idle = False  # the sender waits for records: wake it on publish
        self._space_waiters = 0
        self._flush_waiters = 0
        self._closed = False
        self._close_flushed = False
        self._stopping = False
        self._rejection_logged = False  # log the first rejection; count the others
        # ... and the sender's, published for statistics() and flush():
        self._acked = 0
        self._rejected = 0
        self._resent = 0
        self._reconnects = 0
        self._connected = False
        self._last_error: Exception | None = None
        self._last_disconnect_error: Exception | None = None
        # Ordinal (0-based count of taken records) of the oldest taken record
        # not yet acked or rejected; flush() waits for it to pass its target.
        self._unresolved_ordinal = 0

        # The sender thread's own state (no lock).
        self._batches: dict[int, _Batch] = {}  # unanswered batches, oldest first
        self._in_flight = 0  # batches in _batches sent on the current connection
        self._staged: memoryview | None = None  # taken from _pending, not yet cut
        self._staged_offset = 0  # bytes of _staged already cut
        self._cut_ordinal = 0  # ordinal of the first record of _staged not yet cut
        self._batch_ids = itertools.count(1)
        self._batch_record_count_max = protocol.PUBLISH_RECORD_COUNT_MAX
        self._send_not_before = 0.0  # monotonic: pause after a transient refusal

        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ringtail-publisher-{tenant_id}")
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------

    def publish(self, records: bytes) -> int:
        """Take one 64-byte record, or several concatenated, and return at once.

        Args:
            records: whole 64-byte slot records (bytes; a bytearray or memoryview
                is copied first, so the caller may reuse it).

        Returns:
            How many records were taken (the rest were dropped and counted in
            `dropped_full`, only when the buffer was full).

        Raises:
            ValueError: the length is not a positive multiple of 64.
            PublisherFullError: policy "block" with raise_on_full=True, and no
                room came within block_timeout_s.
            PublisherClosedError: the publisher was closed.
        """
        if len(records) != RECORD_SIZE_BYTES:
            return self._publish_records(records)
        if type(records) is not bytes:
            records = bytes(records)  # never keep a buffer the caller may reuse
        pending = self._pending
        # Read without the lock: concurrent publishers may each pass this check
        # at once, so the buffer can exceed its bound by one record per thread.
        if len(pending) + self._buffered_extra >= self._admit_limit:
            with self._lock:
                return self._admit(records, 1)
        pending.append(records)
        if self._sender_idle:  # the sender sets it before it last looks at _pending
            self._wake_sender()
        return 1

    def _publish_records(self, records: bytes) -> int:
        """publish() of several records (or of a bad length), under the lock."""
        size = len(records)
        if size % RECORD_SIZE_BYTES or not size:
            raise ValueError(f"publish() takes whole {RECORD_SIZE_BYTES}-byte records, got "
                             f"{size} bytes; pass a multiple of {RECORD_SIZE_BYTES}")
        if type(records) is not bytes:
            records = bytes(records)
        with self._lock:
            return self._admit(records, size // RECORD_SIZE_BYTES)

    def publish_many(self, buffer) -> int:
        """publish() for a prebuilt buffer of many records (bytes, bytearray, numpy array...).

        The buffer is copied once (the caller may reuse it). A buffer larger
        than the free space is taken in part and the rest waits or is dropped
        as the policy says.

        Raises:
            ValueError: not C-contiguous, or not a positive multiple of 64 bytes.
            PublisherFullError, PublisherClosedError: as publish().
        """
        view = memoryview(buffer)
        if not view.c_contiguous:
            raise ValueError("publish_many() needs a C-contiguous buffer of records")
        return self.publish(view.cast("B") if view.format != "B" or view.ndim != 1 else view)

    def _admit(self, records: bytes, count: int) -> int:
        """Take what fits; then wait, raise or drop as the policy says. Lock held."""
        accepted = 0
        deadline = None
        while True:
            if self._closed:
                raise PublisherClosedError(
                    f"publish() of {count - accepted} records after close(); "
                    "create a new Publisher")
            room = self._admit_limit - len(self._pending) - self._buffered_extra
            if room > 0:
                take = min(room, count - accepted)
                start = accepted * RECORD_SIZE_BYTES
                self._pending.append(records if take == count else
                                     records[start:start + take * RECORD_SIZE_BYTES])
                self._buffered_extra += take - 1
                accepted += take
                if self._sender_idle:
                    self._wake_sender()
                if accepted == count:
                    return accepted
                continue
            if self._block:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._block_timeout_s
                if now < deadline:
                    self._space_waiters += 1
                    try:
                        self._space.wait(deadline - now)
                    finally:
                        self._space_waiters -= 1
                    continue
                if self._raise_on_full:
                    raise PublisherFullError(
                        f"the buffer held {len(self._pending) + self._buffered_extra} records "
                        f"(buffer_record_count_max {self._buffer_record_count_max}) for "
                        f"block_timeout_s ({self._block_timeout_s} s); {accepted} of "
                        f"{count} records were taken; the daemon is down or slow "
                        f"(last error: {self._last_error})", accepted, count)
            self._dropped_full += count - accepted
            return accepted

    def flush(self, timeout: float = FLUSH_TIMEOUT_S_DEFAULT) -> bool:
        """Wait until every record taken so far is acknowledged (or rejected/dropped).

        Returns:
            True when none of them is buffered any more; False if `timeout`
            seconds passed first (records stay buffered and keep being sent).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            # Records taken so far: each has an ordinal below this.
            target = len(self._pending) + self._buffered_extra + self._acked + self._rejected
            while self._unresolved_ordinal < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flush_waiters += 1
                try:
                    self._resolved.wait(remaining)
                finally:
                    self._flush_waiters -= 1
            return True

    def statistics(self) -> PublisherStatistics:
        with self._lock:
            buffered = len(self._pending) + self._buffered_extra
            return PublisherStatistics(
                published=buffered + self._acked + self._rejected + self._dropped_full,
                acked=self._acked, dropped_full=self._dropped_full, rejected=self._rejected,
                resent=self._resent, reconnects=self._reconnects, buffered=buffered,
                connected=self._connected, last_error=self._last_error,
                last_disconnect_error=self._last_disconnect_error)

    def close(self, timeout: float = CLOSE_TIMEOUT_S_DEFAULT) -> bool:
        """Stop taking records, flush up to `timeout` seconds, then stop the sender.

        Returns:
            True if everything was flushed; False if records were abandoned
            (still counted in statistics().buffered). Closing again returns
            the first answer and does nothing.
        """
        with self._lock:
            if self._closed:
                return self._close_flushed
            self._closed = True
            self._admit_limit = -1
            self._space.notify_all()  # blocked publishers raise PublisherClosedError
        flushed = self._close_flushed = self.flush(timeout)
        with self._lock:
            self._stopping = True
        self._wake()
        # The sender stops at its next wakeup; a send or connect in progress
        # ends within its own timeout.
        self._thread.join(SEND_TIMEOUT_S + CONNECT_TIMEOUT_S)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)
        return flushed

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wake_sender(self) -> None:
        self._sender_idle = False  # one wakeup is enough: later publishers skip it
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wakeups already: the sender will wake
        except OSError:
            if not self._closed:  # a publish racing close(): the pipe may be gone
                raise

    # -- the sender thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._sender_loop()
        except Exception as error:  # a bug: keep it visible, never kill the caller
            log.exception("ringtail publisher: sender thread failed; records are no "
                          "longer sent")
            with self._lock:
                self._last_error = error
                self._connected = False
        finally:
            with self._lock:
                self._stopping = True
            self._selector.close()  # the pipe is closed by close(), once this thread is gone

    def _sender_loop(self) -> None:
        delay_s = RECONNECT_DELAY_S_MIN
        ever_connected = False
        outage_logged = False
        while not self._stopping:
            try:
                sock, connection = self._connect()
            except (OSError, ProtocolError, _ConnectionLost) as error:
                self._note_error(error)
                if not outage_logged:
                    log.warning("ringtail publisher: cannot reach %s: %s; buffering and "
                                "retrying with backoff", self.socket_path, error)
                    outage_logged = True
                self._wait_for_wakeup(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)
                continue
            delay_s = RECONNECT_DELAY_S_MIN
            if outage_logged or ever_connected:
                log.info("ringtail publisher: connected to %s", self.socket_path)
            outage_logged = False
            with self._lock:
                self._connected = True
                self._reconnects += ever_connected
            ever_connected = True
            self._selector.register(sock, selectors.EVENT_READ)
            try:
                self._serve_connection(sock, connection)
            except (OSError, ProtocolError, _ConnectionLost) as error:
                if isinstance(error, OSError) and error.errno in _PEER_GONE_ERRNOS:
                    error = self._failure_after_peer_gone(sock, connection, error)
                self._note_error(error, disconnect=True)
                log.warning("ringtail publisher: connection to %s lost: %s; %d unacknowledged "
                            "batches will be resent", self.socket_path, error, self._in_flight)
                outage_logged = True
            finally:
                self._selector.unregister(sock)
                sock.close()
                with self._lock:
                    self._connected = False
                    self._sender_idle = False
                self._requeue()

    def _wait_for_wakeup(self, timeout_s: float | None) -> None:
        for key, _ in self._selector.select(timeout_s):
            if key.fd == self._wake_read:
                self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _note_error(self, error: Exception, *, disconnect: bool = False) -> None:
        if isinstance(error, _ConnectionLost) and error.args and isinstance(
                error.args[0], Exception):
            error = error.args[0]
        with self._lock:
            self._last_error = error
            if disconnect:
                self._last_disconnect_error = error

    def _failure_after_peer_gone(self, sock: socket.socket, connection: protocol.Connection,
                                 error: OSError) -> Exception:
        """A send or receive failed with EPIPE or ECONNRESET: handle what the
        daemon sent before it closed (its answers, then its fatal Error if it
        stopped in order), and return why the connection ended."""
        sock.settimeout(0)  # what it sent is already here: read it, never wait
        try:
            while True:  # ends: EOF or a fatal Error raise _ConnectionLost
                self._receive(sock, connection, answer_pings=False)
        except BlockingIOError:
            pass  # nothing more to read, though the socket is not at EOF
        except _ConnectionLost as lost:
            reason = lost.args[0] if lost.args else None
            if not (isinstance(reason, RingtailError)
                    and reason.code == ErrorCode.CONNECTION_LOST):
                return lost  # the daemon's Error frame, or a protocol violation
        except ProtocolError as violation:
            return violation
        except OSError:
            pass  # the reset itself, read again
        return _ConnectionLost(connection_lost_error(self.socket_path, error.strerror))

    def _connect(self) -> tuple[socket.socket, protocol.Connection]:
        """Connect and handshake; the Welcome sets the batch size."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(self.socket_path)
            connection = protocol.Connection(protocol.CLIENT)
            sock.sendall(connection.send(Hello(self.tenant_id, self._token, self._client_name)))
            while True:
                event = connection.next_event()
                if event is NEED_DATA:
                    connection.receive_data(sock.recv(RECEIVE_SIZE_BYTES))
                    continue
                if event is CLOSED:
                    raise _ConnectionLost(connection_lost_error(
                        self.socket_path, "during the handshake"))
                if isinstance(event, Error):
                    raise _ConnectionLost(RingtailError.from_event(event))
                if isinstance(event, Welcome):
                    break
            sock.settimeout(SEND_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        self._batch_record_count_max = min(event.publish_record_count_max,
                                           protocol.PUBLISH_RECORD_COUNT_MAX)
        self._split_oversize_batches()
        return sock, connection

    def _serve_connection(self, sock: socket.socket, connection: protocol.Connection) -> None:
        while True:
            now = time.monotonic()
            paused = now < self._send_not_before
            if not paused:
                self._send_batches(sock, connection)
            if self._stopping:
                return
            can_take = (not paused and self._in_flight < UNACKED_BATCH_COUNT_MAX
                        and self._staged is None)
            # Only an idle sender is woken by publish(); a busy one comes back
            # here after its next Ack anyway. Set the flag, then look at
            # _pending: a publisher that appended before the flag was set is
            # seen here, one that appends after it sees the flag and wakes us.
            self._sender_idle = can_take
            if can_take and self._pending:
                self._sender_idle = False
                continue  # records arrived meanwhile: cut them before waiting
            for key, _ in self._selector.select(self._send_not_before - now if paused else None):
                if key.fd == self._wake_read:
                    self._drain_wakeups()
                else:
                    self._receive(sock, connection)

    def _send_batches(self, sock: socket.socket, connection: protocol.Connection) -> None:
        """Send unsent batches (oldest first), then new ones, while the window has room."""
        for batch in list(self._batches.values()):
            if self._in_flight >= UNACKED_BATCH_COUNT_MAX:
                return
            if not batch.sent:
                self._send(sock, connection, batch)
        while self._in_flight < UNACKED_BATCH_COUNT_MAX:
            batch = self._cut_batch()
            if batch is None:
                return
            self._send(sock, connection, batch)

    def _send(self, sock: socket.socket, connection: protocol.Connection, batch: _Batch) -> None:
        if batch.resend:
            batch.resend = False
            with self._lock:
                self._resent += batch.count
        batch.sent = True
        self._in_flight += 1
        sock.sendall(connection.send(Publish(batch.batch_id, batch.records)))

    def _cut_batch(self) -> _Batch | None:
        """The next batch from the taken records (checked, if asked), or None."""
        while True:
            if self._staged is None:
                with self._lock:
                    pending = self._pending
                    chunk_count = min(len(pending), TAKE_CHUNK_COUNT_MAX)
                    if not chunk_count:
                        return None
                    chunks = [pending.popleft() for _ in range(chunk_count)]
                    self._buffered_extra += chunk_count  # still buffered, now held here
                self._staged = memoryview(b"".join(chunks))
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
                records, bad_count = bytes(view), 0
            else:
                records, bad_count = self._checked(view)
            batch = None
            if records:
                batch = _Batch(next(self._batch_ids), records, ordinal)
                self._batches[batch.batch_id] = batch
            if bad_count:  # after the batch is listed: flush() must still wait for it
                self._resolve(bad_count, acked=False)
            if batch is not None:
                return batch

    def _checked(self, view: memoryview) -> tuple[bytes, int]:
        """The records of `view` the daemon would take, and how many it would refuse.

        The check is the daemon's own (ioring.record.check_records).
        """
        fault = check_records(view, self.tenant_id)
        if fault is None:
            return bytes(view), 0
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
                f"{self.tenant_id}; publish each tenant's records with its own Publisher")
        self._log_rejection(str(error))
        with self._lock:
            self._last_error = error
        array = numpy.frombuffer(view, dtype=RECORD_DTYPE)
        good = (array["magic"] == RECORD_MAGIC) & (array["tenant_id"] == self.tenant_id)
        return array[good].tobytes(), fault.bad_count

    def _log_rejection(self, message: str) -> None:
        """Warn once (a bad encoder would flood the log); statistics() count them all."""
        if self._rejection_logged:
            log.debug("ringtail publisher: %s", message)
            return
        self._rejection_logged = True
        log.warning("ringtail publisher: %s (further rejections are only counted: see "
                    "statistics().rejected)", message)

    def _receive(self, sock: socket.socket, connection: protocol.Connection, *,
                 answer_pings: bool = True) -> None:
        data = sock.recv(RECEIVE_SIZE_BYTES)
        connection.receive_data(data)  # b"": EOF
        while True:
            try:
                event = connection.next_event()
            except protocol.RemoteProtocolError:
                if data:
                    raise
                # After EOF the codec only refuses the partial frame the daemon
                # left: it died (or was cut off) in the middle of a write.
                buffered = connection.statistics().buffered_bytes
                raise _ConnectionLost(connection_lost_error(
                    self.socket_path, f"it ended {buffered} bytes into a frame")) from None
            if event is NEED_DATA:
                return
            if event is CLOSED:
                raise _ConnectionLost(connection_lost_error(self.socket_path))
            if isinstance(event, Ack):
                self._on_ack(event)
            elif isinstance(event, Error):
                self._on_error(event)
            elif isinstance(event, Ping) and answer_pings:
                sock.sendall(connection.send(Pong(event.nonce)))

    def _on_ack(self, ack: Ack) -> None:
        batch = self._batches.get(ack.batch_id)
        if batch is None or not batch.sent:
            raise _ConnectionLost(f"the daemon acknowledged batch {ack.batch_id}, which is not "
                                  "in flight on this connection")
        if ack.last_sequence - ack.first_sequence + 1 != batch.count:
            log.warning("ringtail publisher: batch %d of %d records acknowledged as "
                        "sequences %d..%d", batch.batch_id, batch.count, ack.first_sequence,
                        ack.last_sequence)
        del self._batches[ack.batch_id]
        self._in_flight -= 1
        self._resolve(batch.count, acked=True)

    def _on_error(self, event: Error) -> None:
        error = RingtailError.from_event(event)
        if event.fatal:
            raise _ConnectionLost(error)
        batch = self._batches.get(event.batch_id)
        if batch is None or not batch.sent:
            raise _ConnectionLost(f"the daemon refused batch {event.batch_id}, which is not "
                                  f"in flight on this connection: {error}")
        with self._lock:
            self._last_error = error
        self._in_flight -= 1
        batch.sent = False
        if event.code in _TRANSIENT_CODES and batch.retry_count < TRANSIENT_RETRY_COUNT_MAX:
            batch.retry_count += 1
            batch.resend = True
            self._send_not_before = time.monotonic() + min(
                RECONNECT_DELAY_S_MIN * 2 ** batch.retry_count, RECONNECT_DELAY_S_MAX)
            return
        self._log_rejection(f"{batch.count} records rejected: {error}")
        del self._batches[batch.batch_id]
        self._resolve(batch.count, acked=False)

    def _resolve(self, count: int, *, acked: bool) -> None:
        """Count `count` records as acked or rejected; wake flush() and blocked publishers."""
        if self._batches:
            ordinal = next(iter(self._batches.values())).ordinal
        else:
            ordinal = self._cut_ordinal
        with self._lock:
            self._buffered_extra -= count
            if acked:
                self._acked += count
            else:
                self._rejected += count
            self._unresolved_ordinal = ordinal
            if self._flush_waiters:
                self._resolved.notify_all()
            if self._space_waiters:
                self._space.notify_all()

    def _requeue(self) -> None:
        """The connection is gone: every batch in flight is resent on the next one."""
        for batch in self._batches.values():
            if batch.sent:
                batch.sent = False
                batch.resend = True
        self._in_flight = 0
        self._send_not_before = 0.0

    def _split_oversize_batches(self) -> None:
        """A new Welcome allows fewer records per batch: split the kept batches, in order."""
        limit_size = self._batch_record_count_max * RECORD_SIZE_BYTES
        if all(len(batch.records) <= limit_size for batch in self._batches.values()):
            return
        batches: dict[int, _Batch] = {}
        for batch in self._batches.values():
            for start in range(0, len(batch.records), limit_size):
                part = _Batch(next(self._batch_ids), batch.records[start:start + limit_size],
                              batch.ordinal)  # the whole range stays unresolved until all acked
                part.resend = batch.resend
                batches[part.batch_id] = part
        self._batches = batches
