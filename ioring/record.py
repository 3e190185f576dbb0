"""The 64-byte slot record: vyre-runtime's VRRL record, kept byte for byte.

Layout (little-endian, no padding) — `RECORD_DTYPE` below *is* the spec::

    offset  size  field           notes
    ------  ----  --------------  ------------------------------------------------
         0     4  magic           u32 0xDEADBEEF; anything else is malformed
         4     8  timestamp_ns    u64 host wall clock, ns since the Unix epoch
        12     4  slot_idx        u32 ring slot the host published into
        16     4  tenant_id       u32 must equal the publisher's tenant
        20     4  opcode          u32
        24    16  args            4 x u32
        40     4  epoch           u32 epoch observed at publish time
        44     4  slot_status     u32 terminal status, 0 when unknown
        48     4  failure_class   u32 0 none, 1 device loss, 2 transient queue,
                                      3 program bug, 4 unclassified (other = 4)
        52     4  backend_code    u32 stable backend error code, 0 = none
        56     8  output_digest   u64 first 8 bytes of BLAKE3(output), LE

ringtail never rewrites a record: it stores and returns the published bytes.
This module only encodes, decodes and checks records; it does no I/O.
"""

from __future__ import annotations

import dataclasses
import struct

import blake3
import numpy

RECORD_SIZE_BYTES = 64
RECORD_MAGIC = 0xDEADBEEF

RECORD_DTYPE = numpy.dtype(
    [
        ("magic", "<u4"),
        ("timestamp_ns", "<u8"),
        ("slot_idx", "<u4"),
        ("tenant_id", "<u4"),
        ("opcode", "<u4"),
        ("args", "<u4", (4,)),
        ("epoch", "<u4"),
        ("slot_status", "<u4"),
        ("failure_class", "<u4"),
        ("backend_code", "<u4"),
        ("output_digest", "<u8"),
    ]
)

# `struct` codes of the little-endian integer types the on-disk layouts use.
_STRUCT_CODES = {"|u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q"}


def struct_for_dtype(dtype: numpy.dtype, field_count: int | None = None) -> struct.Struct:
    """The `struct.Struct` twin of a structured dtype (or of its first `field_count` fields).

    The dtype is the single definition of a layout; this derives the format
    that packs and unpacks one item without numpy, and asserts that the dtype
    is little-endian and has no padding (offsets follow one another).
    """
    codes = ["<"]
    offset = 0
    for name in dtype.names[:field_count]:
        field_dtype, field_offset = dtype.fields[name][:2]
        assert field_offset == offset, f"field {name} at {field_offset}, expected {offset}"
        base = field_dtype.base
        assert base.kind in "SV" or base.str in _STRUCT_CODES, f"field {name}: {base.str}"
        code = f"{base.itemsize}s" if base.kind in "SV" else _STRUCT_CODES[base.str]
        item_count = int(numpy.prod(field_dtype.shape))
        codes.append(code if item_count == 1 else f"{item_count}{code}")
        offset += field_dtype.itemsize
    layout = struct.Struct("".join(codes))
    assert layout.size == offset
    return layout


_STRUCT = struct_for_dtype(RECORD_DTYPE)
assert _STRUCT.size == RECORD_DTYPE.itemsize == RECORD_SIZE_BYTES
TENANT_ID_OFFSET = RECORD_DTYPE.fields["tenant_id"][1]
assert TENANT_ID_OFFSET == 16  # offsets are the contract (module docstring)

FAILURE_CLASS_NAMES = {
    0: "none",
    1: "device_loss",
    2: "transient_queue",
    3: "program_bug",
    4: "unclassified",
}


def failure_class_name(value: int) -> str:
    """Name of a failure class; any unknown value reads as unclassified."""
    return FAILURE_CLASS_NAMES.get(value, "unclassified")


