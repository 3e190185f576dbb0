"""The Publisher's sans-IO sender, without a socket: bytes in, bytes out.

The sender takes records from a real PublishBuffer and talks to a real
protocol.Connection in the SERVER role, which plays the daemon: it decodes the
Publish frames the sender produced and encodes the Welcome, Acks and Errors fed
back. `now` is passed in; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringtail.ioring.record import RECORD_SIZE_BYTES, SlotRecord
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import (NEED_DATA, SERVER, Ack, Connection, Error,
                                       ErrorCode, Hello, Ping, Pong, Publish,
                                       RemoteProtocolError, Welcome)
from ringtail.service.publish_buffer import PublishBuffer
from ringtail.service.publish_sender import (RETRY_DELAY_S_MAX, RETRY_DELAY_S_MIN,
                                             TRANSIENT_RETRY_COUNT_MAX, UNACKED_BATCH_COUNT_MAX,
                                             ConnectionEndedError, PublishSender)

TENANT = 7
PEER = "/run/ringtail/test.sock"


def record(index: int, tenant_id: int = TENANT) -> bytes:
    return SlotRecord(timestamp_ns=index, slot_idx=index, tenant_id=tenant_id, opcode=1,
                      args=(index, 0, 0, 0)).encode()


def records(first: int, count: int) -> bytes:
    return b"".join(record(index) for index in range(first, first + count))


class Daemon:
    """The daemon's end of one connection: a real SERVER codec, scripted by the test."""

    def __init__(self, sender: PublishSender, count_max: int = 4096, now: float = 0.0):
        self.sender = sender
        self.server = Connection(SERVER)
        self.server.receive_data(sender.start_connection())
        hello = self.server.next_event()
        assert isinstance(hello, Hello) and hello.tenant_id == TENANT
        assert sender.receive_data(self.server.send(Welcome(TENANT, count_max, 0, 0, 1 << 20)),
                                   now) == b""
        assert sender.ready
        self.next_sequence = 0

    def publishes(self, now: float = 0.0) -> list[Publish]:
        """What the sender sends now, decoded."""
        data = self.sender.data_to_send(now)
        if not data:
            return []
        self.server.receive_data(data)  # never b"": that would be EOF
        events = []
        while (event := self.server.next_event()) is not NEED_DATA:
            assert isinstance(event, (Publish, Pong)), event
            events.append(event)
        return [event for event in events if isinstance(event, Publish)]

    def ack(self, publish: Publish, now: float = 0.0) -> None:
        first = self.next_sequence
        self.next_sequence += publish.record_count
        self.feed(self.server.send(Ack(publish.batch_id, first, self.next_sequence - 1)), now)

    def refuse(self, publish: Publish, code: ErrorCode, now: float = 0.0) -> None:
        self.feed(self.server.send(Error(code, f"scripted {code.name}", publish.batch_id)), now)

    def feed(self, data: bytes, now: float = 0.0) -> bytes:
        return self.sender.receive_data(data, now)


def make(count_max: int = 4096, *, check_records: bool = True, buffer_count: int = 1 << 16):
    buffer = PublishBuffer(lambda: None, policy="drop", buffer_record_count_max=buffer_count)
    sender = PublishSender(buffer, Hello(TENANT, b"", "test"), peer=PEER,
                           check_records=check_records)
    return buffer, sender, Daemon(sender, count_max)


def test_nothing_is_sent_before_the_welcome():
    buffer = PublishBuffer(lambda: None)
    sender = PublishSender(buffer, Hello(TENANT, b"", "test"))
    buffer.publish(record(0))
    assert sender.data_to_send(0.0) == b"" and not sender.can_take(0.0)
    sender.start_connection()
    assert sender.data_to_send(0.0) == b"" and not sender.ready
    assert buffer.statistics().buffered == 1


def test_batches_are_cut_at_the_welcomes_record_count_max():
    buffer, sender, daemon = make(count_max=3)
    buffer.publish(records(0, 7))
    sent = daemon.publishes()
    assert [event.record_count for event in sent] == [3, 3, 1]
    assert b"".join(event.records for event in sent) == records(0, 7)
    assert len({event.batch_id for event in sent}) == 3


