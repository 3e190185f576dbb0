"""One client connection: handshake, publishes, replies and a subscription.

Each connection runs three pieces in its own nursery:

- the receive loop: bytes -> protocol events; a Publish is checked (magic,
  tenant, role, quota) and queued with the tenant's writer, waiting if the
  tenant is over its pending bound (backpressure reaches the socket);
- the reply task: sends each batch's Ack (or Error) in request order once
  the batch is durable, several in one write when they are decided together;
- for a subscriber, the subscription task (service/subscribers.py).

A handler only moves one peer's bytes through the codec. What it may know
and do beyond its stream is one `Session`, built by the daemon
(service/server.py) and shared by every handler: the gate
(service/gate.py), which admits the Hello, each Publish and each Subscribe;
the stop signal, which cancels the scopes a handler registers when shutdown
begins; and the counters of connection handling and of subscriptions. It
never sees the daemon, and the daemon never sees a handler: a reload
revokes a connection through the gate.

When shutdown stops its reading, a handler answers every batch it queued,
lets its subscription finish the frame it is writing, sends
Error(SHUTTING_DOWN) and closes, so the peer can tell an orderly stop from a
crash (docs/PROTOCOL.md 6.1).

`serve_connection(session, stream, peer)` runs one accepted connection to
its end: the listener's connection slot, the handler, and the accounting of
how it ended (`HandlerCounters.statistics()`).

Bounds against hostile peers (issue 9, items 1-3): every accepted
connection, over a cap or not, is refused or has sent its Hello within
HANDSHAKE_TIMEOUT_S of the accept, TLS handshake included, and shutdown cuts
both short; a welcomed connection with nothing in flight and no subscription
is closed after the gate's idle timeout; what a connection holds of publish
batches read and not yet answered is bounded in bytes
(CONNECTION_UNACKED_SIZE_BYTES_MAX) and in batches, and the receive loop
stops reading while it is at the bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
from types import MappingProxyType
from typing import Iterator, Mapping

import trio

from ringtail.ioring import RingCorruptError
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service import protocol
from ringtail.service.auth import Peer
from ringtail.service.batcher import ProducerWindowPassed
from ringtail.service.gate import Admission, ConnectionSlot, Gate, Refused
from ringtail.service.protocol import (CLOSED, NEED_DATA, Ack, Error, ErrorCode, Hello, Ping, Pong,
                                       ProtocolError, Publish, RemoteProtocolError, Restore,
                                       Subscribe,
                                       Welcome)
from ringtail.service.subscribers import (REPLAY_COPIED_FRAME_RECORD_COUNT_MAX,
                                          REPLAY_FRAME_RECORD_COUNT_MAX, SubscriptionCounters,
                                          run_subscription)

log = logging.getLogger("ringtail.server")

# Answers (acks, batch errors) sent in one write when several are decided at
# once; bounds that write to 256 x 40 B = 10 KiB.
REPLY_COALESCE_COUNT_MAX = 256
# Seconds a new connection has, from its accept, to finish the TLS handshake
# (TCP) and send its Hello; a refused connection gets its Error within the same.
HANDSHAKE_TIMEOUT_S = 10.0
# Publish batches a connection may have read but not yet answered (queued,
# being written, or answered while its peer reads nothing); past it the
# receive loop stops reading (backpressure). Bounds small batches; bytes are
# bounded by CONNECTION_UNACKED_SIZE_BYTES_MAX.
CONNECTION_UNACKED_BATCH_COUNT_MAX = 64
# Bytes of publish records a connection may hold read but not yet answered
# (the same batches, counted in bytes): four full batches, enough to keep a
# group commit fed from one publisher. Past it the receive loop reads nothing
# more until an answer is sent, so a publisher that never reads its acks pins
# at most this (plus one parsed batch and its receive buffer), and it is
# freed as its answers go out or when it leaves. Memory: 1 MiB per
# connection at worst (service/limits.py sums it).
CONNECTION_UNACKED_SIZE_BYTES_MAX = 4 * protocol.PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
RECEIVE_SIZE_BYTES = protocol.RECEIVE_SIZE_BYTES
# Bytes a receive asks for after one that did not fill its request (a peer
# of small frames): under glibc's mmap threshold (service/limits.py,
# MALLOC_MMAP_THRESHOLD_BYTES = 128 KiB; tests/service/test_subscribers.py
# asserts the relation), so the bytes object a receive returns comes from the
# heap. Asking for RECEIVE_SIZE_BYTES (256 KiB) each time cost an mmap, an
# mremap to the size received and a munmap per receive (strace of 1-record
# frames, 4 publishers: 3 of the daemon's 9 syscalls per receive). A
# receive that fills it asks for RECEIVE_SIZE_BYTES next (full batches).
RECEIVE_SMALL_SIZE_BYTES = 64 * 1024
assert RECEIVE_SMALL_SIZE_BYTES < RECEIVE_SIZE_BYTES
# Seconds a subscription ended by shutdown or a reload may still take to finish
# the frame it is writing (a Records frame is at most 294,924 B), so its peer
# gets whole frames and then the fatal Error; a peer that reads nothing for
# that long gets the frame cut short (EOF in the middle of it) instead.
FRAME_FINISH_TIMEOUT_S = 5.0

# What _next_event_or_idle returns when the idle scope was spent with bytes in hand.
_IDLE_SCOPE_SPENT = object()

assert HANDSHAKE_TIMEOUT_S > 0
assert FRAME_FINISH_TIMEOUT_S > 0
# A full publish batch always fits when nothing is unanswered.
assert CONNECTION_UNACKED_SIZE_BYTES_MAX >= protocol.PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES



class StopSignal:
    """Shutdown, as the handlers see it: whether it began, and the cancel
    scopes to cancel when it does (the handshake, the receive loop)."""

    def __init__(self):
        self._stopping = False
        self._scopes: set[trio.CancelScope] = set()  # bounded by the open connections

    @property
    def is_set(self) -> bool:
        return self._stopping

    def set(self) -> None:
        """Begin shutdown: cancel every registered scope (idempotent)."""
        self._stopping = True
        for scope in list(self._scopes):
            scope.cancel()

    @contextlib.contextmanager
    def cancelling(self, scope: trio.CancelScope) -> Iterator[None]:
        """While inside, `scope` is cancelled when shutdown begins (at once if it has)."""
        self._scopes.add(scope)
        if self._stopping:
            scope.cancel()
        try:
            yield
        finally:
            self._scopes.discard(scope)


@dataclasses.dataclass(frozen=True, slots=True)
class HandlerStatistics:
    """How connections went, every handler of one daemon together."""

    protocol_errors: int  # closed with a fatal protocol Error
    peers_gone: int  # broke while the daemon still had something to send
    internal_errors: int  # handler bugs: that connection was closed, the daemon went on
    tls_failures: int  # TCP peers whose TLS handshake failed
    # Publish batches refused (the connection went on), by (tenant id, ErrorCode):
    # malformed frames, QUOTA_EXCEEDED, bad records. Bounded: tenants x codes.
    rejected_batches: Mapping[tuple[int, int], int]
    rejected_records: Mapping[tuple[int, int], int]  # records in them (0: no whole records)


class HandlerCounters:
    """The counts behind HandlerStatistics; each thing is counted at one place
    of ConnectionHandler / serve_connection."""

    def __init__(self):
        self._protocol_errors = 0
        self._peers_gone = 0
        self._internal_errors = 0
        self._tls_failures = 0
        self._rejected_batches: dict[tuple[int, int], int] = {}
        self._rejected_records: dict[tuple[int, int], int] = {}

    def _count_rejected(self, tenant_id: int, code: int, record_count: int) -> None:
        key = (tenant_id, int(code))
        self._rejected_batches[key] = self._rejected_batches.get(key, 0) + 1
        self._rejected_records[key] = self._rejected_records.get(key, 0) + record_count

    def statistics(self) -> HandlerStatistics:
        return HandlerStatistics(self._protocol_errors, self._peers_gone, self._internal_errors,
                                 self._tls_failures,
                                 MappingProxyType(dict(self._rejected_batches)),
                                 MappingProxyType(dict(self._rejected_records)))


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """What a connection handler may know and do beyond its stream.

    The daemon builds one and every handler shares it: `gate` admits (and
    through Admission.tenant gives the tenant's ring and writer), `stop`
    says when shutdown begins, the counters take what handling counts.
    """

    gate: Gate
    stop: StopSignal
    counters: HandlerCounters
    subscriptions: SubscriptionCounters


class ConnectionHandler:
    def __init__(self, session: Session, stream: trio.abc.Stream, peer: Peer | None = None):
        self.session = session
        self.gate = session.gate
        self.counters = session.counters
        self.stream = stream
        self.peer = peer or Peer("unix")
        self.admission: Admission | None = None  # once the gate admitted the Hello
        self.close_reason: tuple[ErrorCode, str] | None = None  # set by a reload
        # A fatal Error owed to the peer, sent once every batch already read is
        # answered (issue 9, item 9): see fail_after_replies().
        self.fatal: Error | None = None
        self.peer_closed = False  # EOF: the peer sends nothing more (maybe a half-close)
        self.subscription_follow = False  # the subscription follows (no End)
        self.subscription_done: trio.Event | None = None  # set when it has ended
        self.stop_cut_replay = False  # shutdown ended a replay after the peer's EOF
        self.connection = protocol.Connection(protocol.SERVER)
        self.send_lock = trio.Lock()
        self.receive_scope = trio.CancelScope()
        self.subscription_scope = trio.CancelScope()
        # A send_all was cut short (cancelled mid-frame): the peer may hold a
        # partial frame, so nothing may follow it, not even an Error.
        self.send_incomplete = False
        self.subscription_writing = False  # the subscription task is in one of its sends
        self.subscription_ending = False  # end_subscription() came while it was
        self.slot: ConnectionSlot | None = None  # the gate's hold, from serve_connection
        self.subscription_running = False  # a subscription task is running (not idle)
        # Publish batches read and not yet answered, and their record bytes
        # (CONNECTION_UNACKED_BATCH_COUNT_MAX, CONNECTION_UNACKED_SIZE_BYTES_MAX);
        # `reply_room` is set each time an answer frees some.
        self.unanswered_count = 0
        self.unanswered_size_bytes = 0
        self.reply_room = trio.Event()
        self.published = False  # a Publish was read (a Restore must come before any)
        self.receive_size_bytes = RECEIVE_SMALL_SIZE_BYTES  # the next receive's; see there

    @property
    def tenant(self):
        return self.admission.tenant

    async def _send_all(self, data: bytes) -> None:
        """stream.send_all, remembering whether it finished. Send lock held."""
        # Cancelled here, nothing was sent: the stream is still whole. Past
        # this point (no checkpoint in between) send_all starts writing.
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_incomplete = True
        await self.stream.send_all(data)
        self.send_incomplete = False

    async def send(self, event) -> None:
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING or self.send_incomplete:
                return  # a fatal Error was the last frame; pending acks/records are dropped
            await self._send_all(self.connection.send(event))

    async def send_records(self, first_sequence: int, records: bytes, sequences) -> None:
        """One Records frame. On a plain socket (Unix or TCP without TLS) a dense
        frame goes out as its header and `records` in one sendmsg, with no copy
        of the records into a frame (_sendmsg_all); TLS gets the joined frame."""
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING or self.send_incomplete:
                return  # as in send(): nothing follows a fatal Error
            head, payload = self.connection.send_records_parts(first_sequence, records, sequences)
            if isinstance(self.stream, trio.SocketStream) and len(payload):
                await self._sendmsg_all(head, payload)
            else:
                await self._send_all(b"".join((head, payload)) if len(payload) else head)

    async def _sendmsg_all(self, head: bytes, payload) -> None:
        """head + payload on the stream's socket, gathered (sendmsg), all of it;
        the stream's errors as SocketStream.send_all raises them. Send lock
        held; send_incomplete as in _send_all."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_incomplete = True
        sock = self.stream.socket
        parts = [memoryview(head), memoryview(payload)]
        try:
            while parts:
                sent = await sock.sendmsg(parts)
                while sent:  # drop what went; a part sent in part goes on from there
                    if sent >= parts[0].nbytes:
                        sent -= parts.pop(0).nbytes
                    else:
                        parts[0] = parts[0][sent:]
                        sent = 0
        except OSError as error:  # as trio's SocketStream translates them
            if error.errno == errno.EBADF:
                raise trio.ClosedResourceError("the connection's socket was closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {error}") from error
        self.send_incomplete = False

    async def send_error(self, code: ErrorCode, message: str, batch_id: int = 0,
                         record_index: int = protocol.RECORD_INDEX_NONE) -> None:
        await self.send(Error(int(code), message[:protocol.ERROR_MESSAGE_SIZE_BYTES_MAX],
                              batch_id, record_index))

    async def next_event(self):
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.stream.receive_some(RECEIVE_SIZE_BYTES)
            self.connection.receive_data(data)

    async def run(self, handshake_deadline: float | None = None) -> None:
        """Handshake (by `handshake_deadline`, default HANDSHAKE_TIMEOUT_S from
        now), admission, then the session until either side ends it."""
        stop = self.session.stop
        if handshake_deadline is None:
            handshake_deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
        # Shutdown cancels the handshake too: a peer that never says Hello must
        # not hold the daemon's exit for HANDSHAKE_TIMEOUT_S.
        handshake = trio.CancelScope(deadline=handshake_deadline)
        hello = failure = None
        with stop.cancelling(handshake), handshake:
            if not await self.tls_handshake():
                return
            try:
                hello = await self.next_event()
            except RemoteProtocolError as error:
                failure = error
        if failure is not None:
            await self.protocol_error(failure)
            return
        if handshake.cancelled_caught:
            if stop.is_set:
                await self.send_error(ErrorCode.SHUTTING_DOWN,
                                      "the daemon is shutting down; reconnect with backoff")
            else:
                await self.send_error(
                    ErrorCode.HANDSHAKE_TIMEOUT,
                    f"no Hello within HANDSHAKE_TIMEOUT_S ({HANDSHAKE_TIMEOUT_S} s); "
                    "send Hello right after connecting")
            return
        if hello is CLOSED or not isinstance(hello, Hello):
            return
        if self.slot is not None:
            self.slot.hello_received()
        try:
            await self.gate.prepare(self.peer, hello)  # opens a ring off the event loop
            with self.gate.admit(self.peer, hello, self.revoke) as admission:
                self.admission = admission
                await self.session_loop(hello)  # raises no Refused: handled inside
        except Refused as refusal:
            await self.send_error(refusal.code, refusal.message)
            return
        if self.close_reason is not None:  # a reload revoked this connection
            await self.send_error(*self.close_reason)
        elif stop.is_set and (self.receive_scope.cancelled_caught or self.stop_cut_replay):
            # Shutdown stopped the reading and every queued batch was answered:
            # say so, so the peer can tell an orderly stop from a crash (a
            # connection that ends without an Error frame). A peer that closed
            # first, or a fatal Error already sent, needs nothing more.
            await self.send_error(ErrorCode.SHUTTING_DOWN,
                                  "the daemon is shutting down; it answered every batch of "
                                  "this connection that it stored (batches without an answer "
                                  "were not stored); reconnect with backoff and resend them")

    async def session_loop(self, hello: Hello) -> None:
        ring = self.tenant.ring
        await self.send(Welcome(hello.tenant_id, protocol.PUBLISH_RECORD_COUNT_MAX,
                                ring.oldest_sequence, ring.next_sequence, ring.capacity,
                                "ringtail", hello.protocol_version))
        send_replies, receive_replies = trio.open_memory_channel(
            CONNECTION_UNACKED_BATCH_COUNT_MAX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reply_loop, receive_replies)
            # Credentials that expire end the connection then (issue 9, item 8).
            expiry = trio.CancelScope()
            nursery.start_soon(self._watch_expiry, expiry)
            with self.session.stop.cancelling(self.receive_scope), self.receive_scope, \
                    send_replies:
                await self.receive_loop(nursery, send_replies)
            if self.peer_closed and self.fatal is None and not self.subscription_follow:
                # A half-close ends only the peer's sending side (issue 9, item
                # 10): a replay runs to its End (docs/PROTOCOL.md section 1).
                await self._subscription_ended()
            expiry.cancel()
            # Replies drain (acks for every queued batch); a subscription ends.
            self.end_subscription()
        if self.fatal is not None:  # after every answer it was owed
            await self.send(self.fatal)

    async def _watch_expiry(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.gate.watch_expiry(self.admission)

    async def _subscription_ended(self) -> None:
        """Wait until the subscription (if any) ends by itself; shutdown cuts it."""
        if self.subscription_done is None:
            return
        waiting = trio.CancelScope()
        with self.session.stop.cancelling(waiting), waiting:
            await self.subscription_done.wait()
        self.stop_cut_replay = waiting.cancelled_caught

    async def tls_handshake(self) -> bool:
        """Complete TLS first (inside the handshake deadline); False if it failed."""
        if not isinstance(self.stream, trio.SSLStream):
            return True
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as error:
            self.counters._tls_failures += 1
            log.warning("TLS handshake with %s failed: %s", self.peer.address,
                        error.__cause__ or error)
            return False
        return True

    def revoke(self, code: ErrorCode, message: str) -> None:
        """End this connection after a reload: stop reading, let queued batches be
        answered, then send a fatal Error with `code`."""
        self.close_reason = (code, message)
        self.receive_scope.cancel()
        self.end_subscription()

    def end_subscription(self) -> None:
        """Stop the subscription, but not in the middle of a frame it is writing
        (its peer would be left with part of a frame and could not read the
        fatal Error that follows): that frame gets FRAME_FINISH_TIMEOUT_S."""
        if not self.subscription_writing:
            self.subscription_scope.cancel()
            return
        self.subscription_ending = True
        self.subscription_scope.deadline = min(self.subscription_scope.deadline,
                                               trio.current_time() + FRAME_FINISH_TIMEOUT_S)

    async def _subscription_write(self, write, *args) -> None:
        """One send of the subscription (send or send_records), see end_subscription()."""
        self.subscription_writing = True
        try:
            await write(*args)
        finally:
            self.subscription_writing = False
        if self.subscription_ending:  # end_subscription() came meanwhile: stop now
            self.subscription_scope.cancel()

    def refuse_batch(self, replies, error: ProtocolError, record_count: int) -> None:
        """Answer one publish batch with its Error (in order); the connection goes on.
        The one place a refused batch is counted. No checkpoint (_queue_answer)."""
        self.counters._count_rejected(self.tenant.tenant_id, error.code, record_count)
        self._queue_answer(replies, (error.batch_id, None, error))

    @staticmethod
    def _queue_answer(replies, item) -> None:
        """Hand one batch's answer to the reply loop, with no checkpoint (so no
        cancellation can come between queueing a batch and queueing its
        answer). The channel never blocks: it holds at most the batches counted
        unanswered (_reply_room counts each before its answer is queued, and
        the reply loop takes an item before it answers it), at most
        CONNECTION_UNACKED_BATCH_COUNT_MAX, its capacity (session_loop)."""
        replies.send_nowait(item)

    async def _next_event_or_idle(self, idle: trio.CancelScope):
        """next_event() inside the connection's idle scope (see receive_loop), or
        _IDLE_SCOPE_SPENT. A frame already received is returned with no await
        and no scope of its own; only while a receive waits does `idle` have a
        deadline (the gate's idle timeout from now), so a deadline passing
        cancels nothing but that receive (which takes no byte then)."""
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                return event
            idle.deadline = trio.current_time() + self.gate.limits().idle_timeout_s
            data = await self.stream.receive_some(self.receive_size_bytes)
            idle.deadline = math.inf
            self.receive_size_bytes = (RECEIVE_SIZE_BYTES if len(data) >= self.receive_size_bytes
                                       else RECEIVE_SMALL_SIZE_BYTES)
            self.connection.receive_data(data)
            if idle.cancel_called:
                # The deadline passed as these bytes came in: the scope would
                # cancel the next await. Leave it, bytes kept (receive_loop
                # opens a fresh one).
                return _IDLE_SCOPE_SPENT

    async def _reply_room(self, size_bytes: int) -> None:
        """Wait until one more answer (for `size_bytes` of records) fits the
        connection's bounds; then count it. Unshielded: shutdown may cut it."""
        while self.unanswered_count >= CONNECTION_UNACKED_BATCH_COUNT_MAX or (
                self.unanswered_size_bytes and
                self.unanswered_size_bytes + size_bytes > CONNECTION_UNACKED_SIZE_BYTES_MAX):
            if self.reply_room.is_set():
                self.reply_room = trio.Event()
            await self.reply_room.wait()
        self.unanswered_count += 1
        self.unanswered_size_bytes += size_bytes

    def _answered(self, size_bytes: int) -> None:
        self.unanswered_count -= 1
        self.unanswered_size_bytes -= size_bytes
        self.reply_room.set()

    async def receive_loop(self, nursery: trio.Nursery, replies) -> None:
        """Read and handle frames until the peer's EOF, a fatal error, shutdown
        or the idle timeout: a welcomed connection with no frame for the gate's
        idle_timeout_s, nothing unanswered and no subscription is closed.

        One idle CancelScope serves every frame (a scope entered and left per
        frame was 13% of the daemon's CPU with 1-record frames, issue 13); its
        deadline is set only while a receive waits (_next_event_or_idle).
        """
        while True:
            idle = trio.CancelScope()
            with idle:
                if await self._receive_frames(nursery, replies, idle):
                    return
            if not idle.cancelled_caught or self.subscription_running or self.unanswered_count:
                continue  # the scope was spent with bytes in hand, or something is in flight
            idle_timeout_s = self.gate.limits().idle_timeout_s
            await self.send_error(
                ErrorCode.IDLE_TIMEOUT,
                f"no Publish, Subscribe or Ping for {idle_timeout_s:g} s "
                "(CONNECTION_IDLE_TIMEOUT_S or idle_timeout_s) and nothing in flight; "
                "send a Ping now and then to keep a connection open, or reconnect")
            return

    async def _receive_frames(self, nursery: trio.Nursery, replies,
                              idle: trio.CancelScope) -> bool:
        """receive_loop's body, inside `idle`: True when the loop is over, False
        when `idle` was spent (receive_loop opens a fresh one)."""
        while True:
            try:
                event = await self._next_event_or_idle(idle)
                if event is _IDLE_SCOPE_SPENT:
                    return False
            except RemoteProtocolError as error:
                if not error.fatal:  # a malformed batch: no whole records to count
                    await self._reply_room(0)
                    self.refuse_batch(replies, error, 0)
                    continue
                self.protocol_error_after_replies(error)
                return True
            if event is CLOSED:
                self.peer_closed = True
                return True
            try:
                if isinstance(event, Publish):
                    self.published = True
                    # Unshielded: shutdown may cut a wait for the quota.
                    refusal = await self.gate.admit_publish(self.admission, event)
                    # Backpressure: read nothing more until this batch's answer
                    # fits (unshielded: a batch shutdown cuts here gets no
                    # answer and was not stored).
                    await self._reply_room(0 if refusal is not None else len(event.records))
                    # A batch read off the socket is answered (and, if admitted,
                    # queued) even if shutdown starts meanwhile: refusing and
                    # queueing take no checkpoint (no cancellation can land)
                    # unless the writer must wait for room, which is shielded.
                    # (A shield scope per frame was ~10% of the daemon's CPU
                    # with 1-record frames, issue 13.)
                    if refusal is not None:
                        self.refuse_batch(replies, refusal,
                                          len(event.records) // RECORD_SIZE_BYTES)
                    elif self.tenant.writer.has_room(event.record_count):
                        await self._queue_publish(replies, event)
                    else:
                        with trio.CancelScope(shield=True):
                            await self._queue_publish(replies, event)
                elif isinstance(event, Subscribe):
                    self.gate.admit_subscribe(self.admission)
                    self.subscription_scope = trio.CancelScope()
                    self.subscription_running = True
                    self.subscription_follow = event.follow
                    self.subscription_done = trio.Event()
                    nursery.start_soon(self.subscribe, event)
                elif isinstance(event, Restore):
                    await self.restore(event)
                elif isinstance(event, Ping):
                    await self.send(Pong(event.nonce))
            except Refused as refusal:  # FORBIDDEN: the credentials lack the role
                self.fail_after_replies(refusal.code, refusal.message)
                return True

    async def restore(self, event: Restore) -> None:
        """A Restore (docs/PROTOCOL.md 4.13): the gate checks it and recreates the
        tenant's empty ring at the snapshot's first sequence; the Welcome that
        answers it names the new ring. Raises Refused (the caller ends the
        connection with it)."""
        await self.gate.restore(self.admission, event, self.published)
        ring = self.tenant.ring
        await self.send(dataclasses.replace(
            self.connection.welcome, oldest_sequence=ring.oldest_sequence,
            next_sequence=ring.next_sequence, capacity=ring.capacity))

    async def _queue_publish(self, replies, event: Publish) -> None:
        """Queue an admitted batch with the tenant's writer; its answer follows in
        order. Takes no checkpoint when the writer has room (the caller relies
        on it: see receive_loop)."""
        try:
            request = await self.tenant.writer.publish(
                event.records, self.connection.hello.producer_id, event.producer_sequence or 0)
        except ProducerWindowPassed as passed:
            # Counted again as 0 records: the slot it held is free, so this
            # takes it back with no wait (and no checkpoint).
            self._answered(len(event.records))
            self.unanswered_count += 1
            self.refuse_batch(replies, RemoteProtocolError(
                ErrorCode.PRODUCER_WINDOW_PASSED, str(passed), batch_id=event.batch_id),
                event.record_count)
            return
        self._queue_answer(replies, (event.batch_id, request, None))

    async def refuse(self, refusal: Refused, deadline: float) -> None:
        """Answer a connection the gate refused with its Error, by `deadline`
        (a TLS peer must finish its handshake first) and not past the start of
        shutdown; with REFUSAL_COUNT_MAX answers under way, close it unanswered."""
        with self.gate.refusal_slot(self.peer.transport) as answering:
            if not answering:
                return
            scope = trio.CancelScope(deadline=deadline)
            with self.session.stop.cancelling(scope), scope:
                await self.send_error(refusal.code, refusal.message)

    async def protocol_error(self, error: RemoteProtocolError) -> None:
        """Send the fatal Error for `error` now (nothing is owed yet: the handshake)."""
        self.counters._protocol_errors += 1
        await self.send(Error.from_protocol_error(error))

    def protocol_error_after_replies(self, error: RemoteProtocolError) -> None:
        self.counters._protocol_errors += 1
        self.fatal = self.fatal or Error.from_protocol_error(error)
        self.receive_scope.cancel()

    def fail_after_replies(self, code: ErrorCode, message: str) -> None:
        """End the connection with a fatal Error(code, message) once every batch
        already read has its answer (an Ack the client would otherwise never
        see, and resend: issue 9, item 9): stop reading now; session_loop
        sends it after the replies drained and the subscription ended."""
        self.fatal = self.fatal or Error(int(code), message[:protocol.ERROR_MESSAGE_SIZE_BYTES_MAX])
        self.receive_scope.cancel()

    async def reply_loop(self, replies) -> None:
        """Answer each batch in request order once it is durable (or refused).

        Replies already decided when one is sent go out in the same write: a
        group commit makes many batches durable at once, and one send for all
        their acks saves a syscall and a task switch per batch.
        """
        async with replies:
            async for item in replies:
                events = [await self._reply_event(item)]
                while len(events) < REPLY_COALESCE_COUNT_MAX:
                    try:
                        item = replies.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    request = item[1]
                    if request is not None and not request.done.is_set():
                        await self._send_events(events)  # earlier answers go first
                        events = []
                    events.append(await self._reply_event(item))
                await self._send_events(events)

    async def _reply_event(self, item):
        """The answer to one batch; from here the connection holds none of its records."""
        batch_id, request, error = item
        if error is not None:
            self._answered(0)
            return Error(int(error.code), error.message, batch_id, error.record_index)
        if not request.done.is_set():  # Event.wait() on a set event still yields:
            await request.done.wait()  # a scheduler pass per coalesced answer
        self._answered(len(request.records))
        if request.error is not None:
            message = f"batch {batch_id} is not durable: {request.error}"
            # Cut at the frame's byte limit, not 256 characters (issue 9, item 18).
            message = message.encode()[:protocol.ERROR_MESSAGE_SIZE_BYTES_MAX]
            return Error(int(ErrorCode.STORAGE_FAILED), message.decode("utf-8", "ignore"),
                         batch_id)
        return Ack(batch_id, request.first_sequence, request.last_sequence)

    async def _send_events(self, events) -> None:
        if not events:
            return
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING or self.send_incomplete:
                return  # as in send(): nothing follows a fatal Error
            await self._send_all(b"".join(self.connection.send(event) for event in events))

    async def subscribe(self, event: Subscribe) -> None:
        try:
            with self.gate.subscriber_slot(self.tenant.tenant_id):
                await self._run_subscription(event)
        except Refused as refusal:  # TOO_MANY_SUBSCRIBERS (raised before it started)
            self.fail_after_replies(refusal.code, refusal.message)
        finally:
            self.subscription_running = False
            self.subscription_done.set()

    async def _run_subscription(self, event: Subscribe) -> None:
        tenant = self.tenant
        try:
            with self.subscription_scope:
                await run_subscription(
                    tenant, event, functools.partial(self._subscription_write, self.send),
                    functools.partial(self._subscription_write, self.send_records),
                    self.session.subscriptions,
                    # TLS: each frame is a copy (send_records), kept under the mmap threshold.
                    frame_record_count_max=(REPLAY_FRAME_RECORD_COUNT_MAX
                                            if isinstance(self.stream, trio.SocketStream)
                                            else REPLAY_COPIED_FRAME_RECORD_COUNT_MAX))
        except RemoteProtocolError as error:  # BAD_SUBSCRIBE found against the ring
            self.protocol_error_after_replies(error)
        except RingCorruptError as error:
            # Every verified record before the damage was sent (subscribers.py).
            log.error("tenant %d: %s", tenant.tenant_id, error)
            self.fail_after_replies(ErrorCode.STORAGE_FAILED, f"replay stopped: {error}")


async def serve_connection(session: Session, stream: trio.abc.Stream, peer: Peer) -> None:
    """Run one accepted connection to its end and close its stream.

    One peer's failure never reaches the caller: a peer gone (broken or
    closed stream) and a bug of the handler (logged) end this connection only.
    """
    handler = ConnectionHandler(session, stream, peer)
    # From the accept: the Hello (TLS handshake included), or a refusal's Error.
    deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
    try:
        try:
            with session.gate.connection_slot(peer) as slot:
                handler.slot = slot
                await handler.run(deadline)
        except Refused as refusal:  # TOO_MANY_CONNECTIONS: the listener's or the peer's cap
            await handler.refuse(refusal, deadline)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        # The peer went away. except*: the handler's own nursery (reply
        # loop, subscription) raises these inside an ExceptionGroup, and one
        # peer hanging up must never take the daemon down. Its queued
        # batches are still written ("may or may not have been stored").
        session.counters._peers_gone += 1
    except* Exception as group:
        # A bug in handling one connection must not take the daemon and
        # every other connection down: log it, count it, close this one.
        session.counters._internal_errors += 1
        log.error("connection handler failed; closed that connection only", exc_info=group)
    finally:
        await trio.aclose_forcefully(stream)
