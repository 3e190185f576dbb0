"""Exactly-once publish through a real daemon (docs/PROTOCOL.md 4.12).

A producer's resent batch is answered with its original Ack and not stored
again: on a new connection, and after the daemon was SIGKILLed and restarted
(the window is in the ring file). Version 1 clients, and version 2 clients
without a producer id, keep at-least-once. The Publisher's behaviour across
daemon kills is tested in test_publisher.py and, with 4 processes and
200,000 records, in test_fleet.py.
"""

from __future__ import annotations

import trio

from ringtail.service.client import Client
from ringtail.service.protocol import (Ack, Error, ErrorCode, Hello, Publish, Welcome,
                                       encode_event)
from tests.service.conftest import RawPeer, RecordFactory, read_all

TENANT = 3
TIMEOUT_S = 60  # a hang guard, never a synchronisation
PRODUCER = 0xFEED_0001


def ranges(acks: list[Ack]) -> list[tuple[int, int]]:
    return [(ack.first_sequence, ack.last_sequence) for ack in acks]


async def test_a_resent_batch_gets_its_original_ack_across_connections_and_a_sigkill(daemon):
    server = daemon(io="threads")
    factory = RecordFactory(TENANT, seed=5)
    batch, later, last = factory.records(10), factory.records(3), factory.records(2)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT,
                                        producer_id=PRODUCER) as client:
            assert ranges([await client.publish(batch)]) == [(0, 9)]  # producer sequence 0
        # Its Ack "was lost": the producer resends it, and a new batch, on a new connection.
        async with await Client.connect(server.socket_path, TENANT,
                                        producer_id=PRODUCER) as client:
            acks = await client.publish_many([batch, later], producer_sequences=[0, 1])
            assert ranges(acks) == [(0, 9), (10, 12)]
    server.kill()  # SIGKILL: the window must come back from the ring file
    server.start()
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT,
                                        producer_id=PRODUCER) as client:
            assert client.welcome.next_sequence == 13
            acks = await client.publish_many([batch, later, last], producer_sequences=[0, 1, 2])
            assert ranges(acks) == [(0, 9), (10, 12), (13, 14)]
            assert [ack.batch_id for ack in acks] == [1, 2, 3]  # this connection's batch ids
        # Another producer, and the same producer number from no producer, are new batches.
        async with await Client.connect(server.socket_path, TENANT,
                                        producer_id=PRODUCER + 1) as client:
            assert ranges(await client.publish_many([batch], producer_sequences=[0])) == [
                (15, 24)]
        replay = await read_all(server.socket_path, TENANT)
    assert replay.data == batch + later + last + batch


async def test_one_batch_sent_by_two_connections_of_a_producer_at_once_is_stored_once(daemon):
    # Two connections of one producer send the same batch back to back (a
    # resend racing its first copy, queued, in flight or stored): the daemon
    # stores it once and answers both with the same sequences.
    server = daemon(io="threads")
    batch = RecordFactory(TENANT, seed=6).records(50)
    with trio.fail_after(TIMEOUT_S):
        peers = [await RawPeer.connect(server.socket_path) for _ in range(2)]
        for peer in peers:
            await peer.send(encode_event(Hello(TENANT, b"", "eo", producer_id=PRODUCER)))
            assert isinstance(await peer.read_frame(), Welcome)
        frame = encode_event(Publish(7, batch, producer_sequence=41))
        await peers[0].send(frame)
        await peers[1].send(frame)
        answers = [await peer.read_frame() for peer in peers]
        for peer in peers:
            await peer.stream.aclose()
        replay = await read_all(server.socket_path, TENANT)
    assert answers == [Ack(7, 0, 49), Ack(7, 0, 49)]
    assert replay.data == batch


async def test_version_1_and_producerless_clients_keep_at_least_once(daemon):
    server = daemon(io="threads")
    batch = RecordFactory(TENANT, seed=7).records(4)
    with trio.fail_after(TIMEOUT_S):
        old = await RawPeer.connect(server.socket_path)
        await old.send(encode_event(Hello(TENANT, b"", "v1", protocol_version=1)))
        welcome = await old.read_frame()
        assert isinstance(welcome, Welcome) and welcome.protocol_version == 1
        await old.send(encode_event(Publish(1, batch)) + encode_event(Publish(1, batch)))
        assert [await old.read_frame() for _ in range(2)] == [Ack(1, 0, 3), Ack(1, 4, 7)]
        # A version 1 connection may not use version 2's flags.
        await old.send(encode_event(Publish(2, batch, producer_sequence=0)))
        refusal = await old.read_frame()
        assert isinstance(refusal, Error) and refusal.code == ErrorCode.MALFORMED_FRAME
        assert "Hello named no producer" in refusal.message
        async with await Client.connect(server.socket_path, TENANT, producer_id=0) as client:
            assert client.welcome.protocol_version == 2
            assert ranges(await client.publish_many([batch, batch])) == [(8, 11), (12, 15)]
        replay = await read_all(server.socket_path, TENANT)
    assert replay.data == batch * 4
