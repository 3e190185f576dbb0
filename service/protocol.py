"""Sans-IO codec of the ringtail wire protocol, in the shape of h11.

docs/PROTOCOL.md is the contract (frame layouts with byte offsets, the state
table, error codes, limits and test vectors); this docstring is the map. There
are no sockets, no ``await`` and no clock here: the listener glue moves bytes,
this module turns bytes into events and events into bytes::

    connection = Connection(SERVER)
    connection.receive_data(data)       # b"" means the peer closed (EOF)
    event = connection.next_event()     # an event, NEED_DATA, or CLOSED
    data = connection.send(Welcome(...))  # bytes for the glue to write

Every frame is an 8-byte header (u32 frame_size, u16 frame_type, u16 flags,
little-endian) and frame_size bytes of payload.

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

import dataclasses
import enum
import operator
import struct
from typing import ClassVar

from ringtail.ioring.record import RECORD_SIZE_BYTES

__all__ = [
    "CLIENT", "CLOSED", "ERROR_CODE_INFO", "ERROR_MESSAGE_SIZE_BYTES_MAX",
    "FRAME_HEADER_SIZE_BYTES", "FRAME_SIZE_BYTES_MAX", "NAME_SIZE_BYTES_MAX", "NEED_DATA",
    "PROTOCOL_VERSION", "PUBLISH_RECORD_COUNT_MAX", "RECEIVE_BUFFER_BYTES_MAX", "RECEIVE_SIZE_BYTES",
    "RECORDS_FLAG_SPARSE", "RECORDS_FRAME_RECORD_COUNT_MAX", "RECORD_INDEX_NONE",
    "RECORD_SIZE_BYTES", "SERVER", "SUBSCRIBE_FLAG_FAILURE_ONLY", "SUBSCRIBE_FLAG_FOLLOW",
    "SUBSCRIBE_OPCODE_COUNT_MAX", "TOKEN_SIZE_BYTES_MAX", "U64_MAX",
    "Ack", "Connection", "ConnectionStatistics", "End", "Error", "ErrorCode", "ErrorCodeInfo",
    "Event", "FrameType", "Gap", "Hello", "LocalProtocolError", "Ping", "Pong",
    "ProtocolError", "Publish", "Records", "RemoteProtocolError", "Role", "StartKind", "State",
    "Subscribe", "Welcome", "decode_frame", "encode_event", "encode_records_frame",
]

PROTOCOL_VERSION = 1
FRAME_HEADER_SIZE_BYTES = 8

# --- Limits. Config may lower a limit (Welcome.publish_record_count_max), never raise it.
# Largest payload of one frame (bytes). The largest legal frames are a full
# Publish (262,152 B) and a full sparse Records frame (294,924 B); the headroom
# lets an over-count Publish (up to 16,383 records) be read whole and refused
# with the non-fatal BATCH_TOO_LARGE instead of closing the connection.
# Memory cost: one partial frame per connection, so up to 1 MiB each.
FRAME_SIZE_BYTES_MAX = 1 << 20
# Records in one Publish: 256 KiB of records, one group-commit sized write that
# an Ack covers with a single sequence range.
PUBLISH_RECORD_COUNT_MAX = 4096
# Records in one Records frame: 256 KiB (dense) / 288 KiB (sparse) per frame
# bounds what a subscriber's client must hold to decode one frame.
RECORDS_FRAME_RECORD_COUNT_MAX = 4096
# Unparsed input one Connection holds (bytes): one partial frame (8 + 1 MiB - 1)
# plus up to ~1 MiB of one socket read. The glue drains next_event() to
# NEED_DATA between reads. Memory cost: 2 MiB per connection at worst.
RECEIVE_BUFFER_BYTES_MAX = 2 * FRAME_SIZE_BYTES_MAX
# Bytes one socket read asks for, on every side (daemon, Client, Publisher):
# a full publish batch in one read, and, with one partial frame, within
# RECEIVE_BUFFER_BYTES_MAX (asserted below).
RECEIVE_SIZE_BYTES = 256 * 1024
# Hello.token (bytes): a bearer token; 256 B fits any sane token, hashed server-side.
TOKEN_SIZE_BYTES_MAX = 256
# Hello.client_name and Welcome.server_name (UTF-8 bytes): enough for a host
# name plus a process tag in logs and metrics labels.
NAME_SIZE_BYTES_MAX = 64
# Error.message (UTF-8 bytes): one explanatory sentence with the bad value.
ERROR_MESSAGE_SIZE_BYTES_MAX = 1024
# Subscribe.opcodes: the filter is a set lookup per record; 64 opcodes costs
# 256 B on the wire and a tiny frozenset per subscriber.
SUBSCRIBE_OPCODE_COUNT_MAX = 64
# Error.record_index when no single record is at fault.
RECORD_INDEX_NONE = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1

# Flag bits (frame header u16 flags); every other bit must be 0.
RECORDS_FLAG_SPARSE = 0x0001
SUBSCRIBE_FLAG_FOLLOW = 0x0001
SUBSCRIBE_FLAG_FAILURE_ONLY = 0x0002

_HELLO_SIZE_MIN = 2 + 4 + 2 + 2
_WELCOME_SIZE_MIN = 2 + 4 + 4 + 8 + 8 + 8 + 2
_SUBSCRIBE_SIZE_MIN = 1 + 8 + 4 + 4 + 2
_ERROR_SIZE_MIN = 2 + 8 + 4 + 2
_PUBLISH_SIZE_MAX = 8 + PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
_RECORDS_SIZE_MAX = 12 + RECORDS_FRAME_RECORD_COUNT_MAX * (8 + RECORD_SIZE_BYTES)

assert RECEIVE_SIZE_BYTES + 8 + FRAME_SIZE_BYTES_MAX <= RECEIVE_BUFFER_BYTES_MAX
assert _PUBLISH_SIZE_MAX <= FRAME_SIZE_BYTES_MAX, "a full publish must fit a frame"
assert _RECORDS_SIZE_MAX <= FRAME_SIZE_BYTES_MAX, "a full sparse records frame must fit"
assert _HELLO_SIZE_MIN + TOKEN_SIZE_BYTES_MAX + NAME_SIZE_BYTES_MAX <= FRAME_SIZE_BYTES_MAX
assert _ERROR_SIZE_MIN + ERROR_MESSAGE_SIZE_BYTES_MAX <= FRAME_SIZE_BYTES_MAX
assert FRAME_HEADER_SIZE_BYTES + FRAME_SIZE_BYTES_MAX <= RECEIVE_BUFFER_BYTES_MAX
assert FRAME_SIZE_BYTES_MAX < 1 << 32 and ERROR_MESSAGE_SIZE_BYTES_MAX < 1 << 16
assert PUBLISH_RECORD_COUNT_MAX < RECORD_INDEX_NONE


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


class StartKind(enum.IntEnum):
    """Where a subscription starts (Subscribe.start)."""

    OLDEST = 0
    LATEST = 1
    SEQUENCE = 2
    TIME = 3


class ErrorCode(enum.IntEnum):
    """The u16 code of an Error frame. Stable: never renumber, only append.

    CONNECTION_LOST is reserved for clients: a daemon never sends it; a client
    reports it when the connection ended without an Error frame. A peer that
    does receive it in an Error frame decodes it as any known code (fatal):
    refusing it would turn a harmless report into a protocol failure.
    """

    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME_TYPE = 3
    UNSUPPORTED_VERSION = 4
    BAD_RECORD_SIZE = 5
    BAD_RECORD_MAGIC = 6
    WRONG_TENANT = 7
    HELLO_REQUIRED = 8
    UNEXPECTED_FRAME = 9
    AUTH_FAILED = 10
    FORBIDDEN = 11
    QUOTA_EXCEEDED = 12
    BATCH_TOO_LARGE = 13
    UNKNOWN_TENANT = 14
    STORAGE_FAILED = 15
    SHUTTING_DOWN = 16
    BAD_SUBSCRIBE = 17
    HANDSHAKE_TIMEOUT = 18
    TOO_MANY_CONNECTIONS = 19
    TOO_MANY_SUBSCRIBERS = 20
    INTERNAL = 21
    TENANT_UNAVAILABLE = 22
    CONNECTION_LOST = 23

    @property
    def fatal(self) -> bool:
        """True: the sender closes after the Error. False: one publish batch was refused."""
        return ERROR_CODE_INFO[self].fatal


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCodeInfo:
    """One error code's contract: fatal or not, what it means, what the client should do."""

    fatal: bool
    meaning: str
    action: str


