"""The slot record layout: one definition (RECORD_DTYPE), every other view derived."""

from __future__ import annotations

import numpy
import pytest

from ringtail.ioring.record import (RECORD_DTYPE, RECORD_SIZE_BYTES, TENANT_ID_OFFSET, SlotRecord,
                                    as_array, struct_for_dtype)

SAMPLE = SlotRecord(timestamp_ns=0x1122334455667788, slot_idx=3, tenant_id=0xA1B2C3D4,
                    opcode=42, args=(1, 2, 3, 0xFFFFFFFF), epoch=9, slot_status=5,
                    failure_class=2, backend_code=77, output_digest=0x0102030405060708)


def test_struct_and_dtype_encode_the_same_bytes():
    encoded = SAMPLE.encode()
    assert len(encoded) == RECORD_SIZE_BYTES == RECORD_DTYPE.itemsize
    (row,) = as_array(encoded)
    assert row["timestamp_ns"] == SAMPLE.timestamp_ns
    assert tuple(row["args"]) == SAMPLE.args
    assert row["output_digest"] == SAMPLE.output_digest
    built = numpy.zeros(1, dtype=RECORD_DTYPE)
    for name in RECORD_DTYPE.names:
        built[name] = getattr(SAMPLE, name)
    assert built.tobytes() == encoded
    assert SlotRecord.decode(encoded) == SAMPLE


def test_tenant_id_offset_comes_from_the_dtype():
    encoded = SAMPLE.encode()
    assert encoded[TENANT_ID_OFFSET:TENANT_ID_OFFSET + 4] == SAMPLE.tenant_id.to_bytes(4, "little")


def test_struct_for_dtype_takes_a_prefix_and_refuses_padding_and_big_endian():
    entry = numpy.dtype([("first", "<u8"), ("count", "<u4"), ("reserved", "<u4"),
                         ("checksum", "V16")])
    assert struct_for_dtype(entry).format == "<QII16s"
    assert struct_for_dtype(entry, 2).format == "<QI"
    padded = numpy.dtype({"names": ["a", "b"], "formats": ["<u4", "<u8"], "offsets": [0, 8]})
    with pytest.raises(AssertionError, match="field b at 8, expected 4"):
        struct_for_dtype(padded)
    with pytest.raises(AssertionError, match=r"field a: >u4"):
        struct_for_dtype(numpy.dtype([("a", ">u4")]))
