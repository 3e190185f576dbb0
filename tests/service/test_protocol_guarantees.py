"""Guarantees docs/PROTOCOL.md states about a real daemon (issue 9, item 19).

Each test names the section it checks. Frames are written by hand (RawPeer),
so the daemon's answers are seen exactly as a client in another language
would see them: their order, their codes, their batch ids.
"""

from __future__ import annotations

import os
import pathlib
import re

import trio

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.auth import hash_token, new_token
from ringtail.service.client import Client
from ringtail.service.connection import HANDSHAKE_TIMEOUT_S
from ringtail.service.protocol import (
    CLIENT, PUBLISH_RECORD_COUNT_MAX, SERVER, Ack, Connection, End, Error, ErrorCode, Gap, Hello,
    Publish, RemoteProtocolError, StartKind, Welcome, encode_event,
)
from ringtail.service.tenants import TENANT_ID_MAX
from tests.service.conftest import RawPeer, RecordFactory, read_all, write_config

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
TENANT = 6
TIMEOUT_S = 60.0  # a hang guard, never a synchronisation


def bad_magic(records: bytes, index: int) -> bytes:
    data = bytearray(records)
    data[index * RECORD_SIZE_BYTES:index * RECORD_SIZE_BYTES + 4] = bytes(4)
    return bytes(data)


def wrong_tenant(records: bytes, index: int, tenant_id: int = TENANT + 1) -> bytes:
    data = bytearray(records)
    offset = index * RECORD_SIZE_BYTES + 16
    data[offset:offset + 4] = tenant_id.to_bytes(4, "little")
    return bytes(data)


def publish_frame(batch_id: int, records: bytes) -> bytes:
    """A Publish frame with any payload size (encode_event would refuse a bad one)."""
    return (len(records) + 8).to_bytes(4, "little") + b"\x03\x00\x00\x00" + \
        batch_id.to_bytes(8, "little") + records


async def welcomed(socket_path: str, tenant_id: int = TENANT, token: bytes = b"") -> RawPeer:
    peer = await RawPeer.connect(socket_path)
    await peer.send(encode_event(Hello(tenant_id, token, "guarantees")))
    welcome = await peer.read_frame()
    assert isinstance(welcome, Welcome), welcome
    return peer


def doc_text() -> str:
    return " ".join(DOC.read_text(encoding="utf-8").split())


def test_doc_states_the_handshake_timeout_the_daemon_uses():
    # Section 4.1: the value is written out, so it is checked against the constant.
    match = re.search(r"`HANDSHAKE_TIMEOUT_S` \(([\d.]+) s\)", doc_text())
    assert match, "docs/PROTOCOL.md names HANDSHAKE_TIMEOUT_S and its value"
    assert float(match[1]) == HANDSHAKE_TIMEOUT_S


def test_doc_states_the_tenant_id_range_the_daemon_uses():
    assert TENANT_ID_MAX == 0xFFFF_FFFF  # the whole u32 of Hello.tenant_id
    assert "0..4,294,967,295" in doc_text()


def test_the_codec_checks_the_size_before_the_count():
    # Section 4.3, "Which check answers", checks 2 and 3, in the codec alone.
    client, server = Connection(CLIENT), Connection(SERVER)
    server.receive_data(client.send(Hello(TENANT)))
    server.next_event()
    client.receive_data(server.send(Welcome(TENANT, 2, 0, 0, 128)))
    client.next_event()
    over_both = RECORD_SIZE_BYTES * (PUBLISH_RECORD_COUNT_MAX + 1) + 1
    server.receive_data(publish_frame(1, bytes(over_both)) + publish_frame(2, bytes(64 * 3))
                        + publish_frame(3, bytes(64 * (PUBLISH_RECORD_COUNT_MAX + 1))))
    codes = []
    for _ in range(3):
        try:
            server.next_event()
        except RemoteProtocolError as error:
            codes.append((error.code, error.batch_id, error.message.split(";")[0]))
    assert codes == [
        (ErrorCode.BAD_RECORD_SIZE, 1, f"Publish: records of {over_both} bytes is not a positive"
         " multiple of RECORD_SIZE_BYTES (64)"),
        (ErrorCode.BATCH_TOO_LARGE, 2, "Publish batch 2 carries 3 records, over the"
         " connection's publish_record_count_max (2)"),
        (ErrorCode.BATCH_TOO_LARGE, 3, "Publish: 4097 records exceed PUBLISH_RECORD_COUNT_MAX"
         " (4096)"),
    ]


