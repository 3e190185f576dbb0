"""Recovery on open: pick a header, rebuild the chunk table, verify the edges.

The algorithm (docs/FORMAT.md, "Recovery", is the contract). Let H be the
header, R the most records one batch can hold (`batch_record_count_max`):

1. Decode both header copies; use the valid one with the highest generation.
2. Load both chunk tables. The current copy of a chunk is the entry that names
   it with the largest record count not past H's cursor.
3. Head: a batch after H (in flight at the crash) wrote at most R records and
   so overwrote nothing at or past H.next + R - capacity. Verify every chunk
   below that line; each one that fails was being evicted: the oldest moves
   past it (and past every older chunk, to stay contiguous). Unless H is a
   seal (written on a clean close: no batch can follow it before a writer
   unseals the file): then a chunk that fails is damage, kept and reported,
   and reads of it raise RingCorruptError naming the file and offset.
4. Tail: H's own batch, [H.batch_first_sequence, H.next), may be torn (its
   fdatasync may not have completed). Verify those chunks; cut the cursor at
   the first record that does not verify.
5. Roll forward: if nothing was cut, records of one batch past H.next whose
   chunk entries and data all verify are kept (their header copy was torn, or
   damaged later), and the chunks they evict are dropped by the usual rule.
   If the chain after H wrote producer slot copies (format version 2), the
   roll-forward is all or nothing: exactly that chain's records, and only if
   every slot copy it wrote is there; those copies are then adopted.
6. Scrub: chunk entries that claim records at or past the recovered cursor
   are erased, so they can never outrank the entries of the different records
   that will be written at those sequences. Producer slot copies of a chain
   that was not recovered whole are erased too (ioring/producers.py).
7. Chunks between head and tail were durable when H was written; every read
   verifies them.

Recovery reports what it did, never exposes a record it did not verify, and
its caller makes a changed result durable before writing anything new.
"""

from __future__ import annotations

import dataclasses
import os

from ringtail.ioring.errors import RingCorruptError, RingFormatError
from ringtail.ioring.format import (CHUNK_ENTRY_SIZE_BYTES, CHUNK_RECORD_COUNT,
                                    FORMAT_VERSIONS_READ, HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES,
                                    PAGE_SIZE_BYTES, PRODUCER_SLOT_COPY_SIZE_BYTES, Header,
                                    HeaderDecodeError, Layout, capacity_problem, chunk_checksum,
                                    decode_header)
from ringtail.ioring.producers import (EMPTY_COPY, ProducerTable, Slot, SlotCopy,
                                       SlotCopyDecodeError, decode_slot_copy)
from ringtail.ioring.reader import NO_COPY, ChunkTable
from ringtail.ioring.record import RECORD_SIZE_BYTES


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
    rolled_forward: tuple[int, int] | None = None
    sealed: bool = False  # H was written by a clean close (docs/FORMAT.md, "Recovery")
    damaged_chunk_offsets: tuple[int, ...] = ()  # head-window chunks of a sealed file that fail
    producer_slots_in_use: int = 0  # producers whose recent batches the ring remembers
    producer_copies_dropped: int = 0  # slot copies of a chain not recovered whole (erased)

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
        if self.rolled_forward:
            parts.append("recovered %d..%d past the header's cursor (verified; the newest "
                         "header copy was torn or damaged)" % self.rolled_forward)
        if self.dropped_head:
            parts.append("lost oldest %d..%d (evicted by a batch in flight at the crash, or "
                         "damaged: after a crash the two cannot be told apart)"
                         % self.dropped_head)
        if self.producer_copies_dropped:
            parts.append(f"erased {self.producer_copies_dropped} producer slot cop"
                         f"{'y' if self.producer_copies_dropped == 1 else 'ies'} of a batch "
                         "that was not recovered whole (never acknowledged)")
        if self.damaged_chunk_offsets:
            parts.append(
                "DAMAGED: chunk(s) at byte offset %s failed their checksum in a cleanly "
                "closed file (damage, not an eviction): kept, reads of them fail; run "
                "`ringtail verify` and restore the file from a copy"
                % ", ".join(map(str, self.damaged_chunk_offsets)))
        return "; ".join(parts)


