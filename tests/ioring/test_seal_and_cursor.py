"""Header values read from disk, and the seal (issue 9, items 12 and 13).

Item 12: values decoded from a header copy are checked with typed errors, never
asserted. A copy with a valid checksum whose cursor no writer can have written
(a last batch longer than a batch, an oldest sequence below what eviction left)
is unusable ("inconsistent cursor"): the other copy is used, and if neither is
usable the open fails with RingCorruptError naming the file and the offset.

Item 13: a cleanly closed (sealed) ring has no batch in flight, so a head-window
chunk that fails its checksum is damage: kept, reported by recovery, and refused
by reads naming the file and offset; never dropped as an eviction. A writer
unseals the file before its first batch, so a batch in flight after a reopen is
still recovered as an eviction.

The files are built for real with `open_ring` and damaged on disk; crafted
header copies carry a valid checksum.
"""

from __future__ import annotations

import struct

import pytest

from ringtail.ioring.chain import FDATASYNC
from ringtail.ioring.errors import RingCorruptError
from ringtail.ioring.format import (CHUNK_RECORD_COUNT, HEADER_COPY_OFFSETS, HEADER_SIZE_BYTES,
                                    PAGE_SIZE_BYTES, Layout, checksum, decode_header)
from ringtail.ioring.ring import open_ring
from ringtail.ioring.scan import inspect_ring

from .conftest import TENANT_ID, flip_byte, make_records, read_bytes, write_bytes

CAPACITY = 512  # 8 chunks; a batch holds at most (512 - 64) / 2 = 224 records
LAYOUT = Layout(CAPACITY)
OLDEST_OFFSET, BATCH_FIRST_OFFSET = 32, 48  # header fields (docs/FORMAT.md, "Header")


def _headers(path: str):
    return [decode_header(read_bytes(path, HEADER_SIZE_BYTES, offset))
            for offset in HEADER_COPY_OFFSETS]


def _newest(path: str) -> int:
    generations = [header.generation for header in _headers(path)]
    return generations.index(max(generations))


def _set_u64(path: str, copy: int, field_offset: int, value: int) -> None:
    """Rewrite one u64 field of a header copy, with a valid checksum."""
    offset = HEADER_COPY_OFFSETS[copy]
    body = bytearray(read_bytes(path, HEADER_SIZE_BYTES - 16, offset))
    struct.pack_into("<Q", body, field_offset, value)
    write_bytes(path, bytes(body) + checksum(bytes(body)), offset)


def _write(path: str, io: str, batches) -> None:
    """Append `batches` (sizes) and close cleanly: the file is sealed."""
    with open_ring(path, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        for count in batches:
            ring.append(make_records(ring.next_sequence, count))


# -- item 12 ------------------------------------------------------------------------


def test_a_last_batch_longer_than_a_batch_makes_the_copy_unusable(ring_path, io):
    _write(ring_path, io, [100, 100, 100, 40])  # 0..339, sealed
    newest = _newest(ring_path)
    # batch_first 0 claims a last batch of 340 records (at most 224): before the
    # fix this reached an `assert` in recovery and escaped as AssertionError.
    _set_u64(ring_path, newest, BATCH_FIRST_OFFSET, 0)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert report.header_copy == 1 - newest
        assert report.other_copy_problem == (
            "inconsistent cursor: oldest=0 batch_first=0 next=340 capacity=512: the last "
            "batch holds 340 records, more than a batch can (224)")
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 340)
        assert ring.read(0, 340) == make_records(0, 340)


def test_both_copies_impossible_is_a_typed_error_naming_the_file_and_offset(ring_path, io):
    _write(ring_path, io, [100, 100, 100, 40])
    for copy in (0, 1):
        _set_u64(ring_path, copy, BATCH_FIRST_OFFSET, 0)
    for opener in (lambda: open_ring(ring_path, tenant_id=TENANT_ID, io=io),
                   lambda: inspect_ring(ring_path)):
        with pytest.raises(RingCorruptError, match=r"both header copies are unusable \(copy 0: "
                           r"inconsistent cursor: .*the last batch holds \d+ records") as caught:
            opener()
        assert (caught.value.path, caught.value.offset) == (ring_path, 0)
        assert str(caught.value).startswith(f"{ring_path} at byte offset 0: ")


def test_an_oldest_below_what_eviction_left_makes_the_copy_unusable(ring_path, io):
    _write(ring_path, io, [200, 200, 200])  # 0..599: oldest 128 (chunks 0 and 1 evicted)
    newest = _newest(ring_path)
    assert _headers(ring_path)[newest].oldest_sequence == 128
    # 600 - 100 <= capacity, so the old check passed it; but slots of 100..127
    # hold records 612.. of a later lap.
    _set_u64(ring_path, newest, OLDEST_OFFSET, 100)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.other_copy_problem.endswith(
            "oldest is below 128, where writing next_sequence evicted everything older")
        assert (ring.oldest_sequence, ring.next_sequence) == (128, 600)


# -- item 13 ------------------------------------------------------------------------

