"""The daemon's HTTP/1.1 listener: /metrics, /healthz, /readyz and the web page.

A small server on Trio and h11 (pure Python, sans-IO, HTTP/1.1 only): one
task per connection, requests on a connection answered one at a time. It
replaces hypercorn, whose HTTP/2 and ASGI machinery the daemon never used.
Configured by `http_listen = "HOST:PORT"` (flag `--http`); `metrics_listen` /
`--metrics` are kept as aliases. Routes:

- `/metrics` (Prometheus text from service/metrics.py's collector),
  `/healthz` (alive), `/readyz` (200 once ready, 503 before and while
  stopping): unchanged from the hypercorn listener.
- everything else goes to the web page (service/web.py), which answers
  pages, static assets and Server-Sent Events streams.

Transport: plain HTTP when the listener's host is a loopback address. On any
other address, HTTPS with the daemon's certificate (`tls_cert`, `tls_key`)
when one is configured; without one the listener stays plain HTTP for
/metrics, /healthz and /readyz only (they carry no credentials, and existing
scrapers keep working) and the web routes answer 403 naming the fix, so a
bearer token never crosses a network in clear.

Bounds (each a named constant below): the request head's size (431 past
it), the time a request head may take to arrive (slow-loris: 408 and close),
a request body's size (413), connections at once (503 past it), and how long
one write may stall before the peer is dropped.

Resource handling: the daemon (service/server.py) binds the socket with
`bind_http_socket` and runs `serve_http` in its own nursery; cancelling it
closes the listener and every connection.
Error handling: a malformed request gets 400 (or h11's more precise status)
and the connection is closed; a handler bug gets 500, is logged, and only
that connection closes.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import urllib.parse
from http import HTTPStatus
from typing import Awaitable, Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ringtail.service import metrics
from ringtail.service.config import ConfigError, is_loopback, parse_host_port, server_tls_context

log = logging.getLogger("ringtail.http")

# -- limits ---------------------------------------------------------------------------

# Pending TCP connections (scrapers, probes and a few browsers).
HTTP_LISTEN_BACKLOG = 16
# Connections served at once. Each costs a task, h11's buffers (at most
# HTTP_HEAD_SIZE_BYTES_MAX) and, for an event stream, one subscription's read
# (service/subscribers.py): 64 x ~300 KiB = ~19 MiB at worst. Past it a new
# connection gets 503 and is closed.
HTTP_CONNECTION_COUNT_MAX = 64
# Bytes of a request line plus headers; past it h11 stops buffering and the
# peer gets 431. A browser's head is under 2 KiB; 16 KiB leaves room for long
# cookies it may send to localhost.
HTTP_HEAD_SIZE_BYTES_MAX = 16 * 1024
# Bytes of a request body read (and discarded): no route takes a body. Past
# it: 413 and close, never unbounded reading.
HTTP_BODY_SIZE_BYTES_MAX = 64 * 1024
# Seconds a request (head and body) may take to arrive once its first byte
# has, and a TLS handshake may take: a slow-loris peer is answered 408 and
# dropped after this, instead of holding a connection slot forever.
HTTP_REQUEST_TIMEOUT_S = 10.0
# Seconds an idle keep-alive connection waits for its next request.
HTTP_KEEP_ALIVE_TIMEOUT_S = 5.0
# Seconds one write to a peer may stall (its receive window shut) before the
# connection is dropped. An event stream behind a slow reader is not held to
# it record by record: the subscription falls behind and gets a Gap like a
# slow socket subscriber; this only frees the slot of a peer that stopped
# reading entirely.
HTTP_SEND_STALL_TIMEOUT_S = 60.0
# Bytes read from the socket per receive.
HTTP_RECEIVE_SIZE_BYTES = 16 * 1024

assert HTTP_RECEIVE_SIZE_BYTES <= HTTP_HEAD_SIZE_BYTES_MAX
assert HTTP_KEEP_ALIVE_TIMEOUT_S <= HTTP_REQUEST_TIMEOUT_S < HTTP_SEND_STALL_TIMEOUT_S
assert HTTP_CONNECTION_COUNT_MAX >= HTTP_LISTEN_BACKLOG

TEXT = "text/plain; charset=utf-8"


# -- requests and responses -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One parsed request, as handlers see it."""

    method: str  # "GET", "HEAD", ...
    path: str  # percent-decoded, without the query
    query: dict[str, str]  # last value of each name
    headers: dict[str, str]  # lowercase names; repeated headers joined with ", "
    peer_address: str  # the client's IP address
    secure: bool  # TLS, or a loopback peer on a loopback listener


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