def read_header(fd: int, path: str) -> tuple[Header, int, str | None]:
    """The newest valid header copy, its index, and why the other is unusable."""
    size = os.fstat(fd).st_size
    if size < len(HEADER_COPY_OFFSETS) * PAGE_SIZE_BYTES:
        raise RingFormatError(
            path, f"truncated: {size} bytes is smaller than the two header pages "
                  f"({2 * PAGE_SIZE_BYTES} bytes); this is not a complete ring file")
    decoded: list[Header | HeaderDecodeError] = []
    for index, offset in enumerate(HEADER_COPY_OFFSETS):
        try:
            decoded.append(decode_header(os.pread(fd, HEADER_SIZE_BYTES, offset), index))
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
                + "); this ringtail reads versions "
                + " and ".join(map(str, FORMAT_VERSIONS_READ)) + ": use the ringtail that wrote it")
        raise RingCorruptError(
            path, 0, "both header copies are unusable (copy 0: %s; copy 1: %s); the cursor "
                     "is lost: restore the file from a copy or move it away" % tuple(decoded))
    # The highest generation. Two usable copies never tie: decode_header checks
    # that a copy's generation parity names its slot.
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
    layout = Layout(header.capacity, header.producer_slot_count)
    size = os.fstat(fd).st_size
    if size != layout.file_size_bytes:
        raise RingFormatError(
            path, f"file is {size} bytes but capacity {header.capacity} needs "
                  f"{layout.file_size_bytes}; the file was truncated or extended: restore it")
    return layout


@dataclasses.dataclass(frozen=True, slots=True)
class Recovery:
    """What `recover` decided: the header to continue from and the writes that
    make the decision durable (stale chunk entries to erase)."""

    header: Header
    layout: Layout
    table: ChunkTable
    report: RecoveryReport
    scrub_writes: tuple[tuple[int, bytes], ...]  # (file offset, zero bytes)
    producers: ProducerTable

    @property
    def changed(self) -> bool:
        report = self.report
        return bool(self.scrub_writes or report.dropped_tail or report.dropped_head
                    or report.rolled_forward)


def is_sealed(header: Header) -> bool:
    """True if `header` is a seal: written on a clean close, so no batch of its
    writer can have been in flight after it (docs/FORMAT.md, "Recovery").

    A seal has no tail (`batch_first_sequence == next_sequence`) and retains
    records. Every header a writer writes while open names a tail: a batch's
    header its batch, a persisted recovery and the unsealed header that the
    first chain after a seal starts with its last record
    (`unsealed_batch_first`), so the two never look alike. An empty ring has
    nothing a batch could evict, so it needs no distinction.
    """
    return header.batch_first_sequence == header.next_sequence > header.oldest_sequence


def unsealed_batch_first(oldest_sequence: int, next_sequence: int) -> int:
    """The batch_first_sequence of a header written by an open writer that has
    no batch of its own to name (after recovery, or to unseal): the last
    record, so the header is never taken for a seal."""
    return next_sequence - 1 if next_sequence > oldest_sequence else next_sequence


