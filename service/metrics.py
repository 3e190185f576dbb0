"""Prometheus metrics: the collector behind `/metrics`.

Served by the daemon's HTTP listener (service/http.py, `http_listen =
"HOST:PORT"`, flag `--http`; `metrics_listen` / `--metrics` are aliases),
beside `/healthz`, `/readyz` and the web page. Every metric is read at
scrape time by one custom collector (`DaemonCollector`) in a registry of this
daemon's own, so several daemons in one process (tests) never share series.

The collector only reads: one `Daemon.statistics()` per scrape, a frozen
composition of each owner's `statistics()` (service/server.py,
`DaemonStatistics`), turned into metric families one source at a time. It
counts nothing and reaches into no object. The write path keeps no
Prometheus objects: the batcher fills integer histograms
(service/histogram.py), the other owners plain integer counters.

Startup order (service/server.py): this listener binds first, so `/healthz`
answers and `/readyz` says 503 while rings recover; then the Unix socket binds,
rings recover, and `/readyz` turns 200 with the "ringtail ready" log line (and
systemd's READY=1). It turns 503 again when shutdown begins.

Every metric, its type, labels and meaning: docs/OPERATIONS.md, "Metrics and
health".

The listener, its bounds and its errors: service/http.py.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.histogram import HistogramSnapshot
from ringtail.service.protocol import ErrorCode


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


def _code_label(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(int(code))


class DaemonCollector(Collector):
    """Reads one daemon's statistics at scrape time (on the Trio thread: no locks).

    One function per source, each given that source's statistics and nothing
    else: the daemon itself, the listeners, connection handling, the gate,
    the I/O backend choice, the tenants' rings and writers, subscriptions.
    """

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        statistics = self.daemon.statistics()
        yield from _daemon_families(statistics)
        yield from _listener_families(statistics.listeners)
        yield from _connection_families(statistics.connections)
        yield from _gate_families(statistics.gate)
        yield from _io_families(statistics.io_probe)
        yield from _tenant_families(statistics.tenants, statistics.gate)
        yield from _subscription_families(statistics.subscriptions, statistics.tenants)
        if statistics.http is not None:
            yield from _http_families(statistics.http)


def _counters(rows):
    for name, value, documentation in rows:
        yield CounterMetricFamily(name, documentation, value=value)


def _daemon_families(statistics):
    yield GaugeMetricFamily("ringtail_ready", "1 once rings are recovered and the socket "
                            "is bound; 0 before, and from the start of shutdown",
                            value=1 if statistics.ready else 0)
    yield from _counters((
        ("ringtail_notify_failures", statistics.notify_failures,
         "systemd notifications ($NOTIFY_SOCKET) that could not be sent"),
        ("ringtail_reloads", statistics.reloads, "SIGHUP reloads applied"),
        ("ringtail_reload_failures", statistics.reload_failures,
         "SIGHUP reloads refused (the old config stayed)")))


def _listener_families(listeners):
    yield from _counters((
        ("ringtail_connections_accepted", listeners.accepted, "Client connections accepted"),
        ("ringtail_accept_retries", listeners.accept_retries,
         "accept() failures for want of file descriptors or memory")))


def _connection_families(connections):
    yield from _counters((
        ("ringtail_protocol_errors", connections.protocol_errors,
         "Connections closed with a fatal protocol Error"),
        ("ringtail_peers_gone", connections.peers_gone,
         "Connections that broke while the daemon had something to send"),
        ("ringtail_internal_errors", connections.internal_errors,
         "Connection handler bugs (that connection was closed)"),
        ("ringtail_tls_failures", connections.tls_failures,
         "TCP peers whose TLS handshake failed"),
        ("ringtail_quota_refused_batches",
         sum(count for (_, code), count in connections.rejected_batches.items()
             if code == ErrorCode.QUOTA_EXCEEDED),
         "Publish batches refused QUOTA_EXCEEDED (quota_mode = \"reject\")")))
    rejected_batches = _counter("ringtail_rejected_batches",
                                "Publish batches refused, by error code",
                                ["tenant", "code"])
    rejected_records = _counter("ringtail_rejected_records",
                                "Records in refused publish batches, by error code "
                                "(0 where the frame had no whole records)",
                                ["tenant", "code"])
    for key in sorted(connections.rejected_batches):
        labels = [str(key[0]), _code_label(key[1])]
        rejected_batches.add_metric(labels, connections.rejected_batches[key])
        rejected_records.add_metric(labels, connections.rejected_records[key])
    yield from (rejected_batches, rejected_records)


def _gate_families(gate):
    yield GaugeMetricFamily("ringtail_connections_open", "Client connections open now",
                            value=gate.connections_open)
    by_listener = _gauge("ringtail_listener_connections_open",
                         "Client connections open now, by listener (unix, tcp)", ["listener"])
    for listener in sorted(gate.connections_by_listener):
        by_listener.add_metric([listener], gate.connections_by_listener[listener])
    yield by_listener
    yield GaugeMetricFamily("ringtail_connections_unauthenticated",
                            "Connections that have not sent their Hello yet",
                            value=gate.unauthenticated)
    yield from _counters((
        ("ringtail_auth_rate_limited", gate.auth_rate_limited,
         "Hellos refused unchecked: the peer had too many recent auth failures"),
        ("ringtail_forbidden", gate.forbidden,
         "Requests refused FORBIDDEN: valid credentials without the role"),
        ("ringtail_refusals_unanswered", gate.refusals_unanswered,
         "Refused connections closed without an Error frame (REFUSAL_COUNT_MAX refusals "
         "were already being answered on that listener)")))
    auth_failures = _counter("ringtail_auth_failures", "Failed authentications",
                             ["tenant", "reason"])
    for key in sorted(gate.auth_failures):
        auth_failures.add_metric(list(key), gate.auth_failures[key])
    yield auth_failures


def _http_families(http):
    yield GaugeMetricFamily("ringtail_http_connections_open",
                            "HTTP connections open now (web pages, scrapers, probes)",
                            value=http.connections)
    yield from _counters((
        ("ringtail_http_connections", http.connections_total, "HTTP connections accepted"),
        ("ringtail_http_refused_busy", http.refused_busy,
         "HTTP connections answered 503: HTTP_CONNECTION_COUNT_MAX were open"),
        ("ringtail_http_bad_requests", http.bad_requests,
         "HTTP requests answered 4xx: malformed, oversized or too slow"),
        ("ringtail_http_stalled", http.stalled,
         "HTTP connections dropped: a write stalled HTTP_SEND_STALL_TIMEOUT_S"),
        ("ringtail_http_handler_errors", http.handler_errors,
         "HTTP requests answered 500: a handler bug (that connection closed)")))


def _io_families(probe):
    fallback = _gauge("ringtail_io_uring_fallback",
                      "1 when io=auto fell back to the thread backend because the "
                      "io_uring probe failed, by cause (refused, signal, timeout, failed)",
                      ["cause"])
    if probe is not None and not probe.ok:
        fallback.add_metric([probe.cause], 1)
    yield fallback


def _tenant_families(registry, gate):
    tenants = sorted(registry.tenants.items())
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
    duplicates = _counter("ringtail_duplicate_batches",
                          "Producers' resent batches answered with their original Ack, not "
                          "stored again (exactly once)", ["tenant"])
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
        writer, ring = tenant.writer, tenant.ring
        records_in.add_metric(label, writer.records)
        bytes_in.add_metric(label, writer.records * RECORD_SIZE_BYTES)
        batches.add_metric(label, writer.batches)
        duplicates.add_metric(label, writer.duplicate_batches)
        fdatasyncs.add_metric(label, ring.fdatasync_count)
        _add_histogram(batch_records, label, writer.batch_record_count)
        _add_histogram(commit_seconds, label, writer.commit_latency_ns, 1e9)
        _add_histogram(ack_seconds, label, writer.ack_latency_ns, 1e9)
        pending.add_metric(label, writer.pending_records)
        admitted = gate.tenants.get(tenant_id)
        subscribers.add_metric(label, admitted.subscribers if admitted is not None else 0)
        kept = ring.next_sequence - ring.oldest_sequence
        capacity.add_metric(label, ring.capacity)
        retained.add_metric(label, kept)
        fill.add_metric(label, kept / ring.capacity)
        next_sequence.add_metric(label, ring.next_sequence)
        failed.add_metric(label, 1 if writer.failed else 0)
        backend.add_metric([str(tenant_id), ring.backend], 1)
    yield from (records_in, bytes_in, batches, duplicates, fdatasyncs, batch_records, commit_seconds,
                ack_seconds, pending, subscribers, capacity, retained, fill,
                next_sequence, failed, backend)


def _subscription_families(subscriptions, registry):
    records_out = _counter("ringtail_records_out", "Records sent to subscribers", ["tenant"])
    bytes_out = _counter("ringtail_bytes_out", "Record bytes sent to subscribers",
                         ["tenant"])
    for tenant_id in sorted(subscriptions.records_out):
        records_out.add_metric([str(tenant_id)], subscriptions.records_out[tenant_id])
        bytes_out.add_metric([str(tenant_id)], subscriptions.bytes_out[tenant_id])
    gaps = _counter("ringtail_gaps", "Gap events sent (a subscriber fell behind eviction)",
                    ["tenant"])
    for tenant_id in sorted(registry.tenants):  # every open tenant, 0 if none
        gaps.add_metric([str(tenant_id)], subscriptions.gaps.get(tenant_id, 0))
    yield from (records_out, bytes_out, gaps)


def build_registry(daemon) -> CollectorRegistry:
    """A registry of this daemon's own (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry
