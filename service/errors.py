"""Errors a client sees from the daemon (no trio here: the thread-based
Publisher and the Trio Client share them)."""

from __future__ import annotations

from ringtail.service import protocol
from ringtail.service.protocol import Ack, Error, ErrorCode

__all__ = ["RingtailError", "connection_lost_error"]


class RingtailError(Exception):
    """The daemon answered with an Error frame, or the connection ended without
    one (code CONNECTION_LOST, see `connection_lost_error`)."""

    def __init__(self, code: int, message: str, batch_id: int = 0,
                 record_index: int = protocol.RECORD_INDEX_NONE):
        self.code = code
        self.message = message
        self.batch_id = batch_id
        self.record_index = record_index
        self.acks: list[Ack] = []  # publish_many: the batches of the call that were stored
        try:
            name = ErrorCode(code).name
            self.fatal = ErrorCode(code).fatal  # False: one batch refused, the connection goes on
        except ValueError:
            name = f"code {code}"
            self.fatal = True
        where = "" if record_index == protocol.RECORD_INDEX_NONE else f" (record {record_index})"
        super().__init__(f"{name}{where}: {message}")

    @classmethod
    def from_event(cls, event: Error) -> "RingtailError":
        return cls(event.code, event.message, event.batch_id, event.record_index)


def connection_lost_error(peer: str = "", detail: str = "") -> RingtailError:
    """What a client reports when the connection ended (EOF, ECONNRESET, EPIPE)
    without an Error frame: the daemon did not stop in order.

    A daemon that stops in order (SIGTERM, SIGINT) sends SHUTTING_DOWN first;
    that Error is reported as it is, never this one.

    Args:
        peer: the daemon's socket path or host:port; "" if the client does not know it.
        detail: how it ended, if known ("Connection reset by peer", "Broken pipe").
    """
    where = f" at {peer}" if peer else ""
    how = f" ({detail})" if detail else ""
    return RingtailError(
        ErrorCode.CONNECTION_LOST,
        f"the daemon{where} closed the connection without a reply (no Error frame){how}: it "
        "may have crashed or been killed; see its log (journalctl -u ringtail, or the stderr "
        "of `ringtail serve`)")
