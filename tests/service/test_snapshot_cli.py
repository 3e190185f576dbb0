"""`ringtail snapshot`, `restore`, and `inspect`/`verify` of snapshots, against a
real daemon (docs/REPLAY.md)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import trio
from ringtail.ioring.snapshot import iter_snapshot_chunks, verify_snapshot
from ringtail.service.client import Client

from tests.service.conftest import (RINGTAIL, DaemonProcess, RecordFactory, damage_snapshot,
                                    read_all, run_cli, short_socket_dir)

COMMAND_TIMEOUT_S = 120
SNAPSHOT_LINE = re.compile(rb"snapshot of tenant (\d+): (\d+) records, sequences (\d+)\.\.(\d+), "
                           rb"(\d+) bytes \(([\d.]+)x compressed\) -> (.+)\n")


async def ringtail(*args: str, input: bytes = b"") -> trio.CompletedProcess:
    """`ringtail` as its own process, through the console script."""
    with trio.fail_after(COMMAND_TIMEOUT_S):
        return await trio.run_process([RINGTAIL, *args], stdin=input, capture_stdout=True,
                                      capture_stderr=True, check=False)


async def ringtail_here(*args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """`ringtail` in this process (run_cli: cli.main, as the console script runs it), on
    a worker thread so this test's other tasks go on; no test task prints meanwhile."""
    with trio.fail_after(COMMAND_TIMEOUT_S):
        return await trio.to_thread.run_sync(lambda: run_cli(*args, input=input))


async def publish(socket_path: str, tenant_id: int, data: bytes) -> None:
    result = await ringtail_here("publish", "--raw", "--tenant", str(tenant_id), "--socket",
                                 socket_path, input=data)
    assert result.returncode == 0, result.stderr.decode()


