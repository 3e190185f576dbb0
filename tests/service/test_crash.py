"""Crash and shutdown under load: a publisher storm against a real daemon,
stopped by a real SIGKILL or SIGTERM at a moment chosen by counting acks
(seeded), never by time.

The storm: several connections, each pipelining batches of random sizes (up
to WINDOW unacknowledged), recording every batch it sent and every answer
(Ack or Error) it got, until the daemon goes away.

What a SIGKILL must not break (DESIGN.md, Durability): after a restart on the
same data dir, every acknowledged record is back byte-identical at its acked
sequence, in order, with no gap; nothing that was never published is there,
nothing is there twice; sequences go on increasing after the restart.
Records beyond the acknowledged ones may be there (their chain was durable,
the daemon died before the ack went out), and not necessarily whole batches:
the writer may split one publish batch across two chains.

What SIGTERM promises (service/server.py): stop reading, answer every batch
already read, exit 0. A connection reads its frames in order and answers them
in order, so what each client got answered is a prefix of what it sent; the
rest was never read and must not be in the ring at all. After the restart
the ring holds exactly the acknowledged batches, each at its acked sequences.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
from typing import Callable

import pytest
import trio

from ringtail.service.client import Client, RingtailError
from ringtail.service.protocol import Ack, Error, ErrorCode, LocalProtocolError, Publish
from tests.service.conftest import RecordFactory, read_all, split_records

TENANT = 17
CLIENT_COUNT = 4
WINDOW = 16  # batches a storm client has sent but not yet had answered
BATCH_RECORD_COUNT_MAX = 256
CAPACITY = 1 << 19  # 32 MiB: every storm of a test is retained, nothing is evicted
STORM_TIMEOUT_S = 60


@dataclasses.dataclass(eq=False)
class Batch:
    batch_id: int
    records: bytes
    ack: Ack | None = None
    error: Error | None = None

    @property
    def answered(self) -> bool:
        return self.ack is not None or self.error is not None


@dataclasses.dataclass(eq=False)
class StormClient:
    sent: list[Batch] = dataclasses.field(default_factory=list)
    welcome_next_sequence: int = -1
    ended_by: Exception | Error | None = None


async def storm_client(socket_path: str, factory: RecordFactory, rng: random.Random,
                       state: StormClient, on_ack: Callable[[Ack], None]) -> None:
    """Publish until the daemon goes away; record every batch and every answer."""
    by_id: dict[int, Batch] = {}
    window = trio.Semaphore(WINDOW)
    # No producer id: raw Publish frames, at least once (exactly once is
    # test_exactly_once's and test_publisher's).
    async with await Client.connect(socket_path, TENANT, producer_id=0) as client:
        state.welcome_next_sequence = client.welcome.next_sequence

        async def sender() -> None:
            for batch_id in itertools.count(1):
                await window.acquire()
                batch = Batch(batch_id, factory.records(rng.randint(1, BATCH_RECORD_COUNT_MAX)))
                by_id[batch_id] = batch
                state.sent.append(batch)  # counted as sent even if the write breaks midway
                try:
                    await client.stream.send_all(
                        client.connection.send(Publish(batch_id, batch.records)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                except LocalProtocolError:  # the daemon's fatal Error (SHUTTING_DOWN) came
                    return  # first: the codec sends nothing after it (this batch never left)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                while True:
                    event = await client.next_event()
                    if isinstance(event, Ack):
                        batch = by_id[event.batch_id]
                        assert not batch.answered, f"batch {event.batch_id} answered twice"
                        batch.ack = event
                        window.release()
                        on_ack(event)
                    elif isinstance(event, Error) and not event.fatal:
                        batch = by_id[event.batch_id]
                        assert not batch.answered, f"batch {event.batch_id} answered twice"
                        batch.error = event
                        window.release()
                    else:
                        state.ended_by = event
                        break
            except RingtailError as error:  # the daemon closed the connection or died
                state.ended_by = error
            nursery.cancel_scope.cancel()


async def run_storm(socket_path: str, factory: RecordFactory, rng: random.Random,
                    ack_count_at_signal: int, send_signal: Callable[[], None]) -> list[StormClient]:
    """Storm until the daemon goes away; `send_signal()` runs at that many acks."""
    clients = [StormClient() for _ in range(CLIENT_COUNT)]
    acks = 0

    def on_ack(ack: Ack) -> None:
        nonlocal acks
        acks += 1
        if acks == ack_count_at_signal:
            send_signal()

    with trio.fail_after(STORM_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for state in clients:
                nursery.start_soon(storm_client, socket_path, factory, rng, state, on_ack)
    assert acks >= ack_count_at_signal
    return clients


def check_answers_are_a_prefix(clients: list[StormClient]) -> None:
    """Each connection is answered in order: answered batches come first."""
    for state in clients:
        answered = [batch.answered for batch in state.sent]
        count = answered.count(True)
        assert answered == [True] * count + [False] * (len(answered) - count), (
            "a batch went unanswered while a later one on its connection was answered")
        firsts = [batch.ack.first_sequence for batch in state.sent if batch.ack]
        assert firsts == sorted(firsts), "a connection's batches were committed out of order"


class History:
    """Everything published to the tenant over a test's storms."""

    def __init__(self):
        self.acked: dict[int, bytes] = {}  # sequence -> record
        self.sent_records: set[bytes] = set()
        self.unanswered_records: set[bytes] = set()

    def add(self, clients: list[StormClient]) -> None:
        for state in clients:
            for batch in state.sent:
                records = split_records(batch.records)
                self.sent_records.update(records)
                if batch.ack is None:
                    if batch.error is None:
                        self.unanswered_records.update(records)
                    continue
                ack = batch.ack
                assert ack.last_sequence - ack.first_sequence + 1 == len(records)
                for offset, record in enumerate(records):
                    assert ack.first_sequence + offset not in self.acked, "sequence acked twice"
                    self.acked[ack.first_sequence + offset] = record

    @property
    def next_sequence_min(self) -> int:
        return max(self.acked, default=-1) + 1


