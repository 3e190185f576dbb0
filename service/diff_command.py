"""`ringtail diff`'s sources and command: where each side's records come from, and
the report (service/diff.py is the comparison engine; docs/REPLAY.md the contract).

Sources: `tenant:T` (a non-follow replay through the daemon, which filters the
epoch range), a ring file (ioring/streams.py: read directly, O_RDONLY, every
chunk verified), a VRRL0001 file, a snapshot file (each chunk verified). A
file's kind is sniffed from its magic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy
import trio
from ringtail.ioring.record import RECORD_DTYPE
from ringtail.service.diff import (
    DIFF_REPORT_SLOT_COUNT_MAX,
    DiffOptions,
    DiffSourceError,
    DiffSummary,
    DiffUsageError,
    EpochDiff,
    RecordStream,
    diff_streams,
    make_options,
)

# -- sources ------------------------------------------------------------------------


TENANT_PREFIX = "tenant:"


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """One side of a diff: what it is, and how many records it holds if known."""

    text: str
    kind: str  # "tenant", "ring", "vrrl" or "snapshot"
    tenant_id: int | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.text}"


def parse_source(text: str) -> Source:
    """`tenant:T` or a path to a ring, VRRL0001 or snapshot file (sniffed by its magic).

    Raises:
        DiffUsageError: neither a tenant nor a readable file of a known kind.
    """
    from ringtail.ioring.format import FORMAT_MAGIC
    from ringtail.ioring.snapshot import SNAPSHOT_MAGIC
    from ringtail.ioring.vrrl import VRRL_MAGIC
    if text.startswith(TENANT_PREFIX):
        try:
            tenant_id = int(text[len(TENANT_PREFIX):])
        except ValueError:
            raise DiffUsageError(f"{text!r}: use tenant:T with T a tenant id (u32)") from None
        if not 0 <= tenant_id <= 0xFFFF_FFFF:
            raise DiffUsageError(f"{text!r}: tenant ids are u32")
        return Source(text, "tenant", tenant_id)
    try:
        with open(text, "rb") as file:
            magic = file.read(8)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise DiffUsageError(f"{text!r}: {error.strerror}; a source is tenant:T or a ring, "
                             "VRRL0001 or snapshot file") from None
    kinds = {FORMAT_MAGIC: "ring", VRRL_MAGIC: "vrrl", SNAPSHOT_MAGIC: "snapshot"}
    if magic not in kinds:
        raise DiffUsageError(f"{text!r} is not a ring, VRRL0001 or snapshot file "
                             f"(it starts with {magic!r})")
    return Source(text, kinds[magic])


def _file_pieces(source: Source) -> Iterator[tuple[int, bytes]]:
    from ringtail.ioring.snapshot import iter_snapshot_chunks
    from ringtail.ioring.streams import iter_ring_records, iter_vrrl_records
    if source.kind == "ring":
        return iter_ring_records(source.text)
    if source.kind == "vrrl":
        return iter_vrrl_records(source.text)
    return iter_snapshot_chunks(source.text)


def source_record_count(source: Source) -> int | None:
    """Records the file holds (for progress), or None for a tenant."""
    from ringtail.ioring.snapshot import read_snapshot_header
    from ringtail.ioring.streams import ring_retained_range
    from ringtail.ioring.vrrl import read_vrrl_header
    if source.kind == "ring":
        oldest, next_sequence = ring_retained_range(source.text)
        return next_sequence - oldest
    if source.kind == "snapshot":
        return read_snapshot_header(source.text).record_count
    if source.kind == "vrrl":
        return read_vrrl_header(source.text).capacity  # an upper bound: empty slots skipped
    return None


async def file_stream(source: Source) -> RecordStream:
    for _, records in _file_pieces(source):
        yield numpy.frombuffer(records, dtype=RECORD_DTYPE)
        await trio.lowlevel.checkpoint()


async def tenant_stream(client, options: DiffOptions) -> RecordStream:
    """A tenant's retained records through the daemon (a non-follow replay)."""
    from ringtail.service.protocol import Gap, Records
    async for event in client.subscribe("oldest", follow=False, epoch_min=options.epoch_min,
                                        epoch_max=options.epoch_max):
        if isinstance(event, Gap):
            raise DiffSourceError(
                f"tenant {client.tenant_id}: sequences {event.first_lost_sequence}.."
                f"{event.last_lost_sequence} were evicted while the diff read them; "
                "snapshot the tenant first (ringtail snapshot) and diff the snapshot")
        if isinstance(event, Records):
            yield numpy.frombuffer(event.records, dtype=RECORD_DTYPE)


