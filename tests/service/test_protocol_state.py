"""ConnectionState: the one object that decides what may be sent when (issue 14, step 1).

The state table's own matrix is in test_protocol.py (every state x kind x
sender, through Connection). Here each rule is checked on ConnectionState
itself, for both error types, and send_records() is checked against
send(Records(...)): the same refusals, the same messages, nothing changed.
"""

from __future__ import annotations

import pytest

from ringtail.ioring.record import SlotRecord
from ringtail.service.protocol import (
    CLIENT, SERVER, Ack, Connection, End, Error, ErrorCode, Gap, Hello, LocalProtocolError, Ping,
    Pong, ProtocolError, Publish, Records, RemoteProtocolError, Restore, State, Subscribe,
    Welcome, encode_event,
)
from ringtail.service.protocol._events import EventKind, event_kind
from ringtail.service.protocol._frames import FrameType
from ringtail.service.protocol._state import TRANSITIONS, ConnectionState

RECORD = SlotRecord(timestamp_ns=1, slot_idx=0, tenant_id=7, opcode=1).encode()
TENANT = 7
HELLO = Hello(TENANT)
WELCOME = Welcome(TENANT, 2, 0, 0, 16)  # publish_record_count_max 2
ERROR_TYPES = [LocalProtocolError, RemoteProtocolError]


def state_in(state: State) -> ConnectionState:
    """A ConnectionState driven through legal events into `state`."""
    script = {
        State.AWAIT_HELLO: [],
        State.AWAIT_WELCOME: [(CLIENT, HELLO)],
        State.READY: [(CLIENT, HELLO), (SERVER, WELCOME)],
        State.REPLAYING: [(CLIENT, HELLO), (SERVER, WELCOME), (CLIENT, Subscribe())],
        State.FOLLOWING: [(CLIENT, HELLO), (SERVER, WELCOME), (CLIENT, Subscribe(follow=True))],
        State.ENDED: [(CLIENT, HELLO), (SERVER, WELCOME), (CLIENT, Subscribe()),
                      (SERVER, End(0))],
        State.CLOSING: [(CLIENT, HELLO), (SERVER, Error(ErrorCode.SHUTTING_DOWN, "bye"))],
        State.RESTORING: [(CLIENT, HELLO), (SERVER, WELCOME), (CLIENT, Restore(64, 2))],
    }[state]
    cstate = ConnectionState()
    for sender, event in script:
        cstate.process_event(sender, event, LocalProtocolError)
    assert cstate.state is state
    return cstate


