"""The daemon's basics, against a real `ringtail serve` process and its Unix socket:
tenant isolation, one sequence space per tenant shared by many connections,
sequences across restarts, the socket file (mode, a live one, a stale one),
and orderly shutdown.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import stat

import pytest
import trio

from ringtail.ioring.errors import RingFormatError
from ringtail.ioring.format import CHUNK_RECORD_COUNT, Layout
from ringtail.ioring.record import SlotRecord
from ringtail.ioring.ring import open_ring
from ringtail.service.client import Client, RingtailError
from ringtail.service.protocol import Error, ErrorCode, Gap, StartKind, Subscribe, Welcome, encode_event
from tests.service.conftest import RawPeer, RecordFactory, read_all, split_records

TIMEOUT_S = 60


async def test_each_tenant_keeps_its_records_in_its_own_ring_file(daemon):
    """A noisy tenant overflowing its ring evicts only its own records."""
    server = daemon(capacity=256, sync="none")
    quiet, noisy = RecordFactory(1, seed=1), RecordFactory(2, seed=2)
    quiet_data = quiet.records(100)
    noisy_batches = [noisy.records(150) for _ in range(14)]  # 2,100 records: 8 rings' worth
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 1) as client:
            [ack] = await client.publish_many([quiet_data])
        async with await Client.connect(server.socket_path, 2) as client:
            noisy_acks = await client.publish_many(noisy_batches)
        assert (ack.first_sequence, ack.last_sequence) == (0, 99)
        assert noisy_acks[-1].last_sequence == 2099

        quiet_replay = await read_all(server.socket_path, 1)
        noisy_replay = await read_all(server.socket_path, 2)
    assert quiet_replay.gaps == [] and quiet_replay.sequences == list(range(100))
    assert quiet_replay.data == quiet_data
    noisy_all = b"".join(noisy_batches)
    first = noisy_replay.sequences[0]
    assert first > 0 and noisy_replay.gaps == []  # OLDEST starts at the oldest retained
    assert noisy_replay.sequences == list(range(first, 2100))
    assert noisy_replay.data == noisy_all[first * 64:]

    assert server.stop() == 0
    assert sorted(os.listdir(server.data_dir)) == ["tenant-1.ring", "tenant-2.ring"]
    with open_ring(server.ring_path(1), tenant_id=1, io="threads") as ring:
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 100)
        assert ring.read(0, 100) == quiet_data
    with open_ring(server.ring_path(2), tenant_id=2, io="threads") as ring:
        stored = ring.read(ring.oldest_sequence, ring.next_sequence - ring.oldest_sequence)
        assert {SlotRecord.decode(r).tenant_id for r in split_records(stored)} == {2}
        assert stored == noisy_all[ring.oldest_sequence * 64:]
    try:
        open_ring(server.ring_path(1), tenant_id=2, io="threads").close()
    except RingFormatError as error:
        assert "belongs to tenant 1" in str(error)
    else:
        raise AssertionError("tenant 1's file opened as tenant 2's")


async def test_concurrent_connections_of_one_tenant_get_disjoint_contiguous_sequences(daemon):
    """8 pipelined publishers: every ack's range fits its batch, no two overlap,
    together they cover 0..N-1 without a hole, and each connection's acks rise."""
    server = daemon()
    factory = RecordFactory(5, seed=5)
    rng = random.Random(5)
    plans = [[factory.records(rng.randint(1, 200)) for _ in range(25)] for _ in range(8)]
    results: dict[int, list] = {}

    async def publisher(index: int) -> None:
        async with await Client.connect(server.socket_path, 5) as client:
            results[index] = await client.publish_many(plans[index], window=16)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for index in range(len(plans)):
                nursery.start_soon(publisher, index)
        replay = await read_all(server.socket_path, 5)

    expected: dict[int, bytes] = {}
    for index, acks in results.items():
        assert len(acks) == len(plans[index])
        for ack, batch in zip(acks, plans[index]):
            assert ack.last_sequence - ack.first_sequence + 1 == len(batch) // 64
            for offset, record in enumerate(split_records(batch)):
                assert ack.first_sequence + offset not in expected, "sequence given twice"
                expected[ack.first_sequence + offset] = record
        firsts = [ack.first_sequence for ack in acks]
        assert firsts == sorted(firsts), "a connection's batches were committed out of order"
    total = sum(len(batch) // 64 for plan in plans for batch in plan)
    assert sorted(expected) == list(range(total))
    assert replay.by_sequence == expected and replay.sequences == list(range(total))


async def test_sequences_never_repeat_across_orderly_and_killed_restarts(daemon):
    server = daemon(capacity=1024)
    factory = RecordFactory(3, seed=3)
    published = b""
    next_expected = 0
    for stop_signal in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        data = factory.records(37)
        with trio.fail_after(TIMEOUT_S):
            async with await Client.connect(server.socket_path, 3) as client:
                assert client.welcome.next_sequence == next_expected
                ack = await client.publish(data)
        assert (ack.first_sequence, ack.last_sequence) == (next_expected, next_expected + 36)
        published += data
        next_expected += 37
        status = await trio.to_thread.run_sync(server.kill, stop_signal)
        assert status == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
        await server.astart()
    replay = await read_all(server.socket_path, 3)
    assert replay.sequences == list(range(next_expected)) and replay.data == published


def test_socket_file_is_a_socket_with_mode_0600(daemon):
    server = daemon()
    status = os.stat(server.socket_path)
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert server.stop() == 0
    assert not os.path.exists(server.socket_path), "an orderly stop removes its socket"


async def test_second_serve_on_a_live_socket_exits_1_without_touching_the_rings(daemon):
    first = daemon()
    factory = RecordFactory(4, seed=4)
    async with await Client.connect(first.socket_path, 4) as client:
        await client.publish(factory.records(10))
    second = daemon(data_dir=first.data_dir, socket_path=first.socket_path, wait=False)
    assert await second.await_exit() == 1
    assert "another daemon is serving" in second.stderr
    # Refused before it opened (and recovered) the live daemon's ring files.
    assert "tenant 4:" not in second.stderr
    assert os.path.exists(first.socket_path)
    async with await Client.connect(first.socket_path, 4) as client:
        ack = await client.publish(factory.records(10))
    assert (ack.first_sequence, ack.last_sequence) == (10, 19)


async def test_stale_socket_of_a_killed_daemon_is_replaced_on_restart(daemon):
    server = daemon()
    factory = RecordFactory(6, seed=6)
    data = factory.records(20)
    async with await Client.connect(server.socket_path, 6) as client:
        await client.publish(data)
    assert server.kill(signal.SIGKILL) == -signal.SIGKILL
    assert stat.S_ISSOCK(os.stat(server.socket_path).st_mode), "SIGKILL leaves the socket file"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(server.socket_path)
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("nobody should be listening on the stale socket")
    finally:
        probe.close()
    await server.astart()
    replay = await read_all(server.socket_path, 6)
    assert replay.data == data


def test_sigterm_right_after_ready_is_an_orderly_stop(daemon):
    """"ringtail ready" means SIGTERM is already an orderly stop (exit 0)."""
    server = daemon(io="threads")
    for _ in range(3):
        assert server.stop() == 0, server.run_stderr
        assert "ringtail stopped" in server.run_stderr
        server.start()


async def test_shutdown_closes_a_connection_that_never_said_hello(daemon):
    """A silent peer gets SHUTTING_DOWN at once, not HANDSHAKE_TIMEOUT 10 s later."""
    server = daemon()
    silent = await RawPeer.connect(server.socket_path)
    # Handshaking on a later connection means the daemon accepted the silent one.
    async with await Client.connect(server.socket_path, 1):
        pass
    server.send_signal(signal.SIGTERM)
    frames = await silent.frames_until_closed()
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    assert frames[0].code == ErrorCode.SHUTTING_DOWN
    assert await server.await_exit() == 0
    await silent.aclose()


async def publish_then_damage(server, tenant_id: int, capacity: int, sequence: int) -> bytes:
    """Publish 6,000 records, then 10 more as the last batch on their own (recovery
    treats the last batch as possibly torn, so the damage must lie before it);
    stop the daemon, flip one byte of `sequence`'s record, start it again."""
    factory = RecordFactory(tenant_id, seed=tenant_id)
    data = factory.records(6000)
    last = factory.records(10)
    async with await Client.connect(server.socket_path, tenant_id) as client:
        await client.publish_many([data[i:i + 1000 * 64] for i in range(0, len(data), 1000 * 64)])
        await client.publish(last)
    assert server.stop() == 0
    offset = Layout(capacity).record_offset(sequence) + 20
    with open(server.ring_path(tenant_id), "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))
    await server.astart()
    return data + last


async def test_replay_over_damaged_records_is_an_error_naming_the_file_never_data(daemon):
    """A flipped byte inside the retained range: a replay over it sends every
    verified record before the damaged chunk and then STORAGE_FAILED naming the
    ring file (issue 9, item 6), never the damaged chunk; records past the
    damaged read still replay, and publishing goes on."""
    capacity = 8192
    server = daemon(capacity=capacity)
    data = await publish_then_damage(server, 8, capacity, 2000)

    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 8) as client:
            assert (client.welcome.oldest_sequence, client.welcome.next_sequence) == (0, 6010)
            received = []
            try:
                async for event in client.subscribe(StartKind.OLDEST):
                    received.append(event)
            except RingtailError as error:
                failure = error
            else:
                raise AssertionError(f"damaged records replayed without an error:\n"
                                     f"{server.run_stderr}")
        assert failure.code == ErrorCode.STORAGE_FAILED
        assert server.ring_path(8) in failure.message
        damaged_chunk_first = 2000 // CHUNK_RECORD_COUNT * CHUNK_RECORD_COUNT
        assert b"".join(event.records for event in received) == data[:damaged_chunk_first * 64]

        tail = await read_all(server.socket_path, 8, StartKind.SEQUENCE, 4096)
        assert tail.data == data[4096 * 64:]
        async with await Client.connect(server.socket_path, 8) as client:
            ack = await client.publish(RecordFactory(8, seed=99).records(5))
        assert ack.first_sequence == 6010


async def test_damage_at_the_head_of_a_cleanly_stopped_ring_is_an_error_never_a_gap(daemon):
    """Damage in the oldest chunks of a ring the daemon closed cleanly (sealed):
    no batch was in flight, so it is damage, not an eviction (issue 9, item 13;
    before, recovery dropped 0..127 as "evicted by a batch in flight at the
    crash"). Recovery says so, a replay over it is refused naming the file and
    offset, and no acknowledged record is dropped."""
    capacity = 8192
    server = daemon(capacity=capacity)
    data = await publish_then_damage(server, 12, capacity, 100)
    offset = Layout(capacity).record_offset(64)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 12) as client:
            assert (client.welcome.oldest_sequence, client.welcome.next_sequence) == (0, 6010)
        with pytest.raises(RingtailError) as caught:
            await read_all(server.socket_path, 12, StartKind.SEQUENCE, 0)
        tail = await read_all(server.socket_path, 12, StartKind.SEQUENCE, 128)
    assert caught.value.code == ErrorCode.STORAGE_FAILED
    assert (f"{server.ring_path(12)} at byte offset {offset}: records 64..127 failed their "
            "checksum") in caught.value.message
    assert f"DAMAGED: chunk(s) at byte offset {offset}" in server.run_stderr
    assert tail.data == data[128 * 64:]


