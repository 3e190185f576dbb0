"""The sans-IO protocol codec: bytes in, events out, synchronously (no Trio).

docs/PROTOCOL.md is the contract: its test vectors, state table and error table
are read from the document here, so the document and the code cannot drift.
"""

from __future__ import annotations

import pathlib
import random
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringtail.ioring.record import SlotRecord
from ringtail.service import protocol
from ringtail.service.protocol import (
    CLIENT, CLOSED, ERROR_CODE_INFO, FRAME_HEADER_SIZE_BYTES, FRAME_SIZE_BYTES_MAX, NEED_DATA,
    PUBLISH_RECORD_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX, RECORD_INDEX_NONE,
    RECORDS_FRAME_RECORD_COUNT_MAX, SERVER, U64_MAX, Ack, Connection,
    End, Error, ErrorCode, Event, FrameType, Gap, Hello, LocalProtocolError, Ping, Pong,
    ProtocolError, Publish, Records, RemoteProtocolError, Restore, StartKind, State, Subscribe,
    Welcome,
    decode_frame, encode_event, encode_records_frame,
)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
RECORD_A = SlotRecord(timestamp_ns=1_700_000_000_000_000_000, slot_idx=3, tenant_id=7,
                      opcode=42, args=(1, 2, 3, 4), epoch=5).encode()
RECORD_B = SlotRecord(timestamp_ns=1_700_000_000_000_001_000, slot_idx=4, tenant_id=7,
                      opcode=42, epoch=5, slot_status=3, failure_class=2, backend_code=9,
                      output_digest=0x1122334455667788).encode()
TENANT = 7
HELLO = Hello(TENANT, b"secret", "gpu0")
WELCOME = Welcome(TENANT, 4096, 0, 10, 1024, "ringtail")

VECTOR_EVENTS = {
    "hello": HELLO,
    "hello_v1": Hello(TENANT, b"secret", "gpu0", protocol_version=1),
    "hello_producer": Hello(TENANT, b"secret", "gpu0", producer_id=0x0123456789ABCDEF),
    "welcome": WELCOME,
    "publish": Publish(42, RECORD_A),
    "publish_sequenced": Publish(42, RECORD_A, producer_sequence=7),
    "ack": Ack(42, 10, 10),
    "subscribe": Subscribe(StartKind.SEQUENCE, 5, follow=True, failure_only=True, epoch_min=1,
                           epoch_max=9, opcodes={42, 7}),
    "records": Records(10, RECORD_A),
    "records_sparse": Records(10, RECORD_A + RECORD_B, (10, 12)),
    "gap": Gap(3, 4),
    "end": End(11),
    "error": Error(ErrorCode.WRONG_TENANT, "tenant 8", batch_id=42, record_index=0),
    "error_fatal": Error(ErrorCode.HELLO_REQUIRED, "send Hello"),
    "ping": Ping(0x0123456789ABCDEF),
    "pong": Pong(0x0123456789ABCDEF),
    "restore": Restore(1536, 964),
}


def read_doc_vectors() -> dict[str, bytes]:
    """`vector NAME:` lines and their indented hex lines, from ```text blocks."""
    vectors: dict[str, bytes] = {}
    name = None
    in_text = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_text, name = line.strip() == "```text", None
            continue
        code = line.split("#", 1)[0]
        if not in_text or not code.strip():
            continue
        match = re.fullmatch(r"vector (\w+):\s*", code)
        if match:
            name = match[1]
            assert name not in vectors, f"vector {name} appears twice"
            vectors[name] = b""
        else:
            assert name is not None and code[0].isspace(), f"stray line in vectors: {line!r}"
            vectors[name] += bytes.fromhex(code)
    return vectors


def drain(connection: Connection, react=None) -> list:
    """Events until NEED_DATA (not included) or CLOSED (included).

    react(connection, event), if given, runs after each event, before the next
    is parsed, as the glue would answer a Hello or a Ping.
    """
    events = []
    while True:
        event = connection.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED:
            return events
        if react is not None:
            react(connection, event)


def feed(connection: Connection, chunks, react=None) -> list:
    events = []
    for chunk in chunks:
        connection.receive_data(chunk)
        events += drain(connection, react)
    return events


def welcome_hello(connection: Connection, event) -> None:
    if isinstance(event, Hello):
        connection.send(WELCOME)


def exchange(sender: Connection, receiver: Connection, event: Event) -> Event:
    receiver.receive_data(sender.send(event))
    received = receiver.next_event()
    assert received == event
    return received


def pair(state: State) -> tuple[Connection, Connection]:
    """A (client, server) pair driven through legal frames into `state`."""
    client, server = Connection(CLIENT), Connection(SERVER)
    script = {
        State.AWAIT_HELLO: [],
        State.AWAIT_WELCOME: [HELLO],
        State.READY: [HELLO, WELCOME],
        State.REPLAYING: [HELLO, WELCOME, Subscribe()],
        State.FOLLOWING: [HELLO, WELCOME, Subscribe(follow=True)],
        State.ENDED: [HELLO, WELCOME, Subscribe(), End(10)],
        State.CLOSING: [HELLO, WELCOME, Error(ErrorCode.SHUTTING_DOWN, "bye")],
        State.RESTORING: [HELLO, WELCOME, Restore(1536, 964)],
    }[state]
    for event in script:
        from_client = isinstance(event, (Hello, Subscribe, Restore))
        exchange(client if from_client else server, server if from_client else client, event)
    assert client.state is server.state is state
    return client, server


