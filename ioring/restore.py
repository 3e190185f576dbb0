"""Restore a snapshot into a new ring file, keeping the records' sequences.

The ring is written by ioring's own writer (RingFile), starting from a
header whose cursor is the snapshot's first sequence, so the restored tenant
holds exactly the snapshot's records under their original sequences and
continues after the last one. docs/REPLAY.md says how to use it.

Order of work, so that a damaged snapshot can never leave a half-restored
tenant behind:

1. the whole snapshot is verified (every chunk, the trailer, the file checksum);
2. the target is checked: it must not exist, or be a ring that holds no
   records and that no process holds open for writing (no running daemon);
3. the ring is written to `<ring>.restoring`, every chunk verified again as it
   is read, then closed and fsynced;
4. only then is it given the ring's name (and the directory fsynced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

from ringtail.ioring.errors import RingFormatError
from ringtail.ioring.files import fsync_directory
from ringtail.ioring.format import (
    CHUNK_RECORD_COUNT,
    capacity_problem,
)
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.recovery import read_header
from ringtail.ioring.ring import create_ring_file, is_locked_by_writer, open_ring
from ringtail.ioring.snapshot import (
    SnapshotFormatError,
    SnapshotInfo,
    iter_snapshot_chunks,
    verify_snapshot,
)

RESTORING_SUFFIX = ".restoring"


class RestoreRefusedError(RingFormatError):
    """The target tenant cannot take the snapshot (holds records, is open, too small)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreReport:
    ring_path: str
    tenant_id: int
    capacity: int
    first_sequence: int
    record_count: int

    @property
    def next_sequence(self) -> int:
        return self.first_sequence + self.record_count


def restore_capacity(record_count: int, capacity_min: int) -> int:
    """The smallest valid ring capacity >= both: whole chunks of 64 records."""
    wanted = max(record_count, capacity_min, 2 * CHUNK_RECORD_COUNT)
    return -(-wanted // CHUNK_RECORD_COUNT) * CHUNK_RECORD_COUNT


def check_target(ring_path: str, tenant_id: int) -> None:
    """Refuse a target ring that holds records or that a process has open for writing.

    Raises:
        RestoreRefusedError: it holds records, or a daemon has it open.
    """
    try:
        fd = os.open(ring_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if is_locked_by_writer(fd):
            raise RestoreRefusedError(ring_path, (
                f"tenant {tenant_id}'s ring is open in a running daemon; stop the daemon "
                "(or restore into a tenant it has not opened), then restore again"))
        header, _, _ = read_header(fd, ring_path)
    finally:
        os.close(fd)
    if header.next_sequence > header.oldest_sequence:
        raise RestoreRefusedError(ring_path, (
            f"tenant {tenant_id} holds records {header.oldest_sequence}.."
            f"{header.next_sequence - 1}; restore goes into an empty tenant only: pick "
            "another tenant id"))


def restore_snapshot(snapshot_path: str, ring_path: str, tenant_id: int, capacity_min: int,
                     *, io: str = "threads",
                     progress: Callable[[str, int, int], None] | None = None) -> RestoreReport:
    """Write the snapshot's records into a ring file for `tenant_id` (see the module doc).

    Args:
        capacity_min: the ring holds at least this many records (and at least
            the snapshot's count).
        progress: called with ("verify" | "restore", done, total) records.

    Raises:
        SnapshotFormatError, SnapshotCorruptError: the snapshot is refused;
            nothing was written.
        RestoreRefusedError: the target is not an empty, closed tenant.
    """
    def stage(name: str):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    info: SnapshotInfo = verify_snapshot(snapshot_path, stage("verify"))
    header = info.header
    if header.first_sequence % CHUNK_RECORD_COUNT:
        raise SnapshotFormatError(snapshot_path, (
            f"first sequence {header.first_sequence} is not a multiple of "
            f"{CHUNK_RECORD_COUNT}; a ring's retained records start on a chunk boundary, so "
            "this snapshot was not taken by `ringtail snapshot`"))
    capacity = restore_capacity(header.record_count, capacity_min)
    problem = capacity_problem(capacity)
    if problem:
        raise RestoreRefusedError(ring_path, f"{problem} (the snapshot holds "
                                             f"{header.record_count} records)")
    check_target(ring_path, tenant_id)
    temporary = ring_path + RESTORING_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # left by a restore that crashed: never a ring
    done = False
    try:
        create_ring_file(temporary, capacity, tenant_id, first_sequence=header.first_sequence)
        with open_ring(temporary, tenant_id=tenant_id, io=io, sync="none") as ring:
            step = ring.batch_record_count_max * RECORD_SIZE_BYTES
            for first, records in iter_snapshot_chunks(snapshot_path, stage("restore")):
                assert first == ring.next_sequence
                for offset in range(0, len(records), step):
                    ring.append(records[offset:offset + step])
            assert ring.next_sequence == header.next_sequence
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        check_target(ring_path, tenant_id)  # again: a daemon may have created it meanwhile
        os.replace(temporary, ring_path)
        fsync_directory(os.path.dirname(os.path.abspath(ring_path)))
        done = True
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    return RestoreReport(ring_path, tenant_id, capacity, header.first_sequence,
                         header.record_count)
