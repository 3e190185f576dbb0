"""`ringtail restore` through a running daemon (docs/REPLAY.md, docs/PROTOCOL.md 4.13),
against real daemon processes, ring files and sockets."""

from __future__ import annotations

import os
import re

import numpy
import pytest
import trio
import trio.testing
from ringtail.ioring.record import RECORD_DTYPE, RECORD_SIZE_BYTES
from ringtail.ioring.restore import (RESTORING_SUFFIX, install_staged_ring, stage_empty_ring,
                                     verify_for_restore)
from ringtail.ioring.ring import create_ring_file, open_ring
from ringtail.ioring.snapshot import iter_snapshot_chunks
from ringtail.service.auth import hash_token
from ringtail.service.client import Client
from ringtail.service.commandline import CommandError
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import ErrorCode
from ringtail.service.snapshots import RESTORE_PIPELINE_BATCH_COUNT, restore_through_daemon

from tests.service.conftest import RINGTAIL, RecordFactory, damage_snapshot, read_all, write_config

COMMAND_TIMEOUT_S = 120
TIMEOUT_S = 120
RESTORED_LINE = re.compile(rb"restored (\d+) records \(sequences (\d+)\.\.(\d+)\) into tenant "
                           rb"(\d+) through the daemon at .+; its next sequence is (\d+)\n")


async def ringtail(*args: str, cwd: str | None = None) -> trio.CompletedProcess:
    with trio.fail_after(COMMAND_TIMEOUT_S):
        return await trio.run_process([RINGTAIL, *args], capture_stdout=True,
                                      capture_stderr=True, check=False, cwd=cwd)


async def publish(socket_path: str, tenant_id: int, data: bytes) -> None:
    step = 4096 * RECORD_SIZE_BYTES
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(socket_path, tenant_id) as client:
            await client.publish_many(data[offset:offset + step]
                                      for offset in range(0, len(data), step))


async def take_snapshot(server, tenant_id: int, out: str) -> None:
    result = await ringtail("snapshot", "--socket", server.socket_path, "--tenant",
                            str(tenant_id), "--out", out)
    assert result.returncode == 0, result.stderr.decode()


def as_tenant(records: bytes, tenant_id: int) -> bytes:
    """The records as a restore through the daemon stores them: tenant_id rewritten."""
    array = numpy.frombuffer(records, RECORD_DTYPE).copy()
    array["tenant_id"] = tenant_id
    return array.tobytes()


def snapshot_records(path: str) -> bytes:
    return b"".join(records for _, records in iter_snapshot_chunks(path))


