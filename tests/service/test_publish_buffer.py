"""The Publisher's buffer and full-buffer policy, driven from one thread (no sender, no socket).

The sender's side is played by calling take() and resolve() as the sender
thread does; waits use timeout 0, so nothing here sleeps.
"""

from __future__ import annotations

import pytest

from ringtail.ioring.record import SlotRecord
from ringtail.service.publish_buffer import (PublishBuffer, PublisherClosedError,
                                             PublisherFullError)

TENANT = 7


def record(index: int) -> bytes:
    return SlotRecord(slot_idx=index, tenant_id=TENANT).encode()


def records(first: int, count: int) -> bytes:
    return b"".join(record(index) for index in range(first, first + count))


class Wakeups:
    def __init__(self):
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_drop_takes_what_fits_and_counts_the_rest():
    buffer = PublishBuffer(Wakeups(), policy="drop", buffer_record_count_max=4)
    assert [buffer.publish(record(index)) for index in range(3)] == [1, 1, 1]
    assert buffer.publish(records(3, 3)) == 1  # one place left: the rest is dropped
    assert buffer.publish(record(6)) == 0
    stats = buffer.statistics()
    assert (stats.published, stats.buffered, stats.dropped_full, stats.acked) == (7, 4, 3, 0)
    chunks = buffer.take(10)
    assert chunks == [record(0), record(1), record(2), record(3)]  # a partial take, in order


def test_block_raises_full_error_naming_what_was_taken_when_asked():
    buffer = PublishBuffer(Wakeups(), policy="block", block_timeout_s=0, raise_on_full=True,
                           buffer_record_count_max=2)
    assert buffer.publish(record(0)) == 1
    with pytest.raises(PublisherFullError, match=r"buffer_record_count_max 2\) for "
                       r"block_timeout_s \(0 s\); 1 of 3 records were taken") as caught:
        buffer.publish(records(1, 3))
    assert (caught.value.accepted_count, caught.value.record_count) == (1, 3)
    stats = buffer.statistics()
    assert (stats.published, stats.buffered, stats.dropped_full) == (2, 2, 0)


def test_block_without_raise_drops_and_counts_after_the_wait():
    buffer = PublishBuffer(Wakeups(), policy="block", block_timeout_s=0,
                           buffer_record_count_max=1)
    assert buffer.publish(records(0, 3)) == 1
    assert buffer.statistics().dropped_full == 2


def test_resolved_records_make_room_and_let_flush_return_true():
    buffer = PublishBuffer(Wakeups(), policy="drop", buffer_record_count_max=3)
    buffer.publish(records(0, 2))
    buffer.publish(record(2))
    assert buffer.flush(0) is False
    assert buffer.publish(record(3)) == 0  # full
    chunks = buffer.take(1)
    assert chunks == [records(0, 2)]
    assert buffer.statistics().buffered == 3  # taken by the sender is still buffered
    buffer.resolve(2, acked=True, unresolved_ordinal=2)
    assert buffer.flush(0) is False  # record 2 is still queued
    assert buffer.publish(record(4)) == 1
    buffer.take(5)
    buffer.resolve(1, acked=True, unresolved_ordinal=3)
    buffer.resolve(1, acked=False, unresolved_ordinal=4, error=ValueError("refused"))
    assert buffer.flush(0) is True
    stats = buffer.statistics()
    assert (stats.acked, stats.rejected, stats.dropped_full, stats.buffered) == (3, 1, 1, 0)
    assert stats.published == stats.acked + stats.rejected + stats.dropped_full + stats.buffered
    assert str(stats.last_error) == "refused"


def test_an_idle_sender_is_woken_once_not_per_record():
    wakeups = Wakeups()
    buffer = PublishBuffer(wakeups)
    assert buffer.set_sender_idle() is False  # nothing pending: it may wait
    buffer.publish(record(0))
    buffer.publish(record(1))
    buffer.publish(records(2, 2))
    assert wakeups.count == 1
    assert buffer.set_sender_idle() is True  # records pending: cut them, do not wait
    buffer.publish(record(4))
    assert wakeups.count == 1  # the flag was cleared again: still busy


def test_a_reused_caller_buffer_is_copied():
    buffer = PublishBuffer(Wakeups())
    mutable = bytearray(records(0, 2))
    buffer.publish(mutable)
    one = bytearray(record(5))
    buffer.publish(memoryview(one))
    mutable[:] = bytes(len(mutable))
    one[:] = bytes(len(one))
    assert buffer.take(2) == [records(0, 2), record(5)]


def test_bad_lengths_and_publish_after_close_raise_typed_errors():
    buffer = PublishBuffer(Wakeups())
    with pytest.raises(ValueError, match=r"whole 64-byte records, got 65 bytes"):
        buffer.publish(b"\0" * 65)
    assert buffer.close() is True
    assert buffer.close() is False
    with pytest.raises(PublisherClosedError, match=r"publish\(\) of 1 records after close"):
        buffer.publish(record(0))
    with pytest.raises(PublisherClosedError, match=r"publish\(\) of 2 records after close"):
        buffer.publish(records(0, 2))