# An event stream: the handler gets `write(bytes)` and writes until it returns
# (or the peer goes, which cancels it).
Writer = Callable[[bytes], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class StreamResponse:
    stream: Callable[[Writer], Awaitable[None]]
    content_type: str = "text/event-stream; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    # Called once the stream is over, or was never run (a HEAD, a peer gone
    # first): gives back what the handler took for it (a subscriber slot).
    on_close: Callable[[], None] | None = None


Handler = Callable[[Request], Awaitable["Response | StreamResponse | None"]]


def text(status: int, message: str) -> Response:
    return Response(status, message.encode() + b"\n")


# -- the health routes ------------------------------------------------------------------


class HealthRoutes:
    """GET /metrics (Prometheus text), /healthz (alive), /readyz (ready or 503)."""

    PATHS = ("/metrics", "/healthz", "/readyz")

    def __init__(self, daemon):
        self.daemon = daemon
        self.registry = metrics.build_registry(daemon)

    async def __call__(self, request: Request) -> Response | None:
        if request.path == "/metrics":
            # Synchronous, on the Trio thread: the collector reads live state
            # without locks. Cost grows with tenants (~20 series each).
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if request.path == "/healthz":
            return text(200, "ok")
        if request.path == "/readyz":
            if self.daemon.ready:
                return text(200, "ready")
            return text(503, "not ready: recovering rings, binding the socket, or shutting down")
        return None


# -- the listener -------------------------------------------------------------------------


def bind_http_socket(listen: str, setting: str = "http_listen") -> socket.socket:
    """A bound, listening TCP socket for `listen` ("HOST:PORT").

    Raises:
        ConfigError: `listen` is not HOST:PORT.
        OSError: the address cannot be resolved or bound; the message names it
            and the fix.
    """
    host, port = parse_host_port(listen, setting)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise OSError(error.errno, f"cannot listen for metrics on {listen} (the HTTP "
                      f"listener): {error.strerror}; fix {setting} or --http") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart past TIME_WAIT
        sock.bind(address)
        sock.listen(HTTP_LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen for metrics on {listen} (the HTTP "
                      f"listener): {error.strerror}; stop what holds that port or change "
                      f"{setting} / --http") from None
    return sock


def http_ssl_context(config, listen: str) -> ssl.SSLContext | None:
    """TLS for the HTTP listener: None on a loopback host or without a certificate.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    host, _ = parse_host_port(listen, "http_listen")
    if is_loopback(host) or not config.tls_cert:
        return None
    return server_tls_context(config, "HTTP listener")


def listener_url(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@dataclasses.dataclass(slots=True)
class HttpStatistics:
    connections: int = 0  # open now
    connections_total: int = 0
    refused_busy: int = 0  # 503: HTTP_CONNECTION_COUNT_MAX open
    bad_requests: int = 0  # 4xx for malformed, oversized or too slow requests
    stalled: int = 0  # dropped: a write stalled HTTP_SEND_STALL_TIMEOUT_S
    handler_errors: int = 0  # 500: a handler bug


class HttpServer:
    """Serves `handlers` (tried in order; the first non-None answer wins) on one socket."""

    def __init__(self, handlers: list[Handler], ssl_context: ssl.SSLContext | None = None,
                 *, loopback: bool = True):
        self.handlers = handlers
        self.ssl_context = ssl_context
        # The context for a new connection (serve_http swaps in one that
        # follows reloads); TLS itself is on or off for the listener's life.
        self.current_ssl_context = lambda: self.ssl_context
        self.loopback = loopback
        self.stats = HttpStatistics()

    def statistics(self) -> HttpStatistics:
        """A copy of the counters now (metrics only read it)."""
        return dataclasses.replace(self.stats)

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on `sock` (taken over) until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:  # EMFILE and friends: as the daemon's accept loop
                    log.error("cannot accept HTTP connections: %s; retrying", error)
                    await trio.sleep(HTTP_KEEP_ALIVE_TIMEOUT_S / 50)  # back off, not sync
                    continue
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        stats.connections += 1
        stats.connections_total += 1
        try:
            peer_address = stream.socket.getpeername()[0]
            secure = self.ssl_context is not None or self.loopback
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.current_ssl_context(), server_side=True)
                with trio.move_on_after(HTTP_REQUEST_TIMEOUT_S) as handshake:
                    await stream.do_handshake()
                if handshake.cancelled_caught:  # too slow: nothing to answer to
                    return
            connection = _Connection(self, stream, peer_address, secure)
            if stats.connections > HTTP_CONNECTION_COUNT_MAX:
                stats.refused_busy += 1
                await connection.refuse_busy()
                return
            await connection.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass  # the peer went away or spoke no TLS: nothing to answer
        except Exception:
            # A bug in one stream (after its 200 went) closes that connection
            # only; the listener and the daemon go on.
            stats.handler_errors += 1
            log.exception("HTTP connection handler failed; closed that connection only")
        finally:
            stats.connections -= 1
            await trio.aclose_forcefully(stream)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Connection:
    """One HTTP/1.1 connection: h11's state machine over a Trio stream."""

    def __init__(self, server: HttpServer, stream: trio.abc.Stream, peer_address: str,
                 secure: bool):
        self.server = server
        self.stream = stream
        self.peer_address = peer_address
        self.secure = secure
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_HEAD_SIZE_BYTES_MAX)

    async def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            with trio.move_on_after(HTTP_SEND_STALL_TIMEOUT_S) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                self.server.stats.stalled += 1
                raise trio.BrokenResourceError(
                    f"a write stalled {HTTP_SEND_STALL_TIMEOUT_S:.0f} s "
                    "(HTTP_SEND_STALL_TIMEOUT_S); the peer was dropped")

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(HTTP_RECEIVE_SIZE_BYTES)
            self.h11.receive_data(data)  # b"": end of stream, h11 turns it into ConnectionClosed

    async def _receive_request(self) -> tuple[h11.Request | None, Response | None]:
        """The next request, or (None, a response to end the connection with, or None)."""
        if self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]:
            # Idle (keep-alive, or a fresh connection): wait for a first byte.
            with trio.move_on_after(HTTP_KEEP_ALIVE_TIMEOUT_S):
                data = await self.stream.receive_some(HTTP_RECEIVE_SIZE_BYTES)
                if not data:
                    return None, None  # the peer closed between requests
                self.h11.receive_data(data)
            if not self.h11.trailing_data[0]:
                return None, None  # idle past the keep-alive timeout: close quietly
        # A request has begun: its head and body must arrive within
        # HTTP_REQUEST_TIMEOUT_S (slow-loris bound).
        with trio.move_on_after(HTTP_REQUEST_TIMEOUT_S):
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None, None
            request = event
            # h11 bounds what it buffers of an incomplete head; a head that
            # arrived whole in one read is measured here (its size as sent).
            head_size = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + sum(
                len(name) + len(value) + len(b": \r\n") for name, value in request.headers)
            if head_size > HTTP_HEAD_SIZE_BYTES_MAX:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            body_size = 0
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    body_size += len(event.data)
                    if body_size > HTTP_BODY_SIZE_BYTES_MAX:
                        return None, text(413, f"request body over {HTTP_BODY_SIZE_BYTES_MAX} "
                                               "bytes (HTTP_BODY_SIZE_BYTES_MAX); no route "
                                               "takes a body")
                elif isinstance(event, h11.EndOfMessage):
                    return request, None
                elif isinstance(event, h11.ConnectionClosed):
                    return None, None
        return None, text(408, f"the request did not arrive whole within "
                               f"{HTTP_REQUEST_TIMEOUT_S:.0f} s (HTTP_REQUEST_TIMEOUT_S); "
                               "send it at once")

    async def run(self) -> None:
        while True:
            try:
                request, refusal = await self._receive_request()
            except h11.RemoteProtocolError as error:
                self.server.stats.bad_requests += 1
                status = error.error_status_hint
                if status == 431:
                    message = (f"request head over {HTTP_HEAD_SIZE_BYTES_MAX} bytes "
                               "(HTTP_HEAD_SIZE_BYTES_MAX); send fewer or shorter headers")
                else:
                    message = f"malformed HTTP/1.1 request: {error}"
                await self._send_final(text(status, message))
                return
            if request is None:
                if refusal is not None:
                    self.server.stats.bad_requests += 1
                    await self._send_final(refusal)
                return
            await self._answer(request)
            if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE \
                    or self.h11.our_state is not h11.DONE:
                return
            self.h11.start_next_cycle()

    async def _send_final(self, response: Response) -> None:
        """A response after which the connection closes (errors)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response has begun already: closing is all that is left
        headers = [*response.headers, ("connection", "close")]
        try:
            await self._send_response(response, headers, head_only=False)
        except h11.LocalProtocolError:
            # h11 sends no response before it has a request head (a slow or
            # oversized one): the same bytes, written by hand.
            lines = [f"HTTP/1.1 {response.status} {_reason(response.status).decode()}",
                     f"content-type: {response.content_type}",
                     f"content-length: {len(response.body)}",
                     *(f"{name}: {value}" for name, value in headers)]
            with trio.move_on_after(HTTP_SEND_STALL_TIMEOUT_S):
                await self.stream.send_all("\r\n".join(lines).encode() + b"\r\n\r\n"
                                           + response.body)

    async def refuse_busy(self) -> None:
        with trio.move_on_after(HTTP_REQUEST_TIMEOUT_S):
            try:
                await self._receive_request()
            except h11.RemoteProtocolError:
                pass
        await self._send_final(text(503, f"{HTTP_CONNECTION_COUNT_MAX} HTTP connections are "
                                         "open (HTTP_CONNECTION_COUNT_MAX); close idle pages "
                                         "and retry"))

    async def _send_response(self, response: Response, headers, head_only: bool) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))),
                   *headers]
        await self._send(h11.Response(status_code=response.status, headers=headers,
                                      reason=_reason(response.status)))
        if response.body and not head_only:
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def _answer(self, event: h11.Request) -> None:
        target = event.target.decode("latin-1")
        parts = urllib.parse.urlsplit(target)
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            value = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = Request(event.method.decode("ascii", "replace"),
                          urllib.parse.unquote(parts.path),
                          dict(urllib.parse.parse_qsl(parts.query)), headers,
                          self.peer_address, self.secure)
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            answer = Response(405, b"use GET\n", headers=(("allow", "GET, HEAD"),))
        else:
            try:
                answer = None
                for handler in self.server.handlers:
                    answer = await handler(request)
                    if answer is not None:
                        break
                else:
                    answer = text(404, "not found; try /, /metrics, /healthz or /readyz")
            except Exception:
                self.server.stats.handler_errors += 1
                log.exception("HTTP handler failed for %s %s", request.method, request.path)
                await self._send_final(text(500, "internal error; see the daemon's log"))
                return
        base_headers = [("cache-control", "no-store"), ("x-content-type-options", "nosniff"),
                        ("referrer-policy", "no-referrer")]
        if isinstance(answer, Response):
            await self._send_response(answer, [*answer.headers, *base_headers], head_only)
            return
        try:
            await self._send(h11.Response(status_code=200, reason=b"OK", headers=[
                ("content-type", answer.content_type), *answer.headers, *base_headers]))
            if head_only:
                await self._send(h11.EndOfMessage())
                return
            await self._stream(answer)
        finally:
            if answer.on_close is not None:
                answer.on_close()

    async def _stream(self, answer: StreamResponse) -> None:
        """Run an event stream until it ends or the peer goes (EOF or any bytes)."""
        async def write(data: bytes) -> None:
            await self._send(h11.Data(data=data))

        async def watch_peer(scope: trio.CancelScope) -> None:
            # Nothing more may come while we answer (no pipelining on a
            # stream); EOF, a reset or bytes mean the page went away or reloaded.
            try:
                await self.stream.receive_some(HTTP_RECEIVE_SIZE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_peer, nursery.cancel_scope)
                await answer.stream(write)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            raise trio.BrokenResourceError("the peer went away mid-stream") from group
        if self.h11.our_state is h11.SEND_BODY:
            try:
                await self._send(h11.EndOfMessage())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def serve_http(daemon, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                     routes: list, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `routes` (tried in order: the health routes, then the web page) on
    `sock` (taken over) until cancelled. The caller builds the routes, so this
    module knows none of the pages it serves (web.py imports it, not the reverse).

    With TLS, the certificate is re-read after a SIGHUP reload (the daemon's
    config object changes), as the TCP listener's is: a renewed certificate
    needs no restart.
    """
    loopback = is_loopback(sock.getsockname()[0])
    server = HttpServer(routes, ssl_context, loopback=loopback)
    if ssl_context is not None:
        listen = daemon.config.http_address
        loaded_from = daemon.config

        def current_context() -> ssl.SSLContext:
            nonlocal loaded_from
            config = daemon.config
            if config is not loaded_from:
                loaded_from = config
                try:
                    server.ssl_context = http_ssl_context(config, listen) or server.ssl_context
                except ConfigError as error:  # the reload checked these files already
                    log.error("HTTP listener keeps its certificate: %s", error)
            return server.ssl_context

        server.current_ssl_context = current_context
    await server.serve(sock, task_status=task_status)
