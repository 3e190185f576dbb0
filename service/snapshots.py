"""`ringtail snapshot` and `ringtail restore`: carry a tenant's records elsewhere.

The file format is ioring/snapshot.py's (docs/FORMAT.md, "Snapshot file");
docs/REPLAY.md is the user's contract.

A snapshot is a consistent cut: the daemon's Welcome names the tenant's
retained range [oldest, next) at one moment; the snapshot holds exactly those
records, read through a normal replay subscription while publishing goes on
(records published after the cut are not included). If the ring wraps past
records the snapshot has not read yet, the daemon says so with a Gap and the
snapshot fails (no file is left): a cut that lost records is never written.

Restore writes the ring file itself (ioring/restore.py), with the daemon
stopped or before it has opened that tenant: the records keep their
sequences, which the publish protocol cannot do (the daemon assigns
sequences), and nothing is written until the whole snapshot has verified.
"""

from __future__ import annotations

import contextlib
import os
import sys

import trio
from ringtail.ioring.files import fsync_directory
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.snapshot import SnapshotWriter, new_header

SNAPSHOT_TEMPORARY_SUFFIX = ".partial"


async def take_snapshot(client, out_path: str, progress=None) -> tuple[int, int, int]:
    """Write the client's tenant at the cut its Welcome names; (first, count, size bytes).

    Raises:
        CommandError: the ring evicted records before they were read.
        RingtailError: the daemon refused the subscription or went away.
    """
    from ringtail.service.commandline import CommandError
    from ringtail.service.protocol import End, Gap, Records
    welcome = client.welcome
    first, cut = welcome.oldest_sequence, welcome.next_sequence
    header = new_header(client.tenant_id, first, cut - first)
    temporary = out_path + SNAPSHOT_TEMPORARY_SUFFIX
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    done = False
    try:
        writer = SnapshotWriter(fd, header)
        expected = first
        if cut > first:
            async for event in client.subscribe("sequence", first, follow=False):
                if isinstance(event, Gap):
                    raise CommandError(
                        f"sequences {event.first_lost_sequence}..{event.last_lost_sequence} "
                        f"were evicted before the snapshot read them (the cut was "
                        f"{first}..{cut - 1}); take it again when publishing is slower, or "
                        "give the tenant a larger capacity")
                if isinstance(event, End):
                    break
                if isinstance(event, Records):
                    assert event.sequences is None and event.first_sequence == expected
                    take = min(len(event.records) // RECORD_SIZE_BYTES, cut - expected)
                    writer.add(event.records[:take * RECORD_SIZE_BYTES])
                    expected += take
                    if progress is not None:
                        progress(expected - first, cut - first)
                    if expected == cut:
                        break
        if expected != cut:
            raise CommandError(f"the daemon ended the replay at sequence {expected}, before "
                               f"the cut {cut}; take the snapshot again")
        writer.finish()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, out_path)
        fsync_directory(os.path.dirname(os.path.abspath(out_path)))
        done = True
        return first, cut - first, writer.size_bytes
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def command_snapshot(args) -> int:
    from ringtail.service.commandline import EXIT_OK, CommandError, connect, progress_bar
    from ringtail.service.client import RingtailError
    draw = progress_bar("snapshot")

    async def run():
        async with await connect(args.socket, args.tenant) as client:
            return await take_snapshot(client, args.out, draw)

    try:
        first, count, size = trio.run(run)
    except RingtailError as error:
        raise CommandError(str(error)) from error
    span = f"sequences {first}..{first + count - 1}" if count else "no records (empty tenant)"
    ratio = count * RECORD_SIZE_BYTES / size
    print(f"snapshot of tenant {args.tenant}: {count} records, {span}, {size} bytes "
          f"({ratio:.1f}x compressed) -> {args.out}")
    return EXIT_OK


def command_restore(args) -> int:
    from ringtail.ioring.restore import restore_snapshot
    from ringtail.service.commandline import EXIT_OK, EXIT_USAGE, progress_bar
    from ringtail.service.tenants import ring_file_name
    if args.tenant < 0 or args.tenant > 0xFFFF_FFFF or args.capacity < 1:
        print("ringtail restore: --tenant must be a u32 and --capacity positive",
              file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    ring_path = os.path.join(args.data_dir, ring_file_name(args.tenant))
    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress_bar(f"restore: {stage}")
        if bars[stage] is not None:
            bars[stage](done, total)

    report = restore_snapshot(args.file, ring_path, args.tenant, args.capacity,
                              io="threads", progress=progress)
    span = (f"sequences {report.first_sequence}..{report.next_sequence - 1}"
            if report.record_count else "no records")
    print(f"restored {report.record_count} records ({span}) into tenant {args.tenant}: "
          f"{ring_path} (capacity {report.capacity}); its next sequence is "
          f"{report.next_sequence}")
    return EXIT_OK


def command_inspect_snapshot(args) -> int:
    """`ringtail inspect FILE` for a snapshot: its header, as a table (no chunk is read)."""
    from ringtail.ioring.snapshot import inspect_snapshot
    from ringtail.service.commandline import EXIT_OK, print_table
    print_table(inspect_snapshot(args.path).rows())
    return EXIT_OK


def command_verify_snapshot(args) -> int:
    """`ringtail verify FILE` for a snapshot: every chunk, the trailer, the file checksum."""
    from ringtail.ioring.snapshot import SnapshotCorruptError, verify_snapshot
    from ringtail.service.commandline import EXIT_FAILURE, EXIT_OK, progress_bar
    try:
        info = verify_snapshot(args.path, progress_bar(f"verify {os.path.basename(args.path)}"))
    except SnapshotCorruptError as error:
        print(f"{args.path}: DAMAGED: {error}")
        return EXIT_FAILURE
    print(f"{args.path}: ok: snapshot of tenant {info.header.tenant_id}, "
          f"{info.header.record_count} records verified in {info.header.chunk_count} chunks")
    return EXIT_OK
