"""Verified reads from a ring file: every returned byte passed its chunk checksum.

`ChunkTable` mirrors both on-disk chunk tables and knows which copy is
current for each table position. `read_verified` turns a sequence range into
file ranges (O(1) arithmetic), reads whole chunks, checks each against its
entry (position, first sequence, count and checksum) and returns only the
asked-for records. Used by the writer (`RingFile.read`) and by the offline
tools (`verify`, `inspect`) alike.
"""

from __future__ import annotations

import errno
import os

import numpy

from ringtail.ioring.errors import RingClosedError, RingCorruptError, RingRangeError
from ringtail.ioring.format import (CHUNK_ENTRY_DTYPE, CHUNK_ENTRY_SIZE_BYTES, CHUNK_RECORD_COUNT,
                                    CHUNK_SIZE_BYTES, ENTRY_HEAD, ChunkEntry, Layout, chunk_checksum,
                                    chunk_digest, decode_entry)
from ringtail.ioring.record import RECORD_SIZE_BYTES

NO_COPY = 0xFF


class ChunkTable:
    """In-memory mirror of tables A and B plus the current copy per position."""

    def __init__(self, layout: Layout, table_a: bytes, table_b: bytes):
        self.layout = layout
        self.tables = [bytearray(table_a), bytearray(table_b)]
        self.current = bytearray([NO_COPY]) * layout.chunk_count

    def entry(self, table_index: int, position: int) -> ChunkEntry:
        start = position * CHUNK_ENTRY_SIZE_BYTES
        return decode_entry(self.tables[table_index][start:start + CHUNK_ENTRY_SIZE_BYTES])

    def current_entry(self, chunk_index: int) -> ChunkEntry | None:
        position = chunk_index % self.layout.chunk_count
        copy = self.current[position]
        return None if copy == NO_COPY else self.entry(copy, position)

    def install(self, table_index: int, position: int, encoded: bytes) -> None:
        start = position * CHUNK_ENTRY_SIZE_BYTES
        self.tables[table_index][start:start + CHUNK_ENTRY_SIZE_BYTES] = encoded
        self.current[position] = table_index

    def candidates(self, chunk_index: int, count_max: int = CHUNK_RECORD_COUNT
                   ) -> list[tuple[int, ChunkEntry]]:
        """Both copies' entries that claim this chunk with at most `count_max`
        records, largest count first."""
        position = chunk_index % self.layout.chunk_count
        found = []
        for copy in (0, 1):
            entry = self.entry(copy, position)
            if (entry.first_sequence == chunk_index * CHUNK_RECORD_COUNT
                    and 0 < entry.record_count <= count_max):
                found.append((copy, entry))
        found.sort(key=lambda item: -item[1].record_count)
        return found

    def choose_first_candidates(self, chunk_first: int, chunk_end: int,
                                next_sequence: int) -> None:
        """Make each chunk's first candidate current, for chunks [chunk_first, chunk_end).

        The vectorised form of `current[position] = candidates(chunk,
        count_max)[0][0]` (or NO_COPY) with `count_max` the chunk's records
        below `next_sequence`: both tables are decoded with CHUNK_ENTRY_DTYPE
        and compared at once, table A winning a tie as in `candidates`.
        """
        chunk_count = self.layout.chunk_count
        # Each position once: the caller splits longer ranges.
        assert chunk_first <= chunk_end <= chunk_first + chunk_count
        assert chunk_end * CHUNK_RECORD_COUNT < next_sequence + CHUNK_RECORD_COUNT
        chunks = numpy.arange(chunk_first, chunk_end, dtype=numpy.uint64)
        positions = chunks % numpy.uint64(chunk_count)
        firsts = chunks * numpy.uint64(CHUNK_RECORD_COUNT)
        count_max = numpy.minimum(numpy.uint64(CHUNK_RECORD_COUNT),
                                  numpy.uint64(next_sequence) - firsts)
        valid, counts = [], []
        for table in self.tables:
            entries = numpy.frombuffer(table, dtype=CHUNK_ENTRY_DTYPE,
                                       count=chunk_count)[positions]
            count = entries["record_count"]
            valid.append((entries["first_sequence"] == firsts) & (count > 0)
                         & (count <= count_max))
            counts.append(count)
        take_b = valid[1] & (~valid[0] | (counts[1] > counts[0]))
        choice = numpy.where(take_b, 1, numpy.where(valid[0], 0, NO_COPY))
        numpy.frombuffer(self.current, dtype=numpy.uint8)[positions] = choice