async def test_restore_through_the_running_daemon_keeps_sequences_and_continues(
        daemon, tmp_path):
    server = daemon(io="threads", capacity=1024)
    await publish(server.socket_path, 1, RecordFactory(1, seed=3).records(2500))  # oldest 1536
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)

    result = await ringtail("restore", out, "--tenant", "2", "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    match = RESTORED_LINE.fullmatch(result.stdout)
    assert match and match.group(1, 2, 3, 4, 5) == (b"964", b"1536", b"2499", b"2", b"2500"), \
        result.stdout
    # Identical to the original (diff ignores tenant_id unless asked), at the same sequences.
    result = await ringtail("diff", "--socket", server.socket_path, "tenant:1", "tenant:2")
    assert result.returncode == 0, result.stdout
    original, restored = (await read_all(server.socket_path, 1),
                          await read_all(server.socket_path, 2))
    assert restored.sequences == original.sequences == list(range(1536, 2500))
    assert restored.data == as_tenant(original.data, 2)  # every other byte kept
    # T2 continues after the snapshot's last sequence.
    async with await Client.connect(server.socket_path, 2) as client:
        assert (client.welcome.oldest_sequence, client.welcome.next_sequence) == (1536, 2500)
        ack = await client.publish(RecordFactory(2).records(2))
    assert (ack.first_sequence, ack.last_sequence) == (2500, 2501)
    assert not os.path.exists(server.ring_path(2) + RESTORING_SUFFIX)
    # ... and after a restart (the new ring file is what the daemon recovers).
    await server.arestart()
    again = await read_all(server.socket_path, 2)
    assert again.sequences == list(range(1536, 2502))
    assert again.data[:964 * RECORD_SIZE_BYTES] == restored.data


async def test_restore_into_a_tenant_with_records_or_in_use_is_refused_and_writes_nothing(
        daemon, tmp_path):
    server = daemon(io="threads", capacity=1024)
    await publish(server.socket_path, 1, RecordFactory(1, seed=4).records(300))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    await publish(server.socket_path, 3, RecordFactory(3, seed=5).records(5))
    before = await read_all(server.socket_path, 3)

    result = await ringtail("restore", out, "--tenant", "3", "--socket", server.socket_path)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "RESTORE_REFUSED" in stderr and (
        "restore into tenant 3 refused: tenant 3 holds records 0..4; a restore goes into an "
        "empty tenant only. To start over") in stderr, stderr
    assert server.ring_path(3) in stderr  # the file to delete, with the daemon stopped
    after = await read_all(server.socket_path, 3)
    assert (after.sequences, after.data) == (before.sequences, before.data) == (
        list(range(5)), before.data)

    # An empty tenant another connection holds: refused, then allowed once it closed.
    async with await Client.connect(server.socket_path, 4) as other:
        result = await ringtail("restore", out, "--tenant", "4", "--socket",
                                server.socket_path)
        assert result.returncode == 1
        assert (b"restore into tenant 4 refused: tenant 4 has 1 other connections and 0 "
                b"subscribers; a restore needs the tenant to itself") in result.stderr
        assert (other.welcome.oldest_sequence, other.welcome.next_sequence) == (0, 0)
    result = await ringtail("restore", out, "--tenant", "4", "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    restored = await read_all(server.socket_path, 4)
    assert restored.sequences == list(range(0, 300))


async def test_while_a_restore_holds_a_tenant_other_hellos_are_refused(daemon, tmp_path):
    server = daemon(io="threads", capacity=1024)
    await publish(server.socket_path, 1, RecordFactory(1, seed=6).records(200))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    info = verify_for_restore(out)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 5) as restorer:
            await restorer.restore(info.header.first_sequence, info.header.record_count)
            with pytest.raises(RingtailError, match=r"tenant 5 is being restored") as refused:
                await Client.connect(server.socket_path, 5)
            assert refused.value.code == ErrorCode.TENANT_UNAVAILABLE
            # A Restore after the Welcome on the same connection: one per connection.
            with pytest.raises(RingtailError, match="one Restore per connection") as again:
                await restorer.restore(0, 1)
            assert again.value.code == ErrorCode.RESTORE_REFUSED
        # The connection ended: the tenant is served again (empty, at the snapshot's start).
        async with await Client.connect(server.socket_path, 5) as client:
            assert (client.welcome.oldest_sequence, client.welcome.next_sequence) == (0, 0)


async def test_a_restore_after_a_publish_on_the_same_connection_is_refused(daemon):
    server = daemon(io="threads", capacity=1024)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 6) as client:
            with pytest.raises(RingtailError) as refused:
                await client.publish(b"x" * 64)  # a bad batch: refused, nothing stored
            assert refused.value.code == ErrorCode.BAD_RECORD_MAGIC
            with pytest.raises(RingtailError, match=r"this connection sent a Publish before "
                                                    r"it") as refused:
                await client.restore(0, 10)
    assert refused.value.code == ErrorCode.RESTORE_REFUSED


async def test_a_snapshot_over_the_tenant_capacity_is_refused(daemon, tmp_path):
    config = write_config(tmp_path, """
        [tenants.9]
        capacity = 128
        """)
    server = daemon(io="threads", capacity=1024, config=config)
    await publish(server.socket_path, 1, RecordFactory(1, seed=7).records(200))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    result = await ringtail("restore", out, "--tenant", "9", "--socket", server.socket_path)
    assert result.returncode == 1
    assert (b"the snapshot's 200 records exceed the tenant's capacity of 128 records"
            in result.stderr), result.stderr
    assert (await read_all(server.socket_path, 9)).records == []


async def test_restore_needs_the_admin_role(daemon, tmp_path):
    admin_token = "rt_restore_admin_token_for_tests_only"
    uid = os.getuid()
    config = write_config(tmp_path, f"""
        unix_auth = "peercred"
        [tenants.1]
        capacity = 1024
        grants = [{{ uid = {uid}, roles = ["publish", "subscribe"] }}]
        [tenants.2]
        capacity = 1024
        grants = [{{ uid = {uid}, roles = ["publish", "subscribe"] }}]
        [tenants.3]
        capacity = 1024
        grants = [{{ token = "{hash_token(admin_token.encode())}", roles = ["admin"] }}]
        """)
    server = daemon(io="threads", config=config)
    await publish(server.socket_path, 1, RecordFactory(1, seed=8).records(100))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    result = await ringtail("restore", out, "--tenant", "2", "--socket", server.socket_path)
    assert result.returncode == 1
    assert b"FORBIDDEN" in result.stderr and b"may not admin on tenant 2" in result.stderr, \
        result.stderr
    assert (await read_all(server.socket_path, 2)).records == []
    result = await ringtail("restore", out, "--tenant", "3", "--socket", server.socket_path,
                            "--token", admin_token)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("where", ["header", "chunk", "trailer"])
