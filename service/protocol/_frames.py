"""Frame layouts: the header, one encoder and one decoder per frame type, and their specs.

Every frame is an 8-byte header (u32 frame_size, u16 frame_type, u16 flags,
little-endian) and frame_size bytes of payload; docs/PROTOCOL.md sections 2-4
give each layout with byte offsets, and section 9 the test vectors a test
compares with these encoders and decoders. Nothing here knows connection state:
encode_event() and decode_frame() are for tools and tests, Connection
(_connection.py) asks the state table (_state.py) before it encodes or decodes.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import struct

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ringtail.service.protocol._events import (EVENT_CLASS_KINDS, Ack, End, Error, Event, Gap,
                                               Hello, Ping, Pong, Publish, Records, Restore,
                                               Subscribe, Welcome)
from ringtail.service.protocol._limits import (
    ERROR_MESSAGE_SIZE_BYTES_MAX, ERROR_SIZE_MIN, FRAME_HEADER_SIZE_BYTES, FRAME_SIZE_BYTES_MAX,
    HELLO_FLAG_PRODUCER, HELLO_SIZE_MAX, HELLO_SIZE_MIN, NAME_SIZE_BYTES_MAX, PRODUCER_ID_SIZE_BYTES,
    PROTOCOL_VERSION,
    PUBLISH_FLAG_SEQUENCED, RECORDS_FLAG_SPARSE,
    RECORDS_FRAME_RECORD_COUNT_MAX, RECORDS_SIZE_MAX, SUBSCRIBE_FLAG_FAILURE_ONLY,
    SUBSCRIBE_FLAG_FOLLOW, SUBSCRIBE_OPCODE_COUNT_MAX, SUBSCRIBE_SIZE_MIN,
    U64_MAX, WELCOME_SIZE_MIN)

_E = ErrorCode


class FrameType(enum.IntEnum):
    """The u16 frame_type of the header. Stable: never renumber."""

    HELLO = 1
    WELCOME = 2
    PUBLISH = 3
    ACK = 4
    SUBSCRIBE = 5
    RECORDS = 6
    GAP = 7
    END = 8
    ERROR = 9
    PING = 10
    PONG = 11
    RESTORE = 12


HEADER = struct.Struct("<IHH")  # frame_size, frame_type, flags
_HEADER_U64 = struct.Struct("<IHHQ")  # header + the u64 every short frame starts with
_HEADER_U64_U64 = struct.Struct("<IHHQQ")
_HEADER_U64_U64_U64 = struct.Struct("<IHHQQQ")
_HEADER_SPARSE = struct.Struct("<IHHQI")  # header, first_sequence, count
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_HELLO_HEAD = struct.Struct("<HIH")  # protocol_version, tenant_id, token_size
_WELCOME_HEAD = struct.Struct("<HIIQQQH")  # ..., server_name_size
_SUBSCRIBE_HEAD = struct.Struct("<BQIIH")  # start, start_value, epochs, opcode_count
_ERROR_HEAD = struct.Struct("<HQIH")  # code, batch_id, record_index, message_size
_U64_U64 = struct.Struct("<QQ")
_U64_U64_U64 = struct.Struct("<QQQ")
_SPARSE_HEAD = struct.Struct("<QI")
assert _WELCOME_HEAD.size == WELCOME_SIZE_MIN and _SUBSCRIBE_HEAD.size == SUBSCRIBE_SIZE_MIN
assert _ERROR_HEAD.size == ERROR_SIZE_MIN and _HELLO_HEAD.size + 2 == HELLO_SIZE_MIN


def _frame(frame_type: FrameType, flags: int, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return HEADER.pack(len(payload), frame_type, flags) + payload


def _encode_hello(event: Hello) -> bytes:
    name = event.client_name.encode("utf-8")
    producer = event.producer_id
    return _frame(FrameType.HELLO, HELLO_FLAG_PRODUCER if producer else 0, _HELLO_HEAD.pack(
        event.protocol_version, event.tenant_id, len(event.token)), event.token,
        _U16.pack(len(name)), name, _U64.pack(producer) if producer else b"")


def _encode_welcome(event: Welcome) -> bytes:
    name = event.server_name.encode("utf-8")
    return _frame(FrameType.WELCOME, 0, _WELCOME_HEAD.pack(
        event.protocol_version, event.tenant_id, event.publish_record_count_max,
        event.oldest_sequence, event.next_sequence, event.capacity, len(name)), name)


def _encode_publish(event: Publish) -> bytes:
    records = event.records  # one copy: header and records into the frame
    if event.producer_sequence is None:
        return _HEADER_U64.pack(8 + len(records), FrameType.PUBLISH, 0, event.batch_id) + records
    return _HEADER_U64_U64.pack(16 + len(records), FrameType.PUBLISH, PUBLISH_FLAG_SEQUENCED,
                                event.batch_id, event.producer_sequence) + records


def _encode_subscribe(event: Subscribe) -> bytes:
    flags = (SUBSCRIBE_FLAG_FOLLOW if event.follow else 0) | (
        SUBSCRIBE_FLAG_FAILURE_ONLY if event.failure_only else 0)
    opcodes = sorted(event.opcodes)  # sorted: one canonical encoding per event
    return _frame(FrameType.SUBSCRIBE, flags, _SUBSCRIBE_HEAD.pack(
        event.start, event.start_value, event.epoch_min, event.epoch_max, len(opcodes)),
        struct.pack(f"<{len(opcodes)}I", *opcodes))


def _encode_records(event: Records) -> bytes:
    return encode_records_frame(event.first_sequence, event.records, event.sequences)


def encode_records_frame(first_sequence: int, records: bytes | memoryview,
                         sequences: tuple[int, ...] | None = None) -> bytes:
    """One Records frame (header and payload) without building an event.

    For the replay path: `records` may be a memoryview of many records read from
    the ring; they are copied once, into the frame. Validation matches Records.

    Raises:
        LocalProtocolError: bad size, count, or sequences (as Records would).
    """
    size = memoryview(records).nbytes
    count, rest = divmod(size, RECORD_SIZE_BYTES)
    if sequences is None and not rest and 0 < count <= RECORDS_FRAME_RECORD_COUNT_MAX and (
            type(first_sequence) is int and 0 <= first_sequence <= U64_MAX - count + 1):
        return b"".join((_HEADER_U64.pack(8 + size, FrameType.RECORDS, 0, first_sequence),
                         records))
    event = Records(first_sequence, bytes(records), sequences)  # validates, or raises
    if event.sequences is None:
        return encode_records_frame(event.first_sequence, event.records)
    return b"".join((_HEADER_SPARSE.pack(12 + 72 * count, FrameType.RECORDS, RECORDS_FLAG_SPARSE,
                                         first_sequence, count),
                     struct.pack(f"<{count}Q", *event.sequences), event.records))


def encode_records_frame_parts(first_sequence: int, records: bytes | memoryview,
                               sequences: tuple[int, ...] | None = None
                               ) -> tuple[bytes, bytes | memoryview]:
    """encode_records_frame() as (head, payload), the frame being head + payload:
    a dense frame's payload is `records` itself, not copied (for one gathered
    send, sendmsg); any other frame is whole in head and the payload empty."""
    size = memoryview(records).nbytes
    count, rest = divmod(size, RECORD_SIZE_BYTES)
    if sequences is None and not rest and 0 < count <= RECORDS_FRAME_RECORD_COUNT_MAX and (
            type(first_sequence) is int and 0 <= first_sequence <= U64_MAX - count + 1):
        return _HEADER_U64.pack(8 + size, FrameType.RECORDS, 0, first_sequence), records
    return encode_records_frame(first_sequence, records, sequences), b""


def _encode_error(event: Error) -> bytes:
    message = event.message.encode("utf-8")
    return _frame(FrameType.ERROR, 0, _ERROR_HEAD.pack(
        event.code, event.batch_id, event.record_index, len(message)), message)


ENCODERS = {
    Hello: _encode_hello,
    Welcome: _encode_welcome,
    Publish: _encode_publish,
    Ack: lambda e: _HEADER_U64_U64_U64.pack(24, FrameType.ACK, 0, e.batch_id,
                                           e.first_sequence, e.last_sequence),
    Subscribe: _encode_subscribe,
    Records: _encode_records,
    Gap: lambda e: _HEADER_U64_U64.pack(16, FrameType.GAP, 0, e.first_lost_sequence,
                                       e.last_lost_sequence),
    End: lambda e: _HEADER_U64.pack(8, FrameType.END, 0, e.next_sequence),
    Error: _encode_error,
    Ping: lambda e: _HEADER_U64.pack(8, FrameType.PING, 0, e.nonce),
    Pong: lambda e: _HEADER_U64.pack(8, FrameType.PONG, 0, e.nonce),
    Restore: lambda e: _HEADER_U64_U64.pack(16, FrameType.RESTORE, 0, e.first_sequence,
                                           e.record_count),
}

assert set(ENCODERS) == set(EVENT_CLASS_KINDS) | {Error, Subscribe}, "an encoder for every event"


def encode_event(event: Event) -> bytes:
    """The frame for `event`, ignoring connection state (tools, tests, vectors)."""
    return ENCODERS[type(event)](event)


# --- Decoding -----------------------------------------------------------------
# Decoders take (buffer, payload start, payload end, flags); the header check has
# already bounded the payload size. Events validate themselves; the caller turns
# their LocalProtocolError into a RemoteProtocolError.


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(_E.MALFORMED_FRAME, f"{detail}; fix the peer's encoder"
                               " against docs/PROTOCOL.md")


def _take(buffer, start: int, size: int, end: int, what: str) -> tuple[bytes, int]:
    if start + size > end:
        raise _malformed(f"{what} declares {size} bytes but only {end - start} remain in the"
                         " payload")
    return bytes(buffer[start:start + size]), start + size


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _malformed(f"{what} is not valid UTF-8 ({error.reason} at byte"
                         f" {error.start})") from None


def _expect_end(position: int, end: int, what: str) -> None:
    if position != end:
        raise _malformed(f"{what} payload has {end - position} bytes after its last field")


def _decode_hello(buffer, start: int, end: int, flags: int) -> Hello:
    version, tenant_id, token_size = _HELLO_HEAD.unpack_from(buffer, start)
    token, position = _take(buffer, start + 8, token_size, end, "Hello.token")
    name_size_bytes, position = _take(buffer, position, 2, end, "Hello.client_name size")
    name, position = _take(buffer, position, _U16.unpack(name_size_bytes)[0], end,
                           "Hello.client_name")
    producer_id = 0
    if flags & HELLO_FLAG_PRODUCER:
        producer, position = _take(buffer, position, PRODUCER_ID_SIZE_BYTES, end,
                                   "Hello.producer_id")
        (producer_id,) = _U64.unpack(producer)
        if not producer_id:
            raise _malformed("Hello sets flag PRODUCER with producer_id 0; pick a non-zero"
                             " random producer id, or clear the flag")
    _expect_end(position, end, "Hello")
    return Hello(tenant_id, token, _text(name, "Hello.client_name"), version, producer_id)


def _decode_welcome(buffer, start: int, end: int, flags: int) -> Welcome:
    (version, tenant_id, count_max, oldest, next_sequence, capacity,
     name_size) = _WELCOME_HEAD.unpack_from(buffer, start)
    name, position = _take(buffer, start + WELCOME_SIZE_MIN, name_size, end,
                           "Welcome.server_name")
    _expect_end(position, end, "Welcome")
    return Welcome(tenant_id, count_max, oldest, next_sequence, capacity,
                   _text(name, "Welcome.server_name"), version)


def _decode_publish(buffer, start: int, end: int, flags: int) -> Publish:
    if not flags & PUBLISH_FLAG_SEQUENCED:
        (batch_id,) = _U64.unpack_from(buffer, start)
        return Publish(batch_id, memoryview(buffer)[start + 8:end].tobytes())  # the one copy
    if end - start < 16:
        raise _malformed(f"sequenced Publish payload of {end - start} bytes is shorter than 16"
                         " (batch_id, producer_sequence)")
    batch_id, sequence = _U64_U64.unpack_from(buffer, start)
    return Publish(batch_id, memoryview(buffer)[start + 16:end].tobytes(), sequence)


def _decode_subscribe(buffer, start: int, end: int, flags: int) -> Subscribe:
    kind, value, epoch_min, epoch_max, count = _SUBSCRIBE_HEAD.unpack_from(buffer, start)
    if end - start != SUBSCRIBE_SIZE_MIN + 4 * count:
        raise _malformed(f"Subscribe declares {count} opcodes, which need"
                         f" {SUBSCRIBE_SIZE_MIN + 4 * count} payload bytes, not {end - start}")
    opcodes = struct.unpack_from(f"<{count}I", buffer, start + SUBSCRIBE_SIZE_MIN)
    if not all(map(operator.lt, opcodes, opcodes[1:])):
        raise RemoteProtocolError(_E.BAD_SUBSCRIBE, f"Subscribe opcodes {list(opcodes)} are not"
                                  " strictly increasing; send them sorted, without duplicates")
    return Subscribe(kind, value, bool(flags & SUBSCRIBE_FLAG_FOLLOW),
                     bool(flags & SUBSCRIBE_FLAG_FAILURE_ONLY), epoch_min, epoch_max,
                     frozenset(opcodes))


def _decode_records(buffer, start: int, end: int, flags: int) -> Records:
    if not flags & RECORDS_FLAG_SPARSE:
        (first,) = _U64.unpack_from(buffer, start)
        return Records(first, memoryview(buffer)[start + 8:end].tobytes())
    if end - start < 12:
        raise _malformed(f"sparse Records payload of {end - start} bytes is shorter than 12")
    first, count = _SPARSE_HEAD.unpack_from(buffer, start)
    if not 0 < count <= RECORDS_FRAME_RECORD_COUNT_MAX or end - start != 12 + 72 * count:
        raise _malformed(f"sparse Records declares {count} records (limit"
                         f" RECORDS_FRAME_RECORD_COUNT_MAX = {RECORDS_FRAME_RECORD_COUNT_MAX})"
                         f" in a {end - start}-byte payload; it needs 12 + 72 x count bytes")
    sequences = struct.unpack_from(f"<{count}Q", buffer, start + 12)
    return Records(first, memoryview(buffer)[start + 12 + 8 * count:end].tobytes(), sequences)


def _decode_error(buffer, start: int, end: int, flags: int) -> Error:
    code, batch_id, record_index, size = _ERROR_HEAD.unpack_from(buffer, start)
    message, position = _take(buffer, start + ERROR_SIZE_MIN, size, end, "Error.message")
    _expect_end(position, end, "Error")
    return Error(code, _text(message, "Error.message"), batch_id, record_index)


@dataclasses.dataclass(frozen=True, slots=True)
class FrameSpec:
    """What the header check needs to know of one frame type, and its decoder."""

    name: str
    flags: int  # the flag bits this frame type defines
    size_min: int  # payload bytes
    size_max: int
    decode: object


FRAME_SPECS: dict[int, FrameSpec] = {
    FrameType.HELLO: FrameSpec("Hello", HELLO_FLAG_PRODUCER, HELLO_SIZE_MIN, HELLO_SIZE_MAX,
                               _decode_hello),
    FrameType.WELCOME: FrameSpec("Welcome", 0, WELCOME_SIZE_MIN,
                                 WELCOME_SIZE_MIN + NAME_SIZE_BYTES_MAX, _decode_welcome),
    # Up to the frame limit, so an over-count batch gets the non-fatal BATCH_TOO_LARGE.
    FrameType.PUBLISH: FrameSpec("Publish", PUBLISH_FLAG_SEQUENCED, 8, FRAME_SIZE_BYTES_MAX,
                                 _decode_publish),
    FrameType.ACK: FrameSpec("Ack", 0, 24, 24, lambda b, s, e, f: Ack(
        *_U64_U64_U64.unpack_from(b, s))),
    FrameType.SUBSCRIBE: FrameSpec(
        "Subscribe", SUBSCRIBE_FLAG_FOLLOW | SUBSCRIBE_FLAG_FAILURE_ONLY, SUBSCRIBE_SIZE_MIN,
        SUBSCRIBE_SIZE_MIN + 4 * SUBSCRIBE_OPCODE_COUNT_MAX, _decode_subscribe),
    FrameType.RECORDS: FrameSpec("Records", RECORDS_FLAG_SPARSE, 8, RECORDS_SIZE_MAX,
                                 _decode_records),
    FrameType.GAP: FrameSpec("Gap", 0, 16, 16, lambda b, s, e, f: Gap(
        *_U64_U64.unpack_from(b, s))),
    FrameType.END: FrameSpec("End", 0, 8, 8, lambda b, s, e, f: End(*_U64.unpack_from(b, s))),
    FrameType.ERROR: FrameSpec("Error", 0, ERROR_SIZE_MIN,
                               ERROR_SIZE_MIN + ERROR_MESSAGE_SIZE_BYTES_MAX, _decode_error),
    FrameType.PING: FrameSpec("Ping", 0, 8, 8, lambda b, s, e, f: Ping(*_U64.unpack_from(b, s))),
    FrameType.PONG: FrameSpec("Pong", 0, 8, 8, lambda b, s, e, f: Pong(*_U64.unpack_from(b, s))),
    FrameType.RESTORE: FrameSpec("Restore", 0, 16, 16, lambda b, s, e, f: Restore(
        *_U64_U64.unpack_from(b, s))),
}
assert set(FRAME_SPECS) == set(FrameType)


def check_header(size: int, frame_type: int, flags: int) -> FrameSpec:
    """Everything the 8 header bytes alone can refute, before the payload is buffered."""
    if size > FRAME_SIZE_BYTES_MAX:
        raise RemoteProtocolError(_E.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds"
                                  f" FRAME_SIZE_BYTES_MAX ({FRAME_SIZE_BYTES_MAX}); send smaller"
                                  " publish batches")
    spec = FRAME_SPECS.get(frame_type)
    if spec is None:
        raise RemoteProtocolError(_E.UNKNOWN_FRAME_TYPE, f"frame type {frame_type} is unknown to"
                                  f" protocol version {PROTOCOL_VERSION} (known:"
                                  f" 1..{len(FRAME_SPECS)}); check both sides speak the same"
                                  " protocol version")
    if flags & ~spec.flags:
        raise _malformed(f"{spec.name} frame flags 0x{flags:04x} set undefined bits"
                         f" 0x{flags & ~spec.flags:04x} (defined: 0x{spec.flags:04x}); send 0 in"
                         " undefined bits")
    if not spec.size_min <= size <= spec.size_max:
        raise _malformed(f"{spec.name} payload of {size} bytes is outside"
                         f" {spec.size_min}..{spec.size_max}")
    return spec


def decode_payload(spec: FrameSpec, buffer, start: int, end: int, flags: int) -> Event:
    try:
        return spec.decode(buffer, start, end, flags)
    except LocalProtocolError as error:  # the event refused a value: the peer sent it
        raise RemoteProtocolError(error.code, error.message, batch_id=error.batch_id,
                                  record_index=error.record_index) from None


def decode_frame(data: bytes | bytearray | memoryview) -> Event:
    """The event in `data`, which must be exactly one frame; ignores connection state.

    Raises:
        RemoteProtocolError: the bytes are not one valid frame.
    """
    if len(data) < FRAME_HEADER_SIZE_BYTES:
        raise _malformed(f"{len(data)} bytes are shorter than the 8-byte frame header")
    size, frame_type, flags = HEADER.unpack_from(data)
    spec = check_header(size, frame_type, flags)
    if len(data) != FRAME_HEADER_SIZE_BYTES + size:
        raise _malformed(f"{len(data)} bytes hold a {spec.name} frame of"
                         f" {FRAME_HEADER_SIZE_BYTES + size} bytes")
    return decode_payload(spec, data, FRAME_HEADER_SIZE_BYTES, len(data), flags)
