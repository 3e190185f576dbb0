"""A batch's plan: the write chain that appends it and the header it commits.

`plan_batch` turns a batch of records into its chain (docs/FORMAT.md, "The
write chain and why crashes are safe")::

    data write(s)  ->  chunk-table write(s)  ->  header copy  ->  fdatasync

`check_plan` states what must hold of a plan. RingFile asserts it twice,
TigerBeetle's paired assertions: when the batch is planned, before the chain
is submitted, and again when the chain has completed and the commit is
applied, against the ring's state at that moment; a planning bug is caught
at both ends. Everything checked here was computed by this process: values
read from disk are checked by recovery, with typed errors, never asserted.
"""

from __future__ import annotations

import dataclasses

from ringtail.ioring.chain import FDATASYNC, Operation, Write
from ringtail.ioring.format import (CHUNK_ENTRY_SIZE_BYTES, CHUNK_RECORD_COUNT, ENTRY_HEAD,
                                    HEADER_COPY_COUNT, HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES,
                                    TABLE_OFFSET, Header,
                                    Layout, encode_batch_entries)
from ringtail.ioring.reader import NO_COPY, ChunkTable
from ringtail.ioring.record import RECORD_SIZE_BYTES

# Operations in one batch's chain: two data writes (around the wrap), two
# chunk-table writes (around the table's end), the header, the fdatasync.
BATCH_CHAIN_OPERATION_COUNT_MAX = 6
# The header copy of a generation is `generation & 1` on the write path.
assert HEADER_COPY_COUNT == 2


@dataclasses.dataclass(frozen=True, slots=True)
class BatchTicket:
    """A submitted batch: its sequences are first_sequence..last_sequence."""

    tag: int
    first_sequence: int
    record_count: int

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + self.record_count - 1

    @property
    def next_sequence(self) -> int:
        return self.first_sequence + self.record_count


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPlan:
    """What one batch writes, and what its commit installs."""

    ticket: BatchTicket
    table_index: int  # the chunk-table copy (0 = A, 1 = B) all its entries go to
    entries: tuple[tuple[int, bytes], ...]  # (table position, encoded entry) per chunk
    tail_hasher: object | None  # hasher of its partial last chunk (None: ends on a chunk)
    header: Header  # the header its chain writes, one generation on
    operations: list[Operation]  # the chain, as submitted


def plan_batch(ticket: BatchTicket, records: bytes, layout: Layout, header: Header,
               table: ChunkTable, tail_hasher: object | None, sync: str) -> BatchPlan:
    """The chain that appends `records` as `ticket`'s sequences after `header`.

    `tail_hasher` holds the records of the partial chunk the batch continues
    (None when it starts a chunk).
    """
    capacity = layout.capacity
    first, end = ticket.first_sequence, ticket.next_sequence
    operations: list[Operation] = []
    slot = first % capacity
    split = min(ticket.record_count, capacity - slot) * RECORD_SIZE_BYTES
    operations.append(Write(layout.record_offset(first), records if split == len(records)
                            else records[:split]))
    if split != len(records):
        operations.append(Write(layout.data_offset, records[split:]))
    # Chunk entries: the first chunk's entry goes to the copy that is not
    # current, so a torn write keeps the acknowledged entry.
    table_index = _table_index(layout, table, first)
    chunk_entries, hasher = encode_batch_entries(
        header.file_id, first, records, tail_hasher if first % CHUNK_RECORD_COUNT else None)
    entries = tuple((chunk % layout.chunk_count, encoded) for chunk, encoded in chunk_entries)
    operations.extend(_entry_writes(layout, table_index, entries))
    committed = dataclasses.replace(
        header, generation=header.generation + 1,
        oldest_sequence=layout.oldest_after_append(header.oldest_sequence, end),
        next_sequence=end, batch_first_sequence=first)
    operations.append(Write(HEADER_COPY_OFFSETS[committed.copy_index], committed.encode()))
    if sync == "batch":
        operations.append(FDATASYNC)
    return BatchPlan(ticket, table_index, entries, hasher, committed, operations)


