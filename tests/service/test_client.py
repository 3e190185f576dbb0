"""The Trio Client tells an orderly stop from a crash (docs/PROTOCOL.md 6.1).

A daemon stopped with SIGTERM answers what it read, says SHUTTING_DOWN and
closes; one killed with SIGKILL just vanishes, and the client reports
CONNECTION_LOST, a code no daemon sends. Real `ringtail serve` processes
(io="threads": these tests are about connections, not the io backend) and,
for a daemon that dies in the middle of a frame, a scripted peer on a socket
pair. Nothing here sleeps to synchronise.
"""

from __future__ import annotations

import signal

import pytest
import trio

from ringtail.service import protocol
from ringtail.service.client import Client, RingtailError
from ringtail.service.protocol import (NEED_DATA, Ack, Error, ErrorCode, Hello, Publish, Records,
                                       StartKind, Welcome)
from tests.service.conftest import RecordFactory

TENANT = 23
TIMEOUT_S = 60  # a hung daemon fails the test; never a synchronisation delay
BATCH_RECORD_COUNT = 64
LOST = (r"^CONNECTION_LOST: the daemon at {peer} closed the connection without a reply "
        r"\(no Error frame\)(?: \([^)]*\))?: it may have crashed or been killed; see its log "
        r"\(journalctl -u ringtail, or the stderr of `ringtail serve`\)$")


def lost_pattern(peer: str) -> str:
    return LOST.format(peer=peer.replace(".", r"\."))


async def publish_until_it_fails(client: Client, factory: RecordFactory,
                                 acked: trio.Event) -> None:
    """Publish pipelined batches forever; `acked` is set after the first acks."""
    while True:
        await client.publish_many([factory.records(BATCH_RECORD_COUNT) for _ in range(8)])
        acked.set()


async def follow_to(events, sequence: int) -> None:
    """Read a follow subscription until `sequence` has arrived."""
    async for event in events:
        if isinstance(event, Records) and event.first_sequence + event.record_count > sequence:
            return


async def test_client_publishing_to_a_killed_daemon_gets_connection_lost(daemon):
    server = daemon(io="threads")
    factory = RecordFactory(TENANT, seed=1)
    acked = trio.Event()

    async def kill_after_the_first_acks() -> None:
        await acked.wait()
        await trio.to_thread.run_sync(server.kill)

    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_after_the_first_acks)
                with pytest.raises(RingtailError, match=lost_pattern(server.socket_path)) as caught:
                    await publish_until_it_fails(client, factory, acked)
    assert caught.value.code == ErrorCode.CONNECTION_LOST and caught.value.fatal
    assert server.returncode == -signal.SIGKILL


async def test_client_following_a_killed_daemon_gets_connection_lost(daemon):
    server = daemon(io="threads")
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as publisher:
            ack = await publisher.publish(RecordFactory(TENANT, seed=2).records(3))
        async with await Client.connect(server.socket_path, TENANT) as follower:
            events = follower.subscribe(StartKind.OLDEST, follow=True)
            await follow_to(events, ack.last_sequence)  # subscribed and caught up
            await trio.to_thread.run_sync(server.kill)
            with pytest.raises(RingtailError, match=lost_pattern(server.socket_path)) as caught:
                async for event in events:
                    raise AssertionError(f"nothing was published, yet {event!r}")
    assert caught.value.code == ErrorCode.CONNECTION_LOST


async def test_client_sending_to_a_killed_daemon_gets_connection_lost(daemon):
    """The send fails (EPIPE) and the client finds no Error frame behind it."""
    server = daemon(io="threads")
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as client:
            await trio.to_thread.run_sync(server.kill)
            with pytest.raises(RingtailError, match=lost_pattern(server.socket_path)) as caught:
                await client.publish(RecordFactory(TENANT, seed=3).records(1))
    assert caught.value.code == ErrorCode.CONNECTION_LOST


async def test_sigterm_gives_publishing_and_following_clients_shutting_down(daemon):
    server = daemon(io="threads")
    factory = RecordFactory(TENANT, seed=4)
    acked = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as publisher, \
                await Client.connect(server.socket_path, TENANT) as follower:
            ack = await publisher.publish(factory.records(1))
            events = follower.subscribe(StartKind.OLDEST, follow=True)
            await follow_to(events, ack.last_sequence)

            async def stop_after_the_first_acks() -> None:
                await acked.wait()
                server.send_signal(signal.SIGTERM)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_after_the_first_acks)
                with pytest.raises(RingtailError, match="^SHUTTING_DOWN: ") as published:
                    await publish_until_it_fails(publisher, factory, acked)
            with pytest.raises(RingtailError, match="^SHUTTING_DOWN: ") as followed:
                async for event in events:
                    assert isinstance(event, Records), event  # the storm's records, live
        assert await server.await_exit() == 0, server.run_stderr
    assert published.value.code == followed.value.code == ErrorCode.SHUTTING_DOWN


async def test_client_sending_after_an_orderly_stop_reports_shutting_down(daemon):
    """The send fails (EPIPE), but the daemon said SHUTTING_DOWN before it closed:
    the client reads it and reports that, not CONNECTION_LOST."""
    server = daemon(io="threads")
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as client:
            server.send_signal(signal.SIGTERM)
            assert await server.await_exit() == 0, server.run_stderr
            with pytest.raises(RingtailError, match="^SHUTTING_DOWN: ") as caught:
                await client.publish(RecordFactory(TENANT, seed=5).records(1))
    assert caught.value.code == ErrorCode.SHUTTING_DOWN


# -- a scripted daemon on a socket pair, for what a real one does not do on demand ----------


async def scripted_daemon(stream: trio.SocketStream, answer) -> None:
    """Welcome the Hello, then send `answer(publish)` bytes for the first Publish and close."""
    connection = protocol.Connection(protocol.SERVER)
    try:
        while True:
            event = connection.next_event()
            if event is NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, Hello):
                await stream.send_all(connection.send(Welcome(event.tenant_id, 4096, 0, 0, 1024)))
            elif isinstance(event, Publish):
                await stream.send_all(answer(connection, event))
                return
    finally:
        await stream.aclose()


async def client_and_scripted_daemon(nursery: trio.Nursery, answer) -> Client:
    client_socket, daemon_socket = trio.socket.socketpair()
    nursery.start_soon(scripted_daemon, trio.SocketStream(daemon_socket), answer)
    return await Client.connect_stream(trio.SocketStream(client_socket), TENANT,
                                       peer="scripted.sock")


async def test_eof_in_the_middle_of_a_frame_is_connection_lost():
    """A daemon that dies mid-write leaves part of a frame: still CONNECTION_LOST."""
    def half_an_ack(connection, publish) -> bytes:
        return connection.send(Ack(publish.batch_id, 0, 0))[:10]

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            client = await client_and_scripted_daemon(nursery, half_an_ack)
            with pytest.raises(RingtailError, match=lost_pattern("scripted.sock")) as caught:
                await client.publish(RecordFactory(TENANT).records(1))
            await client.aclose()
    assert caught.value.code == ErrorCode.CONNECTION_LOST
    assert "(it ended 10 bytes into a frame)" in caught.value.message


async def test_an_error_frame_before_the_close_is_reported_unchanged():
    def refuse(connection, publish) -> bytes:
        return connection.send(Error(ErrorCode.SHUTTING_DOWN, "scripted stop"))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            client = await client_and_scripted_daemon(nursery, refuse)
            with pytest.raises(RingtailError, match="^SHUTTING_DOWN: scripted stop$"):
                await client.publish(RecordFactory(TENANT).records(1))
            await client.aclose()