def test_a_full_window_stops_cutting_and_each_ack_frees_one_place():
    buffer, sender, daemon = make(count_max=1)
    total = UNACKED_BATCH_COUNT_MAX + 5
    for index in range(total):
        buffer.publish(record(index))
    first = daemon.publishes()
    assert len(first) == UNACKED_BATCH_COUNT_MAX
    assert sender.in_flight_batch_count == UNACKED_BATCH_COUNT_MAX
    assert not sender.can_take(0.0)
    assert daemon.publishes() == []  # full: nothing more, however often it is asked
    daemon.ack(first[0])
    (one_more,) = daemon.publishes()
    assert one_more.records == record(UNACKED_BATCH_COUNT_MAX)
    daemon.ack(first[1])
    daemon.ack(first[2])
    assert [event.records for event in daemon.publishes()] == [
        record(UNACKED_BATCH_COUNT_MAX + 1), record(UNACKED_BATCH_COUNT_MAX + 2)]
    assert buffer.statistics().acked == 3


def test_acks_resolve_records_and_flush_waits_for_the_oldest_unanswered_batch():
    buffer, sender, daemon = make(count_max=2)
    buffer.publish(records(0, 6))
    first, second, third = daemon.publishes()
    daemon.ack(second)  # answered before the first: its records count as acked ...
    assert buffer.statistics().acked == 2
    assert buffer.flush(0) is False  # ... but the first batch still holds flush()
    daemon.ack(first)
    assert buffer.flush(0) is False  # the third is in flight
    daemon.ack(third)
    assert buffer.flush(0) is True
    stats = buffer.statistics()
    assert (stats.acked, stats.buffered, stats.rejected, stats.resent) == (6, 0, 0, 0)
    assert sender.statistics().kept_batch_ids == ()


def test_a_reconnect_resends_exactly_the_unacknowledged_batches_in_order():
    buffer, sender, daemon = make(count_max=2)
    buffer.publish(records(0, 10))
    sent = daemon.publishes()
    assert len(sent) == 5
    daemon.ack(sent[0])
    daemon.ack(sent[2])  # acked out of order before the connection broke
    sender.connection_lost()
    assert not sender.ready and sender.data_to_send(0.0) == b""
    buffer.publish(records(10, 2))  # new records wait behind the resends
    again = Daemon(sender, count_max=2).publishes()
    assert [event.records for event in again] == [
        sent[1].records, sent[3].records, sent[4].records, records(10, 2)]
    assert [event.batch_id for event in again[:3]] == [
        sent[1].batch_id, sent[3].batch_id, sent[4].batch_id]
    assert buffer.statistics().resent == 6


def test_a_smaller_welcome_after_a_reconnect_splits_the_kept_batches_in_order():
    buffer, sender, daemon = make(count_max=4)
    buffer.publish(records(0, 8))
    sent = daemon.publishes()
    sender.connection_lost()
    daemon = Daemon(sender, count_max=3)
    again = daemon.publishes()
    assert [event.record_count for event in again] == [3, 1, 3, 1]
    assert b"".join(event.records for event in again) == b"".join(e.records for e in sent)
    for event in again:
        daemon.ack(event)
    stats = buffer.statistics()
    assert (stats.acked, stats.buffered, stats.resent) == (8, 0, 8)


def test_batch_too_large_splits_the_batch_in_place_and_lowers_the_batch_size():
    buffer, sender, daemon = make(count_max=8)
    buffer.publish(records(0, 8))
    (big,) = daemon.publishes()
    daemon.refuse(big, ErrorCode.BATCH_TOO_LARGE)
    halves = daemon.publishes()
    assert [event.record_count for event in halves] == [4, 4]
    assert b"".join(event.records for event in halves) == big.records
    assert sender.statistics().batch_record_count_max == 4
    daemon.refuse(halves[0], ErrorCode.BATCH_TOO_LARGE)  # smaller still: halved again
    quarters = daemon.publishes()
    assert [event.records for event in quarters] == [records(0, 2), records(2, 2)]
    buffer.publish(records(8, 5))  # later records are cut at the lower size
    later = daemon.publishes()
    assert [event.record_count for event in later] == [2, 2, 1]
    for event in (halves[1], *quarters, *later):
        daemon.ack(event)
    stats = buffer.statistics()
    assert (stats.acked, stats.rejected, stats.buffered, stats.resent) == (13, 0, 0, 12)
    assert stats.last_error.code == ErrorCode.BATCH_TOO_LARGE