def frame(frame_type: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<IHH", len(payload), frame_type, flags) + payload


# --- Events, round trips, vectors ---------------------------------------------

ROUND_TRIP_EVENTS = list(VECTOR_EVENTS.values()) + [
    Hello(0xFFFFFFFF, b"t" * 256, "n" * 64, protocol_version=0xFFFF),
    Hello(0, b"", "gpü-ñode"),
    Welcome(0, 1, U64_MAX, U64_MAX, 1),
    Publish(U64_MAX, RECORD_A * PUBLISH_RECORD_COUNT_MAX),
    Ack(0, U64_MAX - 4095, U64_MAX),
    Subscribe(StartKind.TIME, 1_700_000_000_000_000_000, opcodes=range(64)),
    Subscribe(StartKind.LATEST, follow=True, epoch_min=3, epoch_max=3),
    Records(U64_MAX - 4095, RECORD_B * RECORDS_FRAME_RECORD_COUNT_MAX),
    Records(0, RECORD_A * 3, (0, 1 << 40, U64_MAX)),
    Gap(0, U64_MAX), End(0), Ping(0), Pong(U64_MAX),
    Error(999, "a code from a newer version"),
    Error(ErrorCode.INTERNAL, "é" * 512, U64_MAX, PUBLISH_RECORD_COUNT_MAX - 1),
]


@pytest.mark.parametrize("event", ROUND_TRIP_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_its_frame(event):
    data = encode_event(event)
    assert decode_frame(data) == event
    size, frame_type, _ = struct.unpack_from("<IHH", data)
    assert size == len(data) - FRAME_HEADER_SIZE_BYTES
    assert FrameType(frame_type).name.replace("_", "") == type(event).__name__.upper()


@pytest.mark.parametrize("name", sorted(VECTOR_EVENTS))
def test_doc_vector_matches_encoder_and_decoder(name):
    vector = read_doc_vectors()[name]
    assert encode_event(VECTOR_EVENTS[name]).hex() == vector.hex()
    assert decode_frame(vector) == VECTOR_EVENTS[name]


def test_doc_has_exactly_the_vectors_the_tests_check_covering_every_frame_type():
    vectors = read_doc_vectors()
    assert set(vectors) == set(VECTOR_EVENTS)
    assert {struct.unpack_from("<H", v, 4)[0] for v in vectors.values()} == set(FrameType)


def test_doc_error_table_matches_error_codes():
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \| (yes|no) \|", DOC.read_text(), re.MULTILINE)
    assert [(int(c), n, f == "yes") for c, n, f in rows] == [
        (int(code), code.name, info.fatal) for code, info in ERROR_CODE_INFO.items()]


def test_wire_numbers_never_change():
    codes = ("MALFORMED_FRAME FRAME_TOO_LARGE UNKNOWN_FRAME_TYPE UNSUPPORTED_VERSION"
             " BAD_RECORD_SIZE BAD_RECORD_MAGIC WRONG_TENANT HELLO_REQUIRED UNEXPECTED_FRAME"
             " AUTH_FAILED FORBIDDEN QUOTA_EXCEEDED BATCH_TOO_LARGE UNKNOWN_TENANT STORAGE_FAILED"
             " SHUTTING_DOWN BAD_SUBSCRIBE HANDSHAKE_TIMEOUT TOO_MANY_CONNECTIONS"
             " TOO_MANY_SUBSCRIBERS INTERNAL TENANT_UNAVAILABLE CONNECTION_LOST IDLE_TIMEOUT"
             " RESTORE_REFUSED PRODUCER_WINDOW_PASSED").split()
    assert [(code.name, int(code)) for code in ErrorCode] == list(zip(codes, range(1, 27)))
    frame_types = ("HELLO WELCOME PUBLISH ACK SUBSCRIBE RECORDS GAP END ERROR PING PONG"
                   " RESTORE").split()
    assert [(t.name, int(t)) for t in FrameType] == list(zip(frame_types, range(1, 13)))
    assert [int(kind) for kind in StartKind] == [0, 1, 2, 3]
    assert {c for c in ErrorCode if not c.fatal} == {
        ErrorCode.BAD_RECORD_SIZE, ErrorCode.BAD_RECORD_MAGIC, ErrorCode.WRONG_TENANT,
        ErrorCode.QUOTA_EXCEEDED, ErrorCode.BATCH_TOO_LARGE, ErrorCode.STORAGE_FAILED,
        ErrorCode.PRODUCER_WINDOW_PASSED}


def test_public_surface_is_pinned():
    assert sorted(protocol.__all__) == sorted(
        name for name in vars(protocol) if not name.startswith("_") and name not in {
            "annotations", "dataclasses", "enum", "operator", "struct", "ClassVar"})
    assert len(protocol.__all__) == 49  # Restore joined (docs/PROTOCOL.md 4.13)


BAD_EVENTS = [
    (lambda: Hello(-1), ErrorCode.MALFORMED_FRAME, r"tenant_id = -1 is not an integer in 0\.\."),
    (lambda: Restore(U64_MAX, 2), ErrorCode.MALFORMED_FRAME,
     r"first_sequence 18446744073709551615 \+ record_count 2 passes the u64 sequence space"),
    (lambda: Hello(7, b"t" * 257), ErrorCode.MALFORMED_FRAME,
     r"token of 257 bytes exceeds TOKEN_SIZE_BYTES_MAX \(256\)"),
    (lambda: Hello(7, client_name="é" * 33), ErrorCode.MALFORMED_FRAME,
     r"client_name of 66 UTF-8 bytes exceeds NAME_SIZE_BYTES_MAX \(64\)"),
    (lambda: Welcome(7, 4097, 0, 0, 1), ErrorCode.MALFORMED_FRAME,
     r"publish_record_count_max = 4097 is outside 1\.\.PUBLISH_RECORD_COUNT_MAX"),
    (lambda: Welcome(7, 1, 5, 4, 10), ErrorCode.MALFORMED_FRAME, r"must be ordered"),
    (lambda: Publish(9, b"x" * 100), ErrorCode.BAD_RECORD_SIZE,
     r"records of 100 bytes is not a positive multiple of RECORD_SIZE_BYTES \(64\)"),
    (lambda: Publish(9, b""), ErrorCode.BAD_RECORD_SIZE, r"records of 0 bytes"),
    (lambda: Publish(9, RECORD_A * 4097), ErrorCode.BATCH_TOO_LARGE,
     r"4097 records exceed PUBLISH_RECORD_COUNT_MAX \(4096\); split them"),
    (lambda: Ack(1, 5, 4), ErrorCode.MALFORMED_FRAME, r"range 5\.\.4 must be ordered"),
    (lambda: Subscribe(StartKind.OLDEST, 5), ErrorCode.BAD_SUBSCRIBE,
     r"start_value = 5 must be 0 with start OLDEST"),
    (lambda: Subscribe(9), ErrorCode.BAD_SUBSCRIBE, r"start = 9 is not a StartKind"),
    (lambda: Subscribe(epoch_min=2, epoch_max=1), ErrorCode.BAD_SUBSCRIBE,
     r"epoch_min 2 > epoch_max 1"),
    (lambda: Subscribe(opcodes=range(65)), ErrorCode.BAD_SUBSCRIBE,
     r"65 opcodes exceed SUBSCRIBE_OPCODE_COUNT_MAX \(64\)"),
    (lambda: Subscribe(opcodes={1 << 32}), ErrorCode.MALFORMED_FRAME, r"opcodes\[\.\.\.\]"),
    (lambda: Records(0, b"x" * 65), ErrorCode.MALFORMED_FRAME, r"records of 65 bytes"),
    (lambda: Records(0, RECORD_A * 4097), ErrorCode.MALFORMED_FRAME,
     r"4097 records exceed RECORDS_FRAME_RECORD_COUNT_MAX \(4096\)"),
    (lambda: Records(U64_MAX, RECORD_A * 2), ErrorCode.MALFORMED_FRAME, r"exceeds u64"),
    (lambda: Records(3, RECORD_A * 2, (3, 3)), ErrorCode.MALFORMED_FRAME, r"strictly increasing"),
    (lambda: Records(3, RECORD_A * 2, (4, 5)), ErrorCode.MALFORMED_FRAME,
     r"the first must equal first_sequence"),
    (lambda: Gap(5, 4), ErrorCode.MALFORMED_FRAME, r"first_lost_sequence 5 > last_lost"),
    (lambda: Error(0), ErrorCode.MALFORMED_FRAME, r"code 0 is not an ErrorCode"),
    (lambda: Error(1, "m" * 1025), ErrorCode.MALFORMED_FRAME,
     r"message of 1025 UTF-8 bytes exceeds ERROR_MESSAGE_SIZE_BYTES_MAX \(1024\)"),
    (lambda: Error(5, record_index=4096), ErrorCode.MALFORMED_FRAME, r"record_index 4096"),
    (lambda: Ping(True), ErrorCode.MALFORMED_FRAME, r"nonce = True"),
]


@pytest.mark.parametrize(("build", "code", "message"), BAD_EVENTS)
def test_event_with_bad_value_is_refused_when_built(build, code, message):
    with pytest.raises(LocalProtocolError, match=message) as caught:
        build()
    assert caught.value.code is code


def test_events_are_frozen_and_normalise_their_inputs():
    event = Subscribe(opcodes=[3, 1, 3])
    assert event.opcodes == frozenset({1, 3}) and event.start is StartKind.OLDEST
    assert Publish(1, memoryview(RECORD_A)).records == RECORD_A
    assert Error(7).code is ErrorCode.WRONG_TENANT and not Error(7).fatal and Error(999).fatal
    with pytest.raises(AttributeError):
        event.follow = True  # type: ignore[misc]


def test_error_from_protocol_error_cuts_the_message_to_the_limit():
    error = RemoteProtocolError(ErrorCode.BAD_RECORD_MAGIC, "é" * 600, batch_id=3,
                                record_index=2)
    event = Error.from_protocol_error(error)
    assert (event.code, event.batch_id, event.record_index) == (error.code, 3, 2)
    assert event.message == "é" * 512


# --- Streams split at every byte ----------------------------------------------


def client_stream():
    events = [HELLO, Ping(1), Publish(1, RECORD_A), Publish(2, RECORD_A + RECORD_B), Pong(9),
              Subscribe(StartKind.SEQUENCE, 3, follow=True, opcodes={42}), Ping(2)]
    return (lambda: Connection(SERVER)), events, welcome_hello


def server_stream_handshake():
    def receiver():
        client = Connection(CLIENT)
        client.send(HELLO)
        return client
    return receiver, [WELCOME, Ack(1, 10, 10), Error(ErrorCode.QUOTA_EXCEEDED, "slow down", 2),
                      Ping(5), Pong(6)], None


def server_stream_subscription():
    def receiver():
        client, _ = pair(State.READY)
        client.send(Subscribe(failure_only=True))
        return client
    return receiver, [Records(10, RECORD_A), Ack(3, 11, 12), Records(13, RECORD_A + RECORD_B,
                      (13, 20)), Gap(21, 30), Ping(7), Error(ErrorCode.BAD_RECORD_MAGIC, "x", 4, 1),
                      Records(31, RECORD_B * 3), End(34), Pong(8), Ack(5, 34, 34)], None


STREAMS = [client_stream, server_stream_handshake, server_stream_subscription]


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.__name__)
def test_stream_split_at_every_byte_offset_yields_the_same_events(stream):
    make_receiver, events, react = stream()
    data = b"".join(encode_event(event) for event in events)
    for offset in range(len(data) + 1):
        chunks = [chunk for chunk in (data[:offset], data[offset:]) if chunk]  # b"" is EOF
        received = feed(make_receiver(), chunks + [b""], react)
        assert received == events + [CLOSED], f"split at byte {offset}"


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.__name__)
def test_stream_fed_one_byte_at_a_time_yields_the_same_events(stream):
    make_receiver, events, react = stream()
    data = b"".join(encode_event(event) for event in events)
    receiver = make_receiver()
    before = receiver.statistics()
    received = feed(receiver, [data[i:i + 1] for i in range(len(data))] + [b""], react)
    assert received == events + [CLOSED]
    after = receiver.statistics()
    assert after.frames_received - before.frames_received == len(events)
    assert after.bytes_received - before.bytes_received == len(data)


