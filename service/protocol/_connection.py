"""Connection: one end of one connection, bytes in -> events, events -> bytes out.

The receive side buffers the peer's bytes (at most RECEIVE_BUFFER_BYTES_MAX
unparsed), checks each frame's header before its payload is buffered, decodes
the payload (_frames.py) and hands the event to the ConnectionState
(_state.py), which applies the state table and its rules. The send side asks
the same ConnectionState, then encodes. No sockets, no clock.
"""

from __future__ import annotations

import dataclasses

from ringtail.service.protocol._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ringtail.service.protocol._events import Event, Hello, Welcome
from ringtail.service.protocol._frames import (ENCODERS, FRAME_SPECS, HEADER, check_header,
                                               decode_payload, encode_records_frame,
                                               encode_records_frame_parts)
from ringtail.service.protocol._limits import FRAME_HEADER_SIZE_BYTES, RECEIVE_BUFFER_BYTES_MAX
from ringtail.service.protocol._state import CLIENT, SERVER, ConnectionState, Role, State

_E = ErrorCode


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    state: State
    buffered_bytes: int  # unparsed input held now
    bytes_received: int
    bytes_sent: int
    frames_received: int
    frames_sent: int


class Connection:
    """One end of one ringtail connection: bytes in -> events, events -> bytes out.

    Args:
        role: CLIENT or SERVER, the side this object speaks for.

    Resource handling:
        Holds at most RECEIVE_BUFFER_BYTES_MAX bytes of unparsed input (a
        bytearray consumed by offset and compacted when NEED_DATA is returned).
        No other resources; nothing to close.

    Error handling:
        next_event() raises RemoteProtocolError for the peer's faults; after a
        fatal one it raises again on every call. send() raises
        LocalProtocolError and leaves the state unchanged. See the package
        docstring (ringtail.service.protocol) for fatal and non-fatal errors.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.peer_role = SERVER if role is CLIENT else CLIENT
        self._cstate = ConnectionState()  # the state, the handshake and the rules
        self._buffer = bytearray()
        self._offset = 0  # first unparsed byte of _buffer
        self._eof = False
        self._failure: RemoteProtocolError | None = None
        self._bytes_received = self._bytes_sent = 0
        self._frames_received = self._frames_sent = 0

    @property
    def state(self) -> State:
        return self._cstate.state

    @property
    def hello(self) -> Hello | None:
        """The Hello, once it was sent or received (and passed the rules)."""
        return self._cstate.hello

    @property
    def welcome(self) -> Welcome | None:
        """The Welcome, once it was sent or received (and passed the rules)."""
        return self._cstate.welcome

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(self._cstate.state, len(self._buffer) - self._offset,
                                    self._bytes_received, self._bytes_sent,
                                    self._frames_received, self._frames_sent)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side (EOF).

        Raises:
            LocalProtocolError: INTERNAL, when called after EOF or when the
                unparsed input would exceed RECEIVE_BUFFER_BYTES_MAX (drain
                next_event() to NEED_DATA between reads).
        """
        if self._eof:
            raise LocalProtocolError(_E.INTERNAL, "receive_data() called after EOF (b\"\");"
                                     " a closed connection takes no more data")
        if not data:
            self._eof = True
            return
        buffered = len(self._buffer) - self._offset + len(data)
        if buffered > RECEIVE_BUFFER_BYTES_MAX:
            raise LocalProtocolError(_E.INTERNAL, f"receive buffer would hold {buffered} bytes,"
                                     f" over RECEIVE_BUFFER_BYTES_MAX ({RECEIVE_BUFFER_BYTES_MAX});"
                                     " call next_event() until NEED_DATA before each read")
        self._buffer += data
        self._bytes_received += len(data)

    def next_event(self) -> Event | _Sentinel:
        """The next event from the peer, NEED_DATA, or CLOSED (EOF on a frame boundary).

        Raises:
            RemoteProtocolError: the peer's bytes or frame order are wrong.
        """
        if self._failure is not None:
            raise RemoteProtocolError(self._failure.code, "the connection already failed:"
                                      f" {self._failure.message}")
        try:
            return self._next_event()
        except RemoteProtocolError as error:
            if error.fatal:
                self._failure = error
            raise

    def _next_event(self) -> Event | _Sentinel:
        buffer = self._buffer
        start = self._offset
        if len(buffer) - start >= FRAME_HEADER_SIZE_BYTES:
            size, frame_type, flags = HEADER.unpack_from(buffer, start)
            spec = check_header(size, frame_type, flags)
            self._cstate.check_frame_type(self.peer_role, frame_type, spec.name,
                                          RemoteProtocolError)
            end = start + FRAME_HEADER_SIZE_BYTES + size
            if len(buffer) >= end:
                self._offset = end  # consumed even when a non-fatal error follows
                self._frames_received += 1
                event = decode_payload(spec, buffer, start + FRAME_HEADER_SIZE_BYTES, end, flags)
                self._cstate.process_event(self.peer_role, event, RemoteProtocolError)
                return event
        return self._need_data()

    def _need_data(self) -> _Sentinel:
        buffer = self._buffer
        available = len(buffer) - self._offset
        if self._eof:
            if not available:
                return CLOSED
            if available < FRAME_HEADER_SIZE_BYTES:
                where = f"after {available} bytes of an 8-byte frame header"
            else:
                size, frame_type, _ = HEADER.unpack_from(buffer, self._offset)
                where = (f"{available} bytes into a {FRAME_HEADER_SIZE_BYTES + size}-byte"
                         f" {FRAME_SPECS[frame_type].name} frame")
            raise RemoteProtocolError(_E.MALFORMED_FRAME, f"connection closed {where}; the peer"
                                      " must send whole frames before closing")
        if self._offset:  # compact once per read, not per frame
            if available:
                del buffer[:self._offset]
            else:
                buffer.clear()
            self._offset = 0
        return NEED_DATA

    def send(self, event: Event) -> bytes:
        """The bytes that carry `event` to the peer, after checking it is allowed now.

        Raises:
            LocalProtocolError: the event is not allowed in this state (nothing changes).
        """
        encoder = ENCODERS.get(type(event))
        if encoder is None:
            raise TypeError(f"send() takes a protocol event, not {type(event).__name__}")
        self._cstate.process_event(self.role, event, LocalProtocolError)
        data = encoder(event)
        self._bytes_sent += len(data)
        self._frames_sent += 1
        return data

    def send_records(self, first_sequence: int, records: bytes | memoryview,
                     sequences: tuple[int, ...] | None = None) -> bytes:
        """send(Records(...)) without building the event: records are copied once.

        The same check as send(Records(...)) (ConnectionState.process_records),
        before encoding; Records never changes the state, so a refused encoding
        changes nothing either.

        Raises:
            LocalProtocolError: Records are not allowed in this state, or the
                records or sequences are bad (as Records would say).
        """
        self._cstate.process_records(self.role, LocalProtocolError)
        data = encode_records_frame(first_sequence, records, sequences)
        self._bytes_sent += len(data)
        self._frames_sent += 1
        return data

    def send_records_parts(self, first_sequence: int, records: bytes | memoryview,
                           sequences: tuple[int, ...] | None = None
                           ) -> tuple[bytes, bytes | memoryview]:
        """send_records() as (head, payload), the frame being head + payload; a
        dense frame's payload is `records` itself, not copied (a gathered send).
        Same checks and raises as send_records()."""
        self._cstate.process_records(self.role, LocalProtocolError)
        head, payload = encode_records_frame_parts(first_sequence, records, sequences)
        self._bytes_sent += len(head) + memoryview(payload).nbytes
        self._frames_sent += 1
        return head, payload
