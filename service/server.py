"""The Trio daemon: Unix-socket listener, connection handlers, orderly shutdown.

Each connection runs three pieces in its own nursery:

- the receive loop: bytes -> protocol events; a Publish is checked (magic,
  tenant) and queued with the tenant's writer, waiting if the tenant is over
  its pending bound (backpressure reaches the socket);
- the reply task: sends each batch's Ack (or Error) in request order once
  the batch is durable;
- for a subscriber, the subscription task (service/subscribers.py).

Shutdown on SIGTERM/SIGINT: stop accepting, stop reading new frames, let every
queued batch be written and acknowledged (or reported failed), close the
rings (the header of the last batch is already durable), exit 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import os
import signal
import struct

import numpy
import trio

from ioring import RingCorruptError, RingError
from ioring.record import RECORD_DTYPE, RECORD_MAGIC, RECORD_SIZE_BYTES
from service import metrics, protocol
from service.auth import (AUTH_FAILURE_COUNT_MAX, AUTH_FAILURE_WINDOW_S, Access,
                          AuthError, AuthFailureLimiter, ForbiddenError, Peer, Role)
from service.config import ConfigError, ServeConfig
from service.listeners import (bind_tcp_listener, bind_unix_listener, server_ssl_context,
                               tcp_address, tcp_peer, unix_peer)
from service.quotas import TENANT_SUBSCRIBER_COUNT_MAX, Clock, TenantQuota, TrioClock
from service.notify import SystemdNotifier
from service.protocol import (CLOSED, NEED_DATA, Ack, Error, ErrorCode, Hello, Ping, Pong,
                              Publish, RemoteProtocolError, Subscribe, Welcome)
from service.subscribers import run_subscription
from service.tenants import TenantLimitError, TenantRegistry, UnknownTenantError

log = logging.getLogger("ringtail.server")

# Connections at once (each costs two small tasks and up to one frame of
# buffered input, RECEIVE_BUFFER_BYTES_MAX).
CONNECTION_COUNT_MAX = 1024
# Subscribers per tenant (each holds one replay read, 256 KiB, at most);
# a tenant's `subscribers_max` may lower it (service/quotas.py).
SUBSCRIBER_COUNT_MAX = TENANT_SUBSCRIBER_COUNT_MAX
# Answers (acks, batch errors) sent in one write when several are decided at
# once; bounds that write to 256 x 40 B = 10 KiB.
REPLY_COALESCE_COUNT_MAX = 256
# Publish batches this small are checked without numpy (its fixed cost).
SMALL_BATCH_RECORD_COUNT_MAX = 8
# Seconds a new connection has to send its Hello.
HANDSHAKE_TIMEOUT_S = 10.0
# Seconds shutdown waits for connections to take their last acks.
SHUTDOWN_GRACE_S = 30.0
# Publish batches a connection may have queued but not yet acknowledged; past
# it the receive loop stops reading (backpressure). 64 x 256 KiB max = 16 MiB
# worst case per connection, bounded further by the writer's pending bound.
CONNECTION_UNACKED_BATCH_COUNT_MAX = 64
RECEIVE_SIZE_BYTES = 256 * 1024
LISTEN_BACKLOG = 128
# accept() failing for want of file descriptors or memory is a passing state
# (connections close, memory frees): wait this long and retry, as
# trio.serve_listeners does, while the backlog holds the new peers.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY_S = 0.1

# Settings a SIGHUP cannot change (a reload that does logs a warning line).
RESTART_ONLY_SETTINGS = ("data_dir", "socket", "socket_mode", "socket_group", "io",
                         "tcp_listen", "tcp_plaintext", "metrics_listen")

assert HANDSHAKE_TIMEOUT_S > 0


@dataclasses.dataclass(slots=True)
class DaemonStatistics:
    connections: int = 0
    connections_total: int = 0
    rejected_batches: int = 0
    protocol_errors: int = 0
    peers_gone: int = 0  # connections that broke while we still had something to send
    accept_retries: int = 0  # accept() out of file descriptors or memory
    internal_errors: int = 0  # handler bugs: the connection was closed, the daemon went on
    auth_failures: int = 0  # Hellos refused AUTH_FAILED (bad credentials)
    auth_rate_limited: int = 0  # ... of which refused unchecked: too many failures
    forbidden: int = 0  # FORBIDDEN: valid credentials, role missing
    tls_failures: int = 0  # TCP peers whose TLS handshake failed
    quota_refused_batches: int = 0  # QUOTA_EXCEEDED (quota_mode = "reject")
    reloads: int = 0  # SIGHUP reloads applied
    reload_failures: int = 0  # ... refused (the old config stayed)


class Daemon:
    """One ringtail daemon: owns the listener, the connections and the tenants.

    Resource handling: `serve()` runs until `shutdown()` (or a signal), then
    closes everything it opened, the socket file included.
    """

    def __init__(self, config: ServeConfig, *, clock: Clock | None = None,
                 reload_config=None):
        """`reload_config()` returns the config to apply on SIGHUP (None: no reload);
        `clock` drives quotas (tests pass a fake one)."""
        self.config = config
        self.clock = clock or TrioClock()
        self.reload_config = reload_config
        self.policy = config.access_policy()
        self.ssl_context = server_ssl_context(config)
        self.auth_limiter = AuthFailureLimiter()
        self.quotas: dict[int, TenantQuota] = {}  # tenant id -> quota state (opened tenants)
        self.handlers: set[_ConnectionHandler] = set()  # welcomed connections
        self.tcp_address: str | None = None  # "HOST:PORT" once listening
        self.registry = TenantRegistry(config.data_dir, config.default_tenant, config.io,
                                       create_on_first_use=config.create_tenants,
                                       settings=config.tenants)
        self.stats = DaemonStatistics()
        # Metrics and health (service/metrics.py, service/notify.py): per-frame
        # counters, readiness for /readyz, systemd's READY=1/STOPPING=1.
        self.counters = metrics.TrafficCounters()
        self.notifier = SystemdNotifier.from_environment()
        self.ready = False
        self.metrics_url: str | None = None  # "http://HOST:PORT" once listening
        self._accept_scope = trio.CancelScope()
        self._connection_scopes: set[trio.CancelScope] = set()
        self._stopping = False

    def shutdown(self) -> None:
        """Stop accepting and reading; queued batches still get acknowledged."""
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        self.notifier.notify("STOPPING=1")
        log.info("shutting down: finishing batches in flight")
        self._accept_scope.cancel()
        for scope in list(self._connection_scopes):
            scope.cancel()

    def count_auth_failure(self, tenant_id: int | None, reason: str) -> None:
        """Count a failed authentication (metric ringtail_auth_failures_total).

        For service/auth.py: call once per refused peer, with the tenant id its
        Hello named (None if none) and a reason from a small fixed set.
        """
        self.counters.count_auth_failure(tenant_id, reason)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # The metrics listener (if configured) first, so /healthz answers and
        # /readyz says 503 while the rings recover.
        await metrics.serve_with_metrics(self, self._serve, task_status)

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # The socket first: it is what tells a second daemon that this one is
        # alive, so a refused `serve` never opens (and recovers) live rings.
        listener = await bind_unix_listener(self.config.socket, self.config.socket_mode,
                                            self.config.socket_group)
        tcp_listener = None
        try:
            if self.config.tcp_listen:
                tcp_listener = await bind_tcp_listener(self.config)
                self.tcp_address = tcp_address(tcp_listener)
            # On a worker thread: recovery may take seconds, and meanwhile the
            # metrics listener must answer /healthz (and /readyz: 503).
            await trio.to_thread.run_sync(self.registry.open_existing)
            async with trio.open_nursery() as root:
                await root.start(self.registry.run)
                signal_scope = trio.CancelScope()
                # Started, not start_soon: "ready" promises SIGTERM is an orderly stop.
                await root.start(self._watch_signals, signal_scope)
                log.info("ringtail ready: socket %s, data dir %s, sync=%s, io=%s%s",
                         self.config.socket, self.config.data_dir, self.config.sync,
                         self.config.io, self._tcp_description())
                self.ready = not self._stopping
                self.notifier.notify("READY=1")
                task_status.started()
                try:
                    async with trio.open_nursery() as connections:
                        with self._accept_scope:
                            async with trio.open_nursery() as accepting:
                                accepting.start_soon(self._accept_loop, listener,
                                                     connections, "unix")
                                if tcp_listener is not None:
                                    accepting.start_soon(self._accept_loop, tcp_listener,
                                                         connections, "tcp")
                        # A peer that stops reading its acks cannot hold shutdown forever.
                        connections.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S
                finally:
                    signal_scope.cancel()
                    self.registry.close()  # writers drain their queues, then stop
        finally:
            await listener.aclose()
            if tcp_listener is not None:
                await tcp_listener.aclose()
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        log.info("ringtail stopped")

    def _tcp_description(self) -> str:
        if self.tcp_address is None:
            return ""
        kind = ("plaintext" if self.ssl_context is None
                else "mtls" if self.config.tls_client_ca else "tls")
        return f", tcp {self.tcp_address} ({kind})"

    async def _accept_loop(self, listener: trio.SocketListener,
                           connections: trio.Nursery, transport: str = "unix") -> None:
        starved = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_RESOURCE_ERRNOS:
                    raise
                self.stats.accept_retries += 1
                if not starved:  # once per streak, not ten lines a second
                    log.error("cannot accept connections: %s; retrying every %.1f s until "
                              "connections close (raise the open-file limit, LimitNOFILE)",
                              error, ACCEPT_RETRY_DELAY_S)
                starved = True
                await trio.sleep(ACCEPT_RETRY_DELAY_S)
                continue
            if starved:
                log.info("accepting connections again")
                starved = False
            connections.start_soon(self._handle, stream, transport)

    async def _watch_signals(self, scope: trio.CancelScope, *,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
        with scope, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                              signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    self.shutdown()

    def quota_for(self, tenant_id: int) -> TenantQuota:
        quota = self.quotas.get(tenant_id)
        if quota is None:  # one per opened tenant: bounded by TENANT_COUNT_MAX
            quota = self.quotas[tenant_id] = TenantQuota(self.config.tenant_quota(tenant_id),
                                                         self.clock)
        return quota

    def reload(self) -> bool:
        """SIGHUP: re-read the config; apply it whole, or keep the old one whole.

        Tenants, grants, tokens and quotas change at once; connections whose
        credentials still hold are untouched; the others get a fatal Error
        (AUTH_FAILED, FORBIDDEN, or UNKNOWN_TENANT for a removed tenant).
        Listener, data-dir and io settings take effect at the next start.
        """
        if self.reload_config is None:
            log.error("reload refused: the daemon was started without --config; "
                      "nothing to re-read")
            self.stats.reload_failures += 1
            return False
        try:
            new = self.reload_config()
            kept = {key: getattr(self.config, key) for key in RESTART_ONLY_SETTINGS
                    if getattr(new, key) != getattr(self.config, key)}
            for key in kept:
                log.warning("reload: %s changed; it takes effect at the next start", key)
            new = dataclasses.replace(new, **kept)
            ssl_context = server_ssl_context(new)  # certificates re-read (renewal)
        except (ConfigError, OSError) as error:
            self.stats.reload_failures += 1
            log.error("reload refused, the running config stays: %s", error)
            return False
        self.config = new
        self.policy, self.ssl_context = new.access_policy(), ssl_context
        added, removed = self.registry.reconfigure(new.tenants, new.default_tenant,
                                                   new.create_tenants)
        for tenant_id, quota in self.quotas.items():
            quota.update(new.tenant_quota(tenant_id))
        closed = sum(self._recheck(handler, removed) for handler in list(self.handlers))
        self.stats.reloads += 1
        log.info("reloaded config: tenants added %s, removed %s; %d connections closed "
                 "(credentials no longer valid)", sorted(added) or "none",
                 sorted(removed) or "none", closed)
        return True

    def _recheck(self, handler: "_ConnectionHandler", removed: set[int]) -> bool:
        """Re-authorise one welcomed connection under the new config; True if closed."""
        tenant_id = handler.tenant.tenant_id
        if tenant_id in removed:
            handler.revoke(ErrorCode.UNKNOWN_TENANT,
                           f"tenant {tenant_id} was removed from the config by a reload")
            return True
        try:
            access = self.policy.check(handler.peer, handler.token, tenant_id,
                                       datetime.datetime.now(datetime.timezone.utc))
        except AuthError as error:
            handler.revoke(ErrorCode.AUTH_FAILED, f"credentials revoked by a reload: {error}")
            return True
        except ForbiddenError as error:
            handler.revoke(ErrorCode.FORBIDDEN, f"role revoked by a reload: {error}")
            return True
        if handler.subscribed and not access.allows(Role.SUBSCRIBE):
            handler.revoke(ErrorCode.FORBIDDEN, "role subscribe revoked by a reload")
            return True
        handler.access = access
        return False

    # -- one connection ------------------------------------------------------------

    async def _handle(self, stream: trio.abc.Stream, transport: str = "unix") -> None:
        self.stats.connections += 1
        self.stats.connections_total += 1
        peer = unix_peer(stream) if transport == "unix" else tcp_peer(stream)
        if transport == "tcp" and self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        handler = _ConnectionHandler(self, stream, peer)
        try:
            if self.stats.connections > CONNECTION_COUNT_MAX:
                await handler.send_error(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"{CONNECTION_COUNT_MAX} connections are open (CONNECTION_COUNT_MAX); "
                    "close idle connections and retry with backoff")
                return
            await handler.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer went away. except*: the handler's own nursery (reply
            # loop, subscription) raises these inside an ExceptionGroup, and one
            # peer hanging up must never take the daemon down. Its queued
            # batches are still written ("may or may not have been stored").
            self.stats.peers_gone += 1
        except* Exception as group:
            # A bug in handling one connection must not take the daemon and
            # every other connection down: log it, count it, close this one.
            self.stats.internal_errors += 1
            log.error("connection handler failed; closed that connection only",
                      exc_info=group)
        finally:
            self.stats.connections -= 1
            await trio.aclose_forcefully(stream)


class _ConnectionHandler:
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

    async def send(self, event) -> None:
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING:
                return  # a fatal Error was the last frame; pending acks/records are dropped
            await self.stream.send_all(self.connection.send(event))

    async def send_records(self, first_sequence: int, records: bytes, sequences) -> None:
        async with self.send_lock:
            if self.connection.state is protocol.State.CLOSING:
                return  # as in send(): nothing follows a fatal Error
            frame = self.connection.send_records(first_sequence, records, sequences)
            # Counted as handed to the socket, before the send returns: a
            # subscriber that has read them always finds them counted.
            self.daemon.counters.count_sent(self.tenant.tenant_id,
                                            len(records) // RECORD_SIZE_BYTES, len(records))
            await self.stream.send_all(frame)

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
            self.subscription_scope.cancel()

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
        problem = check_records(event.records, self.tenant.tenant_id)
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
            if self.connection.state is protocol.State.CLOSING:
                return  # as in send(): nothing follows a fatal Error
            await self.stream.send_all(b"".join(self.connection.send(event)
                                                for event in events))

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
                await run_subscription(tenant, event, self.send, self.send_records)
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


_RECORD_HEAD = struct.Struct("<I12xI")  # magic, tenant_id (record offsets 0 and 16)


def check_records(records: bytes, tenant_id: int) -> tuple[ErrorCode, int, str] | None:
    """The first bad record of a publish batch (vectorised), or None."""
    if len(records) <= SMALL_BATCH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES:
        # numpy's fixed cost dominates for a few records: check them directly.
        for offset in range(0, len(records), RECORD_SIZE_BYTES):
            magic, record_tenant = _RECORD_HEAD.unpack_from(records, offset)
            if magic != RECORD_MAGIC or record_tenant != tenant_id:
                break
        else:
            return None
    array = numpy.frombuffer(records, dtype=RECORD_DTYPE)
    bad_magic = array["magic"] != RECORD_MAGIC
    # record_index names the first bad record whatever its fault (docs/PROTOCOL.md
    # 4.3); a record with both faults is reported for its magic.
    bad = numpy.flatnonzero(bad_magic | (array["tenant_id"] != tenant_id))
    if not len(bad):
        return None
    index = int(bad[0])
    if bad_magic[index]:
        return (ErrorCode.BAD_RECORD_MAGIC, index,
                f"record {index} has magic 0x{int(array['magic'][index]):08x}, expected "
                f"0x{RECORD_MAGIC:08x}; the batch was rejected whole, fix the encoder and resend")
    return (ErrorCode.WRONG_TENANT, index,
            f"record {index} has tenant_id {int(array['tenant_id'][index])} but this "
            f"connection is tenant {tenant_id}; the batch was rejected whole")