def snapshot(cstate: ConnectionState) -> tuple:
    return cstate.state, cstate.hello, cstate.welcome


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_records_in_ready_from_the_server_is_refused_and_changes_nothing(error_type):
    cstate = state_in(State.READY)
    before = snapshot(cstate)
    message = ("Records from the server is not allowed in state READY (the server may send:"
               " Ack, Error(batch), Error(fatal), Ping, Pong); follow the state table in"
               " docs/PROTOCOL.md")
    with pytest.raises(error_type) as caught:
        cstate.process_event(SERVER, Records(0, RECORD), error_type)
    assert caught.value.code is ErrorCode.UNEXPECTED_FRAME and caught.value.fatal
    assert caught.value.message == message
    with pytest.raises(error_type) as without_event:
        cstate.process_records(SERVER, error_type)
    assert without_event.value.code is ErrorCode.UNEXPECTED_FRAME
    assert without_event.value.message == message
    assert snapshot(cstate) == before


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_publish_over_the_welcome_limit_is_refused_not_fatal_and_changes_nothing(error_type):
    cstate = state_in(State.READY)
    cstate.process_event(CLIENT, Publish(1, RECORD * 2), error_type)  # at the limit: allowed
    before = snapshot(cstate)
    with pytest.raises(error_type) as caught:
        cstate.process_event(CLIENT, Publish(9, RECORD * 3), error_type)
    assert caught.value.code is ErrorCode.BATCH_TOO_LARGE and not caught.value.fatal
    assert caught.value.batch_id == 9
    assert caught.value.message == ("Publish batch 9 carries 3 records, over the connection's"
                                    " publish_record_count_max (2); split the batch")
    assert snapshot(cstate) == before


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_wrong_protocol_version_is_refused_in_hello_and_welcome(error_type):
    cstate = ConnectionState()
    with pytest.raises(error_type) as caught:
        cstate.process_event(CLIENT, Hello(TENANT, protocol_version=3), error_type)
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION and caught.value.fatal
    assert caught.value.message == ("Hello names protocol version 3; this side speaks versions"
                                    " 1 and 2; use a client and server that share a protocol"
                                    " version")
    assert snapshot(cstate) == (State.AWAIT_HELLO, None, None)
    cstate = state_in(State.AWAIT_WELCOME)
    with pytest.raises(error_type, match="^Welcome names protocol version 9;") as caught:
        cstate.process_event(SERVER, Welcome(TENANT, 1, 0, 0, 1, protocol_version=9),
                             error_type)
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert snapshot(cstate) == (State.AWAIT_WELCOME, HELLO, None)
    # A version both sides speak, but not the Hello's: the server must answer in kind.
    with pytest.raises(error_type, match="^Welcome names protocol version 1 but the Hello asked"
                       " for version 2;") as caught:
        cstate.process_event(SERVER, Welcome(TENANT, 1, 0, 0, 1, protocol_version=1),
                             error_type)
    assert snapshot(cstate) == (State.AWAIT_WELCOME, HELLO, None)


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_version_1_hello_is_welcomed_in_version_1_without_a_producer(error_type):
    cstate = ConnectionState()
    hello = Hello(TENANT, protocol_version=1)
    cstate.process_event(CLIENT, hello, error_type)
    cstate.process_event(SERVER, Welcome(TENANT, 4, 0, 0, 8, protocol_version=1), error_type)
    assert cstate.state is State.READY
    cstate.process_event(CLIENT, Publish(1, RECORD), error_type)
    with pytest.raises(error_type, match="Hello named no producer") as caught:
        cstate.process_event(CLIENT, Publish(2, RECORD, producer_sequence=1), error_type)
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and caught.value.fatal


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_a_producer_connection_sends_only_sequenced_publishes(error_type):
    cstate = ConnectionState()
    cstate.process_event(CLIENT, Hello(TENANT, producer_id=5), error_type)
    cstate.process_event(SERVER, Welcome(TENANT, 4, 0, 0, 8), error_type)
    cstate.process_event(CLIENT, Publish(1, RECORD, producer_sequence=0), error_type)
    with pytest.raises(error_type, match="carries no producer_sequence on a connection whose"
                       " Hello named producer 5") as caught:
        cstate.process_event(CLIENT, Publish(2, RECORD), error_type)
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and caught.value.fatal


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_restore_needs_a_version_2_connection(error_type):
    cstate = ConnectionState()
    cstate.process_event(CLIENT, Hello(TENANT, protocol_version=1), error_type)
    cstate.process_event(SERVER, Welcome(TENANT, 4, 0, 0, 8, protocol_version=1), error_type)
    with pytest.raises(error_type, match=r"Restore \(frame type 12\) is defined from protocol"
                       " version 2; this connection's Hello named version 1") as caught:
        cstate.process_event(CLIENT, Restore(64, 2), error_type)
    assert caught.value.code is ErrorCode.UNKNOWN_FRAME_TYPE and caught.value.fatal
    assert cstate.state is State.READY
    version_2 = ConnectionState()
    version_2.process_event(CLIENT, Hello(TENANT), error_type)
    version_2.process_event(SERVER, Welcome(TENANT, 4, 0, 0, 8), error_type)
    version_2.process_event(CLIENT, Restore(64, 2), error_type)
    assert version_2.state is State.RESTORING


def test_a_version_1_hello_cannot_name_a_producer():
    with pytest.raises(LocalProtocolError, match="producer_id needs protocol version 2"):
        Hello(TENANT, protocol_version=1, producer_id=5)


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
def test_welcome_for_another_tenant_than_the_hello_is_refused(error_type):
    cstate = state_in(State.AWAIT_WELCOME)
    with pytest.raises(error_type) as caught:
        cstate.process_event(SERVER, Welcome(TENANT + 1, 1, 0, 0, 1), error_type)
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and caught.value.fatal
    assert caught.value.message == ("Welcome names tenant 8 but the Hello asked for tenant 7;"
                                    " the server must welcome the tenant it was asked for")
    assert snapshot(cstate) == (State.AWAIT_WELCOME, HELLO, None)
    cstate.process_event(SERVER, WELCOME, error_type)
    assert snapshot(cstate) == (State.READY, HELLO, WELCOME)


def test_the_table_is_checked_before_the_rules():
    # A Publish over the limit in FOLLOWING is refused by the table (fatal), not
    # by the size rule (BATCH_TOO_LARGE): the state decides first.
    cstate = state_in(State.FOLLOWING)
    with pytest.raises(LocalProtocolError) as caught:
        cstate.process_event(CLIENT, Publish(1, RECORD * 3), LocalProtocolError)
    assert caught.value.code is ErrorCode.UNEXPECTED_FRAME