async def check_ring(socket_path: str, history: History, *, exactly_acked: bool):
    replay = await read_all(socket_path, TENANT)
    assert replay.gaps == [], "nothing was evicted, so nothing may be reported lost"
    stored = replay.by_sequence
    assert replay.sequences == list(range(len(stored))), "records in order, no hole, from 0"
    for sequence, record in history.acked.items():
        assert stored.get(sequence) == record, (
            f"acknowledged sequence {sequence} is {'missing' if sequence not in stored else 'changed'}")
    values = set(stored.values())
    assert len(values) == len(stored), "a record is stored twice"
    assert values <= history.sent_records, "a record that was never published is stored"
    if exactly_acked:
        assert stored == history.acked, (
            f"{len(stored) - len(history.acked)} records that were never acknowledged are stored")
    assert replay.end.next_sequence == len(stored) >= history.next_sequence_min
    return replay


# Kill moments per case: sized for `make test` (about 10 minutes in all); the
# soak case runs four times as many on io_uring with sync=batch.
@pytest.mark.parametrize(("io", "sync", "moments"), [
    ("uring", "batch", 12),
    ("threads", "batch", 6),
    ("uring", "none", 6),
    pytest.param("uring", "batch", 48, marks=pytest.mark.soak),
])
async def test_every_acknowledged_record_survives_sigkill_at_random_moments(
        daemon, io, sync, moments):
    server = daemon(capacity=CAPACITY, io=io, sync=sync)
    rng = random.Random(f"sigkill-{io}-{sync}")
    factory = RecordFactory(TENANT, seed=rng.getrandbits(32))
    history = History()
    for moment in range(moments):
        kill_at = rng.randint(1, 80)
        clients = await run_storm(server.socket_path, factory, rng, kill_at,
                                  lambda: server.send_signal(signal.SIGKILL))
        assert await server.await_exit() == -signal.SIGKILL
        check_answers_are_a_prefix(clients)
        for state in clients:  # no Error frame came: the client says so, never SHUTTING_DOWN
            assert isinstance(state.ended_by, RingtailError), state.ended_by
            assert state.ended_by.code == ErrorCode.CONNECTION_LOST, state.ended_by
        for state in clients:  # sequences never repeat across restarts
            assert state.welcome_next_sequence >= history.next_sequence_min
            assert all(batch.ack.first_sequence >= state.welcome_next_sequence
                       for batch in state.sent if batch.ack)
        history.add(clients)
        assert all(batch.error is None for state in clients for batch in state.sent)
        await server.astart()
        await check_ring(server.socket_path, history, exactly_acked=False)
    assert len(history.acked) > moments  # every storm got acks in


@pytest.mark.parametrize("io", ["uring", "threads"])
async def test_sigterm_during_a_storm_answers_every_batch_it_read_and_exits_0(daemon, io):
    server = daemon(capacity=CAPACITY, io=io)
    rng = random.Random(f"sigterm-{io}")
    factory = RecordFactory(TENANT, seed=rng.getrandbits(32))
    history = History()
    for moment in range(3):
        stop_at = rng.randint(5, 80)
        clients = await run_storm(server.socket_path, factory, rng, stop_at,
                                  lambda: server.send_signal(signal.SIGTERM))
        assert await server.await_exit() == 0, server.run_stderr
        assert "ringtail stopped" in server.run_stderr
        assert "Traceback" not in server.run_stderr, server.run_stderr
        check_answers_are_a_prefix(clients)
        failed = [batch.error for state in clients for batch in state.sent if batch.error]
        assert failed == [], "an orderly stop must not fail a batch it read"
        for state in clients:
            # Told before the close, after its answers: never taken for a crash.
            assert isinstance(state.ended_by, Error), state.ended_by
            assert state.ended_by.code == ErrorCode.SHUTTING_DOWN, state.ended_by
        history.add(clients)
        await server.astart()
        # Exactly the acknowledged batches: the unanswered ones were never read.
        replay = await check_ring(server.socket_path, history, exactly_acked=True)
        assert not set(replay.by_sequence.values()) & history.unanswered_records
        assert replay.welcome.next_sequence == history.next_sequence_min