async def test_running_out_of_file_descriptors_delays_accepts_instead_of_crashing(daemon):
    """accept() failing with EMFILE is waited out: once peers hang up, new
    connections are served again (trio's SocketListener raises it, and an
    unhandled accept error used to end the daemon)."""
    server = daemon()
    server.limit_open_files(64)
    with trio.fail_after(TIMEOUT_S):
        peers = [await RawPeer.connect(server.socket_path) for _ in range(100)]  # > 64 fds
        await server.await_stderr("cannot accept connections")
        assert server.alive, server.run_stderr
        for peer in peers:
            await peer.aclose()
        async with await Client.connect(server.socket_path, 13) as client:
            ack = await client.publish(RecordFactory(13).records(3))
    assert (ack.first_sequence, ack.last_sequence) == (0, 2)
    await server.await_stderr("accepting connections again")
    assert server.alive


async def test_a_config_without_tenant_creation_serves_only_its_tenants(daemon, tmp_path):
    config = tmp_path / "ringtail.toml"
    config.write_text("create_tenants = false\n\n[tenants.7]\ncapacity = 512\n")
    server = daemon(config=os.fspath(config))
    with trio.fail_after(TIMEOUT_S):
        stranger = await RawPeer.connect(server.socket_path)
        answer = await stranger.hello(8)
        assert isinstance(answer, Error) and answer.code == ErrorCode.UNKNOWN_TENANT, answer
        assert "tenant 8" in answer.message
        assert await stranger.read_frame() is None, "UNKNOWN_TENANT is fatal: the daemon closes"
        await stranger.aclose()
        async with await Client.connect(server.socket_path, 7) as client:
            assert client.welcome.capacity == 512
            await client.publish(RecordFactory(7).records(4))
    assert sorted(os.listdir(server.data_dir)) == ["tenant-7.ring"]