def test_eof_on_a_frame_boundary_returns_closed_every_time():
    server = Connection(SERVER)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    assert server.next_event() is CLOSED and server.next_event() is CLOSED
    with pytest.raises(LocalProtocolError, match=r"receive_data\(\) called after EOF"):
        server.receive_data(b"more")


@pytest.mark.parametrize("cut", [1, 7, 8, 15, 79])
def test_truncated_frame_at_eof_is_malformed(cut):
    _, server = pair(State.READY)
    data = encode_event(Ping(1)) + encode_event(Publish(1, RECORD_A))
    assert feed(server, [data[:16 + cut]]) == [Ping(1)]
    server.receive_data(b"")
    where = (rf"after {cut} bytes of an 8-byte frame header" if cut < 8
             else rf"{cut} bytes into a 80-byte Publish frame")
    with pytest.raises(RemoteProtocolError, match=rf"connection closed {where}; the peer must"
                       " send whole frames") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and caught.value.fatal


# --- Framing errors -------------------------------------------------------------


def test_oversize_declared_frame_is_refused_from_the_header_alone():
    _, server = pair(State.READY)
    server.receive_data(struct.pack("<IHH", 4 * 1024 * 1024, FrameType.PUBLISH, 0))
    message = (r"^frame of 4194304 bytes exceeds FRAME_SIZE_BYTES_MAX \(1048576\); send smaller"
               r" publish batches$")
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert server.statistics().buffered_bytes == FRAME_HEADER_SIZE_BYTES
    with pytest.raises(RemoteProtocolError, match="the connection already failed: frame of"):
        server.next_event()  # the failure sticks: the stream cannot be resynchronised
    assert len(server.send(Error.from_protocol_error(caught.value))) > 0
    assert server.state is State.CLOSING


