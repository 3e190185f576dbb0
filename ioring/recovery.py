"""Recovery on open: pick a header, rebuild the chunk table, verify the edges.

The algorithm (docs/FORMAT.md, "Recovery", is the contract):

1. Decode both header copies; use the valid one with the highest generation.
2. Load both chunk tables. For every retained chunk, the current copy is the
   one whose entry names that chunk with the largest record count.
3. Tail: records in [batch_first_sequence, next_sequence) belong to the last
   batch, whose fdatasync may not have completed. Verify those chunks; cut
   the cursor at the first record that does not verify.
4. Head: a batch in flight may have been overwriting the oldest chunks.
   Verify chunks from the oldest while they lie inside that batch's reach;
   advance the oldest past each one that fails (reported as a gap).
5. Records below batch_first_sequence were durable when the header was
   written; they are verified on every read, not here.

Recovery reports what it did and never exposes a record it did not verify
or a sequence at or beyond the header's cursor.
"""

from __future__ import annotations

import dataclasses
import os

from ioring.errors import RingCorruptError, RingFormatError
from ioring.format import (BATCH_RECORD_COUNT_MAX, CHUNK_RECORD_COUNT,
                           HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES, PAGE_SIZE_BYTES,
                           Header, HeaderDecodeError, Layout, capacity_problem,
                           chunk_checksum, decode_header)
