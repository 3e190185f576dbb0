"""One statistics model: each event is counted once, and metrics only read.

An in-process Daemon (thread backend, tmp_path) with a TCP listener for a
token-checked peer and the open Unix socket for a publisher. One failed
authentication and two refused publish batches (a bad record, a batch over
the tenant's quota) happen; `Daemon.statistics()` and the Prometheus text
the collector renders from it must each show every one exactly once, and
scraping twice must change nothing.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ringtail.service.auth import Grant, hash_token, new_token
from ringtail.service.config import ServeConfig
from ringtail.service.metrics import build_registry
from ringtail.service.protocol import Ack, Error, ErrorCode, Hello, Publish, Welcome, encode_event
from ringtail.service.quotas import QuotaSettings
from ringtail.service.server import Daemon
from ringtail.service.tenants import TenantSettings
from tests.service.conftest import RawPeer, RecordFactory, short_socket_dir

TENANT = 8
TOKEN = new_token()
TIMEOUT_S = 30  # a hang guard, never a synchronisation
BURST_RECORDS = 10


@pytest.fixture
async def daemon(tmp_path):
    quota = QuotaSettings(records_per_second=1, burst_records=BURST_RECORDS, mode="reject")
    tenant = TenantSettings(256, "none", grants=(
        Grant(frozenset({"publish"}), token_hash=hash_token(TOKEN)),), quota=quota)
    config = ServeConfig(data_dir=os.fspath(tmp_path / "data"),
                         socket=os.path.join(short_socket_dir(tmp_path), "stats.sock"),
                         io="threads", sync="none", capacity=256,
                         tcp_listen="127.0.0.1:0", tcp_plaintext=True, tenants={TENANT: tenant})
    server = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown()


def scrape(daemon: Daemon) -> dict[tuple[str, tuple], float]:
    text = generate_latest(build_registry(daemon)).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(found, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = {key: str(value) for key, value in labels.items()}.items()
    return sum(value for (sample, sample_labels), value in found.items()
               if sample == name and wanted <= dict(sample_labels).items())


async def test_an_auth_failure_and_a_refused_batch_are_each_counted_exactly_once(daemon):
    factory = RecordFactory(TENANT)
    with trio.fail_after(TIMEOUT_S):
        host, port = daemon.tcp_address.rsplit(":", 1)
        intruder = RawPeer(await trio.open_tcp_stream(host, int(port)))
        await intruder.send(encode_event(Hello(TENANT, b"rt_not-the-token", "stats-test")))
        refusal = await intruder.read_frame()
        assert isinstance(refusal, Error) and refusal.code == ErrorCode.AUTH_FAILED, refusal
        assert await intruder.read_frame() is None  # then the daemon closed it

        publisher = await RawPeer.connect(daemon.config.socket)
        assert isinstance(await publisher.hello(TENANT), Welcome)
        bad = [factory.slot_record() for _ in range(3)]
        bad[1] = dataclasses.replace(bad[1], magic=0xDEADBEEE)
        await publisher.send(encode_event(Publish(1, b"".join(r.encode() for r in bad))))
        await publisher.send(encode_event(Publish(2, factory.records(BURST_RECORDS + 1))))
        await publisher.send(encode_event(Publish(3, factory.records(5))))
        answers = [await publisher.read_frame() for _ in range(3)]
        assert [type(answer) for answer in answers] == [Error, Error, Ack], answers
        assert answers[0].code == ErrorCode.BAD_RECORD_MAGIC and answers[0].batch_id == 1
        assert answers[1].code == ErrorCode.QUOTA_EXCEEDED and answers[1].batch_id == 2
        await publisher.stream.aclose()

    statistics = daemon.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        statistics.gate = None  # a snapshot, not the counters
    assert statistics.gate.auth_failures == {(str(TENANT), "bad_credentials"): 1}
    assert statistics.gate.auth_failure_reasons == {"bad_credentials": 1}
    assert statistics.gate.forbidden == 0 and statistics.gate.auth_rate_limited == 0
    assert statistics.connections.rejected_batches == {
        (TENANT, ErrorCode.BAD_RECORD_MAGIC): 1, (TENANT, ErrorCode.QUOTA_EXCEEDED): 1}
    assert statistics.connections.rejected_records == {
        (TENANT, ErrorCode.BAD_RECORD_MAGIC): 3,
        (TENANT, ErrorCode.QUOTA_EXCEEDED): BURST_RECORDS + 1}
    assert statistics.connections.protocol_errors == 0
    assert statistics.listeners.accepted == 2

    found = scrape(daemon)
    assert total(found, "ringtail_auth_failures_total") == 1
    assert total(found, "ringtail_auth_failures_total", tenant=TENANT,
                 reason="bad_credentials") == 1
    assert total(found, "ringtail_auth_rate_limited_total") == 0
    assert total(found, "ringtail_forbidden_total") == 0
    assert total(found, "ringtail_rejected_batches_total") == 2
    assert total(found, "ringtail_rejected_batches_total", tenant=TENANT,
                 code="BAD_RECORD_MAGIC") == 1
    assert total(found, "ringtail_rejected_batches_total", tenant=TENANT,
                 code="QUOTA_EXCEEDED") == 1
    assert total(found, "ringtail_rejected_records_total", code="BAD_RECORD_MAGIC") == 3
    assert total(found, "ringtail_quota_refused_batches_total") == 1
    assert total(found, "ringtail_records_in_total", tenant=TENANT) == 5
    assert total(found, "ringtail_connections_accepted_total") == 2
    assert scrape(daemon) == found  # reading changed nothing