async def test_a_damaged_snapshot_is_refused_before_anything_is_sent(daemon, tmp_path, where):
    server = daemon(io="threads", capacity=1024)
    await publish(server.socket_path, 1, RecordFactory(1, seed=9).records(1000))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    offset = damage_snapshot(out, where)
    result = await ringtail("restore", out, "--tenant", "2", "--socket", server.socket_path)
    assert result.returncode == 1
    found = re.search(rb"at byte offset (\d+): ", result.stderr)
    assert found and int(found.group(1)) <= offset, result.stderr
    # Nothing was sent: not even a Hello (it would have created tenant 2's ring).
    assert not os.path.exists(server.ring_path(2))


class KillingStream(trio.abc.HalfCloseableStream):
    """The client's real socket stream, which SIGKILLs the daemon once
    `kill_after_bytes` bytes went out, in the middle of a send: Publish
    batches are then in flight (sent, some maybe durable, none acked). The
    kill is real; only its moment is chosen here."""

    def __init__(self, stream, server, kill_after_bytes: int):
        self.stream, self.server, self.left = stream, server, kill_after_bytes

    async def send_all(self, data) -> None:
        if self.left is not None and len(data) > self.left:
            cut, self.left = self.left, None
            await self.stream.send_all(data[:cut])
            await trio.to_thread.run_sync(self.server.kill)
            data = data[cut:]  # the rest of the frame, after the kill
        elif self.left is not None:
            self.left -= len(data)
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.mark.parametrize("moment", ["between_ack_rounds", "batches_in_flight"])
async def test_sigkill_in_the_middle_of_a_restore_leaves_a_prefix_and_says_how_to_start_over(
        daemon, tmp_path, moment):
    capacity = 262_144
    count = 2 * RESTORE_PIPELINE_BATCH_COUNT * 4096 + 1000  # more than 1.5 rounds of acks
    server = daemon(io="threads", capacity=capacity)
    records = numpy.frombuffer(RecordFactory(1, seed=10).records(count), RECORD_DTYPE).copy()
    records["epoch"] = numpy.arange(count) // 1000  # in order, as `ringtail diff` needs
    await publish(server.socket_path, 1, records.tobytes())
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    info = verify_for_restore(out)
    acked = []

    def progress(done: int, total: int) -> None:
        acked.append(done)
        if moment == "between_ack_rounds" and len(acked) == 1:
            server.kill()  # after the first round of acks, before the next is sent

    stream = await trio.open_unix_socket(server.socket_path)
    if moment == "batches_in_flight":  # 1.5 rounds of batches sent, half a batch more
        stream = KillingStream(stream, server, (3 * RESTORE_PIPELINE_BATCH_COUNT // 2) *
                               (16 + 4096 * RECORD_SIZE_BYTES) + 2048 * RECORD_SIZE_BYTES)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect_stream(stream, 2) as client:
            with pytest.raises(CommandError, match=r"the restore stopped: CONNECTION_LOST.*"
                                                   r"to start over, stop the daemon, delete "
                                                   r"tenant 2's ring file") as stopped:
                await restore_through_daemon(client, out, info, progress)
    assert not server.alive
    assert acked == [RESTORE_PIPELINE_BATCH_COUNT * 4096]  # one round of acks seen
    assert f"tenant 2 holds the snapshot's sequences 0..{acked[0] - 1}" in str(stopped.value)

    await server.astart()
    held = await read_all(server.socket_path, 2)
    prefix = len(held.records)
    assert acked[0] <= prefix < count
    assert held.sequences == list(range(prefix))  # the snapshot's sequences, nothing else
    assert held.data == as_tenant(snapshot_records(out)[:prefix * RECORD_SIZE_BYTES], 2)

    # A re-run says what to do, and writes nothing.
    result = await ringtail("restore", out, "--tenant", "2", "--socket", server.socket_path)
    assert result.returncode == 1
    assert (f"tenant 2 holds records 0..{prefix - 1}; a restore goes into an empty tenant "
            f"only. To start over (a restore cut short leaves a prefix): stop the daemon, "
            f"delete {server.ring_path(2)}, start it and restore again").encode() \
        in result.stderr, result.stderr
    # Following it works: the whole snapshot, identical to the original.
    assert server.stop() == 0
    os.unlink(server.ring_path(2))
    await server.astart()
    result = await ringtail("restore", out, "--tenant", "2", "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    result = await ringtail("diff", "--socket", server.socket_path, "tenant:1", "tenant:2")
    assert result.returncode == 0, result.stdout


def test_a_crash_between_staging_and_the_rename_leaves_the_old_empty_ring(tmp_path):
    """The file steps a restore through the daemon takes (tenants.replace_empty_ring),
    stopped after each one as a SIGKILL would: the ring path always holds a
    complete ring (old or new, both empty), and a staged file left behind is
    replaced by the next restore."""
    ring_path = os.fspath(tmp_path / "tenant-2.ring")
    create_ring_file(ring_path, 128, 2)
    staged = stage_empty_ring(ring_path, 128, 2, first_sequence=640)
    with open_ring(ring_path, tenant_id=2, io="threads") as ring:  # "killed" before the rename
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 0)
    staged = stage_empty_ring(ring_path, 128, 2, first_sequence=1280)  # the next restore
    install_staged_ring(staged, ring_path)
    assert not os.path.exists(staged)
    with open_ring(ring_path, tenant_id=2, io="threads") as ring:
        assert (ring.oldest_sequence, ring.next_sequence, ring.capacity) == (1280, 1280, 128)


async def test_an_ack_at_other_sequences_than_the_snapshots_stops_the_restore(tmp_path):
    """A daemon never stores a restore's batch elsewhere (the tenant is the restore's
    alone), so this fault cannot be made with a real one: the peer here is a
    hand-driven server Connection over an in-memory stream that acks the second
    batch one sequence late. The real client code must stop and name both ranges."""
    from ringtail.ioring.snapshot import new_header, write_snapshot
    from ringtail.service import protocol
    from ringtail.service.protocol import Ack, Publish, Restore, Welcome

    records = RecordFactory(1, seed=11).records(5000)
    out = os.fspath(tmp_path / "one.snap")
    write_snapshot(out, new_header(1, 640, 5000), [records])
    info = verify_for_restore(out)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = protocol.Connection(protocol.SERVER)

    async def next_event():
        while (event := server.next_event()) is protocol.NEED_DATA:
            server.receive_data(await server_stream.receive_some(1 << 20))
        return event

    async def fake_daemon():
        assert isinstance(await next_event(), protocol.Hello)
        await server_stream.send_all(server.send(Welcome(2, 4096, 0, 0, 8192, "fake")))
        assert await next_event() == Restore(640, 5000)
        await server_stream.send_all(server.send(Welcome(2, 4096, 640, 640, 8192, "fake")))
        first = 640
        for skew in (0, 1):
            event = await next_event()
            assert isinstance(event, Publish)
            first += skew
            await server_stream.send_all(server.send(
                Ack(event.batch_id, first, first + event.record_count - 1)))
            first += event.record_count

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_daemon)
            client = await Client.connect_stream(client_stream, 2)
            with pytest.raises(CommandError, match=r"the daemon stored 904 records at sequences "
                                                   r"4737\.\.5640, expected 4736\.\.5639") as bad:
                await restore_through_daemon(client, out, info)
    assert "tenant 2 holds the snapshot's sequences 640..4735" in str(bad.value)


async def test_progress_bars_on_a_terminal_through_the_daemon(daemon, tmp_path):
    from tests.service.test_snapshot_cli import run_on_terminal
    server = daemon(io="threads", capacity=1024)
    await publish(server.socket_path, 1, RecordFactory(1, seed=12).records(900))
    out = os.fspath(tmp_path / "one.snap")
    await take_snapshot(server, 1, out)
    status, stdout, stderr = await trio.to_thread.run_sync(
        run_on_terminal, ["restore", out, "--tenant", "2", "--socket", server.socket_path])
    assert status == 0 and b"restored 900 records" in stdout and b"through the daemon" in stdout
    assert b"restore: verify [" in stderr and b"restore: restore [" in stderr, stderr
    assert stderr.count(b"100.0%") == 2, stderr


async def test_with_no_daemon_and_no_data_dir_restore_writes_nothing(tmp_path, daemon):
    # A mistyped --socket must not send the snapshot into ./ringtail-data.
    server = daemon(io="threads")
    await publish(server.socket_path, 1, RecordFactory(1, seed=3).records(10))
    out = os.fspath(tmp_path / "t.snap")
    assert (await ringtail("snapshot", "--tenant", "1", "--out", out, "--socket",
                           server.socket_path)).returncode == 0
    missing = os.fspath(tmp_path / "nothing-here.sock")
    result = await ringtail("restore", out, "--tenant", "2", "--socket", missing,
                            cwd=os.fspath(tmp_path))
    assert result.returncode == 1
    assert f"no daemon answers at {missing}: start it" in result.stderr.decode()
    assert "nothing was written" in result.stderr.decode()
    assert not os.path.exists(tmp_path / "ringtail-data")
