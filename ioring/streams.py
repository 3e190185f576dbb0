"""Records of a ring file or a VRRL0001 file, streamed in order, in bounded reads.

Used by `ringtail diff` (and anything else that walks a whole file offline).
A ring file is opened O_RDONLY and never written, so this is safe while the
daemon runs; its header is read once, and the records retained at that
moment are the ones streamed. Every chunk is verified before it is yielded
(ioring.reader). A chunk the daemon evicts while it is being read fails its
check: that is reported (RingCorruptError with the offset, saying it was
evicted while read) rather than returned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ringtail.ioring.errors import RingCorruptError
from ringtail.ioring.format import CHUNK_RECORD_COUNT
from ringtail.ioring.reader import ChunkTable, read_verified
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.recovery import check_geometry, read_header
from ringtail.ioring.ring import is_locked_by_writer
from ringtail.ioring.vrrl import import_vrrl

# Chunks read and verified per pread: 1,024 x 64 records x 64 B = 4 MiB, the
# most record memory a ring-file stream holds (beside the two chunk tables it
# mirrors: 2 x 32 B per chunk, 16 MiB at the largest capacity).
STREAM_RUN_CHUNK_COUNT_MAX = 1024
# Records per piece a VRRL stream yields (the file itself is read at once,
# at most VRRL_CAPACITY_MAX x 64 B = 64 MiB, by ioring.vrrl.import_vrrl).
VRRL_STREAM_RECORD_COUNT = STREAM_RUN_CHUNK_COUNT_MAX * CHUNK_RECORD_COUNT


def ring_retained_range(path: str) -> tuple[int, int]:
    """(oldest_sequence, next_sequence) of the ring's current header."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, _, _ = read_header(fd, path)
    finally:
        os.close(fd)
    return header.oldest_sequence, header.next_sequence


def iter_ring_records(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (first_sequence, records) for every record retained when the header was read.

    Raises:
        RingFormatError, RingCorruptError: as opening the ring offline, or a
            chunk failed its check (damage, or evicted by the running daemon
            while it was read: the message says which is likely).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, _, _ = read_header(fd, path)
        layout = check_geometry(fd, path, header)
        table = ChunkTable(layout, os.pread(fd, layout.table_size_bytes, layout.table_offset(0)),
                           os.pread(fd, layout.table_size_bytes, layout.table_offset(1)))
        oldest, next_sequence = header.oldest_sequence, header.next_sequence
        chunk, chunk_end = oldest // CHUNK_RECORD_COUNT, -(-next_sequence // CHUNK_RECORD_COUNT)
        while chunk < chunk_end:
            run = min(chunk_end - chunk, layout.chunk_count - chunk % layout.chunk_count,
                      STREAM_RUN_CHUNK_COUNT_MAX)
            table.choose_first_candidates(chunk, chunk + run, next_sequence)
            first = max(oldest, chunk * CHUNK_RECORD_COUNT)
            end = min((chunk + run) * CHUNK_RECORD_COUNT, next_sequence)
            try:
                data = read_verified(fd, path, table, header.file_id, first, end - first,
                                     oldest, next_sequence)
            except RingCorruptError as error:
                if not is_locked_by_writer(fd):
                    raise
                fresh, _, _ = read_header(fd, path)
                if fresh.oldest_sequence <= first:
                    raise
                raise RingCorruptError(path, error.offset, (
                    f"records from sequence {first} were evicted by the running daemon while "
                    f"they were read (oldest retained is now {fresh.oldest_sequence}); read "
                    "the tenant through the daemon (tenant:T) or snapshot it first")) from None
            yield first, bytes(data)
            chunk += run
    finally:
        os.close(fd)


def iter_vrrl_records(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (index of the first record, records) of a VRRL0001 file in replay order."""
    records = b"".join(import_vrrl(path))
    step = VRRL_STREAM_RECORD_COUNT * RECORD_SIZE_BYTES
    for offset in range(0, len(records), step):
        yield offset // RECORD_SIZE_BYTES, records[offset:offset + step]
