"""Correctness under faults (issue 9, items 5-11), each against a real daemon process.

- 5: a filtered replay that passes nothing never holds the event loop: another
  tenant's publish is answered while it runs;
- 6: a damaged chunk hides nothing before it: the verified records, then
  STORAGE_FAILED naming the file and offset;
- 7: a subscription ended by SIGTERM or by a reload that removes its tenant
  ends between frames, with the documented Error; `ringtail tail --follow`
  prints it in one line and exits 1;
- 8: a token's expiry ends the connections that used it, at that time;
- 9: a fatal protocol error comes after the acks of every batch already read;
- 10: a half-close ends only the peer's sending side;
- 11: SIGHUP during start-up recovery is applied once ready, not fatal.

Nothing here sleeps to synchronise: orders are observed (a frame read, a log
line), and every wait is bounded by a timeout that fails the test.
"""

from __future__ import annotations

import datetime
import os
import select
import signal
import struct
import subprocess
import threading

import numpy
import pytest
import trio
import trio.testing

from ringtail.ioring import open_ring
from ringtail.ioring.format import CHUNK_RECORD_COUNT
from ringtail.ioring.record import RECORD_DTYPE, RECORD_MAGIC, RECORD_SIZE_BYTES
from ringtail.ioring.scan import inspect_ring
from ringtail.service.auth import hash_token, new_token
from ringtail.service.client import Client
from ringtail.service.config import ServeConfig
from ringtail.service.connection import ConnectionHandler
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import (Ack, End, Error, ErrorCode, Hello, Publish, Records,
                                       StartKind, Subscribe, Welcome, encode_event)
from ringtail.service.server import Daemon
from tests.service.conftest import (RINGTAIL, RawPeer, RecordFactory, frame_records, read_all,
                                   short_socket_dir, tcp_port, write_config)

TIMEOUT_S = 60.0  # any wait here fails the test past this (never a speed assertion)


def write_ring(path: str, tenant_id: int, count: int, *, capacity: int,
               marked: int | None = None) -> None:
    """A ring file holding `count` valid records of `tenant_id` (epoch 0, no
    failure fields), written directly (no daemon); record `marked`, if given,
    has epoch 7, the only one."""
    ring = open_ring(path, capacity=capacity, tenant_id=tenant_id, io="threads", sync="none")
    try:
        batch = numpy.zeros(ring.batch_record_count_max, dtype=RECORD_DTYPE)
        batch["magic"] = RECORD_MAGIC
        batch["tenant_id"] = tenant_id
        for first in range(0, count, len(batch)):
            records = batch[:min(len(batch), count - first)].copy()
            records["timestamp_ns"] = numpy.arange(first, first + len(records)) + 1
            if marked is not None and first <= marked < first + len(records):
                records["epoch"][marked - first] = 7
            ring.append(records.tobytes())
    finally:
        ring.close()


def has_bytes_waiting(peer: RawPeer) -> bool:
    """Whether the daemon already wrote something this peer has not read (a
    readiness poll that never waits)."""
    if peer.buffer:
        return True
    readable, _, _ = select.select([peer.stream.socket.fileno()], [], [], 0)
    return bool(readable)


# -- item 5 ------------------------------------------------------------------------------

REPLAY_RECORD_COUNT = 2_000_000