def test_unknown_frame_type_is_fatal():
    _, server = pair(State.READY)
    server.receive_data(struct.pack("<IHH", 0, 99, 0))
    with pytest.raises(RemoteProtocolError, match=r"frame type 99 is unknown to protocol"
                       r" version 2 \(known: 1\.\.12\)") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.UNKNOWN_FRAME_TYPE and caught.value.fatal


@pytest.mark.parametrize(("frame_type", "flags", "undefined"), [
    (FrameType.PING, 0x0001, "0x0001"), (FrameType.SUBSCRIBE, 0x0007, "0x0004"),
    (FrameType.RECORDS, 0x8001, "0x8000"), (FrameType.PUBLISH, 0x0100, "0x0100")])
def test_unknown_flag_bits_are_malformed(frame_type, flags, undefined):
    _, server = pair(State.READY)
    server.receive_data(struct.pack("<IHH", 8, frame_type, flags))
    with pytest.raises(RemoteProtocolError, match=rf"flags 0x{flags:04x} set undefined bits"
                       rf" {undefined}") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(("data", "message"), [
    (frame(FrameType.ACK, bytes(23)), r"Ack payload of 23 bytes is outside 24\.\.24"),
    (frame(FrameType.PING, bytes(9)), r"Ping payload of 9 bytes is outside 8\.\.8"),
    (frame(FrameType.HELLO, struct.pack("<HIH", 1, 7, 5) + b"ab" + bytes(2)),
     r"Hello.token declares 5 bytes but only 4 remain"),
    (frame(FrameType.HELLO, struct.pack("<HIH", 1, 7, 0) + b"\x02\x00\xff\xfe"),
     r"Hello.client_name is not valid UTF-8"),
    (frame(FrameType.HELLO, struct.pack("<HIHH", 1, 7, 0, 0) + b"x"),
     r"Hello payload has 1 bytes after its last field"),
    (frame(FrameType.ERROR, struct.pack("<HQIH", 0, 0, RECORD_INDEX_NONE, 0)),
     r"Error: code 0 is not an ErrorCode"),
])
def test_malformed_payloads_are_refused(data, message):
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        decode_frame(data)
    assert caught.value.code is ErrorCode.MALFORMED_FRAME