def test_batch_too_large_for_a_single_record_rejects_it():
    buffer, sender, daemon = make()
    buffer.publish(record(0))
    (one,) = daemon.publishes()
    daemon.refuse(one, ErrorCode.BATCH_TOO_LARGE)
    assert daemon.publishes() == []
    stats = buffer.statistics()
    assert (stats.rejected, stats.buffered, stats.resent) == (1, 0, 0)
    assert stats.last_error.code == ErrorCode.BATCH_TOO_LARGE
    assert buffer.flush(0) is True


@pytest.mark.parametrize("code", [ErrorCode.WRONG_TENANT, ErrorCode.BAD_RECORD_MAGIC,
                                  ErrorCode.BAD_RECORD_SIZE])
def test_a_batch_refused_for_good_is_rejected_not_resent_and_the_connection_goes_on(code):
    buffer, sender, daemon = make(count_max=2)
    buffer.publish(records(0, 6))
    first, second, third = daemon.publishes()
    daemon.refuse(second, code)
    daemon.ack(first)
    daemon.ack(third)
    assert daemon.publishes() == []
    stats = buffer.statistics()
    assert (stats.acked, stats.rejected, stats.buffered, stats.resent) == (4, 2, 0, 0)
    assert isinstance(stats.last_error, RingtailError) and stats.last_error.code == code
    assert stats.last_error.batch_id == second.batch_id
    assert sender.ready  # not fatal
    buffer.publish(record(6))
    assert [event.records for event in daemon.publishes()] == [record(6)]


def test_a_transient_refusal_is_resent_after_its_backoff_then_rejected_at_the_retry_limit():
    buffer, sender, daemon = make()
    buffer.publish(records(0, 3))
    (batch,) = daemon.publishes()
    now = 100.0
    for retry in range(1, TRANSIENT_RETRY_COUNT_MAX + 1):
        daemon.refuse(batch, ErrorCode.STORAGE_FAILED, now)
        resume = sender.statistics().send_not_before
        delay_s = min(RETRY_DELAY_S_MIN * 2 ** retry, RETRY_DELAY_S_MAX)
        assert resume == pytest.approx(now + delay_s)
        assert daemon.publishes(now) == []  # paused
        assert not sender.can_take(now)
        now = resume
        (again,) = daemon.publishes(now)
        assert (again.batch_id, again.records) == (batch.batch_id, batch.records)
    daemon.refuse(batch, ErrorCode.QUOTA_EXCEEDED, now)  # one too many: rejected
    assert daemon.publishes(now + 10.0) == []
    stats = buffer.statistics()
    assert (stats.rejected, stats.acked, stats.buffered) == (3, 0, 0)
    assert stats.resent == 3 * TRANSIENT_RETRY_COUNT_MAX
    assert stats.last_error.code == ErrorCode.QUOTA_EXCEEDED


def test_checked_records_drop_the_bad_ones_alone():
    buffer, sender, daemon = make()
    sent = [record(0), record(1, tenant_id=TENANT + 1), record(2), b"\0" * 64, record(4)]
    buffer.publish(b"".join(sent))
    (batch,) = daemon.publishes()
    assert batch.records == record(0) + record(2) + record(4)
    assert buffer.flush(0) is False  # the good ones are in flight
    daemon.ack(batch)
    stats = buffer.statistics()
    assert (stats.acked, stats.rejected, stats.buffered) == (3, 2, 0)
    assert stats.last_error.code == ErrorCode.WRONG_TENANT  # the first fault found


