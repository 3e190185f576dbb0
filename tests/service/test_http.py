"""service/http.py over real sockets, no browser: the routes a scraper uses, the
bounds on what a peer may send, and the web API's access rules and event
streams against a real daemon process.

Timeouts (slow-loris, a stalled reader) are checked in Trio's virtual time
(pytest-trio's `autojump_clock`): the clock jumps when every task, the test's
own socket reads included, is waiting, so the test waits on events, never on
wall-clock sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ringtail.service.client import Client
from ringtail.service.http import (HTTP_BODY_SIZE_BYTES_MAX, HTTP_CONNECTION_COUNT_MAX,
                                   HTTP_HEAD_SIZE_BYTES_MAX, HTTP_KEEP_ALIVE_TIMEOUT_S,
                                   HTTP_REQUEST_TIMEOUT_S, HTTP_SEND_STALL_TIMEOUT_S, HttpServer,
                                   StreamResponse, text)
from ringtail.service.web import WEB_HISTORY_RECORD_COUNT_MAX
from tests.service.certificates import make_pki
from tests.service.conftest import DaemonProcess, RecordFactory, short_socket_dir, write_config

TIMEOUT_S = 30.0  # hang guard for the real-daemon tests
TOKEN_A, TOKEN_B = "rt_web_reader_a", "rt_web_reader_b"
TOKEN_ADMIN = "rt_web_admin"


# -- an in-process server over a real socket --------------------------------------------


async def hello_handler(request):
    if request.path == "/hello":
        return text(200, f"hello {request.query.get('name', '')}")
    return None


async def start_server(nursery, handlers=(hello_handler,)) -> tuple[HttpServer, int]:
    server = HttpServer(list(handlers))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(HTTP_CONNECTION_COUNT_MAX)
    port = sock.getsockname()[1]
    await nursery.start(server.serve, sock)
    return server, port


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_until_closed(stream)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_get_keep_alive_head_405_404(nursery):
    server, port = await start_server(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        # Two requests on one connection (keep-alive), answered in order.
        await stream.send_all(b"GET /hello?name=a HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"GET /hello?name=b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await read_until_closed(stream)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.index(b"hello a") < data.index(b"hello b")
    head = await exchange(port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 7" in head.lower()
    assert head.endswith(b"\r\n\r\n")  # headers only
    post = await exchange(port, b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
    assert status_of(post) == 405 and b"allow: get, head" in post.lower()
    missing = await exchange(port, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(missing) == 404 and b"/metrics" in missing
    assert server.stats.connections_total == 4


@pytest.mark.parametrize("request_bytes", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
], ids=["garbage", "header-without-colon", "negative-length", "no-host"])
async def test_malformed_requests_get_400_and_close(nursery, request_bytes):
    server, port = await start_server(nursery)
    response = await exchange(port, request_bytes)
    assert status_of(response) == 400, response
    assert b"connection: close" in response.lower()
    assert server.stats.bad_requests == 1


async def test_an_oversized_head_gets_431_without_unbounded_buffering(nursery):
    server, port = await start_server(nursery)
    filler = b"x" * 1000
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, filler)
                       for i in range(HTTP_HEAD_SIZE_BYTES_MAX // len(filler) + 2))
    response = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(response) == 431
    assert b"HTTP_HEAD_SIZE_BYTES_MAX" in response


async def test_an_oversized_body_gets_413(nursery):
    server, port = await start_server(nursery)
    size = HTTP_BODY_SIZE_BYTES_MAX + 1
    response = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                              % size + b"b" * size)
    assert status_of(response) == 413 and b"HTTP_BODY_SIZE_BYTES_MAX" in response


async def test_slow_loris_is_answered_408_after_the_request_timeout(nursery, autojump_clock):
    server, port = await start_server(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        start = trio.current_time()
        await stream.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and no more
        response = await read_until_closed(stream)
        waited = trio.current_time() - start
    assert status_of(response) == 408 and b"HTTP_REQUEST_TIMEOUT_S" in response
    assert HTTP_REQUEST_TIMEOUT_S <= waited < HTTP_REQUEST_TIMEOUT_S + HTTP_KEEP_ALIVE_TIMEOUT_S
    assert server.stats.bad_requests == 1


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(nursery, autojump_clock):
    server, port = await start_server(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        start = trio.current_time()
        assert await read_until_closed(stream) == b""  # closed quietly, nothing sent
        assert trio.current_time() - start == pytest.approx(HTTP_KEEP_ALIVE_TIMEOUT_S)
    assert server.stats.bad_requests == 0


async def test_past_the_connection_cap_a_peer_gets_503(nursery):
    server, port = await start_server(nursery)
    held = []
    for _ in range(HTTP_CONNECTION_COUNT_MAX):
        held.append(await trio.open_tcp_stream("127.0.0.1", port))
    await trio.testing.wait_all_tasks_blocked()  # every held connection was accepted
    assert server.stats.connections == HTTP_CONNECTION_COUNT_MAX
    response = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 503 and b"HTTP_CONNECTION_COUNT_MAX" in response
    assert server.stats.refused_busy == 1
    for stream in held:
        await stream.aclose()


async def test_a_peer_that_stops_reading_a_stream_is_dropped(nursery, autojump_clock):
    ended = trio.Event()

    async def endless(request):
        async def stream(write):
            try:
                while True:
                    await write(b"data: " + b"x" * 65536 + b"\n\n")
            finally:
                ended.set()
        return StreamResponse(stream)

    server, port = await start_server(nursery, [endless])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        start = trio.current_time()
        await ended.wait()  # the writer filled the socket buffers, then stalled
        assert trio.current_time() - start >= HTTP_SEND_STALL_TIMEOUT_S
    assert server.stats.stalled == 1


async def test_a_peer_that_resets_mid_stream_leaves_the_listener_serving(nursery):
    ended = trio.Event()

    async def events(request):
        if request.path != "/events":
            return await hello_handler(request)

        async def stream(write):
            try:
                await write(b"event: hello\ndata: {}\n\n")
                await trio.sleep_forever()  # until the peer goes
            finally:
                ended.set()
        return StreamResponse(stream)

    server, port = await start_server(nursery, [events])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"event: hello" not in received:
        received += await stream.receive_some(65536)
    # Close with a reset (SO_LINGER 0), as a browser tab that is killed.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    await stream.aclose()
    await ended.wait()
    again = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(again) == 200
    assert server.stats.handler_errors == 0


async def test_a_handler_bug_is_a_500_and_the_server_goes_on(nursery):
    async def broken(request):
        if request.path == "/broken":
            raise RuntimeError("a bug")
        return None

    server, port = await start_server(nursery, [broken, hello_handler])
    response = await exchange(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 500
    again = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(again) == 200 and server.stats.handler_errors == 1


# -- a real daemon ------------------------------------------------------------------------


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


WEB_CONFIG = f"""
    create_tenants = true
    admins = [{{ token = "{token_hash(TOKEN_ADMIN)}" }}]
    [tenants.7]
    name = "trainer"
    capacity = 1024
    grants = [{{ token = "{token_hash(TOKEN_A)}", roles = ["subscribe"] }}]
    [tenants.8]
    capacity = 1024
    grants = [{{ token = "{token_hash(TOKEN_B)}", roles = ["subscribe"] }}]
