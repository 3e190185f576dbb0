"""Per-tenant quota settings and the records-per-second token bucket.

- `TokenBucket` holds up to `burst_records` tokens, refilled at
  `records_per_second`. `reserve(n)` always takes n tokens, letting the
  balance go negative ("pay later"), and returns the time at which the
  caller may go on: a publisher in `quota_mode = "slow"` waits until then
  before its batch is queued, so over any window of T seconds a tenant
  stores at most burst + rate x T records. `try_take(n)` (quota_mode =
  "reject") takes n tokens only if they are all there.
- `QuotaSettings` is one tenant's configured limits: the rate, its mode,
  `connections_max` and `subscribers_max`. The gate (service/gate.py) holds
  each tenant's bucket and slots against them and refuses past them with
  QUOTA_EXCEEDED, TOO_MANY_CONNECTIONS and TOO_MANY_SUBSCRIBERS.

Time comes from a `Clock` so tests can drive it: `TrioClock` in the daemon,
a fake one in tests/service/test_quotas.py.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import trio

# Connections one tenant may hold at once; config may lower it per tenant
# (`connections_max`), never raise it. Equal to the daemon-wide limit.
TENANT_CONNECTION_COUNT_MAX = 1024
# Subscribers one tenant may have at once (each holds one replay read,
# 256 KiB, at most); config may lower it per tenant (`subscribers_max`).
TENANT_SUBSCRIBER_COUNT_MAX = 256
# Highest records-per-second quota a config may set (0 means no quota): well
# past what one ring writes, so the quota is never the bottleneck by accident.
RECORDS_PER_SECOND_MAX = 100_000_000
QUOTA_MODES = ("slow", "reject")

assert TENANT_SUBSCRIBER_COUNT_MAX <= TENANT_CONNECTION_COUNT_MAX


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class TrioClock:
    """The daemon's clock: Trio's (so autojump_clock tests drive it too)."""

    def now(self) -> float:
        return trio.current_time()

    async def sleep_until(self, deadline: float) -> None:
        await trio.sleep_until(deadline)


class TokenBucket:
    """Records-per-second limit; see the module docstring."""

    def __init__(self, records_per_second: float, burst_records: int, now: float):
        assert records_per_second > 0 and burst_records >= 1
        self.records_per_second = records_per_second
        self.burst_records = burst_records
        self._tokens = float(burst_records)
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(float(self.burst_records),
                               self._tokens + (now - self._updated) * self.records_per_second)
            self._updated = now

    def reserve(self, count: int, now: float) -> float:
        """Take `count` tokens now; the time at which they are paid for."""
        self._refill(now)
        self._tokens -= count
        if self._tokens >= 0:
            return now
        return now + (-self._tokens) / self.records_per_second

    def try_take(self, count: int, now: float) -> bool:
        self._refill(now)
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def seconds_until(self, count: int, now: float) -> float:
        """How long until `count` tokens are there (inf past the burst)."""
        if count > self.burst_records:
            return float("inf")
        self._refill(now)
        return max(0.0, (count - self._tokens) / self.records_per_second)


@dataclasses.dataclass(frozen=True, slots=True)
class QuotaSettings:
    records_per_second: int = 0  # 0: no rate quota
    burst_records: int = 0  # 0: one second's worth (records_per_second)
    mode: str = "slow"
    connections_max: int = TENANT_CONNECTION_COUNT_MAX
    subscribers_max: int = TENANT_SUBSCRIBER_COUNT_MAX

    @property
    def burst(self) -> int:
        return self.burst_records or self.records_per_second
