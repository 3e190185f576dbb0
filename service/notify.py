"""systemd readiness notification (sd_notify), without libsystemd.

Under `Type=notify` systemd sets $NOTIFY_SOCKET to an AF_UNIX datagram
socket: a path (`/run/systemd/notify`) or, when it starts with '@', an
abstract address (the '@' stands for a leading NUL byte). Each state change is
one datagram of `KEY=VALUE` lines. The daemon sends `READY=1` when its socket
is bound and every existing ring is recovered (the moment it logs "ringtail
ready"), and `STOPPING=1` when an orderly shutdown begins.

Error handling: outside systemd (no $NOTIFY_SOCKET) every call does nothing.
A notification that cannot be sent (no such socket, refused, full) is logged
and counted in `statistics().failed`; the daemon keeps
serving, as sd_notify's callers do. systemd then reports the start as timed
out, which names the real problem better than a crashed daemon would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

log = logging.getLogger("ringtail.notify")

NOTIFY_SOCKET_VARIABLE = "NOTIFY_SOCKET"
# Seconds one send may block when systemd's receive queue is full: the two
# notifications of a lifetime may wait this long, the event loop with them.
NOTIFY_SEND_TIMEOUT_S = 1.0
# sun_path is 108 bytes on Linux, the terminating NUL included for paths.
NOTIFY_ADDRESS_SIZE_BYTES_MAX = 107


@dataclasses.dataclass(frozen=True, slots=True)
class NotifierStatistics:
    sent: int
    failed: int


def notify_address(value: str) -> str | bytes | None:
    """The sendto() address for a $NOTIFY_SOCKET value, or None if unusable.

    '@name' is the abstract address b'\\0name'; an absolute path is itself.
    Anything else (empty, relative, vsock:...) is not supported here.
    """
    if value.startswith("@") and 1 < len(value) <= NOTIFY_ADDRESS_SIZE_BYTES_MAX:
        return b"\0" + value[1:].encode()
    if value.startswith("/") and len(value.encode()) <= NOTIFY_ADDRESS_SIZE_BYTES_MAX:
        return value
    return None


class SystemdNotifier:
    """Sends state datagrams to $NOTIFY_SOCKET (read once, when made).

    Resource handling: each `notify()` opens, uses and closes its own socket;
    nothing is held between calls.
    """

    def __init__(self, socket_value: str | None):
        self.socket_value = socket_value or None
        self.address = None if self.socket_value is None else notify_address(self.socket_value)
        self._sent = 0
        self._failed = 0
        if self.socket_value is not None and self.address is None:
            log.warning("%s=%r is not an absolute path or an @abstract name; systemd will "
                        "not hear READY=1", NOTIFY_SOCKET_VARIABLE, self.socket_value)

    @classmethod
    def from_environment(cls, environ=os.environ) -> "SystemdNotifier":
        return cls(environ.get(NOTIFY_SOCKET_VARIABLE))

    @property
    def enabled(self) -> bool:
        return self.socket_value is not None

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(self._sent, self._failed)

    def notify(self, state: str) -> bool:
        """Send `state` (e.g. "READY=1") as one datagram; True if it was sent.

        Synchronous: a local datagram either goes at once or waits at most
        NOTIFY_SEND_TIMEOUT_S for room in systemd's queue.
        """
        if self.socket_value is None:
            return False
        if self.address is None:
            self._failed += 1
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
                sock.sendto(state.encode(), self.address)
        except OSError as error:  # ENOENT, ECONNREFUSED, EACCES, timeout
            self._failed += 1
            log.warning("cannot notify systemd (%s) at %s=%s: %s", state,
                        NOTIFY_SOCKET_VARIABLE, self.socket_value, error)
            return False
        self._sent += 1
        return True