def recover(fd: int, path: str) -> Recovery:
    """Run the recovery algorithm (module docstring); decide, do not write.

    The caller persists a changed result: scrub writes, fdatasync, then the
    returned header as a new generation, fdatasync.
    """
    header, copy, other_problem = read_header(fd, path)
    layout = check_geometry(fd, path, header)
    table_size = layout.table_size_bytes
    table = ChunkTable(layout, os.pread(fd, table_size, layout.table_offset(0)),
                       os.pread(fd, table_size, layout.table_offset(1)))
    file_id = header.file_id
    header_oldest, header_next = header.oldest_sequence, header.next_sequence
    reach = layout.batch_record_count_max  # the most one batch after this header writes
    # Sequences below window_end may have been overwritten by that batch.
    window_end = min(header_next, header_next + reach - header.capacity)
    tail_start = header.batch_first_sequence
    # batch_record_count_max keeps evictions and the tail in different chunks;
    # decode_header refused a copy whose last batch is longer (values from disk
    # are checked with typed errors, never asserted).
    if not (window_end <= tail_start - tail_start % CHUNK_RECORD_COUNT
            or window_end <= header_oldest):
        raise RingCorruptError(
            path, HEADER_COPY_OFFSETS[copy],
            f"header copy {copy} (generation {header.generation}) names a last batch "
            f"{tail_start}..{header_next - 1} that overlaps the chunks a batch after it "
            f"could evict (below {window_end}); the header is damaged: restore the "
            "file from a copy")
    sealed = is_sealed(header)
    damaged: list[int] = []
    oldest, next_sequence = header_oldest, header_next
    verified = 0
    # The chunks of one pass in order: the head window, then the middle (durable
    # when H was written: no checksum here, every read verifies them), then the
    # tail. Only the edges are checked chunk by chunk; the middle's current
    # entries are chosen with one vectorised decode of both tables.
    chunk_first = header_oldest // CHUNK_RECORD_COUNT
    chunk_end = -(-header_next // CHUNK_RECORD_COUNT)
    window_chunk_end = min(chunk_end, max(chunk_first, -(-window_end // CHUNK_RECORD_COUNT)))
    # A chunk is in the middle while all its records below the cursor lie
    # below tail_start: every chunk when there is no tail.
    middle_end = chunk_end if tail_start == header_next else \
        min(chunk_end, max(window_chunk_end, tail_start // CHUNK_RECORD_COUNT))
    for chunk in range(chunk_first, window_chunk_end):
        good = _verified_count(fd, layout, table, file_id, chunk, _count_max(chunk, header_next))
        if good == _count_max(chunk, header_next):
            verified += good
        elif sealed:  # no batch followed a seal: this is damage, never an eviction
            damaged.append(layout.record_offset(chunk * CHUNK_RECORD_COUNT))
            table.choose_first_candidates(chunk, chunk + 1, header_next)  # reads report it
        else:  # evicted by the batch in flight: this chunk and all older go
            oldest = min(header_next, chunk * CHUNK_RECORD_COUNT + CHUNK_RECORD_COUNT)
            verified = 0
    table.choose_first_candidates(window_chunk_end, middle_end, header_next)
    for chunk in range(middle_end, chunk_end):
        count_max = _count_max(chunk, header_next)
        good = _verified_count(fd, layout, table, file_id, chunk, count_max)
        if good == count_max:
            verified += good
        else:  # the header's own batch is torn here: cut
            next_sequence = max(chunk * CHUNK_RECORD_COUNT + good, oldest)
            verified += good
            break
    copies = _read_slot_copies(fd, layout, header)
    tail_whole = next_sequence == header_next
    following = [(slot, copy, content) for slot, pair in enumerate(copies)
                 for copy, content in enumerate(pair) if isinstance(content, SlotCopy)
                 and content.commit_generation == header.generation + 1]
    roll_adopted = False
    if tail_whole:
        if not following:
            next_sequence = _roll_forward(fd, layout, table, file_id, header_next, reach)
        else:  # the chain after H carried producers: its records whole, or none
            target = following[0][2].chain_next_sequence
            if (header_next < target <= header_next + reach
                    and len(following) == following[0][2].chain_write_count
                    and all(c.chain_next_sequence == target for _, _, c in following)):
                saved = bytes(table.current)
                next_sequence = _roll_forward(fd, layout, table, file_id, header_next,
                                              target - header_next)
                roll_adopted = next_sequence == target
                if not roll_adopted:
                    table.current[:] = saved
                    next_sequence = header_next
        oldest = layout.oldest_after_append(oldest, next_sequence) \
            if next_sequence > header_next else oldest
    oldest = min(oldest, next_sequence)
    scrub = _scrub_beyond(layout, table, next_sequence, max(header_next, next_sequence) + reach)
    producers, producer_scrub = _adopt_slot_copies(layout, copies, header.generation, tail_whole,
                                                   roll_adopted, next_sequence)
    scrub += producer_scrub
    report = RecoveryReport(
        path=path, created=False, header_copy=copy, header_generation=header.generation,
        other_copy_problem=other_problem, oldest_sequence=oldest,
        next_sequence=next_sequence, verified_record_count=verified,
        dropped_tail=(next_sequence, header_next - 1) if next_sequence < header_next else None,
        dropped_head=(header_oldest, oldest - 1) if oldest > header_oldest else None,
        rolled_forward=(header_next, next_sequence - 1) if next_sequence > header_next else None,
        sealed=sealed, damaged_chunk_offsets=tuple(damaged),
        producer_slots_in_use=sum(slot.content is not None for slot in producers.slots),
        producer_copies_dropped=len(producer_scrub))
    recovered = dataclasses.replace(
        header, oldest_sequence=oldest, next_sequence=next_sequence,
        batch_first_sequence=max(oldest, min(header.batch_first_sequence, next_sequence)))
    return Recovery(recovered, layout, table, report, scrub, producers)


def _read_slot_copies(fd: int, layout: Layout, header: Header
                      ) -> list[list[SlotCopy | None | SlotCopyDecodeError]]:
    """Both copies of every producer slot, decoded (an error for an unusable one)."""
    count = header.producer_slot_count
    if not count:
        return []
    data = os.pread(fd, count * 2 * PRODUCER_SLOT_COPY_SIZE_BYTES, layout.producer_offset)
    copies = []
    for slot in range(count):
        pair = []
        for copy in (0, 1):
            start = (2 * slot + copy) * PRODUCER_SLOT_COPY_SIZE_BYTES
            try:
                pair.append(decode_slot_copy(data[start:start + PRODUCER_SLOT_COPY_SIZE_BYTES],
                                             header.file_id, slot, copy))
            except SlotCopyDecodeError as error:  # torn or damaged: the other copy serves
                pair.append(error)
        copies.append(pair)
    return copies


def _adopt_slot_copies(layout: Layout, copies, generation: int, tail_whole: bool,
                       roll_adopted: bool, next_sequence: int
                       ) -> tuple[ProducerTable, tuple[tuple[int, bytes], ...]]:
    """Each slot's current copy: the newest whose chain was recovered whole.

    A copy of H's own chain (`generation`) counts when H's tail verified whole;
    one of the chain after it only with that chain's roll-forward; older ones
    always. Valid copies that do not count are erased (returned as writes), so
    that the header recovery writes next (one generation on) never makes them
    look committed.
    """
    slots, scrub = [], []
    for index, pair in enumerate(copies):
        best = None
        for copy, content in enumerate(pair):
            if not isinstance(content, SlotCopy):
                continue
            committed = content.commit_generation
            if (committed < generation or (committed == generation and tail_whole)
                    or (committed == generation + 1 and roll_adopted)) \
                    and content.chain_next_sequence <= next_sequence:
                if best is None or committed > best[1].commit_generation:
                    best = (copy, content)
            else:
                scrub.append((layout.slot_copy_offset(index, copy), EMPTY_COPY))
        slots.append(Slot(None, None) if best is None else Slot(*best))
    return ProducerTable(slots), tuple(scrub)


def _roll_forward(fd: int, layout: Layout, table: ChunkTable, file_id: int,
                  next_sequence: int, reach: int) -> int:
    """Extend the cursor over records of one batch past it that fully verify.

    A batch whose data and chunk entries landed but whose header copy did not
    (torn, or damaged later) is recovered instead of silently dropped.
    """
    limit = next_sequence + reach
    while next_sequence < limit:
        chunk = next_sequence // CHUNK_RECORD_COUNT
        first = chunk * CHUNK_RECORD_COUNT
        have = next_sequence - first
        count_max = min(CHUNK_RECORD_COUNT, limit - first)
        previous = table.current[chunk % layout.chunk_count]
        good = _verified_count(fd, layout, table, file_id, chunk, count_max, have + 1)
        if good <= have:
            table.current[chunk % layout.chunk_count] = previous
            break
        next_sequence = first + good
        if good < CHUNK_RECORD_COUNT:
            break
    return next_sequence


def _scrub_beyond(layout: Layout, table: ChunkTable, next_sequence: int,
                  end: int) -> tuple[tuple[int, bytes], ...]:
    """Erase chunk entries that claim records at or past the recovered cursor.

    They come from a batch that did not survive; left in place, one could
    later tie with, or outrank, the entry of different records written at
    the same sequences.
    """
    writes = []
    empty = bytes(CHUNK_ENTRY_SIZE_BYTES)
    for chunk in range(next_sequence // CHUNK_RECORD_COUNT, -(-end // CHUNK_RECORD_COUNT)):
        position = chunk % layout.chunk_count
        for copy in (0, 1):
            entry = table.entry(copy, position)
            if (entry.first_sequence == chunk * CHUNK_RECORD_COUNT and entry.record_count
                    and entry.first_sequence + entry.record_count > next_sequence):
                start = position * CHUNK_ENTRY_SIZE_BYTES
                table.tables[copy][start:start + CHUNK_ENTRY_SIZE_BYTES] = empty
                if table.current[position] == copy:
                    table.current[position] = NO_COPY
                writes.append((layout.entry_offset(copy, chunk), empty))
    return tuple(writes)


def _count_max(chunk: int, next_sequence: int) -> int:
    """How many records of `chunk` lie below the cursor."""
    return min(CHUNK_RECORD_COUNT, next_sequence - chunk * CHUNK_RECORD_COUNT)


def _verified_count(fd: int, layout: Layout, table: ChunkTable, file_id: int,
                    chunk: int, count_max: int, count_min: int = 1) -> int:
    """Records of `chunk` that verify against its best entry (count_min..count_max
    records); marks that entry current."""
    position = chunk % layout.chunk_count
    first = chunk * CHUNK_RECORD_COUNT
    data = os.pread(fd, CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES, layout.record_offset(first))
    for copy, entry in table.candidates(chunk, count_max):
        if entry.record_count < count_min:
            break
        records = data[:entry.record_count * RECORD_SIZE_BYTES]
        if chunk_checksum(file_id, first, records) == entry.checksum:
            table.current[position] = copy
            return entry.record_count
    table.current[position] = NO_COPY
    return 0
