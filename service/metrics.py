"""Prometheus metrics: the collector behind `/metrics`.

Served by the daemon's HTTP listener (service/http.py, `http_listen =
"HOST:PORT"`, flag `--http`; `metrics_listen` / `--metrics` are aliases),
beside `/healthz`, `/readyz` and the web page. Every metric is read at
scrape time from the daemon's state and `statistics()` snapshots by one custom
collector (`DaemonCollector`) in a registry of this daemon's own, so several
daemons in one process (tests) never share series. The write path keeps no
Prometheus objects: the batcher fills integer histograms (service/histogram.py)
and the connection handlers bump plain dict counters (`TrafficCounters`).

Startup order (service/server.py): this listener binds first, so `/healthz`
answers and `/readyz` says 503 while rings recover; then the Unix socket binds,
rings recover, and `/readyz` turns 200 with the "ringtail ready" log line (and
systemd's READY=1). It turns 503 again when shutdown begins.

Every metric, its type, labels and meaning: docs/OPERATIONS.md, "Metrics and
health".

The listener, its bounds and its errors: service/http.py.
"""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType
from typing import Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.histogram import HistogramSnapshot
from ringtail.service.protocol import ErrorCode

log = logging.getLogger("ringtail.metrics")
# Distinct (tenant, reason) series of ringtail_auth_failures_total. A failed
# peer names any tenant id it likes, so past this bound new pairs are folded
# into tenant="other": a bad client cannot grow the daemon's memory or the
# scrape without limit. 256 x ~200 B.
AUTH_FAILURE_SERIES_COUNT_MAX = 256
AUTH_FAILURE_REASON_SIZE_MAX = 64  # characters kept of a reason label
OTHER_LABEL = "other"
UNKNOWN_TENANT_LABEL = "unknown"  # rejected before a Hello named a tenant

assert AUTH_FAILURE_SERIES_COUNT_MAX > 0


# -- counters the connection handlers bump ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TrafficStatistics:
    """Copies of TrafficCounters' counts, keyed by tenant id label."""

    records_out: Mapping[str, int]
    bytes_out: Mapping[str, int]
    rejected_batches: Mapping[tuple[str, str], int]  # (tenant, ErrorCode name)
    rejected_records: Mapping[tuple[str, str], int]
    auth_failures: Mapping[tuple[str, str], int]  # (tenant, reason)


def tenant_label(tenant_id: int | None) -> str:
    return UNKNOWN_TENANT_LABEL if tenant_id is None else str(tenant_id)


class TrafficCounters:
    """What connection handlers count: records sent, batches rejected, auth failures.

    Plain dict increments (one per frame, never per record); read by the
    collector at scrape time. Bounded: tenants are bounded by TENANT_COUNT_MAX
    and codes by ErrorCode; auth failures by AUTH_FAILURE_SERIES_COUNT_MAX.
    """

    def __init__(self):
        self._records_out: dict[str, int] = {}
        self._bytes_out: dict[str, int] = {}
        self._rejected_batches: dict[tuple[str, str], int] = {}
        self._rejected_records: dict[tuple[str, str], int] = {}
        self._auth_failures: dict[tuple[str, str], int] = {}

    def count_sent(self, tenant_id: int, record_count: int, size: int) -> None:
        """A Records frame of `record_count` records (`size` bytes) went to a subscriber."""
        key = str(tenant_id)
        self._records_out[key] = self._records_out.get(key, 0) + record_count
        self._bytes_out[key] = self._bytes_out.get(key, 0) + size

    def count_rejected(self, tenant_id: int | None, code: int, record_count: int) -> None:
        """A publish batch was refused with `code`; `record_count` records in it (0: unknown)."""
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(int(code))
        key = (tenant_label(tenant_id), name)
        self._rejected_batches[key] = self._rejected_batches.get(key, 0) + 1
        self._rejected_records[key] = self._rejected_records.get(key, 0) + record_count

    def count_auth_failure(self, tenant_id: int | None, reason: str) -> None:
        """A peer failed authentication for `tenant_id` (None: before naming one).

        `reason` should come from a small fixed set ("bad_token", "uid_not_allowed",
        ...): it becomes a label value.
        """
        key = (tenant_label(tenant_id), reason[:AUTH_FAILURE_REASON_SIZE_MAX])
        if key not in self._auth_failures and \
                len(self._auth_failures) >= AUTH_FAILURE_SERIES_COUNT_MAX:
            key = (OTHER_LABEL, OTHER_LABEL)
        self._auth_failures[key] = self._auth_failures.get(key, 0) + 1

    def statistics(self) -> TrafficStatistics:
        return TrafficStatistics(*(MappingProxyType(dict(counts)) for counts in (
            self._records_out, self._bytes_out, self._rejected_batches,
            self._rejected_records, self._auth_failures)))


