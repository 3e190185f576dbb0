"""The connection's state and every rule that decides what may be sent when.

One table for both directions (docs/PROTOCOL.md section 5, which a test writes
out again): state -> {(sender, EventKind): next state}; None means "stay".
Anything not listed is refused: HELLO_REQUIRED before Hello, UNEXPECTED_FRAME
otherwise. The rules the table cannot express because they read the handshake
(a Publish over the Welcome's publish_record_count_max, a protocol version
other than ours, a Welcome for another tenant than the Hello's) live beside
it in _RULES. ConnectionState, like h11's, owns the state and the handshake and
applies both; Connection (_connection.py) asks it before it returns an event
it decoded and before it encodes one it sends, including the Records frames
send_records() builds without an event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol._errors import ErrorCode, ProtocolError
from ringtail.service.protocol._events import (Event, EventKind, Hello, Publish, Restore, Welcome,
                                               event_kind)
from ringtail.service.protocol._frames import FrameType
from ringtail.service.protocol._limits import PROTOCOL_VERSIONS_SPOKEN

_E = ErrorCode


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT = Role.CLIENT
SERVER = Role.SERVER


class State(enum.Enum):
    """The connection's state, shared by both directions (see TRANSITIONS)."""

    AWAIT_HELLO = "AWAIT_HELLO"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    READY = "READY"
    REPLAYING = "REPLAYING"  # after Subscribe(follow=False); End ends it
    FOLLOWING = "FOLLOWING"  # after Subscribe(follow=True); no End
    ENDED = "ENDED"
    CLOSING = "CLOSING"  # a fatal Error was sent or received
    RESTORING = "RESTORING"  # after Restore; the server's Welcome ends it


# --- The table ------------------------------------------------------------------

_C, _S, _K = CLIENT, SERVER, EventKind
_PINGS = {(sender, kind): None for sender in (_C, _S) for kind in (_K.PING, _K.PONG)}
_FATAL = {(_C, _K.ERROR_FATAL): State.CLOSING, (_S, _K.ERROR_FATAL): State.CLOSING}
# Acks and batch rejections answer publishes sent before a Subscribe.
_ANSWERS = {(_S, _K.ACK): None, (_S, _K.ERROR_BATCH): None}
TRANSITIONS: dict[State, dict[tuple[Role, EventKind], State | None]] = {
    State.AWAIT_HELLO: {(_C, _K.HELLO): State.AWAIT_WELCOME, **_FATAL},
    State.AWAIT_WELCOME: {(_S, _K.WELCOME): State.READY, **_PINGS, **_FATAL},
    State.READY: {(_C, _K.PUBLISH): None, (_C, _K.SUBSCRIBE_ONCE): State.REPLAYING,
                  (_C, _K.SUBSCRIBE_FOLLOW): State.FOLLOWING, (_C, _K.RESTORE): State.RESTORING,
                  **_ANSWERS, **_PINGS, **_FATAL},
    # The server answers a Restore with a Welcome naming the recreated ring
    # (docs/PROTOCOL.md 4.13), or refuses it with a fatal Error.
    State.RESTORING: {(_S, _K.WELCOME): State.READY, **_ANSWERS, **_PINGS, **_FATAL},
    State.REPLAYING: {(_S, _K.RECORDS): None, (_S, _K.GAP): None, (_S, _K.END): State.ENDED,
                      **_ANSWERS, **_PINGS, **_FATAL},
    State.FOLLOWING: {(_S, _K.RECORDS): None, (_S, _K.GAP): None, **_ANSWERS, **_PINGS,
                      **_FATAL},
    State.ENDED: {**_ANSWERS, **_PINGS, **_FATAL},
    State.CLOSING: {},
}
assert set(TRANSITIONS) == set(State)
# A Records frame never changes the state, so send_records() may check it before
# encoding: a refused encoding then leaves the state as it was, as send() does.
assert all(row.get((sender, _K.RECORDS)) is None for row in TRANSITIONS.values()
           for sender in Role)