async def test_answers_come_in_send_order_across_pipelined_batches_rejections_too(daemon):
    # Section 4.3: every answer, Ack or batch Error, comes in the order the
    # batches were sent, although a rejection is decided before earlier
    # batches are durable (sync = "batch": every Ack waits for its fdatasync).
    server = daemon(io="threads", sync="batch")
    factory = RecordFactory(TENANT, seed=31)
    good = [factory.records(count) for count in (5, 3, 2, 4)]
    batches = [
        publish_frame(1, good[0]),
        publish_frame(2, bad_magic(factory.records(2), 1)),
        publish_frame(3, good[1]),
        publish_frame(4, bytes(65)),  # BAD_RECORD_SIZE, refused by the codec
        publish_frame(5, wrong_tenant(factory.records(3), 0)),
        publish_frame(6, good[2]),
        publish_frame(7, factory.records(PUBLISH_RECORD_COUNT_MAX + 1)),  # BATCH_TOO_LARGE
        publish_frame(8, good[3]),
    ]
    with trio.fail_after(TIMEOUT_S):
        peer = await welcomed(server.socket_path)
        await peer.send(b"".join(batches))
        answers = [await peer.read_frame() for _ in batches]
        await peer.aclose()
    assert [answer.batch_id for answer in answers] == list(range(1, 9))
    assert answers[0] == Ack(1, 0, 4) and answers[2] == Ack(3, 5, 7)
    assert answers[5] == Ack(6, 8, 9) and answers[7] == Ack(8, 10, 13)
    assert [(answers[i].code, answers[i].fatal) for i in (1, 3, 4, 6)] == [
        (ErrorCode.BAD_RECORD_MAGIC, False), (ErrorCode.BAD_RECORD_SIZE, False),
        (ErrorCode.WRONG_TENANT, False), (ErrorCode.BATCH_TOO_LARGE, False)]


async def test_duplicate_batch_ids_are_separate_batches_each_stored_and_answered(daemon):
    # Section 4.3: the daemon does not deduplicate by batch_id.
    server = daemon(io="threads", sync="none")
    factory = RecordFactory(TENANT, seed=32)
    first, second = factory.records(3), factory.records(2)
    with trio.fail_after(TIMEOUT_S):
        peer = await welcomed(server.socket_path)
        await peer.send(encode_event(Publish(7, first)) + encode_event(Publish(7, first))
                        + encode_event(Publish(7, second)))
        answers = [await peer.read_frame() for _ in range(3)]
        await peer.aclose()
        replay = await read_all(server.socket_path, TENANT)
    assert answers == [Ack(7, 0, 2), Ack(7, 3, 5), Ack(7, 6, 7)]
    assert replay.data == first + first + second