def connection_in(state: State) -> Connection:
    """The server end of a connection driven into `state` by real frames."""
    client, server = Connection(CLIENT), Connection(SERVER)
    for sender, event in {
        State.AWAIT_HELLO: [], State.AWAIT_WELCOME: [(client, HELLO)],
        State.READY: [(client, HELLO), (server, WELCOME)],
        State.REPLAYING: [(client, HELLO), (server, WELCOME), (client, Subscribe())],
        State.FOLLOWING: [(client, HELLO), (server, WELCOME), (client, Subscribe(follow=True))],
        State.ENDED: [(client, HELLO), (server, WELCOME), (client, Subscribe()),
                      (server, End(0))],
        State.CLOSING: [(client, HELLO), (server, Error(ErrorCode.SHUTTING_DOWN, "bye"))],
        State.RESTORING: [(client, HELLO), (server, WELCOME), (client, Restore(64, 2))],
    }[state]:
        receiver = server if sender is client else client
        receiver.receive_data(sender.send(event))
        assert receiver.next_event() == event
    assert server.state is state
    return server


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_send_records_refuses_exactly_what_send_records_event_refuses(state):
    server = connection_in(state)
    event = Records(5, RECORD * 2)
    before = server.statistics()
    try:
        expected = server.send(event)
    except LocalProtocolError as error:
        refused = error
    else:
        refused = None
    if refused is None:
        assert (SERVER, EventKind.RECORDS) in TRANSITIONS[state]
        assert server.send_records(5, memoryview(RECORD * 2)) == expected
        assert server.statistics().frames_sent == before.frames_sent + 2
        return
    assert (SERVER, EventKind.RECORDS) not in TRANSITIONS[state]
    assert server.statistics() == before
    with pytest.raises(LocalProtocolError) as caught:
        server.send_records(5, memoryview(RECORD * 2))
    assert (caught.value.code, caught.value.message) == (refused.code, refused.message)
    assert caught.value.code in (ErrorCode.HELLO_REQUIRED, ErrorCode.UNEXPECTED_FRAME)
    assert server.statistics() == before  # nothing sent, state unchanged
    # The refusal comes before the records are looked at: bad records get the
    # state's error too, not the records' one.
    with pytest.raises(LocalProtocolError) as bad_records:
        server.send_records(5, RECORD[:10])
    assert bad_records.value.code is refused.code


@pytest.mark.parametrize("sender", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_process_records_and_process_event_records_agree_everywhere(state, sender):
    outcomes = []
    for apply in (lambda c: c.process_event(sender, Records(0, RECORD), RemoteProtocolError),
                  lambda c: c.process_records(sender, RemoteProtocolError)):
        cstate = state_in(state)
        try:
            apply(cstate)
        except ProtocolError as error:
            outcomes.append((type(error), error.code, error.message, cstate.state))
        else:
            outcomes.append((None, None, None, cstate.state))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][0] is None) == ((sender, EventKind.RECORDS) in TRANSITIONS[state])


def test_the_client_never_sends_records():
    client = Connection(CLIENT)
    with pytest.raises(LocalProtocolError, match="^Records from the client came before Hello"):
        client.send_records(1, RECORD)


SAMPLES = {
    EventKind.HELLO: HELLO, EventKind.WELCOME: WELCOME, EventKind.PUBLISH: Publish(1, RECORD),
    EventKind.ACK: Ack(1, 0, 0), EventKind.SUBSCRIBE_ONCE: Subscribe(),
    EventKind.SUBSCRIBE_FOLLOW: Subscribe(follow=True), EventKind.RECORDS: Records(0, RECORD),
    EventKind.GAP: Gap(0, 1), EventKind.END: End(0),
    EventKind.ERROR_FATAL: Error(ErrorCode.INTERNAL, "bug"),
    EventKind.ERROR_BATCH: Error(ErrorCode.QUOTA_EXCEEDED, "slow", 1),
    EventKind.PING: Ping(1), EventKind.PONG: Pong(1), EventKind.RESTORE: Restore(64, 2),
}


def test_event_kind_names_every_kind_once():
    assert set(SAMPLES) == set(EventKind)
    assert {kind: event_kind(event) for kind, event in SAMPLES.items()} == {
        kind: kind for kind in EventKind}
    assert event_kind(Error(4242, "newer code")) is EventKind.ERROR_FATAL  # unknown: fatal


@pytest.mark.parametrize("sender", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_header_check_allows_a_frame_type_iff_some_kind_of_it_is_in_the_table(state, sender):
    for frame_type in FrameType:
        kinds = [kind for kind, event in SAMPLES.items()
                 if encode_event(event)[4] == frame_type]
        expected = any((sender, kind) in TRANSITIONS[state] for kind in kinds)
        cstate = state_in(state)
        try:
            cstate.check_frame_type(sender, frame_type, frame_type.name, RemoteProtocolError)
        except RemoteProtocolError as error:
            assert not expected and error.fatal
        else:
            assert expected
        assert cstate.state is state