def test_unchecked_records_go_to_the_daemon_as_they_are():
    buffer, sender, daemon = make(check_records=False)
    buffer.publish(record(0) + b"\0" * 64)
    (batch,) = daemon.publishes()
    assert batch.records == record(0) + b"\0" * 64


@pytest.mark.parametrize("code", [ErrorCode.SHUTTING_DOWN, ErrorCode.AUTH_FAILED,
                                  ErrorCode.INTERNAL])
def test_a_fatal_error_ends_the_connection_as_the_typed_error(code):
    buffer, sender, daemon = make()
    buffer.publish(records(0, 2))
    (batch,) = daemon.publishes()
    with pytest.raises(ConnectionEndedError) as caught:
        daemon.feed(daemon.server.send(Error(code, "the daemon says why")))
    reason = caught.value.reason
    assert isinstance(reason, RingtailError) and reason.fatal
    assert reason.code == code and reason.message == "the daemon says why"
    assert caught.value.report is reason
    sender.connection_lost()
    (again,) = Daemon(sender).publishes()
    assert again.records == batch.records  # kept for the next connection


def test_an_error_during_the_handshake_ends_it_as_the_typed_error():
    buffer = PublishBuffer(lambda: None)
    sender = PublishSender(buffer, Hello(TENANT, b"bad", "test"), peer=PEER)
    server = Connection(SERVER)
    server.receive_data(sender.start_connection())
    assert isinstance(server.next_event(), Hello)
    with pytest.raises(ConnectionEndedError) as caught:
        sender.receive_data(server.send(Error(ErrorCode.AUTH_FAILED, "bad token")), 0.0)
    assert caught.value.reason.code == ErrorCode.AUTH_FAILED and not sender.ready


def test_eof_is_connection_lost_naming_the_peer():
    buffer, sender, daemon = make()
    with pytest.raises(ConnectionEndedError) as caught:
        daemon.feed(b"")
    reason = caught.value.reason
    assert reason.code == ErrorCode.CONNECTION_LOST
    assert str(reason).startswith(f"CONNECTION_LOST: the daemon at {PEER} closed the "
                                  "connection without a reply (no Error frame): ")


def test_eof_in_the_middle_of_a_frame_says_how_far_it_got():
    buffer, sender, daemon = make()
    buffer.publish(record(0))
    (batch,) = daemon.publishes()
    ack = daemon.server.send(Ack(batch.batch_id, 0, 0))
    daemon.feed(ack[:5])
    with pytest.raises(ConnectionEndedError) as caught:
        daemon.feed(b"")
    assert caught.value.reason.code == ErrorCode.CONNECTION_LOST
    assert "it ended 5 bytes into a frame" in str(caught.value.reason)


def test_a_protocol_violation_ends_the_connection_with_the_codecs_error():
    buffer, sender, daemon = make()
    with pytest.raises(ConnectionEndedError) as caught:
        daemon.feed(b"\xff" * 16)  # garbage header
    assert isinstance(caught.value.reason, RemoteProtocolError)


def test_an_ack_for_a_batch_not_in_flight_ends_the_connection():
    buffer, sender, daemon = make()
    with pytest.raises(ConnectionEndedError, match=r"acknowledged batch 99, which is not "
                                                   r"in flight") as caught:
        daemon.feed(daemon.server.send(Ack(99, 0, 0)))
    assert caught.value.reason is None and caught.value.report is caught.value
    assert isinstance(caught.value, OSError)  # what statistics().last_error promises


def test_a_ping_is_answered_with_a_pong():
    buffer, sender, daemon = make()
    reply = daemon.feed(daemon.server.send(Ping(1234)))
    daemon.server.receive_data(reply)
    assert daemon.server.next_event() == Pong(1234)


# -- any interleaving -------------------------------------------------------------------------

operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 9)),
    st.tuples(st.just("send"), st.booleans()),  # True: once a transient pause has passed
    st.tuples(st.just("ack"), st.integers(1, 4)),  # the daemon acks its oldest n, in order
    st.tuples(st.just("store_and_lose_acks"), st.just(0)),  # then the connection breaks
    st.tuples(st.just("reconnect"), st.integers(1, 6)),  # with this publish_record_count_max
    st.tuples(st.just("too_large"), st.just(0)),  # refuse every batch in flight
    st.tuples(st.just("transient"), st.just(0)),  # refuse the oldest with STORAGE_FAILED
), max_size=60)


def split_records(data: bytes) -> list[bytes]:
    return [data[offset:offset + RECORD_SIZE_BYTES]
            for offset in range(0, len(data), RECORD_SIZE_BYTES)]


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 6))
def test_no_interleaving_of_acks_and_reconnects_loses_or_reorders_a_record(steps, count_max):
    """Records come out acked exactly once each, in publish order; resends are byte-identical.

    The daemon's log gets every batch it received and stored; a batch stored
    and then resent after a lost Ack is stored twice, whole. A transient
    refusal is the documented exception to the order (not to the count): a
    run that has one checks every record is acked once or rejected, in any order.
    """
    buffer, sender, daemon = make(count_max=count_max)
    expected = []  # the records that must be acked, in publish order
    acked_records = []  # the records of acked batches, in ack order
    first_seen: dict[int, bytes] = {}  # batch id -> its records when first sent
    in_flight: collections.deque[Publish] = collections.deque()
    connected = True
    reordered = False
    now = 0.0

    def send(after_pause: bool) -> None:
        nonlocal now
        if after_pause:
            now = max(now, sender.statistics().send_not_before)
        for event in daemon.publishes(now):
            assert first_seen.setdefault(event.batch_id, event.records) == event.records
            in_flight.append(event)

    def ack_oldest() -> None:
        event = in_flight.popleft()
        daemon.ack(event, now)
        acked_records.append(event.records)

    def refuse_oldest(code: ErrorCode) -> None:
        event = in_flight.popleft()
        rejected = buffer.statistics().rejected
        daemon.refuse(event, code, now)
        if buffer.statistics().rejected > rejected:  # not split or retried: rejected whole
            for one in split_records(event.records):
                expected.remove(one)

    def reconnect(new_count_max: int) -> None:
        nonlocal daemon, connected
        sender.connection_lost()
        in_flight.clear()
        daemon = Daemon(sender, new_count_max, now)
        connected = True

    next_index = 0
    for kind, value in steps:
        if kind == "publish":
            buffer.publish(records(next_index, value))
            expected.extend(split_records(records(next_index, value)))
            next_index += value
        elif not connected:
            reconnect(count_max)
        elif kind == "send":
            send(value)
        elif kind == "ack":
            for _ in range(min(value, len(in_flight))):
                ack_oldest()
        elif kind == "store_and_lose_acks":
            # The daemon stored these (their records are in its log), but the
            # connection broke before the Acks arrived: they must be resent.
            connected = False
            sender.connection_lost()
            in_flight.clear()
        elif kind == "reconnect":
            reconnect(value)
        elif kind == "too_large":
            # The daemon's limit fell: it refuses every batch in flight, in
            # order (refusing only some would let later batches overtake the
            # split ones, which the Publisher documents).
            while in_flight:
                refuse_oldest(ErrorCode.BATCH_TOO_LARGE)
        elif kind == "transient" and in_flight:
            reordered = reordered or len(in_flight) > 1 or sender.statistics().kept_batch_ids[
                0] != in_flight[0].batch_id
            refuse_oldest(ErrorCode.STORAGE_FAILED)
    # Then the daemon serves everything in order until nothing is left.
    if not connected:
        reconnect(count_max)
    for _ in range(10_000):
        send(True)
        if not in_flight:
            break
        while in_flight:
            ack_oldest()
    assert not in_flight and buffer.flush(0) is True
    if reordered:
        assert sorted(split_records(b"".join(acked_records))) == sorted(expected)
    else:  # none lost, none twice, in order
        assert b"".join(acked_records) == b"".join(expected)
    stats = buffer.statistics()
    assert stats.acked == len(expected)
    assert stats.buffered == 0 and stats.published == next_index
    assert stats.acked + stats.rejected == next_index
