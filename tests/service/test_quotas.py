"""Quotas: the token bucket in fake time, a daemon held to a tenant's records/s while
another tenant is not slowed, and quota_mode = "reject"."""

from __future__ import annotations

import os

import pytest
import trio

from ringtail.service.client import Client
from ringtail.service.config import ServeConfig
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import ErrorCode
from ringtail.service.quotas import QuotaSettings, TokenBucket
from ringtail.service.server import Daemon
from ringtail.service.tenants import TenantSettings
from tests.service.conftest import RecordFactory, read_all, short_socket_dir, write_config

TIMEOUT_S = 30.0


class FakeClock:
    """The quota clock, moved only by the test. `wait_for_sleeper()` returns once a
    task waits for a time still in the future (so everything before it is done)."""

    def __init__(self):
        self.time = 0.0
        self._sleepers: list[tuple[float, trio.Event]] = []
        self._changed = trio.Event()

    def now(self) -> float:
        return self.time

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self.time:
            return
        wake = trio.Event()
        entry = (deadline, wake)
        self._sleepers.append(entry)
        self._changed.set()
        try:
            await wake.wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for entry in [e for e in self._sleepers if e[0] <= self.time]:
            self._sleepers.remove(entry)
            entry[1].set()

    async def wait_for_sleeper(self) -> None:
        while not any(deadline > self.time for deadline, _ in self._sleepers):
            self._changed = trio.Event()
            await self._changed.wait()


@pytest.mark.parametrize("rate, burst, batch", [(100, 100, 10), (1000, 250, 64), (7, 1, 3)])
def test_token_bucket_holds_any_window_to_burst_plus_rate_times_length(rate, burst, batch):
    bucket, now, taken = TokenBucket(rate, burst, now=0.0), 0.0, 0
    granted = []  # (time the batch may go, records)
    for _ in range(2000):
        ready = bucket.reserve(batch, now)
        granted.append((ready, batch))
        now = ready  # a greedy publisher: next batch as soon as this one goes
    for start_index in range(0, len(granted), 97):
        start = granted[start_index][0]
        for length_s in (0.5, 1.0, 3.0):
            taken = sum(n for t, n in granted if start <= t <= start + length_s)
            assert taken <= burst + rate * length_s + batch  # + one batch paid later
    total_time = granted[-1][0]
    assert sum(n for _, n in granted) <= burst + rate * total_time + batch


def test_reject_mode_bucket_never_overdraws():
    bucket = TokenBucket(10, 20, now=0.0)
    assert bucket.try_take(20, 0.0) and not bucket.try_take(1, 0.0)
    assert bucket.seconds_until(5, 0.0) == pytest.approx(0.5)
    assert bucket.try_take(5, 0.5) and not bucket.try_take(1, 0.5)
    assert bucket.seconds_until(21, 0.5) == float("inf")  # over the burst: never


@pytest.fixture
async def quota_daemon(tmp_path):
    socket_path = os.path.join(short_socket_dir(tmp_path), "quota.sock")
    slow = QuotaSettings(records_per_second=100, burst_records=100)
    config = ServeConfig(data_dir=os.fspath(tmp_path / "data"), socket=socket_path,
                         io="threads", sync="none", capacity=8192,
                         tenants={1: TenantSettings(8192, "none", quota=slow)})
    clock = FakeClock()
    server = Daemon(config, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server, clock
        server.shutdown()


async def test_tenant_over_its_rate_is_held_to_it_while_another_is_not_slowed(quota_daemon):
    server, clock = quota_daemon
    socket_path = server.config.socket
    acked = {"limited": 0}

    async def limited_publisher():
        factory = RecordFactory(1)
        async with await Client.connect(socket_path, 1) as client:
            while True:
                await client.publish(factory.records(10))
                acked["limited"] += 10

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limited_publisher)
            await clock.wait_for_sleeper()  # held: the burst is spent at fake time 0
            assert acked["limited"] == 100
            # Tenant 2 has no quota: 2,000 records go through with the clock stopped.
            async with await Client.connect(socket_path, 2) as client:
                acks = await client.publish_many([RecordFactory(2).records(100)] * 20)
            assert acks[-1].last_sequence == 1999 and clock.time == 0.0
            for second in range(1, 11):
                clock.advance(1.0)
                await clock.wait_for_sleeper()
                assert acked["limited"] == 100 + 100 * second  # burst + rate x window
            nursery.cancel_scope.cancel()
    admitted = server.statistics().gate.tenants
    assert admitted[1].records_delayed > 0 and admitted[1].paced
    assert admitted[2].records_delayed == 0 and not admitted[2].paced


async def test_reject_mode_refuses_the_batch_with_quota_exceeded_and_goes_on(daemon, tmp_path):
    config = write_config(tmp_path, """
        [tenants.6]
        records_per_second = 1
        burst_records = 100
        quota_mode = "reject"
        """)
    server = daemon(config=config, io="threads", sync="none")
    factory = RecordFactory(6)
    first, second = factory.records(100), factory.records(100)
    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, 6) as client:
            ack = await client.publish(first)
            # The bucket is empty and refills at 1 record/s: this batch is refused whole.
            with pytest.raises(RingtailError, match=r"over its quota of 1 records/s") as refused:
                await client.publish(second)
            assert refused.value.code == ErrorCode.QUOTA_EXCEEDED
            assert not refused.value.fatal
            with pytest.raises(RingtailError, match=r"batches over burst_records \(100\) never"):
                await client.publish(factory.records(101))
        replay = await read_all(server.socket_path, 6)
    assert ack.last_sequence == 99
    assert replay.data == first  # nothing of the refused batches was stored