# The frame type that carries each kind: the header-time check below asks
# whether a frame of this type may arrive at all (any kind of it).
_FRAME_TYPES: dict[EventKind, FrameType] = {
    _K.HELLO: FrameType.HELLO, _K.WELCOME: FrameType.WELCOME, _K.PUBLISH: FrameType.PUBLISH,
    _K.ACK: FrameType.ACK, _K.SUBSCRIBE_ONCE: FrameType.SUBSCRIBE,
    _K.SUBSCRIBE_FOLLOW: FrameType.SUBSCRIBE, _K.RECORDS: FrameType.RECORDS,
    _K.GAP: FrameType.GAP, _K.END: FrameType.END, _K.ERROR_FATAL: FrameType.ERROR,
    _K.ERROR_BATCH: FrameType.ERROR, _K.PING: FrameType.PING, _K.PONG: FrameType.PONG,
    _K.RESTORE: FrameType.RESTORE,
}
assert set(_FRAME_TYPES) == set(EventKind)

# Lookup forms of TRANSITIONS, built once: state -> sender -> kind -> next state
# ("stay" resolved to the state itself), and state -> sender -> frame types.
# Nested dicts keep the per-frame check free of tuple allocations.
_NEXT: dict[State, dict[Role, dict[EventKind, State]]] = {
    state: {sender: {kind: target or state for (s, kind), target in row.items() if s is sender}
            for sender in Role}
    for state, row in TRANSITIONS.items()}
_ALLOWED_FRAME_TYPES: dict[State, dict[Role, frozenset[int]]] = {
    state: {sender: frozenset(_FRAME_TYPES[kind] for kind in kinds)
            for sender, kinds in row.items()}
    for state, row in _NEXT.items()}
_STATE_HINTS = {
    State.AWAIT_HELLO: "send Hello first",
    State.AWAIT_WELCOME: "wait for Welcome before publishing or subscribing",
    State.READY: "follow the state table in docs/PROTOCOL.md",
    State.REPLAYING: "a subscribed connection only pings; publish on another connection",
    State.FOLLOWING: "a subscribed connection only pings; publish on another connection",
    State.ENDED: "the subscription ended; close and open another connection",
    State.CLOSING: "a fatal Error was exchanged; close the connection",
    State.RESTORING: "wait for the Welcome that answers Restore before publishing",
}
assert set(_STATE_HINTS) == set(State)


# --- The rules that read the handshake --------------------------------------------
# Each runs after the table allowed the event and before the state changes; it
# raises `error_type` to refuse (nothing changes) or records the handshake.

def _check_version(event: Hello | Welcome, error_type: type[ProtocolError]) -> None:
    if event.protocol_version not in PROTOCOL_VERSIONS_SPOKEN:
        spoken = " and ".join(map(str, PROTOCOL_VERSIONS_SPOKEN))
        raise error_type(_E.UNSUPPORTED_VERSION, f"{type(event).__name__} names protocol version"
                         f" {event.protocol_version}; this side speaks versions {spoken}; use a"
                         " client and server that share a protocol version")


def _rule_hello(cstate: ConnectionState, event: Hello, error_type: type[ProtocolError]) -> None:
    _check_version(event, error_type)
    if event.producer_id and event.protocol_version < 2:
        raise error_type(_E.MALFORMED_FRAME, "Hello flag PRODUCER is defined from protocol"
                         f" version 2; this Hello names version {event.protocol_version}")
    cstate.hello = event


def _rule_welcome(cstate: ConnectionState, event: Welcome,
                  error_type: type[ProtocolError]) -> None:
    _check_version(event, error_type)
    hello = cstate.hello
    assert hello is not None, "the table allows Welcome only after Hello"
    if event.protocol_version != hello.protocol_version:
        raise error_type(_E.UNSUPPORTED_VERSION, f"Welcome names protocol version"
                         f" {event.protocol_version} but the Hello asked for version"
                         f" {hello.protocol_version}; the server must answer in the Hello's"
                         " version")
    if event.tenant_id != hello.tenant_id:
        raise error_type(_E.MALFORMED_FRAME, f"Welcome names tenant {event.tenant_id}"
                         f" but the Hello asked for tenant {hello.tenant_id};"
                         " the server must welcome the tenant it was asked for")
    cstate.welcome = event


def _rule_publish(cstate: ConnectionState, event: Publish,
                  error_type: type[ProtocolError]) -> None:
    welcome = cstate.welcome
    assert welcome is not None, "the table allows Publish only after Welcome"
    if (event.producer_sequence is None) != (not cstate.hello.producer_id):
        raise error_type(_E.MALFORMED_FRAME, f"Publish batch {event.batch_id}"
                         + (" carries no producer_sequence on a connection whose Hello named"
                            " producer {:d}; set flag SEQUENCED on every Publish of it".format(
                                cstate.hello.producer_id)
                            if event.producer_sequence is None else
                            " carries a producer_sequence (flag SEQUENCED) on a connection whose"
                            " Hello named no producer; send Hello with a producer_id first"),
                         batch_id=event.batch_id)
    count_max = welcome.publish_record_count_max
    if len(event.records) > count_max * RECORD_SIZE_BYTES:
        raise error_type(_E.BATCH_TOO_LARGE, f"Publish batch {event.batch_id} carries"
                         f" {event.record_count} records, over the connection's"
                         f" publish_record_count_max ({count_max}); split the batch",
                         batch_id=event.batch_id)


