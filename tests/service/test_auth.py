"""Access control with real daemons: SO_PEERCRED allow-lists, bearer tokens, roles,
tenant isolation, the per-peer failure limit, and the connection limit.

Unix peers are told apart by their gid: the tests run as root and switch their
effective gid for the connect() (SO_PEERCRED reports it), so no other user
account is needed.
"""

from __future__ import annotations

import os

import pytest
import trio

from ringtail.service.auth import AUTH_FAILURE_COUNT_MAX, hash_token, new_token
from ringtail.service.client import Client
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import ErrorCode, Records
from tests.service.conftest import (RecordFactory, connect_as_gid, read_all, split_records,
                                    tcp_port, write_config)

TIMEOUT_S = 30.0
GID_A, GID_B, GID_ADMIN, GID_NOBODY = 61001, 61002, 61003, 61009
TENANT_A, TENANT_B = 1, 2
CAPACITY = 128  # the smallest ring: easy to overflow


def peercred_config(tmp_path, extra: str = "") -> str:
    return write_config(tmp_path, f"""
        unix_auth = "peercred"
        admins = [{{ gid = {GID_ADMIN} }}]
        create_tenants = false
        {extra}
        [tenants.{TENANT_A}]
        name = "a"
        capacity = {CAPACITY}
        grants = [{{ gid = {GID_A}, roles = ["publish", "subscribe"] }}]
        [tenants.{TENANT_B}]
        name = "b"
        capacity = {CAPACITY}
        grants = [{{ gid = {GID_B}, roles = ["publish", "subscribe"] }}]
        """)


async def replay_as(socket_path: str, tenant_id: int, gid: int) -> list[bytes]:
    records = []
    async with await connect_as_gid(socket_path, tenant_id, gid) as client:
        async for event in client.subscribe("oldest"):
            if isinstance(event, Records):
                records.extend(split_records(event.records))
    return records


async def test_unix_tenant_cannot_use_another_tenant_and_overflow_stays_in_its_ring(
        daemon, tmp_path):
    server = daemon(config=peercred_config(tmp_path), io="threads", sync="none")
    path = server.socket_path
    factory_a, factory_b = RecordFactory(TENANT_A, seed=1), RecordFactory(TENANT_B, seed=2)
    with trio.fail_after(TIMEOUT_S):
        # A may not say Hello as B, to publish or to subscribe.
        with pytest.raises(RingtailError, match=r"grant nothing on tenant 2") as refused:
            await connect_as_gid(path, TENANT_B, GID_A)
        assert refused.value.code == ErrorCode.FORBIDDEN and refused.value.fatal
        # On its own connection, A cannot slip B's records in either.
        async with await connect_as_gid(path, TENANT_A, GID_A) as client:
            with pytest.raises(RingtailError) as wrong:
                await client.publish(factory_b.records(1))
            assert wrong.value.code == ErrorCode.WRONG_TENANT
        b_records = factory_b.records(100)
        async with await connect_as_gid(path, TENANT_B, GID_B) as client:
            await client.publish(b_records)
        # A overflows its own ring several times over.
        async with await connect_as_gid(path, TENANT_A, GID_A) as client:
            for _ in range(5):
                ack = await client.publish(factory_a.records(100))
        assert ack.last_sequence == 499
        # B's records are all there; A's ring kept only its capacity.
        assert b"".join(await replay_as(path, TENANT_B, GID_B)) == b_records
        a_replay = await replay_as(path, TENANT_A, GID_A)
        assert len(a_replay) <= CAPACITY
        # An admin reads both.
        assert b"".join(await replay_as(path, TENANT_B, GID_ADMIN)) == b_records
        assert await replay_as(path, TENANT_A, GID_ADMIN) == a_replay


async def test_unix_peer_in_no_allow_list_is_refused(daemon, tmp_path):
    server = daemon(config=peercred_config(tmp_path), io="threads")
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(RingtailError, match=rf"peer uid 0 gid {GID_NOBODY} is in no "
                                                r"allow-list") as refused:
            await connect_as_gid(server.socket_path, TENANT_A, GID_NOBODY)
    assert refused.value.code == ErrorCode.AUTH_FAILED
    await server.await_stderr("authentication failed: uid 0, tenant 1")


async def test_subscribe_only_grant_cannot_publish(daemon, tmp_path):
    config = write_config(tmp_path, f"""
        unix_auth = "peercred"
        [tenants.5]
        grants = [{{ gid = {GID_A}, roles = ["subscribe"] }}]
        """)
    server = daemon(config=config, io="threads")
    with trio.fail_after(TIMEOUT_S):
        async with await connect_as_gid(server.socket_path, 5, GID_A) as client:
            with pytest.raises(RingtailError, match=r"may not publish on tenant 5") as refused:
                await client.publish(RecordFactory(5).records(1))
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert await replay_as(server.socket_path, 5, GID_A) == []


# -- tokens over TCP (plain, loopback: TLS has its own tests) ----------------------------

TOKEN_A, TOKEN_B, TOKEN_OLD = new_token(), new_token(), new_token()


