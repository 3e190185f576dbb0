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

from ringtail.ioring.errors import RingCorruptError
from ringtail.ioring.format import (CHUNK_RECORD_COUNT, CHUNK_SIZE_BYTES, HEADER_COPY_OFFSETS,
                                    Header, Layout)
from ringtail.ioring.reader import ChunkTable, verify_run
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.recovery import check_geometry, is_sealed, read_header
from ringtail.ioring.ring import is_locked_by_writer

# Chunks `verify` reads and checks at once: 256 x 4 KiB = a 1 MiB buffer,
# whatever the capacity (a full verify of the largest ring reads 1 GiB).
VERIFY_RUN_CHUNK_COUNT_MAX = 256


@dataclasses.dataclass(frozen=True, slots=True)
class RingInfo:
    path: str
    header: Header
    header_copy: int
    other_copy_problem: str | None
    layout: Layout
    writer_open: bool = False  # a writer held the ring's lock when it was inspected

    @property
    def last_close(self) -> str:
        """Whether the last writer closed the ring cleanly (the seal), and whether
        one has it open now."""
        header = self.header
        if header.oldest_sequence == header.next_sequence:
            state = "empty ring"
        elif is_sealed(header):
            state = "clean (sealed)"
        else:
            return ("not sealed: a writer has it open and has written" if self.writer_open
                    else "not sealed: the last writer crashed or was killed")
        return state + ("; a writer has it open now" if self.writer_open else "")

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
            ("producer slots", f"{header.producer_slot_count} (exactly-once window)"
             if header.producer_slot_count else "none (version 1: at least once)"),
            ("tenant id", str(header.tenant_id)),
            ("capacity", f"{header.capacity} records"),
            ("oldest sequence", str(header.oldest_sequence)),
            ("next sequence", str(header.next_sequence)),
            ("retained", f"{self.retained_record_count} records"),
            ("fill", f"{self.fill_fraction:.1%}"),
            ("header copy in use", f"{self.header_copy} (generation {header.generation})"),
            ("last close", self.last_close),
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
        writer_open = is_locked_by_writer(fd)
    finally:
        os.close(fd)
    return RingInfo(path, header, copy, problem, layout, writer_open)


def header_copy_problem(copy_in_use: int, problem: str | None) -> str | None:
    """A line naming the header copy that is not in use, its offset and why it is
    unusable (or stale), or None when it is the fine previous generation."""
    if problem is None:
        return None
    other = 1 - copy_in_use
    return (f"header copy {other} at byte offset {HEADER_COPY_OFFSETS[other]} is unusable: "
            f"{problem} (copy {copy_in_use} is in use; a crash during a header write can "
            f"leave this, else the header page was damaged; the next batch rewrites copy {other})")


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    path: str
    verified_record_count: int
    evicted_during_scan: int
    damaged: tuple[str, ...]
    header_problems: tuple[str, ...] = ()  # a header copy that is unusable, with its offset

    @property
    def ok(self) -> bool:
        """No record is damaged (an unusable header copy alone is not data loss:
        `ringtail verify --strict` fails on it too)."""
        return not self.damaged


def verify_ring(path: str, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every retained chunk's checksum; collect every damaged range.

    Chunks are read in runs of at most VERIFY_RUN_CHUNK_COUNT_MAX (one pread
    each); each run's entries are chosen with one vectorised table decode and
    checked by the reader's run check. `progress(done, total)` is called per
    chunk run (records).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, copy, problem = read_header(fd, path)
        header_problem = header_copy_problem(copy, problem)
        layout = check_geometry(fd, path, header)
        table = ChunkTable(layout, os.pread(fd, layout.table_size_bytes, layout.table_offset(0)),
                           os.pread(fd, layout.table_size_bytes, layout.table_offset(1)))
        # With no writer, the file is still: every failure is damage. With the
        # daemon running, a failing chunk may be one a batch is evicting.
        live = is_locked_by_writer(fd)
        damaged: list[str] = []
        verified = evicted = 0
        oldest, next_sequence = header.oldest_sequence, header.next_sequence
        total = next_sequence - oldest
        chunk, chunk_end = oldest // CHUNK_RECORD_COUNT, -(-next_sequence // CHUNK_RECORD_COUNT)
        while chunk < chunk_end:
            # A run lies contiguously in the file and holds each position once.
            run = min(chunk_end - chunk, layout.chunk_count - chunk % layout.chunk_count,
                      VERIFY_RUN_CHUNK_COUNT_MAX)
            table.choose_first_candidates(chunk, chunk + run, next_sequence)
            run_start = chunk * CHUNK_RECORD_COUNT
            run_end = min((chunk + run) * CHUNK_RECORD_COUNT, next_sequence)
            offset = layout.record_offset(run_start)
            size = (run_end - run_start) * RECORD_SIZE_BYTES
            data = os.pread(fd, size, offset)
            if len(data) != size:  # the file shrank under us (geometry was checked)
                damaged.append(str(RingCorruptError(
                    path, offset + len(data),
                    f"file ends inside the data region (read {len(data)} of {size} bytes)")))
            else:
                failed = _verify_chunks(path, table, header.file_id, chunk, run,
                                        memoryview(data), offset)
                verified += run_end - max(oldest, run_start)
                for chunk_index, error in failed:
                    first = max(oldest, chunk_index * CHUNK_RECORD_COUNT)
                    count = min(next_sequence, (chunk_index + 1) * CHUNK_RECORD_COUNT) \
                        - chunk_index * CHUNK_RECORD_COUNT
                    verified -= count - (first - chunk_index * CHUNK_RECORD_COUNT)
                    fresh, _, _ = read_header(fd, path)
                    evicting_to = layout.oldest_after_append(
                        fresh.oldest_sequence,
                        fresh.next_sequence + layout.batch_record_count_max)
                    if live and evicting_to > first:
                        evicted += count
                    else:
                        damaged.append(str(error))
            chunk += run
            if progress is not None:
                progress(min(total, chunk * CHUNK_RECORD_COUNT - oldest), total)
    finally:
        os.close(fd)
    return VerifyReport(path, verified, evicted, tuple(damaged),
                        (header_problem,) if header_problem else ())


def _verify_chunks(path: str, table: ChunkTable, file_id: int, chunk: int, run: int,
                   view: memoryview, offset: int) -> list[tuple[int, RingCorruptError]]:
    """Check `run` chunks read into `view`; return (chunk index, error) per failing chunk."""
    failed = []
    index = 0
    while index < run:
        start = index * CHUNK_SIZE_BYTES
        try:
            verify_run(path, table, file_id, chunk + index, run - index, view[start:],
                       offset + start)
            break
        except RingCorruptError as error:
            failing = (error.offset - offset) // CHUNK_SIZE_BYTES
            assert index <= failing < run
            failed.append((chunk + failing, error))
            index = failing + 1
    return failed
