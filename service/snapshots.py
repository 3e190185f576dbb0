"""`ringtail snapshot` and `ringtail restore`: carry a tenant's records elsewhere.

The file format is ioring/snapshot.py's (docs/FORMAT.md, "Snapshot file");
docs/REPLAY.md is the user's contract.

A snapshot is a consistent cut: the daemon's Welcome names the tenant's
retained range [oldest, next) at one moment; the snapshot holds exactly those
records, read through a normal replay subscription while publishing goes on
(records published after the cut are not included). If the ring wraps past
records the snapshot has not read yet, the daemon says so with a Gap and the
snapshot fails (no file is left): a cut that lost records is never written.

Restore keeps the records' sequences and writes nothing until the whole
snapshot has verified. Two paths (docs/REPLAY.md):

- through the running daemon (`restore_through_daemon`): a Restore frame
  (docs/PROTOCOL.md 4.13) has the daemon swap the tenant's empty ring for one
  whose next sequence is the snapshot's first; the records then go as
  ordinary publishes, each Ack checked to land at exactly the snapshot's
  sequences. Each record's tenant_id becomes the target tenant's (the daemon
  refuses records of another tenant); `ringtail diff` ignores it unless asked.
- offline (`--offline`, or no daemon at the socket): the ring file is written
  directly (ioring/restore.py), with the daemon stopped or before it has
  opened that tenant; the records' bytes are kept as they are.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy
import trio
from ringtail.ioring.files import fsync_directory
from ringtail.ioring.record import RECORD_DTYPE, RECORD_SIZE_BYTES
from ringtail.ioring.snapshot import SnapshotWriter, new_header

SNAPSHOT_TEMPORARY_SUFFIX = ".partial"
# Publish batches a restore sends before it waits for their Acks (and checks
# their sequences): the Client's pipeline window. Memory: 16 x 256 KiB = 4 MiB
# of records held at once, plus one snapshot chunk (1 MiB) being cut up.
RESTORE_PIPELINE_BATCH_COUNT = 16


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


def _start_over(tenant_id: int, acknowledged: int, first: int) -> str:
    """What a restore cut short left, and how to start over."""
    held = (f"tenant {tenant_id} holds the snapshot's sequences {first}..{acknowledged - 1} "
            "(acknowledged; batches sent after them may be stored too)"
            if acknowledged > first else
            f"tenant {tenant_id} holds none of the snapshot's records acknowledged")
    return (f"{held}; to start over, stop the daemon, delete tenant {tenant_id}'s ring file "
            f"(tenant-{tenant_id}.ring in its data directory), start it and restore again, or "
            "restore into another tenant")


async def restore_through_daemon(client, snapshot_path: str, info, progress=None) -> int:
    """Load a verified snapshot into the client's tenant through the daemon
    (docs/PROTOCOL.md 4.13); returns the records sent. The tenant must hold no
    records (the daemon refuses any other with RESTORE_REFUSED).

    Raises:
        CommandError: an Ack named other sequences than the snapshot's, or the
            snapshot changed after it was verified; the message says what the
            tenant holds and how to start over.
        RingtailError: the daemon refused the Restore or a batch, or went away.
    """
    from ringtail.ioring.snapshot import SnapshotCorruptError, iter_snapshot_chunks
    from ringtail.service.commandline import CommandError
    from ringtail.service.errors import RingtailError
    header = info.header
    tenant_id, first = client.tenant_id, header.first_sequence
    welcome = await client.restore(first, header.record_count)
    step = welcome.publish_record_count_max * RECORD_SIZE_BYTES
    expected = first
    batches: list[bytes] = []

    async def send() -> None:
        nonlocal expected
        acks = await client.publish_many(batches, RESTORE_PIPELINE_BATCH_COUNT)
        for ack, batch in zip(acks, batches):
            count = len(batch) // RECORD_SIZE_BYTES
            if (ack.first_sequence, ack.last_sequence) != (expected, expected + count - 1):
                raise CommandError(
                    f"the daemon stored {count} records at sequences {ack.first_sequence}.."
                    f"{ack.last_sequence}, expected {expected}..{expected + count - 1}: "
                    f"another publisher reached tenant {tenant_id}; "
                    + _start_over(tenant_id, expected, first))
            expected += count
        batches.clear()
        if progress is not None:
            progress(expected - first, header.record_count)

    try:
        for _, records in iter_snapshot_chunks(snapshot_path):
            array = numpy.frombuffer(records, RECORD_DTYPE).copy()
            array["tenant_id"] = tenant_id  # the daemon takes records of its tenant only
            data = array.tobytes()
            for offset in range(0, len(data), step):
                batches.append(data[offset:offset + step])
                if len(batches) == RESTORE_PIPELINE_BATCH_COUNT:
                    await send()
        if batches:
            await send()
    except SnapshotCorruptError as error:
        raise CommandError(f"{error} (the snapshot changed after it was verified); "
                           + _start_over(tenant_id, expected, first)) from error
    except RingtailError as error:
        raise CommandError(f"the restore stopped: {error}; "
                           + _start_over(tenant_id, expected, first)) from error
    return expected - first


def command_restore(args) -> int:
    from ringtail.ioring.restore import restore_snapshot, verify_for_restore
    from ringtail.service.commandline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, progress_bar
    from ringtail.service.config import DEFAULT_DATA_DIR
    from ringtail.service.tenants import ring_file_name
    if args.tenant < 0 or args.tenant > 0xFFFF_FFFF or args.capacity < 1:
        print("ringtail restore: --tenant must be a u32 and --capacity positive",
              file=sys.stderr)
        return EXIT_USAGE
    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress_bar(f"restore: {stage}")
        if bars[stage] is not None:
            bars[stage](done, total)

    # Everything is verified before anything is sent or written, on either path.
    info = verify_for_restore(args.file, lambda done, total: progress("verify", done, total))
    if not args.offline:
        sent = trio.run(_restore_online, args, info,
                        lambda done, total: progress("restore", done, total))
        if sent is not None:
            header = info.header
            span = (f"sequences {header.first_sequence}..{header.next_sequence - 1}"
                    if sent else "no records")
            print(f"restored {sent} records ({span}) into tenant {args.tenant} through the "
                  f"daemon at {args.socket}; its next sequence is {header.next_sequence}")
            return EXIT_OK
        if args.data_dir is None:  # never write into a default directory by surprise
            print(f"ringtail restore: no daemon answers at {args.socket}: start it (a restore "
                  "goes through the running daemon), point --socket at it, or restore offline "
                  "into a stopped daemon's data directory with --data-dir DIR (or --offline "
                  f"for ./{DEFAULT_DATA_DIR}); nothing was written", file=sys.stderr)
            return EXIT_FAILURE
        print(f"ringtail restore: no daemon at {args.socket}; restoring offline into "
              f"{args.data_dir}", file=sys.stderr)
    if args.data_dir is None:
        args.data_dir = DEFAULT_DATA_DIR
    os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    ring_path = os.path.join(args.data_dir, ring_file_name(args.tenant))
    report = restore_snapshot(args.file, ring_path, args.tenant, args.capacity,
                              io="threads", progress=progress, info=info)
    span = (f"sequences {report.first_sequence}..{report.next_sequence - 1}"
            if report.record_count else "no records")
    print(f"restored {report.record_count} records ({span}) into tenant {args.tenant}: "
          f"{ring_path} (capacity {report.capacity}); its next sequence is "
          f"{report.next_sequence}")
    return EXIT_OK


async def _restore_online(args, info, progress) -> int | None:
    """Restore through the daemon at args.socket: the records sent, or None if
    no daemon answers there (the caller restores offline)."""
    from ringtail.service.client import Client
    from ringtail.service.commandline import CommandError
    from ringtail.service.errors import RingtailError
    try:
        client = await Client.connect(args.socket, args.tenant, token=args.token.encode(),
                                      client_name="ringtail-restore")
    except OSError:  # no socket file, connection refused: no daemon there
        return None
    except RingtailError as error:
        raise CommandError(str(error)) from error
    async with client:
        try:
            return await restore_through_daemon(client, args.file, info, progress)
        except RingtailError as error:
            raise CommandError(str(error)) from error


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