# 600 records sealed: retained 128..599. A batch after the seal could evict
# below 600 + 224 - 512 = 312: the head window is chunks 2, 3, 4 (128..319).
DAMAGED_CHUNK = 3
DAMAGED_FIRST = DAMAGED_CHUNK * CHUNK_RECORD_COUNT


def test_damage_in_the_head_window_of_a_sealed_ring_is_damage_not_eviction(ring_path, io):
    _write(ring_path, io, [200, 200, 200])
    newest = _headers(ring_path)[_newest(ring_path)]
    assert newest.batch_first_sequence == newest.next_sequence == 600  # the seal
    chunk_offset = LAYOUT.record_offset(DAMAGED_FIRST)
    flip_byte(ring_path, chunk_offset + 100)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        # Before the fix: dropped_head (128, 255), oldest 256, "evicted by a batch in
        # flight at the crash". No acknowledged record disappears now.
        assert report.sealed and report.dropped_head is None
        assert report.damaged_chunk_offsets == (chunk_offset,)
        assert f"DAMAGED: chunk(s) at byte offset {chunk_offset}" in report.summary()
        assert (ring.oldest_sequence, ring.next_sequence) == (128, 600)
        with pytest.raises(RingCorruptError, match=r"records 192\.\.255 failed their checksum") \
                as caught:
            ring.read(128, 472)
        assert (caught.value.path, caught.value.offset) == (ring_path, chunk_offset)
        assert ring.read(128, 64) == make_records(128, 64)
        assert ring.read(256, 344) == make_records(256, 344)


def test_the_first_chain_after_a_seal_unseals_the_file_before_any_record(ring_path, io):
    _write(ring_path, io, [200, 200, 200])
    sealed = _headers(ring_path)[_newest(ring_path)]
    assert sealed.batch_first_sequence == sealed.next_sequence == 600
    chains: list[list] = []
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io, observer=chains.append) as ring:
        assert ring.recovery_report.sealed
        assert _headers(ring_path)[_newest(ring_path)] == sealed  # opening writes nothing
        ring.append(make_records(600, 1))
        (chain,) = chains
        unseal, barrier = chain[0], chain[1]
        assert barrier is FDATASYNC and chain[-1] is FDATASYNC
        assert unseal.offset == HEADER_COPY_OFFSETS[(sealed.generation + 1) % 2]
        unsealed = decode_header(unseal.data)
        assert (unsealed.generation, unsealed.oldest_sequence, unsealed.batch_first_sequence,
                unsealed.next_sequence) == (sealed.generation + 1, 128, 599, 600)
        committed = _headers(ring_path)[_newest(ring_path)]
        assert (committed.generation, committed.batch_first_sequence,
                committed.next_sequence) == (sealed.generation + 2, 600, 601)
        ring.append(make_records(601, 1))
        assert chains[1].count(FDATASYNC) == 1  # only the first chain unseals
        statistics = ring.statistics()
        assert (statistics.batches_committed, statistics.fdatasync_count) == (2, 3)
    resealed = _headers(ring_path)[_newest(ring_path)]
    assert (resealed.generation, resealed.batch_first_sequence, resealed.next_sequence) == (
        sealed.generation + 4, 602, 602)


def test_a_reopen_and_close_without_a_batch_leaves_the_seal_as_it_is(ring_path, io):
    _write(ring_path, io, [200, 200, 200])
    before = read_bytes(ring_path, 2 * PAGE_SIZE_BYTES, 0)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io):
        pass
    assert read_bytes(ring_path, 2 * PAGE_SIZE_BYTES, 0) == before


def test_a_batch_in_flight_after_a_reopen_of_a_sealed_ring_is_still_an_eviction(ring_path, io):
    _write(ring_path, io, [200, 200, 200])  # sealed, retained 128..599
    chains: list[list] = []
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io, observer=chains.append) as ring:
        # Both header pages and both chunk tables as they are before the batch.
        before = read_bytes(ring_path, LAYOUT.data_offset, 0)
        # 600..699 go to slots 88..187: they evict chunk 2 (128..191).
        ring.append(make_records(600, 100))
    # The crash: the unsealed header and its fdatasync completed and the records
    # landed; the chunk entries and the batch's header did not.
    unseal = chains[0][0]
    write_bytes(ring_path, before, 0)
    write_bytes(ring_path, unseal.data, unseal.offset)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert not report.sealed and report.damaged_chunk_offsets == ()
        assert report.dropped_head == (128, 191)
        assert (ring.oldest_sequence, ring.next_sequence) == (192, 600)
        assert ring.read(192, 408) == make_records(192, 408)


# -- generation parity (docs/FORMAT.md, "Header") ------------------------------------

GENERATION_OFFSET = 16


def test_a_copy_whose_generation_parity_names_the_other_slot_is_unusable(ring_path, io):
    _write(ring_path, io, [100, 100, 100, 40])
    newest = _newest(ring_path)
    generation = _headers(ring_path)[newest].generation
    # The older copy claims a generation above the newest, of the newest's
    # parity: checksum-valid, and without the parity check it would be chosen,
    # and the next header write would land on the copy in use.
    _set_u64(ring_path, 1 - newest, GENERATION_OFFSET, generation + 2)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert (report.header_copy, report.header_generation) == (newest, generation)
        assert report.other_copy_problem == (
            f"generation parity mismatch: generation {generation + 2} belongs in copy "
            f"{newest}, found in copy {1 - newest}")
        assert ring.read(0, 340) == make_records(0, 340)


