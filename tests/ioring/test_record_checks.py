"""ringtail.ioring.record.check_records: the daemon's and the Publisher's shared record check."""

from __future__ import annotations

import pytest

from ringtail.ioring.record import (RECORD_FAULT_MAGIC, RECORD_FAULT_TENANT, RECORD_MAGIC,
                                    SMALL_BATCH_RECORD_COUNT_MAX, SlotRecord, check_records)


def _batch(count: int, tenant_id: int = 3) -> bytearray:
    return bytearray(b"".join(SlotRecord(tenant_id=tenant_id, slot_idx=i).encode()
                              for i in range(count)))


@pytest.mark.parametrize("count", [1, SMALL_BATCH_RECORD_COUNT_MAX,
                                   SMALL_BATCH_RECORD_COUNT_MAX + 1, 4096])
def test_good_batches_pass_on_both_paths(count):
    assert check_records(bytes(_batch(count)), 3) is None


@pytest.mark.parametrize("count", [SMALL_BATCH_RECORD_COUNT_MAX,
                                   SMALL_BATCH_RECORD_COUNT_MAX + 1, 100])
def test_the_first_bad_record_is_named_and_magic_wins_over_tenant(count):
    batch = _batch(count)
    last = count - 1
    batch[last * 64 + 16] = 9  # tenant 9 in the last record
    fault = check_records(bytes(batch), 3)
    assert (fault.fault, fault.index, fault.value, fault.bad_count) == (
        RECORD_FAULT_TENANT, last, 9, 1)
    batch[last * 64] ^= 0xFF  # and a bad magic in the same record
    fault = check_records(bytes(batch), 3)
    assert (fault.fault, fault.index, fault.value) == (
        RECORD_FAULT_MAGIC, last, RECORD_MAGIC ^ 0xFF)
    batch[0:4] = bytes(4)  # an earlier bad record is the one reported
    fault = check_records(bytes(batch), 3)
    assert (fault.fault, fault.index, fault.value, fault.bad_count) == (
        RECORD_FAULT_MAGIC, 0, 0, 2)
