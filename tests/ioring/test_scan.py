"""Offline `verify`: every retained chunk checked, every damaged range named.

The ring (capacity 1024 = 16 chunks) is filled past a wrap, so the retained
chunks start at a table position in the middle of the file, wrap to position 0,
and end in a partial chunk; verify reads them in runs that may be shorter than
that (VERIFY_RUN_CHUNK_COUNT_MAX is varied), and must report the same either way.
"""

from __future__ import annotations

import os

import pytest

from ringtail.ioring import scan
from ringtail.ioring.format import CHUNK_RECORD_COUNT, Layout
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.ring import open_ring
from ringtail.ioring.scan import verify_ring

from .conftest import TENANT_ID, flip_byte, make_records

CAPACITY = 1024
LAYOUT = Layout(CAPACITY)
RECORD_COUNT = 2 * CAPACITY + 100  # next 2148: chunk 33 holds 36 records
OLDEST = (RECORD_COUNT // CHUNK_RECORD_COUNT + 1) * CHUNK_RECORD_COUNT - CAPACITY  # 1152


@pytest.fixture
def full_ring(ring_path) -> str:
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads") as ring:
        for first in range(0, RECORD_COUNT, 300):
            ring.append(make_records(first, min(300, RECORD_COUNT - first)))
        assert (ring.oldest_sequence, ring.next_sequence) == (OLDEST, RECORD_COUNT)
    return ring_path


def _checksum_message(path: str, chunk: int) -> str:
    first = chunk * CHUNK_RECORD_COUNT
    last = min(first + CHUNK_RECORD_COUNT, RECORD_COUNT) - 1
    return (f"{path} at byte offset {LAYOUT.record_offset(first)}: records {first}..{last} "
            "failed their checksum; the bytes on disk were damaged; run `ringtail verify` "
            "and restore from a copy")


@pytest.fixture(params=[1, 3, 256])
def run_chunk_count_max(request, monkeypatch) -> int:
    monkeypatch.setattr(scan, "VERIFY_RUN_CHUNK_COUNT_MAX", request.param)
    return request.param


def test_an_intact_ring_verifies_every_retained_record(full_ring, run_chunk_count_max):
    calls = []
    report = verify_ring(full_ring, lambda done, total: calls.append((done, total)))
    assert report.ok and report.damaged == ()
    assert report.verified_record_count == RECORD_COUNT - OLDEST
    assert report.evicted_during_scan == 0
    done = [done for done, _ in calls]
    assert done == sorted(done) and calls[-1] == (RECORD_COUNT - OLDEST, RECORD_COUNT - OLDEST)
    assert len(calls) >= -(-(RECORD_COUNT - OLDEST) // CHUNK_RECORD_COUNT // run_chunk_count_max)


def test_every_damaged_chunk_is_reported_with_its_offset(full_ring, run_chunk_count_max):
    # The oldest chunk, two neighbours across the wrap (positions 15 and 0),
    # one in the middle and the partial last chunk.
    damaged_chunks = [18, 31, 32, 25, 33]
    for chunk in damaged_chunks:
        flip_byte(full_ring, LAYOUT.record_offset(chunk * CHUNK_RECORD_COUNT + 5) + 9)
    report = verify_ring(full_ring)
    assert not report.ok
    assert list(report.damaged) == [_checksum_message(full_ring, chunk)
                                    for chunk in sorted(damaged_chunks)]
    lost = 4 * CHUNK_RECORD_COUNT + (RECORD_COUNT - 33 * CHUNK_RECORD_COUNT)
    assert report.verified_record_count == RECORD_COUNT - OLDEST - lost
    assert report.evicted_during_scan == 0


def test_a_damaged_chunk_entry_is_reported_as_missing(full_ring, run_chunk_count_max):
    chunk = 20
    for copy in (0, 1):  # first_sequence no longer names the chunk in either table
        flip_byte(full_ring, LAYOUT.entry_offset(copy, chunk), 0x40)
    report = verify_ring(full_ring)
    first = chunk * CHUNK_RECORD_COUNT
    assert report.damaged == (
        f"{full_ring} at byte offset {LAYOUT.record_offset(first)}: no chunk-table entry "
        f"for sequences {first}..{first + CHUNK_RECORD_COUNT - 1} (table position "
        f"{chunk % LAYOUT.chunk_count}); run `ringtail verify` and restore or move the file",)
    assert report.verified_record_count == RECORD_COUNT - OLDEST - CHUNK_RECORD_COUNT


def test_a_ring_shortened_while_verifying_is_reported_not_read_past(full_ring, monkeypatch):
    # check_geometry saw the right size; then the file lost its last record.
    real_pread = os.pread
    end = LAYOUT.producer_offset - RECORD_SIZE_BYTES  # the data region ends there
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: real_pread(
        fd, max(0, min(size, end - offset)), offset))
    report = verify_ring(full_ring)
    # The first run (chunks 18..31) ends at the end of the file; the one after
    # the wrap (chunks 32..33) is read and verified.
    run_offset = LAYOUT.record_offset(OLDEST)
    run_size = 14 * CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES
    assert report.damaged == (
        f"{full_ring} at byte offset {end}: file ends inside the data region "
        f"(read {end - run_offset} of {run_size} bytes)",)
    assert report.verified_record_count == RECORD_COUNT - 32 * CHUNK_RECORD_COUNT