async def test_a_replay_that_passes_nothing_leaves_other_tenants_answered(daemon, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # 2 M records of tenant 1; only record 0 passes the filter (epoch 7), so
    # after its frame the replay reads ~2 M records that send nothing.
    await trio.to_thread.run_sync(lambda: write_ring(
        os.fspath(data_dir / "tenant-1.ring"), 1, REPLAY_RECORD_COUNT,
        capacity=1 << 21, marked=0))
    server = daemon(capacity=1024, sync="none", io="threads", data_dir=os.fspath(data_dir))
    with trio.fail_after(TIMEOUT_S):
        subscriber = await RawPeer.connect(server.socket_path)
        await subscriber.hello(1)
        await subscriber.send(encode_event(Subscribe(StartKind.OLDEST, epoch_min=7,
                                                     epoch_max=7)))
        first = await subscriber.read_frame()
        assert isinstance(first, Records) and [s for s, _ in frame_records(first)] == [0]
        # The replay is running now; another tenant publishes one record.
        async with await Client.connect(server.socket_path, 2) as publisher:
            ack = await publisher.publish(RecordFactory(2).records(1))
        assert (ack.first_sequence, ack.last_sequence) == (0, 0)
        # The ack came while the replay was still reading: its End was not
        # sent yet (before the fix the loop was held until the replay ended,
        # so End was always waiting here first).
        assert not has_bytes_waiting(subscriber), "the replay held the loop until it ended"
        assert await subscriber.read_frame() == End(REPLAY_RECORD_COUNT)
        await subscriber.aclose()


# -- item 6 ------------------------------------------------------------------------------

DAMAGED_SEQUENCE = 500


async def test_a_damaged_chunk_hides_none_of_the_records_before_it(daemon, tmp_path):
    server = daemon(capacity=4096, sync="batch", io="threads")
    factory = RecordFactory(1)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 1) as publisher:
            published = factory.records(1000)
            for first in range(0, 1000, 100):
                await publisher.publish(published[first * RECORD_SIZE_BYTES:
                                                  (first + 100) * RECORD_SIZE_BYTES])
        # Flip one byte of record 500 on disk (a real write to the file the
        # daemon reads: the page cache is shared).
        offset = record_offset(server.ring_path(1), DAMAGED_SEQUENCE) + 20
        fd = os.open(server.ring_path(1), os.O_RDWR)
        try:
            (byte,) = os.pread(fd, 1, offset)
            os.pwrite(fd, bytes([byte ^ 0x01]), offset)
        finally:
            os.close(fd)
        damaged_chunk_first = DAMAGED_SEQUENCE // CHUNK_RECORD_COUNT * CHUNK_RECORD_COUNT
        for start in (0, 100, damaged_chunk_first - 1):
            peer = await RawPeer.connect(server.socket_path)
            await peer.hello(1)
            await peer.send(encode_event(Subscribe(StartKind.SEQUENCE, start)))
            frames = await peer.frames_until_closed()
            received = [pair for frame in frames if isinstance(frame, Records)
                        for pair in frame_records(frame)]
            # Every record before the damaged chunk, as published, in order.
            assert [s for s, _ in received] == list(range(start, damaged_chunk_first))
            assert b"".join(r for _, r in received) == published[
                start * RECORD_SIZE_BYTES:damaged_chunk_first * RECORD_SIZE_BYTES]
            error = frames[-1]
            assert isinstance(error, Error) and error.code == ErrorCode.STORAGE_FAILED, frames[-1]
            chunk_offset = record_offset(server.ring_path(1), damaged_chunk_first)
            assert server.ring_path(1) in error.message
            assert f"at byte offset {chunk_offset}" in error.message, error.message
            await peer.aclose()


def record_offset(path: str, sequence: int) -> int:
    """The file offset of `sequence`'s record (from the file's own layout)."""
    return inspect_ring(path).layout.record_offset(sequence)


# -- item 11 -----------------------------------------------------------------------------

# Rings recovered at start-up: enough that recovery takes a while for real
# (~0.75 s for 300 on the development machine), so a SIGHUP sent once the first ring is
# logged lands before "ringtail ready".
STARTUP_RING_COUNT = 300


async def test_sighup_during_start_up_recovery_is_applied_once_ready(daemon, tmp_path):
    data_dir = tmp_path / "many"

    def make_rings() -> None:
        data_dir.mkdir()
        for tenant_id in range(STARTUP_RING_COUNT):
            open_ring(os.fspath(data_dir / f"tenant-{tenant_id}.ring"), capacity=1024,
                      tenant_id=tenant_id, io="threads", sync="none").close()

    await trio.to_thread.run_sync(make_rings)
    config = write_config(tmp_path, "create_tenants = true\n")
    server = daemon(sync="none", io="threads", data_dir=os.fspath(data_dir), config=config,
                    wait=False)
    with trio.fail_after(TIMEOUT_S):
        await server.await_stderr("tenant 0: ")  # recovering now
        assert "ringtail ready" not in server.run_stderr  # else this shows nothing
        server.send_signal(signal.SIGHUP)
        await trio.to_thread.run_sync(server.wait_ready)
        await server.await_stderr("reloaded config")
        assert server.alive
        lines = server.run_stderr.splitlines()
        # Acted on once every ring was open, never before.
        last_ring = next(i for i, line in enumerate(lines)
                         if f"tenant {STARTUP_RING_COUNT - 1}: " in line)
        received = next(i for i, line in enumerate(lines) if "received SIGHUP" in line)
        assert received > last_ring
        async with await Client.connect(server.socket_path, STARTUP_RING_COUNT - 1) as client:
            ack = await client.publish(RecordFactory(STARTUP_RING_COUNT - 1).records(1))
        assert ack.first_sequence == 0
    assert server.stop() == 0


