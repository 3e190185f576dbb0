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

Through a running daemon (docs/PROTOCOL.md 4.13) the daemon does not write
records this way: it only swaps the tenant's empty ring for an empty one
whose cursor is the snapshot's first sequence (`stage_empty_ring`, then
`install_staged_ring`), and the records arrive as ordinary publishes.
`restore_request_problem` is the check both paths make of a snapshot's range
against the target.
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


def restore_request_problem(first_sequence: int, record_count: int,
                            capacity: int | None = None) -> str | None:
    """What makes a snapshot's range unfit for a ring (None: fit).

    The first sequence must be a multiple of CHUNK_RECORD_COUNT (a ring's
    retained records start on a chunk boundary, so every snapshot of a ring
    does); with `capacity`, the records must fit it (a ring that wrapped
    while the restore publishes would evict the snapshot's first records).
    """
    if first_sequence % CHUNK_RECORD_COUNT:
        return (f"first sequence {first_sequence} is not a multiple of {CHUNK_RECORD_COUNT}; a "
                "ring's retained records start on a chunk boundary, so this snapshot was not "
                "taken by `ringtail snapshot`")
    if capacity is not None and record_count > capacity:
        return (f"the snapshot's {record_count} records exceed the tenant's capacity of "
                f"{capacity} records; restore into a tenant configured with a capacity of at "
                f"least {record_count} that holds no records yet, or restore offline "
                f"(`ringtail restore --offline --capacity {record_count}`, daemon stopped)")
    return None


def stage_empty_ring(ring_path: str, capacity: int, tenant_id: int, first_sequence: int) -> str:
    """Write `<ring>.restoring`, a complete empty ring whose cursor is `first_sequence`,
    beside the ring (allocated whole and fsynced); returns its path.

    A `.restoring` file already there was left by a restore that crashed: it
    is never a ring, and is replaced.
    """
    temporary = ring_path + RESTORING_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    create_ring_file(temporary, capacity, tenant_id, first_sequence=first_sequence)
    return temporary


def install_staged_ring(staged_path: str, ring_path: str) -> None:
    """Give the staged ring the ring's name (one rename) and fsync the directory.

    Crash-safe: before the rename the old ring is at `ring_path`, after it the
    new one; there is no moment without a complete ring file there.
    """
    os.replace(staged_path, ring_path)
    fsync_directory(os.path.dirname(os.path.abspath(ring_path)))


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
                f"tenant {tenant_id}'s ring is open in a running daemon; restore through it "
                "(without --offline, --socket naming its socket), or stop the daemon (or "
                "restore into a tenant it has not opened), then restore again"))
        header, _, _ = read_header(fd, ring_path)
    finally:
        os.close(fd)
    if header.next_sequence > header.oldest_sequence:
        raise RestoreRefusedError(ring_path, (
            f"tenant {tenant_id} holds records {header.oldest_sequence}.."
            f"{header.next_sequence - 1}; restore goes into an empty tenant only: pick "
            f"another tenant id, or start over: delete {ring_path} (daemon stopped) and "
            "restore again"))


def verify_for_restore(snapshot_path: str,
                       progress: Callable[[int, int], None] | None = None) -> SnapshotInfo:
    """Verify the whole snapshot (every chunk, the trailer, the file checksum) and
    that its range can be restored; nothing is written.

    Raises:
        SnapshotFormatError, SnapshotCorruptError: the snapshot is refused (the
            message names the byte offset of damage).
    """
    info = verify_snapshot(snapshot_path, progress)
    header = info.header
    problem = restore_request_problem(header.first_sequence, header.record_count)
    if problem:
        raise SnapshotFormatError(snapshot_path, problem)
    return info


def restore_snapshot(snapshot_path: str, ring_path: str, tenant_id: int, capacity_min: int,
                     *, io: str = "threads",
                     progress: Callable[[str, int, int], None] | None = None,
                     info: SnapshotInfo | None = None) -> RestoreReport:
    """Write the snapshot's records into a ring file for `tenant_id` (see the module doc).

    Args:
        capacity_min: the ring holds at least this many records (and at least
            the snapshot's count).
        progress: called with ("verify" | "restore", done, total) records.
        info: the snapshot's verify_for_restore() result, if the caller has
            verified it already (the whole file is not read twice).

    Raises:
        SnapshotFormatError, SnapshotCorruptError: the snapshot is refused;
            nothing was written.
        RestoreRefusedError: the target is not an empty, closed tenant.
    """
    def stage(name: str):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    if info is None:
        info = verify_for_restore(snapshot_path, stage("verify"))
    header = info.header
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