def test_decode_frame_needs_exactly_one_frame():
    with pytest.raises(RemoteProtocolError, match="17 bytes hold a Ping frame of 16 bytes"):
        decode_frame(encode_event(Ping(1)) + b"x")
    with pytest.raises(RemoteProtocolError, match="3 bytes are shorter than the 8-byte"):
        decode_frame(b"abc")


def test_receive_buffer_limit_refuses_data_the_glue_did_not_drain():
    server = Connection(SERVER)
    server.receive_data(bytes(RECEIVE_BUFFER_BYTES_MAX))
    with pytest.raises(LocalProtocolError, match=r"receive buffer would hold 2097153 bytes, over"
                       r" RECEIVE_BUFFER_BYTES_MAX \(2097152\); call next_event\(\)") as caught:
        server.receive_data(b"x")
    assert caught.value.code is ErrorCode.INTERNAL


def test_partial_frame_waits_and_buffer_is_compacted_after_whole_frames():
    _, server = pair(State.READY)
    data = encode_event(Publish(1, RECORD_A * 100)) * 3
    server.receive_data(data[:-10])
    assert [e.batch_id for e in drain(server)] == [1, 1]
    assert server.statistics().buffered_bytes == len(data) // 3 - 10
    server.receive_data(data[-10:])
    assert drain(server) == [Publish(1, RECORD_A * 100)]
    assert server.statistics().buffered_bytes == 0


# --- The state table (docs/PROTOCOL.md section 5, written out again here) --------

_LIVE = (State.AWAIT_WELCOME, State.READY, State.REPLAYING, State.FOLLOWING, State.ENDED,
         State.RESTORING)
LEGAL = {
    (State.AWAIT_HELLO, CLIENT, "Hello"), (State.AWAIT_WELCOME, SERVER, "Welcome"),
    (State.READY, CLIENT, "Publish"), (State.READY, CLIENT, "Subscribe(once)"),
    (State.READY, CLIENT, "Subscribe(follow)"), (State.REPLAYING, SERVER, "Records"),
    (State.REPLAYING, SERVER, "Gap"), (State.REPLAYING, SERVER, "End"),
    (State.FOLLOWING, SERVER, "Records"), (State.FOLLOWING, SERVER, "Gap"),
    (State.READY, CLIENT, "Restore"), (State.RESTORING, SERVER, "Welcome"),
} | {(state, SERVER, kind) for state in _LIVE[1:] for kind in ("Ack", "Error(batch)")} | {
    (state, role, kind) for state in _LIVE for role in (CLIENT, SERVER)
    for kind in ("Ping", "Pong")} | {
    (state, role, "Error(fatal)") for state in State if state is not State.CLOSING
    for role in (CLIENT, SERVER)}
NEXT_STATE = {"Hello": State.AWAIT_WELCOME, "Welcome": State.READY, "End": State.ENDED,
              "Subscribe(once)": State.REPLAYING, "Subscribe(follow)": State.FOLLOWING,
              "Error(fatal)": State.CLOSING, "Restore": State.RESTORING}
SAMPLES = {
    "Hello": HELLO, "Welcome": WELCOME, "Publish": Publish(1, RECORD_A), "Ack": Ack(1, 10, 10),
    "Subscribe(once)": Subscribe(), "Subscribe(follow)": Subscribe(follow=True),
    "Records": Records(10, RECORD_A), "Gap": Gap(1, 2), "End": End(10),
    "Error(fatal)": Error(ErrorCode.INTERNAL, "bug"),
    "Error(batch)": Error(ErrorCode.QUOTA_EXCEEDED, "slow down", 1), "Ping": Ping(1),
    "Pong": Pong(1), "Restore": Restore(1536, 964),
}


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("kind", sorted(SAMPLES))
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_state_table_allows_exactly_the_documented_frames(state, kind, role):
    client, server = pair(state)
    sender, receiver = (client, server) if role is CLIENT else (server, client)
    event = SAMPLES[kind]
    if (state, role, kind) in LEGAL:
        receiver.receive_data(sender.send(event))
        assert receiver.next_event() == event
        assert sender.state is receiver.state is NEXT_STATE.get(kind, state)
        return
    code = (ErrorCode.HELLO_REQUIRED if state is State.AWAIT_HELLO and kind != "Hello"
            else ErrorCode.UNEXPECTED_FRAME)
    with pytest.raises(LocalProtocolError) as local:
        sender.send(event)
    assert local.value.code is code and sender.state is state
    receiver.receive_data(encode_event(event))
    with pytest.raises(RemoteProtocolError) as remote:
        receiver.next_event()
    assert remote.value.code is code and remote.value.fatal


def test_publish_before_hello_is_refused_from_the_header_alone():
    server = Connection(SERVER)
    server.receive_data(encode_event(Publish(1, RECORD_A))[:12])
    with pytest.raises(RemoteProtocolError, match=r"^Publish from the client came before Hello;"
                       " send Hello first$") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.HELLO_REQUIRED


def test_publish_after_subscribe_is_unexpected_frame():
    client, server = pair(State.FOLLOWING)
    with pytest.raises(LocalProtocolError, match=r"Publish from the client is not allowed in"
                       r" state FOLLOWING \(the client may send: Error\(fatal\), Ping, Pong\);"
                       " a subscribed connection only pings; publish on another connection"):
        client.send(Publish(1, RECORD_A))
    server.receive_data(encode_event(Publish(1, RECORD_A)))
    with pytest.raises(RemoteProtocolError, match="not allowed in state FOLLOWING") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.UNEXPECTED_FRAME