def token_config(tmp_path) -> str:
    return write_config(tmp_path, f"""
        tcp_listen = "127.0.0.1:0"
        tcp_plaintext = true
        [tenants.{TENANT_A}]
        grants = [{{ token = "{hash_token(TOKEN_A)}", roles = ["publish", "subscribe"] }},
                  {{ token = "{hash_token(TOKEN_OLD)}", roles = ["subscribe"], expires = 2020-01-01T00:00:00Z }}]
        [tenants.{TENANT_B}]
        grants = [{{ token = "{hash_token(TOKEN_B)}", roles = ["subscribe"] }}]
        """)


async def connect_tcp(port: int, tenant_id: int, token: str) -> Client:
    return await Client.connect_tcp("127.0.0.1", port, tenant_id, token=token, plaintext=True)


async def test_tokens_over_tcp_are_checked_per_tenant_and_role(daemon, tmp_path):
    server = daemon(config=token_config(tmp_path), io="threads")
    port = tcp_port(server)
    records = RecordFactory(TENANT_A).records(3)
    with trio.fail_after(TIMEOUT_S):
        cases = [(TENANT_A, new_token(), ErrorCode.AUTH_FAILED, r"token is not valid"),
                 (TENANT_A, TOKEN_OLD, ErrorCode.AUTH_FAILED, r"token expired at 2020-01-01"),
                 (TENANT_B, TOKEN_A, ErrorCode.FORBIDDEN, r"grant nothing on tenant 2"),
                 # Not "peer uid None gid None is in no allow-list" (issue 9, item 18).
                 (TENANT_A, "", ErrorCode.AUTH_FAILED,
                  r"^AUTH_FAILED: a token is required on TCP \(peer 127\.0\.0\.1 sent none\); pass --token")]
        for tenant_id, token, code, message in cases:
            with pytest.raises(RingtailError, match=message) as refused:
                await connect_tcp(port, tenant_id, token)
            assert refused.value.code == code
        async with await connect_tcp(port, TENANT_A, TOKEN_A) as client:
            ack = await client.publish(records)
        async with await connect_tcp(port, TENANT_B, TOKEN_B) as client:  # read-only token
            with pytest.raises(RingtailError, match=r"may not publish on tenant 2") as refused:
                await client.publish(RecordFactory(TENANT_B).records(1))
            assert refused.value.code == ErrorCode.FORBIDDEN
    assert ack.first_sequence == 0
    # Locally (unix_auth = "socket_mode": the socket's mode is the access control).
    assert (await read_all(server.socket_path, TENANT_A)).data == records
    assert (await read_all(server.socket_path, TENANT_B)).records == []


async def test_failed_authentication_is_rate_limited_per_peer(daemon, tmp_path):
    server = daemon(config=token_config(tmp_path), io="threads")
    port = tcp_port(server)
    with trio.fail_after(TIMEOUT_S):
        for _ in range(AUTH_FAILURE_COUNT_MAX):
            with pytest.raises(RingtailError, match=r"token is not valid"):
                await connect_tcp(port, TENANT_A, new_token())
        # Now even the right token is refused from this address, unchecked...
        with pytest.raises(RingtailError, match=r"too many failed authentications from "
                                                r"address 127\.0\.0\.1") as refused:
            await connect_tcp(port, TENANT_A, TOKEN_A)
        assert refused.value.code == ErrorCode.AUTH_FAILED
        # ...while other peers (the local socket) are not affected.
        async with await Client.connect(server.socket_path, TENANT_A) as client:
            await client.publish(RecordFactory(TENANT_A).records(1))


def test_plain_tcp_off_loopback_is_refused_at_start(daemon, tmp_path):
    config = write_config(tmp_path, """
        tcp_listen = "0.0.0.0:0"
        tcp_plaintext = true
        """)
    server = daemon(config=config, wait=False)
    assert server.wait() == 2
    assert "tcp_plaintext = true with tcp_listen = '0.0.0.0:0'" in server.stderr
    assert "only on a loopback address" in server.stderr
    assert not os.path.exists(server.socket_path)


async def test_connection_flood_stops_at_the_tenant_limit_and_others_keep_working(
        daemon, tmp_path):
    config = write_config(tmp_path, f"""
        [tenants.{TENANT_A}]
        connections_max = 4
        """)
    server = daemon(config=config, io="threads")
    factory = RecordFactory(TENANT_A)
    async with trio.open_nursery() as nursery:
        clients = []
        with trio.fail_after(TIMEOUT_S):
            for _ in range(4):
                clients.append(await Client.connect(server.socket_path, TENANT_A))
            refused = []
            for _ in range(50):  # the flood
                try:
                    await Client.connect(server.socket_path, TENANT_A)
                except RingtailError as error:
                    refused.append(error)
            assert len(refused) == 50
            assert {error.code for error in refused} == {ErrorCode.TOO_MANY_CONNECTIONS}
            assert "has 4 connections open (its connections_max)" in str(refused[0])
            # The four admitted connections keep working, and so does another tenant.
            acks = [await client.publish(factory.records(2)) for client in clients]
            async with await Client.connect(server.socket_path, TENANT_B) as other:
                await other.publish(RecordFactory(TENANT_B).records(1))
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert [ack.first_sequence for ack in acks] == [0, 2, 4, 6]