# -- the collector -------------------------------------------------------------------


def _add_histogram(family: HistogramMetricFamily, labels: list[str],
                   snapshot: HistogramSnapshot, divisor: float = 1) -> None:
    cumulative = snapshot.cumulative()
    buckets = [(floatToGoString(bound / divisor), count)
               for bound, count in zip(snapshot.bounds, cumulative)]
    buckets.append(("+Inf", cumulative[-1]))
    family.add_metric(labels, buckets, snapshot.sum / divisor)


def _gauge(name, documentation, labels=None):
    return GaugeMetricFamily(name, documentation, labels=labels)


def _counter(name, documentation, labels=None):
    return CounterMetricFamily(name, documentation, labels=labels)


class DaemonCollector(Collector):
    """Reads one daemon's state at scrape time (on the Trio thread: no locks needed).

    One function per source, each reading that source's `statistics()` (or
    state) and nothing else: the daemon's connections, the I/O backend
    choice, the tenants' rings and writers, the per-frame traffic counters.
    """

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        daemon = self.daemon
        yield from _daemon_families(daemon)
        yield from _io_families(daemon.io_probe)
        yield from _tenant_families(daemon.registry)
        yield from _traffic_families(daemon.counters.statistics())


def _daemon_families(daemon):
    stats = daemon.stats
    yield GaugeMetricFamily("ringtail_ready", "1 once rings are recovered and the socket "
                            "is bound; 0 before, and from the start of shutdown",
                            value=1 if daemon.ready else 0)
    yield GaugeMetricFamily("ringtail_connections_open", "Client connections open now",
                            value=stats.connections)
    for name, value, documentation in (
            ("ringtail_connections_accepted", stats.connections_total,
             "Client connections accepted"),
            ("ringtail_protocol_errors", stats.protocol_errors,
             "Connections closed with a fatal protocol Error"),
            ("ringtail_peers_gone", stats.peers_gone,
             "Connections that broke while the daemon had something to send"),
            ("ringtail_accept_retries", stats.accept_retries,
             "accept() failures for want of file descriptors or memory"),
            ("ringtail_internal_errors", stats.internal_errors,
             "Connection handler bugs (that connection was closed)"),
            ("ringtail_notify_failures", daemon.notifier.statistics().failed,
             "systemd notifications ($NOTIFY_SOCKET) that could not be sent"),
            ("ringtail_auth_rate_limited", stats.auth_rate_limited,
             "Hellos refused unchecked: the peer had too many recent auth failures"),
            ("ringtail_forbidden", stats.forbidden,
             "Requests refused FORBIDDEN: valid credentials without the role"),
            ("ringtail_tls_failures", stats.tls_failures,
             "TCP peers whose TLS handshake failed"),
            ("ringtail_quota_refused_batches", stats.quota_refused_batches,
             "Publish batches refused QUOTA_EXCEEDED (quota_mode = \"reject\")"),
            ("ringtail_reloads", stats.reloads, "SIGHUP reloads applied"),
            ("ringtail_reload_failures", stats.reload_failures,
             "SIGHUP reloads refused (the old config stayed)")):
        yield CounterMetricFamily(name, documentation, value=value)


def _io_families(probe):
    fallback = _gauge("ringtail_io_uring_fallback",
                      "1 when io=auto fell back to the thread backend because the "
                      "io_uring probe failed, by cause (refused, signal, timeout, failed)",
                      ["cause"])
    if probe is not None and not probe.ok:
        fallback.add_metric([probe.cause], 1)
    yield fallback


