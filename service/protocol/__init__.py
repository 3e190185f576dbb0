"""Sans-IO codec of the ringtail wire protocol, in the shape of h11.

docs/PROTOCOL.md is the contract (frame layouts with byte offsets, the state
table, error codes, limits and test vectors); this docstring is the map. There
are no sockets, no ``await`` and no clock here: the listener glue moves bytes,
this package turns bytes into events and events into bytes::

    connection = Connection(SERVER)
    connection.receive_data(data)       # b"" means the peer closed (EOF)
    event = connection.next_event()     # an event, NEED_DATA, or CLOSED
    data = connection.send(Welcome(...))  # bytes for the glue to write

Every frame is an 8-byte header (u32 frame_size, u16 frame_type, u16 flags,
little-endian) and frame_size bytes of payload.

Where things are (one concept per module; each imports only those above it)::

    _limits.py      PROTOCOL_VERSION, size limits and flag bits, their relations
    _errors.py      ErrorCode, ERROR_CODE_INFO (the error table), ProtocolError,
                    LocalProtocolError, RemoteProtocolError
    _events.py      Event and its frozen, self-validating dataclasses (Hello ...
                    Pong), StartKind, EventKind and event_kind()
    _frames.py      FrameType, the header, encoders and decoders, frame specs,
                    encode_event(), decode_frame(), encode_records_frame()
    _state.py       Role, State, the transition table and ConnectionState, which
                    applies the table and every other rule on what may be sent
                    when (publish_record_count_max, protocol version, tenant)
    _connection.py  Connection, its receive buffer, NEED_DATA and CLOSED

Resource handling: a Connection holds at most RECEIVE_BUFFER_BYTES_MAX bytes
of unparsed input. A partial frame waits (NEED_DATA); a header declaring more
than FRAME_SIZE_BYTES_MAX raises at once, before its payload is buffered.

Error handling: bad input from the peer raises RemoteProtocolError, a bad or
ill-timed event of ours raises LocalProtocolError (nothing is sent). Each error
carries an ErrorCode. When ``error.fatal`` the connection is over: send
``Error.from_protocol_error(error)`` and close. Otherwise (a rejected publish
batch, ``error.batch_id`` says which) the frame was consumed, nothing changed
state, and next_event() may be called again.
"""

from __future__ import annotations

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol._connection import (CLOSED, NEED_DATA, Connection,
                                                   ConnectionStatistics)
from ringtail.service.protocol._errors import (ERROR_CODE_INFO, ErrorCode, ErrorCodeInfo,
                                               LocalProtocolError, ProtocolError,
                                               RemoteProtocolError)
from ringtail.service.protocol._events import (Ack, End, Error, Event, Gap, Hello, Ping, Pong,
                                               Publish, Records, Restore, StartKind, Subscribe,
                                               Welcome)
from ringtail.service.protocol._frames import (FrameType, decode_frame, encode_event,
                                               encode_records_frame)
from ringtail.service.protocol._limits import (
    ERROR_MESSAGE_SIZE_BYTES_MAX, FRAME_HEADER_SIZE_BYTES, FRAME_SIZE_BYTES_MAX,
    NAME_SIZE_BYTES_MAX, PROTOCOL_VERSION, PUBLISH_RECORD_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX,
    RECEIVE_SIZE_BYTES, RECORD_INDEX_NONE, RECORDS_FLAG_SPARSE, RECORDS_FRAME_RECORD_COUNT_MAX,
    SUBSCRIBE_FLAG_FAILURE_ONLY, SUBSCRIBE_FLAG_FOLLOW, SUBSCRIBE_OPCODE_COUNT_MAX,
    TOKEN_SIZE_BYTES_MAX, U64_MAX)
from ringtail.service.protocol._state import CLIENT, SERVER, Role, State

__all__ = [
    "CLIENT", "CLOSED", "ERROR_CODE_INFO", "ERROR_MESSAGE_SIZE_BYTES_MAX",
    "FRAME_HEADER_SIZE_BYTES", "FRAME_SIZE_BYTES_MAX", "NAME_SIZE_BYTES_MAX", "NEED_DATA",
    "PROTOCOL_VERSION", "PUBLISH_RECORD_COUNT_MAX", "RECEIVE_BUFFER_BYTES_MAX", "RECEIVE_SIZE_BYTES",
    "RECORDS_FLAG_SPARSE", "RECORDS_FRAME_RECORD_COUNT_MAX", "RECORD_INDEX_NONE",
    "RECORD_SIZE_BYTES", "SERVER", "SUBSCRIBE_FLAG_FAILURE_ONLY", "SUBSCRIBE_FLAG_FOLLOW",
    "SUBSCRIBE_OPCODE_COUNT_MAX", "TOKEN_SIZE_BYTES_MAX", "U64_MAX",
    "Ack", "Connection", "ConnectionStatistics", "End", "Error", "ErrorCode", "ErrorCodeInfo",
    "Event", "FrameType", "Gap", "Hello", "LocalProtocolError", "Ping", "Pong",
    "ProtocolError", "Publish", "Records", "RemoteProtocolError", "Restore", "Role", "StartKind",
    "State",
    "Subscribe", "Welcome", "decode_frame", "encode_event", "encode_records_frame",
]