def read_verified(fd: int, path: str, table: ChunkTable, file_id: int,
                  first_sequence: int, count: int, oldest: int, next_sequence: int,
                  cached_only: bool = False) -> bytes:
    """Records [first_sequence, first_sequence + count), each chunk verified.

    `cached_only`: read only what the page cache holds (preadv RWF_NOWAIT),
    never waiting for the disk; for a caller on an event loop. The records
    then come as a bytearray (read into once, not copied again).

    Raises:
        RingRangeError: part of the range is not retained.
        RingCorruptError: a chunk failed its checks; names the file and offset.
        BlockingIOError: `cached_only` and part of the range is not in the page
            cache (or the file system cannot tell): read it where waiting is fine.
    """
    layout = table.layout
    end, chunk_first, chunk_last = _chunk_span(first_sequence, count, oldest, next_sequence)
    pieces = []
    for chunk, run, run_start, run_end, offset, size in _chunk_runs(
            layout, chunk_first, chunk_last, next_sequence):
        data = _read_cached(fd, size, offset) if cached_only else os.pread(fd, size, offset)
        if len(data) != size:
            raise RingCorruptError(path, offset + len(data),
                                   f"file ends inside the data region (read {len(data)} of {size} bytes)")
        view = memoryview(data)
        verify_run(path, table, file_id, chunk, run, view, offset)
        skip = (max(first_sequence, run_start) - run_start) * RECORD_SIZE_BYTES
        take = (min(end, run_end) - max(first_sequence, run_start)) * RECORD_SIZE_BYTES
        pieces.append(view[skip:skip + take] if skip or take != size else data)
    # One whole run is returned as read (bytes, or the bytearray of a cached-only read).
    return pieces[0] if len(pieces) == 1 and not isinstance(pieces[0], memoryview) \
        else b"".join(pieces)


def _chunk_span(first_sequence: int, count: int, oldest: int,
                next_sequence: int) -> tuple[int, int, int]:
    """(end, first chunk, last chunk) of a retained range; RingRangeError if it is not."""
    if count <= 0 or first_sequence < oldest or first_sequence + count > next_sequence:
        raise RingRangeError(first_sequence, count, oldest, next_sequence)
    end = first_sequence + count
    return end, first_sequence // CHUNK_RECORD_COUNT, (end - 1) // CHUNK_RECORD_COUNT


def read_verified_into(fd: int, path: str, table: ChunkTable, file_id: int,
                       first_sequence: int, count: int, oldest: int, next_sequence: int,
                       buffer: memoryview, cached_only: bool = False) -> memoryview:
    """`read_verified` into the caller's `buffer`: no allocation per read.

    The whole chunks covering the range are read into the start of `buffer`
    (preadv), verified there, and the asked-for records are returned as a
    view of `buffer` (valid until the caller reads into it again). `buffer`
    must hold the covering chunks (`read_buffer_size_bytes(count)` does). The replay path's read
    (service/subscribers.py): a fresh 256 KiB buffer per read was an mmap, its
    page faults and a munmap each time (service/limits.py fixes glibc's mmap
    threshold at 128 KiB).

    Raises: as `read_verified` (RingRangeError, RingCorruptError,
    BlockingIOError for `cached_only`); ValueError if `buffer` is too small.
    """
    layout = table.layout
    end, chunk_first, chunk_last = _chunk_span(first_sequence, count, oldest, next_sequence)
    covering = (min((chunk_last + 1) * CHUNK_RECORD_COUNT, next_sequence)
                - chunk_first * CHUNK_RECORD_COUNT) * RECORD_SIZE_BYTES
    if covering > buffer.nbytes:
        raise ValueError(f"read buffer of {buffer.nbytes} bytes is smaller than the "
                         f"{covering} bytes of chunks holding records {first_sequence}.."
                         f"{end - 1}; size it with read_buffer_size_bytes({count})")
    at = 0  # where the next run lands in `buffer`: runs follow each other
    for chunk, run, _, _, offset, size in _chunk_runs(layout, chunk_first, chunk_last,
                                                      next_sequence):
        view = buffer[at:at + size]
        got = _read_into_cached(fd, view, offset) if cached_only else os.preadv(fd, [view], offset)
        if got != size:
            raise RingCorruptError(path, offset + got,
                                   f"file ends inside the data region (read {got} of {size} bytes)")
        verify_run(path, table, file_id, chunk, run, view, offset)
        at += size
    # Only the first run can start before first_sequence and only the last
    # can run past `end`: the records are one contiguous slice.
    skip = (first_sequence - chunk_first * CHUNK_RECORD_COUNT) * RECORD_SIZE_BYTES
    return buffer[skip:skip + count * RECORD_SIZE_BYTES]


