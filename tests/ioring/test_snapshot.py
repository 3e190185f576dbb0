"""The snapshot file (docs/FORMAT.md, "Snapshot file") and restore into a ring.

The layout is restated here from the document with struct, blake3 and zstandard
(`_parse`), so the writer is checked against the spec, not against its own
reader. Damage tests flip a byte in every region and truncate the file at
every chunk boundary (and inside each chunk): each is refused with the offset.
"""

from __future__ import annotations

import os
import re
import struct

import blake3
import pytest
import zstandard
from ringtail.ioring import open_ring
from ringtail.ioring.errors import RingCorruptError
from ringtail.ioring.restore import (
    RESTORING_SUFFIX,
    RestoreRefusedError,
    restore_snapshot,
)
from ringtail.ioring.snapshot import (
    SNAPSHOT_CHUNK_RECORD_COUNT_MAX,
    SnapshotCorruptError,
    SnapshotFormatError,
    SnapshotHeader,
    iter_snapshot_chunks,
    verify_snapshot,
    write_snapshot,
)

from tests.ioring.conftest import TENANT_ID, flip_byte, make_records

HEADER = struct.Struct("<8sIIIIQQQQ32s24s16s")
CHUNK_HEAD = struct.Struct("<4sIQII16s")
TRAILER = struct.Struct("<8sQQQ32s")
assert (HEADER.size, CHUNK_HEAD.size, TRAILER.size) == (128, 40, 64)
CHUNK_MAX = 100  # small chunks: many boundaries in a small file


def _parse(data: bytes) -> tuple[tuple, list[tuple[int, int, int, bytes]], tuple]:
    """(header fields, [(offset, count, first, records)], trailer fields), checking every checksum."""
    header = HEADER.unpack_from(data)
    assert header[0] == b"RTSNAP\r\n" and header[1:3] == (1, 128)
    assert blake3.blake3(data[:112]).digest(16) == header[-1]
    offset, chunks = 128, []
    for _ in range(header[7]):
        magic, count, first, size, reserved, checksum = CHUNK_HEAD.unpack_from(data, offset)
        assert (magic, reserved) == (b"RTSC", 0)
        compressed = data[offset + 40:offset + 40 + size]
        records = zstandard.ZstdDecompressor().decompress(compressed)
        assert blake3.blake3(data[offset:offset + 24] + compressed + records).digest(16) == checksum
        chunks.append((offset, count, first, records))
        offset += 40 + size
    trailer = TRAILER.unpack_from(data, offset)
    assert trailer[0] == b"RTSNEND\0" and trailer[3] == offset
    assert blake3.blake3(data[:offset + 32]).digest() == trailer[4]
    assert len(data) == offset + 64
    return header, chunks, trailer


def _write(path, first: int, count: int, chunk_max: int = CHUNK_MAX) -> bytes:
    records = make_records(first, count)
    header = SnapshotHeader(TENANT_ID, first, count, 123, "node-a", chunk_max)
    # Fed in uneven pieces: the writer cuts its own chunks.
    pieces = [records[i:i + 64 * 37] for i in range(0, len(records), 64 * 37)]
    write_snapshot(path, header, pieces)
    return records


def test_snapshot_layout_matches_the_format_document(tmp_path):
    path = tmp_path / "s.snap"
    records = _write(path, 6400, 1050)
    header, chunks, trailer = _parse(path.read_bytes())
    (_, _, _, tenant, chunk_max, first, count, chunk_count, created, node, reserved, _) = header
    assert (tenant, chunk_max, first, count, chunk_count, created) == (
        TENANT_ID, CHUNK_MAX, 6400, 1050, 11, 123)
    assert node.rstrip(b"\0") == b"node-a" and reserved == bytes(24)
    assert [c[1] for c in chunks] == [100] * 10 + [50]
    assert [c[2] for c in chunks] == list(range(6400, 7450, 100))
    assert b"".join(c[3] for c in chunks) == records
    assert trailer[1:3] == (11, 1050)


def test_snapshot_round_trips_through_the_reader(tmp_path):
    path = tmp_path / "s.snap"
    records = _write(path, 0, 40_000, SNAPSHOT_CHUNK_RECORD_COUNT_MAX)
    got = list(iter_snapshot_chunks(path))
    assert [first for first, _ in got] == [0, 16_384, 32_768]
    assert b"".join(data for _, data in got) == records
    info = verify_snapshot(path)
    assert info.header.record_count == 40_000 and info.header.source_node == "node-a"
    assert info.uncompressed_size_bytes == len(records)
    assert info.file_size_bytes == os.path.getsize(path) < len(records)


def test_empty_snapshot_round_trips(tmp_path):
    path = tmp_path / "s.snap"
    write_snapshot(path, SnapshotHeader(TENANT_ID, 640, 0, 1, "n"), [])
    assert list(iter_snapshot_chunks(path)) == []
    assert verify_snapshot(path).header.next_sequence == 640