_E = ErrorCode
ERROR_CODE_INFO: dict[ErrorCode, ErrorCodeInfo] = {
    _E.MALFORMED_FRAME: ErrorCodeInfo(
        True, "a frame was truncated, garbled or had a bad field",
        "fix the peer's encoder against docs/PROTOCOL.md"),
    _E.FRAME_TOO_LARGE: ErrorCodeInfo(
        True, "a header declared more than FRAME_SIZE_BYTES_MAX payload bytes",
        "send smaller publish batches"),
    _E.UNKNOWN_FRAME_TYPE: ErrorCodeInfo(
        True, "the frame_type is not one of this protocol version",
        "check both sides speak the same protocol version"),
    _E.UNSUPPORTED_VERSION: ErrorCodeInfo(
        True, "the Hello (or Welcome) named a protocol version the peer does not speak",
        "use a client built for the server's protocol version"),
    _E.BAD_RECORD_SIZE: ErrorCodeInfo(
        False, "a Publish carried no records or bytes that are not a multiple of 64",
        "send whole 64-byte records, at least one per batch"),
    _E.BAD_RECORD_MAGIC: ErrorCodeInfo(
        False, "a published record's magic is not 0xDEADBEEF (record_index names it)",
        "fix the record encoder; resend the batch"),
    _E.WRONG_TENANT: ErrorCodeInfo(
        False, "a published record's tenant_id differs from the Hello's (record_index names it)",
        "publish each tenant's records on that tenant's connection"),
    _E.HELLO_REQUIRED: ErrorCodeInfo(
        True, "a frame other than Hello came before Hello",
        "send Hello first"),
    _E.UNEXPECTED_FRAME: ErrorCodeInfo(
        True, "a frame is not allowed in the connection's current state",
        "follow the state table; publish and subscribe on separate connections"),
    _E.AUTH_FAILED: ErrorCodeInfo(
        True, "the credentials (token or peer uid/gid) were refused",
        "check the token or the socket's allow-list"),
    _E.FORBIDDEN: ErrorCodeInfo(
        True, "the credentials lack the role for the request (publish, subscribe)",
        "grant the role or use other credentials"),
    _E.QUOTA_EXCEEDED: ErrorCodeInfo(
        False, "the tenant's records-per-second quota refused the batch",
        "back off and resend the batch later"),
    _E.BATCH_TOO_LARGE: ErrorCodeInfo(
        False, "a Publish had more records than Welcome.publish_record_count_max",
        "split the batch and resend"),
    _E.UNKNOWN_TENANT: ErrorCodeInfo(
        True, "the Hello named a tenant this daemon does not serve",
        "check the tenant id or the daemon's config"),
    _E.STORAGE_FAILED: ErrorCodeInfo(
        False, "the ring write failed; the batch is not durable",
        "resend later; alert the operator"),
    _E.SHUTTING_DOWN: ErrorCodeInfo(
        True, "the daemon is stopping",
        "reconnect with backoff; resend unacknowledged batches"),
    _E.BAD_SUBSCRIBE: ErrorCodeInfo(
        True, "the Subscribe request is invalid (start, epochs, opcodes)",
        "fix the request"),
    _E.HANDSHAKE_TIMEOUT: ErrorCodeInfo(
        True, "no Hello arrived in time",
        "send Hello right after connecting"),
    _E.TOO_MANY_CONNECTIONS: ErrorCodeInfo(
        True, "the tenant's or daemon's connection limit is reached",
        "close idle connections; reconnect with backoff"),
    _E.TOO_MANY_SUBSCRIBERS: ErrorCodeInfo(
        True, "the tenant's subscriber limit is reached",
        "close other subscriptions; retry with backoff"),
    _E.INTERNAL: ErrorCodeInfo(
        True, "a bug on the sending side",
        "report it with the message; reconnect"),
    _E.TENANT_UNAVAILABLE: ErrorCodeInfo(
        True, "the tenant's ring file cannot be opened or created (disk full, permissions,"
              " damage, io backend refused)",
        "read the daemon's log line for the tenant; fix the cause; reconnect with backoff"),
    _E.CONNECTION_LOST: ErrorCodeInfo(
        True, "reserved for clients, never sent by a daemon: the connection ended without an"
              " Error frame (the daemon was killed or crashed, or the network broke)",
        "check that the daemon is running and read its log (journalctl -u ringtail, or the"
        " stderr of `ringtail serve`); reconnect with backoff and resend unacknowledged batches"),
}
assert set(ERROR_CODE_INFO) == set(ErrorCode)


