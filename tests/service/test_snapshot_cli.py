"""`ringtail snapshot`, `restore`, and `inspect`/`verify` of snapshots, against a
real daemon (docs/REPLAY.md)."""

from __future__ import annotations

import os
import re

import pytest
import trio
from ringtail.ioring.snapshot import iter_snapshot_chunks, verify_snapshot
from ringtail.service.client import Client

from tests.service.conftest import RINGTAIL, RecordFactory, read_all

COMMAND_TIMEOUT_S = 120
SNAPSHOT_LINE = re.compile(rb"snapshot of tenant (\d+): (\d+) records, sequences (\d+)\.\.(\d+), "
                           rb"(\d+) bytes \(([\d.]+)x compressed\) -> (.+)\n")


async def ringtail(*args: str, input: bytes = b"") -> trio.CompletedProcess:
    with trio.fail_after(COMMAND_TIMEOUT_S):
        return await trio.run_process([RINGTAIL, *args], stdin=input, capture_stdout=True,
                                      capture_stderr=True, check=False)


async def publish(socket_path: str, tenant_id: int, data: bytes) -> None:
    result = await ringtail("publish", "--raw", "--tenant", str(tenant_id), "--socket",
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
    result = await ringtail("inspect", out)
    assert result.returncode == 0
    rows = dict(re.findall(r"^(\S.*?)  +(.*)$", result.stdout.decode(), re.MULTILINE))
    assert (rows["kind"], rows["tenant id"], rows["first sequence"], rows["last sequence"],
            rows["records"]) == ("snapshot", "1", "1536", "2499", "964")
    result = await ringtail("verify", out)
    assert (result.returncode, result.stdout.decode()) == (
        0, f"{out}: ok: snapshot of tenant 1, 964 records verified in 1 chunks\n")

    # Into a tenant the running daemon has not opened: allowed.
    result = await ringtail("restore", out, "--tenant", "7", "--data-dir", server.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert b"restored 964 records (sequences 1536..2499) into tenant 7" in result.stdout
    result = await ringtail("diff", "--socket", server.socket_path, "tenant:1", "tenant:7")
    assert result.returncode == 0, result.stdout
    original, restored = (await read_all(server.socket_path, 1),
                          await read_all(server.socket_path, 7))
    assert restored.records == original.records  # same bytes under the same sequences
    # The restored tenant continues after the snapshot's last sequence.
    async with await Client.connect(server.socket_path, 7) as client:
        ack = await client.publish(RecordFactory(7).records(2))
    assert (ack.first_sequence, ack.last_sequence) == (2500, 2501)

    # Into a tenant the daemon holds open, or one with records: refused, untouched.
    result = await ringtail("restore", out, "--tenant", "1", "--data-dir", server.data_dir)
    assert result.returncode == 1
    assert b"tenant 1's ring is open in a running daemon" in result.stderr
    server.stop()
    result = await ringtail("restore", out, "--tenant", "1", "--data-dir", server.data_dir)
    assert result.returncode == 1
    assert (b"tenant 1 holds records 1536..2499; restore goes into an empty tenant only"
            in result.stderr)


@pytest.mark.parametrize("where", ["header", "chunk", "trailer"])
async def test_a_damaged_snapshot_is_refused_with_its_offset_and_nothing_is_written(
        daemon, tmp_path, where):
    server = daemon(io="threads")
    await publish(server.socket_path, 1, RecordFactory(1, seed=4).records(40_000))
    out = os.fspath(tmp_path / "one.snap")
    result = await ringtail("snapshot", "--socket", server.socket_path, "--tenant", "1",
                            "--out", out)
    assert result.returncode == 0, result.stderr.decode()
    size = os.path.getsize(out)
    offset = {"header": 40, "chunk": size // 2, "trailer": size - 10}[where]
    with open(out, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))
    data_dir = os.fspath(tmp_path / "elsewhere")
    result = await ringtail("restore", out, "--tenant", "9", "--data-dir", data_dir)
    assert result.returncode == 1
    found = re.search(rb"at byte offset (\d+): ", result.stderr)
    assert found and int(found.group(1)) <= offset, result.stderr
    assert not os.path.exists(data_dir)  # verified first: not even the directory is made
    result = await ringtail("verify", out)
    assert result.returncode == 1 and b"DAMAGED" in result.stdout


async def test_a_truncated_snapshot_is_refused_at_every_chunk_boundary(daemon, tmp_path):
    server = daemon(io="threads")
    await publish(server.socket_path, 1, RecordFactory(1, seed=5).records(40_000))
    out = os.fspath(tmp_path / "one.snap")
    assert (await ringtail("snapshot", "--socket", server.socket_path, "--tenant", "1",
                           "--out", out)).returncode == 0
    data = open(out, "rb").read()
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
        result = await ringtail("restore", truncated, "--tenant", "9", "--data-dir", data_dir)
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
        result = await ringtail("snapshot", "--socket", server.socket_path, "--tenant",
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
    trio.run(publish, server.socket_path, 1, RecordFactory(1, seed=6).records(3000))
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
