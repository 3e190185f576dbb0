"""Producer slots: the exactly-once window a ring file keeps (format version 2).

docs/FORMAT.md "Producer slots" is the contract. A producer is a publishing
process that names itself with a random non-zero 64-bit id; each of its
batches carries a producer sequence. For each of up to `producer_slot_count`
recent producers a ring keeps the acknowledgements of its last
PRODUCER_ACK_COUNT_MAX stored batches (producer sequence -> first sequence and
record count), so that a batch resent after a lost Ack is answered with its
original Ack instead of being stored twice.

The slots are written in the same chain as the batches they describe, before
the records, and committed by the same header::

    slot copies -> data write(s) -> chunk-table write(s) -> header -> fdatasync

Each slot has two 512-byte copies (one sector each); a write goes to the copy
that is not current, so a torn write leaves the current one. A copy records
the generation of the header that commits it (`commit_generation`), the
cursor after its chain (`chain_next_sequence`) and how many slot copies its
chain wrote (`chain_write_count`). Recovery (recovery.py) adopts a copy only
when its chain's records are all recovered:

- a copy of the usable header's own chain (generation h) when that batch's
  tail verified whole;
- a copy of the chain after it (generation h + 1, whose header never landed)
  only together with a roll-forward over exactly that chain's records, and
  only if all `chain_write_count` copies of that chain are there;
- older copies always (their chains were durable before header h was written).

Slot copy layout (512 bytes, little-endian)::

      0   8  producer_id          u64, non-zero (an all-zero copy is empty)
      8   8  commit_generation    u64 the header generation that commits it
     16   8  chain_next_sequence  u64 the cursor after the chain that wrote it
     24   4  chain_write_count    u32 slot copies that chain wrote, 1..8
     28   4  ack_count            u32 n, 1..16
     32  24n acks, oldest first:  producer_sequence u64, first_sequence u64,
                                  record_count u32 (1..4096), reserved u32 zero
    ...      zero
    496  16  checksum             BLAKE3-128(file_id u64 || slot u32 || copy u32
                                  || bytes 0..495)
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence

from ringtail.ioring.chain import Write
from ringtail.ioring.format import (CHECKSUM_SIZE_BYTES, PRODUCER_SLOT_COPY_SIZE_BYTES,
                                    SEQUENCE_LIMIT, Layout, checksum)

# Acks kept per producer: a resent batch is recognised if it is among its
# producer's last 16 stored batches. A client keeps at most this many batches
# unacknowledged per producer (the Publisher's window is at most this), so every
# batch it can resend is in the window. 16 x 24 B fits one 512-byte copy.
PRODUCER_ACK_COUNT_MAX = 16
# Distinct producers one chain may carry: each costs one slot write in the
# chain. 8 + the unseal (2) + a batch's own operations (6) = 16, io_uring's
# CHAIN_OPERATION_COUNT_MAX. The batcher closes a chain at the ninth producer.
PRODUCER_CHAIN_WRITE_COUNT_MAX = 8
# A batch's records per ack: the protocol's publish maximum.
PRODUCER_ACK_RECORD_COUNT_MAX = 4096

_COPY_HEAD = struct.Struct("<QQQII")
_ACK = struct.Struct("<QQII")
_COPY_CHECKED_SIZE = PRODUCER_SLOT_COPY_SIZE_BYTES - CHECKSUM_SIZE_BYTES
_KEY = struct.Struct("<QII")  # file_id, slot, copy: mixed into the checksum
assert _COPY_HEAD.size + PRODUCER_ACK_COUNT_MAX * _ACK.size <= _COPY_CHECKED_SIZE
EMPTY_COPY = bytes(PRODUCER_SLOT_COPY_SIZE_BYTES)
_ZEROS = bytes(_COPY_CHECKED_SIZE)
_ACKS_SIZE_MAX = PRODUCER_ACK_COUNT_MAX * _ACK.size


@dataclasses.dataclass(frozen=True, slots=True)
class ProducerAck:
    """One stored batch of a producer: the Ack it was answered with."""

    producer_sequence: int
    first_sequence: int
    record_count: int

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + self.record_count - 1


class SlotCopy:
    """One decoded slot copy. The acks stay packed as on disk (24 bytes each):
    a ring keeps up to 64 x 16 of them, and objects per ack would cost ~3.8 KiB
    per slot (242 KiB per ring, measured with tracemalloc) against ~0.6 KiB."""

    __slots__ = ("producer_id", "commit_generation", "chain_next_sequence",
                 "chain_write_count", "packed_acks")

    def __init__(self, producer_id: int, commit_generation: int, chain_next_sequence: int,
                 chain_write_count: int, acks: tuple[ProducerAck, ...] = (),
                 packed_acks: bytes | None = None):
        self.producer_id = producer_id
        self.commit_generation = commit_generation
        self.chain_next_sequence = chain_next_sequence
        self.chain_write_count = chain_write_count
        self.packed_acks = packed_acks if packed_acks is not None else b"".join(
            _ACK.pack(ack.producer_sequence, ack.first_sequence, ack.record_count, 0)
            for ack in acks)

    @property
    def acks(self) -> tuple[ProducerAck, ...]:
        """Oldest first, 1..PRODUCER_ACK_COUNT_MAX."""
        return tuple(ProducerAck(sequence, first, count)
                     for sequence, first, count, _ in _ACK.iter_unpack(self.packed_acks))

    def find(self, producer_sequence: int) -> ProducerAck | None:
        for sequence, first, count, _ in _ACK.iter_unpack(self.packed_acks):
            if sequence == producer_sequence:
                return ProducerAck(sequence, first, count)
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotCopy) and all(
            getattr(self, name) == getattr(other, name) for name in SlotCopy.__slots__)

    def __repr__(self) -> str:
        return (f"SlotCopy(producer_id={self.producer_id:#x}, commit_generation="
                f"{self.commit_generation}, chain_next_sequence={self.chain_next_sequence}, "
                f"chain_write_count={self.chain_write_count}, acks={self.acks})")

    def encode(self, file_id: int, slot: int, copy: int) -> bytes:
        packed = self.packed_acks
        body = b"".join((_COPY_HEAD.pack(self.producer_id, self.commit_generation,
                                         self.chain_next_sequence, self.chain_write_count,
                                         len(packed) // _ACK.size),
                         packed, _ZEROS[:_COPY_CHECKED_SIZE - _COPY_HEAD.size - len(packed)]))
        return body + checksum(_KEY.pack(file_id, slot, copy) + body)


class SlotCopyDecodeError(ValueError):
    """A slot copy is unusable (torn, damaged, or not of this slot)."""


def decode_slot_copy(data: bytes | memoryview, file_id: int, slot: int,
                     copy: int) -> SlotCopy | None:
    """The copy in `data` (512 bytes), None if it is empty (all zero).

    Raises:
        SlotCopyDecodeError: checksum mismatch or values no writer writes.
    """
    data = bytes(data)
    if data == EMPTY_COPY:
        return None
    body = data[:_COPY_CHECKED_SIZE]
    if checksum(_KEY.pack(file_id, slot, copy) + body) != data[_COPY_CHECKED_SIZE:]:
        raise SlotCopyDecodeError("checksum mismatch")
    producer_id, generation, chain_next, write_count, ack_count = _COPY_HEAD.unpack_from(body)
    if not (producer_id and 1 <= ack_count <= PRODUCER_ACK_COUNT_MAX
            and 1 <= write_count <= PRODUCER_CHAIN_WRITE_COUNT_MAX
            and generation < SEQUENCE_LIMIT and chain_next < SEQUENCE_LIMIT):
        raise SlotCopyDecodeError(
            f"impossible values: producer {producer_id}, {ack_count} acks, chain of "
            f"{write_count} slot writes")
    packed = body[_COPY_HEAD.size:_COPY_HEAD.size + ack_count * _ACK.size]
    for index, (_, first, count, _) in enumerate(_ACK.iter_unpack(packed)):
        if not 1 <= count <= PRODUCER_ACK_RECORD_COUNT_MAX or first + count > chain_next:
            raise SlotCopyDecodeError(f"ack {index} names {count} records at {first}, past "
                                      f"its chain's cursor {chain_next}")
    return SlotCopy(producer_id, generation, chain_next, write_count, packed_acks=packed)


@dataclasses.dataclass(slots=True)
class Slot:
    """A slot's state as the writer sees it: its current copy and what it holds."""

    current_copy: int | None  # 0 or 1; None: neither copy holds a producer
    content: SlotCopy | None