def test_hello_with_unsupported_version_is_refused_and_the_server_can_say_so():
    server = Connection(SERVER)
    server.receive_data(encode_event(Hello(7, protocol_version=3)))
    with pytest.raises(RemoteProtocolError, match=r"Hello names protocol version 3; this side"
                       " speaks versions 1 and 2") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION and caught.value.fatal
    client = Connection(CLIENT)
    client.send(Hello(7))
    client.receive_data(server.send(Error.from_protocol_error(caught.value)))
    assert client.next_event().code is ErrorCode.UNSUPPORTED_VERSION
    assert client.state is server.state is State.CLOSING


def test_client_does_not_send_an_unsupported_version():
    with pytest.raises(LocalProtocolError, match="Hello names protocol version 3") as caught:
        Connection(CLIENT).send(Hello(7, protocol_version=3))
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_welcome_must_name_the_hello_tenant_and_version():
    client, _ = pair(State.AWAIT_WELCOME)
    client.receive_data(encode_event(Welcome(8, 1, 0, 0, 1)))
    with pytest.raises(RemoteProtocolError, match="Welcome names tenant 8 but the Hello asked"
                       " for tenant 7"):
        client.next_event()
    client, _ = pair(State.AWAIT_WELCOME)
    client.receive_data(encode_event(Welcome(7, 1, 0, 0, 1, protocol_version=9)))
    with pytest.raises(RemoteProtocolError, match="Welcome names protocol version 9") as caught:
        client.next_event()
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("size", [0, 1, 63, 100, 64 * 3 + 1])
def test_publish_not_whole_records_is_bad_record_size_and_connection_goes_on(size):
    _, server = pair(State.READY)
    server.receive_data(frame(FrameType.PUBLISH, struct.pack("<Q", 42) + bytes(size))
                        + encode_event(Ping(3)))
    with pytest.raises(RemoteProtocolError, match=rf"Publish: records of {size} bytes is not a"
                       r" positive multiple of RECORD_SIZE_BYTES \(64\)") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.BAD_RECORD_SIZE and not caught.value.fatal
    assert caught.value.batch_id == 42
    assert server.next_event() == Ping(3) and server.state is State.READY
    assert len(server.send(Error.from_protocol_error(caught.value))) == 8 + 16 + len(
        caught.value.message.encode())


def test_publish_over_the_welcome_limit_is_batch_too_large_and_not_fatal():
    client, server = Connection(CLIENT), Connection(SERVER)
    exchange(client, server, HELLO)
    exchange(server, client, Welcome(TENANT, 2, 0, 0, 16))
    with pytest.raises(LocalProtocolError, match="over the connection's publish_record_count_max"
                       r" \(2\); split the batch") as local:
        client.send(Publish(5, RECORD_A * 3))
    assert local.value.code is ErrorCode.BATCH_TOO_LARGE and local.value.batch_id == 5
    server.receive_data(encode_event(Publish(5, RECORD_A * 3)) + encode_event(Ping(1)))
    with pytest.raises(RemoteProtocolError, match="Publish batch 5 carries 3 records") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.BATCH_TOO_LARGE and not caught.value.fatal
    assert server.next_event() == Ping(1)
    exchange(client, server, Publish(6, RECORD_A * 2))


def test_publish_over_the_protocol_limit_is_read_whole_and_refused_without_closing():
    _, server = pair(State.READY)
    records = RECORD_A * (PUBLISH_RECORD_COUNT_MAX + 1)
    server.receive_data(frame(FrameType.PUBLISH, struct.pack("<Q", 9) + records))
    with pytest.raises(RemoteProtocolError, match="4097 records exceed PUBLISH_RECORD_COUNT_MAX"
                       r" \(4096\)") as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.BATCH_TOO_LARGE and caught.value.batch_id == 9
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize(("payload", "message"), [
    (struct.pack("<BQIIH", 0, 0, 0, 9, 2) + struct.pack("<2I", 5, 5), r"opcodes \[5, 5\] are not"
     " strictly increasing"),
    (struct.pack("<BQIIH", 4, 0, 0, 9, 0), r"start = 4 is not a StartKind"),
    (struct.pack("<BQIIH", 0, 0, 9, 1, 0), r"epoch_min 9 > epoch_max 1"),
])
def test_bad_subscribe_on_the_wire_is_bad_subscribe(payload, message):
    _, server = pair(State.READY)
    server.receive_data(frame(FrameType.SUBSCRIBE, payload))
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        server.next_event()
    assert caught.value.code is ErrorCode.BAD_SUBSCRIBE and caught.value.fatal


def test_malformed_records_from_the_server_are_fatal_not_bad_record_size():
    client, _ = pair(State.FOLLOWING)
    client.receive_data(frame(FrameType.RECORDS, struct.pack("<QI", 1, 2) + bytes(16 + 64),
                              flags=1))
    with pytest.raises(RemoteProtocolError, match="sparse Records declares 2 records") as caught:
        client.next_event()
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and caught.value.fatal


def test_error_code_unknown_to_this_version_reads_as_fatal():
    client, _ = pair(State.READY)
    client.receive_data(encode_event(Error(4242, "from the future")))
    event = client.next_event()
    assert event.code == 4242 and event.fatal and client.state is State.CLOSING
    with pytest.raises(LocalProtocolError, match="a fatal Error was exchanged; close the"):
        client.send(Ping(1))