class ProtocolError(Exception):
    """A protocol violation, with a stable wire code and a message that says what to do.

    Attributes:
        code: the ErrorCode to put in the Error frame.
        message: what failed, the bad value, the limit, and what to do.
        batch_id: the rejected Publish's batch id, 0 if none.
        record_index: index of the first bad record, RECORD_INDEX_NONE if none.
    """

    def __init__(self, code: ErrorCode, message: str, *, batch_id: int = 0,
                 record_index: int = RECORD_INDEX_NONE):
        super().__init__(message)
        self.code = code
        self.message = message
        self.batch_id = batch_id
        self.record_index = record_index

    @property
    def fatal(self) -> bool:
        return self.code.fatal

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bad event value, or an event not allowed now. Nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad bytes, or a frame not allowed now."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT = Role.CLIENT
SERVER = Role.SERVER


class State(enum.Enum):
    """The connection's state, shared by both directions (see _TRANSITIONS)."""

    AWAIT_HELLO = "AWAIT_HELLO"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    READY = "READY"
    REPLAYING = "REPLAYING"  # after Subscribe(follow=False); End ends it
    FOLLOWING = "FOLLOWING"  # after Subscribe(follow=True); no End
    ENDED = "ENDED"
    CLOSING = "CLOSING"  # a fatal Error was sent or received


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")

# --- Events -----------------------------------------------------------------


def _invalid(event: object, detail: str, code: ErrorCode = _E.MALFORMED_FRAME,
             **where: int) -> LocalProtocolError:
    return LocalProtocolError(code, f"{type(event).__name__}: {detail}", **where)


