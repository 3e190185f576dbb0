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

from ringtail.ioring.errors import RingCorruptError, RingRangeError
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
    if count <= 0 or first_sequence < oldest or first_sequence + count > next_sequence:
        raise RingRangeError(first_sequence, count, oldest, next_sequence)
    layout = table.layout
    end = first_sequence + count
    chunk_first = first_sequence // CHUNK_RECORD_COUNT
    chunk_last = (end - 1) // CHUNK_RECORD_COUNT
    pieces = []
    chunk = chunk_first
    while chunk <= chunk_last:
        # One pread per run of chunks that lie contiguously in the file.
        position = chunk % layout.chunk_count
        run = min(chunk_last - chunk + 1, layout.chunk_count - position)
        run_start = chunk * CHUNK_RECORD_COUNT
        run_end = min((chunk + run) * CHUNK_RECORD_COUNT, next_sequence)
        offset = layout.record_offset(run_start)
        size = (run_end - run_start) * RECORD_SIZE_BYTES
        data = _read_cached(fd, size, offset) if cached_only else os.pread(fd, size, offset)
        if len(data) != size:
            raise RingCorruptError(path, offset + len(data),
                                   f"file ends inside the data region (read {len(data)} of {size} bytes)")
        view = memoryview(data)
        verify_run(path, table, file_id, chunk, run, view, offset)
        skip = (max(first_sequence, run_start) - run_start) * RECORD_SIZE_BYTES
        take = (min(end, run_end) - max(first_sequence, run_start)) * RECORD_SIZE_BYTES
        pieces.append(view[skip:skip + take] if skip or take != size else data)
        chunk += run
    # One whole run is returned as read (bytes, or the bytearray of a cached-only read).
    return pieces[0] if len(pieces) == 1 and not isinstance(pieces[0], memoryview) \
        else b"".join(pieces)


def _read_cached(fd: int, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset` if the page cache holds them all, else
    BlockingIOError (RWF_NOWAIT: no disk wait; a short read means part of it
    is not cached)."""
    data = bytearray(size)
    try:
        got = os.preadv(fd, [data], offset, os.RWF_NOWAIT)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            raise BlockingIOError(errno.EAGAIN, "not all in the page cache") from None
        raise
    if got != size:
        raise BlockingIOError(errno.EAGAIN, f"{got} of {size} bytes in the page cache")
    return data


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