def test_connection_lost_received_on_the_wire_decodes_as_a_known_fatal_code():
    # Reserved for clients (docs/PROTOCOL.md 6.1); a peer that sends it anyway is
    # not refused: the code decodes as any known fatal one.
    assert ErrorCode.CONNECTION_LOST == 23 and ErrorCode.CONNECTION_LOST.fatal
    client, _ = pair(State.READY)
    client.receive_data(encode_event(Error(23, "relayed")))
    event = client.next_event()
    assert event.code is ErrorCode.CONNECTION_LOST and event.fatal
    assert client.state is State.CLOSING


def test_send_records_writes_the_same_bytes_as_a_records_event():
    _, server = pair(State.REPLAYING)
    many = RECORD_A * 10
    assert server.send_records(5, memoryview(many)) == encode_event(Records(5, many))
    assert server.send_records(5, many[:128], (5, 9)) == encode_event(Records(5, many[:128],
                                                                              (5, 9)))
    assert encode_records_frame(1, bytearray(RECORD_B)) == encode_event(Records(1, RECORD_B))
    assert server.statistics().frames_sent == 3  # Welcome and two Records
    with pytest.raises(LocalProtocolError, match="records of 65 bytes"):
        server.send_records(5, many[:65])
    _, ready = pair(State.READY)
    with pytest.raises(LocalProtocolError, match="Records from the server is not allowed"):
        ready.send_records(5, many)


def test_send_refuses_what_is_not_an_event():
    with pytest.raises(TypeError, match="send\\(\\) takes a protocol event, not bytes"):
        Connection(CLIENT).send(b"hello")  # type: ignore[arg-type]


# --- Fuzzing: only events, NEED_DATA/CLOSED, or ProtocolError; bounded buffer ------

FUZZ_CLIENT_EVENTS = [HELLO, Ping(1), Publish(1, RECORD_A), Publish(2, RECORD_A + RECORD_B),
                      Pong(2), Subscribe(StartKind.TIME, 7, True, True, 1, 2, {4, 42}), Ping(3)]
FUZZ_SERVER_EVENTS = [WELCOME, Ack(1, 10, 10), Error(ErrorCode.WRONG_TENANT, "t", 2, 1),
                      Ping(4), Records(10, RECORD_A), Records(11, RECORD_A + RECORD_B, (11, 15)),
                      Gap(16, 20), End(21), Error(ErrorCode.SHUTTING_DOWN, "bye")]
VALID_STREAMS = {
    SERVER: b"".join(map(encode_event, FUZZ_CLIENT_EVENTS)),
    CLIENT: b"".join(map(encode_event, FUZZ_SERVER_EVENTS)),
}


def answer(connection: Connection, event) -> None:
    """What a glue would answer, so mutated streams reach the later states."""
    if isinstance(event, Hello) and event.protocol_version in (1, 2):
        connection.send(Welcome(event.tenant_id, 4096, 0, 0, 1,
                                protocol_version=event.protocol_version))
    elif isinstance(event, Welcome):
        connection.send(Subscribe())
    elif isinstance(event, Ping) and connection.state is not State.CLOSING:
        connection.send(Pong(event.nonce))


def run_fuzz_input(role, data: bytes, chunk_sizes: list[int]) -> int:
    """Feed `data` to a `role` Connection; return the events seen. Fails on any crash."""
    connection = Connection(role)
    if role is CLIENT:
        connection.send(HELLO)
    position, events, index = 0, 0, 0
    while True:
        size = chunk_sizes[index % len(chunk_sizes)]
        chunk, index = data[position:position + size], index + 1
        position += size
        connection.receive_data(chunk)  # b"" at the end: EOF
        while True:
            try:
                event = connection.next_event()
            except ProtocolError as error:
                assert isinstance(error.code, ErrorCode) and error.message
                if error.fatal:
                    return events
                continue
            if event is NEED_DATA or event is CLOSED:
                break
            assert isinstance(event, Event) and decode_frame(encode_event(event)) == event
            events += 1
            answer(connection, event)
        buffered = connection.statistics().buffered_bytes
        assert buffered < FRAME_HEADER_SIZE_BYTES + FRAME_SIZE_BYTES_MAX
        if event is CLOSED:
            return events


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action, position = rng.randrange(5), rng.randrange(len(data) + 1)
        if action == 0 and position < len(data):
            data[position] ^= 1 << rng.randrange(8)
        elif action == 1 and position < len(data):
            data[position] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif action == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 8))
        elif action == 3:
            del data[position:position + rng.randint(1, 16)]
        else:
            del data[position:]
    return bytes(data)


def random_frames(rng: random.Random) -> bytes:
    """Well-framed garbage after a valid Hello: reaches every payload decoder."""
    parts = [encode_event(HELLO)]
    for _ in range(rng.randint(1, 6)):
        frame_type = rng.choice(list(FrameType) + [0, 12, 0xFFFF])
        payload = rng.randbytes(rng.choice((0, 8, 16, 19, 24, 36, 72, rng.randrange(200))))
        parts.append(frame(frame_type, payload, rng.choice((0, 0, 1, 2, 3, 0x8000))))
    return b"".join(parts)


BATCH_CODES = [code for code in ErrorCode if not code.fatal]


