"""systemd readiness (service/notify.py): real datagram sockets, the test acting as systemd.

The daemon tests start a real `ringtail serve` with $NOTIFY_SOCKET pointing at
a socket the test bound, and read the datagrams it sends: READY=1 once the
socket is bound and the rings are recovered, STOPPING=1 when SIGTERM starts
the orderly stop. The receive timeout is a fail-safe, never a synchronisation.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest
import trio

from ringtail.service.notify import NOTIFY_SOCKET_VARIABLE, SystemdNotifier, notify_address
from tests.service.conftest import DAEMON_READY_TIMEOUT_S, RecordFactory, read_all

TENANT = 1


def test_notify_address_maps_abstract_names_and_keeps_absolute_paths():
    assert notify_address("@systemd/notify") == b"\0systemd/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    for unusable in ("", "@", "relative/path", "vsock:2:1234", "/" + "x" * 200):
        assert notify_address(unusable) is None, unusable


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.statistics().sent == notifier.statistics().failed == 0


@pytest.fixture
def systemd_socket(tmp_path):
    """Factory: bind a datagram socket ("path" or "abstract"); returns (value, socket)."""
    sockets = []

    def bind(kind: str) -> tuple[str, socket.socket]:
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sockets.append(receiver)
        if kind == "abstract":
            name = f"ringtail-test-{uuid.uuid4().hex}"
            receiver.bind(b"\0" + name.encode())
            value = "@" + name
        else:
            value = os.fspath(tmp_path / "notify.sock")
            if len(value) > 100:
                value = f"/tmp/rt-notify-{uuid.uuid4().hex[:12]}.sock"
            receiver.bind(value)
        receiver.settimeout(DAEMON_READY_TIMEOUT_S)  # fail-safe: never hang the suite
        return value, receiver

    yield bind
    for receiver in sockets:
        address = receiver.getsockname()
        receiver.close()
        if isinstance(address, str) and address:
            os.unlink(address)


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notifier_sends_one_datagram_per_state(systemd_socket, kind):
    value, receiver = systemd_socket(kind)
    notifier = SystemdNotifier.from_environment({NOTIFY_SOCKET_VARIABLE: value})
    assert notifier.notify("READY=1") is True
    assert notifier.notify("STOPPING=1") is True
    assert receiver.recv(4096) == b"READY=1"
    assert receiver.recv(4096) == b"STOPPING=1"
    assert notifier.statistics().sent == 2


def test_unreachable_notify_socket_is_counted_not_raised(tmp_path, caplog):
    notifier = SystemdNotifier(os.fspath(tmp_path / "nobody-listens.sock"))
    assert notifier.notify("READY=1") is False
    assert notifier.statistics().failed == 1
    assert "cannot notify systemd (READY=1)" in caplog.text


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_daemon_sends_ready_when_serving_and_stopping_on_sigterm(daemon, systemd_socket,
                                                                 monkeypatch, kind):
    value, receiver = systemd_socket(kind)
    # A ring to recover at the second start, so READY=1 must come after recovery.
    first = daemon(io="threads")
    factory = RecordFactory(TENANT, seed=3)
    published = factory.records(20)

    async def publish():
        from ringtail.service.client import Client
        async with await Client.connect(first.socket_path, TENANT) as client:
            await client.publish(published)
    trio.run(publish)
    assert first.stop() == 0

    monkeypatch.setenv(NOTIFY_SOCKET_VARIABLE, value)
    first.spawn()  # same data dir and socket; do not wait for the log line
    assert receiver.recv(4096) == b"READY=1"
    # READY=1 promises a bound socket and recovered rings: the records are
    # there to read at once.
    replay = trio.run(read_all, first.socket_path, TENANT)
    assert replay.data == published
    first.wait_ready()
    run_log = first.run_stderr
    assert run_log.index(f"tenant {TENANT}:") < run_log.index("ringtail ready")

    first.send_signal(15)
    assert receiver.recv(4096) == b"STOPPING=1"
    assert first.wait() == 0
    assert "cannot notify systemd" not in first.stderr
