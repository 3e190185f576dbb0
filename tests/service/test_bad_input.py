"""Bad input over a raw Unix socket, frames built by hand.

Every case gets its documented ErrorCode in an Error frame (docs/PROTOCOL.md
section 6): a fatal one ends the connection, a rejected batch (not fatal) is
named by its batch_id and the connection goes on. Meanwhile well-behaved
publishers keep getting acks, and afterwards every acknowledged record is
intact, no rejected record was stored, and the daemon still serves.

The handshake timeout is tested in-process with `autojump_clock`, since
HANDSHAKE_TIMEOUT_S is 10 s of real time.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct

import pytest
import trio

from ringtail.service.client import Client, RingtailError
from ringtail.service.config import ServeConfig
from ringtail.service.protocol import (FRAME_SIZE_BYTES_MAX, PUBLISH_RECORD_COUNT_MAX, RECORD_INDEX_NONE,
                                       Ack, Error, ErrorCode, FrameType, Hello, Ping, Pong, Subscribe,
                                       StartKind, Welcome, encode_event)
from ringtail.service.connection import HANDSHAKE_TIMEOUT_S
from ringtail.service.server import Daemon
from tests.service.conftest import RawPeer, RecordFactory, read_all, short_socket_dir, split_records

TENANT = 9
TIMEOUT_S = 60


def frame(frame_type: int, payload: bytes, flags: int = 0, size: int | None = None) -> bytes:
    """A frame by hand: u32 size, u16 type, u16 flags, payload (size may lie)."""
    return struct.pack("<IHH", len(payload) if size is None else size, frame_type, flags) + payload


def publish_frame(batch_id: int, records: bytes) -> bytes:
    return frame(FrameType.PUBLISH, struct.pack("<Q", batch_id) + records)


def subscribe_payload(start: int = 0, start_value: int = 0, epoch_min: int = 0,
                      epoch_max: int = 0xFFFF_FFFF, opcodes: tuple[int, ...] = ()) -> bytes:
    return struct.pack(f"<BQIIH{len(opcodes)}I", start, start_value, epoch_min, epoch_max,
                       len(opcodes), *opcodes)


@dataclasses.dataclass
class Ledger:
    """Which records were acknowledged where, and which were refused."""

    acked: dict[int, bytes] = dataclasses.field(default_factory=dict)  # sequence -> record
    refused: list[bytes] = dataclasses.field(default_factory=list)  # must never be stored
    unanswered: list[bytes] = dataclasses.field(default_factory=list)  # may or may not be

    def ack(self, ack: Ack, records: bytes) -> None:
        assert ack.last_sequence - ack.first_sequence + 1 == len(records) // 64
        for offset, record in enumerate(split_records(records)):
            assert ack.first_sequence + offset not in self.acked
            self.acked[ack.first_sequence + offset] = record


async def expect_fatal(peer: RawPeer, code: ErrorCode, after_welcome: bool = False) -> Error:
    """The next frames are one Error with `code`, then the daemon closes."""
    frames = await peer.frames_until_closed()
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    error = frames[0]
    assert error.code == code, error
    assert error.fatal and error.message, error
    await peer.aclose()
    return error


async def welcomed(socket_path: str, tenant_id: int = TENANT) -> RawPeer:
    peer = await RawPeer.connect(socket_path)
    answer = await peer.hello(tenant_id)
    assert isinstance(answer, Welcome), answer
    return peer


# -- the bad-input matrix: each case its own test, amid well-behaved traffic -------------


@dataclasses.dataclass
class Scene:
    """What a case works with: the daemon's socket, a record maker, the ledger."""

    socket_path: str
    factory: RecordFactory
    ledger: Ledger


