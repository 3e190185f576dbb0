"""`ringtail verify` on real ring files (issue 9, items 14 and 18).

Every ring of a data dir gets a line, one that cannot be opened included, and
the exit status is 1 if any failed. An unusable header copy is reported with
the copy and its byte offset; `--strict` makes it fail the run.
"""

from __future__ import annotations

import os
import random
import subprocess

from ringtail.ioring.format import HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES, decode_header
from ringtail.ioring.ring import open_ring
from ringtail.ioring.record import SlotRecord
from tests.ioring.conftest import flip_byte
from tests.service.conftest import RINGTAIL

COMMAND_TIMEOUT_S = 60
CAPACITY = 512


def ringtail(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RINGTAIL, *args], capture_output=True, timeout=COMMAND_TIMEOUT_S,
                          text=True)


def write_ring(path: str, tenant_id: int, count: int) -> None:
    records = b"".join(SlotRecord(tenant_id=tenant_id, opcode=i).encode() for i in range(count))
    with open_ring(path, capacity=CAPACITY, tenant_id=tenant_id, io="threads") as ring:
        ring.append(records)


def older_copy(path: str) -> int:
    with open(path, "rb") as file:
        generations = []
        for offset in HEADER_COPY_OFFSETS:
            file.seek(offset)
            generations.append(decode_header(file.read(HEADER_SIZE_BYTES)).generation)
    return generations.index(min(generations))


def test_an_unusable_header_copy_is_reported_with_its_offset_and_fails_with_strict(tmp_path):
    path = os.fspath(tmp_path / "tenant-1.ring")
    write_ring(path, 1, 100)
    copy = older_copy(path)
    offset = HEADER_COPY_OFFSETS[copy]
    flip_byte(path, offset + 40)  # next_sequence of the copy not in use: its checksum fails

    plain = ringtail("verify", path)
    # Not data loss (the other copy is in use): exit 0 without --strict, but said.
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert f"{path}: ok (header copy unusable; --strict would fail): 100 records verified" \
        in plain.stdout
    assert (f"  header copy {copy} at byte offset {offset} is unusable: checksum mismatch "
            f"(copy {1 - copy} is in use;") in plain.stdout

    strict = ringtail("verify", "--strict", path)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert f"header copy {copy} at byte offset {offset} is unusable" in strict.stdout


def test_verify_of_a_data_dir_reports_every_ring_and_fails_if_one_cannot_be_opened(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    paths = {tenant: os.fspath(data_dir / f"tenant-{tenant}.ring") for tenant in (1, 2, 3, 4)}
    write_ring(paths[1], 1, 10)
    with open(paths[2], "wb") as file:  # not a ring file: sorts before the good ones after it
        file.write(random.Random(9).randbytes(20_000))
    write_ring(paths[3], 3, 30)
    write_ring(paths[4], 4, 40)
    os.truncate(paths[4], 100)  # cut inside the header pages

    result = ringtail("verify", os.fspath(data_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Before: the run stopped at tenant-2 with one error line on stderr.
    assert f"{paths[1]}: ok: 10 records verified" in lines
    assert any(line.startswith(f"{paths[2]}: UNREADABLE: {paths[2]}: not a ringtail ring file")
               for line in lines), lines
    assert f"{paths[3]}: ok: 30 records verified" in lines
    assert any(line.startswith(f"{paths[4]}: UNREADABLE: {paths[4]}: truncated: 100 bytes")
               for line in lines), lines
    assert lines[-1] == "4 rings: 2 passed, 2 failed"

    healthy = ringtail("verify", paths[3])
    assert healthy.returncode == 0 and healthy.stdout == f"{paths[3]}: ok: 30 records verified\n"
