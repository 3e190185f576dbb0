"""The Trio daemon: listeners, tenants, reload, orderly shutdown.

Each accepted connection is handed to a ConnectionHandler
(service/connection.py), which runs the handshake, publishes, replies and a
subscription for that one peer.

Shutdown on SIGTERM/SIGINT: stop accepting, stop reading new frames, let every
queued batch be written and acknowledged (or reported failed), send every open
connection a fatal Error SHUTTING_DOWN (docs/PROTOCOL.md section 6.1), close
the rings (the header of the last batch is already durable), exit 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import os
import signal

import trio

from ringtail.ioring.backend import resolve_io
from ringtail.ioring.probe import ProbeResult
from ringtail.service import http, metrics
from ringtail.service.auth import AuthError, AuthFailureLimiter, ForbiddenError, Role
from ringtail.service.config import ConfigError, ServeConfig
from ringtail.service.connection import HANDSHAKE_TIMEOUT_S, ConnectionHandler
from ringtail.service.listeners import (bind_tcp_listener, bind_unix_listener, server_ssl_context,
                                        tcp_address, tcp_peer, unix_peer)
from ringtail.service.notify import SystemdNotifier
from ringtail.service.protocol import ErrorCode
from ringtail.service.quotas import Clock, TenantQuota, TrioClock
from ringtail.service.tenants import TenantRegistry

log = logging.getLogger("ringtail.server")

# Connections at once (each costs two small tasks and up to one frame of
# buffered input, RECEIVE_BUFFER_BYTES_MAX).
CONNECTION_COUNT_MAX = 1024
# Seconds shutdown waits for connections to take their last acks.
SHUTDOWN_GRACE_S = 30.0
LISTEN_BACKLOG = 128
# accept() failing for want of file descriptors or memory is a passing state
# (connections close, memory frees): wait this long and retry, as
# trio.serve_listeners does, while the backlog holds the new peers.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY_S = 0.1

# Settings a SIGHUP cannot change (a reload that does logs a warning line).
RESTART_ONLY_SETTINGS = ("data_dir", "socket", "socket_mode", "socket_group", "io",
                         "tcp_listen", "tcp_plaintext", "metrics_listen", "http_listen")

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
        self.handlers: set[ConnectionHandler] = set()  # welcomed connections
        self.tcp_address: str | None = None  # "HOST:PORT" once listening
        # The I/O backend every ring uses, decided once at start (_choose_io):
        # "uring" or "threads"; io_probe is the io_uring probe's verdict.
        self.io_backend: str | None = None
        self.io_probe: ProbeResult | None = None
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
        """Serve until shutdown. The metrics listener (if configured) binds first,
        in this daemon's own nursery, so /healthz answers and /readyz says 503
        while the rings recover; it stops after everything else has.

        Raises:
            OSError: a listener cannot bind (the message names it and the fix).
            BackendUnavailableError: `io = "uring"` and the io_uring probe failed.
        """
        if not self.config.http_address:
            await self._serve(task_status=task_status)
            return
        ssl_context = http.http_ssl_context(self.config, self.config.http_address)
        sock = http.bind_http_socket(self.config.http_address)
        url = http.listener_url(sock, tls=ssl_context is not None)
        failure = None
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve_http, self, sock, ssl_context)
            self.metrics_url = url
            log.info("metrics listening on %s (/metrics, /healthz, /readyz; web page /)", url)
            try:
                await self._serve(task_status=task_status)
            except Exception as error:
                # Re-raised after the nursery: inside it, the daemon's own errors
                # (socket in use, ...) would reach the CLI wrapped in an
                # ExceptionGroup instead of as the error it reports plainly.
                failure = error
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

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
            # On worker threads: the io_uring probe waits on a child process
            # and recovery may take seconds; meanwhile the metrics listener
            # must answer /healthz (and /readyz: 503).
            await trio.to_thread.run_sync(self._choose_io)
            await trio.to_thread.run_sync(self.registry.open_existing)
            async with trio.open_nursery() as root:
                await root.start(self.registry.run)
                signal_scope = trio.CancelScope()
                # Started, not start_soon: "ready" promises SIGTERM is an orderly stop.
                await root.start(self._watch_signals, signal_scope)
                log.info("ringtail ready: socket %s, data dir %s, sync=%s, io=%s%s",
                         self.config.socket, self.config.data_dir, self.config.sync,
                         self.io_backend, self._tcp_description())
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

    def _choose_io(self) -> None:
        """Decide the rings' I/O backend once, before any ring opens.

        `auto` and `uring` first run the daemon's io_uring calls in a child
        process (ioring/probe.py), so a native fault or a hang costs the
        probe, never the daemon. A failed probe gives, for `auto`, one log
        line naming the cause and the fix and the thread backend; for
        `uring`, BackendUnavailableError with the same cause (serve exits 1).
        """
        os.makedirs(self.config.data_dir, mode=0o700, exist_ok=True)
        self.io_backend, self.io_probe = resolve_io(self.config.io, self.config.data_dir)
        self.registry.io = self.io_backend

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

    def _recheck(self, handler: ConnectionHandler, removed: set[int]) -> bool:
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
        handler = ConnectionHandler(self, stream, peer)
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