# -- item 9 ------------------------------------------------------------------------------

PIPELINED_BATCH_COUNT = 20
PIPELINED_BATCH_RECORD_COUNT = 100


async def test_a_fatal_protocol_error_comes_after_the_acks_of_every_batch_read(daemon):
    # sync="batch": each batch waits for its fdatasync, so acks are still due
    # when the bad frame right behind them is read.
    server = daemon(capacity=8192, sync="batch", io="threads")
    factory = RecordFactory(1)
    batches = [factory.records(PIPELINED_BATCH_RECORD_COUNT)
               for _ in range(PIPELINED_BATCH_COUNT)]
    unknown_frame = struct.pack("<IHH", 0, 0xEEEE, 0)  # a frame type no version knows
    with trio.fail_after(TIMEOUT_S):
        peer = await RawPeer.connect(server.socket_path)
        await peer.hello(1)
        await peer.send(b"".join(encode_event(Publish(batch_id, batch))
                                 for batch_id, batch in enumerate(batches, 1)) + unknown_frame)
        frames = await peer.frames_until_closed()
        await peer.aclose()
        stored = await read_all(server.socket_path, 1)
    acks = [frame for frame in frames if isinstance(frame, Ack)]
    # Every batch read before the bad frame is stored, and acknowledged, in
    # order, before the fatal Error: a client resends none of them.
    assert len(stored.records) == PIPELINED_BATCH_COUNT * PIPELINED_BATCH_RECORD_COUNT
    assert [ack.batch_id for ack in acks] == list(range(1, PIPELINED_BATCH_COUNT + 1))
    assert frames[:-1] == acks
    assert isinstance(frames[-1], Error) and frames[-1].code == ErrorCode.UNKNOWN_FRAME_TYPE


# -- item 10 -----------------------------------------------------------------------------


async def test_a_subscriber_that_half_closes_still_gets_its_records_and_end(daemon):
    server = daemon(capacity=4096, sync="none", io="threads")
    records = RecordFactory(1).records(1000)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 1) as publisher:
            await publisher.publish(records)
        peer = await RawPeer.connect(server.socket_path)
        await peer.hello(1)
        await peer.send(encode_event(Subscribe(StartKind.OLDEST)))
        await peer.stream.send_eof()  # shutdown(SHUT_WR): we send nothing more
        frames = await peer.frames_until_closed()
        await peer.aclose()
    received = [pair for frame in frames if isinstance(frame, Records)
                for pair in frame_records(frame)]
    assert [s for s, _ in received] == list(range(1000))
    assert b"".join(r for _, r in received) == records
    assert frames[-1] == End(1000)


# -- item 7 ------------------------------------------------------------------------------

# Records a backed-up follower has yet to take when its subscription is ended:
# 12.8 MB, far more than the socket buffers hold, so the daemon is blocked in
# a send when the stop comes.
BACKLOG_RECORD_COUNT = 200_000


async def backed_up_follower(socket_path: str, tenant_id: int) -> tuple[RawPeer, int]:
    """A follower that took one frame of a long replay and then stops reading;
    and the sequence it expects next."""
    peer = await RawPeer.connect(socket_path)
    await peer.hello(tenant_id)
    await peer.send(encode_event(Subscribe(StartKind.OLDEST, follow=True)))
    first = await peer.read_frame()
    assert isinstance(first, Records) and first.first_sequence == 0
    return peer, first.record_count


async def whole_frames_then(peer: RawPeer) -> tuple[list[int], Error]:
    """Read to EOF (RawPeer fails on EOF inside a frame); the sequences of every
    record after the first frame, and the last frame, which must be an Error."""
    frames = await peer.frames_until_closed()
    await peer.aclose()
    sequences = [s for frame in frames if isinstance(frame, Records)
                 for s, _ in frame_records(frame)]
    assert all(isinstance(frame, Records) for frame in frames[:-1]), frames[-1]
    assert isinstance(frames[-1], Error), frames[-1]
    return sequences, frames[-1]