def count_records(stream: RecordStream, progress: Callable[[int], None]) -> RecordStream:
    async def counted():
        done = 0
        async for array in stream:
            done += len(array)
            progress(done)
            yield array
    return counted()


# -- the command ----------------------------------------------------------------------


def format_epoch(result: EpochDiff) -> list[str]:
    """A divergent epoch as text lines (the table a terminal shows)."""
    lines = [f"epoch {result.epoch}: divergent: {result.differing_count} slots differ, "
             f"{result.only_a_count} records only in A, {result.only_b_count} only in B "
             f"(A {result.a_record_count} records, B {result.b_record_count})"]
    for slot in result.slots:
        name = f"slot {slot.slot_idx}" + (f" #{slot.occurrence}" if slot.occurrence else "")
        if slot.kind == "only_a":
            lines.append(f"  {name}: only in A")
        elif slot.kind == "only_b":
            lines.append(f"  {name}: only in B")
        else:
            for field, value_a, value_b in slot.fields:
                lines.append(f"  {name}: {field}: A {value_a}, B {value_b}")
    listed = len(result.slots)
    total = result.differing_count + result.only_a_count + result.only_b_count
    if total > listed:
        lines.append(f"  ... and {total - listed} more slots (DIFF_REPORT_SLOT_COUNT_MAX "
                     f"= {DIFF_REPORT_SLOT_COUNT_MAX} listed per epoch)")
    if result.order_mismatch:
        position, slot_a, slot_b = result.order_mismatch
        lines.append(f"  order differs at position {position} of the epoch's matched "
                     f"records: A has slot {slot_a}, B has slot {slot_b}")
    return lines


def command_diff(args) -> int:
    """`ringtail diff A B ...` (service/cli.py registers the options)."""
    import contextlib
    import json
    import sys

    from ringtail.service.commandline import (
        EXIT_FAILURE,
        EXIT_OK,
        EXIT_USAGE,
        CommandError,
        connect,
        progress_bar,
    )
    from ringtail.service.client import RingtailError
    try:
        options = make_options(args.ignore, args.include, args.strict_order, args.epochs,
                               args.epoch_record_max)
        sources = [parse_source(args.a), parse_source(args.b)]
    except DiffUsageError as error:
        print(f"ringtail diff: {error}", file=sys.stderr)
        return EXIT_USAGE
    divergent: list[EpochDiff] = []

    def on_epoch(result: EpochDiff) -> None:
        if args.all or not divergent:
            divergent.append(result)
            if not args.json:
                print("\n".join(format_epoch(result)), flush=True)

    async def run() -> DiffSummary:
        async with contextlib.AsyncExitStack() as stack:
            streams, totals = [], []
            for source in sources:
                if source.kind == "tenant":
                    client = await stack.enter_async_context(
                        await connect(args.socket, source.tenant_id))
                    welcome = client.welcome
                    totals.append(welcome.next_sequence - welcome.oldest_sequence)
                    streams.append(tenant_stream(client, options))
                else:
                    totals.append(source_record_count(source))
                    streams.append(file_stream(source))
            draw = progress_bar("diff")
            if draw is not None:
                done = [0, 0]
                total = sum(totals)

                def progress(side: int):
                    def report(count: int) -> None:
                        done[side] = count
                        draw(min(sum(done), total), total)
                    return report
                streams = [count_records(stream, progress(side))
                           for side, stream in enumerate(streams)]
            return await diff_streams(streams[0], streams[1], options, on_epoch)

    try:
        summary = trio.run(run)
    except DiffSourceError as error:
        raise CommandError(str(error)) from error
    except RingtailError as error:
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps({"a": sources[0].text, "b": sources[1].text,
                          "compared_fields": list(options.compared_fields),
                          "strict_order": options.strict_order,
                          "divergent_epochs": [result.to_json_dict() for result in divergent],
                          "summary": summary.to_json_dict()}))
    else:
        print(("identical: " if summary.identical else "divergent: ") + summary.line())
    return EXIT_OK if summary.identical else EXIT_FAILURE
