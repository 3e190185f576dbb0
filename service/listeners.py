"""Listeners: the Unix socket and the TCP (TLS) socket, and who is on the other end.

They only move bytes: a connection accepted here becomes a stream plus a
`Peer` (service/auth.py) and is handed to the daemon's connection handler.
TLS is done per connection with the daemon's current `ssl.SSLContext`
(`trio.SSLStream`, server side), so a SIGHUP can swap in a renewed
certificate without closing the listener. `Acceptor` runs the accept loops
and counts what they accepted (`statistics()`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import socket as stdlib_socket
import ssl
from typing import Awaitable, Callable

import trio

from ringtail.service.auth import Peer, peer_credentials
from ringtail.service.config import (ConfigError, ServeConfig, is_loopback, parse_host_port,
                                     server_tls_context, socket_group_id)

log = logging.getLogger("ringtail.server")

# Connections the kernel queues for accept(): bursts of reconnecting
# publishers wait here, not refused (a few hundred bytes each, kernel side).
LISTEN_BACKLOG = 128
# accept() failing for want of file descriptors or memory is a passing state
# (connections close, memory frees): wait this long and retry, as
# trio.serve_listeners does, while the backlog holds the new peers.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY_S = 0.1

assert ACCEPT_RETRY_DELAY_S > 0


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerStatistics:
    accepted: int  # connections accepted, every listener
    accept_retries: int  # accept() out of file descriptors or memory


class Acceptor:
    """The accept loops of one daemon: each accepted stream goes to `handle`."""

    def __init__(self):
        self._accepted = 0
        self._accept_retries = 0

    async def run(self, listener: trio.SocketListener, connections: trio.Nursery,
                  handle: Callable[[trio.SocketStream, str], Awaitable[None]],
                  transport: str = "unix") -> None:
        """Accept until cancelled; `handle(stream, transport)` runs in `connections`.

        Raises:
            OSError: accept() failed other than for want of descriptors or memory.
        """
        starved = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_RESOURCE_ERRNOS:
                    raise
                self._accept_retries += 1
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
            self._accepted += 1
            connections.start_soon(handle, stream, transport)

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(self._accepted, self._accept_retries)


async def bind_unix_listener(path: str, mode: int, group: str = "") -> trio.SocketListener:
    """Bind the Unix socket with `mode` from the start (no window with a wider mode).

    A leftover socket file from a dead daemon is replaced; a live one is not;
    anything else at `path` (a regular file, a FIFO, a symbolic link, a
    directory) is refused and left untouched. With `group`, the file is given
    that group before it listens.

    Raises:
        OSError: EADDRINUSE (a live daemon), EEXIST (not a socket), or the
            bind's own error; each message names the path.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is {_file_kind(existing.st_mode)}, "
                                        "not a socket; remove it or choose another --socket")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # a stale socket: nobody is listening
        else:
            raise OSError(errno.EADDRINUSE,
                          f"another daemon is serving on {path}; stop it or use --socket")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    previous = os.umask(0o777 & ~mode)
    try:
        await sock.bind(path)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {path}: {error.strerror}; check that "
                                   "its directory exists and is writable by the daemon") from error
    finally:
        os.umask(previous)
    if group:
        os.chown(path, -1, socket_group_id(group, "socket_group"))
    os.chmod(path, mode)
    sock.listen(LISTEN_BACKLOG)
    return trio.SocketListener(sock)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "another kind of file"


async def bind_tcp_listener(config: ServeConfig) -> trio.SocketListener:
    """Bind `config.tcp_listen`. Plain TCP is refused here too unless on loopback.

    Raises:
        ConfigError: plain TCP on a non-loopback address.
        OSError: the address cannot be bound.
    """
    host, port = parse_host_port(config.tcp_listen, "tcp_listen")
    if config.tcp_plaintext and not is_loopback(host):
        raise ConfigError(f"tcp_plaintext refused on {config.tcp_listen}: plain TCP is "
                          "allowed only on a loopback address")
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG)
    for extra in listeners[1:]:  # "localhost" may give ::1 and 127.0.0.1: keep one
        await extra.aclose()
    return listeners[0]


def tcp_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_ssl_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The TLS context for TCP peers, or None for plain TCP (or no TCP).

    Raises:
        ConfigError: a certificate, key or CA file cannot be loaded.
    """
    if not config.tcp_listen or config.tcp_plaintext:
        return None
    context = server_tls_context(config, "TCP listener")
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"tls_client_ca {config.tls_client_ca}: cannot load: "
                              f"{error}") from error
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def unix_peer(stream: trio.SocketStream) -> Peer:
    _, uid, gid = peer_credentials(stream.socket)
    return Peer("unix", uid=uid, gid=gid)


def tcp_peer(stream: trio.SocketStream) -> Peer:
    try:
        address = stream.socket.getpeername()[0]
    except OSError:  # the peer is already gone
        address = "unknown"
    return Peer("tcp", address=address)
