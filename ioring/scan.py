"""Offline, read-only views of a ring file: `inspect` and full `verify`.

Both open the file O_RDONLY and never write, so they are safe while the daemon
runs. A verify racing the daemon can see a chunk that a batch in flight is
evicting; such a chunk is re-checked against a fresh header and counted as
evicted, not damaged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ioring.format import CHUNK_RECORD_COUNT, Header, Layout
from ioring.reader import NO_COPY, ChunkTable, check_chunk
from ioring.errors import RingCorruptError
from ioring.record import RECORD_SIZE_BYTES
from ioring.recovery import check_geometry, read_header
from ioring.ring import is_locked_by_writer


@dataclasses.dataclass(frozen=True, slots=True)
class RingInfo:
    path: str
    header: Header
    header_copy: int
    other_copy_problem: str | None
    layout: Layout

    @property
    def retained_record_count(self) -> int:
        return self.header.next_sequence - self.header.oldest_sequence

    @property
    def fill_fraction(self) -> float:
        return self.retained_record_count / self.header.capacity

    def rows(self) -> list[tuple[str, str]]:
        header = self.header
        return [
            ("path", self.path),
            ("format version", str(header.format_version)),
            ("tenant id", str(header.tenant_id)),
            ("capacity", f"{header.capacity} records"),
            ("oldest sequence", str(header.oldest_sequence)),
            ("next sequence", str(header.next_sequence)),
            ("retained", f"{self.retained_record_count} records"),
            ("fill", f"{self.fill_fraction:.1%}"),
            ("header copy in use", f"{self.header_copy} (generation {header.generation})"),
            ("other header copy", self.other_copy_problem or "valid"),
            ("created", str(header.created_ns)),
            ("file id", f"{header.file_id:016x}"),
            ("file size", f"{self.layout.file_size_bytes} bytes"),
        ]


def inspect_ring(path: str) -> RingInfo:
    """Header facts of a ring file.

    Raises:
        RingFormatError, RingCorruptError: as for opening the ring.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, copy, problem = read_header(fd, path)
        layout = check_geometry(fd, path, header)
    finally:
        os.close(fd)
    return RingInfo(path, header, copy, problem, layout)


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    path: str
    verified_record_count: int
    evicted_during_scan: int
    damaged: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_ring(path: str, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every retained chunk's checksum; collect every damaged range.

    `progress(done, total)` is called per chunk run (records).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, _, _ = read_header(fd, path)
        layout = check_geometry(fd, path, header)
        table = ChunkTable(layout, os.pread(fd, layout.table_size_bytes, layout.table_offset(0)),
                           os.pread(fd, layout.table_size_bytes, layout.table_offset(1)))
        # With no writer, the file is still: every failure is damage. With the
        # daemon running, a failing chunk may be one a batch is evicting.
        live = is_locked_by_writer(fd)
        damaged = []
        verified = evicted = 0
        oldest, next_sequence = header.oldest_sequence, header.next_sequence
        total = next_sequence - oldest
        for chunk in range(oldest // CHUNK_RECORD_COUNT, -(-next_sequence // CHUNK_RECORD_COUNT)):
            first = max(oldest, chunk * CHUNK_RECORD_COUNT)
            count = min(next_sequence, (chunk + 1) * CHUNK_RECORD_COUNT) - chunk * CHUNK_RECORD_COUNT
            candidates = table.candidates(chunk, count)
            position = chunk % layout.chunk_count
            table.current[position] = candidates[0][0] if candidates else NO_COPY
            offset = layout.record_offset(chunk * CHUNK_RECORD_COUNT)
            records = os.pread(fd, count * RECORD_SIZE_BYTES, offset)
            try:
                check_chunk(path, table, header.file_id, chunk, memoryview(records), offset)
                verified += count - (first - chunk * CHUNK_RECORD_COUNT)
            except RingCorruptError as error:
                fresh, _, _ = read_header(fd, path)
                evicting_to = layout.oldest_after_append(
                    fresh.oldest_sequence, fresh.next_sequence + layout.batch_record_count_max)
                if live and evicting_to > first:
                    evicted += count
                else:
                    damaged.append(str(error))
            if progress is not None:
                progress(min(total, (chunk + 1) * CHUNK_RECORD_COUNT - oldest), total)
    finally:
        os.close(fd)
    return VerifyReport(path, verified, evicted, tuple(damaged))