def test_writer_refuses_fewer_records_than_its_header_promised(tmp_path):
    path = tmp_path / "s.snap"
    header = SnapshotHeader(TENANT_ID, 0, 10, 1, "n", CHUNK_MAX)
    with pytest.raises(ValueError, match=r"got records 0\.\.8, its header promised 0\.\.9"):
        write_snapshot(path, header, [make_records(0, 9)])
    assert not path.exists()


def _regions(path) -> dict[str, int]:
    """One offset in each region of the file."""
    _, chunks, trailer = _parse(path.read_bytes())
    second = chunks[1][0]
    return {
        "header magic": 0, "header version": 8, "header tenant": 16,
        "header first sequence": 24, "header record count": 32, "header created": 48,
        "header source node": 60, "header checksum": 120,
        "chunk magic": second, "chunk record count": second + 4,
        "chunk first sequence": second + 8, "chunk compressed size": second + 16,
        "chunk checksum": second + 30, "chunk payload start": second + 40,
        "chunk payload end": chunks[2][0] - 1,
        "trailer magic": trailer[3], "trailer counts": trailer[3] + 8,
        "trailer offset": trailer[3] + 24, "trailer file checksum": trailer[3] + 40,
    }


def test_a_flipped_byte_in_every_region_is_refused_with_its_offset(tmp_path):
    base = tmp_path / "base.snap"
    _write(base, 0, 450)
    for name, offset in _regions(base).items():
        damaged = tmp_path / "damaged.snap"
        damaged.write_bytes(base.read_bytes())
        flip_byte(os.fspath(damaged), offset)
        error_type = SnapshotFormatError if name == "header magic" else SnapshotCorruptError
        with pytest.raises(error_type) as caught:
            verify_snapshot(damaged)
        if error_type is SnapshotCorruptError:
            # The reported offset is the damaged structure's start (or the byte):
            # never past the flipped byte.
            assert caught.value.offset <= offset, (name, caught.value)
            assert f"at byte offset {caught.value.offset}" in str(caught.value)
        # Restore refuses it the same way, and writes nothing.
        with pytest.raises(error_type, match=re.escape(str(caught.value))):
            restore_snapshot(os.fspath(damaged), os.fspath(tmp_path / "tenant-9.ring"), 9, 256)
        assert sorted(os.listdir(tmp_path)) == ["base.snap", "damaged.snap"], name


def test_truncation_at_every_chunk_boundary_and_inside_is_refused(tmp_path):
    base = tmp_path / "base.snap"
    _write(base, 0, 450)
    data = base.read_bytes()
    _, chunks, trailer = _parse(data)
    cuts = {0, 5, 127, 128}
    for offset, _, _, _ in chunks:
        cuts |= {offset, offset + 20, offset + 40, offset + 41}
    cuts |= {trailer[3], trailer[3] + 63}
    for cut in sorted(cuts):
        truncated = tmp_path / "cut.snap"
        truncated.write_bytes(data[:cut])
        with pytest.raises(SnapshotCorruptError, match="truncated|file ends") as caught:
            verify_snapshot(truncated)
        assert caught.value.offset <= cut, (cut, caught.value)
        with pytest.raises(SnapshotCorruptError, match=re.escape(str(caught.value))):
            restore_snapshot(os.fspath(truncated), os.fspath(tmp_path / "tenant-9.ring"), 9, 256)
        assert sorted(os.listdir(tmp_path)) == ["base.snap", "cut.snap"], cut


def test_bytes_after_the_trailer_are_refused(tmp_path):
    path = tmp_path / "s.snap"
    _write(path, 0, 10)
    with open(path, "ab") as file:
        file.write(b"x")
    with pytest.raises(SnapshotCorruptError, match="1 bytes follow the trailer"):
        verify_snapshot(path)


def test_a_newer_format_version_is_refused_as_unsupported(tmp_path):
    path = tmp_path / "s.snap"
    _write(path, 0, 10)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    data[112:128] = blake3.blake3(bytes(data[:112])).digest(16)
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match="version 2 .* not supported"):
        verify_snapshot(path)


# -- restore ------------------------------------------------------------------------


def _ring_records(path, tenant_id):
    with open_ring(path, tenant_id=tenant_id, io="threads") as ring:
        return ring.oldest_sequence, ring.next_sequence, ring.read(
            ring.oldest_sequence, ring.next_sequence - ring.oldest_sequence)


def test_restore_keeps_sequences_and_the_ring_continues_after_them(tmp_path):
    snap = tmp_path / "s.snap"
    records = _write(snap, 6400, 1050)
    ring_path = os.fspath(tmp_path / "tenant-9.ring")
    report = restore_snapshot(os.fspath(snap), ring_path, 9, 256)
    assert (report.first_sequence, report.next_sequence, report.capacity) == (6400, 7450, 1088)
    assert _ring_records(ring_path, 9) == (6400, 7450, records)
    with open_ring(ring_path, tenant_id=9, io="threads") as ring:
        ticket = ring.append(make_records(0, 3, 9))
    assert ticket.first_sequence == 7450


