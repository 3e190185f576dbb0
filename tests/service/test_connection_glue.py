"""The connection glue (service/connection.py) over an in-memory stream.

A real in-process Daemon (thread backend, tmp_path) serves; each test hands
one end of `trio.testing.memory_stream_pair()` to a `ConnectionHandler` and
speaks frames by hand on the other end. So the handler's own work is seen in
isolation: frames cut anywhere in the byte stream, pipelined publishes
answered in order, a fatal Error and then EOF, the handshake deadline in
virtual time (`autojump_clock`). `wait_all_tasks_blocked()` shows what the
handler did with the bytes it has so far; nothing sleeps.
"""

from __future__ import annotations

import os
import struct

import pytest
import trio
from trio.testing import memory_stream_pair, wait_all_tasks_blocked

from ringtail.service.auth import Peer
from ringtail.service.config import ServeConfig
from ringtail.service.connection import HANDSHAKE_TIMEOUT_S, ConnectionHandler, serve_connection
from ringtail.service.protocol import (Ack, End, Error, ErrorCode, Hello, Ping, Pong,
                                       Publish, Records, Subscribe, Welcome, encode_event)
from ringtail.service.server import Daemon
from tests.service.conftest import RawPeer, RecordFactory, short_socket_dir

TENANT = 6
TIMEOUT_S = 30  # a hang guard, never a synchronisation



@pytest.fixture
async def in_process_daemon(tmp_path):
    socket_path = os.path.join(short_socket_dir(tmp_path), "glue.sock")
    config = ServeConfig(data_dir=os.fspath(tmp_path / "data"), socket=socket_path,
                         io="threads", sync="none", capacity=256)
    server = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown()


@pytest.fixture
async def connect(in_process_daemon):
    """`await connect()` -> (MemoryPeer, finished): a handler runs on the other end;
    `finished` is set when its run() returns (and its end of the stream is closed)."""
    async with trio.open_nursery() as nursery:

        async def start():
            peer_stream, handler_stream = memory_stream_pair()
            handler = ConnectionHandler(in_process_daemon.session, handler_stream)
            finished = trio.Event()

            async def run():
                try:
                    await handler.run()
                finally:
                    await handler_stream.aclose()
                    finished.set()

            nursery.start_soon(run)
            return RawPeer(peer_stream), finished  # conftest's frame reader, on a memory stream

        yield start
        nursery.cancel_scope.cancel()


async def welcomed(connect) -> tuple[RawPeer, trio.Event]:
    peer, finished = await connect()
    await peer.send(encode_event(Hello(TENANT, b"", "glue-test")))
    welcome = await peer.read_frame()
    assert isinstance(welcome, Welcome) and welcome.tenant_id == TENANT, welcome
    return peer, finished


async def test_a_frame_cut_into_single_bytes_is_handled_only_once_whole(connect,
                                                                       in_process_daemon):
    with trio.fail_after(TIMEOUT_S):
        peer, _ = await welcomed(connect)
        writer = in_process_daemon.registry.get(TENANT).writer
        records = RecordFactory(TENANT, seed=1).records(3)
        frame = encode_event(Publish(41, records))
        for index in range(len(frame) - 1):
            await peer.send(frame[index:index + 1])
            await wait_all_tasks_blocked()
            statistics = writer.statistics()
            assert (statistics.records, statistics.pending_records) == (0, 0), index
        await peer.send(frame[-1:])
        assert await peer.read_frame() == Ack(41, 0, 2)


async def test_pipelined_frames_in_one_write_are_answered_in_order(connect):
    factory = RecordFactory(TENANT, seed=2)
    sizes = (5, 1, 9, 2)
    batches = [factory.records(size) for size in sizes]
    with trio.fail_after(TIMEOUT_S):
        peer, _ = await welcomed(connect)
        await peer.send(b"".join(encode_event(Publish(100 + index, batch))
                                 for index, batch in enumerate(batches))
                        + encode_event(Ping(7)))
        answers = [await peer.read_frame() for _ in range(len(sizes) + 1)]
    # The Pong may overtake acks (it needs no commit); the acks keep request order.
    assert Pong(7) in answers
    acks = [answer for answer in answers if answer != Pong(7)]
    first = 0
    expected = []
    for index, size in enumerate(sizes):
        expected.append(Ack(100 + index, first, first + size - 1))
        first += size
    assert acks == expected