async def test_orderly_stop_ends_follow_subscriptions_and_exits_0(daemon):
    """SIGTERM and SIGINT both stop the daemon in order, with followers connected."""
    server = daemon()
    factory = RecordFactory(14, seed=14)
    for signum in (signal.SIGTERM, signal.SIGINT):
        with trio.fail_after(TIMEOUT_S):
            async with await Client.connect(server.socket_path, 14) as publisher, \
                    await Client.connect(server.socket_path, 14) as follower:
                ack = await publisher.publish(factory.records(3))
                seen = []
                events = follower.subscribe(StartKind.OLDEST, follow=True)
                async for event in events:
                    seen.extend(event.first_sequence + i for i in range(event.record_count))
                    if seen[-1] == ack.last_sequence:
                        break
                server.send_signal(signum)
                # Both connections are told before the daemon closes them (a
                # connection that just ends would be a crash: CONNECTION_LOST).
                with pytest.raises(RingtailError, match="^SHUTTING_DOWN: ") as caught:
                    async for event in events:
                        raise AssertionError(f"nothing was published, yet {event!r}")
                assert caught.value.code == ErrorCode.SHUTTING_DOWN
                closing = await publisher.next_event()
                assert isinstance(closing, Error) and closing.code == ErrorCode.SHUTTING_DOWN
        assert await server.await_exit() == 0, server.run_stderr
        assert "ringtail stopped" in server.run_stderr
        await server.astart()


