"""`reader.read_ring_into`: a verified read into the caller's buffer (the replay path).

It returns exactly what `RingFile.read` returns, as a view of the caller's
buffer (no copy, no allocation per read), from any start, across the ring's
wrap, from the page cache only or not; a buffer too small for the covering
chunks is refused by name; damage is refused as `read` refuses it. Real ring
files, both I/O backends where the test writes.
"""

from __future__ import annotations

import pytest

from ringtail.ioring import RingClosedError, RingCorruptError, RingRangeError, open_ring
from ringtail.ioring.format import CHUNK_RECORD_COUNT
from ringtail.ioring.reader import read_buffer_size_bytes, read_ring_into
from ringtail.ioring.record import RECORD_SIZE_BYTES
from tests.ioring.conftest import TENANT_ID, flip_byte, make_records

CAPACITY = 1024  # 16 chunks: the tests wrap it
READ_MAX = 300  # records per read in these tests (not a multiple of a chunk)


def fresh_buffer(record_count_max: int = READ_MAX) -> memoryview:
    return memoryview(bytearray(read_buffer_size_bytes(record_count_max)))


@pytest.mark.parametrize("cached_only", [False, True])
def test_every_range_reads_as_read_does_into_the_one_buffer(ring_path, io, cached_only):
    buffer = fresh_buffer()
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        written = 0
        for count in (100, 350, 400, 400, 400, 400, 250):  # 2,300 records: wraps twice
            ring.append(make_records(written, count))
            written += count
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        assert oldest > 0 and next_sequence == written
        starts = [oldest, oldest + 1, oldest + CHUNK_RECORD_COUNT - 1,
                  next_sequence - READ_MAX, next_sequence - 1]
        # Starts whose read crosses the file's end (the ring's wrap).
        wrap = (next_sequence // CAPACITY) * CAPACITY
        starts += [wrap - 5, wrap - CHUNK_RECORD_COUNT - 17]
        for first in starts:
            for count in (1, 63, 64, 65, READ_MAX):
                count = min(count, next_sequence - first)
                got = read_ring_into(ring, first, count, buffer, cached_only)
                assert got.obj is buffer.obj, "a view of the caller's buffer"
                assert bytes(got) == ring.read(first, count) == make_records(first, count), (
                    first, count)


def test_a_buffer_too_small_for_the_covering_chunks_is_refused_by_name(ring_path):
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads") as ring:
        ring.append(make_records(0, 250))
        ring.append(make_records(250, 250))
        exact = memoryview(bytearray(256 * RECORD_SIZE_BYTES))
        # Whole chunks: the records' own size suffices.
        assert bytes(read_ring_into(ring, 128, 256, exact)) == make_records(128, 256)
        with pytest.raises(ValueError, match=r"read buffer of 16384 bytes is smaller than the "
                           r"20480 bytes of chunks holding records 130\.\.385; size it with "
                           r"read_buffer_size_bytes\(256\)"):
            read_ring_into(ring, 130, 256, exact)
        assert read_buffer_size_bytes(256) == 20480


def test_damage_and_ranges_are_refused_as_read_refuses_them(ring_path, io):
    buffer = fresh_buffer()
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        ring.append(make_records(0, 300))
        ring.append(make_records(300, 300))
        flip_byte(ring_path, ring.layout.record_offset(200) + 9)
        with pytest.raises(RingCorruptError, match=r"records 192\.\.255 failed their checksum") \
                as caught:
            read_ring_into(ring, 150, READ_MAX, buffer)
        assert str(caught.value).startswith(f"{ring_path} at byte offset "
                                            f"{ring.layout.record_offset(192)}: ")
        # Before and after the damaged chunk: whole.
        assert bytes(read_ring_into(ring, 0, 192, buffer)) == make_records(0, 192)
        assert bytes(read_ring_into(ring, 256, READ_MAX, buffer)) == make_records(256, READ_MAX)
        with pytest.raises(RingRangeError):
            read_ring_into(ring, 590, 20, buffer)
    with pytest.raises(RingClosedError, match="ring is closed"):
        read_ring_into(ring, 0, 10, buffer)