def test_a_sequence_or_generation_not_below_2_63_makes_the_copy_unusable(ring_path, io):
    _write(ring_path, io, [100])
    newest = _newest(ring_path)
    header = _headers(ring_path)[newest]
    # An empty ring at 2^63: checksum-valid and otherwise consistent.
    for field in (OLDEST_OFFSET, BATCH_FIRST_OFFSET, 40):
        _set_u64(ring_path, newest, field, 1 << 63)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.other_copy_problem.endswith(
            "next is not below 2^63 (SEQUENCE_LIMIT)")
        assert ring.read(0, 100) == make_records(0, 100)
    newest = _newest(ring_path)
    _set_u64(ring_path, newest, GENERATION_OFFSET, (1 << 64) - 2 + newest)
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.recovery_report.other_copy_problem == (
            f"generation out of range: {(1 << 64) - 2 + newest} is not below 2^63 "
            "(SEQUENCE_LIMIT)")
        assert ring.read(0, 100) == make_records(0, 100)
    assert header.next_sequence == 100


def test_inspect_says_whether_the_last_close_was_clean(ring_path, io):
    def last_close() -> str:
        return dict(inspect_ring(ring_path).rows())["last close"]

    _write(ring_path, io, [100])
    assert last_close() == "clean (sealed)"
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        assert last_close() == "clean (sealed); a writer has it open now"
        ring.append(make_records(100, 1))
        assert last_close() == "not sealed: a writer has it open and has written"
        crashed = read_bytes(ring_path, 2 * PAGE_SIZE_BYTES, 0)
    assert last_close() == "clean (sealed)"
    write_bytes(ring_path, crashed, 0)  # the header pages as kill -9 would leave them
    assert last_close() == "not sealed: the last writer crashed or was killed"


def test_the_longest_chain_fits_the_uring_backend():
    from ringtail.ioring.batch import BATCH_CHAIN_OPERATION_COUNT_MAX
    from ringtail.ioring.ring import UNSEAL_OPERATION_COUNT_MAX
    from ringtail.ioring.uring import CHAIN_OPERATION_COUNT_MAX
    from ringtail.ioring.producers import PRODUCER_CHAIN_WRITE_COUNT_MAX
    assert BATCH_CHAIN_OPERATION_COUNT_MAX + UNSEAL_OPERATION_COUNT_MAX \
        + PRODUCER_CHAIN_WRITE_COUNT_MAX <= CHAIN_OPERATION_COUNT_MAX


def test_every_crash_of_the_first_chain_after_a_seal_recovers_every_acknowledged_record(
        ring_path):
    """The first chain after a seal, crashed in every way the crash model allows:
    before its fdatasync barrier, the unsealed header landed or not (or torn to
    garbage); after it, any subset of the batch's own writes. No acknowledged
    record that the batch does not evict is lost, nothing is reported as
    damage, and every retained record reads back."""
    import itertools
    _write(ring_path, "threads", [200, 200, 200])  # sealed, retained 128..599
    with open(ring_path, "rb") as file:
        sealed_image = file.read()
    chains: list[list] = []
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads", observer=chains.append) as ring:
        ring.append(make_records(600, 100))  # evicts chunk 2 (128..191)
    (chain,) = chains
    unseal, barrier, *rest = chain
    assert barrier is FDATASYNC and rest[-1] is FDATASYNC
    batch_writes = rest[:-1]
    assert len(batch_writes) >= 3  # data, entries, header

    def image_with(writes) -> bytes:
        image = bytearray(sealed_image)
        for write in writes:
            image[write.offset:write.offset + len(write.data)] = write.data
        return bytes(image)

    torn_unseal = type(unseal)(unseal.offset,
                               bytes((i * 37 + 11) % 256 for i in range(len(unseal.data))))
    states = [("nothing", image_with([])), ("torn unseal", image_with([torn_unseal]))]
    for count in range(len(batch_writes) + 1):
        for landed in itertools.combinations(batch_writes, count):
            states.append((f"unseal + {count} writes", image_with([unseal, *landed])))
    checked = 0
    for label, image in states:
        with open(ring_path, "wb") as file:
            file.write(image)
        with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
            report = ring.recovery_report
            assert report.damaged_chunk_offsets == (), (label, report.summary())
            # 128..191 may go (the batch evicts them); 192..599 never.
            assert ring.oldest_sequence in (128, 192) and ring.next_sequence in (600, 700), \
                (label, report.summary())
            assert ring.read(192, 408) == make_records(192, 408), label
            if ring.next_sequence == 700:
                assert ring.read(600, 100) == make_records(600, 100), label
            if ring.oldest_sequence == 128:
                assert ring.read(128, 64) == make_records(128, 64), label
        checked += 1
    assert checked == 2 + 2 ** len(batch_writes)
