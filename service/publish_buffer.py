"""The Publisher's bounded buffer: what the caller's threads hand to the sender thread.

`PublishBuffer` is the only state the caller's threads and the Publisher's
sender thread share. The caller side is `publish()` / `publish_many()` (take
records, or apply the full-buffer policy), `flush()` and `close()`; the sender
side is `take()` (chunks of taken records, oldest first) and `resolve()`
(records acknowledged or rejected), plus the link status the statistics show.

The fast path: `publish()` of one 64-byte record checks its length, appends
the bytes object to a deque without taking the lock (deque.append is atomic
under the GIL; the bound is read racily, so concurrent publisher threads may
overshoot it by one record each), and wakes the sender only when the sender
said it is idle (one `wake()` call, not one per record). Several records at
once, a full buffer, and everything else take the lock.

Counting, in records: every record given to publish() is counted in
`published` and ends in exactly one of `acked`, `dropped_full`, `rejected`,
or is still `buffered` (queued, or taken by the sender and not yet
resolved)::

    published == acked + dropped_full + rejected + buffered

Full-buffer policy (`buffer_record_count_max` records waiting): "block"
waits up to `block_timeout_s` for room, then raises PublisherFullError
(``raise_on_full=True``) or drops the rest of the call and counts it in
`dropped_full`; "drop" drops what does not fit at once. Buffered records are
never evicted to make room. The Publisher's module docstring is the user's
statement of these rules.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX

__all__ = [
    "BLOCK_TIMEOUT_S_DEFAULT", "BUFFER_RECORD_COUNT_MAX", "POLICIES", "TAKE_CHUNK_COUNT_MAX",
    "PublisherStatistics", "PublishBuffer", "PublisherClosedError", "PublisherError",
    "PublisherFullError",
]

# Records buffered in the caller's process (queued + in flight), at most and by
# default: 262,144 x 64 B = 16 MiB of record bytes, about 4 s of a busy
# daemon's throughput, long enough to ride out a daemon restart.
# A publisher may lower it, never raise it.
BUFFER_RECORD_COUNT_MAX = 262_144
# Chunks (publish() calls) the sender takes from the buffer under the lock
# at once: bounds how long it holds the lock (~40 ns per chunk), and gives a
# batch of PUBLISH_RECORD_COUNT_MAX records from one-record publishes.
TAKE_CHUNK_COUNT_MAX = PUBLISH_RECORD_COUNT_MAX
BLOCK_TIMEOUT_S_DEFAULT = 1.0
POLICIES = ("block", "drop")

# The buffer holds at least one full Publish batch, so a full batch can always be cut.
assert BUFFER_RECORD_COUNT_MAX >= PUBLISH_RECORD_COUNT_MAX


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
    """A consistent snapshot (taken under the buffer's lock); counts are records unless named otherwise.

    `published` is derived (the one-record fast path counts nothing):
    published == acked + dropped_full + rejected + buffered.
    """

    published: int  # given to publish()/publish_many(): taken or dropped
    acked: int  # acknowledged durable by the daemon (a resent batch counts once)
    dropped_full: int  # dropped because the buffer was full
    rejected: int  # refused for good (bad record, or a batch the daemon refused)
    resent: int  # records sent again (connection lost, transient refusal, BATCH_TOO_LARGE)
    reconnects: int  # connections made after an earlier one was lost
    buffered: int  # taken and not yet acked or rejected (queued or in flight)
    connected: bool  # the sender holds a connection now
    last_error: Exception | None  # the most recent failure (connection or rejection)
    # Why the most recent connection ended (None until one has): the daemon's
    # fatal Error (SHUTTING_DOWN when it stopped in order), RingtailError
    # CONNECTION_LOST when it ended without one, or another OSError/ProtocolError.
    last_disconnect_error: Exception | None


class PublishBuffer:
    """Records taken from the caller, bounded, until the sender resolves them.

    Args:
        wake: called (from a caller's thread) when records arrive while the
            sender said it is idle; must not block (the Publisher writes one
            byte to a non-blocking pipe).
        policy: "block" or "drop".
        block_timeout_s: "block": seconds publish() waits for room.
        raise_on_full: "block": raise PublisherFullError after the wait.
        buffer_record_count_max: records buffered at most.

    Resource handling:
        Holds at most `buffer_record_count_max` records (as the caller's bytes
        objects, by reference; about 105 bytes of Python memory per record
        published one at a time) plus the chunks the sender has taken and not
        resolved. A lock and two conditions; nothing to close. close() only
        stops it taking records.

    Error handling:
        publish() raises ValueError for a length that is not a positive
        multiple of 64, PublisherFullError when asked, PublisherClosedError
        after close(); nothing else. The sender side raises nothing.
    """

    def __init__(self, wake: Callable[[], None], *, policy: str = "block",
                 block_timeout_s: float = BLOCK_TIMEOUT_S_DEFAULT, raise_on_full: bool = False,
                 buffer_record_count_max: int = BUFFER_RECORD_COUNT_MAX):
        assert policy in POLICIES and 1 <= buffer_record_count_max <= BUFFER_RECORD_COUNT_MAX
        self._wake = wake
        self._block = policy == "block"
        self._block_timeout_s = block_timeout_s
        self._raise_on_full = raise_on_full
        self._buffer_record_count_max = buffer_record_count_max

        # The one-record fast path of publish() appends to _pending without the
        # lock and reads _buffered_extra, _admit_limit and sender_idle;
        # everything else changes under _lock.
        self.lock = threading.Lock()
        self._space = threading.Condition(self.lock)  # publishers waiting for room
        self._resolved = threading.Condition(self.lock)  # flush() waiting for acks
        self._pending: collections.deque[bytes] = collections.deque()  # taken, not yet seen
        # Records buffered (taken, not yet acked or rejected) == len(_pending)
        # + _buffered_extra: a chunk of n records adds n - 1; take() adds 1 per
        # chunk it pops and resolve() subtracts each record it resolves.
        self._buffered_extra = 0
        self._admit_limit = buffer_record_count_max  # -1 once closed (sends publish() slow)
        # Set by the sender (under the lock, or before it last looks at pending:
        # see `set_sender_idle`); cleared by the publisher that wakes it.
        self.sender_idle = False
        self._space_waiters = 0
        self._flush_waiters = 0
        self.closed = False
        self._dropped_full = 0
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

    # -- the caller's side ----------------------------------------------------------

    def publish(self, records: bytes) -> int:
        """Take one 64-byte record, or several concatenated; see Publisher.publish()."""
        if len(records) != RECORD_SIZE_BYTES:
            return self._publish_records(records)
        if type(records) is not bytes:
            records = bytes(records)  # never keep a buffer the caller may reuse
        pending = self._pending
        # Read without the lock: concurrent publishers may each pass this check
        # at once, so the buffer can exceed its bound by one record per thread.
        if len(pending) + self._buffered_extra >= self._admit_limit:
            with self.lock:
                return self._admit(records, 1)
        pending.append(records)
        if self.sender_idle:  # the sender sets it before it last looks at _pending
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
        with self.lock:
            return self._admit(records, size // RECORD_SIZE_BYTES)

    def _admit(self, records: bytes, count: int) -> int:
        """Take what fits; then wait, raise or drop as the policy says. Lock held."""
        accepted = 0
        deadline = None
        while True:
            if self.closed:
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
                if self.sender_idle:
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

    def _wake_sender(self) -> None:
        self.sender_idle = False  # one wakeup is enough: later publishers skip it
        self._wake()

    def flush(self, timeout: float) -> bool:
        """Wait until every record taken so far is resolved (acked or rejected).

        Returns:
            True when none of them is buffered any more; False if `timeout`
            seconds passed first.
        """
        deadline = time.monotonic() + timeout
        with self.lock:
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

    def close(self) -> bool:
        """Stop taking records; blocked publishers raise PublisherClosedError.

        Returns:
            False if it was closed already.
        """
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            self._admit_limit = -1
            self._space.notify_all()
            return True

    def statistics(self) -> PublisherStatistics:
        with self.lock:
            buffered = len(self._pending) + self._buffered_extra
            return PublisherStatistics(
                published=buffered + self._acked + self._rejected + self._dropped_full,
                acked=self._acked, dropped_full=self._dropped_full, rejected=self._rejected,
                resent=self._resent, reconnects=self._reconnects, buffered=buffered,
                connected=self._connected, last_error=self._last_error,
                last_disconnect_error=self._last_disconnect_error)

    # -- the sender's side (a RecordSource for publish_sender.PublishSender) ------------

    def set_sender_idle(self) -> bool:
        """The sender will wait for records: ask to be woken, then look once more.

        Returns:
            True if records are pending (the flag is cleared again: cut them
            now); False if the sender may wait for its wakeup. A publisher that
            appended before the flag was set is seen here; one that appends
            after it sees the flag and wakes the sender.
        """
        self.sender_idle = True
        if self._pending:
            self.sender_idle = False
            return True
        return False

    def set_sender_busy(self) -> None:
        self.sender_idle = False

    def take(self, chunk_count_max: int) -> list[bytes]:
        """Up to `chunk_count_max` publish() chunks, oldest first; [] if none."""
        with self.lock:
            pending = self._pending
            chunk_count = min(len(pending), chunk_count_max)
            if not chunk_count:
                return []
            chunks = [pending.popleft() for _ in range(chunk_count)]
            self._buffered_extra += chunk_count  # still buffered, now held by the sender
            return chunks

    def resolve(self, count: int, *, acked: bool, unresolved_ordinal: int,
                error: Exception | None = None) -> None:
        """Count `count` taken records as acked or rejected; wake flush() and blocked publishers.

        Args:
            unresolved_ordinal: the ordinal of the oldest taken record still
                not resolved (the sender's oldest kept batch, or the first
                record it has not cut yet).
            error: why they were rejected, kept as last_error.
        """
        with self.lock:
            self._buffered_extra -= count
            if acked:
                self._acked += count
            else:
                self._rejected += count
            if error is not None:
                self._last_error = error
            self._unresolved_ordinal = unresolved_ordinal
            if self._flush_waiters:
                self._resolved.notify_all()
            if self._space_waiters:
                self._space.notify_all()

    def note_error(self, error: Exception, *, disconnect: bool = False) -> None:
        """Keep `error` as last_error (and as last_disconnect_error if it ended a connection)."""
        with self.lock:
            self._last_error = error
            if disconnect:
                self._last_disconnect_error = error

    def count_resent(self, count: int) -> None:
        with self.lock:
            self._resent += count

    def note_connected(self, connected: bool, *, reconnect: bool = False) -> None:
        with self.lock:
            self._connected = connected
            self._reconnects += reconnect