"""


@pytest.fixture
def web_daemon(tmp_path):
    """Factory: a `ringtail serve --http HOST:0` process with tenants 7 (token A) and 8 (B)."""
    started = []

    def start(listen: str = "127.0.0.1:0", extra: str = "",
              tables: str = "") -> tuple[DaemonProcess, str]:
        config = write_config(tmp_path, extra + WEB_CONFIG + tables)
        process = DaemonProcess(os.fspath(tmp_path / "data"),
                                os.path.join(short_socket_dir(tmp_path), "web.sock"),
                                {"config": config, "http": listen, "io": "threads"},
                                cwd=os.fspath(tmp_path))
        started.append(process)
        process.start()
        url = process.run_stderr.split("metrics listening on ", 1)[1].split()[0]
        return process, url

    yield start
    for process in started:
        process.close()


def http_request(url: str, path: str, token: str | None = None, method: str = "GET",
                 context: ssl.SSLContext | None = None, read_bytes: int | None = None):
    """(status, headers, body) with the standard library; `read_bytes` stops a stream."""
    import http.client
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context,
                                                 timeout=TIMEOUT_S)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read(read_bytes) if read_bytes else response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def stream_events(url: str, path: str, token: str, until) -> list[tuple[str, object]]:
    """Read an event stream until `until(events)` holds (the socket timeout is the hang guard)."""
    import http.client
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        data = b""
        while chunk := response.read1(65536):
            data += chunk
            events = parse_events(data)
            if until(events):
                return events
        raise AssertionError(f"the stream ended first: {parse_events(data)}")
    finally:
        connection.close()


def rows_of(events) -> list[list]:
    return [row for name, payload in events if name == "records" for row in payload]


def rows_through(sequence: int):
    return lambda events: any(row[0] == sequence for row in rows_of(events))


def parse_events(data: bytes) -> list[tuple[str, object]]:
    events = []
    for block in data.decode().split("\n\n")[:-1]:  # the last one may be cut short
        name = data_line = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data_line = line[6:]
        if name and data_line:
            events.append((name, json.loads(data_line)))
    return events


async def publish(socket_path: str, tenant_id: int, batches: list[bytes]):
    async with await Client.connect(socket_path, tenant_id) as client:
        return await client.publish_many(batches)


def test_metrics_health_and_readiness_are_unchanged(web_daemon):
    process, url = web_daemon()
    status, headers, body = http_request(url, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = http_request(url, "/readyz")
    assert (status, body) == (200, b"ready\n")
    status, headers, body = http_request(url, "/metrics")
    assert status == 200 and headers["content-type"] == CONTENT_TYPE_LATEST
    assert b"ringtail_ready 1.0" in body
    status, headers, body = http_request(url, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_the_web_api_wants_a_bearer_token_and_the_subscribe_role(web_daemon):
    process, url = web_daemon()
    trio.run(publish, process.socket_path, 7, [RecordFactory(7).records(3)])
    trio.run(publish, process.socket_path, 8, [RecordFactory(8).records(3)])
    status, headers, body = http_request(url, "/api/tenants")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, body = http_request(url, "/api/tenants", token="rt_not_a_token")
    assert status == 401 and b"not valid" in body
    for path in ("/api/tenants", "/api/tenants/7/records"):
        status, _, body = http_request(url, path, token="x" * 300)
        assert status == 401 and b"TOKEN_SIZE_BYTES_MAX" in body
    # Tenant 8 with token A: refused whether or not it exists; 9 is not open.
    status, _, body = http_request(url, "/api/tenants/8/records", token=TOKEN_A)
    assert status == 403 and b"tenant 8" in body
    status, _, body = http_request(url, "/api/tenants/9/records", token=TOKEN_A)
    assert status == 404
    # The list shows tenant 7 only.
    status, headers, body = http_request(url, "/api/tenants", token=TOKEN_A, read_bytes=200)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = stream_events(url, "/api/tenants", TOKEN_B,
                           lambda events: any(name == "tenants" for name, _ in events))
    assert [tenant["id"] for tenant in events[0][1]["tenants"]] == [8]
    events = stream_events(url, "/api/tenants", TOKEN_ADMIN,
                           lambda events: any(name == "tenants" for name, _ in events))
    assert [tenant["id"] for tenant in events[0][1]["tenants"]] == [7, 8]
    # The pages themselves hold no data and need no token.
    status, headers, body = http_request(url, "/tenants/8")
    assert status == 200 and b"app.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]


def test_the_tenant_list_shows_only_readable_tenants_with_failures_seen(web_daemon):
    process, url = web_daemon()
    factory = RecordFactory(7, seed=3)
    records = [factory.slot_record() for _ in range(40)]
    failures = sum(record.has_failure_evidence for record in records)
    assert 0 < failures < 40
    trio.run(publish, process.socket_path, 7, [b"".join(r.encode() for r in records)])
    trio.run(publish, process.socket_path, 8, [RecordFactory(8).records(3)])
    events = stream_events(url, "/api/tenants", TOKEN_A,
                           lambda events: any(name == "tenants" for name, _ in events))
    name, payload = events[0]
    assert name == "tenants"
    assert [tenant["id"] for tenant in payload["tenants"]] == [7]
    tenant = payload["tenants"][0]
    assert (tenant["name"], tenant["next"], tenant["oldest"], tenant["capacity"]) == (
        "trainer", 40, 0, 1024)
    assert tenant["failures"] == failures and tenant["failures_exact"] is True
    assert tenant["fill"] == pytest.approx(40 / 1024)


def test_the_failure_count_of_a_busy_tenant_catches_up_within_its_read_bound(web_daemon):
    from ringtail.service.web import WEB_FAILURE_SCAN_RECORD_COUNT_MAX
    total = WEB_FAILURE_SCAN_RECORD_COUNT_MAX + 3000
    process, url = web_daemon(tables=f"""
        [tenants.9]
        capacity = {64 * 1024}
        grants = [{{ token = "{token_hash(TOKEN_A)}", roles = ["subscribe"] }}]
    """)
    factory = RecordFactory(9, seed=4)
    records = [factory.slot_record() for _ in range(total)]
    failures = sum(record.has_failure_evidence for record in records)
    data = b"".join(record.encode() for record in records)
    trio.run(publish, process.socket_path, 9, [data[i:i + 64 * 4096]
                                               for i in range(0, len(data), 64 * 4096)])
    events = stream_events(url, "/api/tenants", TOKEN_A, lambda events: any(
        tenant["id"] == 9 and tenant["failures_behind"] == 0
        for name, payload in events if name == "tenants" for tenant in payload["tenants"]))
    counts = [(tenant["failures"], tenant["failures_behind"])
              for name, payload in events if name == "tenants"
              for tenant in payload["tenants"] if tenant["id"] == 9]
    assert counts[0][1] == total - WEB_FAILURE_SCAN_RECORD_COUNT_MAX  # one bounded read
    assert counts[-1] == (failures, 0)


def test_a_tail_stream_is_history_then_filtered_records(web_daemon):
    process, url = web_daemon()
    factory = RecordFactory(7, seed=5)
    records = [factory.slot_record(opcode=i % 3, epoch=i // 10) for i in range(30)]
    trio.run(publish, process.socket_path, 7, [b"".join(r.encode() for r in records)])

    def tail(query: str, expected: list[int]) -> list[tuple[str, object]]:
        events = stream_events(url, f"/api/tenants/7/records?{query}", TOKEN_A,
                               rows_through(expected[-1]))
        assert events[0][0] == "hello"
        assert [row[0] for row in rows_of(events)] == expected
        return events

    events = tail("history=30", list(range(30)))
    assert events[0][1]["start"] == 0 and events[0][1]["name"] == "trainer"
    assert [row[11] for row in rows_of(events)] == [r.has_failure_evidence for r in records]
    assert [row[3] for row in rows_of(events)] == [r.opcode for r in records]
    tail("history=30&opcodes=2&epoch_min=1&epoch_max=1",
         [i for i in range(30) if i % 3 == 2 and i // 10 == 1])
    tail("history=30&failure_only=1", [i for i, r in enumerate(records) if r.has_failure_evidence])
    tail("history=4", [26, 27, 28, 29])
    tail("from=25", [25, 26, 27, 28, 29])  # a resume: from there on, nothing before
    for query, name in (("opcodes=x", b"opcodes"), ("opcodes=%C2%B2", b"opcodes"),
                        ("epoch_min=%C2%B2", b"epoch_min"), ("epoch_max=-1", b"epoch_max"),
                        ("epoch_min=5&epoch_max=4", b"epoch_min 5 > epoch_max 4"),
                        ("opcodes=4294967296", b"opcodes")):
        status, _, body = http_request(url, f"/api/tenants/7/records?{query}", token=TOKEN_A)
        assert status == 400 and name in body, (query, status, body)
    status, _, body = http_request(url, f"/api/tenants/7/records?history="
                                        f"{WEB_HISTORY_RECORD_COUNT_MAX + 1}", token=TOKEN_A)
    assert status == 400 and b"history" in body
    status, _, body = http_request(url, "/api/tenants/7/records?from=31", token=TOKEN_A)
    assert status == 400 and b"next sequence 30" in body


async def test_a_stalled_page_gets_a_gap_and_never_slows_publishers(web_daemon):
    process, url = await trio.to_thread.run_sync(web_daemon)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    factory = RecordFactory(7, seed=9)
    with trio.fail_after(TIMEOUT_S):  # hang guard: a publisher held to the page's pace
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(f"GET /api/tenants/7/records?from=0 HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {TOKEN_A}\r\n\r\n".encode())
            await publish(process.socket_path, 7, [factory.records(1)])
            head = await stream.receive_some(65536)  # the stream began; now read nothing
            assert head.startswith(b"HTTP/1.1 200")
            # 64 rings' worth, acknowledged while the page reads nothing.
            acks = await publish(process.socket_path, 7,
                                 [factory.records(1024) for _ in range(64)])
            assert acks[-1].last_sequence == 64 * 1024
            data = head
            while b"event: gap" not in data:
                data += await stream.receive_some(65536)
    gap = data[data.index(b"event: gap"):].split(b"\n\n")[0]
    first, last = json.loads(gap.split(b"data: ")[1]).values()
    assert 0 < first <= last < 64 * 1024


def test_off_loopback_the_api_needs_tls_and_gets_the_daemons_certificate(web_daemon, tmp_path):
    # Plain HTTP on a non-loopback address: metrics yes, the web API no.
    process, url = web_daemon("0.0.0.0:0")
    port = int(url.rsplit(":", 1)[1])
    status, _, body = http_request(f"http://127.0.0.1:{port}", "/metrics")
    assert status == 200
    status, _, body = http_request(f"http://127.0.0.1:{port}", "/api/tenants", token=TOKEN_A)
    assert status == 403 and b"tls_cert" in body
    process.stop()
    # With the daemon's certificate: HTTPS, and the API answers.
    certificates = make_pki(tmp_path)
    process, url = web_daemon("0.0.0.0:0", extra=f"""
        tcp_listen = "127.0.0.1:0"
        tls_cert = "{certificates.server_cert}"
        tls_key = "{certificates.server_key}"
    """)
    assert url.startswith("https://")
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=certificates.ca)
    context.check_hostname = False
    status, _, body = http_request(f"https://127.0.0.1:{port}", "/api/tenants", token=TOKEN_A,
                                   context=context, read_bytes=100)
    assert status == 200 and body.startswith(b"event: tenants")
    # A renewed certificate (another CA here, to tell them apart) is served
    # after a SIGHUP, as on the TCP listener: no restart.
    renewed = make_pki(tmp_path / "renewed")
    write_config(tmp_path, f"""
        tcp_listen = "127.0.0.1:0"
        tls_cert = "{renewed.server_cert}"
        tls_key = "{renewed.server_key}"
    """ + WEB_CONFIG)
    process.send_signal(signal.SIGHUP)
    process.wait_for_stderr("reloaded config")
    with pytest.raises(ssl.SSLCertVerificationError):
        http_request(f"https://127.0.0.1:{port}", "/healthz", context=context)
    context = ssl.create_default_context(cafile=renewed.ca)
    context.check_hostname = False
    status, _, body = http_request(f"https://127.0.0.1:{port}", "/healthz", context=context)
    assert (status, body) == (200, b"ok\n")


def test_http_listen_and_its_alias_metrics_listen(tmp_path):
    from ringtail.service.config import ConfigError, ServeConfig, load_config
    assert ServeConfig().http_address == ""
    assert ServeConfig(metrics_listen="127.0.0.1:9464").validate().http_address == "127.0.0.1:9464"
    path = tmp_path / "http.toml"
    path.write_text('http_listen = "[::1]:9464"\n')
    assert load_config(os.fspath(path)).http_address == "[::1]:9464"
    with pytest.raises(ConfigError, match=r"http_listen = '127\.0\.0\.1:1' and its alias "
                                          r"metrics_listen = '127\.0\.0\.1:2' differ"):
        ServeConfig(http_listen="127.0.0.1:1", metrics_listen="127.0.0.1:2").validate()
    with pytest.raises(ConfigError, match=r"http_listen = 'nonsense'; write HOST:PORT"):
        ServeConfig(http_listen="nonsense").validate()


def test_a_reload_that_revokes_the_token_ends_its_tail(web_daemon, tmp_path):
    process, url = web_daemon()
    trio.run(publish, process.socket_path, 7, [RecordFactory(7).records(2)])
    import http.client
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/api/tenants/7/records",
                           headers={"Authorization": f"Bearer {TOKEN_A}"})
        response = connection.getresponse()
        data = b""
        while not rows_through(1)(parse_events(data)):
            data += response.read1(65536)
        # Tenant 7's grant moves to token B; the config is re-read on SIGHUP.
        write_config(tmp_path, WEB_CONFIG.replace(token_hash(TOKEN_A), token_hash(TOKEN_B)))
        process.send_signal(signal.SIGHUP)
        while chunk := response.read1(65536):  # the stream ends after its refusal
            data += chunk
    finally:
        connection.close()
    refusals = [payload for name, payload in parse_events(data) if name == "refused"]
    assert len(refusals) == 1 and refusals[0]["status"] in (401, 403), refusals
    process.wait_for_stderr("reloaded config")
    status, _, _ = http_request(url, "/api/tenants/7/records", token=TOKEN_A)
    assert status == 401


def test_bad_tokens_count_toward_the_same_limit_as_bad_hellos(web_daemon):
    from ringtail.service.auth import AUTH_FAILURE_COUNT_MAX
    process, url = web_daemon()
    trio.run(publish, process.socket_path, 7, [RecordFactory(7).records(1)])
    for _ in range(AUTH_FAILURE_COUNT_MAX):
        status, _, body = http_request(url, "/api/tenants", token="rt_guess")
        assert status == 401 and b"not valid" in body
    # This address is now refused unchecked, a valid token included, as on TCP.
    status, _, body = http_request(url, "/api/tenants/7/records", token=TOKEN_A)
    assert status == 401 and b"too many failed authentications" in body
    metrics = http_request(url, "/metrics")[2].decode()
    assert 'reason="bad_credentials"' in metrics and 'reason="rate_limited"' in metrics