def _chunk_runs(layout, chunk_first: int, chunk_last: int, next_sequence: int):
    """The runs of chunks chunk_first..chunk_last that lie contiguously in the
    file (two at most: the ring wraps once), one read each: (first chunk, chunk
    count, first sequence, end sequence (capped at the cursor), file offset,
    bytes)."""
    chunk = chunk_first
    while chunk <= chunk_last:
        run = min(chunk_last - chunk + 1, layout.chunk_count - chunk % layout.chunk_count)
        run_start = chunk * CHUNK_RECORD_COUNT
        run_end = min((chunk + run) * CHUNK_RECORD_COUNT, next_sequence)
        yield (chunk, run, run_start, run_end, layout.record_offset(run_start),
               (run_end - run_start) * RECORD_SIZE_BYTES)
        chunk += run


def read_buffer_size_bytes(record_count_max: int) -> int:
    """The `read_verified_into` buffer for reads of up to `record_count_max`
    records from any start: the whole chunks covering them, one more than
    they fill for a start inside a chunk."""
    return (-(-record_count_max // CHUNK_RECORD_COUNT) + 1) * CHUNK_SIZE_BYTES


def _read_into_cached(fd: int, view: memoryview, offset: int) -> int:
    """preadv RWF_NOWAIT into `view`: its size, or BlockingIOError (part of it
    is not in the page cache, or the file system cannot tell)."""
    try:
        got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            raise BlockingIOError(errno.EAGAIN, "not all in the page cache") from None
        raise
    if got != view.nbytes:
        raise BlockingIOError(errno.EAGAIN, f"{got} of {view.nbytes} bytes in the page cache")
    return got


def _read_cached(fd: int, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset` if the page cache holds them all, else
    BlockingIOError (RWF_NOWAIT: no disk wait; a short read means part of it
    is not cached)."""
    data = bytearray(size)
    _read_into_cached(fd, memoryview(data), offset)
    return data


def read_ring_into(ring, first_sequence: int, count: int, buffer: memoryview,
                   cached_only: bool = False) -> memoryview:
    """`RingFile.read` into `buffer` (see `read_verified_into`): committed
    records [first_sequence, first_sequence + count) of an open ring, verified,
    as a view of `buffer`. A function here rather than a RingFile method
    while ring.py is under other edits; it reads the same fields `read` does.

    Raises: as RingFile.read, and ValueError for a `buffer` too small.
    """
    if ring._closed:
        raise RingClosedError(f"{ring.path}: ring is closed")
    return read_verified_into(ring._fd, ring.path, ring._table, ring._header.file_id,
                              first_sequence, count, ring.oldest_sequence, ring.next_sequence,
                              buffer, cached_only)


def verify_run(path: str, table: ChunkTable, file_id: int, chunk: int, run: int,
                view: memoryview, offset: int) -> None:
    """Check `run` consecutive chunks read into `view` (the replay hot path: one
    hash call and no objects per chunk; any doubt goes to `check_chunk`, which
    names the problem)."""
    current, tables = table.current, table.tables
    chunk_count = table.layout.chunk_count
    file_prefix = file_id.to_bytes(8, "little")
    unpack_head = ENTRY_HEAD.unpack_from
    for index in range(run):
        chunk_index = chunk + index
        start = index * CHUNK_SIZE_BYTES
        records = view[start:start + CHUNK_SIZE_BYTES]
        count = len(records) // RECORD_SIZE_BYTES
        position = chunk_index % chunk_count
        copy = current[position]
        if copy != NO_COPY:
            entries = tables[copy]
            at = position * CHUNK_ENTRY_SIZE_BYTES
            first_sequence, record_count = unpack_head(entries, at)
            if (first_sequence == chunk_index * CHUNK_RECORD_COUNT and record_count == count
                    and chunk_digest(file_prefix, first_sequence, records, count)
                    == entries[at + 16:at + CHUNK_ENTRY_SIZE_BYTES]):
                continue
        check_chunk(path, table, file_id, chunk_index, records, offset + start)
        raise AssertionError("check_chunk passed a chunk the fast path refused")


def check_chunk(path: str, table: ChunkTable, file_id: int, chunk_index: int,
                records: memoryview, offset: int) -> None:
    """Raise RingCorruptError unless `records` match the chunk's current entry."""
    entry = table.current_entry(chunk_index)
    first = chunk_index * CHUNK_RECORD_COUNT
    count = len(records) // RECORD_SIZE_BYTES
    position = chunk_index % table.layout.chunk_count
    if entry is None or entry.first_sequence != first:
        raise RingCorruptError(
            path, offset,
            f"no chunk-table entry for sequences {first}..{first + count - 1} "
            f"(table position {position}); run `ringtail verify` and restore or move the file")
    if entry.record_count != count:
        raise RingCorruptError(
            path, offset,
            f"chunk-table entry for sequence {first} holds {entry.record_count} records, "
            f"expected {count}; run `ringtail verify`")
    if chunk_checksum(file_id, first, records) != entry.checksum:
        raise RingCorruptError(
            path, offset,
            f"records {first}..{first + count - 1} failed their checksum; the bytes on disk "
            f"were damaged; run `ringtail verify` and restore from a copy")