@dataclasses.dataclass(frozen=True, slots=True)
class ProducerPlan:
    """The slot writes of one chain, and what its commit installs."""

    writes: tuple[Write, ...]
    installs: tuple[tuple[int, int, SlotCopy], ...]  # (slot, copy, content)


class ProducerTable:
    """The producer slots of one open ring, in memory (the writer's mirror).

    `plan()` builds a chain's slot writes from the acks of the batches it
    completes; `install()` applies them when the chain is durable. A producer
    without a slot takes an empty one, else the least recently written
    (its producer is forgotten: its resends are stored again).
    """

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self._by_producer = {slot.content.producer_id: index
                             for index, slot in enumerate(slots) if slot.content is not None}

    @property
    def slot_count(self) -> int:
        return len(self.slots)

    def acks(self, producer_id: int) -> tuple[ProducerAck, ...]:
        """The producer's remembered acks, oldest first (empty if unknown)."""
        index = self._by_producer.get(producer_id)
        return () if index is None else self.slots[index].content.acks

    def find(self, producer_id: int, producer_sequence: int
             ) -> tuple[ProducerAck | None, int, int | None]:
        """(the ack of that batch or None, how many acks the producer has,
        the oldest one's producer sequence or None): the publish path's lookup."""
        index = self._by_producer.get(producer_id)
        if index is None:
            return None, 0, None
        content = self.slots[index].content
        packed = content.packed_acks
        return (content.find(producer_sequence), len(packed) // _ACK.size,
                _ACK.unpack_from(packed)[0])

    def plan(self, acks: Sequence[tuple[int, ProducerAck]], commit_generation: int,
             chain_next_sequence: int, file_id: int, layout: Layout) -> ProducerPlan:
        """The slot writes for a chain that commits `acks` ((producer, ack), in
        commit order) under header generation `commit_generation`."""
        grouped: dict[int, list[ProducerAck]] = {}
        for producer_id, ack in acks:
            grouped.setdefault(producer_id, []).append(ack)
        assert len(grouped) <= PRODUCER_CHAIN_WRITE_COUNT_MAX, len(grouped)
        if not grouped or not self.slots:
            return ProducerPlan((), ())
        victims = None  # sorted only when a producer needs a slot (rare after start-up)
        writes, installs = [], []
        for producer_id, new in grouped.items():
            index = self._by_producer.get(producer_id)
            if index is None:
                if victims is None:
                    victims = self._victims(grouped)
                index, old = next(victims), b""
            else:
                old = self.slots[index].content.packed_acks
            slot = self.slots[index]
            copy = 0 if slot.current_copy is None else 1 - slot.current_copy
            packed = old + SlotCopy(0, 0, 0, 0, new).packed_acks
            content = SlotCopy(producer_id, commit_generation, chain_next_sequence,
                               len(grouped), packed_acks=packed[-_ACKS_SIZE_MAX:])
            writes.append(Write(layout.slot_copy_offset(index, copy),
                                content.encode(file_id, index, copy)))
            installs.append((index, copy, content))
        return ProducerPlan(tuple(writes), tuple(installs))

    def _victims(self, grouped: dict[int, list[ProducerAck]]) -> Iterable[int]:
        """Slots for producers that have none: empty ones first, then the least
        recently written, never one a producer of this chain holds."""
        keep = {self._by_producer[p] for p in grouped if p in self._by_producer}
        order = sorted((index for index in range(len(self.slots)) if index not in keep),
                       key=lambda i: (self.slots[i].content is not None,
                                      self.slots[i].content.commit_generation
                                      if self.slots[i].content is not None else 0))
        return iter(order)

    def install(self, plan: ProducerPlan) -> None:
        for index, copy, content in plan.installs:
            slot = self.slots[index]
            if slot.content is not None and slot.content.producer_id != content.producer_id:
                del self._by_producer[slot.content.producer_id]
            slot.current_copy, slot.content = copy, content
            self._by_producer[content.producer_id] = index


def empty_table(slot_count: int) -> ProducerTable:
    return ProducerTable([Slot(None, None) for _ in range(slot_count)])