async def test_the_first_failing_publish_check_answers(daemon, tmp_path):
    # Section 4.3, "Which check answers": codec (size, then count), then the
    # role, then the quota, then the records (first bad record; magic before
    # tenant within one record).
    publisher, reader = new_token(), new_token()
    config = write_config(tmp_path, f"""
        unix_auth = "peercred"
        create_tenants = false
        [tenants.{TENANT}]
        records_per_second = 1
        burst_records = 100
        quota_mode = "reject"
        grants = [{{ token = "{hash_token(publisher)}", roles = ["publish"] }},
                  {{ token = "{hash_token(reader)}", roles = ["subscribe"] }}]
        """)
    server = daemon(config=config, io="threads", sync="none")
    factory = RecordFactory(TENANT, seed=33)
    everything_wrong = wrong_tenant(bad_magic(factory.records(101), 0), 0)
    with trio.fail_after(TIMEOUT_S):
        peer = await welcomed(server.socket_path, token=publisher.encode())
        cases = [
            # (frame, code, record_index)
            (publish_frame(1, bytes(65)), ErrorCode.BAD_RECORD_SIZE, None),
            (publish_frame(2, bad_magic(factory.records(PUBLISH_RECORD_COUNT_MAX + 1), 0)),
             ErrorCode.BATCH_TOO_LARGE, None),
            (publish_frame(3, everything_wrong), ErrorCode.QUOTA_EXCEEDED, None),  # 101 > burst
            (publish_frame(4, bad_magic(wrong_tenant(factory.records(2), 0), 1)),
             ErrorCode.WRONG_TENANT, 0),
            (publish_frame(5, bad_magic(wrong_tenant(factory.records(2), 0), 0)),
             ErrorCode.BAD_RECORD_MAGIC, 0),
        ]
        for frame, code, record_index in cases:
            await peer.send(frame)
            answer = await peer.read_frame()
            assert isinstance(answer, Error) and (answer.code, answer.fatal) == (code, False), (
                code, answer)
            if record_index is not None:
                assert answer.record_index == record_index, answer
        await peer.aclose()
        # Without the publish role, the role is refused before quota and records
        # (fatal), but the codec's own checks still come first (not fatal).
        peer = await welcomed(server.socket_path, token=reader.encode())
        await peer.send(publish_frame(6, bytes(65)))
        answer = await peer.read_frame()
        assert (answer.code, answer.fatal) == (ErrorCode.BAD_RECORD_SIZE, False), answer
        await peer.send(publish_frame(7, everything_wrong))
        answer = await peer.read_frame()
        assert (answer.code, answer.fatal) == (ErrorCode.FORBIDDEN, True), answer
        assert await peer.read_frame() is None
        async with await Client.connect(server.socket_path, TENANT,
                                        token=reader.encode()) as client:
            events = [event async for event in client.subscribe("oldest")]
    assert events == [End(0)]  # nothing of a refused batch was stored


async def test_an_ack_may_cover_records_a_small_ring_already_evicted(daemon):
    # Section 4.4: Welcome.publish_record_count_max does not shrink with the
    # ring; a batch larger than the ring is stored in parts and acknowledged
    # whole, its first records already evicted by its last.
    server = daemon(capacity=128, io="threads", sync="none")
    records = RecordFactory(TENANT, seed=34).records(PUBLISH_RECORD_COUNT_MAX)
    with trio.fail_after(TIMEOUT_S):
        peer = await RawPeer.connect(server.socket_path)
        await peer.send(encode_event(Hello(TENANT, b"", "small-ring")))
        welcome = await peer.read_frame()
        assert (welcome.capacity, welcome.publish_record_count_max) == (
            128, PUBLISH_RECORD_COUNT_MAX)
        await peer.send(encode_event(Publish(1, records)))
        assert await peer.read_frame() == Ack(1, 0, PUBLISH_RECORD_COUNT_MAX - 1)
        await peer.aclose()
        replay = await read_all(server.socket_path, TENANT, StartKind.SEQUENCE, 0)
    oldest = replay.sequences[0]
    assert PUBLISH_RECORD_COUNT_MAX - oldest <= 128 < PUBLISH_RECORD_COUNT_MAX
    assert replay.gaps == [Gap(0, oldest - 1)]
    assert replay.data == records[oldest * RECORD_SIZE_BYTES:]


async def test_tenant_ids_span_the_whole_u32(daemon):
    # Section 4.1: any u32 is a tenant id; its ring is tenant-<id>.ring.
    server = daemon(capacity=128, io="threads", sync="none")
    with trio.fail_after(TIMEOUT_S):
        for tenant_id in (0, TENANT_ID_MAX):
            peer = await welcomed(server.socket_path, tenant_id)
            await peer.send(encode_event(Publish(1, RecordFactory(tenant_id).records(1))))
            assert await peer.read_frame() == Ack(1, 0, 0)
            await peer.aclose()
    assert {"tenant-0.ring", "tenant-4294967295.ring"} <= set(os.listdir(server.data_dir))