async def run_amid_traffic(server, case, seed: int) -> None:
    """Run `case(scene)` while a well-behaved publisher keeps publishing and a
    bystander connection stays open; then check the other connections were
    spared and the stored records match the ledger.

    The background publisher has an ack before the case starts and publishes
    until it gets one for a batch sent after the case ended; the bystander,
    connected before the case, gets an ack after it.
    """
    socket_path = server.socket_path
    scene = Scene(socket_path, RecordFactory(TENANT, seed=seed), Ledger())
    factory, ledger = scene.factory, scene.ledger
    case_done = trio.Event()
    first_background_ack = trio.Event()
    background_acks: list[bool] = []  # per ack: was its batch sent after the case?

    async def background_publisher() -> None:
        async with await Client.connect(socket_path, TENANT) as client:
            while True:
                sent_after_case = case_done.is_set()
                records = factory.records(20)
                ledger.ack(await client.publish(records), records)
                background_acks.append(sent_after_case)
                first_background_ack.set()
                if sent_after_case:
                    return

    async def bystander_publishes(client: Client) -> None:
        records = factory.records(5)
        ledger.ack(await client.publish(records), records)

    with trio.fail_after(TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(background_publisher)
            await first_background_ack.wait()
            async with await Client.connect(socket_path, TENANT) as bystander:
                await bystander_publishes(bystander)
                await case(scene)
                await bystander_publishes(bystander)  # open all along, still served
            case_done.set()
        assert background_acks[0] is False and background_acks[-1] is True, background_acks
        assert server.alive, f"the daemon died:\n{server.stderr}"
        replay = await read_all(socket_path, TENANT)

    stored = replay.by_sequence
    for sequence, record in ledger.acked.items():
        assert stored.get(sequence) == record, f"acknowledged sequence {sequence} changed"
    stored_records = set(stored.values())
    assert not stored_records & set(ledger.refused), "a refused record was stored"
    assert len(stored_records) == len(stored), "a record was stored twice"
    assert stored_records <= set(ledger.acked.values()) | set(ledger.unanswered)
    assert replay.sequences == list(range(replay.sequences[0], replay.sequences[-1] + 1))
    assert "Traceback" not in server.stderr, server.stderr


# -- fatal cases: one Error with the documented code, then the daemon closes -------------


async def truncated_frame_then_eof(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    records = scene.factory.records(4)
    scene.ledger.refused.extend(split_records(records))
    await peer.send(publish_frame(1, records)[:100])
    await peer.stream.send_eof()
    error = await expect_fatal(peer, ErrorCode.MALFORMED_FRAME)
    assert "closed" in error.message


async def truncated_header_then_eof(scene: Scene) -> None:
    peer = await RawPeer.connect(scene.socket_path)
    await peer.send(b"\x10\x00\x00")
    await peer.stream.send_eof()
    await expect_fatal(peer, ErrorCode.MALFORMED_FRAME)


async def oversize_declared_frame(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(FrameType.PUBLISH, b"", size=FRAME_SIZE_BYTES_MAX + 1))
    error = await expect_fatal(peer, ErrorCode.FRAME_TOO_LARGE)
    assert str(FRAME_SIZE_BYTES_MAX + 1) in error.message


async def unknown_frame_type(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(99, bytes(8)))
    error = await expect_fatal(peer, ErrorCode.UNKNOWN_FRAME_TYPE)
    assert "99" in error.message


async def wrong_protocol_version(scene: Scene) -> None:
    peer = await RawPeer.connect(scene.socket_path)
    await peer.send(encode_event(Hello(TENANT, b"", "new client", protocol_version=3)))
    await expect_fatal(peer, ErrorCode.UNSUPPORTED_VERSION)


async def publish_before_hello(scene: Scene) -> None:
    peer = await RawPeer.connect(scene.socket_path)
    records = scene.factory.records(3)
    scene.ledger.refused.extend(split_records(records))
    await peer.send(publish_frame(1, records))
    await expect_fatal(peer, ErrorCode.HELLO_REQUIRED)


async def second_hello(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(encode_event(Hello(TENANT)))
    await expect_fatal(peer, ErrorCode.UNEXPECTED_FRAME)


async def subscribe_with_inverted_epochs(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(FrameType.SUBSCRIBE, subscribe_payload(epoch_min=5, epoch_max=4)))
    await expect_fatal(peer, ErrorCode.BAD_SUBSCRIBE)


async def subscribe_with_unknown_start(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(FrameType.SUBSCRIBE, subscribe_payload(start=7)))
    await expect_fatal(peer, ErrorCode.BAD_SUBSCRIBE)


async def subscribe_with_unsorted_opcodes(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(FrameType.SUBSCRIBE, subscribe_payload(opcodes=(3, 1))))
    await expect_fatal(peer, ErrorCode.BAD_SUBSCRIBE)


async def subscribe_past_the_cursor(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    async with await Client.connect(scene.socket_path, TENANT) as probe:
        beyond = probe.welcome.next_sequence + 1_000_000
    await peer.send(frame(FrameType.SUBSCRIBE,
                          subscribe_payload(start=StartKind.SEQUENCE, start_value=beyond)))
    await expect_fatal(peer, ErrorCode.BAD_SUBSCRIBE)


async def publish_on_a_subscribed_connection(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(encode_event(Subscribe(StartKind.LATEST, follow=True)))
    records = scene.factory.records(2)
    scene.ledger.refused.extend(split_records(records))
    await peer.send(publish_frame(1, records))
    await expect_fatal(peer, ErrorCode.UNEXPECTED_FRAME)


async def good_batch_then_garbage_in_one_write(scene: Scene) -> None:
    """A fatal error with an ack still pending: the daemon must not trip over it."""
    peer = await welcomed(scene.socket_path)
    records = scene.factory.records(8)
    scene.ledger.unanswered.extend(split_records(records))  # stored or not: both are allowed
    await peer.send(publish_frame(1, records) + frame(99, bytes(8)))
    frames = await peer.frames_until_closed()
    errors = [event for event in frames if isinstance(event, Error)]
    assert [error.code for error in errors] == [ErrorCode.UNKNOWN_FRAME_TYPE], frames
    assert frames[-1] is errors[0], "nothing may follow the fatal Error"
    await peer.aclose()


async def publisher_hangs_up_with_batches_pending(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    batches = [scene.factory.records(50) for _ in range(8)]
    for batch in batches:
        scene.ledger.unanswered.extend(split_records(batch))
    await peer.send(b"".join(publish_frame(index + 1, batch)
                             for index, batch in enumerate(batches)))
    await peer.aclose()


async def ping_before_hello(scene: Scene) -> None:
    peer = await RawPeer.connect(scene.socket_path)
    await peer.send(encode_event(Ping(1)))
    await expect_fatal(peer, ErrorCode.HELLO_REQUIRED)


async def subscribe_oldest_with_a_start_value(scene: Scene) -> None:
    peer = await welcomed(scene.socket_path)
    await peer.send(frame(FrameType.SUBSCRIBE, subscribe_payload(start=0, start_value=5)))
    await expect_fatal(peer, ErrorCode.BAD_SUBSCRIBE)


async def client_gives_up_with_a_fatal_error_and_a_batch_pending(scene: Scene) -> None:
    """The client's fatal Error ends the connection: the pending ack is not sent,
    and nothing else is either (the daemon answers a fatal Error with EOF)."""
    peer = await welcomed(scene.socket_path)
    records = scene.factory.records(6)
    scene.ledger.unanswered.extend(split_records(records))
    await peer.send(publish_frame(1, records)
                    + encode_event(Error(ErrorCode.INTERNAL, "client bug", 0)))
    await peer.stream.send_eof()  # the sender of a fatal Error closes
    frames = await peer.frames_until_closed()
    assert frames == [], frames
    await peer.aclose()


FATAL_CASES = [ping_before_hello, subscribe_oldest_with_a_start_value,
               client_gives_up_with_a_fatal_error_and_a_batch_pending,
               truncated_frame_then_eof, truncated_header_then_eof, oversize_declared_frame,
               unknown_frame_type, wrong_protocol_version, publish_before_hello,
               second_hello, subscribe_with_inverted_epochs, subscribe_with_unknown_start,
               subscribe_with_unsorted_opcodes, subscribe_past_the_cursor,
               publish_on_a_subscribed_connection, good_batch_then_garbage_in_one_write,
               publisher_hangs_up_with_batches_pending]


@pytest.mark.parametrize("case", FATAL_CASES, ids=[case.__name__ for case in FATAL_CASES])
async def test_fatal_bad_input_gets_its_error_code_and_spares_other_connections(daemon, case):
    await run_amid_traffic(daemon(), case, seed=FATAL_CASES.index(case))


# -- batch rejections: (frame's records, code, record_index); not fatal ------------------


def bad_magic(factory: RecordFactory):
    records = [factory.slot_record() for _ in range(10)]
    records[3] = dataclasses.replace(records[3], magic=0xDEADBEEE)
    return b"".join(r.encode() for r in records), ErrorCode.BAD_RECORD_MAGIC, 3


def wrong_tenant(factory: RecordFactory):
    records = [factory.slot_record() for _ in range(10)]
    records[5] = dataclasses.replace(records[5], tenant_id=TENANT + 1)
    return b"".join(r.encode() for r in records), ErrorCode.WRONG_TENANT, 5


def first_bad_record_is_named_whatever_its_fault(factory: RecordFactory):
    records = [factory.slot_record() for _ in range(10)]
    records[2] = dataclasses.replace(records[2], tenant_id=TENANT + 1)
    records[6] = dataclasses.replace(records[6], magic=0)
    return b"".join(r.encode() for r in records), ErrorCode.WRONG_TENANT, 2


def not_a_multiple_of_64(factory: RecordFactory):
    return factory.records(2)[:100], ErrorCode.BAD_RECORD_SIZE, RECORD_INDEX_NONE


def no_records(factory: RecordFactory):
    return b"", ErrorCode.BAD_RECORD_SIZE, RECORD_INDEX_NONE


def too_many_records(factory: RecordFactory):
    return (factory.records(PUBLISH_RECORD_COUNT_MAX + 1), ErrorCode.BATCH_TOO_LARGE,
            RECORD_INDEX_NONE)


REJECTION_CASES = [bad_magic, wrong_tenant, first_bad_record_is_named_whatever_its_fault,
                   not_a_multiple_of_64, no_records, too_many_records]
# Each rejection alone, and all of them in a row on one connection.
REJECTION_RUNS = {case.__name__: [case] for case in REJECTION_CASES}
REJECTION_RUNS["all_in_a_row_on_one_connection"] = REJECTION_CASES


@pytest.mark.parametrize("cases", list(REJECTION_RUNS.values()), ids=list(REJECTION_RUNS))
async def test_rejected_batch_gets_its_error_code_and_the_connection_goes_on(daemon, cases):
    """Each rejection names its batch and record, and a good batch on the same
    connection right after it is acknowledged."""

    async def rejections(scene: Scene) -> None:
        factory, ledger = scene.factory, scene.ledger
        peer = await welcomed(scene.socket_path)
        for batch_id, case in enumerate(cases, start=100):
            records, code, record_index = case(factory)
            ledger.refused.extend(split_records(records[:len(records) // 64 * 64]))
            await peer.send(publish_frame(batch_id, records))
            error = await peer.read_frame()
            assert isinstance(error, Error), (case.__name__, error)
            assert (error.code, error.batch_id, error.record_index) == (
                code, batch_id, record_index), (case.__name__, error)
            assert not error.fatal and error.message
            good = factory.records(3)
            await peer.send(publish_frame(batch_id + 1000, good))
            ack = await peer.read_frame()
            assert isinstance(ack, Ack) and ack.batch_id == batch_id + 1000, ack
            ledger.ack(ack, good)
        await peer.send(encode_event(Ping(77)))
        assert await peer.read_frame() == Pong(77)
        await peer.aclose()

    await run_amid_traffic(daemon(), rejections, seed=100 + len(cases))


# -- random garbage: one fatal Error, then closed -----------------------------------------


@pytest.mark.parametrize("after_hello", [False, True], ids=["before_hello", "after_hello"])
async def test_random_garbage_gets_one_fatal_error_then_eof(daemon, after_hello):

    async def garbage_rounds(scene: Scene) -> None:
        rng = random.Random(1234 + after_hello)
        for round_index in range(10):
            garbage = rng.randbytes(rng.randint(1, 300))
            if after_hello:
                peer = await welcomed(scene.socket_path)
            else:
                peer = await RawPeer.connect(scene.socket_path)
            await peer.send(garbage)
            await peer.stream.send_eof()
            frames = await peer.frames_until_closed()
            assert len(frames) == 1 and isinstance(frames[0], Error), (
                round_index, garbage, frames)
            assert frames[0].code in ErrorCode and frames[0].fatal, (round_index, frames[0])
            await peer.aclose()

    await run_amid_traffic(daemon(), garbage_rounds, seed=200 + after_hello)


# -- the handshake timeout, in virtual time ----------------------------------------------


@pytest.fixture
async def in_process_daemon(tmp_path):
    socket_path = os.path.join(short_socket_dir(tmp_path), "in-process.sock")
    config = ServeConfig(data_dir=os.fspath(tmp_path / "data"), socket=socket_path,
                         io="threads", capacity=256)
    server = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown()


async def test_silent_connection_gets_handshake_timeout_after_the_limit(in_process_daemon,
                                                                        autojump_clock):
    socket_path = in_process_daemon.config.socket
    peer = await RawPeer.connect(socket_path)
    started = trio.current_time()
    frames = await peer.frames_until_closed()
    waited = trio.current_time() - started
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    assert frames[0].code == ErrorCode.HANDSHAKE_TIMEOUT
    assert "HANDSHAKE_TIMEOUT_S" in frames[0].message
    assert HANDSHAKE_TIMEOUT_S <= waited < HANDSHAKE_TIMEOUT_S + 1  # virtual seconds


async def test_hello_just_before_the_handshake_limit_is_welcomed(in_process_daemon,
                                                                 autojump_clock):
    socket_path = in_process_daemon.config.socket
    # A Hello opens (creates) its tenant's ring on a worker thread, and the
    # autojump clock jumps while a thread runs: open it before time is virtual.
    in_process_daemon.registry.get(3)
    peer = await RawPeer.connect(socket_path)
    await trio.sleep(HANDSHAKE_TIMEOUT_S - 1)  # virtual time: the clock jumps
    answer = await peer.hello(3)
    assert isinstance(answer, Welcome), answer
    await trio.sleep(HANDSHAKE_TIMEOUT_S * 3)  # welcomed: no timeout applies any more
    await peer.send(encode_event(Ping(5)))
    assert await peer.read_frame() == Pong(5)
    await peer.aclose()


async def test_client_stays_usable_after_a_rejected_batch_in_a_pipeline(daemon):
    """publish_many raises at the rejected batch; the batches pipelined after it
    are answered too, and the same Client publishes on with matching acks."""
    server = daemon()
    factory = RecordFactory(TENANT, seed=10)
    bad = [factory.slot_record() for _ in range(4)]
    bad[1] = dataclasses.replace(bad[1], magic=0)
    batches = [factory.records(5), b"".join(r.encode() for r in bad), factory.records(6),
               factory.records(7)]
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as client:
            with pytest.raises(RingtailError, match=r"BAD_RECORD_MAGIC \(record 1\)") as raised:
                await client.publish_many(batches)
            assert raised.value.batch_id == 2 and not raised.value.fatal
            stored_acks = raised.value.acks
            assert [a.last_sequence - a.first_sequence + 1 for a in stored_acks] == [5, 6, 7]
            later = factory.records(3)
            ack = await client.publish(later)
        replay = await read_all(server.socket_path, TENANT)
    assert replay.by_sequence[ack.first_sequence] == later[:64]
    assert ack.last_sequence - ack.first_sequence == 2
    # Batches 1, 3 and 4 were stored; the rejected one was not.
    assert replay.data == batches[0] + batches[2] + batches[3] + later