# The protocol version that added Restore (docs/PROTOCOL.md 4.13): on a
# connection whose Hello named an older one, frame type 12 does not exist.
RESTORE_PROTOCOL_VERSION_MIN = 2
assert RESTORE_PROTOCOL_VERSION_MIN in PROTOCOL_VERSIONS_SPOKEN


def _rule_restore(cstate: ConnectionState, event: Restore,
                  error_type: type[ProtocolError]) -> None:
    version = cstate.hello.protocol_version
    if version < RESTORE_PROTOCOL_VERSION_MIN:
        raise error_type(_E.UNKNOWN_FRAME_TYPE, f"Restore (frame type 12) is defined from"
                         f" protocol version {RESTORE_PROTOCOL_VERSION_MIN}; this connection's"
                         f" Hello named version {version}; connect with a version"
                         f" {RESTORE_PROTOCOL_VERSION_MIN} Hello to restore")


_Rule = Callable[["ConnectionState", Event, type[ProtocolError]], None]
_RULES: dict[EventKind, _Rule] = {
    _K.HELLO: _rule_hello,
    _K.WELCOME: _rule_welcome,
    _K.PUBLISH: _rule_publish,
    _K.RESTORE: _rule_restore,
}
# process_records() has no event to hand a rule: a rule for Records must come
# with a change there (and in Connection.send_records) that checks the same.
assert _K.RECORDS not in _RULES
_RECORDS = _K.RECORDS


class ConnectionState:
    """The state both ends share, the handshake so far, and every rule on what may be sent.

    Every event, in either direction, passes process_event() (or, for a Records
    frame built without an event, process_records()) before the Connection
    returns or encodes it. A refusal raises the `error_type` the caller names
    (RemoteProtocolError for what the peer sent, LocalProtocolError for ours)
    and changes nothing.

    Attributes:
        state: the current State.
        hello, welcome: the handshake's events once they passed, else None.
    """

    __slots__ = ("state", "hello", "welcome")

    def __init__(self) -> None:
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None

    def check_frame_type(self, sender: Role, frame_type: int, name: str,
                         error_type: type[ProtocolError]) -> None:
        """Refuse from the header alone a frame no kind of which `sender` may send now."""
        if frame_type not in _ALLOWED_FRAME_TYPES[self.state][sender]:
            raise self.refusal(name, sender, error_type)

    def process_event(self, sender: Role, event: Event,
                      error_type: type[ProtocolError]) -> None:
        """Apply `event` from `sender`: the table, then its kind's rule, then the new state."""
        kind = event_kind(event)
        target = _NEXT[self.state][sender].get(kind)
        if target is None:
            raise self.refusal(kind.value, sender, error_type)
        rule = _RULES.get(kind)
        if rule is not None:
            rule(self, event, error_type)
        self.state = target

    def process_records(self, sender: Role, error_type: type[ProtocolError]) -> None:
        """process_event(sender, Records(...)) without the event (the replay hot path).

        The table walk of process_event() for the kind RECORDS, with no rule to
        run (asserted at _RULES): no allocation per frame.
        """
        target = _NEXT[self.state][sender].get(_RECORDS)
        if target is None:
            raise self.refusal(_RECORDS.value, sender, error_type)
        self.state = target

    def refusal(self, name: str, sender: Role, error_type: type[ProtocolError]) -> ProtocolError:
        """The error for a `name` frame (a kind's value or a frame's name) refused by the table."""
        state = self.state
        if state is State.AWAIT_HELLO and name != _K.HELLO.value:
            return error_type(_E.HELLO_REQUIRED, f"{name} from the {sender.value} came before"
                              " Hello; send Hello first")
        allowed = sorted(kind.value for kind in _NEXT[state][sender]) or ["nothing"]
        return error_type(_E.UNEXPECTED_FRAME, f"{name} from the {sender.value} is not allowed"
                          f" in state {state.value} (the {sender.value} may send:"
                          f" {', '.join(allowed)}); {_STATE_HINTS[state]}")
