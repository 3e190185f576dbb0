"""Metrics and health over HTTP (service/metrics.py): exact counts after a known workload.

A real `ringtail serve --metrics 127.0.0.1:0` (the port is read from its
"metrics listening on" log line), a known workload over the Unix socket, then
plain urllib scrapes on a worker thread. Readiness is checked in process,
with recovery held at a gate, so "not ready" is observed, never raced.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ringtail.ioring import open_ring
from ringtail.service.auth import Peer
from ringtail.service.client import Client
from ringtail.service.config import ConfigError, ServeConfig, load_config
from ringtail.service.gate import AUTH_FAILURE_SERIES_COUNT_MAX, Refused
from ringtail.service.protocol import Error, ErrorCode, Hello, Publish, Records, encode_event
from ringtail.service.server import Daemon
from tests.conftest import uring_probe
from tests.service.conftest import (DAEMON_READY_TIMEOUT_S, RINGTAIL, DaemonProcess, RawPeer,
                                    RecordFactory, short_socket_dir)

TENANT = 1
TIMEOUT_S = 30.0  # fail-safe for one step, never a synchronisation
METRICS_URL = re.compile(r"metrics listening on (http://\S+)")


# -- helpers ------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; 4xx/5xx are answers here, not errors."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def aget(url: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(http_get, url)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name: str, **labels) -> float:
    key = (name, frozenset((k, str(v)) for k, v in labels.items()))
    assert key in found, f"no sample {name}{labels}; have " + ", ".join(
        sorted(f"{n}{dict(l)}" for n, l in found if n == name))
    return found[key]


@pytest.fixture
def metrics_daemon(tmp_path):
    """Factory: a `ringtail serve --metrics 127.0.0.1:0` process, and its metrics URL."""
    started = []

    def start(**options) -> tuple[DaemonProcess, str]:
        socket_dir = short_socket_dir(tmp_path)
        process = DaemonProcess(os.fspath(tmp_path / "data"),
                                os.path.join(socket_dir, "metrics.sock"),
                                {"metrics": "127.0.0.1:0", **options}, cwd=os.fspath(tmp_path))
        started.append(process)
        process.start()
        match = METRICS_URL.search(process.run_stderr)
        assert match, process.run_stderr
        return process, match.group(1)

    yield start
    for process in started:
        process.close()


# -- the workload --------------------------------------------------------------------


@pytest.mark.parametrize("io", ["threads", "auto"])
async def test_metrics_report_the_exact_workload(metrics_daemon, io):
    server, url = await trio.to_thread.run_sync(lambda: metrics_daemon(io=io, capacity=4096))
    factory = RecordFactory(TENANT, seed=7)
    batch_sizes = (100, 250, 50)  # N = 400 records in k = 3 publish batches
    record_count = sum(batch_sizes)
    rejected_count = 7  # M records in one batch refused for a bad magic
    published = b""

    with trio.fail_after(TIMEOUT_S):
        async with await Client.connect(server.socket_path, TENANT) as client:
            batches = [factory.records(size) for size in batch_sizes]
            acks = await client.publish_many(batches)
            published = b"".join(batches)
        assert sum(a.last_sequence - a.first_sequence + 1 for a in acks) == record_count

        bad = [factory.slot_record() for _ in range(rejected_count)]
        bad[2] = dataclasses.replace(bad[2], magic=0xDEADBEEE)
        peer = await RawPeer.connect(server.socket_path)
        await peer.hello(TENANT)
        await peer.send(encode_event(Publish(1, b"".join(r.encode() for r in bad))))
        error = await peer.read_frame()
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_RECORD_MAGIC, error
        await peer.aclose()

        # A follower that reads everything and stays subscribed for the scrape.
        async with await Client.connect(server.socket_path, TENANT) as subscriber:
            received = b""
            async for event in subscriber.subscribe("oldest", follow=True):
                if isinstance(event, Records):
                    received += event.records
                if len(received) >= len(published):
                    break
            assert received == published

            status, text = await aget(url + "/metrics")
    assert status == 200
    found = samples(text)
    tenant = {"tenant": TENANT}
    assert value(found, "ringtail_records_in_total", **tenant) == record_count
    assert value(found, "ringtail_bytes_in_total", **tenant) == record_count * 64
    assert value(found, "ringtail_rejected_records_total", tenant=TENANT,
                 code="BAD_RECORD_MAGIC") == rejected_count
    assert value(found, "ringtail_rejected_batches_total", tenant=TENANT,
                 code="BAD_RECORD_MAGIC") == 1
    assert value(found, "ringtail_records_out_total", **tenant) == record_count
    assert value(found, "ringtail_bytes_out_total", **tenant) == record_count * 64
    assert value(found, "ringtail_subscribers", **tenant) == 1
    assert value(found, "ringtail_gaps_total", **tenant) == 0
    batches_written = value(found, "ringtail_batches_total", **tenant)
    # Group commit may merge publish batches, so the count is checked against
    # the ring's own: one fdatasync per ring batch (sync=batch, the default).
    assert batches_written == value(found, "ringtail_fdatasyncs_total", **tenant)
    # Histograms: one batch-size and one commit observation per ring batch,
    # one ack latency per publish batch.
    assert value(found, "ringtail_batch_records_count", **tenant) == batches_written
    assert value(found, "ringtail_batch_records_sum", **tenant) == record_count
    assert value(found, "ringtail_batch_records_bucket", le="4096.0", **tenant) == batches_written
    assert value(found, "ringtail_commit_seconds_count", **tenant) == batches_written
    assert value(found, "ringtail_ack_latency_seconds_count", **tenant) == len(batch_sizes)
    assert value(found, "ringtail_ack_latency_seconds_bucket", le="+Inf",
                 **tenant) == len(batch_sizes)
    assert value(found, "ringtail_ring_retained_records", **tenant) == record_count
    assert value(found, "ringtail_ring_capacity_records", **tenant) == 4096
    assert value(found, "ringtail_ring_fill_ratio", **tenant) == record_count / 4096
    assert value(found, "ringtail_ready") == 1
    for quiet in ("ringtail_forbidden_total", "ringtail_tls_failures_total",
                  "ringtail_quota_refused_batches_total", "ringtail_reloads_total",
                  "ringtail_reload_failures_total", "ringtail_auth_rate_limited_total",
                  "ringtail_refusals_unanswered_total", "ringtail_connections_unauthenticated",
                  "ringtail_http_bad_requests_total", "ringtail_http_handler_errors_total",
                  "ringtail_http_refused_busy_total", "ringtail_http_stalled_total"):
        assert value(found, quiet) == 0, quiet  # exported, and nothing of the kind happened
    assert value(found, "ringtail_listener_connections_open", listener="unix") == value(
        found, "ringtail_connections_open"), "every connection open is on the Unix listener"
    # This scrape's own connection is open and counted by the HTTP listener.
    assert value(found, "ringtail_http_connections_open") >= 1
    assert value(found, "ringtail_http_connections_total") >= value(
        found, "ringtail_http_connections_open")
    assert value(found, "ringtail_pending_records", **tenant) == 0
    # The backend each ring really got, as its "tenant 1:" log line says: the
    # one asked for, or for `auto` io_uring where this machine's probe passes
    # (tests/conftest.py), and the same one the "ringtail ready" line names.
    expected_backend = io if io != "auto" else "uring" if uring_probe().ok else "threads"
    backend = re.search(rf"tenant {TENANT}: .* io=(\w+)", server.run_stderr).group(1)
    assert backend == expected_backend, server.run_stderr
    ready_backend = re.search(r"ringtail ready: .* io=(\w+)", server.run_stderr).group(1)
    assert ready_backend == expected_backend, server.run_stderr
    assert value(found, "ringtail_io_backend", tenant=TENANT, backend=backend) == 1

    assert await aget(url + "/healthz") == (200, "ok\n")
    assert (await aget(url + "/readyz"))[0] == 200
    assert (await aget(url + "/nothing-here"))[0] == 404
    assert await trio.to_thread.run_sync(server.stop) == 0


# -- readiness ---------------------------------------------------------------------


async def test_readyz_turns_ready_only_after_recovery(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    with open_ring(os.fspath(data_dir / f"tenant-{TENANT}.ring"), capacity=256,
                   tenant_id=TENANT, io="threads") as ring:
        assert ring.next_sequence == 0  # a ring the daemon must recover at start
    config = ServeConfig(data_dir=os.fspath(data_dir),
                         socket=os.path.join(short_socket_dir(tmp_path), "ready.sock"),
                         io="threads", capacity=256, metrics_listen="127.0.0.1:0")
    daemon = Daemon(config)
    # Hold recovery at a gate (it runs on a worker thread) to look at /readyz.
    recovering, release = threading.Event(), threading.Event()
    recover = daemon.registry.open_existing

    def gated_recovery() -> None:
        recovering.set()
        assert release.wait(DAEMON_READY_TIMEOUT_S), "the test never released recovery"
        recover()

    daemon.registry.open_existing = gated_recovery
    served = trio.Event()

    async def serve(nursery: trio.Nursery) -> None:
        await nursery.start(daemon.serve)
        served.set()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, nursery)
            assert await trio.to_thread.run_sync(recovering.wait, DAEMON_READY_TIMEOUT_S)
            url = daemon.metrics_url
            assert await aget(url + "/readyz") == (
                503, "not ready: recovering rings, binding the socket, or shutting down\n")
            assert await aget(url + "/healthz") == (200, "ok\n")  # alive while recovering
            status, text = await aget(url + "/metrics")
            assert status == 200 and value(samples(text), "ringtail_ready") == 0
            assert not served.is_set()

            release.set()
            await served.wait()
            assert await aget(url + "/readyz") == (200, "ready\n")
            found = samples((await aget(url + "/metrics"))[1])
            assert value(found, "ringtail_ready") == 1
            assert value(found, "ringtail_tenants") == 1
            daemon.shutdown()
            assert not daemon.ready  # /readyz says 503 from the start of shutdown


# -- counters, settings, errors ------------------------------------------------------


async def test_auth_failures_are_counted_per_tenant_and_reason_within_a_bound(tmp_path):
    # The gate counts them (service/gate.py); tests/service/test_gate.py has more.
    daemon = Daemon(ServeConfig(data_dir=os.fspath(tmp_path / "data")))
    refuse_hello(daemon.gate, 3, "10.0.0.1")
    refuse_hello(daemon.gate, 3, "10.0.0.2")
    refuse_hello(daemon.gate, 4, "10.0.0.3")
    counted = daemon.statistics().gate.auth_failures
    assert counted == {("3", "bad_credentials"): 2, ("4", "bad_credentials"): 1}
    for tenant_id in range(AUTH_FAILURE_SERIES_COUNT_MAX * 2):  # peers making up tenants
        refuse_hello(daemon.gate, 1000 + tenant_id, f"10.1.{tenant_id // 256}.{tenant_id % 256}")
    counted = daemon.statistics().gate.auth_failures
    assert len(counted) == AUTH_FAILURE_SERIES_COUNT_MAX + 1
    assert sum(counted.values()) == 3 + AUTH_FAILURE_SERIES_COUNT_MAX * 2
    assert counted[("other", "other")] > 0


def refuse_hello(gate, tenant_id: int, address: str) -> None:
    """A TCP Hello with a token this daemon does not know: refused AUTH_FAILED."""
    with pytest.raises(Refused), gate.admit(Peer("tcp", address=address),
                                            Hello(tenant_id, b"not-a-token", "metrics-test"),
                                            lambda code, message: None):
        pass


@pytest.mark.parametrize("listen", ["9464", "localhost", ":9464", "::1:9464", "host:99999",
                                    "host:port"])
def test_bad_metrics_listen_is_a_config_error(tmp_path, listen):
    path = tmp_path / "ringtail.toml"
    path.write_text(f'metrics_listen = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"metrics_listen = .*; write HOST:PORT, e\.g\."):
        load_config(os.fspath(path))


def test_metrics_listen_is_off_unless_set(tmp_path):
    assert ServeConfig().metrics_listen == ""
    path = tmp_path / "ringtail.toml"
    path.write_text('metrics_listen = "[::1]:9464"\n')
    assert load_config(os.fspath(path)).metrics_listen == "[::1]:9464"


def test_metrics_port_in_use_exits_1_with_the_address(tmp_path):
    import socket
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [RINGTAIL, "serve", "--data-dir", os.fspath(tmp_path / "data"),
             "--socket", os.path.join(short_socket_dir(tmp_path), "busy.sock"),
             "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=DAEMON_READY_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # refused before any ring was opened