async def test_orderly_stop_finishes_a_blocked_subscriber_frame_then_says_shutting_down(daemon):
    """A subscriber that has not read is not left with half a frame: it gets whole
    Records frames, then SHUTTING_DOWN (never an EOF that looks like a crash)."""
    server = daemon(capacity=65536, io="threads")
    data = RecordFactory(16, seed=16).records(20_000)  # 1.28 MB: more than the socket buffers
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 16) as publisher:
            await publisher.publish_many(split_records_into_batches(data))
        peer = await RawPeer.connect(server.socket_path)
        assert isinstance(await peer.hello(16), Welcome)
        await peer.send(encode_event(Subscribe(StartKind.OLDEST, follow=True)))
        # The first bytes say it streams; the daemon fills the socket (about
        # 300 KB) and blocks in the middle of a 262 KB frame, unread.
        peer.buffer += await peer.stream.receive_some(8)
        server.send_signal(signal.SIGTERM)
        frames = await peer.frames_until_closed()  # fails on a partial frame
        await peer.aclose()
        assert await server.await_exit() == 0, server.run_stderr
    *records, last = frames
    assert isinstance(last, Error) and last.code == ErrorCode.SHUTTING_DOWN, last
    received = b"".join(frame.records for frame in records)
    assert received == data[:len(received)] and received  # whole, in order, from 0


def split_records_into_batches(data: bytes, count: int = 4096) -> list[bytes]:
    return [data[offset:offset + count * 64] for offset in range(0, len(data), count * 64)]


async def test_subscribers_past_the_tenant_limit_are_refused(daemon):
    from ringtail.service.gate import SUBSCRIBER_COUNT_MAX
    server = daemon()
    async with await Client.connect(server.socket_path, 15) as client:
        await client.publish(RecordFactory(15).records(1))
    peers = []
    with trio.fail_after(TIMEOUT_S):
        for _ in range(SUBSCRIBER_COUNT_MAX):
            peer = await RawPeer.connect(server.socket_path)
            assert isinstance(await peer.hello(15), Welcome)
            await peer.send(encode_event(Subscribe(StartKind.OLDEST, follow=True)))
            assert (await peer.read_frame()).first_sequence == 0  # it is subscribed
            peers.append(peer)
        extra = await RawPeer.connect(server.socket_path)
        assert isinstance(await extra.hello(15), Welcome)
        await extra.send(encode_event(Subscribe(StartKind.OLDEST, follow=True)))
        frames = await extra.frames_until_closed()
        assert len(frames) == 1 and frames[0].code == ErrorCode.TOO_MANY_SUBSCRIBERS, frames
        async with await Client.connect(server.socket_path, 15) as client:  # publishing is not
            ack = await client.publish(RecordFactory(15, seed=1).records(1))  # a subscription
        assert ack.first_sequence == 1
        for peer in peers:  # every follower sees it
            assert (await peer.read_frame()).first_sequence == 1
        for peer in peers:
            await peer.aclose()