def check_plan(plan: BatchPlan, layout: Layout, header: Header, table: ChunkTable,
               sync: str) -> None:
    """Assert what must hold of `plan` given the ring's committed `header` and
    `table` (before the plan's entries are installed).

    It runs twice per batch on the write path, so it checks the facts that
    pin a plan down without re-deriving it: every header field, the entry
    count, the boundary entries (first and last: their chunk, table position
    and record count) and where each write goes and how long it is (the
    chain's operations, `_check_operations`). A planning bug that moves,
    drops, adds or misnames a write, an entry or a cursor is caught; the bytes
    of the middle entries are the encoder's business (tests/ioring:
    test_record_checks, test_crash). Cost: ~2 us per check whatever the batch
    size (it was ~7 us per 1-record and ~55 us per 4,096-record batch when it
    re-derived every entry); it is one function, as its locals are shared.
    """
    ticket, committed = plan.ticket, plan.header
    first = ticket.first_sequence
    end = first + ticket.record_count
    assert 0 < ticket.record_count <= layout.batch_record_count_max, ticket
    # The cursor advances by exactly the batch, from where the last commit left
    # it; eviction goes a chunk at a time (oldest_after_append, inlined); the
    # file is the same (the other fields are copied by dataclasses.replace, and
    # check_header_successor checks them where headers are written by hand).
    first_chunk = first // CHUNK_RECORD_COUNT
    last_chunk = (end - 1) // CHUNK_RECORD_COUNT
    evicted_to = (last_chunk + 1) * CHUNK_RECORD_COUNT - layout.capacity
    oldest = header.oldest_sequence
    assert first == header.next_sequence and (
        committed.generation, committed.batch_first_sequence, committed.next_sequence,
        committed.oldest_sequence, committed.file_id, committed.capacity) == (
        header.generation + 1, first, end, oldest if oldest > evicted_to else evicted_to,
        header.file_id, header.capacity), (header, committed)
    # One entry per chunk the batch touches, in order: the first and the last
    # name their chunk, their table position and the chunk's records below the
    # new cursor; the entry writes below place every entry.
    entries = plan.entries
    chunk_count = layout.chunk_count
    assert len(entries) == last_chunk - first_chunk + 1, entries
    position, encoded = entries[0]
    assert position == first_chunk % chunk_count and encoded[:ENTRY_HEAD.size] == ENTRY_HEAD.pack(
        first_chunk * CHUNK_RECORD_COUNT, CHUNK_RECORD_COUNT if last_chunk != first_chunk
        else end - first_chunk * CHUNK_RECORD_COUNT), entries[0]
    if last_chunk != first_chunk:
        position, encoded = entries[-1]
        assert position == last_chunk % chunk_count and encoded[:ENTRY_HEAD.size] == ENTRY_HEAD.pack(
            last_chunk * CHUNK_RECORD_COUNT, end - last_chunk * CHUNK_RECORD_COUNT), entries[-1]
    assert (plan.tail_hasher is None) == (end % CHUNK_RECORD_COUNT == 0)
    # The entries go to the table copy that does not hold the first chunk's
    # current (acknowledged) entry.
    current = table.current[first_chunk % chunk_count]
    assert plan.table_index == (0 if current == NO_COPY else 1 - current), plan.table_index
    # The chain: the records to their slots, the entries to their table copy
    # (each write at the position of the entry it starts with, all entries
    # covered once), then the header to the copy its generation's parity names.
    operations = plan.operations
    synced = sync == "batch"
    writes = len(operations) - synced  # the header write is the last of them
    assert len(operations) <= BATCH_CHAIN_OPERATION_COUNT_MAX and (
        operations[-1] is FDATASYNC) == synced, operations
    header_write = operations[writes - 1]
    assert header_write.offset == HEADER_COPY_OFFSETS[committed.generation & 1] and \
        len(header_write.data) == HEADER_SIZE_BYTES, header_write
    # The records, in one write or two around the end of the data region.
    capacity, count = layout.capacity, ticket.record_count
    slot = first % capacity
    head_count = capacity - slot if count > capacity - slot else count
    data = operations[0]
    assert data.offset == layout.data_offset + slot * RECORD_SIZE_BYTES and \
        len(data.data) == head_count * RECORD_SIZE_BYTES, data
    index = 1
    if head_count != count:
        data = operations[1]
        assert data.offset == layout.data_offset and \
            len(data.data) == (count - head_count) * RECORD_SIZE_BYTES, data
        index = 2
    # Then the entries, in one run of table positions or two around the table's
    # end: each write starts with its entry, and together they hold them all.
    table_offset = TABLE_OFFSET + plan.table_index * layout.table_size_bytes
    entry = 0
    while index < writes - 1:
        write = operations[index]
        position, encoded = entries[entry]
        assert write.offset == table_offset + position * CHUNK_ENTRY_SIZE_BYTES and \
            write.data[:CHUNK_ENTRY_SIZE_BYTES] == encoded, write
        entry += len(write.data) // CHUNK_ENTRY_SIZE_BYTES
        index += 1
    assert entry == len(entries) and write.data[-CHUNK_ENTRY_SIZE_BYTES:] == entries[-1][1], \
        (entry, entries)


def check_header_successor(previous: Header, header: Header) -> None:
    """Assert that `header` may follow `previous` on disk: one generation on (so
    in the other copy), the same file, and a cursor that `decode_header` accepts."""
    assert header.generation == previous.generation + 1, (previous, header)
    assert header.copy_index != previous.copy_index
    assert (header.file_id == previous.file_id and header.capacity == previous.capacity
            and header.tenant_id == previous.tenant_id
            and header.created_ns == previous.created_ns
            and header.format_version == previous.format_version
            and header.producer_slot_count == previous.producer_slot_count
            and header.chunk_record_count == previous.chunk_record_count), (previous, header)
    oldest, next_sequence = header.oldest_sequence, header.next_sequence
    assert oldest <= header.batch_first_sequence <= next_sequence, header
    assert next_sequence - oldest <= header.capacity, header
    assert previous.oldest_sequence <= oldest, (previous, header)


def _table_index(layout: Layout, table: ChunkTable, first_sequence: int) -> int:
    current = table.current[first_sequence // CHUNK_RECORD_COUNT % layout.chunk_count]
    return 0 if current == NO_COPY else 1 - current


def _entry_writes(layout: Layout, table_index: int,
                  entries: tuple[tuple[int, bytes], ...]) -> list[Write]:
    """Entries at consecutive positions, one write per contiguous run."""
    writes = []
    run_start = 0
    for index in range(1, len(entries) + 1):
        if index == len(entries) or entries[index][0] != entries[index - 1][0] + 1:
            position = entries[run_start][0]
            data = b"".join(encoded for _, encoded in entries[run_start:index])
            offset = layout.table_offset(table_index) + position * CHUNK_ENTRY_SIZE_BYTES
            writes.append(Write(offset, data))
            run_start = index
    return writes