async def test_a_fatal_frame_gets_one_error_then_eof_and_the_handler_returns(connect):
    with trio.fail_after(TIMEOUT_S):
        peer, finished = await welcomed(connect)
        await peer.send(struct.pack("<IHH", 8, 99, 0) + bytes(8))  # an unknown frame type
        error = await peer.read_frame()
        assert isinstance(error, Error) and error.code == ErrorCode.UNKNOWN_FRAME_TYPE, error
        assert error.fatal and "99" in error.message
        assert await peer.read_frame() is None  # EOF: nothing follows the fatal Error
        await finished.wait()


async def test_a_peer_that_closes_after_publishing_ends_the_handler_after_its_ack(connect):
    records = RecordFactory(TENANT, seed=3).records(4)
    with trio.fail_after(TIMEOUT_S):
        peer, finished = await welcomed(connect)
        await peer.send(encode_event(Publish(1, records)))
        await peer.stream.send_eof()
        assert await peer.read_frame() == Ack(1, 0, 3)  # queued batches are answered
        await finished.wait()
        assert await peer.read_frame() is None


async def test_a_silent_peer_gets_handshake_timeout_at_the_limit(connect, autojump_clock):
    peer, finished = await connect()
    started = trio.current_time()
    error = await peer.read_frame()
    waited = trio.current_time() - started
    assert isinstance(error, Error) and error.code == ErrorCode.HANDSHAKE_TIMEOUT, error
    assert "HANDSHAKE_TIMEOUT_S" in error.message
    assert HANDSHAKE_TIMEOUT_S <= waited < HANDSHAKE_TIMEOUT_S + 1  # virtual seconds
    await finished.wait()
    assert await peer.read_frame() is None


async def test_a_frame_that_comes_as_the_idle_deadline_passes_is_handled(
        connect, in_process_daemon, mock_clock):
    # The handler waits in its receive with the idle deadline set; the Ping
    # wakes it and, before it runs, virtual time passes the deadline, so
    # the idle scope is cancelled with the bytes already taken. They must be
    # handled (a Pong), not cut by the spent scope into an IDLE_TIMEOUT.
    idle_timeout_s = in_process_daemon.gate.limits().idle_timeout_s
    with trio.fail_after(TIMEOUT_S + 2 * (idle_timeout_s + 1)):  # the jumps below are in it
        peer, finished = await welcomed(connect)
        await wait_all_tasks_blocked()
        await peer.send(encode_event(Ping(5)))  # no checkpoint after the bytes are put
        mock_clock.jump(idle_timeout_s + 1)
        assert await peer.read_frame() == Pong(5)
        await wait_all_tasks_blocked()
        assert not finished.is_set()
        # The next silence is an idle timeout as usual.
        mock_clock.jump(idle_timeout_s + 1)
        error = await peer.read_frame()
        assert isinstance(error, Error) and error.code == ErrorCode.IDLE_TIMEOUT, error


@pytest.fixture
async def replay_daemon(tmp_path):
    """An in-process daemon whose tenant holds several replay reads of records."""
    socket_path = os.path.join(short_socket_dir(tmp_path), "replay.sock")
    config = ServeConfig(data_dir=os.fspath(tmp_path / "data"), socket=socket_path,
                         io="threads", sync="none", capacity=16384)
    server = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown()


async def test_a_replay_over_a_socket_sends_whole_frames_and_a_peer_gone_mid_replay_is_counted(
        replay_daemon):
    # A plain socket: Records frames go out as header + the read buffer's
    # view (sendmsg), in parts when the socket is full.
    factory = RecordFactory(TENANT, seed=13)
    data = factory.records(3 * 4096)
    tenant = replay_daemon.registry.get(TENANT)
    with trio.fail_after(TIMEOUT_S):
        for offset in range(0, len(data), 4096 * 64):
            request = await tenant.writer.publish(data[offset:offset + 4096 * 64])
            await request.done.wait()
        for hang_up in (False, True):
            counters = replay_daemon.session.counters
            before = counters.statistics()
            daemon_end, peer_end = trio.socket.socketpair()
            peer = RawPeer(trio.SocketStream(peer_end))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_connection, replay_daemon.session,
                                   trio.SocketStream(daemon_end), Peer("unix"))
                assert isinstance(await peer.hello(TENANT), Welcome)
                await peer.send(encode_event(Subscribe()))
                if hang_up:  # read a little, then go: the daemon is in a send
                    await peer.stream.receive_some(1000)
                    await peer.stream.aclose()
                else:
                    received = b""
                    while (frame := await peer.read_frame()) != End(3 * 4096):
                        assert isinstance(frame, Records), frame
                        assert frame.first_sequence * 64 == len(received)
                        received += frame.records
                    assert received == data
                    await peer.stream.aclose()
            after = counters.statistics()  # the connection has ended (its task returned)
            assert after.internal_errors == before.internal_errors
            assert after.peers_gone == before.peers_gone + hang_up