async def test_sigterm_ends_a_backed_up_follower_between_frames(daemon, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    await trio.to_thread.run_sync(lambda: write_ring(
        os.fspath(data_dir / "tenant-1.ring"), 1, BACKLOG_RECORD_COUNT, capacity=1 << 18))
    server = daemon(sync="none", io="threads", data_dir=os.fspath(data_dir))
    with trio.fail_after(TIMEOUT_S):
        peer, expected = await backed_up_follower(server.socket_path, 1)
        tail = await trio.lowlevel.open_process(
            [RINGTAIL, "tail", "--socket", server.socket_path, "--tenant", "1", "--follow",
             "--format", "raw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The tail's first bytes: it is following; we read nothing more of it,
        # so it blocks on its stdout and stops reading its socket.
        assert await tail.stdout.receive_some(RECORD_SIZE_BYTES)
        server.send_signal(signal.SIGTERM)
        await server.await_stderr("shutting down")
        sequences, error = await whole_frames_then(peer)
        assert error.code == ErrorCode.SHUTTING_DOWN
        assert sequences == list(range(expected, expected + len(sequences)))
        # `ringtail tail --follow`: every record it got, then one line, exit 1.
        output, messages = await drain(tail)
        assert await tail.wait() == 1
        assert len(output) % RECORD_SIZE_BYTES == 0
        assert "Traceback" not in messages
        assert len(messages.strip().splitlines()) == 1, messages
        assert "shutting down" in messages
    assert server.wait() == 0


async def drain(process: trio.Process) -> tuple[bytes, str]:
    """Everything `process` writes to stdout and stderr, until it closes both."""
    output, messages = bytearray(), bytearray()

    async def read(stream, into: bytearray) -> None:
        while data := await stream.receive_some(1 << 20):
            into += data

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, process.stdout, output)
        nursery.start_soon(read, process.stderr, messages)
    return bytes(output), messages.decode()


async def test_a_reload_that_removes_the_tenant_ends_a_backed_up_follower_between_frames(
        daemon, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    await trio.to_thread.run_sync(lambda: write_ring(
        os.fspath(data_dir / "tenant-2.ring"), 2, BACKLOG_RECORD_COUNT, capacity=1 << 18))
    tenants = "create_tenants = false\n[tenants.1]\n[tenants.2]\n"
    config = write_config(tmp_path, tenants)
    server = daemon(sync="none", io="threads", data_dir=os.fspath(data_dir), config=config)
    with trio.fail_after(TIMEOUT_S):
        peer, expected = await backed_up_follower(server.socket_path, 2)
        write_config(tmp_path, "create_tenants = false\n[tenants.1]\n")
        server.send_signal(signal.SIGHUP)
        await server.await_stderr("reloaded config")
        sequences, error = await whole_frames_then(peer)
        assert error.code == ErrorCode.UNKNOWN_TENANT
        assert sequences == list(range(expected, expected + len(sequences)))


# -- item 8 ------------------------------------------------------------------------------

# Seconds from now the expiring token is valid for: long enough for the test to
# connect, subscribe and see a live record before it expires.
TOKEN_LIFETIME_S = 3.0
EXPIRING_TOKEN, PUBLISHER_TOKEN = new_token(), new_token()


async def test_a_token_expiry_ends_its_live_connections_with_auth_failed(daemon, tmp_path):
    expires = (datetime.datetime.now(datetime.timezone.utc)
               + datetime.timedelta(seconds=TOKEN_LIFETIME_S)).replace(microsecond=0)
    until = f"expires = {expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    config = write_config(tmp_path, f"""
        tcp_listen = "127.0.0.1:0"
        tcp_plaintext = true
        [tenants.1]
        grants = [
          {{ token = "{hash_token(EXPIRING_TOKEN)}", roles = ["publish", "subscribe"], {until} }},
          {{ token = "{hash_token(PUBLISHER_TOKEN)}", roles = ["publish"] }},
        ]
        """)
    server = daemon(sync="none", io="threads", config=config)
    port = tcp_port(server)
    factory = RecordFactory(1)
    with trio.fail_after(TIMEOUT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        follower = RawPeer(stream)
        await follower.send(encode_event(Hello(1, EXPIRING_TOKEN.encode(), "faults")))
        assert isinstance(await follower.read_frame(), Welcome)
        await follower.send(encode_event(Subscribe(StartKind.LATEST, follow=True)))
        idle_publisher = await Client.connect_tcp("127.0.0.1", port, 1, token=EXPIRING_TOKEN,
                                                  plaintext=True)
        async with await Client.connect_tcp("127.0.0.1", port, 1, token=PUBLISHER_TOKEN,
                                            plaintext=True) as publisher:
            await publisher.publish(factory.records(1))
            live = await follower.read_frame()
            assert isinstance(live, Records) and live.first_sequence == 0  # following
            # At the expiry, the follower is ended: whole frames, then AUTH_FAILED.
            ended = await follower.read_frame()
            assert datetime.datetime.now(datetime.timezone.utc) >= expires
            assert isinstance(ended, Error) and ended.code == ErrorCode.AUTH_FAILED, ended
            assert "expired" in ended.message
            assert await follower.read_frame() is None  # closed
            # Records published after the expiry never reach it; and the other
            # connection that used the token was ended too.
            await publisher.publish(factory.records(1))
            with pytest.raises(RingtailError) as refused:
                await idle_publisher.publish(factory.records(1))
            assert refused.value.code == ErrorCode.AUTH_FAILED
        await idle_publisher.aclose()
        await follower.aclose()


# -- item 5: ring opening --------------------------------------------------------------------


async def test_a_hello_opens_its_ring_while_other_tenants_are_served(tmp_path):
    """In-process (the daemon's own Session, a ConnectionHandler on a memory
    stream, real ring files; another tenant over the real Unix socket): a
    Hello's tenant ring (2 M records to recover) is opened on a worker thread,
    so the loop is free meanwhile, and the other tenant is served."""
    data_dir = tmp_path / "data"
    socket_path = os.path.join(short_socket_dir(tmp_path), "open.sock")
    server = Daemon(ServeConfig(data_dir=os.fspath(data_dir), socket=socket_path,
                                io="threads", sync="none", capacity=1024))
    # Which thread opens each ring: recorded around the registry's one opening
    # method (an observation; the real open runs).
    opened_on_loop: dict[int, bool] = {}
    open_ring_itself = server.registry._open_ring

    def recording_open_ring(tenant_id: int):
        opened_on_loop[tenant_id] = threading.current_thread() is threading.main_thread()
        return open_ring_itself(tenant_id)

    server.registry._open_ring = recording_open_ring
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            # Placed after the start, so the first Hello opens it.
            await trio.to_thread.run_sync(lambda: write_ring(
                os.fspath(data_dir / "tenant-1.ring"), 1, REPLAY_RECORD_COUNT,
                capacity=1 << 21))
            async with await Client.connect(socket_path, 2) as other:
                peer_stream, handler_stream = trio.testing.memory_stream_pair()
                handler = ConnectionHandler(server.session, handler_stream)
                nursery.start_soon(handler.run)
                peer = RawPeer(peer_stream)
                await peer.send(encode_event(Hello(1, b"", "faults")))
                ack = await other.publish(RecordFactory(2).records(1))
                assert ack.first_sequence == 0
                welcome = await peer.read_frame()
                assert isinstance(welcome, Welcome) and welcome.next_sequence == \
                    REPLAY_RECORD_COUNT
                assert opened_on_loop == {2: False, 1: False}, (
                    f"a Hello's ring was opened on the event loop: {opened_on_loop}")
                await peer.aclose()
            server.shutdown()


async def test_a_token_expiry_ends_its_web_tail(daemon, tmp_path):
    """The web page's tail (service/web.py) is admitted as a connection is, and
    its token's expiry ends it the same way: a `refused` event, then the end."""
    expires = (datetime.datetime.now(datetime.timezone.utc)
               + datetime.timedelta(seconds=TOKEN_LIFETIME_S)).replace(microsecond=0)
    until = f"expires = {expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    config = write_config(tmp_path, f"""
        http_listen = "127.0.0.1:0"
        [tenants.7]
        capacity = 1024
        grants = [
          {{ token = "{hash_token(EXPIRING_TOKEN)}", roles = ["subscribe"], {until} }},
        ]
        """)
    server = daemon(sync="none", io="threads", config=config)
    host, port = server.run_stderr.split("metrics listening on http://", 1)[1].split()[0] \
        .rsplit(":", 1)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 7) as publisher:
            await publisher.publish(RecordFactory(7).records(1))
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"GET /api/tenants/7/records HTTP/1.1\r\nHost: {host}\r\n"
                              f"Authorization: Bearer {EXPIRING_TOKEN}\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):  # the stream ends after its refusal
            data += chunk
        await stream.aclose()
    assert datetime.datetime.now(datetime.timezone.utc) >= expires
    assert b"event: records" in data  # it was tailing
    refused = data[data.index(b"event: refused"):].split(b"\n\n")[0]
    assert b"expired" in refused and b'"status":401' in refused, refused
