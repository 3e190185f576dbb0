"""Producer slots (ioring/producers.py): the exactly-once window in the ring file.

What must hold (docs/FORMAT.md "Producer slots", docs/PROTOCOL.md 4.12):

- a chain's slot copies are adopted by recovery exactly when its records are:
  after a process crash (`kill -9`: the chain's writes land in order, any
  prefix of them) both or neither, so a resend is answered from the window
  if and only if its records are in the ring: exactly once;
- after a power loss (any subset of the chain's writes, one torn), never an
  ack without its records (a false "already stored" would lose the batch);
  at most the window forgets a batch whose records survived (stored again on
  resend: the documented exception);
- copies survive close and reopen, the window keeps each producer's last 16
  acks, and a full table replaces the least recently written producer.

Crash images are built from the chain the ring really submitted (its
`observer`), applied to the synced file as it was before that chain.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

from ringtail.ioring import open_ring
from ringtail.ioring.chain import Write
from ringtail.ioring.format import PRODUCER_SLOT_COPY_SIZE_BYTES, PRODUCER_SLOT_COUNT, Layout
from ringtail.ioring.producers import (PRODUCER_ACK_COUNT_MAX, ProducerAck, SlotCopy,
                                       SlotCopyDecodeError, decode_slot_copy)
from tests.ioring.conftest import TENANT_ID

CAPACITY = 256  # batches of up to 96 records
RECORD = 64


def records_for(first: int, count: int, tag: int) -> bytes:
    """Distinct, recognisable records: sequence and tag in every one."""
    return b"".join((sequence.to_bytes(8, "little") + tag.to_bytes(8, "little")) * 4
                    for sequence in range(first, first + count))


def test_a_slot_copy_round_trips_and_is_bound_to_its_file_slot_and_copy():
    copy = SlotCopy(0xABC, 9, 130, 2, (ProducerAck(4, 100, 10), ProducerAck(5, 110, 20)))
    data = copy.encode(file_id=1234, slot=3, copy=1)
    assert len(data) == PRODUCER_SLOT_COPY_SIZE_BYTES
    assert decode_slot_copy(data, 1234, 3, 1) == copy
    assert decode_slot_copy(bytes(PRODUCER_SLOT_COPY_SIZE_BYTES), 1234, 3, 1) is None  # empty
    for file_id, slot, index in ((1235, 3, 1), (1234, 4, 1), (1234, 3, 0)):
        with pytest.raises(SlotCopyDecodeError, match="checksum mismatch"):
            decode_slot_copy(data, file_id, slot, index)  # moved or from another file
    torn = bytearray(data)
    torn[40] ^= 1
    with pytest.raises(SlotCopyDecodeError, match="checksum mismatch"):
        decode_slot_copy(bytes(torn), 1234, 3, 1)


def test_acks_survive_reopen_the_window_keeps_16_and_a_full_table_forgets_the_oldest(ring_path):
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads") as ring:
        assert ring.layout.producer_slot_count == PRODUCER_SLOT_COUNT
        for sequence in range(PRODUCER_ACK_COUNT_MAX + 4):  # producer 1: 20 batches of 2
            first = ring.next_sequence
            ring.append(records_for(first, 2, 1), ((1, ProducerAck(sequence, first, 2)),))
        # PRODUCER_SLOT_COUNT more producers, one batch each: producer 1 is the
        # least recently written when the last one needs a slot.
        for producer in range(2, PRODUCER_SLOT_COUNT + 2):
            first = ring.next_sequence
            ring.append(records_for(first, 1, producer),
                        ((producer, ProducerAck(0, first, 1)),))
        remembered = [ring.producers.acks(p) for p in range(1, PRODUCER_SLOT_COUNT + 2)]
    assert remembered[0] == ()  # forgotten: its slot went to the newest producer
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
        assert [ring.producers.acks(p) for p in range(1, PRODUCER_SLOT_COUNT + 2)] == remembered
        assert ring.recovery_report.producer_slots_in_use == PRODUCER_SLOT_COUNT
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
        assert ring.producers.acks(PRODUCER_SLOT_COUNT + 1) == (
            ProducerAck(0, 40 + PRODUCER_SLOT_COUNT - 1, 1),)


def test_the_window_keeps_the_last_16_acks_of_a_producer(ring_path):
    with open_ring(ring_path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads") as ring:
        for sequence in range(PRODUCER_ACK_COUNT_MAX + 4):
            first = ring.next_sequence
            ring.append(records_for(first, 2, 1), ((9, ProducerAck(sequence, first, 2)),))
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
        acks = ring.producers.acks(9)
    assert [ack.producer_sequence for ack in acks] == list(range(4, PRODUCER_ACK_COUNT_MAX + 4))
    assert [ack.first_sequence for ack in acks] == list(range(8, 2 * PRODUCER_ACK_COUNT_MAX + 8, 2))


# -- crash states -------------------------------------------------------------------------


class Recorded:
    """A ring with history, the file as synced before one last chain, and that chain."""

    def __init__(self, path: str, rng: random.Random, sealed_before: bool):
        chains: list[list] = []
        ring = open_ring(path, capacity=CAPACITY, tenant_id=TENANT_ID, io="threads",
                         observer=chains.append)
        for batch in range(12):  # wrap the ring; producers 1..3 in turn
            first, count = ring.next_sequence, rng.randint(1, 40)
            producer = 1 + batch % 3
            ring.append(records_for(first, count, batch),
                        ((producer, ProducerAck(batch, first, count)),))
        self.acks_before = {p: ring.producers.acks(p) for p in (1, 2, 3, 4)}
        if sealed_before:  # closed cleanly, reopened: the chain starts by unsealing
            ring.close()
            ring = open_ring(path, tenant_id=TENANT_ID, io="threads", observer=chains.append)
        with open(path, "rb") as file:
            self.before = file.read()
        # The last chain: two producers' batches (2 and a new one, 4) and a
        # record of no producer between them.
        self.first = ring.next_sequence
        counts = (rng.randint(1, 30), 1, rng.randint(1, 30))
        self.end = self.first + sum(counts)
        self.records = records_for(self.first, sum(counts), 99)
        self.new_acks = {2: ProducerAck(100, self.first, counts[0]),
                         4: ProducerAck(7, self.first + counts[0] + 1, counts[2])}
        chains.clear()
        ring.append(self.records, tuple(self.new_acks.items()))
        self.writes = [op for op in chains[0] if isinstance(op, Write)]
        ring._failure = RuntimeError("abandoned: the test only wanted the chain")  # no seal
        ring.close()
        self.path = path

    def image(self, landed, torn: tuple[int, int] | None = None) -> bytes:
        """The file after a crash: `landed` writes of the chain, `torn` (write
        index, sector) with random bytes in one sector of a write that did not land."""
        image = bytearray(self.before)
        for index in landed:
            write = self.writes[index]
            image[write.offset:write.offset + len(write.data)] = write.data
        if torn is not None:
            write = self.writes[torn[0]]
            start = write.offset + torn[1] * 512
            end = min(start + 512, write.offset + len(write.data))
            image[start:end] = random.Random(torn[0] * 1000 + torn[1]).randbytes(end - start)
        return bytes(image)

    def recover(self, image: bytes, path: str):
        with open(path, "wb") as file:
            file.write(image)
        with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
            state = (ring.next_sequence, {p: ring.producers.acks(p) for p in (1, 2, 3, 4)},
                     ring.read(self.first, min(ring.next_sequence, self.end) - self.first)
                     if ring.next_sequence > self.first else b"")
        # What recovery decided was made durable: the same again on a second open.
        with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
            assert (ring.next_sequence, {p: ring.producers.acks(p) for p in (1, 2, 3, 4)}) \
                == state[:2], "a second recovery decided differently"
        return state


def acks_adopted(recorded: Recorded, acks: dict) -> bool | None:
    """True: the chain's acks are all there; False: none (the window as before)."""
    if all(acks[p][-1:] == (ack,) for p, ack in recorded.new_acks.items()):
        return True
    if all(acks[p] == recorded.acks_before[p] for p in recorded.new_acks):
        return False
    return None  # some adopted and not others


