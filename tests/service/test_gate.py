"""The tenant gate (service/gate.py), unit-tested over a real tenant registry.

Each test builds a `Gate` over a `TenantRegistry` in tmp_path (thread
backend) and a real access policy, and calls it as the connection handler
does: slots are entered and left as context managers, refusals are the
`Refused` the handler turns into an Error. What the gate counted is read
from `statistics()`.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from ringtail.service.auth import (AUTH_FAILURE_COUNT_MAX, AccessPolicy, Grant, Peer, Role,
                                   hash_token, new_token)
from ringtail.service.gate import (AUTH_FAILURE_SERIES_COUNT_MAX, PEER_UNAUTHENTICATED_COUNT_MAX,
                                   REFUSAL_COUNT_MAX, SUBSCRIBER_COUNT_MAX,
                                   TCP_CONNECTION_COUNT_MAX, ConnectionLimits, Gate, Refused)
from ringtail.service.protocol import ErrorCode, Hello, ProtocolError, Publish
from ringtail.service.quotas import QuotaSettings, TrioClock
from ringtail.service.tenants import TenantRegistry, TenantSettings
from tests.service.conftest import RecordFactory

TENANT = 3
PUBLISHER, SUBSCRIBER = new_token().encode(), new_token().encode()


def grants() -> dict[int, tuple[Grant, ...]]:
    return {TENANT: (Grant(frozenset({"publish"}), token_hash=hash_token(PUBLISHER)),
                     Grant(frozenset({"subscribe"}), token_hash=hash_token(SUBSCRIBER)))}


class Gated:
    """A gate over a real registry; `quotas` may be changed before a reload."""

    def __init__(self, data_dir: str, quotas: dict[int, QuotaSettings] | None = None):
        self.registry = TenantRegistry(data_dir, TenantSettings(256, "none"), "threads",
                                       settings={TENANT: TenantSettings(256, "none")})
        self.registry.open_existing()  # as the daemon starts: creates the data dir and ring
        self.quotas = dict(quotas or {})
        self.gate = Gate(AccessPolicy("socket_mode", grants(), ()), self.registry,
                         lambda tenant_id: self.quotas.get(tenant_id, QuotaSettings()),
                         TrioClock())
        self.revoked: list[tuple[ErrorCode, str]] = []

    def admit(self, token: bytes = PUBLISHER, address: str = "10.0.0.1",
              tenant_id: int = TENANT):
        return self.gate.admit(Peer("tcp", address=address), Hello(tenant_id, token, "gate-test"),
                               lambda code, message: self.revoked.append((code, message)))


@pytest.fixture
def make_gated(tmp_path):
    """`make_gated(quotas)` -> a Gated; every ring it opened is closed after the test."""
    made: list[Gated] = []

    def make(quotas: dict[int, QuotaSettings] | None = None) -> Gated:
        made.append(Gated(os.fspath(tmp_path / f"data-{len(made)}"), quotas))
        return made[-1]

    yield make
    for gated in made:
        for tenant in gated.registry.tenants.values():
            tenant.ring.close()


@pytest.fixture
def gated(make_gated):
    return make_gated()


def refused(context) -> Refused:
    with pytest.raises(Refused) as caught, context:
        pass
    return caught.value


# -- a Hello ---------------------------------------------------------------------------


async def test_bad_credentials_are_refused_and_counted_once_then_rate_limited(gated):
    for attempt in range(AUTH_FAILURE_COUNT_MAX):
        refusal = refused(gated.admit(token=b"wrong"))
        assert refusal.code == ErrorCode.AUTH_FAILED and "not valid" in refusal.message
    limited = refused(gated.admit(token=PUBLISHER))  # valid now, but unchecked
    assert limited.code == ErrorCode.AUTH_FAILED and "too many failed" in limited.message
    statistics = gated.gate.statistics()
    assert statistics.auth_failures == {(str(TENANT), "bad_credentials"): AUTH_FAILURE_COUNT_MAX,
                                        (str(TENANT), "rate_limited"): 1}
    assert statistics.auth_rate_limited == 1 and statistics.forbidden == 0
    with gated.admit(address="10.0.0.2"):  # another peer is not held back
        assert gated.gate.statistics().connections_open == 0  # only connection_slot counts it
        assert gated.gate.statistics().tenants[TENANT].connections == 1


async def test_auth_failure_series_are_bounded_and_every_failure_still_counted(gated):
    for index in range(AUTH_FAILURE_SERIES_COUNT_MAX * 2):  # peers making up tenant ids
        refused(gated.admit(token=b"wrong", address=f"10.1.{index // 256}.{index % 256}",
                            tenant_id=1000 + index))
    statistics = gated.gate.statistics()
    assert len(statistics.auth_failures) == AUTH_FAILURE_SERIES_COUNT_MAX + 1
    assert sum(statistics.auth_failures.values()) == AUTH_FAILURE_SERIES_COUNT_MAX * 2
    assert statistics.auth_failures[("other", "other")] == AUTH_FAILURE_SERIES_COUNT_MAX
    assert statistics.auth_failure_reasons == {"bad_credentials": AUTH_FAILURE_SERIES_COUNT_MAX * 2}


async def test_credentials_of_another_tenant_are_refused_forbidden_at_the_hello(gated):
    refusal = refused(gated.admit(tenant_id=TENANT + 1))  # valid token, granted on TENANT only
    assert refusal.code == ErrorCode.FORBIDDEN and "grant nothing" in refusal.message
    statistics = gated.gate.statistics()
    assert statistics.auth_failures == {(str(TENANT + 1), "forbidden"): 1}
    assert statistics.forbidden == 1 and statistics.auth_rate_limited == 0


async def test_a_tenant_that_is_not_configured_is_refused_unknown_tenant(gated):
    gated.registry.create_on_first_use = False
    local = gated.gate.admit(Peer("unix"), Hello(TENANT + 1, b"", "gate-test"),
                             lambda code, message: None)  # socket_mode: any local peer
    refusal = refused(local)
    assert refusal.code == ErrorCode.UNKNOWN_TENANT and "not configured" in refusal.message
    assert gated.gate.statistics().auth_failures == {}  # not an auth failure


async def test_connection_slots_are_given_back_on_every_way_out(make_gated):
    gated = make_gated({TENANT: QuotaSettings(connections_max=2)})
    with gated.admit(), gated.admit():
        refusal = refused(gated.admit())
        assert refusal.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert "2 connections open" in refusal.message
    with pytest.raises(RuntimeError), gated.admit():  # a handler that failed
        raise RuntimeError("a bug in the handler")
    with gated.admit(), gated.admit():  # both slots free again
        tenant = gated.gate.statistics().tenants[TENANT]
        assert tenant.connections == 2
    assert gated.gate.statistics().tenants[TENANT].connections == 0


async def test_each_listener_has_its_own_cap_and_a_peer_its_pre_hello_cap(gated):
    """Unix and TCP slots are counted apart (a TCP flood never takes a local
    publisher's slot); one peer's connections without a Hello are capped, and
    a Hello gives that slot back while the listener's slot stays held."""
    with contextlib.ExitStack() as held:
        for index in range(TCP_CONNECTION_COUNT_MAX):  # many addresses, each under its cap
            held.enter_context(gated.gate.connection_slot(Peer("tcp", address=f"10.2.0.{index}")))
        refusal = refused(gated.gate.connection_slot(Peer("tcp", address="10.3.0.1")))
        assert refusal.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert "TCP_CONNECTION_COUNT_MAX" in refusal.message
        with gated.gate.connection_slot(Peer("unix", uid=1000)):  # the Unix socket is not full
            assert gated.gate.statistics().connections_by_listener == {
                "unix": 1, "tcp": TCP_CONNECTION_COUNT_MAX}
    local = Peer("unix", uid=1000)
    with contextlib.ExitStack() as held:
        slots = [held.enter_context(gated.gate.connection_slot(local))
                 for _ in range(PEER_UNAUTHENTICATED_COUNT_MAX)]
        refusal = refused(gated.gate.connection_slot(local))
        assert "uid 1000" in refusal.message and "PEER_UNAUTHENTICATED_COUNT_MAX" in refusal.message
        with gated.gate.connection_slot(Peer("unix", uid=1001)):  # another uid is not held back
            pass
        slots[0].hello_received()
        slots[0].hello_received()  # idempotent
        with gated.gate.connection_slot(local):  # its pre-Hello slot came back
            assert gated.gate.statistics().unauthenticated == PEER_UNAUTHENTICATED_COUNT_MAX
    statistics = gated.gate.statistics()
    assert statistics.connections_open == 0 and statistics.unauthenticated == 0


async def test_refusals_answered_at_once_are_bounded_per_listener(gated):
    with contextlib.ExitStack() as held:
        answering = [held.enter_context(gated.gate.refusal_slot("tcp"))
                     for _ in range(REFUSAL_COUNT_MAX)]
        assert all(answering)
        with gated.gate.refusal_slot("tcp") as answered:
            assert not answered  # closed at once, no Error
        with gated.gate.refusal_slot("unix") as answered:
            assert answered
    with gated.gate.refusal_slot("tcp") as answered:
        assert answered
    assert gated.gate.statistics().refusals_unanswered == 1


async def test_a_tenant_holds_at_most_its_share_of_a_listener(make_gated):
    gated = make_gated()
    gated.gate.limits = lambda: ConnectionLimits(tcp_connections_max=4)
    with gated.admit(address="10.0.0.1"), gated.admit(address="10.0.0.2"):
        refusal = refused(gated.admit(address="10.0.0.3"))
        assert refusal.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert "2 connections open on the tcp listener" in refusal.message
        with gated.gate.admit(Peer("unix"), Hello(TENANT, b"", "gate-test"), lambda *a: None):
            pass  # the Unix listener's share is apart


async def test_tenant_creation_is_capped_per_peer(gated):
    gated.gate.limits = lambda: ConnectionLimits(peer_tenant_creations_max=2)
    local, other = Peer("unix", uid=1000), Peer("unix", uid=1001)
    for tenant_id in (100, 101):
        with gated.gate.admit(local, Hello(tenant_id, b"", "gate-test"), lambda *a: None):
            pass
    refusal = refused(gated.gate.admit(local, Hello(102, b"", "gate-test"), lambda *a: None))
    assert refusal.code == ErrorCode.UNKNOWN_TENANT
    assert "uid 1000 has created 2 tenants" in refusal.message
    assert not os.path.exists(os.path.join(gated.registry.data_dir, "tenant-102.ring"))
    with gated.gate.admit(local, Hello(100, b"", "gate-test"), lambda *a: None):
        pass  # an existing tenant is not a creation
    with gated.gate.admit(other, Hello(102, b"", "gate-test"), lambda *a: None):
        pass  # another peer has its own count


# -- publish and subscribe -------------------------------------------------------------


async def test_a_publish_batch_is_checked_for_the_role_then_its_records(gated):
    factory = RecordFactory(TENANT)
    with gated.admit() as admission:
        assert await gated.gate.admit_publish(admission, Publish(1, factory.records(4))) is None
        wrong = RecordFactory(TENANT + 1).records(2)
        refusal = await gated.gate.admit_publish(admission,
                                                 Publish(2, factory.records(1) + wrong))
        assert isinstance(refusal, ProtocolError) and refusal.code == ErrorCode.WRONG_TENANT
        assert refusal.batch_id == 2 and refusal.record_index == 1
        with pytest.raises(Refused) as caught:  # a publisher may not subscribe
            gated.gate.admit_subscribe(admission)
        assert caught.value.code == ErrorCode.FORBIDDEN
    with gated.admit(token=SUBSCRIBER) as admission:
        with pytest.raises(Refused) as caught:
            await gated.gate.admit_publish(admission, Publish(1, factory.records(1)))
        assert caught.value.code == ErrorCode.FORBIDDEN and "may not publish" in caught.value.message
        gated.gate.admit_subscribe(admission)
        assert admission.subscribed
    assert gated.gate.statistics().forbidden == 2  # counted once each, at the gate


async def test_reject_mode_refuses_a_batch_over_the_quota_and_counts_nothing_delayed(make_gated):
    quota = QuotaSettings(records_per_second=10, burst_records=10, mode="reject")
    gated = make_gated({TENANT: quota})
    factory = RecordFactory(TENANT)
    with gated.admit() as admission:
        assert await gated.gate.admit_publish(admission, Publish(1, factory.records(10))) is None
        refusal = await gated.gate.admit_publish(admission, Publish(2, factory.records(5)))
        assert refusal.code == ErrorCode.QUOTA_EXCEEDED and refusal.batch_id == 2
        too_big = await gated.gate.admit_publish(admission, Publish(3, factory.records(11)))
        assert "never fit" in too_big.message
    tenant = gated.gate.statistics().tenants[TENANT]
    assert tenant.paced and tenant.records_delayed == 0


async def test_subscriber_slots_are_capped_and_given_back(make_gated):
    gated = make_gated({TENANT: QuotaSettings(subscribers_max=2)})
    with gated.admit(token=SUBSCRIBER):  # opens the tenant
        with gated.gate.subscriber_slot(TENANT), gated.gate.subscriber_slot(TENANT):
            refusal = refused(gated.gate.subscriber_slot(TENANT))
            assert refusal.code == ErrorCode.TOO_MANY_SUBSCRIBERS
            assert gated.gate.statistics().tenants[TENANT].subscribers == 2
        with gated.gate.subscriber_slot(TENANT):
            assert gated.gate.statistics().tenants[TENANT].subscribers == 1
    tenant = gated.gate.statistics().tenants[TENANT]
    assert tenant.subscribers == 0
    assert SUBSCRIBER_COUNT_MAX >= 2


# -- reload ----------------------------------------------------------------------------


async def test_a_reload_revokes_exactly_the_connections_it_no_longer_allows(gated):
    with gated.admit(token=PUBLISHER) as publisher, \
            gated.admit(token=SUBSCRIBER, address="10.0.0.2") as subscriber:
        gated.gate.admit_subscribe(subscriber)
        # The subscriber's grant goes; the publisher's stays.
        only_publisher = {TENANT: grants()[TENANT][:1]}
        closed = gated.gate.reconfigure(AccessPolicy("socket_mode", only_publisher, ()), set())
        assert closed == 1
        assert [code for code, _ in gated.revoked] == [ErrorCode.AUTH_FAILED]
        assert publisher.access.allows(Role.PUBLISH)  # re-checked, still admitted
        closed = gated.gate.reconfigure(AccessPolicy("socket_mode", only_publisher, ()),
                                        {TENANT})
        assert closed == 2  # a removed tenant: both (the revoked one is still open)
        assert [code for code, _ in gated.revoked[1:]] == [ErrorCode.UNKNOWN_TENANT] * 2


async def test_a_reload_applies_new_quotas_to_admitted_tenants(gated):
    with gated.admit() as admission:
        assert not gated.gate.statistics().tenants[TENANT].paced
        gated.quotas[TENANT] = QuotaSettings(records_per_second=1, burst_records=1,
                                             mode="reject")
        assert gated.gate.reconfigure(AccessPolicy("socket_mode", grants(), ()), set()) == 0
        assert gated.gate.statistics().tenants[TENANT].paced
        factory = RecordFactory(TENANT)
        refusal = await gated.gate.admit_publish(admission, Publish(1, factory.records(2)))
        assert refusal.code == ErrorCode.QUOTA_EXCEEDED
