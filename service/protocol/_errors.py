"""Error codes and their contract table, and the ProtocolError tree that carries them.

ErrorCode numbers are wire numbers (docs/PROTOCOL.md section 6, whose table a
test compares with ERROR_CODE_INFO). LocalProtocolError: we broke the protocol
(nothing was sent); RemoteProtocolError: the peer did.
"""

from __future__ import annotations

import dataclasses
import enum

from ringtail.service.protocol._limits import RECORD_INDEX_NONE


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
    IDLE_TIMEOUT = 24
    RESTORE_REFUSED = 25
    PRODUCER_WINDOW_PASSED = 26

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
              " damage, io backend refused), or a restore is loading it",
        "read the daemon's log line for the tenant; fix the cause; reconnect with backoff"),
    _E.CONNECTION_LOST: ErrorCodeInfo(
        True, "reserved for clients, never sent by a daemon: the connection ended without an"
              " Error frame (the daemon was killed or crashed, or the network broke)",
        "check that the daemon is running and read its log (journalctl -u ringtail, or the"
        " stderr of `ringtail serve`); reconnect with backoff and resend unacknowledged batches"),
    _E.IDLE_TIMEOUT: ErrorCodeInfo(
        True, "a welcomed connection sent no Publish, Subscribe or Ping for the daemon's idle"
              " timeout (CONNECTION_IDLE_TIMEOUT_S) with nothing in flight",
        "send a Ping now and then on a connection kept open; reconnect"),
    _E.RESTORE_REFUSED: ErrorCodeInfo(
        True, "a Restore was refused: the tenant holds records, another connection or"
              " subscriber is on it, this connection published already, or the snapshot does"
              " not fit the tenant's capacity (the message says which)",
        "restore into an empty tenant no one else uses, on a new connection; the message"
        " says how to start over"),
    _E.PRODUCER_WINDOW_PASSED: ErrorCodeInfo(
        False, "a producer's Publish names a producer_sequence older than every batch of that"
               " producer the daemon remembers (its last 16 stored): it may already be stored,"
               " so it is neither stored nor acknowledged",
        "keep at most 16 batches unacknowledged per producer (the Publisher does); treat the"
        " batch as possibly stored"),
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