from ioring.reader import ChunkTable
from ioring.record import RECORD_SIZE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What recovery found and did. `dropped_*` ranges are inclusive."""

    path: str
    created: bool
    header_copy: int
    header_generation: int
    other_copy_problem: str | None
    oldest_sequence: int
    next_sequence: int
    verified_record_count: int
    dropped_tail: tuple[int, int] | None = None
    dropped_head: tuple[int, int] | None = None

    def summary(self) -> str:
        if self.created:
            return f"created empty ring {self.path}"
        parts = [f"header copy {self.header_copy} (generation {self.header_generation})",
                 f"retained {self.oldest_sequence}..{self.next_sequence - 1}"
                 if self.next_sequence > self.oldest_sequence else "empty",
                 f"verified {self.verified_record_count} edge records"]
        if self.other_copy_problem:
            parts.append(f"other header copy unusable: {self.other_copy_problem}")
        if self.dropped_tail:
            parts.append("dropped unverified tail %d..%d (never acknowledged, or damaged)"
                         % self.dropped_tail)
        if self.dropped_head:
            parts.append("lost oldest %d..%d (evicted by a batch in flight at the crash)"
                         % self.dropped_head)
        return "; ".join(parts)


def read_header(fd: int, path: str) -> tuple[Header, int, str | None]:
    """The newest valid header copy, its index, and why the other is unusable."""
    size = os.fstat(fd).st_size
    if size < len(HEADER_COPY_OFFSETS) * PAGE_SIZE_BYTES:
        raise RingFormatError(
            path, f"truncated: {size} bytes is smaller than the two header pages "
                  f"({2 * PAGE_SIZE_BYTES} bytes); this is not a complete ring file")
    decoded: list[Header | HeaderDecodeError] = []
    for offset in HEADER_COPY_OFFSETS:
        try:
            decoded.append(decode_header(os.pread(fd, HEADER_SIZE_BYTES, offset)))
        except HeaderDecodeError as error:
            decoded.append(error)
    valid = [(h, i) for i, h in enumerate(decoded) if isinstance(h, Header)]
    if not valid:
        reasons = [e.reason for e in decoded]
        if all(r == "bad magic" for r in reasons):
            raise RingFormatError(
                path, f"not a ringtail ring file (magic {os.pread(fd, 8, 0)!r}, expected "
                      "b'RINGTAIL'); point ringtail at its data directory or move this file away")
        if "unsupported version" in reasons:
            raise RingFormatError(
                path, "unsupported format version (" + "; ".join(map(str, decoded))
                + "); this ringtail reads version 1: use the ringtail that wrote it")
        raise RingCorruptError(
            path, 0, "both header copies are unusable (copy 0: %s; copy 1: %s); the cursor "
                     "is lost: restore the file from a copy or move it away" % tuple(decoded))
    header, index = max(valid, key=lambda item: item[0].generation)
    other = decoded[1 - index]
    if isinstance(other, Header):
        problem = None if other.generation == header.generation - 1 else \
            f"stale generation {other.generation}"
    else:
        problem = str(other)
    return header, index, problem


def check_geometry(fd: int, path: str, header: Header) -> Layout:
    problem = capacity_problem(header.capacity)
    if problem:
        raise RingFormatError(path, f"header holds an unusable capacity: {problem}")
    layout = Layout(header.capacity)
    size = os.fstat(fd).st_size
    if size != layout.file_size_bytes:
        raise RingFormatError(
            path, f"file is {size} bytes but capacity {header.capacity} needs "
                  f"{layout.file_size_bytes}; the file was truncated or extended: restore it")
    return layout


def recover(fd: int, path: str) -> tuple[Header, Layout, ChunkTable, RecoveryReport]:
    """Run the recovery algorithm; return the header to continue from.

    The returned header has the recovered oldest/next; the caller persists it
    (as a new generation) if it differs from the one on disk.
    """
    header, copy, other_problem = read_header(fd, path)
    layout = check_geometry(fd, path, header)
    table_size = layout.table_size_bytes
    table = ChunkTable(layout, os.pread(fd, table_size, layout.table_offset(0)),
                       os.pread(fd, table_size, layout.table_offset(1)))
    oldest, next_sequence = header.oldest_sequence, header.next_sequence
    for chunk in range(oldest // CHUNK_RECORD_COUNT,
                       -(-next_sequence // CHUNK_RECORD_COUNT)):
        candidates = table.candidates(chunk, _count_max(chunk, next_sequence))
        if candidates:
            table.current[chunk % layout.chunk_count] = candidates[0][0]
    verified = 0
    # Tail: cut at the first chunk of the last batch that does not verify.
    new_next = next_sequence
    for chunk in range(header.batch_first_sequence // CHUNK_RECORD_COUNT,
                       -(-next_sequence // CHUNK_RECORD_COUNT)):
        first = chunk * CHUNK_RECORD_COUNT
        good = _verified_count(fd, layout, table, header.file_id, chunk,
                               _count_max(chunk, next_sequence))
        verified += good
        if first + good < min(next_sequence, first + CHUNK_RECORD_COUNT):
            new_next = max(first + good, oldest)
            break
    # Head: the in-flight batch could reach this far past the old cursor.
    reach = next_sequence + min(BATCH_RECORD_COUNT_MAX, layout.batch_record_count_max)
    new_oldest = oldest
    while new_oldest < new_next and new_oldest + header.capacity < reach + CHUNK_RECORD_COUNT:
        chunk = new_oldest // CHUNK_RECORD_COUNT
        expected = min(new_next, (chunk + 1) * CHUNK_RECORD_COUNT) - chunk * CHUNK_RECORD_COUNT
        good = _verified_count(fd, layout, table, header.file_id, chunk, expected)
        if good >= expected:
            verified += expected
            break
        new_oldest = min(new_next, (chunk + 1) * CHUNK_RECORD_COUNT)
    report = RecoveryReport(
        path=path, created=False, header_copy=copy, header_generation=header.generation,
        other_copy_problem=other_problem, oldest_sequence=new_oldest,
        next_sequence=new_next, verified_record_count=verified,
        dropped_tail=(new_next, next_sequence - 1) if new_next < next_sequence else None,
        dropped_head=(oldest, new_oldest - 1) if new_oldest > oldest else None)
    recovered = dataclasses.replace(
        header, oldest_sequence=new_oldest, next_sequence=new_next,
        batch_first_sequence=max(new_oldest, min(header.batch_first_sequence, new_next)))
    return recovered, layout, table, report


def _count_max(chunk: int, next_sequence: int) -> int:
    """How many records of `chunk` lie below the cursor."""
    return min(CHUNK_RECORD_COUNT, next_sequence - chunk * CHUNK_RECORD_COUNT)


def _verified_count(fd: int, layout: Layout, table: ChunkTable, file_id: int,
                    chunk: int, count_max: int) -> int:
    """Records of `chunk` that verify against its best entry; marks it current."""
    position = chunk % layout.chunk_count
    first = chunk * CHUNK_RECORD_COUNT
    data = os.pread(fd, CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES, layout.record_offset(first))
    for copy, entry in table.candidates(chunk, count_max):
        records = data[:entry.record_count * RECORD_SIZE_BYTES]
        if chunk_checksum(file_id, first, records) == entry.checksum:
            table.current[position] = copy
            return entry.record_count
    table.current[position] = 0xFF
    return 0
