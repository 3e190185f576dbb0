"""Remote access over TCP with real TLS: certificates made in the test, a real daemon,
the Trio client and the `ringtail tail --connect` command."""

from __future__ import annotations

import subprocess

import pytest
import trio

from ringtail.service.auth import hash_token, new_token
from ringtail.service.client import Client, client_ssl_context
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import ErrorCode, Records
from tests.service.certificates import make_pki
from tests.service.conftest import (RINGTAIL, RecordFactory, read_all, split_records, tcp_port,
                                    write_config)

TIMEOUT_S = 30.0
TENANT, OTHER = 3, 4
READER, WRITER = new_token(), new_token()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(tmp_path, pki, client_ca: bool = False) -> str:
    return write_config(tmp_path, f"""
        tcp_listen = "127.0.0.1:0"
        tls_cert = "{pki.server_cert}"
        tls_key = "{pki.server_key}"
        {f'tls_client_ca = "{pki.ca}"' if client_ca else ''}
        [tenants.{TENANT}]
        grants = [{{ token = "{hash_token(READER)}", roles = ["subscribe"] }},
                  {{ token = "{hash_token(WRITER)}", roles = ["publish"] }}]
        [tenants.{OTHER}]
        """)


async def remote_records(port: int, tenant_id: int, token: str, context) -> list[bytes]:
    records = []
    async with await Client.connect_tcp("127.0.0.1", port, tenant_id, token=token,
                                        ssl_context=context) as client:
        async for event in client.subscribe("oldest"):
            if isinstance(event, Records):
                records.extend(split_records(event.records))
    return records


async def test_remote_tail_over_tls_matches_the_local_one(daemon, tmp_path, pki):
    server = daemon(config=tls_config(tmp_path, pki), io="threads", sync="none")
    port = tcp_port(server)
    context = client_ssl_context(pki.ca)
    records = RecordFactory(TENANT).records(50)
    with trio.fail_after(TIMEOUT_S):
        # A remote peer publishes only because its token grants it.
        async with await Client.connect_tcp("127.0.0.1", port, TENANT, token=WRITER,
                                            ssl_context=context) as client:
            await client.publish(records)
        async with await Client.connect_tcp("127.0.0.1", port, TENANT, token=READER,
                                            ssl_context=context) as client:
            with pytest.raises(RingtailError, match=r"may not publish") as refused:
                await client.publish(RecordFactory(TENANT, seed=9).records(1))
            assert refused.value.code == ErrorCode.FORBIDDEN
        # The writer token cannot read, and no token reaches the other tenant.
        with pytest.raises(RingtailError, match=r"may not subscribe"):
            await remote_records(port, TENANT, WRITER, context)
        with pytest.raises(RingtailError, match=r"grant nothing on tenant 4") as refused:
            await remote_records(port, OTHER, READER, context)
        assert refused.value.code == ErrorCode.FORBIDDEN
        assert b"".join(await remote_records(port, TENANT, READER, context)) == records
    local = await read_all(server.socket_path, TENANT)
    assert local.data == records
    # The command line: `ringtail tail --connect` prints what the local tail prints.
    remote = await trio.run_process(
        [RINGTAIL, "tail", "--connect", f"127.0.0.1:{port}", "--token", READER, "--ca",
         pki.ca, "--tenant", str(TENANT), "--format", "raw"], capture_stdout=True,
        capture_stderr=True)
    assert remote.stdout == records, remote.stderr
    # `ringtail publish --connect --raw`: the writer token publishes over TLS.
    more = RecordFactory(TENANT, seed=5).records(20)
    published = await trio.run_process(
        [RINGTAIL, "publish", "--connect", f"127.0.0.1:{port}", "--token", WRITER, "--ca",
         pki.ca, "--tenant", str(TENANT), "--raw"], stdin=more, capture_stdout=True,
        capture_stderr=True, check=False)
    assert published.returncode == 0, published.stderr
    assert b"acknowledged 20 records: sequences 50..69" in published.stdout
    assert (await read_all(server.socket_path, TENANT)).data == records + more
    refused_publish = await trio.run_process(
        [RINGTAIL, "publish", "--connect", f"127.0.0.1:{port}", "--token", READER, "--ca",
         pki.ca, "--tenant", str(TENANT), "--raw"], stdin=more, capture_stdout=True,
        capture_stderr=True, check=False)
    assert refused_publish.returncode == 1
    assert b"may not publish" in refused_publish.stderr, refused_publish.stderr
    untrusted = await trio.run_process(
        [RINGTAIL, "tail", "--connect", f"127.0.0.1:{port}", "--token", READER,
         "--tenant", str(TENANT)], capture_stdout=True, capture_stderr=True, check=False)
    assert untrusted.returncode == 1
    assert b"CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr


async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(daemon, tmp_path, pki):
    server = daemon(config=tls_config(tmp_path, pki, client_ca=True), io="threads")
    port = tcp_port(server)
    assert "(mtls)" in server.run_stderr
    records = RecordFactory(TENANT).records(5)
    with trio.fail_after(TIMEOUT_S):
        for context in (client_ssl_context(pki.ca),  # no certificate
                        client_ssl_context(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)):
            with pytest.raises(RingtailError, match=r"(?i)certificate|alert|connection lost"):
                async with await Client.connect_tcp("127.0.0.1", port, TENANT, token=WRITER,
                                                    ssl_context=context) as client:
                    await client.publish(records)
        trusted = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
        async with await Client.connect_tcp("127.0.0.1", port, TENANT, token=WRITER,
                                            ssl_context=trusted) as client:
            ack = await client.publish(records)
        # A trusted certificate is not enough without a valid token.
        with pytest.raises(RingtailError, match=r"token is not valid") as refused:
            await Client.connect_tcp("127.0.0.1", port, TENANT, token=new_token(),
                                     ssl_context=trusted)
        assert refused.value.code == ErrorCode.AUTH_FAILED
    assert ack.first_sequence == 0
    assert (await read_all(server.socket_path, TENANT)).data == records
    await server.await_stderr("TLS handshake with 127.0.0.1 failed")


def test_tls_without_certificate_files_is_refused_naming_the_key(daemon, tmp_path):
    config = write_config(tmp_path, """
        tcp_listen = "127.0.0.1:0"
        """)
    server = daemon(config=config, wait=False)
    assert server.wait() == 2
    assert "tcp_listen is set, so TCP uses TLS and tls_cert is required" in server.stderr


def test_token_new_prints_a_token_and_a_config_line_with_only_its_hash():
    result = subprocess.run([RINGTAIL, "token", "new", "--tenant", "7", "--role",
                             "publish,subscribe"], capture_output=True, text=True, check=True)
    token, line = result.stdout.splitlines()
    assert token.startswith("rt_") and len(token) == 46
    assert line == (f'{{ token = "{hash_token(token)}", roles = ["publish", "subscribe"] }},')
    assert token not in line
    assert "grants = [...] of [tenants.7]" in result.stderr