async def test_snapshot_restore_diff_round_trip_keeps_sequences(daemon, tmp_path):
    server = daemon(io="threads", capacity=1024)
    factory = RecordFactory(1, seed=3)
    await publish(server.socket_path, 1, factory.records(2500))  # wraps: oldest is 1536
    out = os.fspath(tmp_path / "one.snap")
    result = await ringtail("snapshot", "--socket", server.socket_path, "--tenant", "1",
                            "--out", out)
    assert result.returncode == 0, result.stderr.decode()
    match = SNAPSHOT_LINE.fullmatch(result.stdout)
    assert match and match.group(2, 3, 4) == (b"964", b"1536", b"2499"), result.stdout
    assert int(match.group(5)) == os.path.getsize(out)

    # inspect and verify accept the snapshot.
    result = await ringtail_here("inspect", out)
    assert result.returncode == 0
    rows = dict(re.findall(r"^(\S.*?)  +(.*)$", result.stdout.decode(), re.MULTILINE))
    assert (rows["kind"], rows["tenant id"], rows["first sequence"], rows["last sequence"],
            rows["records"]) == ("snapshot", "1", "1536", "2499", "964")
    result = await ringtail_here("verify", out)
    assert (result.returncode, result.stdout.decode()) == (
        0, f"{out}: ok: snapshot of tenant 1, 964 records verified in 1 chunks\n")

    # Into a tenant the running daemon has not opened: allowed.
    result = await ringtail_here("restore", out, "--tenant", "7", "--data-dir", server.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert b"restored 964 records (sequences 1536..2499) into tenant 7" in result.stdout
    result = await ringtail_here("diff", "--socket", server.socket_path, "tenant:1", "tenant:7")
    assert result.returncode == 0, result.stdout
    original, restored = (await read_all(server.socket_path, 1),
                          await read_all(server.socket_path, 7))
    assert restored.records == original.records  # same bytes under the same sequences
    # The restored tenant continues after the snapshot's last sequence.
    async with await Client.connect(server.socket_path, 7) as client:
        ack = await client.publish(RecordFactory(7).records(2))
    assert (ack.first_sequence, ack.last_sequence) == (2500, 2501)

    # Into a tenant the daemon holds open, or one with records: refused, untouched.
    result = await ringtail_here("restore", out, "--tenant", "1", "--data-dir", server.data_dir)
    assert result.returncode == 1
    assert b"tenant 1's ring is open in a running daemon" in result.stderr
    server.stop()
    # This refusal through the console script: exit status 1 from a real process.
    result = await ringtail("restore", out, "--tenant", "1", "--data-dir", server.data_dir)
    assert result.returncode == 1
    assert (b"tenant 1 holds records 1536..2499; restore goes into an empty tenant only"
            in result.stderr)


# A snapshot of three chunks (16,384, 16,384 and 7,232 records).
MULTI_CHUNK_RECORD_COUNT = 40_000


@pytest.fixture(scope="module")
def multi_chunk_snapshot(tmp_path_factory) -> bytes:
    """The bytes of a snapshot a real daemon took of MULTI_CHUNK_RECORD_COUNT records.

    One for the module: the damage and truncation tests each write their own
    copy and change only that."""
    tmp_path = tmp_path_factory.mktemp("multi-chunk")
    out = os.fspath(tmp_path / "one.snap")
    server = DaemonProcess(os.fspath(tmp_path / "data"),
                           os.path.join(short_socket_dir(tmp_path), "snap.sock"),
                           {"io": "threads"}, cwd=os.fspath(tmp_path))
    try:
        server.start()
        result = run_cli("publish", "--raw", "--tenant", "1", "--socket", server.socket_path,
                         input=RecordFactory(1, seed=4).records(MULTI_CHUNK_RECORD_COUNT))
        assert result.returncode == 0, result.stderr.decode()
        result = run_cli("snapshot", "--socket", server.socket_path, "--tenant", "1",
                         "--out", out)
        assert result.returncode == 0, result.stderr.decode()
    finally:
        server.close()
    with open(out, "rb") as file:
        return file.read()


@pytest.mark.parametrize("where", ["header", "chunk", "trailer"])
def test_a_damaged_snapshot_is_refused_with_its_offset_and_nothing_is_written(
        multi_chunk_snapshot, tmp_path, where):
    out = os.fspath(tmp_path / "one.snap")
    with open(out, "wb") as file:
        file.write(multi_chunk_snapshot)
    offset = damage_snapshot(out, where)
    data_dir = os.fspath(tmp_path / "elsewhere")
    result = run_cli("restore", out, "--tenant", "9", "--data-dir", data_dir)
    assert result.returncode == 1
    found = re.search(rb"at byte offset (\d+): ", result.stderr)
    assert found and int(found.group(1)) <= offset, result.stderr
    assert not os.path.exists(data_dir)  # verified first: not even the directory is made
    result = run_cli("verify", out)
    assert result.returncode == 1 and b"DAMAGED" in result.stdout


def test_a_truncated_snapshot_is_refused_at_every_chunk_boundary(multi_chunk_snapshot, tmp_path):
    data = multi_chunk_snapshot
    boundaries = [128]
    for _ in range(3):  # 40,000 records: chunks of 16,384, 16,384, 7,232
        size = int.from_bytes(data[boundaries[-1] + 16:boundaries[-1] + 20], "little")
        boundaries.append(boundaries[-1] + 40 + size)
    assert boundaries[-1] + 64 == len(data)
    for cut in boundaries:
        truncated = os.fspath(tmp_path / "cut.snap")
        with open(truncated, "wb") as file:
            file.write(data[:cut])
        data_dir = os.fspath(tmp_path / f"cut-{cut}")
        result = run_cli("restore", truncated, "--tenant", "9", "--data-dir", data_dir)
        assert result.returncode == 1
        assert re.search(f"at byte offset {cut}: .*the snapshot is truncated".encode(),
                         result.stderr), (cut, result.stderr)
        assert not os.path.exists(data_dir)  # verified first: not even the directory is made


async def test_a_snapshot_taken_while_four_publishers_run_holds_exactly_the_cut(
        daemon, tmp_path):
    server = daemon(io="threads", capacity=1 << 20)
    tenant = 4
    stop = trio.Event()
    started = [trio.Event() for _ in range(4)]
    out = os.fspath(tmp_path / "live.snap")

    async def publisher(index: int) -> None:
        factory = RecordFactory(tenant, seed=100 + index)
        async with await Client.connect(server.socket_path, tenant) as client:
            while True:
                await client.publish(factory.records(50))
                started[index].set()
                if stop.is_set():
                    return

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(publisher, index)
        for event in started:
            await event.wait()
        result = await ringtail_here("snapshot", "--socket", server.socket_path, "--tenant",
                                     str(tenant), "--out", out)
        stop.set()
    assert result.returncode == 0, result.stderr.decode()
    match = SNAPSHOT_LINE.fullmatch(result.stdout)
    first, last = int(match.group(3)), int(match.group(4))
    replay = await read_all(server.socket_path, tenant)
    by_sequence = replay.by_sequence
    assert replay.end.next_sequence > last + 1  # publishing went on past the cut
    chunks = list(iter_snapshot_chunks(out))
    data = b"".join(records for _, records in chunks)
    assert (first, chunks[0][0]) == (0, 0)
    assert data == b"".join(by_sequence[s] for s in range(first, last + 1))
    assert verify_snapshot(out).header.next_sequence == last + 1


def run_on_terminal(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run with stdout on a pseudo-terminal (a bar is drawn only there); (status, stdout, stderr)."""
    import pty
    import subprocess
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen([RINGTAIL, *argv], stdout=secondary, stderr=subprocess.PIPE)
        os.close(secondary)
        secondary = -1
        stdout = b""
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            stdout += data
        stderr = process.stderr.read()
        return process.wait(timeout=COMMAND_TIMEOUT_S), stdout, stderr
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)


def test_progress_bars_are_drawn_on_a_terminal_only(daemon, tmp_path):
    server = daemon(io="threads")
    # One epoch: diff needs a source's epochs (nearly) in order (EPOCH_OVERLAP_COUNT).
    trio.run(publish, server.socket_path, 1, RecordFactory(1, seed=6).records(3000, epoch=0))
    out = os.fspath(tmp_path / "bar.snap")
    status, stdout, stderr = run_on_terminal(["snapshot", "--socket", server.socket_path,
                                              "--tenant", "1", "--out", out])
    assert status == 0 and b"snapshot of tenant 1: 3000 records" in stdout
    assert b"snapshot [" in stderr and b"100.0%" in stderr
    for argv, label in ((["verify", out], b"verify bar.snap ["),
                        (["restore", out, "--tenant", "5", "--data-dir", server.data_dir],
                         b"restore: restore ["),
                        (["diff", "--socket", server.socket_path, "tenant:1", out],
                         b"diff [")):
        status, _, stderr = run_on_terminal(argv)
        assert status == 0 and label in stderr and b"100.0%" in stderr, (argv, stderr)
    # Not a terminal: no bar.
    import subprocess
    result = subprocess.run([RINGTAIL, "verify", out], capture_output=True,
                            timeout=COMMAND_TIMEOUT_S, check=False)
    assert result.returncode == 0 and result.stderr == b""