@dataclasses.dataclass(frozen=True, slots=True)
class SlotRecord:
    """One decoded slot record (for tools and tests; hot paths use bytes/numpy)."""

    timestamp_ns: int = 0
    slot_idx: int = 0
    tenant_id: int = 0
    opcode: int = 0
    args: tuple[int, int, int, int] = (0, 0, 0, 0)
    epoch: int = 0
    slot_status: int = 0
    failure_class: int = 0
    backend_code: int = 0
    output_digest: int = 0
    magic: int = RECORD_MAGIC

    def encode(self) -> bytes:
        return _STRUCT.pack(
            self.magic,
            self.timestamp_ns,
            self.slot_idx,
            self.tenant_id,
            self.opcode,
            *self.args,
            self.epoch,
            self.slot_status,
            self.failure_class,
            self.backend_code,
            self.output_digest,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "SlotRecord":
        if len(data) != RECORD_SIZE_BYTES:
            raise ValueError(
                f"a slot record is {RECORD_SIZE_BYTES} bytes, got {len(data)}"
            )
        (magic, ts, slot, tenant, opcode, a0, a1, a2, a3, epoch, status,
         failure, backend, digest) = _STRUCT.unpack(data)
        return cls(ts, slot, tenant, opcode, (a0, a1, a2, a3), epoch, status,
                   failure, backend, digest, magic)

    @property
    def has_failure_evidence(self) -> bool:
        """False when the last four words are all zero."""
        return bool(self.slot_status or self.failure_class or self.backend_code
                    or self.output_digest)

    def to_json_dict(self) -> dict:
        """Every field decoded: failure class by name, digest as 16 hex digits."""
        return {
            "magic": f"0x{self.magic:08x}",
            "timestamp_ns": self.timestamp_ns,
            "slot_idx": self.slot_idx,
            "tenant_id": self.tenant_id,
            "opcode": self.opcode,
            "args": list(self.args),
            "epoch": self.epoch,
            "slot_status": self.slot_status,
            "failure_class": failure_class_name(self.failure_class),
            "backend_code": self.backend_code,
            "output_digest": f"{self.output_digest:016x}",
        }


def output_digest(output: bytes) -> int:
    """The record's output_digest: first 8 bytes of BLAKE3(output), little-endian."""
    return int.from_bytes(blake3.blake3(output).digest(8), "little")


def as_array(data: bytes | memoryview) -> numpy.ndarray:
    """A read-only structured view of concatenated records (no copy)."""
    assert len(data) % RECORD_SIZE_BYTES == 0
    return numpy.frombuffer(data, dtype=RECORD_DTYPE)


# -- checks on published records --------------------------------------------------

# Batches this small are checked without numpy (its fixed cost, ~5 us,
# dominates a few records).
SMALL_BATCH_RECORD_COUNT_MAX = 8
# What can be wrong with a published record, in the order it is reported: a
# record with both faults is reported for its magic.
RECORD_FAULT_MAGIC = "magic"
RECORD_FAULT_TENANT = "tenant"
_RECORD_HEAD = struct.Struct(f"<I{TENANT_ID_OFFSET - 4}xI")  # magic, tenant_id


@dataclasses.dataclass(frozen=True, slots=True)
class RecordFault:
    """The first bad record of a batch: which fault, where, the bad value."""

    fault: str  # RECORD_FAULT_MAGIC or RECORD_FAULT_TENANT
    index: int  # record index in the batch
    value: int  # the record's magic or tenant_id
    bad_count: int  # records in the batch with any fault


def check_records(records: bytes | memoryview, tenant_id: int) -> RecordFault | None:
    """The first record whose magic is not RECORD_MAGIC or whose tenant_id is not
    `tenant_id` (vectorised), or None. The daemon (on publish) and the Publisher
    (before sending) share it; each words its own message.
    """
    assert len(records) % RECORD_SIZE_BYTES == 0
    if len(records) <= SMALL_BATCH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES:
        for offset in range(0, len(records), RECORD_SIZE_BYTES):
            magic, record_tenant = _RECORD_HEAD.unpack_from(records, offset)
            if magic != RECORD_MAGIC or record_tenant != tenant_id:
                break
        else:
            return None
    array = numpy.frombuffer(records, dtype=RECORD_DTYPE)
    bad_magic = array["magic"] != RECORD_MAGIC
    bad = numpy.flatnonzero(bad_magic | (array["tenant_id"] != tenant_id))
    if not len(bad):
        return None
    index = int(bad[0])
    if bad_magic[index]:
        return RecordFault(RECORD_FAULT_MAGIC, index, int(array["magic"][index]), len(bad))
    return RecordFault(RECORD_FAULT_TENANT, index, int(array["tenant_id"][index]), len(bad))