@pytest.fixture(params=[False, True], ids=["open", "after-seal"])
def recorded(request, tmp_path):
    return Recorded(os.fspath(tmp_path / "tenant.ring"), random.Random(11), request.param)


def test_a_process_crash_keeps_records_and_acks_both_or_neither(recorded, tmp_path):
    """kill -9: any prefix of the chain's writes (they are issued in order)."""
    seen = set()
    for landed in range(len(recorded.writes) + 1):
        next_sequence, acks, kept = recorded.recover(recorded.image(range(landed)),
                                                     os.fspath(tmp_path / "crash.ring"))
        adopted = acks_adopted(recorded, acks)
        assert adopted is not None, f"prefix {landed}: a part of the chain's acks adopted"
        assert next_sequence in (recorded.first, recorded.end), (landed, next_sequence)
        assert adopted == (next_sequence == recorded.end), (
            f"prefix {landed}: records up to {next_sequence}, acks adopted {adopted}")
        if adopted:
            assert kept == recorded.records
        seen.add(adopted)
    assert seen == {False, True}  # both outcomes were reached
    # The slot copies go before the records: no prefix lands records without them.
    layout = Layout(CAPACITY)
    kinds = ["slot" if w.offset >= layout.producer_offset else
             "data" if w.offset >= layout.data_offset else "table/header"
             for w in recorded.writes]
    assert kinds.count("slot") == 2 and kinds.index("data") > max(
        index for index, kind in enumerate(kinds) if kind == "slot"), kinds