def test_restore_of_a_damaged_snapshot_writes_nothing(tmp_path):
    snap = tmp_path / "s.snap"
    _write(snap, 0, 450)
    _, chunks, _ = _parse(snap.read_bytes())
    flip_byte(os.fspath(snap), chunks[-1][0] + 45)  # the last chunk: found only at the end
    ring_path = os.fspath(tmp_path / "tenant-9.ring")
    with pytest.raises(SnapshotCorruptError, match=f"at byte offset {chunks[-1][0]}: chunk 4"):
        restore_snapshot(os.fspath(snap), ring_path, 9, 256)
    assert sorted(os.listdir(tmp_path)) == ["s.snap"]


def test_restore_refuses_a_tenant_that_holds_records(tmp_path):
    snap = tmp_path / "s.snap"
    _write(snap, 0, 10)
    ring_path = os.fspath(tmp_path / "tenant-9.ring")
    with open_ring(ring_path, capacity=256, tenant_id=9, io="threads") as ring:
        ring.append(make_records(0, 1, 9))
    before = open(ring_path, "rb").read()
    with pytest.raises(RestoreRefusedError, match=r"holds records 0\.\.0; restore goes into "
                                                  "an empty tenant only"):
        restore_snapshot(os.fspath(snap), ring_path, 9, 256)
    assert open(ring_path, "rb").read() == before
    assert not os.path.exists(ring_path + RESTORING_SUFFIX)


def test_restore_refuses_a_ring_a_writer_holds_open(tmp_path):
    snap = tmp_path / "s.snap"
    _write(snap, 0, 10)
    ring_path = os.fspath(tmp_path / "tenant-9.ring")
    with open_ring(ring_path, capacity=256, tenant_id=9, io="threads"):
        with pytest.raises(RestoreRefusedError, match="open in a running daemon"):
            restore_snapshot(os.fspath(snap), ring_path, 9, 256)


def test_restore_replaces_an_empty_closed_ring(tmp_path):
    snap = tmp_path / "s.snap"
    records = _write(snap, 128, 10)
    ring_path = os.fspath(tmp_path / "tenant-9.ring")
    open_ring(ring_path, capacity=256, tenant_id=9, io="threads").close()
    restore_snapshot(os.fspath(snap), ring_path, 9, 256)
    assert _ring_records(ring_path, 9) == (128, 138, records)


def test_restore_refuses_a_first_sequence_off_a_chunk_boundary(tmp_path):
    snap = tmp_path / "s.snap"
    _write(snap, 100, 10)
    with pytest.raises(SnapshotFormatError, match="first sequence 100 is not a multiple of 64"):
        restore_snapshot(os.fspath(snap), os.fspath(tmp_path / "r.ring"), 9, 256)
    assert isinstance(SnapshotCorruptError(snap, 0, "x"), RingCorruptError)


# -- the zstandard wheel on a baseline CPU --------------------------------------------

QEMU_RUN_TIMEOUT_S = 120  # one emulated child: importing numpy dominates (5-7 s measured)
BASELINE_CHILD = r'''
import sys
from ringtail.ioring.snapshot import SnapshotHeader, verify_snapshot, write_snapshot
from tests.ioring.conftest import make_records
path = sys.argv[1]
write_snapshot(path, SnapshotHeader(7, 0, 5000, 1, "qemu", 1000), [make_records(0, 5000)])
print(verify_snapshot(path).header.record_count)
'''


@pytest.mark.skipif(__import__("platform").machine() != "x86_64",
                    reason="the qemu-x86_64 CPU-baseline check runs on x86-64 hosts")
def test_snapshots_written_on_a_baseline_cpu_are_byte_identical(tmp_path):
    """zstandard is native code: on an x86-64-v2 CPU (qemu's Nehalem: no AVX) it must
    run, and compress to the same bytes as on this machine."""
    import shutil
    import subprocess
    import sys
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is not installed; run `make test` (it installs Debian's "
                    "qemu-user) or `apt-get install qemu-user`")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outputs = []
    for prefix, name in (([], "native.snap"), ([qemu, "-cpu", "Nehalem"], "nehalem.snap")):
        path = os.fspath(tmp_path / name)
        result = subprocess.run([*prefix, sys.executable, "-c", BASELINE_CHILD, path],
                                cwd=root, capture_output=True, text=True,
                                timeout=QEMU_RUN_TIMEOUT_S)
        assert (result.returncode, result.stdout) == (0, "5000\n"), result.stderr[-2000:]
        outputs.append(open(path, "rb").read())
    assert outputs[0] == outputs[1]
