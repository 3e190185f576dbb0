"""One client connection: handshake, publishes, replies and a subscription.

Each connection runs three pieces in its own nursery:

- the receive loop: bytes -> protocol events; a Publish is checked (magic,
  tenant, role, quota) and queued with the tenant's writer, waiting if the
  tenant is over its pending bound (backpressure reaches the socket);
- the reply task: sends each batch's Ack (or Error) in request order once
  the batch is durable, several in one write when they are decided together;
- for a subscriber, the subscription task (service/subscribers.py).

The daemon (service/server.py) owns the listeners, the tenants and shutdown;
a handler only moves one peer's bytes through the codec. When shutdown stops
its reading, a handler answers every batch it queued, lets its subscription
finish the frame it is writing, sends Error(SHUTTING_DOWN) and closes, so the
peer can tell an orderly stop from a crash (docs/PROTOCOL.md 6.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datetime
import functools
import logging

import trio

from ringtail.ioring import RingCorruptError, RingError
from ringtail.ioring.record import (RECORD_FAULT_MAGIC, RECORD_MAGIC, RECORD_SIZE_BYTES,
                                    check_records)
from ringtail.service import protocol
from ringtail.service.auth import (AUTH_FAILURE_COUNT_MAX, AUTH_FAILURE_WINDOW_S, Access, AuthError,
                                   ForbiddenError, Peer, Role)
from ringtail.service.protocol import (CLOSED, NEED_DATA, Ack, Error, ErrorCode, Hello, Ping, Pong,
                                       Publish, RemoteProtocolError, Subscribe, Welcome)
from ringtail.service.quotas import TENANT_SUBSCRIBER_COUNT_MAX, TenantQuota
from ringtail.service.subscribers import run_subscription
from ringtail.service.tenants import TenantLimitError, UnknownTenantError

if TYPE_CHECKING:
    from ringtail.service.server import Daemon

log = logging.getLogger("ringtail.server")

# Subscribers per tenant (each holds one replay read, 256 KiB, at most);
# a tenant's `subscribers_max` may lower it (service/quotas.py).
SUBSCRIBER_COUNT_MAX = TENANT_SUBSCRIBER_COUNT_MAX
# Answers (acks, batch errors) sent in one write when several are decided at
# once; bounds that write to 256 x 40 B = 10 KiB.
REPLY_COALESCE_COUNT_MAX = 256
# Seconds a new connection has to send its Hello.
HANDSHAKE_TIMEOUT_S = 10.0
# Publish batches a connection may have queued but not yet acknowledged; past
# it the receive loop stops reading (backpressure). 64 x 256 KiB max = 16 MiB
# worst case per connection, bounded further by the writer's pending bound.
CONNECTION_UNACKED_BATCH_COUNT_MAX = 64
RECEIVE_SIZE_BYTES = protocol.RECEIVE_SIZE_BYTES
# Seconds a subscription ended by shutdown or a reload may still take to finish
# the frame it is writing (a Records frame is at most 294,924 B), so its peer
# gets whole frames and then the fatal Error; a peer that reads nothing for
# that long gets the frame cut short (EOF in the middle of it) instead.
FRAME_FINISH_TIMEOUT_S = 5.0

assert HANDSHAKE_TIMEOUT_S > 0
assert FRAME_FINISH_TIMEOUT_S > 0


class ConnectionHandler:
    def __init__(self, daemon: Daemon, stream: trio.abc.Stream, peer: Peer | None = None):
        self.daemon = daemon
        self.stream = stream
        self.peer = peer or Peer("unix")
        self.token = b""
        self.access: Access | None = None
        self.quota: TenantQuota | None = None
        self.subscribed = False
        self.close_reason: tuple[ErrorCode, str] | None = None  # set by a reload
        self.connection = protocol.Connection(protocol.SERVER)
        self.send_lock = trio.Lock()
        self.tenant = None
        self.receive_scope = trio.CancelScope()
        self.subscription_scope = trio.CancelScope()
        # A send_all was cut short (cancelled mid-frame): the peer may hold a
        # partial frame, so nothing may follow it, not even an Error.
        self.send_incomplete = False
        self.subscription_writing = False  # the subscription task is in one of its sends
        self.subscription_ending = False  # end_subscription() came while it was

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
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING or self.send_incomplete:
                return  # as in send(): nothing follows a fatal Error
            frame = self.connection.send_records(first_sequence, records, sequences)
            # Counted as handed to the socket, before the send returns: a
            # subscriber that has read them always finds them counted.
            self.daemon.counters.count_sent(self.tenant.tenant_id,
                                            len(records) // RECORD_SIZE_BYTES, len(records))
            await self._send_all(frame)

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

    async def run(self) -> None:
        daemon = self.daemon
        # Shutdown cancels the handshake too: a peer that never says Hello must
        # not hold the daemon's exit for HANDSHAKE_TIMEOUT_S.
        handshake = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S)
        hello = failure = None
        daemon._connection_scopes.add(handshake)
        try:
            with handshake:
                if daemon._stopping:
                    handshake.cancel()
                if not await self.tls_handshake():
                    return
                try:
                    hello = await self.next_event()
                except RemoteProtocolError as error:
                    failure = error
        finally:
            daemon._connection_scopes.discard(handshake)
        if failure is not None:
            await self.protocol_error(failure)
            return
        if handshake.cancelled_caught:
            if daemon._stopping:
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
        if not await self.admit(hello):
            return
        try:
            await self.session(hello)
        finally:
            self.quota.connections -= 1
            daemon.handlers.discard(self)
        if self.close_reason is not None:  # a reload revoked this connection
            await self.send_error(*self.close_reason)
        elif daemon._stopping and self.receive_scope.cancelled_caught:
            # Shutdown stopped the reading and every queued batch was answered:
            # say so, so the peer can tell an orderly stop from a crash (a
            # connection that ends without an Error frame). A peer that closed
            # first, or a fatal Error already sent, needs nothing more.
            await self.send_error(ErrorCode.SHUTTING_DOWN,
                                  "the daemon is shutting down; it answered every batch of "
                                  "this connection that it stored (batches without an answer "
                                  "were not stored); reconnect with backoff and resend them")

    async def session(self, hello: Hello) -> None:
        daemon = self.daemon
        ring = self.tenant.ring
        await self.send(Welcome(hello.tenant_id, protocol.PUBLISH_RECORD_COUNT_MAX,
                                ring.oldest_sequence, ring.next_sequence, ring.capacity,
                                "ringtail"))
        send_replies, receive_replies = trio.open_memory_channel(
            CONNECTION_UNACKED_BATCH_COUNT_MAX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reply_loop, receive_replies)
            scope = self.receive_scope
            daemon._connection_scopes.add(scope)
            try:
                with scope, send_replies:
                    if daemon._stopping:
                        scope.cancel()
                    await self.receive_loop(nursery, send_replies)
            finally:
                daemon._connection_scopes.discard(scope)
            # Replies drain (acks for every queued batch); a subscription ends.
            self.end_subscription()

    async def tls_handshake(self) -> bool:
        """Complete TLS first (inside the handshake deadline); False if it failed."""
        if not isinstance(self.stream, trio.SSLStream):
            return True
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as error:
            self.daemon.stats.tls_failures += 1
            log.warning("TLS handshake with %s failed: %s", self.peer.address,
                        error.__cause__ or error)
            return False
        return True

    async def admit(self, hello: Hello) -> bool:
        """Authenticate the Hello, open the tenant, count the connection; or refuse."""
        daemon = self.daemon
        key, now = self.peer.limiter_key, daemon.clock.now()
        retry_after_s = daemon.auth_limiter.retry_after_s(key, now)
        if retry_after_s is not None:
            daemon.stats.auth_failures += 1
            daemon.stats.auth_rate_limited += 1
            daemon.count_auth_failure(hello.tenant_id, "rate_limited")
            await self.send_error(
                ErrorCode.AUTH_FAILED,
                f"too many failed authentications from {key} (AUTH_FAILURE_COUNT_MAX "
                f"{AUTH_FAILURE_COUNT_MAX} per {AUTH_FAILURE_WINDOW_S:.0f} s); retry in "
                f"{retry_after_s:.0f} s with valid credentials")
            return False
        try:
            self.access = daemon.policy.check(self.peer, hello.token, hello.tenant_id,
                                              datetime.datetime.now(datetime.timezone.utc))
        except AuthError as error:
            daemon.auth_limiter.record_failure(key, now)
            daemon.stats.auth_failures += 1
            daemon.count_auth_failure(hello.tenant_id, "bad_credentials")
            log.warning("authentication failed: %s, tenant %d: %s", key, hello.tenant_id, error)
            await self.send_error(ErrorCode.AUTH_FAILED, str(error))
            return False
        except ForbiddenError as error:
            daemon.stats.forbidden += 1
            daemon.count_auth_failure(hello.tenant_id, "forbidden")
            await self.send_error(ErrorCode.FORBIDDEN, str(error))
            return False
        try:
            self.tenant = daemon.registry.get(hello.tenant_id)
        except (UnknownTenantError, TenantLimitError) as error:
            await self.send_error(ErrorCode.UNKNOWN_TENANT, str(error))
            return False
        except (RingError, OSError) as error:  # OSError: creating the file (ENOSPC, EACCES)
            log.error("tenant %d cannot be opened: %s", hello.tenant_id, error)
            await self.send_error(ErrorCode.TENANT_UNAVAILABLE,
                                  f"tenant {hello.tenant_id}'s ring cannot be opened: {error}")
            return False
        self.quota = quota = daemon.quota_for(hello.tenant_id)
        limit = quota.settings.connections_max
        if quota.connections >= limit:
            quota.connections_refused += 1
            await self.send_error(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"tenant {hello.tenant_id} has {limit} connections open (its connections_max); "
                "close idle connections and retry with backoff")
            return False
        # No await between the checks and this: a reload sees every admitted connection.
        quota.connections += 1
        self.token = hello.token
        daemon.handlers.add(self)
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

    async def forbidden(self, role: Role) -> None:
        self.daemon.stats.forbidden += 1
        await self.send_error(ErrorCode.FORBIDDEN,
                              f"these credentials ({self.access.credential}) may not "
                              f"{role.value} on tenant {self.tenant.tenant_id}; grant the "
                              f"{role.value} role in the tenant's grants or use other credentials")

    async def pace(self, event: Publish) -> protocol.ProtocolError | None:
        """Hold the batch to the tenant's records/s quota: wait ("slow") or refuse."""
        quota = self.quota
        bucket = quota.bucket
        if bucket is None:
            return None
        count = len(event.records) // RECORD_SIZE_BYTES
        clock = self.daemon.clock
        now = clock.now()
        if quota.settings.mode == "reject":
            if bucket.try_take(count, now):
                return None
            quota.batches_refused += 1
            self.daemon.stats.quota_refused_batches += 1
            wait_s = bucket.seconds_until(count, now)
            advice = (f"retry in {wait_s:.3f} s" if wait_s != float("inf") else
                      f"split it: batches over burst_records ({bucket.burst_records}) never fit")
            return protocol.ProtocolError(
                ErrorCode.QUOTA_EXCEEDED,
                f"tenant {self.tenant.tenant_id} is over its quota of "
                f"{quota.settings.records_per_second} records/s (burst {bucket.burst_records}); "
                f"the batch of {count} records was refused whole; {advice}",
                batch_id=event.batch_id)
        deadline = bucket.reserve(count, now)
        if deadline > now:
            quota.records_delayed += count
            await clock.sleep_until(deadline)  # pacing to the quota, not synchronisation
        return None

    async def receive_loop(self, nursery: trio.Nursery, replies) -> None:
        while True:
            try:
                event = await self.next_event()
            except RemoteProtocolError as error:
                if not error.fatal:
                    self.daemon.stats.rejected_batches += 1
                    self.daemon.counters.count_rejected(self.tenant.tenant_id, error.code, 0)
                    await replies.send((error.batch_id, None, error))
                    continue
                await self.protocol_error(error)
                return
            if event is CLOSED:
                return
            if isinstance(event, Publish):
                if not self.access.allows(Role.PUBLISH):
                    await self.forbidden(Role.PUBLISH)
                    return
                refusal = await self.pace(event)  # unshielded: shutdown may cut a wait
                if refusal is not None:
                    self.daemon.stats.rejected_batches += 1
                    await replies.send((event.batch_id, None, refusal))
                    continue
                # A batch read off the socket is queued and answered even if
                # shutdown starts meanwhile.
                with trio.CancelScope(shield=True):
                    await self.publish(event, replies)
            elif isinstance(event, Subscribe):
                if not self.access.allows(Role.SUBSCRIBE):
                    await self.forbidden(Role.SUBSCRIBE)
                    return
                self.subscribed = True
                self.subscription_scope = trio.CancelScope()
                nursery.start_soon(self.subscribe, event)
            elif isinstance(event, Ping):
                await self.send(Pong(event.nonce))

    async def protocol_error(self, error: RemoteProtocolError) -> None:
        self.daemon.stats.protocol_errors += 1
        await self.send(Error.from_protocol_error(error))

    async def publish(self, event: Publish, replies) -> None:
        problem = publish_problem(event.records, self.tenant.tenant_id)
        if problem is not None:
            code, index, message = problem
            self.daemon.stats.rejected_batches += 1
            self.daemon.counters.count_rejected(self.tenant.tenant_id, code,
                                                len(event.records) // RECORD_SIZE_BYTES)
            error = protocol.ProtocolError(code, message, batch_id=event.batch_id,
                                           record_index=index)
            await replies.send((event.batch_id, None, error))
            return
        request = await self.tenant.writer.publish(event.records)
        await replies.send((event.batch_id, request, None))

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
        batch_id, request, error = item
        if error is not None:
            return Error(int(error.code), error.message, batch_id, error.record_index)
        await request.done.wait()
        if request.error is not None:
            message = f"batch {batch_id} is not durable: {request.error}"
            return Error(int(ErrorCode.STORAGE_FAILED),
                         message[:protocol.ERROR_MESSAGE_SIZE_BYTES_MAX // 4], batch_id)
        return Ack(batch_id, request.first_sequence, request.last_sequence)

    async def _send_events(self, events) -> None:
        if not events:
            return
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING or self.send_incomplete:
                return  # as in send(): nothing follows a fatal Error
            await self._send_all(b"".join(self.connection.send(event) for event in events))

    async def subscribe(self, event: Subscribe) -> None:
        tenant = self.tenant
        limit = min(SUBSCRIBER_COUNT_MAX, self.quota.settings.subscribers_max)
        if tenant.subscriber_count >= limit:
            await self.send_error(ErrorCode.TOO_MANY_SUBSCRIBERS,
                                  f"tenant {tenant.tenant_id} has {limit} subscribers "
                                  "(SUBSCRIBER_COUNT_MAX or its subscribers_max); retry later")
            self.receive_scope.cancel()
            return
        tenant.subscriber_count += 1
        self.quota.subscribers += 1
        try:
            with self.subscription_scope:
                await run_subscription(
                    tenant, event, functools.partial(self._subscription_write, self.send),
                    functools.partial(self._subscription_write, self.send_records))
        except RemoteProtocolError as error:  # BAD_SUBSCRIBE found against the ring
            await self.protocol_error(error)
            self.receive_scope.cancel()
        except RingCorruptError as error:
            log.error("tenant %d: %s", tenant.tenant_id, error)
            await self.send_error(ErrorCode.STORAGE_FAILED, f"replay stopped: {error}")
            self.receive_scope.cancel()
        finally:
            tenant.subscriber_count -= 1
            self.quota.subscribers -= 1


def publish_problem(records: bytes, tenant_id: int) -> tuple[ErrorCode, int, str] | None:
    """The first bad record of a publish batch as (code, index, message), or None.

    The check itself is ioring.record.check_records (shared with the
    Publisher's pre-check); this words it for the wire.
    """
    fault = check_records(records, tenant_id)
    if fault is None:
        return None
    if fault.fault == RECORD_FAULT_MAGIC:
        return (ErrorCode.BAD_RECORD_MAGIC, fault.index,
                f"record {fault.index} has magic 0x{fault.value:08x}, expected "
                f"0x{RECORD_MAGIC:08x}; the batch was rejected whole, fix the encoder and resend")
    return (ErrorCode.WRONG_TENANT, fault.index,
            f"record {fault.index} has tenant_id {fault.value} but this "
            f"connection is tenant {tenant_id}; the batch was rejected whole")
