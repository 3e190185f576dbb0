"""Errors a client sees from the daemon (no trio here: the thread-based
Publisher and the Trio Client share them)."""

from __future__ import annotations

from service import protocol
from service.protocol import Ack, Error, ErrorCode


class RingtailError(Exception):
    """The daemon answered with an Error frame (or the connection broke)."""

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
