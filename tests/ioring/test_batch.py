"""Batch plans and their paired assertions (ioring/batch.py).

A plan is checked when it is made, before its chain is submitted, and again
when the chain completes and the commit is applied. These tests break one fact
of a real plan at a time and check that `check_plan` refuses it, and that a
ring whose state moves under a chain in flight is stopped at commit.
"""

from __future__ import annotations

import dataclasses

import pytest

from ringtail.ioring.batch import BatchTicket, check_header_successor, check_plan, plan_batch
from ringtail.ioring.chain import FDATASYNC, Write
from ringtail.ioring.format import CHUNK_RECORD_COUNT, HEADER_COPY_OFFSETS
from ringtail.ioring.reader import NO_COPY
from ringtail.ioring.ring import open_ring

from .conftest import TENANT_ID, make_records

CAPACITY = 512


@pytest.fixture
def ring(ring_path):
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads") as ring:
        # 470 records: the next batch continues chunk 7 and wraps to slot 0.
        for first, count in ((0, 200), (200, 200), (400, 70)):
            ring.append(make_records(first, count))
        yield ring


def _plan(ring, count: int = 100):
    ticket = BatchTicket(99, ring.next_sequence, count)
    plan = plan_batch(ticket, make_records(ring.next_sequence, count), ring.layout,
                      ring._header, ring._table, ring._tail_hasher, ring.sync)
    return plan


def _check(ring, plan) -> None:
    check_plan(plan, ring.layout, ring._header, ring._table, ring.sync)


def test_a_plan_across_the_wrap_passes_its_checks(ring):
    plan = _plan(ring)
    _check(ring, plan)
    first_chunk = 470 // CHUNK_RECORD_COUNT
    assert [position for position, _ in plan.entries] == [7, 0]  # chunks 7 and 8
    assert plan.table_index == 1 - ring._table.current[first_chunk % 8] != NO_COPY
    assert len(plan.operations) == 6 and plan.operations[-1] is FDATASYNC
    assert (plan.header.generation, plan.header.next_sequence) == (
        ring._header.generation + 1, 570)


@pytest.mark.parametrize("bug", [
    "cursor skips", "generation skips", "same header copy", "oldest not evicted",
    "other table copy", "entry missing", "entry names the wrong chunk",
    "entry record count", "header written to the wrong copy", "record write misplaced",
    "no fdatasync",
])
def test_a_planning_bug_is_refused(ring, bug):
    plan = _plan(ring)
    header, operations = plan.header, list(plan.operations)
    if bug == "cursor skips":
        plan = dataclasses.replace(plan, header=dataclasses.replace(
            header, next_sequence=header.next_sequence + 1))
    elif bug == "generation skips":
        plan = dataclasses.replace(plan, header=dataclasses.replace(
            header, generation=header.generation + 2))
    elif bug == "same header copy":
        plan = dataclasses.replace(plan, header=dataclasses.replace(
            header, generation=header.generation - 1))
    elif bug == "oldest not evicted":
        plan = dataclasses.replace(plan, header=dataclasses.replace(
            header, oldest_sequence=ring.oldest_sequence))
    elif bug == "other table copy":
        plan = dataclasses.replace(plan, table_index=1 - plan.table_index)
    elif bug == "entry missing":
        plan = dataclasses.replace(plan, entries=plan.entries[:1])
    elif bug == "entry names the wrong chunk":
        position, encoded = plan.entries[1]
        plan = dataclasses.replace(plan, entries=(plan.entries[0], (
            position, (8 * CHUNK_RECORD_COUNT + CAPACITY).to_bytes(8, "little")
            + encoded[8:])))
    elif bug == "entry record count":
        position, encoded = plan.entries[1]
        plan = dataclasses.replace(plan, entries=(plan.entries[0], (
            position, encoded[:8] + (64).to_bytes(4, "little") + encoded[12:])))
    elif bug == "header written to the wrong copy":
        write = operations[-2]
        other = HEADER_COPY_OFFSETS[1 - HEADER_COPY_OFFSETS.index(write.offset)]
        operations[-2] = Write(other, write.data)
        plan = dataclasses.replace(plan, operations=operations)
    elif bug == "record write misplaced":
        operations[0] = Write(operations[0].offset + 64, operations[0].data)
        plan = dataclasses.replace(plan, operations=operations)
    elif bug == "no fdatasync":
        plan = dataclasses.replace(plan, operations=operations[:-1])
    with pytest.raises(AssertionError):
        _check(ring, plan)


def test_a_header_successor_keeps_the_file_and_a_valid_cursor(ring):
    header = ring._header
    following = dataclasses.replace(header, generation=header.generation + 1)
    check_header_successor(header, following)
    for bad in (dataclasses.replace(following, file_id=header.file_id + 1),
                dataclasses.replace(following, tenant_id=header.tenant_id + 1),
                dataclasses.replace(following, batch_first_sequence=header.next_sequence + 1),
                dataclasses.replace(following, oldest_sequence=header.next_sequence - CAPACITY - 1)):
        with pytest.raises(AssertionError):
            check_header_successor(header, bad)


def test_state_that_moves_while_a_chain_is_in_flight_is_caught_at_commit(ring):
    committed = ring._header
    ring.submit(make_records(470, 10))
    ring._header = dataclasses.replace(committed, next_sequence=committed.next_sequence + 1)
    with pytest.raises(AssertionError):
        ring.wait()
    ring._header = committed  # so that the fixture's close can seal
