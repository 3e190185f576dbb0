"""SIGHUP: a new config applies whole (tenants, tokens, quotas) without touching
connections it did not change; a config that fails validation is refused whole."""

from __future__ import annotations

import signal

import pytest
import trio

from ringtail.service.auth import hash_token, new_token
from ringtail.service.client import Client
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import ErrorCode
from tests.service.conftest import RecordFactory, read_all, tcp_port, write_config

TIMEOUT_S = 30.0
PUBLISHER_TOKEN, OLD_TOKEN, NEW_TOKEN, ADDED_TOKEN = (new_token() for _ in range(4))


def config_text(tenant_2_token: str, tenant_3: bool) -> str:
    added = f"""
        [tenants.3]
        grants = [{{ token = "{hash_token(ADDED_TOKEN)}", roles = ["publish", "subscribe"] }}]
        """ if tenant_3 else ""
    return f"""
        tcp_listen = "127.0.0.1:0"
        tcp_plaintext = true
        [tenants.1]
        grants = [{{ token = "{hash_token(PUBLISHER_TOKEN)}", roles = ["publish"] }}]
        [tenants.2]
        grants = [{{ token = "{hash_token(tenant_2_token)}", roles = ["publish", "subscribe"] }}]
        """ + added


async def connect(port: int, tenant_id: int, token: str) -> Client:
    return await Client.connect_tcp("127.0.0.1", port, tenant_id, token=token, plaintext=True)


async def test_sighup_adds_a_tenant_and_rotates_a_token_while_a_publisher_goes_on(
        daemon, tmp_path):
    path = write_config(tmp_path, config_text(OLD_TOKEN, tenant_3=False))
    server = daemon(config=path, io="threads", sync="none")
    port = tcp_port(server)
    reloaded = trio.Event()
    published: list = []
    factory = RecordFactory(1)

    publishing = trio.Event()

    async def publisher():
        # One connection across the reload; it must never see an error. Each
        # ack is noted with whether the reload had finished when it arrived.
        async with await connect(port, 1, PUBLISHER_TOKEN) as client:
            published.append((await client.publish(factory.records(4)), reloaded.is_set()))
            publishing.set()
            while not reloaded.is_set():
                published.append((await client.publish(factory.records(4)), reloaded.is_set()))
            for _ in range(20):
                published.append((await client.publish(factory.records(4)), reloaded.is_set()))

    with trio.fail_after(TIMEOUT_S):
        old_session = await connect(port, 2, OLD_TOKEN)
        with pytest.raises(RingtailError, match=r"token is not valid"):
            await connect(port, 3, ADDED_TOKEN)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            await publishing.wait()  # the connection is acknowledged before the reload
            write_config(tmp_path, config_text(NEW_TOKEN, tenant_3=True))
            server.send_signal(signal.SIGHUP)
            await server.await_stderr("reloaded config: tenants added [3], removed none; "
                                      "1 connections closed")
            reloaded.set()
        # The rotated token is refused, on new connections and on the open one.
        with pytest.raises(RingtailError, match=r"token is not valid") as refused:
            await connect(port, 2, OLD_TOKEN)
        assert refused.value.code == ErrorCode.AUTH_FAILED
        with pytest.raises(RingtailError, match=r"credentials revoked by a reload") as revoked:
            await old_session.publish(RecordFactory(2).records(1))
        assert revoked.value.code == ErrorCode.AUTH_FAILED and revoked.value.fatal
        await old_session.aclose()
        async with await connect(port, 2, NEW_TOKEN) as client:
            await client.publish(RecordFactory(2).records(1))
        async with await connect(port, 3, ADDED_TOKEN) as client:
            ack = await client.publish(RecordFactory(3).records(2))
        assert ack.last_sequence == 1
    acks = [ack for ack, _ in published]
    # The same connection was acknowledged before the reload and after it.
    after_reload = [after for _, after in published]
    assert after_reload[0] is False, "the publisher's first ack must precede the reload"
    assert after_reload == sorted(after_reload)
    assert after_reload.count(True) >= 20, after_reload
    assert [ack.first_sequence for ack in acks] == list(range(0, 4 * len(acks), 4))
    assert len((await read_all(server.socket_path, 1)).records) == 4 * len(acks)


async def test_sighup_with_an_invalid_config_keeps_the_old_one(daemon, tmp_path):
    path = write_config(tmp_path, config_text(OLD_TOKEN, tenant_3=False))
    server = daemon(config=path, io="threads")
    port = tcp_port(server)
    write_config(tmp_path, config_text(NEW_TOKEN, tenant_3=False).replace(
        "[tenants.2]", "[tenants.2]\nquota_mode = \"sometimes\""))
    server.send_signal(signal.SIGHUP)
    await server.await_stderr("reload refused, the running config stays")
    assert "tenants.2.quota_mode = 'sometimes'; use one of ('slow', 'reject')" in server.run_stderr
    with trio.fail_after(TIMEOUT_S):
        async with await connect(port, 2, OLD_TOKEN) as client:  # still the old tokens
            await client.publish(RecordFactory(2).records(1))
        with pytest.raises(RingtailError, match=r"token is not valid"):
            await connect(port, 2, NEW_TOKEN)
    assert server.alive