def _check_uint(event: object, name: str, value: object, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise _invalid(event, f"{name} = {value!r} is not an integer in 0..{(1 << bits) - 1}"
                       f" (u{bits}); pass a value that fits the field")


def _as_bytes(event: object, name: str) -> bytes:
    value = getattr(event, name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _invalid(event, f"{name} must be bytes, got {type(value).__name__}")
    if type(value) is not bytes:
        value = bytes(value)
        object.__setattr__(event, name, value)
    return value


def _check_bytes(event: object, name: str, limit_name: str, limit: int) -> None:
    size = len(_as_bytes(event, name))
    if size > limit:
        raise _invalid(event, f"{name} of {size} bytes exceeds {limit_name} ({limit}); shorten it")


def _check_text(event: object, name: str, limit_name: str, limit: int) -> None:
    value = getattr(event, name)
    if not isinstance(value, str):
        raise _invalid(event, f"{name} must be str, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _invalid(event, f"{name} = {value!r} is not encodable as UTF-8") from None
    if size > limit:
        raise _invalid(event, f"{name} of {size} UTF-8 bytes exceeds {limit_name} ({limit});"
                       " shorten it")


def _check_records(event: object, count_max: int, limit_name: str, code: ErrorCode,
                   **where: int) -> int:
    records = _as_bytes(event, "records")
    count, rest = divmod(len(records), RECORD_SIZE_BYTES)
    if rest or not count:
        raise _invalid(event, f"records of {len(records)} bytes is not a positive multiple of"
                       f" RECORD_SIZE_BYTES ({RECORD_SIZE_BYTES}); send whole 64-byte records,"
                       " at least one", code, **where)
    if count > count_max:
        code = _E.BATCH_TOO_LARGE if code is _E.BAD_RECORD_SIZE else code
        raise _invalid(event, f"{count} records exceed {limit_name} ({count_max}); split them",
                       code, **where)
    return count


class Event:
    """Base of the frozen event dataclasses; validation runs when one is built."""

    __slots__ = ()
    _UINTS: ClassVar[tuple[tuple[str, int], ...]] = ()

    def __post_init__(self) -> None:
        for name, bits in self._UINTS:
            _check_uint(self, name, getattr(self, name), bits)
        self._validate()

    def _validate(self) -> None:
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Event):
    """Client -> server, first frame. The server checks protocol_version."""

    tenant_id: int
    token: bytes = b""
    client_name: str = ""
    protocol_version: int = PROTOCOL_VERSION
    _UINTS = (("tenant_id", 32), ("protocol_version", 16))

    def _validate(self) -> None:
        _check_bytes(self, "token", "TOKEN_SIZE_BYTES_MAX", TOKEN_SIZE_BYTES_MAX)
        _check_text(self, "client_name", "NAME_SIZE_BYTES_MAX", NAME_SIZE_BYTES_MAX)


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(Event):
    """Server -> client: the handshake succeeded; the tenant's ring at this moment."""

    tenant_id: int
    publish_record_count_max: int
    oldest_sequence: int
    next_sequence: int
    capacity: int
    server_name: str = ""
    protocol_version: int = PROTOCOL_VERSION
    _UINTS = (("tenant_id", 32), ("publish_record_count_max", 32), ("oldest_sequence", 64),
              ("next_sequence", 64), ("capacity", 64), ("protocol_version", 16))

    def _validate(self) -> None:
        if not 1 <= self.publish_record_count_max <= PUBLISH_RECORD_COUNT_MAX:
            raise _invalid(self, f"publish_record_count_max = {self.publish_record_count_max}"
                           f" is outside 1..PUBLISH_RECORD_COUNT_MAX ({PUBLISH_RECORD_COUNT_MAX})")
        if self.capacity < 1 or not (
                0 <= self.next_sequence - self.oldest_sequence <= self.capacity):
            raise _invalid(self, f"retained range oldest_sequence {self.oldest_sequence} .."
                           f" next_sequence {self.next_sequence} must be ordered and hold at"
                           f" most capacity ({self.capacity} >= 1) records")
        _check_text(self, "server_name", "NAME_SIZE_BYTES_MAX", NAME_SIZE_BYTES_MAX)


@dataclasses.dataclass(frozen=True, slots=True)
class Publish(Event):
    """Client -> server: a batch of whole 64-byte records (content unchecked here)."""

    batch_id: int
    records: bytes
    _UINTS = (("batch_id", 64),)

    def _validate(self) -> None:
        _check_records(self, PUBLISH_RECORD_COUNT_MAX, "PUBLISH_RECORD_COUNT_MAX",
                       _E.BAD_RECORD_SIZE, batch_id=self.batch_id)

    @property
    def record_count(self) -> int:
        return len(self.records) // RECORD_SIZE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class Ack(Event):
    """Server -> client: the batch is durable as sequences first..last (inclusive)."""

    batch_id: int
    first_sequence: int
    last_sequence: int
    _UINTS = (("batch_id", 64), ("first_sequence", 64), ("last_sequence", 64))

    def _validate(self) -> None:
        if not 0 <= self.last_sequence - self.first_sequence < PUBLISH_RECORD_COUNT_MAX:
            raise _invalid(self, f"range {self.first_sequence}..{self.last_sequence} must be"
                           f" ordered and span 1..PUBLISH_RECORD_COUNT_MAX"
                           f" ({PUBLISH_RECORD_COUNT_MAX}) records")


@dataclasses.dataclass(frozen=True, slots=True)
class Subscribe(Event):
    """Client -> server: replay the tenant's records from `start`, filtered, then maybe follow."""

    start: StartKind = StartKind.OLDEST
    start_value: int = 0
    follow: bool = False
    failure_only: bool = False
    epoch_min: int = 0
    epoch_max: int = 0xFFFFFFFF
    opcodes: frozenset[int] = frozenset()
    _UINTS = (("start_value", 64), ("epoch_min", 32), ("epoch_max", 32))

    def _validate(self) -> None:
        bad = _E.BAD_SUBSCRIBE
        if self.start not in StartKind._value2member_map_:
            raise _invalid(self, f"start = {self.start!r} is not a StartKind (0..3)", bad)
        object.__setattr__(self, "start", StartKind(self.start))
        if self.start in (StartKind.OLDEST, StartKind.LATEST) and self.start_value:
            raise _invalid(self, f"start_value = {self.start_value} must be 0 with start"
                           f" {self.start.name}; use SEQUENCE or TIME to pass a value", bad)
        if type(self.follow) is not bool or type(self.failure_only) is not bool:
            raise _invalid(self, "follow and failure_only must be bool", bad)
        if self.epoch_min > self.epoch_max:
            raise _invalid(self, f"epoch_min {self.epoch_min} > epoch_max {self.epoch_max};"
                           " the epoch range is inclusive and ordered", bad)
        opcodes = frozenset(self.opcodes)
        if len(opcodes) > SUBSCRIBE_OPCODE_COUNT_MAX:
            raise _invalid(self, f"{len(opcodes)} opcodes exceed SUBSCRIBE_OPCODE_COUNT_MAX"
                           f" ({SUBSCRIBE_OPCODE_COUNT_MAX}); filter client-side", bad)
        for opcode in opcodes:
            _check_uint(self, "opcodes[...]", opcode, 32)
        object.__setattr__(self, "opcodes", opcodes)


@dataclasses.dataclass(frozen=True, slots=True)
class Records(Event):
    """Server -> client: records first_sequence.. (dense) or at `sequences` (sparse)."""

    first_sequence: int
    records: bytes
    sequences: tuple[int, ...] | None = None
    _UINTS = (("first_sequence", 64),)

    def _validate(self) -> None:
        count = _check_records(self, RECORDS_FRAME_RECORD_COUNT_MAX,
                               "RECORDS_FRAME_RECORD_COUNT_MAX", _E.MALFORMED_FRAME)
        sequences = self.sequences
        if sequences is None:
            last = self.first_sequence + count - 1
        else:
            sequences = tuple(sequences)
            object.__setattr__(self, "sequences", sequences)
            if len(sequences) != count or sequences[0] != self.first_sequence:
                raise _invalid(self, f"{len(sequences)} sequences for {count} records, the first"
                               " must equal first_sequence; pass one sequence per record")
            if not all(map(operator.lt, sequences, sequences[1:])) or not all(
                    type(sequence) is int for sequence in sequences):
                raise _invalid(self, "sequences must be integers in strictly increasing order")
            last = sequences[-1]
        if last > U64_MAX:
            raise _invalid(self, f"last sequence {last} exceeds u64")

    @property
    def record_count(self) -> int:
        return len(self.records) // RECORD_SIZE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class Gap(Event):
    """Server -> client: sequences first..last (inclusive) are lost to this subscriber."""

    first_lost_sequence: int
    last_lost_sequence: int
    _UINTS = (("first_lost_sequence", 64), ("last_lost_sequence", 64))

    def _validate(self) -> None:
        if self.first_lost_sequence > self.last_lost_sequence:
            raise _invalid(self, f"first_lost_sequence {self.first_lost_sequence} >"
                           f" last_lost_sequence {self.last_lost_sequence}; the range is inclusive")


@dataclasses.dataclass(frozen=True, slots=True)
class End(Event):
    """Server -> client: a non-follow subscription reached the end of retained history."""

    next_sequence: int
    _UINTS = (("next_sequence", 64),)


@dataclasses.dataclass(frozen=True, slots=True)
class Error(Event):
    """Either direction: a rejected batch (not fatal) or the reason the sender closes (fatal).

    `code` is an ErrorCode, or a plain int for a code newer than this module
    (which reads as fatal).
    """

    code: int
    message: str = ""
    batch_id: int = 0
    record_index: int = RECORD_INDEX_NONE
    _UINTS = (("code", 16), ("batch_id", 64), ("record_index", 32))

    def _validate(self) -> None:
        if self.code == 0:
            raise _invalid(self, "code 0 is not an ErrorCode; codes start at 1")
        if self.code in ErrorCode._value2member_map_:
            object.__setattr__(self, "code", ErrorCode(self.code))
        if not (self.record_index == RECORD_INDEX_NONE
                or self.record_index < PUBLISH_RECORD_COUNT_MAX):
            raise _invalid(self, f"record_index {self.record_index} is neither below"
                           f" PUBLISH_RECORD_COUNT_MAX ({PUBLISH_RECORD_COUNT_MAX}) nor"
                           " RECORD_INDEX_NONE (0xFFFFFFFF)")
        _check_text(self, "message", "ERROR_MESSAGE_SIZE_BYTES_MAX", ERROR_MESSAGE_SIZE_BYTES_MAX)

    @property
    def fatal(self) -> bool:
        info = ERROR_CODE_INFO.get(self.code)  # type: ignore[call-overload]
        return True if info is None else info.fatal

    @classmethod
    def from_protocol_error(cls, error: ProtocolError) -> "Error":
        """The Error frame that reports `error`, its message cut to the size limit."""
        message = error.message.encode("utf-8", "replace")[:ERROR_MESSAGE_SIZE_BYTES_MAX]
        return cls(error.code, message.decode("utf-8", "ignore"), error.batch_id,
                   error.record_index)


@dataclasses.dataclass(frozen=True, slots=True)
class Ping(Event):
    """Either direction, after Hello: the peer answers Pong with the same nonce."""

    nonce: int = 0
    _UINTS = (("nonce", 64),)


@dataclasses.dataclass(frozen=True, slots=True)
class Pong(Event):
    nonce: int = 0
    _UINTS = (("nonce", 64),)


# --- Encoding -----------------------------------------------------------------

_HEADER = struct.Struct("<IHH")  # frame_size, frame_type, flags
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
assert _WELCOME_HEAD.size == _WELCOME_SIZE_MIN and _SUBSCRIBE_HEAD.size == _SUBSCRIBE_SIZE_MIN
assert _ERROR_HEAD.size == _ERROR_SIZE_MIN and _HELLO_HEAD.size + 2 == _HELLO_SIZE_MIN


def _frame(frame_type: FrameType, flags: int, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return _HEADER.pack(len(payload), frame_type, flags) + payload


def _encode_hello(event: Hello) -> bytes:
    name = event.client_name.encode("utf-8")
    return _frame(FrameType.HELLO, 0, _HELLO_HEAD.pack(
        event.protocol_version, event.tenant_id, len(event.token)), event.token,
        _U16.pack(len(name)), name)


def _encode_welcome(event: Welcome) -> bytes:
    name = event.server_name.encode("utf-8")
    return _frame(FrameType.WELCOME, 0, _WELCOME_HEAD.pack(
        event.protocol_version, event.tenant_id, event.publish_record_count_max,
        event.oldest_sequence, event.next_sequence, event.capacity, len(name)), name)


def _encode_publish(event: Publish) -> bytes:
    records = event.records  # one copy: header and records into the frame
    return _HEADER_U64.pack(8 + len(records), FrameType.PUBLISH, 0, event.batch_id) + records


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


def _encode_error(event: Error) -> bytes:
    message = event.message.encode("utf-8")
    return _frame(FrameType.ERROR, 0, _ERROR_HEAD.pack(
        event.code, event.batch_id, event.record_index, len(message)), message)


_ENCODERS = {
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
}


def encode_event(event: Event) -> bytes:
    """The frame for `event`, ignoring connection state (tools, tests, vectors)."""
    return _ENCODERS[type(event)](event)


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
    _expect_end(position, end, "Hello")
    return Hello(tenant_id, token, _text(name, "Hello.client_name"), version)


def _decode_welcome(buffer, start: int, end: int, flags: int) -> Welcome:
    (version, tenant_id, count_max, oldest, next_sequence, capacity,
     name_size) = _WELCOME_HEAD.unpack_from(buffer, start)
    name, position = _take(buffer, start + _WELCOME_SIZE_MIN, name_size, end,
                           "Welcome.server_name")
    _expect_end(position, end, "Welcome")
    return Welcome(tenant_id, count_max, oldest, next_sequence, capacity,
                   _text(name, "Welcome.server_name"), version)


def _decode_publish(buffer, start: int, end: int, flags: int) -> Publish:
    (batch_id,) = _U64.unpack_from(buffer, start)
    return Publish(batch_id, memoryview(buffer)[start + 8:end].tobytes())  # the one copy


def _decode_subscribe(buffer, start: int, end: int, flags: int) -> Subscribe:
    kind, value, epoch_min, epoch_max, count = _SUBSCRIBE_HEAD.unpack_from(buffer, start)
    if end - start != _SUBSCRIBE_SIZE_MIN + 4 * count:
        raise _malformed(f"Subscribe declares {count} opcodes, which need"
                         f" {_SUBSCRIBE_SIZE_MIN + 4 * count} payload bytes, not {end - start}")
    opcodes = struct.unpack_from(f"<{count}I", buffer, start + _SUBSCRIBE_SIZE_MIN)
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
    message, position = _take(buffer, start + _ERROR_SIZE_MIN, size, end, "Error.message")
    _expect_end(position, end, "Error")
    return Error(code, _text(message, "Error.message"), batch_id, record_index)


@dataclasses.dataclass(frozen=True, slots=True)
class _FrameSpec:
    name: str
    flags: int  # the flag bits this frame type defines
    size_min: int  # payload bytes
    size_max: int
    decode: object


_SPECS: dict[int, _FrameSpec] = {
    FrameType.HELLO: _FrameSpec("Hello", 0, _HELLO_SIZE_MIN, _HELLO_SIZE_MIN + TOKEN_SIZE_BYTES_MAX
                                + NAME_SIZE_BYTES_MAX, _decode_hello),
    FrameType.WELCOME: _FrameSpec("Welcome", 0, _WELCOME_SIZE_MIN,
                                  _WELCOME_SIZE_MIN + NAME_SIZE_BYTES_MAX, _decode_welcome),
    # Up to the frame limit, so an over-count batch gets the non-fatal BATCH_TOO_LARGE.
    FrameType.PUBLISH: _FrameSpec("Publish", 0, 8, FRAME_SIZE_BYTES_MAX, _decode_publish),
    FrameType.ACK: _FrameSpec("Ack", 0, 24, 24, lambda b, s, e, f: Ack(
        *_U64_U64_U64.unpack_from(b, s))),
    FrameType.SUBSCRIBE: _FrameSpec(
        "Subscribe", SUBSCRIBE_FLAG_FOLLOW | SUBSCRIBE_FLAG_FAILURE_ONLY, _SUBSCRIBE_SIZE_MIN,
        _SUBSCRIBE_SIZE_MIN + 4 * SUBSCRIBE_OPCODE_COUNT_MAX, _decode_subscribe),
    FrameType.RECORDS: _FrameSpec("Records", RECORDS_FLAG_SPARSE, 8, _RECORDS_SIZE_MAX,
                                  _decode_records),
    FrameType.GAP: _FrameSpec("Gap", 0, 16, 16, lambda b, s, e, f: Gap(
        *_U64_U64.unpack_from(b, s))),
    FrameType.END: _FrameSpec("End", 0, 8, 8, lambda b, s, e, f: End(*_U64.unpack_from(b, s))),
    FrameType.ERROR: _FrameSpec("Error", 0, _ERROR_SIZE_MIN,
                                _ERROR_SIZE_MIN + ERROR_MESSAGE_SIZE_BYTES_MAX, _decode_error),
    FrameType.PING: _FrameSpec("Ping", 0, 8, 8, lambda b, s, e, f: Ping(*_U64.unpack_from(b, s))),
    FrameType.PONG: _FrameSpec("Pong", 0, 8, 8, lambda b, s, e, f: Pong(*_U64.unpack_from(b, s))),
}
assert set(_SPECS) == set(FrameType)


def _check_header(size: int, frame_type: int, flags: int) -> _FrameSpec:
    """Everything the 8 header bytes alone can refute, before the payload is buffered."""
    if size > FRAME_SIZE_BYTES_MAX:
        raise RemoteProtocolError(_E.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds"
                                  f" FRAME_SIZE_BYTES_MAX ({FRAME_SIZE_BYTES_MAX}); send smaller"
                                  " publish batches")
    spec = _SPECS.get(frame_type)
    if spec is None:
        raise RemoteProtocolError(_E.UNKNOWN_FRAME_TYPE, f"frame type {frame_type} is unknown to"
                                  f" protocol version {PROTOCOL_VERSION} (known: 1..{len(_SPECS)});"
                                  " check both sides speak the same protocol version")
    if flags & ~spec.flags:
        raise _malformed(f"{spec.name} frame flags 0x{flags:04x} set undefined bits"
                         f" 0x{flags & ~spec.flags:04x} (defined: 0x{spec.flags:04x}); send 0 in"
                         " undefined bits")
    if not spec.size_min <= size <= spec.size_max:
        raise _malformed(f"{spec.name} payload of {size} bytes is outside"
                         f" {spec.size_min}..{spec.size_max}")
    return spec


def _decode_payload(spec: _FrameSpec, buffer, start: int, end: int, flags: int) -> Event:
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
    size, frame_type, flags = _HEADER.unpack_from(data)
    spec = _check_header(size, frame_type, flags)
    if len(data) != FRAME_HEADER_SIZE_BYTES + size:
        raise _malformed(f"{len(data)} bytes hold a {spec.name} frame of"
                         f" {FRAME_HEADER_SIZE_BYTES + size} bytes")
    return _decode_payload(spec, data, FRAME_HEADER_SIZE_BYTES, len(data), flags)


# --- The state table ----------------------------------------------------------
# One table for both directions: state -> {(sender, kind): next state}; None means
# "stay". A kind is the event's class name, but Error splits by its code's
# `fatal` and Subscribe by `follow`. Anything not listed is refused:
# HELLO_REQUIRED before Hello, UNEXPECTED_FRAME otherwise.

_C, _S = CLIENT, SERVER
_PINGS = {(sender, kind): None for sender in (_C, _S) for kind in ("Ping", "Pong")}
_FATAL = {(_C, "Error(fatal)"): State.CLOSING, (_S, "Error(fatal)"): State.CLOSING}
# Acks and batch rejections answer publishes sent before a Subscribe.
_ANSWERS = {(_S, "Ack"): None, (_S, "Error(batch)"): None}
_TRANSITIONS: dict[State, dict[tuple[Role, str], State | None]] = {
    State.AWAIT_HELLO: {(_C, "Hello"): State.AWAIT_WELCOME, **_FATAL},
    State.AWAIT_WELCOME: {(_S, "Welcome"): State.READY, **_PINGS, **_FATAL},
    State.READY: {(_C, "Publish"): None, (_C, "Subscribe(once)"): State.REPLAYING,
                  (_C, "Subscribe(follow)"): State.FOLLOWING, **_ANSWERS, **_PINGS, **_FATAL},
    State.REPLAYING: {(_S, "Records"): None, (_S, "Gap"): None, (_S, "End"): State.ENDED,
                      **_ANSWERS, **_PINGS, **_FATAL},
    State.FOLLOWING: {(_S, "Records"): None, (_S, "Gap"): None, **_ANSWERS, **_PINGS, **_FATAL},
    State.ENDED: {**_ANSWERS, **_PINGS, **_FATAL},
    State.CLOSING: {},
}
# The header-time check: may this frame type arrive at all (any kind of it)?
_ALLOWED_FRAME_TYPES = frozenset(
    (state, sender, frame_type) for state, row in _TRANSITIONS.items()
    for sender, kind in row for frame_type, spec in _SPECS.items()
    if kind.partition("(")[0] == spec.name)
_STATE_HINTS = {
    State.AWAIT_HELLO: "send Hello first",
    State.AWAIT_WELCOME: "wait for Welcome before publishing or subscribing",
    State.READY: "follow the state table in docs/PROTOCOL.md",
    State.REPLAYING: "a subscribed connection only pings; publish on another connection",
    State.FOLLOWING: "a subscribed connection only pings; publish on another connection",
    State.ENDED: "the subscription ended; close and open another connection",
    State.CLOSING: "a fatal Error was exchanged; close the connection",
}


def _kind(event: Event) -> str:
    event_type = type(event)
    if event_type is Error:
        return "Error(fatal)" if event.fatal else "Error(batch)"
    if event_type is Subscribe:
        return "Subscribe(follow)" if event.follow else "Subscribe(once)"
    return event_type.__name__


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
        LocalProtocolError and leaves the state unchanged. See the module
        docstring for fatal and non-fatal errors.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.peer_role = SERVER if role is CLIENT else CLIENT
        self.hello: Hello | None = None  # the handshake, once exchanged
        self.welcome: Welcome | None = None
        self._state = State.AWAIT_HELLO
        self._buffer = bytearray()
        self._offset = 0  # first unparsed byte of _buffer
        self._eof = False
        self._failure: RemoteProtocolError | None = None
        self._bytes_received = self._bytes_sent = 0
        self._frames_received = self._frames_sent = 0

    @property
    def state(self) -> State:
        return self._state

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(self._state, len(self._buffer) - self._offset,
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
            size, frame_type, flags = _HEADER.unpack_from(buffer, start)
            spec = _check_header(size, frame_type, flags)
            if (self._state, self.peer_role, frame_type) not in _ALLOWED_FRAME_TYPES:
                raise self._refuse(spec.name, self.peer_role, RemoteProtocolError)
            end = start + FRAME_HEADER_SIZE_BYTES + size
            if len(buffer) >= end:
                self._offset = end  # consumed even when a non-fatal error follows
                self._frames_received += 1
                event = _decode_payload(spec, buffer, start + FRAME_HEADER_SIZE_BYTES, end, flags)
                self._apply(event, self.peer_role, RemoteProtocolError)
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
                size, frame_type, _ = _HEADER.unpack_from(buffer, self._offset)
                where = (f"{available} bytes into a {FRAME_HEADER_SIZE_BYTES + size}-byte"
                         f" {_SPECS[frame_type].name} frame")
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
        encoder = _ENCODERS.get(type(event))
        if encoder is None:
            raise TypeError(f"send() takes a protocol event, not {type(event).__name__}")
        self._apply(event, self.role, LocalProtocolError)
        data = encoder(event)
        self._bytes_sent += len(data)
        self._frames_sent += 1
        return data

    def send_records(self, first_sequence: int, records: bytes | memoryview,
                     sequences: tuple[int, ...] | None = None) -> bytes:
        """send(Records(...)) without building the event: records are copied once."""
        if (self.role, "Records") not in _TRANSITIONS[self._state]:
            raise self._refuse("Records", self.role, LocalProtocolError)
        data = encode_records_frame(first_sequence, records, sequences)
        self._bytes_sent += len(data)
        self._frames_sent += 1
        return data

    def _apply(self, event: Event, sender: Role, error_type: type[ProtocolError]) -> None:
        kind = _kind(event)
        try:
            target = _TRANSITIONS[self._state][(sender, kind)]
        except KeyError:
            raise self._refuse(kind, sender, error_type) from None
        event_type = type(event)
        if event_type is Publish:
            count_max = self.welcome.publish_record_count_max
            if len(event.records) > count_max * RECORD_SIZE_BYTES:
                raise error_type(_E.BATCH_TOO_LARGE, f"Publish batch {event.batch_id} carries"
                                 f" {event.record_count} records, over the connection's"
                                 f" publish_record_count_max ({count_max}); split the batch",
                                 batch_id=event.batch_id)
        elif event_type is Hello or event_type is Welcome:
            if event.protocol_version != PROTOCOL_VERSION:
                raise error_type(_E.UNSUPPORTED_VERSION, f"{kind} names protocol version"
                                 f" {event.protocol_version}; this side speaks version"
                                 f" {PROTOCOL_VERSION} only; use a client and server of the"
                                 " same protocol version")
            if event_type is Welcome and event.tenant_id != self.hello.tenant_id:
                raise error_type(_E.MALFORMED_FRAME, f"Welcome names tenant {event.tenant_id}"
                                 f" but the Hello asked for tenant {self.hello.tenant_id};"
                                 " the server must welcome the tenant it was asked for")
            if event_type is Hello:
                self.hello = event
            else:
                self.welcome = event
        if target is not None:
            self._state = target

    def _refuse(self, kind: str, sender: Role, error_type: type[ProtocolError]) -> ProtocolError:
        state = self._state
        if state is State.AWAIT_HELLO and kind != "Hello":
            return error_type(_E.HELLO_REQUIRED, f"{kind} from the {sender.value} came before"
                              " Hello; send Hello first")
        allowed = sorted(k for s, k in _TRANSITIONS[state] if s is sender) or ["nothing"]
        return error_type(_E.UNEXPECTED_FRAME, f"{kind} from the {sender.value} is not allowed"
                          f" in state {state.value} (the {sender.value} may send:"
                          f" {', '.join(allowed)}); {_STATE_HINTS[state]}")
