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
                                    HEADER_COPY_COUNT, HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES, Header,
                                    Layout, encode_batch_entries)
from ringtail.ioring.reader import NO_COPY, ChunkTable
from ringtail.ioring.record import RECORD_SIZE_BYTES

# Operations in one batch's chain: two data writes (around the wrap), two
# chunk-table writes (around the table's end), the header, the fdatasync.
BATCH_CHAIN_OPERATION_COUNT_MAX = 6


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
    `table` (before the plan's entries are installed)."""
    ticket, committed = plan.ticket, plan.header
    first, end = ticket.first_sequence, ticket.next_sequence
    assert 0 < ticket.record_count <= layout.batch_record_count_max, ticket
    # The cursor advances by exactly the batch, from where the last commit left it.
    assert first == header.next_sequence, (first, header)
    check_header_successor(header, committed)
    assert (committed.batch_first_sequence, committed.next_sequence) == (first, end), committed
    # Eviction: a chunk at a time, never backwards, never past the capacity.
    assert committed.oldest_sequence == layout.oldest_after_append(header.oldest_sequence, end)
    assert header.oldest_sequence <= committed.oldest_sequence <= end
    assert end - committed.oldest_sequence <= layout.capacity, committed
    # One entry per chunk the batch touches, in order, each naming its chunk
    # and the chunk's records below the new cursor.
    first_chunk = first // CHUNK_RECORD_COUNT
    assert len(plan.entries) == (end - 1) // CHUNK_RECORD_COUNT - first_chunk + 1, plan.entries
    for chunk, (position, encoded) in enumerate(plan.entries, first_chunk):
        assert position == chunk % layout.chunk_count and len(encoded) == CHUNK_ENTRY_SIZE_BYTES
        entry_first, entry_count = ENTRY_HEAD.unpack_from(encoded)
        assert entry_first == chunk * CHUNK_RECORD_COUNT, (chunk, entry_first)
        assert entry_count == min(CHUNK_RECORD_COUNT, end - entry_first), (chunk, entry_count)
    assert (plan.tail_hasher is None) == (end % CHUNK_RECORD_COUNT == 0)
    # The entries go to the table copy that does not hold the first chunk's
    # current (acknowledged) entry.
    assert plan.table_index == _table_index(layout, table, first), plan.table_index
    _check_operations(plan, layout, sync)


def check_header_successor(previous: Header, header: Header) -> None:
    """Assert that `header` may follow `previous` on disk: one generation on (so
    in the other copy), the same file, and a cursor that `decode_header` accepts."""
    assert header.generation == previous.generation + 1, (previous, header)
    assert header.copy_index != previous.copy_index
    assert (header.capacity, header.tenant_id, header.created_ns, header.file_id,
            header.format_version, header.chunk_record_count) == (
        previous.capacity, previous.tenant_id, previous.created_ns, previous.file_id,
        previous.format_version, previous.chunk_record_count), (previous, header)
    assert header.oldest_sequence <= header.batch_first_sequence <= header.next_sequence
    assert header.next_sequence - header.oldest_sequence <= header.capacity, header


def _check_operations(plan: BatchPlan, layout: Layout, sync: str) -> None:
    """The chain writes the records to their slots, the entries to their table
    copy, then the header to the copy its generation's parity names."""
    operations, ticket = plan.operations, plan.ticket
    assert len(operations) <= BATCH_CHAIN_OPERATION_COUNT_MAX, operations
    synced = sync == "batch"
    assert (operations[-1] is FDATASYNC) == synced, operations
    writes = operations[:-1] if synced else operations
    header_write = writes[-1]
    assert header_write.offset == HEADER_COPY_OFFSETS[plan.header.generation % HEADER_COPY_COUNT]
    assert len(header_write.data) == HEADER_SIZE_BYTES
    # The records, in one write or two around the end of the data region.
    capacity, count = layout.capacity, ticket.record_count
    head_count = min(count, capacity - ticket.first_sequence % capacity)
    assert (writes[0].offset, len(writes[0].data)) == (
        layout.record_offset(ticket.first_sequence), head_count * RECORD_SIZE_BYTES)
    data_writes = 1 if head_count == count else 2
    assert data_writes == 1 or (writes[1].offset, len(writes[1].data)) == (
        layout.data_offset, (count - head_count) * RECORD_SIZE_BYTES)
    # Then every entry, once, at its position in the chosen table copy.
    table_offset = layout.table_offset(plan.table_index)
    entries = plan.entries
    index = 0
    for write in writes[data_writes:-1]:
        assert isinstance(write, Write)
        assert write.offset == table_offset + entries[index][0] * CHUNK_ENTRY_SIZE_BYTES
        for start in range(0, len(write.data), CHUNK_ENTRY_SIZE_BYTES):
            assert write.data[start:start + CHUNK_ENTRY_SIZE_BYTES] == entries[index][1]
            index += 1
    assert index == len(entries), (index, entries)


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
