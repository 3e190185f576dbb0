"""The `ringtail` command line against a real daemon (DESIGN.md, Command line):
exit status 0 success, 1 operational failure, 2 usage error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess

import pytest

from ringtail.ioring.format import Layout
from ringtail.ioring.record import FAILURE_CLASS_NAMES
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX
from tests.ioring.conftest import flip_byte
from tests.service.conftest import RINGTAIL, RecordFactory, run_cli, split_records

TENANT = 21
COMMAND_TIMEOUT_S = 60
VRRL_HEADER = struct.Struct("<8sIIQQ")


def ringtail(*args: str, input: bytes = b"", cwd: str | None = None
             ) -> subprocess.CompletedProcess:
    """`ringtail ARGS` in this process: run_cli calls the console script's entry point
    (cli.main, whose return value the script exits with), so the exit status and the
    output are the command's own, without a Python start-up per call. The tests of
    the process itself (`serve`, signals, the working directory) use `ringtail_process`."""
    return run_cli(*args, input=input, cwd=cwd)


def ringtail_process(*args: str, input: bytes = b"", cwd: str | None = None
                     ) -> subprocess.CompletedProcess:
    """`ringtail ARGS` as its own process, through the console script."""
    return subprocess.run([RINGTAIL, *args], input=input, capture_output=True,
                          timeout=COMMAND_TIMEOUT_S, cwd=cwd)


def publish_raw(socket_path: str, tenant_id: int, data: bytes) -> subprocess.CompletedProcess:
    return ringtail("publish", "--raw", "--tenant", str(tenant_id), "--socket", socket_path,
                    input=data)


def tail(socket_path: str, tenant_id: int, fmt: str, *more: str) -> subprocess.CompletedProcess:
    result = ringtail("tail", "--format", fmt, "--tenant", str(tenant_id),
                      "--socket", socket_path, *more)
    assert result.returncode == 0, result.stderr.decode()
    return result


def acked_range(result: subprocess.CompletedProcess) -> tuple[int, int, int]:
    assert result.returncode == 0, result.stderr.decode()
    match = re.fullmatch(rb"acknowledged (\d+) records: sequences (\d+)\.\.(\d+)\n",
                         result.stdout)
    assert match, result.stdout
    return tuple(int(group) for group in match.groups())


def test_raw_publish_and_raw_tail_round_trip_byte_identical(daemon):
    server = daemon()
    factory = RecordFactory(TENANT, seed=31)
    first = factory.records(PUBLISH_RECORD_COUNT_MAX + 904)  # two publish batches
    second = factory.records(300)
    assert acked_range(publish_raw(server.socket_path, TENANT, first)) == (5000, 0, 4999)
    assert acked_range(publish_raw(server.socket_path, TENANT, second)) == (300, 5000, 5299)

    assert tail(server.socket_path, TENANT, "raw").stdout == first + second
    assert tail(server.socket_path, TENANT, "raw", "--from", "4990").stdout == (
        (first + second)[4990 * 64:])
    assert tail(server.socket_path, TENANT, "raw", "--from", "latest").stdout == b""


def test_json_tail_decodes_every_field(daemon):
    server = daemon()
    factory = RecordFactory(TENANT, seed=32)
    records = [factory.slot_record(failure_class=failure_class % 7,
                                   output_digest=0x0123_4567_89AB_CDEF * (failure_class % 2))
               for failure_class in range(14)]
    acked_range(publish_raw(server.socket_path, TENANT, b"".join(r.encode() for r in records)))
    lines = tail(server.socket_path, TENANT, "json").stdout.decode().splitlines()
    assert len(lines) == len(records)
    for sequence, (line, record) in enumerate(zip(lines, records)):
        decoded = json.loads(line)
        assert decoded == {
            "sequence": sequence,
            "magic": "0xdeadbeef",
            "timestamp_ns": record.timestamp_ns,
            "slot_idx": record.slot_idx,
            "tenant_id": TENANT,
            "opcode": record.opcode,
            "args": list(record.args),
            "epoch": record.epoch,
            "slot_status": record.slot_status,
            "failure_class": FAILURE_CLASS_NAMES.get(record.failure_class, "unclassified"),
            "backend_code": record.backend_code,
            "output_digest": f"{record.output_digest:016x}",
        }
    names = [json.loads(line)["failure_class"] for line in lines[:7]]
    assert names == ["none", "device_loss", "transient_queue", "program_bug", "unclassified",
                     "unclassified", "unclassified"]
    assert json.loads(lines[1])["output_digest"] == "0123456789abcdef"


def flip_record_byte(path: str, capacity: int, sequence: int) -> None:
    flip_byte(path, Layout(capacity).record_offset(sequence) + 33, 0x40)


def test_verify_passes_a_healthy_data_dir_and_fails_after_a_flipped_byte(daemon):
    capacity = 1024
    server = daemon(capacity=capacity)
    factory = RecordFactory(TENANT, seed=33)
    acked_range(publish_raw(server.socket_path, TENANT, factory.records(300)))

    healthy = ringtail("verify", server.data_dir)  # safe while the daemon runs
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert b": ok: 300 records verified" in healthy.stdout

    assert server.stop() == 0
    ring = server.ring_path(TENANT)
    flip_record_byte(ring, capacity, 10)  # a record of the oldest (full) chunk
    damaged = ringtail("verify", ring)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert b"DAMAGED" in damaged.stdout and ring.encode() in damaged.stdout
    assert ringtail("verify", server.data_dir).returncode == 1


def test_verify_fails_on_damage_in_a_chunk_a_future_batch_could_evict(daemon):
    capacity = 1024
    server = daemon(capacity=capacity)
    factory = RecordFactory(TENANT, seed=37)
    acked_range(publish_raw(server.socket_path, TENANT, factory.records(700)))
    assert server.stop() == 0
    ring = server.ring_path(TENANT)
    flip_record_byte(ring, capacity, 10)
    damaged = ringtail("verify", ring)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr


def test_inspect_prints_the_ring_header_as_a_table(daemon):
    server = daemon(capacity=512)
    factory = RecordFactory(TENANT, seed=34)
    acked_range(publish_raw(server.socket_path, TENANT, factory.records(1000)))
    result = ringtail("inspect", server.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    table = dict(re.split(r"\s{2,}", line, maxsplit=1)
                 for line in result.stdout.decode().splitlines())
    assert table["path"] == server.ring_path(TENANT)
    assert table["tenant id"] == str(TENANT)
    assert table["capacity"] == "512 records"
    assert table["next sequence"] == "1000"
    oldest = int(table["oldest sequence"])
    assert 1000 - 512 <= oldest < 1000
    assert table["retained"] == f"{1000 - oldest} records"


@pytest.mark.parametrize("argv", [
    ["publish", "--raw"],  # --tenant is required
    ["tail", "--tenant", "1", "--format", "xml"],
    ["no-such-command"],
    ["serve", "--capacity", "100", "--data-dir", "never-created"],  # not a usable capacity
], ids=["missing-tenant", "bad-format", "unknown-command", "bad-capacity"])
def test_usage_errors_exit_2(tmp_path, argv):
    # A process for `serve` (in this process a regression would serve forever)
    # and for the unknown command (argparse's exit through the console script).
    run = ringtail_process if argv[0] in ("serve", "no-such-command") else ringtail
    result = run(*argv, cwd=os.fspath(tmp_path))
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.strip(), "a usage error says what is wrong"
    assert not (tmp_path / "never-created").exists()


def test_unreachable_socket_exits_1_and_names_it(tmp_path):
    missing = os.fspath(tmp_path / "missing.sock")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(stale))  # a socket file nobody listens on
    for path in (missing, os.fspath(stale)):
        for argv in (["tail", "--tenant", "1"], ["export-vrrl", "--tenant", "1", "--out", "x"]):
            result = ringtail(*argv, "--socket", path, cwd=os.fspath(tmp_path))
            assert result.returncode == 1, result.stderr.decode()
            message = result.stderr.decode()
            assert f"cannot reach the ringtail daemon at {path}" in message
            assert "ringtail serve" in message
        result = publish_raw(path, 1, RecordFactory(1).records(1))
        assert result.returncode == 1 and path.encode() in result.stderr


def test_raw_publish_of_a_bad_record_exits_1_and_prints_the_rejection(daemon):
    server = daemon()
    factory = RecordFactory(TENANT, seed=35)
    good = factory.records(20)
    bad = split_records(factory.records(PUBLISH_RECORD_COUNT_MAX + 10))
    bad[PUBLISH_RECORD_COUNT_MAX + 7] = struct.pack("<I", 0xFEEDFACE) + bad[7][4:]
    acked_range(publish_raw(server.socket_path, TENANT, good))

    result = publish_raw(server.socket_path, TENANT, b"".join(bad))
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "rejected" in message and "BAD_RECORD_MAGIC" in message
    assert f"input record {PUBLISH_RECORD_COUNT_MAX + 7}" in message
    assert "0xfeedface" in message

    wrong_tenant = factory.records(3, tenant_id=TENANT + 1)
    result = publish_raw(server.socket_path, TENANT, wrong_tenant)
    assert result.returncode == 1 and b"WRONG_TENANT" in result.stderr

    result = publish_raw(server.socket_path, TENANT, good[:100])
    assert result.returncode == 1 and b"not a whole number" in result.stderr

    # The rejected batch was refused whole: only its first batch (all good) is there.
    stored = tail(server.socket_path, TENANT, "raw").stdout
    assert stored == good + b"".join(bad[:PUBLISH_RECORD_COUNT_MAX])


def write_vrrl(path: str, capacity: int, next_slot: int, slots: dict[int, bytes]) -> None:
    """A VRRL0001 file by the spec: 32-byte header, then capacity x 64-byte slots."""
    body = bytearray(capacity * 64)
    for slot, record in slots.items():
        body[slot * 64:(slot + 1) * 64] = record
    with open(path, "wb") as file:
        file.write(VRRL_HEADER.pack(b"VRRL0001", 1, 0, capacity, next_slot) + body)


def read_vrrl(path: str) -> tuple[tuple, list[bytes]]:
    """(header fields, records in replay order: from next_slot, once round, no empty slots)."""
    with open(path, "rb") as file:
        data = file.read()
    header = VRRL_HEADER.unpack_from(data)
    _, _, _, capacity, next_slot = header
    assert len(data) == 32 + capacity * 64
    slots = split_records(data[32:])
    order = slots[next_slot % capacity:] + slots[:next_slot % capacity]
    return header, [record for record in order if record[:4] != bytes(4)]


def test_vrrl_import_and_export_round_trip_through_the_daemon(daemon, tmp_path):
    server = daemon()
    five, six = RecordFactory(5, seed=5), RecordFactory(6, seed=6)
    capacity, next_slot = 64, 40
    slots: dict[int, bytes] = {}
    expected: dict[int, list[bytes]] = {5: [], 6: []}
    for step in range(capacity):  # replay order: slots 40..63, then 0..39
        slot = (next_slot + step) % capacity
        if step % 5 == 4:
            continue  # an empty slot (magic 0), skipped by replay
        tenant_id, factory = (5, five) if step % 3 else (6, six)
        slots[slot] = factory.record()
        expected[tenant_id].append(slots[slot])
    source = os.fspath(tmp_path / "source.vrrl")
    write_vrrl(source, capacity, next_slot, slots)

    result = ringtail("import-vrrl", source, "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    assert f"imported {len(slots)} of {len(slots)} records".encode() in result.stdout

    for tenant_id, records in expected.items():
        out = os.fspath(tmp_path / f"export-{tenant_id}.vrrl")
        result = ringtail("export-vrrl", "--tenant", str(tenant_id), "--out", out,
                          "--socket", server.socket_path)
        assert result.returncode == 0, result.stderr.decode()
        header, exported = read_vrrl(out)
        assert header == (b"VRRL0001", 1, 0, len(records), 0)
        assert exported == records

    # A smaller capacity keeps the newest records, as a vyre-runtime ring would.
    out = os.fspath(tmp_path / "export-small.vrrl")
    result = ringtail("export-vrrl", "--tenant", "5", "--out", out, "--capacity", "7",
                      "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    header, exported = read_vrrl(out)
    assert header == (b"VRRL0001", 1, 0, 7, len(expected[5]) % 7)
    assert exported == expected[5][-7:]


def test_vrrl_import_of_one_tenant_skips_and_counts_the_others(daemon, tmp_path):
    server = daemon()
    seven, eight = RecordFactory(7, seed=7), RecordFactory(8, seed=8)
    slots = {slot: (seven if slot % 2 else eight).record() for slot in range(10)}
    source = os.fspath(tmp_path / "mixed.vrrl")
    write_vrrl(source, 16, 10, slots)
    result = ringtail("import-vrrl", source, "--tenant", "7", "--socket", server.socket_path)
    assert result.returncode == 0, result.stderr.decode()
    assert b"imported 5 of 10 records" in result.stdout and b"skipped 5" in result.stdout
    assert tail(server.socket_path, 7, "raw").stdout == b"".join(
        slots[slot] for slot in range(1, 10, 2))
    assert not os.path.exists(server.ring_path(8)), "a skipped tenant is never touched"

    slots[3] = struct.pack("<I", 0x12345678) + slots[3][4:]  # a damaged slot
    write_vrrl(source, 16, 10, slots)
    result = ringtail("import-vrrl", source, "--socket", server.socket_path)
    assert result.returncode == 1
    assert b"slot 3" in result.stderr and b"0x12345678" in result.stderr


def test_commands_default_to_the_embedded_socket_in_the_working_directory(daemon, tmp_path):
    """After a plain `ringtail serve` in a directory, clients need no flags there."""
    workdir = tmp_path / "plain"
    workdir.mkdir()
    server = daemon(data_dir=os.fspath(workdir / "ringtail-data"),
                    socket_path=os.fspath(workdir / "ringtail.sock"))
    data = RecordFactory(TENANT, seed=36).records(5)
    result = ringtail_process("publish", "--raw", "--tenant", str(TENANT), input=data,
                              cwd=os.fspath(workdir))
    assert acked_range(result) == (5, 0, 4)
    result = ringtail_process("tail", "--format", "raw", "--tenant", str(TENANT),
                              cwd=os.fspath(workdir))
    assert result.returncode == 0 and result.stdout == data
    assert server.kill(signal.SIGTERM) == 0


@pytest.mark.parametrize("signum, expected", [
    (signal.SIGKILL, r"CONNECTION_LOST: the daemon at {socket} closed the connection without a "
                     r"reply \(no Error frame\): it may have crashed or been killed; see its log "
                     r"\(journalctl -u ringtail, or the stderr of `ringtail serve`\)"),
    (signal.SIGTERM, r"SHUTTING_DOWN: the daemon is shutting down; .*"),
], ids=["sigkill", "sigterm"])
def test_tail_follow_exits_1_and_says_how_the_daemon_went_away(daemon, signum, expected):
    """Killed: CONNECTION_LOST (no Error frame came). Stopped: the daemon's SHUTTING_DOWN."""
    server = daemon(io="threads")
    data = RecordFactory(TENANT, seed=37).records(1)
    acked_range(publish_raw(server.socket_path, TENANT, data))
    follower = subprocess.Popen(
        [RINGTAIL, "tail", "--follow", "--format", "raw", "--tenant", str(TENANT),
         "--socket", server.socket_path],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout.read(len(data)) == data  # it is subscribed and caught up
        server.kill(signum)
        stdout, stderr = follower.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    message = stderr.decode()
    assert follower.returncode == 1, message
    assert stdout == b""
    expected = expected.format(socket=re.escape(server.socket_path))
    assert re.fullmatch(rf"ringtail tail: {expected}\n", message), message  # no traceback
