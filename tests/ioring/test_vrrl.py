"""VRRL0001 import/export against files built here, from the spec, with struct.

Nothing in this file builds or parses a VRRL file with the code under test:
`_vrrl_file`, `_independent_replay` and `_original_publish` are written from
docs/VRRL.md (and vyre-runtime's replay log) so that a shared misreading of the
format cannot make both sides agree.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringtail.ioring.errors import RingFormatError, VrrlFormatError
from ringtail.ioring.vrrl import (
    VRRL_CAPACITY_MAX,
    VRRL_HEADER_SIZE_BYTES,
    VRRL_MAGIC,
    VRRL_VERSION,
    VrrlHeader,
    export_vrrl,
    import_vrrl,
    read_vrrl_header,
)

# --- the spec, restated independently --------------------------------------

HEADER = struct.Struct("<8sIIQQ")  # magic, version, flags, capacity, next_slot
RECORD = struct.Struct("<IQIII4IIIIIQ")  # the 64-byte slot record
LIVE_MAGIC = 0xDEADBEEF
CURSOR_OFFSET = 24
assert HEADER.size == 32 and RECORD.size == 64


def _record(number: int, tenant_id: int = 7) -> bytes:
    """A distinct, well-formed slot record; every field depends on `number`."""
    return RECORD.pack(
        LIVE_MAGIC,
        1_700_000_000_000_000_000 + number,  # timestamp_ns
        number % 4096,  # slot_idx
        tenant_id,
        0x4000_0000 + number,  # opcode
        number, number * 2, number * 3, 0xFFFF_FFFF - number,  # args
        number // 3,  # epoch
        number % 5,  # slot_status
        number % 6,  # failure_class
        number % 7,  # backend_code
        (number * 0x9E37_79B9_7F4A_7C15) % 2**64,  # output_digest
    )


def _vrrl_file(capacity: int, next_slot: int, slots: dict[int, bytes], *,
               magic: bytes = b"VRRL0001", version: int = 1,
               flags: int = 0) -> bytes:
    """A VRRL0001 file image: header, then `capacity` slots, zero unless given."""
    body = bytearray(capacity * 64)
    for slot, record in slots.items():
        body[slot * 64:(slot + 1) * 64] = record
    return HEADER.pack(magic, version, flags, capacity, next_slot) + bytes(body)


def _independent_replay(data: bytes) -> tuple[int, int, list[bytes]]:
    """Parse a VRRL0001 image from the spec: (capacity, next_slot, records)."""
    magic, version, flags, capacity, next_slot = HEADER.unpack_from(data, 0)
    assert (magic, version, flags) == (b"VRRL0001", 1, 0)
    assert len(data) == 32 + capacity * 64
    records = []
    for step in range(capacity):
        slot = (next_slot + step) % capacity
        record = data[32 + slot * 64:32 + (slot + 1) * 64]
        (record_magic,) = struct.unpack_from("<I", record)
        if record_magic != 0:
            assert record_magic == LIVE_MAGIC
            records.append(record)
    return capacity, next_slot, records


def _original_publish(records: list[bytes], capacity: int) -> bytes:
    """What vyre-runtime's RingLog leaves on disk: open fresh, append each.

    Per record: write it at slot next_slot, then next_slot = (next_slot + 1) %
    capacity and rewrite the cursor at header offset 24.
    """
    image = bytearray(32 + capacity * 64)  # set_len: zero body
    image[0:32] = HEADER.pack(b"VRRL0001", 1, 0, capacity, 0)
    next_slot = 0
    for record in records:
        offset = 32 + next_slot * 64
        image[offset:offset + 64] = record
        next_slot = (next_slot + 1) % capacity
        image[CURSOR_OFFSET:CURSOR_OFFSET + 8] = struct.pack("<Q", next_slot)
    return bytes(image)


@pytest.fixture
def write_file(tmp_path):
    def write(data: bytes, name: str = "log.vrrl"):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return write


# --- constants --------------------------------------------------------------


def test_constants_match_the_vrrl0001_spec():
    assert VRRL_MAGIC == b"VRRL0001"
    assert VRRL_VERSION == 1
    assert VRRL_HEADER_SIZE_BYTES == 32
    assert VRRL_CAPACITY_MAX == 1_048_576


# --- import: replay order ---------------------------------------------------


@pytest.mark.parametrize("next_slot", [0, 3])
def test_empty_ring_imports_no_records(write_file, next_slot):
    path = write_file(_vrrl_file(4, next_slot, {}))
    assert import_vrrl(path) == []


def test_partially_filled_ring_replays_from_oldest_without_wrap(write_file):
    records = [_record(n) for n in range(5)]
    # Five publishes into an 8-slot ring: slots 0..4 full, cursor at 5.
    path = write_file(_vrrl_file(8, 5, dict(enumerate(records))))
    assert import_vrrl(path) == records


def test_partially_filled_ring_cursor_inside_the_filled_run(write_file):
    # A cursor pointing into the filled slots (next_slot < filled count) means
    # the walk starts there: slots 2, 3 first, then the empty tail, then 0, 1.
    records = {slot: _record(100 + slot) for slot in range(4)}
    path = write_file(_vrrl_file(8, 2, records))
    assert import_vrrl(path) == [records[2], records[3], records[0], records[1]]


def test_wrapped_full_ring_replays_starting_at_next_slot(write_file):
    records = {slot: _record(slot) for slot in range(5)}
    path = write_file(_vrrl_file(5, 2, records))
    assert import_vrrl(path) == [records[s] for s in (2, 3, 4, 0, 1)]


def test_wrapped_ring_with_cursor_at_last_slot(write_file):
    records = {slot: _record(slot) for slot in range(5)}
    path = write_file(_vrrl_file(5, 4, records))
    assert import_vrrl(path) == [records[s] for s in (4, 0, 1, 2, 3)]


def test_empty_slots_in_the_middle_are_skipped(write_file):
    records = {slot: _record(10 + slot) for slot in (0, 1, 2, 4, 5)}
    path = write_file(_vrrl_file(6, 1, records))  # slot 3 is empty
    assert import_vrrl(path) == [records[s] for s in (1, 2, 4, 5, 0)]


def test_slot_with_zero_magic_but_other_bytes_is_empty(write_file):
    # Only the record magic decides emptiness, as in the original.
    not_quite_empty = b"\x00" * 4 + b"\xff" * 60
    path = write_file(_vrrl_file(3, 0, {0: _record(1), 1: not_quite_empty,
                                        2: _record(2)}))
    assert import_vrrl(path) == [_record(1), _record(2)]


@pytest.mark.parametrize("filled", [False, True])
def test_capacity_one(write_file, filled):
    slots = {0: _record(42)} if filled else {}
    path = write_file(_vrrl_file(1, 0, slots))
    assert import_vrrl(path) == ([_record(42)] if filled else [])


def test_records_come_back_byte_identical(write_file):
    odd = bytearray(_record(3))
    odd[44:64] = bytes(range(1, 21))  # arbitrary tail words
    path = write_file(_vrrl_file(2, 1, {1: bytes(odd)}))
    (record,) = import_vrrl(path)
    assert type(record) is bytes
    assert record == bytes(odd)


def test_next_slot_past_capacity_is_taken_modulo_capacity(write_file):
    # vyre-runtime's RingLog::open keeps `cursor % capacity`; mirror it.
    records = {slot: _record(slot) for slot in range(4)}
    path = write_file(_vrrl_file(4, 4 * 1000 + 3, records))
    assert import_vrrl(path) == [records[s] for s in (3, 0, 1, 2)]
    header = read_vrrl_header(path)
    assert header.next_slot == 4003
    assert header.replay_start_slot == 3


def test_nonzero_flags_are_accepted_and_reported(write_file):
    # vyre-runtime reads the flags word and never checks it.
    path = write_file(_vrrl_file(2, 1, {0: _record(0)}, flags=0x8000_0001))
    assert import_vrrl(path) == [_record(0)]
    assert read_vrrl_header(path).flags == 0x8000_0001


def test_bytes_past_the_last_slot_are_ignored(write_file):
    data = _vrrl_file(2, 0, {0: _record(0), 1: _record(1)})
    path = write_file(data + b"\xde\xad\xbe\xef" * 40)
    assert import_vrrl(path) == [_record(0), _record(1)]
    assert read_vrrl_header(path).trailing_size_bytes == 160


def test_full_ring_at_capacity_max_imports_in_replay_order(write_file):
    capacity = VRRL_CAPACITY_MAX
    words = numpy.zeros((capacity, 16), dtype="<u4")
    words[:, 0] = LIVE_MAGIC
    words[:, 3] = numpy.arange(capacity)  # slot_idx = slot number
    words[capacity // 2, 0] = 0  # one empty slot
    next_slot = 777_777
    header = HEADER.pack(b"VRRL0001", 1, 0, capacity, next_slot)
    path = write_file(header + words.tobytes())

    records = import_vrrl(path)

    assert len(records) == capacity - 1
    slot_numbers = [struct.unpack_from("<I", r, 12)[0] for r in records]
    expected = [s for s in (*range(next_slot, capacity), *range(next_slot))
                if s != capacity // 2]
    assert slot_numbers == expected


# --- import: header ---------------------------------------------------------


def test_read_vrrl_header_reports_the_stored_fields(write_file):
    path = write_file(_vrrl_file(16, 9, {3: _record(3)}))
    assert read_vrrl_header(path) == VrrlHeader(
        capacity=16, next_slot=9, version=1, flags=0,
        file_size_bytes=32 + 16 * 64)


def test_header_is_frozen(write_file):
    header = read_vrrl_header(write_file(_vrrl_file(1, 0, {})))
    with pytest.raises(AttributeError):
        header.capacity = 2


# --- import: rejections -----------------------------------------------------

BAD_FILES = {
    "zero capacity": (
        HEADER.pack(b"VRRL0001", 1, 0, 0, 0),
        r"VRRL capacity 0 is below the minimum of 1 record \(VRRL_CAPACITY_MIN\);"
        r" the header is damaged"),
    "capacity over max": (
        HEADER.pack(b"VRRL0001", 1, 0, 1_048_577, 0),
        r"VRRL capacity 1048577 exceeds the maximum of 1048576 records"
        r" \(VRRL_CAPACITY_MAX\).*shard it into logs of at most 1048576"),
    "wrong magic": (
        _vrrl_file(2, 0, {}, magic=b"VRRL0002"),
        r"magic b'VRRL0002' is not b'VRRL0001' \(VRRL_MAGIC\); this is not a"
        r" vyre-runtime replay log"),
    "version 2": (
        _vrrl_file(2, 0, {}, version=2),
        r"VRRL version 2 is not supported, only version 1 \(VRRL_VERSION\) is;"
        r" re-export"),
    "empty file": (
        b"",
        r"file is 0 bytes, shorter than the 32-byte VRRL header"
        r" \(VRRL_HEADER_SIZE_BYTES\); the file is truncated"),
    "header cut short": (
        HEADER.pack(b"VRRL0001", 1, 0, 2, 0)[:31],
        r"file is 31 bytes, shorter than the 32-byte VRRL header"),
    "header only": (
        HEADER.pack(b"VRRL0001", 1, 0, 2, 0),
        r"file is 32 bytes, shorter than the 160 bytes a VRRL log of capacity 2"
        r" needs \(32 \+ 2 x 64\); the file is truncated: copy it again"),
    "body one byte short": (
        _vrrl_file(3, 1, {0: _record(0)})[:-1],
        r"file is 223 bytes, shorter than the 224 bytes a VRRL log of"
        r" capacity 3 needs"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_rejected_by_import(write_file, case):
    data, message = BAD_FILES[case]
    path = write_file(data)
    with pytest.raises(VrrlFormatError, match=message) as caught:
        import_vrrl(path)
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value, RingFormatError)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_rejected_by_read_vrrl_header(write_file, case):
    data, message = BAD_FILES[case]
    with pytest.raises(VrrlFormatError, match=message):
        read_vrrl_header(write_file(data))


def test_magic_is_checked_before_capacity(write_file):
    # The original reads magic, then version, then capacity.
    path = write_file(HEADER.pack(b"NOTVRRL!", 2, 0, 0, 0))
    with pytest.raises(VrrlFormatError, match=r"magic b'NOTVRRL!'"):
        import_vrrl(path)


def test_damaged_record_magic_is_rejected_with_slot_and_offset(write_file):
    damaged = struct.pack("<I", 0x1234_5678) + _record(9)[4:]
    path = write_file(_vrrl_file(4, 0, {0: _record(0), 2: damaged}))
    with pytest.raises(VrrlFormatError, match=re.escape(
            "slot 2 at byte offset 160 has record magic 0x12345678, expected"
            " 0xdeadbeef (RECORD_MAGIC) or 0 (empty slot); 1 slot(s) are"
            " damaged")):
        import_vrrl(path)


# --- export -----------------------------------------------------------------


def test_exported_file_parses_with_an_independent_reader(tmp_path):
    records = [_record(n) for n in range(3)]
    path = tmp_path / "out.vrrl"
    export_vrrl(records, path, 8)
    capacity, next_slot, replayed = _independent_replay(path.read_bytes())
    assert (capacity, next_slot) == (8, 3)
    assert replayed == records


def test_export_of_more_records_than_capacity_keeps_the_last_capacity(tmp_path):
    records = [_record(n) for n in range(11)]
    path = tmp_path / "out.vrrl"
    export_vrrl(iter(records), path, 4)  # a one-shot iterator is enough
    capacity, next_slot, replayed = _independent_replay(path.read_bytes())
    assert (capacity, next_slot) == (4, 11 % 4)
    assert replayed == records[-4:]
    assert import_vrrl(path) == records[-4:]


@pytest.mark.parametrize("count, capacity", [
    (0, 1), (1, 1), (5, 1), (0, 4), (3, 4), (4, 4), (5, 4), (9, 4), (13, 7),
])
def test_export_is_byte_identical_to_the_original_publish_sequence(
        tmp_path, count, capacity):
    records = [_record(n) for n in range(count)]
    path = tmp_path / "out.vrrl"
    export_vrrl(records, path, capacity)
    assert path.read_bytes() == _original_publish(records, capacity)


def test_export_at_capacity_max_is_byte_identical(tmp_path):
    records = [_record(n) for n in range(1000)]
    path = tmp_path / "out.vrrl"
    export_vrrl(records, path, VRRL_CAPACITY_MAX)
    assert os.path.getsize(path) == 32 + VRRL_CAPACITY_MAX * 64
    assert path.read_bytes() == _original_publish(records, VRRL_CAPACITY_MAX)


def test_export_accepts_other_bytes_like_records(tmp_path):
    path = tmp_path / "out.vrrl"
    export_vrrl([bytearray(_record(1)), memoryview(_record(2))], path, 2)
    assert import_vrrl(path) == [_record(1), _record(2)]


@settings(max_examples=150, deadline=None)
@given(count=st.integers(min_value=0, max_value=70),
       capacity=st.integers(min_value=1, max_value=24),
       seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_export_then_import_round_trips(count, capacity, seed):
    random = numpy.random.default_rng(seed)
    records = [struct.pack("<I", LIVE_MAGIC) + random.bytes(60)
               for _ in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "round.vrrl")
        export_vrrl(records, path, capacity)
        with open(path, "rb") as file:
            data = file.read()
        assert data == _original_publish(records, capacity)
        assert import_vrrl(path) == records[max(0, count - capacity):]
        header = read_vrrl_header(path)
        assert (header.capacity, header.next_slot) == (capacity,
                                                       count % capacity)


@pytest.mark.parametrize("capacity, shown", [(0, "0"), (1_048_577, "1048577"),
                                             (-1, "-1")])
def test_export_rejects_capacity_out_of_range(tmp_path, capacity, shown):
    path = tmp_path / "out.vrrl"
    with pytest.raises(ValueError, match=re.escape(
            f"VRRL capacity {shown} is outside 1..=1048576 records"
            " (VRRL_CAPACITY_MIN..=VRRL_CAPACITY_MAX); choose a capacity")):
        export_vrrl([_record(0)], path, capacity)
    assert not path.exists()


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_export_rejects_a_record_of_the_wrong_size_naming_its_index(
        tmp_path, size):
    path = tmp_path / "out.vrrl"
    records = [_record(0), _record(1), b"\xef\xbe\xad\xde" + b"\x01" * (size - 4)
               if size >= 4 else b"\x00" * size]
    with pytest.raises(ValueError, match=re.escape(
            f"record 2 is {size} bytes, a slot record is exactly 64"
            " (RECORD_SIZE_BYTES)")):
        export_vrrl(records, path, 4)
    assert not path.exists()


@pytest.mark.parametrize("magic", [0, 0xDEADBEEE])
def test_export_rejects_a_record_that_could_not_be_read_back(tmp_path, magic):
    path = tmp_path / "out.vrrl"
    bad = struct.pack("<I", magic) + _record(1)[4:]
    with pytest.raises(ValueError, match=re.escape(
            f"record 1 has magic 0x{magic:08x}, expected 0xdeadbeef"
            " (RECORD_MAGIC)")):
        export_vrrl([_record(0), bad], path, 4)
    assert not path.exists()


def test_failed_export_leaves_the_previous_file_and_no_litter(tmp_path):
    path = tmp_path / "out.vrrl"
    export_vrrl([_record(0)], path, 2)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"record 1 is 3 bytes"):
        export_vrrl([_record(5), b"abc"], path, 2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.vrrl"]


def test_export_replaces_an_existing_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.vrrl"
    path.write_bytes(b"old contents, much longer than the new file" * 100)
    export_vrrl([_record(1)], path, 1)
    assert path.read_bytes() == _original_publish([_record(1)], 1)
    assert sorted(os.listdir(tmp_path)) == ["out.vrrl"]


def test_export_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.vrrl"

    def failing_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        export_vrrl([_record(0)], path, 2)
    assert os.listdir(tmp_path) == []


# -- streaming export (issue 9, item 17) ----------------------------------------------


@pytest.mark.parametrize("capacity, count, frame", [
    (7, 30, 4),  # wraps several times, frames across the wrap
    (100, 60, 13),  # never wraps: finish(shrink=True) fits the capacity to 60
    (5, 9000, 4500),  # a frame larger than a piece and than the capacity
])
def test_a_streamed_export_is_byte_identical_to_the_original(tmp_path, capacity, count, frame):
    from ringtail.ioring.vrrl import VrrlWriter, write_vrrl_file
    records = [_record(n) for n in range(count)]
    data = b"".join(records)
    path = tmp_path / "streamed.vrrl"

    def fill(fd: int) -> None:
        writer = VrrlWriter(fd, capacity)
        for start in range(0, len(data), frame * 64):
            writer.write(data[start:start + frame * 64])
        writer.finish(shrink=True)

    write_vrrl_file(path, fill)
    fitted = min(capacity, count)
    assert path.read_bytes() == _original_publish(records, fitted)


def test_a_streamed_export_names_the_bad_record_by_its_index_and_writes_nothing(tmp_path):
    from ringtail.ioring.vrrl import VrrlWriter, write_vrrl_file
    bad = bytearray(_record(5001))
    bad[0:4] = (0x0BADF00D).to_bytes(4, "little")
    data = b"".join(_record(n) for n in range(5001)) + bytes(bad)
    path = tmp_path / "bad.vrrl"

    def fill(fd: int) -> None:
        writer = VrrlWriter(fd, 10)
        writer.write(data[:3000 * 64])
        writer.write(data[3000 * 64:])

    with pytest.raises(ValueError, match=r"^record 5001 has magic 0x0badf00d, expected "
                                         r"0xdeadbeef"):
        write_vrrl_file(path, fill)
    assert os.listdir(tmp_path) == []


def test_export_memory_does_not_grow_with_the_capacity_or_the_record_count(tmp_path):
    """A full-capacity export (1,048,576 records, a 64 MiB file) holds at most a
    few pieces: it used to build the whole file image in memory."""
    import tracemalloc
    from ringtail.ioring.vrrl import VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX
    record = _record(1)
    path = tmp_path / "full.vrrl"
    tracemalloc.start()
    try:
        export_vrrl((record for _ in range(VRRL_CAPACITY_MAX)), path, VRRL_CAPACITY_MAX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    piece = VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX * 64
    assert peak < 4 * piece, f"peak {peak} bytes for a {piece}-byte piece"
    assert os.path.getsize(path) == 32 + VRRL_CAPACITY_MAX * 64