def test_a_power_loss_never_adopts_an_ack_whose_records_are_not_all_back(recorded, tmp_path):
    """Any subset of the chain's writes, and one write not landed torn in one sector."""
    states = 0
    count = len(recorded.writes)
    for size in range(count + 1):
        for landed in itertools.combinations(range(count), size):
            tears = [None] + [(index, sector) for index in range(count) if index not in landed
                              for sector in {0, (len(recorded.writes[index].data) - 1) // 512}]
            for torn in tears:
                next_sequence, acks, kept = recorded.recover(
                    recorded.image(landed, torn), os.fspath(tmp_path / "crash.ring"))
                states += 1
                for producer, ack in recorded.new_acks.items():
                    if ack in acks[producer]:  # "already stored" must be true
                        assert next_sequence > ack.last_sequence, (landed, torn)
                        start = (ack.first_sequence - recorded.first) * RECORD
                        assert kept[start:start + ack.record_count * RECORD] == \
                            recorded.records[start:start + ack.record_count * RECORD]
                # Older batches' acks are never lost or changed by the crash.
                for producer in (1, 3):
                    assert acks[producer] == recorded.acks_before[producer], (landed, torn)
    assert states > 100


def test_a_version_1_file_is_read_and_written_as_version_1_without_a_window(ring_path):
    # A file as ringtail wrote it before format version 2: no producer slots.
    from ringtail.ioring.format import HEADER_COPY_OFFSETS, Header, decode_header
    layout = Layout(CAPACITY, 0)
    header = Header(generation=1, capacity=CAPACITY, oldest_sequence=0, next_sequence=0,
                    batch_first_sequence=0, tenant_id=TENANT_ID, created_ns=1, file_id=99,
                    format_version=1)
    with open(ring_path, "wb") as file:
        file.truncate(layout.file_size_bytes)
        for generation in (0, 1):
            copy = Header(**{**{f: getattr(header, f) for f in header.__dataclass_fields__},
                             "generation": generation})
            file.seek(HEADER_COPY_OFFSETS[generation])
            file.write(copy.encode())
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
        assert ring.producers.slot_count == 0
        ring.append(records_for(0, 5, 1), ((1, ProducerAck(0, 0, 5)),))  # no slot to keep it in
        assert ring.producers.acks(1) == ()
    assert os.path.getsize(ring_path) == layout.file_size_bytes  # nothing written past the data
    with open(ring_path, "rb") as file:
        data = file.read(8192)
    assert {decode_header(data[offset:offset + 128]).format_version
            for offset in HEADER_COPY_OFFSETS} == {1}
    with open_ring(ring_path, tenant_id=TENANT_ID, io="threads") as ring:
        assert ring.read(0, 5) == records_for(0, 5, 1)
