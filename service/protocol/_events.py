"""The events: frozen dataclasses validated when built, and the EventKind of each.

An event is what one frame means (docs/PROTOCOL.md section 4). Building one
checks every field against its wire width and limits and raises
LocalProtocolError; the decoders in _frames.py turn that into a
RemoteProtocolError when the values came from the peer. event_kind() names the
row of the state table (_state.py) an event falls under.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from typing import ClassVar

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol._errors import (ERROR_CODE_INFO, ErrorCode, LocalProtocolError,
                                               ProtocolError)
from ringtail.service.protocol._limits import (ERROR_MESSAGE_SIZE_BYTES_MAX, NAME_SIZE_BYTES_MAX,
                                               PROTOCOL_VERSION, PUBLISH_RECORD_COUNT_MAX,
                                               RECORD_INDEX_NONE, RECORDS_FRAME_RECORD_COUNT_MAX,
                                               SUBSCRIBE_OPCODE_COUNT_MAX, TOKEN_SIZE_BYTES_MAX,
                                               U64_MAX)

_E = ErrorCode


class StartKind(enum.IntEnum):
    """Where a subscription starts (Subscribe.start)."""

    OLDEST = 0
    LATEST = 1
    SEQUENCE = 2
    TIME = 3


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
    # Version 2: non-zero names the publishing process for exactly-once publish
    # (every Publish then carries a producer_sequence); 0: none (at least once).
    producer_id: int = 0
    _UINTS = (("tenant_id", 32), ("protocol_version", 16), ("producer_id", 64))

    def _validate(self) -> None:
        _check_bytes(self, "token", "TOKEN_SIZE_BYTES_MAX", TOKEN_SIZE_BYTES_MAX)
        _check_text(self, "client_name", "NAME_SIZE_BYTES_MAX", NAME_SIZE_BYTES_MAX)
        if self.producer_id and self.protocol_version < 2:
            raise _invalid(self, f"producer_id needs protocol version 2, not"
                           f" {self.protocol_version}; send a version 2 Hello")


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
    # Version 2, on a connection whose Hello named a producer: the producer's
    # number for this batch (a resend carries the same one); None otherwise.
    producer_sequence: int | None = None
    _UINTS = (("batch_id", 64),)

    def _validate(self) -> None:
        _check_records(self, PUBLISH_RECORD_COUNT_MAX, "PUBLISH_RECORD_COUNT_MAX",
                       _E.BAD_RECORD_SIZE, batch_id=self.batch_id)
        sequence = self.producer_sequence
        if sequence is not None and (type(sequence) is not int or not 0 <= sequence <= U64_MAX):
            raise _invalid(self, f"producer_sequence = {sequence!r} is not a u64 or None")

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
    def from_protocol_error(cls, error: ProtocolError) -> Error:
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


@dataclasses.dataclass(frozen=True, slots=True)
class Restore(Event):
    """Client -> server, before any Publish: load a snapshot into this empty tenant.

    The server recreates the tenant's empty ring so that its next sequence is
    first_sequence and answers with a Welcome that says so; the client then
    publishes the snapshot's record_count records (docs/PROTOCOL.md 4.13).
    """

    first_sequence: int
    record_count: int
    _UINTS = (("first_sequence", 64), ("record_count", 64))

    def _validate(self) -> None:
        if self.record_count > U64_MAX - self.first_sequence + 1:
            raise _invalid(self, f"first_sequence {self.first_sequence} + record_count"
                           f" {self.record_count} passes the u64 sequence space; the snapshot's"
                           " header is wrong")


class EventKind(enum.Enum):
    """The state table's name for an event (the row it falls under).

    An event's class, but Error splits by its code's `fatal` and Subscribe by
    `follow`. The value is the name that error messages use.
    """

    HELLO = "Hello"
    WELCOME = "Welcome"
    PUBLISH = "Publish"
    ACK = "Ack"
    SUBSCRIBE_ONCE = "Subscribe(once)"
    SUBSCRIBE_FOLLOW = "Subscribe(follow)"
    RECORDS = "Records"
    GAP = "Gap"
    END = "End"
    ERROR_FATAL = "Error(fatal)"
    ERROR_BATCH = "Error(batch)"
    PING = "Ping"
    PONG = "Pong"
    RESTORE = "Restore"


# The kind of every event class whose kind does not depend on its values.
EVENT_CLASS_KINDS: dict[type[Event], EventKind] = {
    Hello: EventKind.HELLO, Welcome: EventKind.WELCOME, Publish: EventKind.PUBLISH,
    Ack: EventKind.ACK, Records: EventKind.RECORDS, Gap: EventKind.GAP, End: EventKind.END,
    Ping: EventKind.PING, Pong: EventKind.PONG, Restore: EventKind.RESTORE,
}
# The four kinds left are Error's two and Subscribe's two (_frames.py asserts
# that EVENT_CLASS_KINDS, Error and Subscribe are every event class it encodes).
assert len(set(EVENT_CLASS_KINDS.values())) == len(EVENT_CLASS_KINDS) == len(EventKind) - 4


def event_kind(event: Event) -> EventKind:
    """The state-table kind of `event` (KeyError for an object that is not an event)."""
    event_type = type(event)
    if event_type is Error:
        return EventKind.ERROR_FATAL if event.fatal else EventKind.ERROR_BATCH
    if event_type is Subscribe:
        return EventKind.SUBSCRIBE_FOLLOW if event.follow else EventKind.SUBSCRIBE_ONCE
    return EVENT_CLASS_KINDS[event_type]