def random_records(rng: random.Random, count_max: int = 5) -> bytes:
    return b"".join(rng.choice((RECORD_A, RECORD_B)) for _ in range(rng.randint(1, count_max)))


def random_client_stream(rng: random.Random) -> list[Event]:
    """A legal client stream with random field values (server side of the fuzz)."""
    producer = rng.choice((0, rng.getrandbits(64) | 1))  # half of them exactly-once producers
    events = [Hello(rng.getrandbits(32), rng.randbytes(rng.randrange(257)),
                    "é" * rng.randrange(33), producer_id=producer)]
    for _ in range(rng.randrange(6)):
        events.append(rng.choice((
            Publish(rng.getrandbits(64), random_records(rng),
                    rng.getrandbits(64) if producer else None), Ping(rng.getrandbits(64)))))
    if rng.random() < 0.7:
        low, high = sorted((rng.getrandbits(32), rng.getrandbits(32)))
        events.append(Subscribe(rng.choice((StartKind.SEQUENCE, StartKind.TIME)),
                                rng.getrandbits(64), rng.random() < 0.5, rng.random() < 0.5,
                                low, high, rng.sample(range(1000), rng.randrange(65))))
        events += [Pong(rng.getrandbits(64)) for _ in range(rng.randrange(3))]
    return events


def random_server_stream(rng: random.Random) -> list[Event]:
    """A legal server stream with random field values for a client that subscribes once."""
    oldest = rng.getrandbits(40)
    events = [Welcome(TENANT, rng.randint(1, 4096), oldest, oldest + 5, 5,
                      "n" * rng.randrange(65))]
    sequence = oldest
    for _ in range(rng.randrange(8)):
        records = random_records(rng, 8)
        count = len(records) // 64
        if rng.random() < 0.5:
            sequences = tuple(sorted(rng.sample(range(sequence, sequence + 4 * count), count)))
            events.append(Records(sequences[0], records, sequences))
        else:
            events.append(rng.choice((Records(sequence, records), Gap(sequence, sequence + 3),
                                      Ack(rng.getrandbits(64), sequence, sequence + count - 1),
                                      Error(rng.choice(BATCH_CODES), "x" * rng.randrange(99),
                                            rng.getrandbits(64), rng.randrange(4096)))))
        sequence += 4 * count
    events.append(End(sequence))
    return events


def encode_all(events: list[Event]) -> bytes:
    return b"".join(map(encode_event, events))


def fuzz_case(rng: random.Random) -> tuple:
    role = rng.choice((SERVER, CLIENT))
    kind = rng.randrange(4)
    if kind == 0:
        data = rng.randbytes(rng.randrange(64))
    elif kind == 1:
        data = mutate(rng, VALID_STREAMS[role])
    elif kind == 2:
        role, data = SERVER, random_frames(rng)
    else:
        data = encode_all((random_client_stream if role is SERVER else random_server_stream)(rng))
        data = mutate(rng, data) if rng.random() < 0.7 else data
    return role, data, [rng.randint(1, 97) for _ in range(rng.randint(1, 4))]


def test_valid_fuzz_streams_parse_whole_so_mutations_start_from_good_input():
    assert run_fuzz_input(SERVER, VALID_STREAMS[SERVER], [7]) == len(FUZZ_CLIENT_EVENTS)
    assert run_fuzz_input(CLIENT, VALID_STREAMS[CLIENT], [5, 64]) == len(FUZZ_SERVER_EVENTS)


FUZZ_SETTINGS = settings(max_examples=1000, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(data=st.binary(max_size=600), chunks=st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_fuzz_random_bytes_only_raise_protocol_errors(data, chunks):
    run_fuzz_input(SERVER, data, chunks)


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32), chunks=st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_fuzz_mutated_valid_streams_only_raise_protocol_errors(seed, chunks):
    rng = random.Random(seed)
    run_fuzz_input(SERVER, mutate(rng, VALID_STREAMS[SERVER]), chunks)
    run_fuzz_input(CLIENT, mutate(rng, VALID_STREAMS[CLIENT]), chunks)


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32))
def test_fuzz_well_framed_garbage_only_raises_protocol_errors(seed):
    rng = random.Random(seed)
    run_fuzz_input(SERVER, random_frames(rng), [1 + seed % 50])
    run_fuzz_input(SERVER, mutate(rng, encode_all(random_client_stream(rng))), [1 + seed % 97])
    run_fuzz_input(CLIENT, mutate(rng, encode_all(random_server_stream(rng))), [1 + seed % 89])


@pytest.mark.parametrize("seed", range(20))
def test_random_legal_streams_parse_whole(seed):
    rng = random.Random(seed)
    client_events, server_events = random_client_stream(rng), random_server_stream(rng)
    assert run_fuzz_input(SERVER, encode_all(client_events), [1 + seed]) == len(client_events)
    assert run_fuzz_input(CLIENT, encode_all(server_events), [3 + seed]) == len(server_events)


@pytest.mark.soak
def test_soak_fuzz_100k_inputs_never_crash(capsys):
    rng = random.Random(20260522)
    count, crashes = 100_000, []
    for _ in range(count):
        role, data, chunks = fuzz_case(rng)
        try:
            run_fuzz_input(role, data, chunks)
        except Exception as error:  # noqa: BLE001 - collect every crash, report them all
            crashes.append((role, data.hex(), chunks, repr(error)))
    with capsys.disabled():
        print(f"\nfuzzed {count} inputs, {len(crashes)} crashes")
    assert crashes == []
