"""Damaged ring files: garbage, truncation, wrong magic or version, flipped bytes.

Each test builds a real ring file, damages its bytes on disk, and checks that
the engine either recovers exactly what the format promises or raises a typed
error naming the file (and, for corruption, the byte offset). Damage is never
returned as data.

The standard ring (capacity 512 = 8 chunks, no wrap) holds 340 records written
in four batches, so the chunks are:

    chunk 0   0..63     batch 1                  (oldest: recovery re-verifies it)
    chunk 1   64..127   batches 1 and 2
    chunk 2   128..191  batch 2 only             (an old, acknowledged chunk)
    chunk 3   192..255  batches 2 and 3
    chunk 4   256..319  batches 3 and 4 (300..)  (the last batch starts here)
    chunk 5   320..339  batch 4 only
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from ringtail.ioring.errors import RingCorruptError, RingFormatError
from ringtail.ioring.format import (CHUNK_ENTRY_SIZE_BYTES, CHUNK_RECORD_COUNT, HEADER_COPY_OFFSETS,
                                    HEADER_SIZE_BYTES, PAGE_SIZE_BYTES, Layout, checksum,
                                    decode_entry, decode_header, entry_matches)
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.ring import open_ring

from .conftest import TENANT_ID, flip_byte, make_records, read_bytes, write_bytes

CAPACITY = 512
LAYOUT = Layout(CAPACITY)
BATCHES = ((0, 100), (100, 100), (200, 100), (300, 40))
RECORD_COUNT = 340
LAST_BATCH_FIRST = 300
CHECKED_HEADER_SIZE = HEADER_SIZE_BYTES - 16
VERSION_OFFSET = 8


def _write_ring(path: str, io: str, batches=BATCHES, *, sealed: bool = False) -> None:
    """Append `batches`; leave the file as `kill -9` right after the last ack would
    (unless `sealed`: then as a clean close leaves it, with the last batch confirmed)."""
    with open_ring(path, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        for first, count in batches:
            ring.append(make_records(first, count))
        killed = _snapshot(path)
    if not sealed:
        _restore(path, killed)


@pytest.fixture
def written_ring(ring_path, io) -> str:
    """The standard ring of the module docstring, as a crash right after the last
    acknowledgement leaves it (its last batch still in recovery's tail window)."""
    _write_ring(ring_path, io)
    return ring_path


def _rewrite_header(path: str, copy: int, edit) -> None:
    """Apply `edit(bytearray)` to a header copy's checked bytes and re-seal it."""
    offset = HEADER_COPY_OFFSETS[copy]
    body = bytearray(read_bytes(path, CHECKED_HEADER_SIZE, offset))
    edit(body)
    write_bytes(path, bytes(body) + checksum(bytes(body)), offset)


def _newest_copy(path: str) -> int:
    generations = [decode_header(read_bytes(path, HEADER_SIZE_BYTES, offset)).generation
                   for offset in HEADER_COPY_OFFSETS]
    return generations.index(max(generations))


# -- not a ring file at all ---------------------------------------------------------


def test_a_file_of_random_bytes_is_not_a_ring_file(ring_path):
    with open(ring_path, "wb") as file:
        file.write(random.Random(1).randbytes(64 * 1024))
    with pytest.raises(RingFormatError,
                       match=r"not a ringtail ring file \(magic b'.*', expected b'RINGTAIL'\); "
                             r"point ringtail at its data directory or move this file away"):
        open_ring(ring_path, tenant_id=TENANT_ID)


def test_an_empty_file_is_reported_as_truncated(ring_path):
    open(ring_path, "wb").close()
    with pytest.raises(RingFormatError,
                       match=r"truncated: 0 bytes is smaller than the two header pages "
                             r"\(8192 bytes\); this is not a complete ring file"):
        open_ring(ring_path, tenant_id=TENANT_ID)


@pytest.mark.parametrize("size", [
    1, HEADER_SIZE_BYTES - 1, HEADER_SIZE_BYTES, PAGE_SIZE_BYTES,
    PAGE_SIZE_BYTES + HEADER_SIZE_BYTES, 2 * PAGE_SIZE_BYTES - 1])
def test_a_file_cut_inside_the_header_pages_is_reported_as_truncated(written_ring, size):
    os.truncate(written_ring, size)
    with pytest.raises(RingFormatError,
                       match=rf"^{written_ring}: truncated: {size} bytes is smaller than "
                             r"the two header pages \(8192 bytes\)"):
        open_ring(written_ring, tenant_id=TENANT_ID)


@pytest.mark.parametrize("size, where", [
    (2 * PAGE_SIZE_BYTES, "at the end of the header pages"),
    (LAYOUT.table_offset(0) + 100, "inside chunk table A"),
    (LAYOUT.table_offset(1), "at the start of chunk table B"),
    (LAYOUT.data_offset, "at the start of the data"),
    (LAYOUT.record_offset(150) + 10, "inside the data"),
    (LAYOUT.file_size_bytes - 1, "one byte short"),
    (LAYOUT.file_size_bytes + 1, "one byte long"),
])
def test_a_file_of_the_wrong_size_is_rejected_with_both_sizes(written_ring, size, where):
    os.truncate(written_ring, size)
    with pytest.raises(RingFormatError,
                       match=rf"file is {size} bytes but capacity {CAPACITY} needs "
                             rf"{LAYOUT.file_size_bytes}; the file was truncated or "
                             r"extended: restore it"):
        open_ring(written_ring, tenant_id=TENANT_ID)


def test_a_wrong_magic_in_both_copies_is_not_a_ring_file(written_ring):
    for copy in (0, 1):
        _rewrite_header(written_ring, copy, lambda body: body.__setitem__(slice(0, 8),
                                                                          b"NOTARING"))
    with pytest.raises(RingFormatError,
                       match=r"not a ringtail ring file \(magic b'NOTARING', expected "
                             r"b'RINGTAIL'\)"):
        open_ring(written_ring, tenant_id=TENANT_ID)


def test_an_unsupported_version_is_a_format_error_not_damage(written_ring):
    for copy in (0, 1):
        _rewrite_header(written_ring, copy,
                        lambda body: struct.pack_into("<I", body, VERSION_OFFSET, 3))
    with pytest.raises(RingFormatError,
                       match=r"unsupported format version \(unsupported version: 3; "
                             r"unsupported version: 3\); this ringtail reads versions 1 "
                             r"and 2: use the ringtail that wrote it"):
        open_ring(written_ring, tenant_id=TENANT_ID)


# -- header copies ------------------------------------------------------------------


def _expected_copy_problem(byte: int) -> str:
    return "bad magic" if byte < 8 else "checksum mismatch"


def _snapshot(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _restore(path: str, snapshot: bytes) -> None:
    write_bytes(path, snapshot, 0)  # opening may have written (a new header, scrubs)


@pytest.mark.parametrize("older_copy", [0, 1])
def test_flipping_any_byte_of_the_older_header_copy_keeps_every_record(
        ring_path, io, older_copy):
    # Three batches leave generation 4 newest (copy 0); four leave 5 (copy 1).
    batches = BATCHES if older_copy == 0 else BATCHES[:3]
    _write_ring(ring_path, io, batches)
    count = sum(size for _, size in batches)
    assert _newest_copy(ring_path) == 1 - older_copy
    pristine = _snapshot(ring_path)
    for byte in range(HEADER_SIZE_BYTES):
        flip_byte(ring_path, HEADER_COPY_OFFSETS[older_copy] + byte)
        with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
            report = ring.recovery_report
            assert report.header_copy == 1 - older_copy, byte
            assert report.other_copy_problem.startswith(_expected_copy_problem(byte)), byte
            assert report.dropped_tail is None and report.dropped_head is None
            assert report.rolled_forward is None
            assert (ring.oldest_sequence, ring.next_sequence) == (0, count)
            assert ring.read(0, count) == make_records(0, count)
        _restore(ring_path, pristine)


@pytest.mark.parametrize("newest_copy", [0, 1])
def test_flipping_any_byte_of_the_newest_header_copy_rolls_the_last_batch_forward(
        ring_path, io, newest_copy):
    # The older copy's cursor predates the last acknowledged batch; recovery must
    # find that batch again (its chunk entries and data verify), report it, and
    # never hand its sequences out a second time.
    batches = BATCHES if newest_copy == 1 else BATCHES[:3]
    _write_ring(ring_path, io, batches)
    count = sum(size for _, size in batches)
    older_next = count - batches[-1][1]
    assert _newest_copy(ring_path) == newest_copy
    pristine = _snapshot(ring_path)
    for byte in range(HEADER_SIZE_BYTES):
        flip_byte(ring_path, HEADER_COPY_OFFSETS[newest_copy] + byte)
        with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
            report = ring.recovery_report
            assert report.header_copy == 1 - newest_copy, byte
            assert report.other_copy_problem.startswith(_expected_copy_problem(byte)), byte
            assert report.rolled_forward == (older_next, count - 1), byte
            assert report.dropped_tail is None and report.dropped_head is None
            assert f"recovered {older_next}..{count - 1} past the header's cursor" in \
                report.summary()
            assert (ring.oldest_sequence, ring.next_sequence) == (0, count)
            assert ring.read(0, count) == make_records(0, count)
        _restore(ring_path, pristine)


def test_after_a_roll_forward_new_records_take_new_sequences(written_ring, io):
    flip_byte(written_ring, HEADER_COPY_OFFSETS[_newest_copy(written_ring)] + 40)
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.rolled_forward == (LAST_BATCH_FIRST, RECORD_COUNT - 1)
        assert ring.append(make_records(1000, 10)).first_sequence == RECORD_COUNT
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:  # made durable
        report = ring.recovery_report
        assert report.other_copy_problem is None and report.rolled_forward is None
        assert ring.read(0, RECORD_COUNT) == make_records(0, RECORD_COUNT)
        assert ring.read(RECORD_COUNT, 10) == make_records(1000, 10)


def test_flipping_a_byte_in_both_header_copies_loses_the_cursor_loudly(written_ring):
    for byte in range(8, HEADER_SIZE_BYTES):  # any byte past the magic
        for offset in HEADER_COPY_OFFSETS:
            flip_byte(written_ring, offset + byte)
        with pytest.raises(RingCorruptError,
                           match=r"at byte offset 0: both header copies are unusable "
                                 r"\(copy 0: checksum mismatch; copy 1: checksum mismatch\); "
                                 r"the cursor is lost: restore the file from a copy") as caught:
            open_ring(written_ring, tenant_id=TENANT_ID)
        assert (caught.value.path, caught.value.offset) == (written_ring, 0)
        for offset in HEADER_COPY_OFFSETS:
            flip_byte(written_ring, offset + byte)


def test_a_damaged_magic_in_one_copy_and_checksum_in_the_other_is_corruption(written_ring):
    flip_byte(written_ring, HEADER_COPY_OFFSETS[0] + 3)
    flip_byte(written_ring, HEADER_COPY_OFFSETS[1] + 100)
    with pytest.raises(RingCorruptError,
                       match=r"both header copies are unusable \(copy 0: bad magic: .*; "
                             r"copy 1: checksum mismatch\)") as caught:
        open_ring(written_ring, tenant_id=TENANT_ID)
    assert caught.value.offset == 0


def test_an_unsupported_version_in_one_copy_falls_back_to_the_other(written_ring, io):
    older = 1 - _newest_copy(written_ring)
    _rewrite_header(written_ring, older,
                    lambda body: struct.pack_into("<I", body, VERSION_OFFSET, 3))
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.other_copy_problem == "unsupported version: 3"
        assert ring.read(0, RECORD_COUNT) == make_records(0, RECORD_COUNT)


def test_a_clean_close_confirms_the_last_batch_so_damage_there_is_an_error_not_a_cut(
        ring_path, io):
    _write_ring(ring_path, io, sealed=True)
    newest = decode_header(read_bytes(ring_path, HEADER_SIZE_BYTES,
                                  HEADER_COPY_OFFSETS[_newest_copy(ring_path)]))
    assert newest.batch_first_sequence == newest.next_sequence == RECORD_COUNT
    # A full chunk of the last batch: reads refuse it, nothing is cut.
    flip_byte(ring_path, LAYOUT.record_offset(LAST_BATCH_FIRST + 5) + 5)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.dropped_tail is None
        assert ring.next_sequence == RECORD_COUNT
        with pytest.raises(RingCorruptError, match=r"records 256\.\.319 failed their checksum"):
            ring.read(LAST_BATCH_FIRST, 40)
        assert ring.read(0, 256) == make_records(0, 256)
        assert ring.read(320, 20) == make_records(320, 20)
    flip_byte(ring_path, LAYOUT.record_offset(LAST_BATCH_FIRST + 5) + 5)


def test_damage_in_the_partial_chunk_being_appended_to_refuses_the_open(ring_path, io):
    # New records would be checksummed together with the damaged ones, laundering
    # the damage: the ring refuses to open instead, naming the offset.
    _write_ring(ring_path, io, sealed=True)
    flip_byte(ring_path, LAYOUT.record_offset(330) + 5)
    with pytest.raises(RingCorruptError, match=r"records 320\.\.339 failed their checksum") \
            as caught:
        open_ring(ring_path, tenant_id=TENANT_ID, io=io)
    assert caught.value.offset == LAYOUT.record_offset(320)


# -- records and chunk-table entries -------------------------------------------------


OLD_CHUNK = 2  # 128..191: written by batch 2 alone, neither oldest nor in the last batch
OLD_CHUNK_FIRST = OLD_CHUNK * CHUNK_RECORD_COUNT


def _assert_only_the_old_chunk_is_refused(ring, path: str, message: str) -> None:
    chunk_offset = LAYOUT.record_offset(OLD_CHUNK_FIRST)
    for first, count in ((OLD_CHUNK_FIRST, 64), (150, 1), (0, RECORD_COUNT), (100, 100)):
        with pytest.raises(RingCorruptError, match=message) as caught:
            ring.read(first, count)
        assert (caught.value.path, caught.value.offset) == (path, chunk_offset)
        assert str(caught.value).startswith(f"{path} at byte offset {chunk_offset}: ")
    assert ring.read(0, OLD_CHUNK_FIRST) == make_records(0, OLD_CHUNK_FIRST)
    after = OLD_CHUNK_FIRST + CHUNK_RECORD_COUNT
    assert ring.read(after, RECORD_COUNT - after) == make_records(after, RECORD_COUNT - after)


@pytest.mark.parametrize("byte_in_chunk", [0, 1000, CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES - 1])
def test_a_flipped_byte_in_an_old_chunk_is_refused_by_reads_naming_its_offset(
        written_ring, io, byte_in_chunk):
    flip_byte(written_ring, LAYOUT.record_offset(OLD_CHUNK_FIRST) + byte_in_chunk)
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report  # recovery does not scan the middle
        assert report.dropped_tail is None and report.dropped_head is None
        _assert_only_the_old_chunk_is_refused(
            ring, written_ring,
            r"records 128\.\.191 failed their checksum; the bytes on disk were damaged; "
            r"run `ringtail verify` and restore from a copy")


def test_damage_made_while_the_ring_is_open_is_refused_too(ring_path, io):
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        for first, count in BATCHES:
            ring.append(make_records(first, count))
        flip_byte(ring_path, LAYOUT.record_offset(170) + 20)
        _assert_only_the_old_chunk_is_refused(ring, ring_path, r"records 128\.\.191 failed")


def _entry_copy_of(path: str, chunk: int, count: int) -> int:
    file_id = decode_header(read_bytes(path, HEADER_SIZE_BYTES, 0)).file_id
    first = chunk * CHUNK_RECORD_COUNT
    records = read_bytes(path, count * RECORD_SIZE_BYTES, LAYOUT.record_offset(first))
    copies = [copy for copy in (0, 1) if entry_matches(
        decode_entry(read_bytes(path, CHUNK_ENTRY_SIZE_BYTES, LAYOUT.entry_offset(copy, chunk))),
        file_id, first, records)]
    assert len(copies) == 1, copies
    return copies[0]


# Bytes 12..15 of an entry are reserved (zero) and covered by no check, so a flip
# there changes nothing a reader relies on; every other byte is checked.
ENTRY_CHECKED_BYTES = [byte for byte in range(CHUNK_ENTRY_SIZE_BYTES) if not 12 <= byte < 16]


def test_a_flipped_byte_in_an_old_chunks_table_entry_is_refused_by_reads(written_ring, io):
    copy = _entry_copy_of(written_ring, OLD_CHUNK, CHUNK_RECORD_COUNT)
    entry_offset = LAYOUT.entry_offset(copy, OLD_CHUNK)
    for byte in ENTRY_CHECKED_BYTES:
        flip_byte(written_ring, entry_offset + byte)
        with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
            _assert_only_the_old_chunk_is_refused(
                ring, written_ring,
                r"(records 128\.\.191 failed their checksum"
                r"|no chunk-table entry for sequences 128\.\.191 \(table position 2\)"
                r"|chunk-table entry for sequence 128 holds \d+ records, expected 64)")
        flip_byte(written_ring, entry_offset + byte)  # undo


def test_a_chunk_copied_to_another_position_is_refused_as_misplaced(written_ring, io):
    # A misdirected write: chunk 1's records and both its entries land on chunk 2.
    size = CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES
    write_bytes(written_ring, read_bytes(written_ring, size, LAYOUT.record_offset(64)),
            LAYOUT.record_offset(OLD_CHUNK_FIRST))
    for copy in (0, 1):
        entry = read_bytes(written_ring, CHUNK_ENTRY_SIZE_BYTES, LAYOUT.entry_offset(copy, 1))
        write_bytes(written_ring, entry, LAYOUT.entry_offset(copy, OLD_CHUNK))
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
        _assert_only_the_old_chunk_is_refused(
            ring, written_ring,
            r"no chunk-table entry for sequences 128\.\.191 \(table position 2\); "
            r"run `ringtail verify`")


@pytest.mark.parametrize("damaged_sequence, cut", [
    (330, 320),  # chunk 5, all in the last batch: the cut keeps 300..319
    (310, 300),  # chunk 4's last-batch part: the chunk's previous entry still verifies
    # 256..299 were acknowledged by batch 3 but share chunk 4 with the last batch:
    # neither entry of the chunk verifies, so the cut falls at the chunk start.
    (270, 256),
])
def test_a_flipped_byte_in_the_last_batch_is_cut_by_recovery_and_reported(
        written_ring, io, damaged_sequence, cut):
    # The documented outcome: the last batch cannot be told apart from a batch that
    # was torn in flight, so recovery cuts at the first record that does not verify.
    flip_byte(written_ring, LAYOUT.record_offset(damaged_sequence) + 33)
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert report.dropped_tail == (cut, RECORD_COUNT - 1)
        assert report.dropped_head is None
        assert (ring.oldest_sequence, ring.next_sequence) == (0, cut)
        assert (f"dropped unverified tail {cut}..{RECORD_COUNT - 1} "
                "(never acknowledged, or damaged)") in report.summary()
        assert ring.read(0, cut) == make_records(0, cut)
        ticket = ring.append(make_records(1000, 10))  # continues at the cut
        assert ticket.first_sequence == cut
    with open_ring(written_ring, tenant_id=TENANT_ID, io=io) as ring:  # the cut is durable
        report = ring.recovery_report
        assert report.dropped_tail is None and report.dropped_head is None
        assert ring.read(0, cut) == make_records(0, cut)
        assert ring.read(cut, 10) == make_records(1000, 10)
