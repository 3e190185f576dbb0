"""Fixed-bucket histograms cheap enough for the write path (no lock, no float).

The batcher observes one value per batch (records, commit time) and one per
publish request (ack latency); `snapshot()` copies the counts for
`statistics()`, and service/metrics.py turns snapshots into Prometheus
histograms at scrape time. Nothing here imports Trio or prometheus_client.

Bucket semantics are Prometheus's: a value lands in the first bucket whose
upper bound is >= the value; one more bucket past the last bound is +Inf.
"""

from __future__ import annotations

import bisect
import dataclasses

# Records per ring batch: powers of two up to BATCH_RECORD_COUNT_MAX (4,096;
# service/limits.py asserts the relation).
BATCH_RECORD_COUNT_BOUNDS = tuple(1 << shift for shift in range(13))
# Latencies in nanoseconds, 50 us .. 10 s: an fdatasync on NVMe is ~50 us-2 ms,
# a throttled cloud disk tens of ms, a stalled one seconds.
LATENCY_NS_BOUNDS = tuple(int(seconds * 1e9) for seconds in (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

assert list(LATENCY_NS_BOUNDS) == sorted(set(LATENCY_NS_BOUNDS))


@dataclasses.dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Counts per bucket (not cumulative; the last is +Inf), their sum and total."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...]
    sum: int
    count: int

    def cumulative(self) -> list[int]:
        """Counts of values <= each bound, then of all values (+Inf)."""
        running, result = 0, []
        for count in self.counts:
            running += count
            result.append(running)
        return result


class Histogram:
    """Integer observations into fixed buckets. Memory: one int per bucket."""

    __slots__ = ("bounds", "_counts", "_sum", "_count")

    def __init__(self, bounds: tuple[int, ...]):
        assert bounds and list(bounds) == sorted(set(bounds)), bounds
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0
        self._count = 0

    def observe(self, value: int) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value
        self._count += 1

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._sum, self._count)
