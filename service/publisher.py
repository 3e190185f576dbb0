"""Synchronous `Publisher` for plain Python GPU workers (no Trio in the caller).

::

    with Publisher("ringtail.sock", tenant_id=7) as publisher:
        for record in records:              # 64-byte slot records, or several concatenated
            publisher.publish(record)       # O(1): appends to a bounded buffer, returns at once
        publisher.flush(timeout=10.0)       # True once everything so far is acknowledged

Three parts, data flowing one way:

- `service/publish_buffer.py`, the buffer and its full-buffer policy: the
  caller's `publish()` of one record checks its length and appends the bytes
  object to a bounded deque without taking a lock (deque.append is atomic; the
  bound is read racily, so concurrent publisher threads may overshoot it by
  one record each), and wakes the sender thread only when that thread is idle
  (one pipe write, not one per record). Several records at once, a full
  buffer, and everything else take the lock.
- `service/publish_sender.py`, the sans-IO sender: cuts the buffer into
  Publish batches of at most `Welcome.publish_record_count_max` records,
  pipelines up to UNACKED_BATCH_COUNT_MAX of them, matches Acks and Errors by
  batch id, resends and splits; no socket, no thread, no clock.
- this module: the public `Publisher`, whose background thread ("sender")
  owns the Unix socket (a plain `socket` with timeouts and `selectors`; no
  Trio), reconnects with backoff, and only moves bytes between the socket and
  the sans-IO sender.

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

Delivery is exactly once by default (``exactly_once=True``), in publish order:

- When the connection breaks (daemon killed or restarted, socket error, a
  fatal Error frame, a protocol violation), the sender reconnects with capped
  exponential backoff (RECONNECT_DELAY_S_MIN doubling to RECONNECT_DELAY_S_MAX,
  without end while the publisher is open) and first resends, in their
  original order and with byte-identical records, every batch that was sent
  but not acknowledged. No acknowledged or buffered record goes missing.
- The Publisher names itself with a random producer id and numbers its
  batches (docs/PROTOCOL.md 4.12): a resent batch that the daemon already
  made durable (its Ack was lost) is answered with its original Ack and not
  stored again, also across a daemon restart or `kill -9`. The exceptions
  are listed there (a daemon too old for protocol version 2 refuses the
  Hello; a tenant whose ring file is format version 1 has no window; a
  kept batch split because the daemon lowered its batch limit in between).
  With ``exactly_once=False`` (no producer id) it is at least once: such a
  batch is stored twice; duplicates are always whole batches, never partial.
- A batch refused with a transient code (QUOTA_EXCEEDED, STORAGE_FAILED) is
  resent after a backoff, up to TRANSIENT_RETRY_COUNT_MAX times, then counted
  as rejected. Batches sent after it may be stored before it.
- A batch refused with BATCH_TOO_LARGE (the daemon now allows fewer records
  per batch than its Welcome said) is split into parts of at most half its
  size, in place, and the parts are resent (counted in `resent`); later
  batches on that connection are cut at that size. A one-record batch
  refused so is rejected. Batches sent after the refused one may be stored
  before it. A transient refusal and BATCH_TOO_LARGE are the only cases
  where ring order differs from publish order.
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

import dataclasses
import errno
import logging
import os
import secrets
import selectors
import socket
import threading
import time

from ringtail.service.errors import RingtailError, connection_lost_error
# RECEIVE_SIZE_BYTES: bytes read from the socket at once (the protocol's one read size).
from ringtail.service.protocol import (FRAME_HEADER_SIZE_BYTES, FRAME_SIZE_BYTES_MAX,
                                       RECEIVE_BUFFER_BYTES_MAX, RECEIVE_SIZE_BYTES, ErrorCode,
                                       Hello, ProtocolError)
from ringtail.service.publish_buffer import (BLOCK_TIMEOUT_S_DEFAULT, BUFFER_RECORD_COUNT_MAX,
                                             POLICIES, TAKE_CHUNK_COUNT_MAX, PublishBuffer,
                                             PublisherClosedError, PublisherError,
                                             PublisherFullError, PublisherStatistics)
from ringtail.service.publish_sender import (RETRY_DELAY_S_MAX, RETRY_DELAY_S_MIN,
                                             TRANSIENT_RETRY_COUNT_MAX, UNACKED_BATCH_COUNT_MAX,
                                             ConnectionEndedError, PublishSender)

__all__ = [
    "BLOCK_TIMEOUT_S_DEFAULT", "BUFFER_RECORD_COUNT_MAX", "CLOSE_TIMEOUT_S_DEFAULT",
    "CONNECT_TIMEOUT_S", "FLUSH_TIMEOUT_S_DEFAULT", "POLICIES", "RECONNECT_DELAY_S_MAX",
    "RECONNECT_DELAY_S_MIN", "SEND_TIMEOUT_S", "TRANSIENT_RETRY_COUNT_MAX",
    "UNACKED_BATCH_COUNT_MAX", "Publisher", "PublisherClosedError", "PublisherError",
    "PublisherFullError", "PublisherStatistics",
]

log = logging.getLogger("ringtail.publisher")

# Reconnect backoff after the connection broke or could not be made: doubles
# from MIN to MAX and stays there (no attempt limit: a sidecar comes back).
# The same backoff paces the resends of a transiently refused batch.
RECONNECT_DELAY_S_MIN = RETRY_DELAY_S_MIN
RECONNECT_DELAY_S_MAX = RETRY_DELAY_S_MAX
# Seconds for connect() plus the Hello/Welcome handshake.
CONNECT_TIMEOUT_S = 5.0
# Seconds one blocking send may make no progress before the connection is
# declared dead (a stopped daemon); its unacknowledged batches are then resent.
SEND_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S_DEFAULT = 30.0
CLOSE_TIMEOUT_S_DEFAULT = 30.0

# A send or receive failing with these means the daemon's end is gone: read
# what it sent before, then report its Error frame or CONNECTION_LOST.
_PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED})

assert 0 < RECONNECT_DELAY_S_MIN <= RECONNECT_DELAY_S_MAX
# After the sender's receive_data() returns, the codec holds less than one
# frame; one more read must fit beside it.
assert (RECEIVE_SIZE_BYTES + FRAME_HEADER_SIZE_BYTES + FRAME_SIZE_BYTES_MAX
        <= RECEIVE_BUFFER_BYTES_MAX)
assert TAKE_CHUNK_COUNT_MAX >= 1  # re-exported: the sender's take size


def _check_arguments(tenant_id: int, token: bytes, client_name: str, policy: str,
                     block_timeout_s: float, buffer_record_count_max: int) -> Hello:
    """Raise ValueError for a bad argument here, not later in the sender thread."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: use one of {', '.join(POLICIES)}")
    if not 1 <= buffer_record_count_max <= BUFFER_RECORD_COUNT_MAX:
        raise ValueError(f"buffer_record_count_max {buffer_record_count_max} is outside "
                         f"1..BUFFER_RECORD_COUNT_MAX ({BUFFER_RECORD_COUNT_MAX}); lower it")
    if not block_timeout_s >= 0:
        raise ValueError(f"block_timeout_s {block_timeout_s} must be >= 0")
    try:
        return Hello(tenant_id, token, client_name)  # the codec's own checks of these fields
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
        exactly_once: name this Publisher with a random producer id so the
            daemon stores a resent batch once (module docstring).

    Raises:
        ValueError: an argument is out of range.

    The module docstring states the delivery, counting and full-buffer semantics.

    Resource handling:
        Starts its sender thread at once (it connects in the background);
        owns that thread, a non-blocking pipe that wakes it, a selector, and
        one socket while connected. close() or the `with` block flushes and
        releases them. The records are held by its PublishBuffer and
        PublishSender (see the module docstring for the bounds).

    Error handling:
        Nothing from the connection reaches publish(); see statistics().
    """

    def __init__(self, socket_path: str, tenant_id: int, *, token: bytes = b"",
                 client_name: str = "ringtail-publisher", policy: str = "block",
                 block_timeout_s: float = BLOCK_TIMEOUT_S_DEFAULT, raise_on_full: bool = False,
                 buffer_record_count_max: int = BUFFER_RECORD_COUNT_MAX,
                 check_records: bool = True, exactly_once: bool = True):
        hello = _check_arguments(tenant_id, token, client_name, policy, block_timeout_s,
                                 buffer_record_count_max)
        if exactly_once:  # a random producer id: one per Publisher (PROTOCOL.md 4.12)
            hello = dataclasses.replace(hello, producer_id=secrets.randbits(64) or 1)
        self.producer_id = hello.producer_id  # 0: at least once
        self.socket_path = socket_path
        self.tenant_id = tenant_id
        self._buffer = PublishBuffer(self._wake, policy=policy, block_timeout_s=block_timeout_s,
                                     raise_on_full=raise_on_full,
                                     buffer_record_count_max=buffer_record_count_max)
        # The caller's fast path is the buffer's own method, bound here: a
        # delegating Publisher.publish() would add a call (~50 ns) to every
        # record (issue 13's budget is 300 ns). Publisher.publish below
        # documents it and serves a call through the class.
        self.publish = self._buffer.publish
        self._sender = PublishSender(self._buffer, hello, peer=socket_path,
                                     check_records=check_records)
        self._close_flushed = False
        self._stopping = False  # set once by close() (or the thread's end); read by the thread

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
        return self._buffer.publish(records)  # instances call the buffer's directly

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
        return self._buffer.publish(view.cast("B") if view.format != "B" or view.ndim != 1
                                    else view)

    def flush(self, timeout: float = FLUSH_TIMEOUT_S_DEFAULT) -> bool:
        """Wait until every record taken so far is acknowledged (or rejected/dropped).

        Returns:
            True when none of them is buffered any more; False if `timeout`
            seconds passed first (records stay buffered and keep being sent).
        """
        return self._buffer.flush(timeout)

    def statistics(self) -> PublisherStatistics:
        """A consistent snapshot of the counts (see PublisherStatistics)."""
        return self._buffer.statistics()

    def close(self, timeout: float = CLOSE_TIMEOUT_S_DEFAULT) -> bool:
        """Stop taking records, flush up to `timeout` seconds, then stop the sender.

        Returns:
            True if everything was flushed; False if records were abandoned
            (still counted in statistics().buffered). Closing again returns
            the first answer and does nothing.
        """
        if not self._buffer.close():  # blocked publishers raise PublisherClosedError
            return self._close_flushed
        flushed = self._close_flushed = self._buffer.flush(timeout)
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

    def _wake(self) -> None:
        """Wake the sender thread (from any thread; never blocks)."""
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wakeups already: the sender will wake
        except OSError:
            if not self._buffer.closed:  # a publish racing close(): the pipe may be gone
                raise

    # -- the sender thread: moves bytes between the socket and the sans-IO sender ----

    def _run(self) -> None:
        try:
            self._sender_loop()
        except Exception as error:  # a bug: keep it visible, never kill the caller
            log.exception("ringtail publisher: sender thread failed; records are no "
                          "longer sent")
            self._buffer.note_error(error)
            self._buffer.note_connected(False)
        finally:
            self._stopping = True
            self._selector.close()  # the pipe is closed by close(), once this thread is gone

    def _sender_loop(self) -> None:
        delay_s = RECONNECT_DELAY_S_MIN
        ever_connected = False
        outage_logged = False
        while not self._stopping:
            try:
                sock = self._connect()
            except (OSError, ProtocolError) as error:
                self._sender.connection_lost()
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
            self._buffer.note_connected(True, reconnect=ever_connected)
            ever_connected = True
            self._selector.register(sock, selectors.EVENT_READ)
            try:
                self._serve_connection(sock)
            except (OSError, ProtocolError) as error:
                if isinstance(error, OSError) and error.errno in _PEER_GONE_ERRNOS:
                    error = self._failure_after_peer_gone(sock, error)
                self._note_error(error, disconnect=True)
                log.warning("ringtail publisher: connection to %s lost: %s; %d unacknowledged "
                            "batches will be resent", self.socket_path, error,
                            self._sender.in_flight_batch_count)
                outage_logged = True
            finally:
                self._selector.unregister(sock)
                sock.close()
                self._buffer.note_connected(False)
                self._buffer.set_sender_busy()
                self._sender.connection_lost()

    def _connect(self) -> socket.socket:
        """Connect and handshake (the Welcome sets the batch size)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(self.socket_path)
            sender = self._sender
            sock.sendall(sender.start_connection())
            while not sender.ready:
                replies = sender.receive_data(sock.recv(RECEIVE_SIZE_BYTES), time.monotonic())
                if replies:
                    sock.sendall(replies)
            sock.settimeout(SEND_TIMEOUT_S)
        except BaseException:  # closed, then re-raised: never swallowed
            sock.close()
            raise
        return sock

    def _serve_connection(self, sock: socket.socket) -> None:
        sender = self._sender
        buffer = self._buffer
        while True:
            now = time.monotonic()
            data = sender.data_to_send(now)
            if data:
                sock.sendall(data)
            if self._stopping:
                return
            # Only an idle sender is woken by publish(); a busy one comes back
            # here after its next Ack anyway.
            if sender.can_take(now):
                if buffer.set_sender_idle():
                    continue  # records arrived meanwhile: cut them before waiting
            else:
                buffer.set_sender_busy()
            paused_s = sender.send_not_before - now
            for key, _ in self._selector.select(paused_s if paused_s > 0 else None):
                if key.fd == self._wake_read:
                    self._drain_wakeups()
                else:
                    replies = sender.receive_data(sock.recv(RECEIVE_SIZE_BYTES),
                                                  time.monotonic())
                    if replies:
                        sock.sendall(replies)

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
        if isinstance(error, ConnectionEndedError):
            error = error.report
        self._buffer.note_error(error, disconnect=disconnect)

    def _failure_after_peer_gone(self, sock: socket.socket, error: OSError) -> Exception:
        """A send or receive failed with EPIPE or ECONNRESET: handle what the
        daemon sent before it closed (its answers, then its fatal Error if it
        stopped in order), and return why the connection ended."""
        sock.settimeout(0)  # what it sent is already here: read it, never wait
        try:
            while True:  # ends: EOF or a fatal Error raise ConnectionEndedError
                # Pongs are not sent back: the connection is over.
                self._sender.receive_data(sock.recv(RECEIVE_SIZE_BYTES), time.monotonic())
        except BlockingIOError:
            pass  # nothing more to read, though the socket is not at EOF
        except ConnectionEndedError as ended:
            reason = ended.reason
            if not (isinstance(reason, RingtailError)
                    and reason.code == ErrorCode.CONNECTION_LOST):
                return ended  # the daemon's Error frame, or a protocol violation
        except OSError:
            pass  # the reset itself, read again
        return ConnectionEndedError(connection_lost_error(self.socket_path, error.strerror))
