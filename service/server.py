"""The Trio daemon: listeners, tenants, reload, orderly shutdown.

Each accepted connection is handed to `serve_connection`
(service/connection.py) with the daemon's `Session`: the gate
(service/gate.py), the stop signal and the counters. The daemon never
touches a handler: a reload re-checks connections through the gate, and
shutdown sets the stop signal.

`statistics()` composes every owner's frozen statistics (listeners,
connection handling, gate, subscriptions, tenants, the daemon's own reloads)
into one `DaemonStatistics`, which the metrics collector reads.

Signals are handled from the first instruction of `serve` (SIGHUP during
start-up recovery is applied once the rings are open, never fatal).
Shutdown on SIGTERM/SIGINT: stop accepting, stop reading new frames, let every
queued batch be written and acknowledged (or reported failed), send every open
connection a fatal Error SHUTTING_DOWN (docs/PROTOCOL.md section 6.1), close
the rings (the header of the last batch is already durable), exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

import trio

from ringtail.ioring.backend import resolve_io
from ringtail.ioring.probe import ProbeResult
from ringtail.ioring.ring import make_data_directory
from ringtail.service import http
from ringtail.service.config import ConfigError, ServeConfig
from ringtail.service.connection import (HandlerCounters, HandlerStatistics, Session, StopSignal,
                                         serve_connection)
from ringtail.service.gate import Gate, GateStatistics
from ringtail.service.limits import return_freed_buffers_promptly
from ringtail.service.listeners import (Acceptor, ListenerStatistics, bind_tcp_listener,
                                        bind_unix_listener, server_ssl_context, tcp_address,
                                        tcp_peer, unix_peer)
from ringtail.service.notify import SystemdNotifier
from ringtail.service.quotas import Clock, TrioClock
from ringtail.service.ship_process import supervise_ship
from ringtail.service.subscribers import SubscriptionCounters, SubscriptionStatistics
from ringtail.service.tenants import RegistryStatistics, TenantRegistry
from ringtail.service.web import WebApp

log = logging.getLogger("ringtail.server")

# Seconds shutdown waits for connections to take their last acks.
SHUTDOWN_GRACE_S = 30.0

# Settings a SIGHUP cannot change (a reload that does logs a warning line).
RESTART_ONLY_SETTINGS = ("data_dir", "socket", "socket_mode", "socket_group", "io",
                         "tcp_listen", "tcp_plaintext", "metrics_listen", "http_listen")

# SIGTERM and SIGINT: orderly stop; SIGHUP: reload (HANDLED_SIGNALS are
# handled from the first instruction of `Daemon.serve`).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

assert SHUTDOWN_GRACE_S > 0


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonStatistics:
    """One daemon at one moment: each owner's statistics, composed."""

    ready: bool  # as /readyz
    io_probe: ProbeResult | None  # the io_uring probe's verdict (None: not run)
    notify_failures: int  # systemd notifications that could not be sent
    reloads: int  # SIGHUP reloads applied
    reload_failures: int  # ... refused (the old config stayed)
    listeners: ListenerStatistics
    connections: HandlerStatistics
    gate: GateStatistics
    subscriptions: SubscriptionStatistics
    tenants: RegistryStatistics
    http: http.HttpStatistics | None = None  # the HTTP listener's, when one is configured


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
        self.ssl_context = server_ssl_context(config)
        self.tcp_address: str | None = None  # "HOST:PORT" once listening
        # The I/O backend every ring uses, decided once at start (_choose_io):
        # "uring" or "threads"; io_probe is the io_uring probe's verdict.
        self.io_backend: str | None = None
        self.io_probe: ProbeResult | None = None
        self.registry = TenantRegistry(config.data_dir, config.default_tenant, config.io,
                                       create_on_first_use=config.create_tenants,
                                       settings=config.tenants)
        # Admission: auth, connection and subscriber caps, quotas, record checks.
        self._limits_for: ServeConfig | None = None  # the config self._limits was built from
        self._limits = config.connection_limits
        self.gate = Gate(config.access_policy(), self.registry,
                         lambda tenant_id: self.config.tenant_quota(tenant_id), self.clock,
                         self._connection_limits)
        self.subscriptions = SubscriptionCounters()  # for in-process subscribers too
        self.stop = StopSignal()
        # All a connection handler gets (service/connection.py).
        self.session = Session(self.gate, self.stop, HandlerCounters(), self.subscriptions)
        self.acceptor = Acceptor()
        # Health (service/notify.py): readiness for /readyz, systemd's
        # READY=1/STOPPING=1.
        self.notifier = SystemdNotifier.from_environment()
        self.ready = False
        self.metrics_url: str | None = None  # "http://HOST:PORT" once listening
        self._http_server: http.HttpServer | None = None  # its statistics() feed /metrics
        self._accept_scope = trio.CancelScope()
        self._reloads = 0
        self._reload_failures = 0
        self._signals = None  # the signal receiver `serve` opens first
        self._reload_added: set[int] = set()  # tenants the last reload added

    def shutdown(self) -> None:
        """Stop accepting and reading; queued batches still get acknowledged."""
        if self.stop.is_set:
            return
        self.ready = False
        self.notifier.notify("STOPPING=1")
        log.info("shutting down: finishing batches in flight")
        self._accept_scope.cancel()
        self.stop.set()

    def statistics(self) -> DaemonStatistics:
        """Every owner's statistics now (on the Trio thread: a consistent moment)."""
        return DaemonStatistics(
            self.ready, self.io_probe, self.notifier.statistics().failed, self._reloads,
            self._reload_failures, self.acceptor.statistics(),
            self.session.counters.statistics(), self.gate.statistics(),
            self.subscriptions.statistics(), self.registry.statistics(),
            None if self._http_server is None else self._http_server.statistics())

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shutdown. The metrics listener (if configured) binds first,
        in this daemon's own nursery, so /healthz answers and /readyz says 503
        while the rings recover; it stops after everything else has.

        Raises:
            OSError: a listener cannot bind (the message names it and the fix).
            BackendUnavailableError: `io = "uring"` and the io_uring probe failed.
        """
        # The first thing: from here SIGTERM, SIGINT and SIGHUP are never
        # fatal (issue 9, item 11). Those that come during start-up (the
        # probe, recovering every ring: seconds) wait in the receiver and
        # are acted on once the rings are open: a reload applies then, a
        # stop begins at once after "ready".
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            self._signals = signals
            await self._serve_with_http(task_status)

    async def _serve_with_http(self, task_status) -> None:
        if not self.config.http_address:
            await self._serve(task_status=task_status)
            return
        ssl_context = http.http_ssl_context(self.config, self.config.http_address)
        sock = http.bind_http_socket(self.config.http_address)
        url = http.listener_url(sock, tls=ssl_context is not None)
        failure = None
        async with trio.open_nursery() as nursery:
            self._http_server = await nursery.start(
                http.serve_http, self, sock, ssl_context,
                [http.HealthRoutes(self), WebApp(self)])
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
        return_freed_buffers_promptly()  # a connection's batches leave with it (limits.py)
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
                self.ready = not self.stop.is_set
                self.notifier.notify("READY=1")
                task_status.started()
                ship_scope = trio.CancelScope()
                if self.config.ship is not None:
                    root.start_soon(self._supervise_ship, ship_scope)
                try:
                    async with trio.open_nursery() as connections:
                        with self._accept_scope:
                            async with trio.open_nursery() as accepting:
                                accepting.start_soon(self.acceptor.run, listener,
                                                     connections, self._handle, "unix")
                                if tcp_listener is not None:
                                    accepting.start_soon(self.acceptor.run, tcp_listener,
                                                         connections, self._handle, "tcp")
                        # A peer that stops reading its acks cannot hold shutdown forever.
                        connections.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S
                finally:
                    signal_scope.cancel()
                    ship_scope.cancel()
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

    def _connection_limits(self):
        """The config's ConnectionLimits, built once per config (a reload
        replaces the config object): the gate and every connection's idle
        check read it per frame."""
        config = self.config
        if config is not self._limits_for:
            self._limits_for, self._limits = config, config.connection_limits
        return self._limits

    async def _supervise_ship(self, scope: trio.CancelScope) -> None:
        """`ringtail ship` as a child (the config's [ship]), until the daemon stops."""
        with scope:
            await supervise_ship(self.config.ship, self.config.socket)

    def _choose_io(self) -> None:
        """Decide the rings' I/O backend once, before any ring opens.

        `auto` and `uring` first run the daemon's io_uring calls in a child
        process (ioring/probe.py), so a native fault or a hang costs the
        probe, never the daemon. A failed probe gives, for `auto`, one log
        line naming the cause and the fix and the thread backend; for
        `uring`, BackendUnavailableError with the same cause (serve exits 1).
        """
        make_data_directory(self.config.data_dir)  # names a file in the way (issue 9, 18)
        self.io_backend, self.io_probe = resolve_io(self.config.io, self.config.data_dir)
        self.registry.io = self.io_backend

    def _tcp_description(self) -> str:
        if self.tcp_address is None:
            return ""
        kind = ("plaintext" if self.ssl_context is None
                else "mtls" if self.config.tls_client_ca else "tls")
        return f", tcp {self.tcp_address} ({kind})"

    async def _watch_signals(self, scope: trio.CancelScope, *,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            task_status.started()
            async for signum in self._signals:
                log.info("received %s", signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    if self.reload():
                        # Its new tenants' rings: opened (created) on worker
                        # threads, never on the loop (issue 9, item 5).
                        await self.registry.open_on_threads(self._reload_added)
                else:
                    self.shutdown()

    def reload(self) -> bool:
        """SIGHUP: re-read the config; apply it whole, or keep the old one whole.

        Tenants, grants, tokens and quotas change at once; connections whose
        credentials still hold are untouched; the others get a fatal Error
        (AUTH_FAILED, FORBIDDEN, or UNKNOWN_TENANT for a removed tenant).
        Listener, data-dir and io settings take effect at the next start.
        Added tenants' rings are not opened here (that may take seconds):
        the signal watcher opens them on worker threads right after, and a
        Hello for one before that opens it the same way.
        """
        if self.reload_config is None:
            log.error("reload refused: the daemon was started without --config; "
                      "nothing to re-read")
            self._reload_failures += 1
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
            self._reload_failures += 1
            log.error("reload refused, the running config stays: %s", error)
            return False
        self.config = new
        self.ssl_context = ssl_context
        added, removed = self.registry.reconfigure(new.tenants, new.default_tenant,
                                                   new.create_tenants, open_added=False)
        self._reload_added = added  # opened by the caller (_watch_signals), off the loop
        closed = self.gate.reconfigure(new.access_policy(), removed)  # quotas: self.config
        self._reloads += 1
        log.info("reloaded config: tenants added %s, removed %s; %d connections closed "
                 "(credentials no longer valid)", sorted(added) or "none",
                 sorted(removed) or "none", closed)
        return True

    # -- one connection ------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream, transport: str = "unix") -> None:
        peer = unix_peer(stream) if transport == "unix" else tcp_peer(stream)
        if transport == "tcp" and self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        await serve_connection(self.session, stream, peer)