def _tenant_families(registry):
    tenants = sorted(registry.tenants.items())  # a copy: opens may follow
    yield GaugeMetricFamily("ringtail_tenants", "Tenants with an open ring",
                            value=len(tenants))
    unavailable = _gauge("ringtail_tenant_unavailable",
                         "1 for each tenant whose ring could not be opened", ["tenant"])
    for tenant_id in sorted(registry.unavailable):
        unavailable.add_metric([str(tenant_id)], 1)
    yield unavailable

    records_in = _counter("ringtail_records_in", "Records made durable (acknowledged)",
                          ["tenant"])
    bytes_in = _counter("ringtail_bytes_in", "Record bytes made durable", ["tenant"])
    batches = _counter("ringtail_batches", "Ring batches written (group commits)",
                       ["tenant"])
    fdatasyncs = _counter("ringtail_fdatasyncs", "fdatasync calls on the ring file",
                          ["tenant"])
    batch_records = HistogramMetricFamily(
        "ringtail_batch_records", "Records per ring batch", labels=["tenant"])
    commit_seconds = HistogramMetricFamily(
        "ringtail_commit_seconds",
        "Per batch, submit to durable: the write chain and its fdatasync (sync=batch)",
        labels=["tenant"])
    ack_seconds = HistogramMetricFamily(
        "ringtail_ack_latency_seconds",
        "Per publish batch, queued by the daemon to durable (its Ack is sent then)",
        labels=["tenant"])
    pending = _gauge("ringtail_pending_records", "Records queued for the writer",
                     ["tenant"])
    subscribers = _gauge("ringtail_subscribers", "Subscriptions open now", ["tenant"])
    gaps = _counter("ringtail_gaps", "Gap events sent (a subscriber fell behind eviction)",
                    ["tenant"])
    capacity = _gauge("ringtail_ring_capacity_records", "Ring capacity", ["tenant"])
    retained = _gauge("ringtail_ring_retained_records", "Records retained in the ring",
                      ["tenant"])
    fill = _gauge("ringtail_ring_fill_ratio", "Retained records / capacity (0..1)",
                  ["tenant"])
    next_sequence = _gauge("ringtail_ring_next_sequence",
                           "Sequence the next record will get", ["tenant"])
    failed = _gauge("ringtail_ring_failed", "1 if the ring's writes failed (reopen needed)",
                    ["tenant"])
    backend = _gauge("ringtail_io_backend", "1 for the I/O backend each ring uses",
                     ["tenant", "backend"])
    for tenant_id, tenant in tenants:
        label = [str(tenant_id)]
        writer = tenant.writer.statistics()
        ring = tenant.ring.statistics()
        records_in.add_metric(label, writer.records)
        bytes_in.add_metric(label, writer.records * RECORD_SIZE_BYTES)
        batches.add_metric(label, writer.batches)
        fdatasyncs.add_metric(label, ring.fdatasync_count)
        _add_histogram(batch_records, label, writer.batch_record_count)
        _add_histogram(commit_seconds, label, writer.commit_latency_ns, 1e9)
        _add_histogram(ack_seconds, label, writer.ack_latency_ns, 1e9)
        pending.add_metric(label, writer.pending_records)
        subscribers.add_metric(label, tenant.subscriber_count)
        gaps.add_metric(label, tenant.gaps)
        kept = ring.next_sequence - ring.oldest_sequence
        capacity.add_metric(label, ring.capacity)
        retained.add_metric(label, kept)
        fill.add_metric(label, kept / ring.capacity)
        next_sequence.add_metric(label, ring.next_sequence)
        failed.add_metric(label, 1 if writer.failed else 0)
        backend.add_metric([str(tenant_id), ring.backend], 1)
    yield from (records_in, bytes_in, batches, fdatasyncs, batch_records, commit_seconds,
                ack_seconds, pending, subscribers, gaps, capacity, retained, fill,
                next_sequence, failed, backend)


def _traffic_families(traffic: TrafficStatistics):
    records_out = _counter("ringtail_records_out", "Records sent to subscribers", ["tenant"])
    bytes_out = _counter("ringtail_bytes_out", "Record bytes sent to subscribers",
                         ["tenant"])
    for key in sorted(traffic.records_out):
        records_out.add_metric([key], traffic.records_out[key])
        bytes_out.add_metric([key], traffic.bytes_out[key])
    rejected_batches = _counter("ringtail_rejected_batches",
                                "Publish batches refused, by error code",
                                ["tenant", "code"])
    rejected_records = _counter("ringtail_rejected_records",
                                "Records in refused publish batches, by error code "
                                "(0 where the frame had no whole records)",
                                ["tenant", "code"])
    for key in sorted(traffic.rejected_batches):
        rejected_batches.add_metric(list(key), traffic.rejected_batches[key])
        rejected_records.add_metric(list(key), traffic.rejected_records[key])
    auth_failures = _counter("ringtail_auth_failures", "Failed authentications",
                             ["tenant", "reason"])
    for key in sorted(traffic.auth_failures):
        auth_failures.add_metric(list(key), traffic.auth_failures[key])
    yield from (records_out, bytes_out, rejected_batches, rejected_records, auth_failures)


def build_registry(daemon) -> CollectorRegistry:
    """A registry of this daemon's own (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry
