"""Real nats-server processes for the fleet tests and benchmark (Debian's `nats-server`, JetStream on).

`NatsServer` starts `nats-server -js` on a loopback port with its own store
directory, reads its log line by line on a thread and returns once the
server has logged that it is ready (no sleeps). It can be SIGKILLed and
restarted on the same port and store; `NatsCluster` starts three of them
routed to each other (a JetStream cluster on loopback ports).

`ShipProcess` runs `ringtail ship` the same way.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path


def _ringtail_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "ringtail")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ringtail.service.cli"]

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
# Seconds nats-server or ship may take to log readiness, and a wait for a
# condition on the stream, before the test fails (never a synchronisation sleep).
READY_TIMEOUT_S = 30.0
CONDITION_TIMEOUT_S = 120.0
CONDITION_POLL_S = 0.05  # between two reads of the stream while waiting for a condition


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _LoggedProcess:
    """A child whose stderr is read line by line; waits are on its lines."""

    def __init__(self, name: str):
        self.name = name
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._condition = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None

    def _spawn(self, argv: list[str], **kwargs) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} running"
        with self._condition:
            self._eof = False
            self._mark = len(self.lines)
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        **kwargs)
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True,
                                        name=f"{self.name}-stderr")
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for raw in process.stderr:
            with self._condition:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._condition.notify_all()
        with self._condition:
            self._eof = True
            self._condition.notify_all()

    def wait_line(self, pattern: str, timeout: float = READY_TIMEOUT_S) -> re.Match:
        """The first line of this run matching `pattern` (fails if the process exits first)."""
        regex = re.compile(pattern)
        found: list[re.Match] = []

        def seen() -> bool:
            for line in self.lines[self._mark:]:
                match = regex.search(line)
                if match:
                    found.append(match)
                    return True
            return self._eof

        with self._condition:
            self._condition.wait_for(seen, timeout=timeout)
        assert found, (f"{self.name} did not log /{pattern}/ within {timeout} s; its log:\n"
                       + "\n".join(self.lines[-40:]))
        return found[0]

    def kill(self) -> None:
        """SIGKILL and reap (the victim of a crash test)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def terminate(self, timeout: float = READY_TIMEOUT_S) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reap()
        return code

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=READY_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=READY_TIMEOUT_S)
            self._reader = None

    def close(self) -> None:
        self.kill()


class NatsServer(_LoggedProcess):
    """One nats-server with JetStream (file storage under `store_dir`)."""

    def __init__(self, store_dir: str, *, port: int | None = None, name: str = "nats",
                 cluster_port: int | None = None, routes: list[int] = (),
                 cluster_name: str = "ringtail-test", extra_args: tuple[str, ...] = ()):
        super().__init__(name)
        self.extra_args = tuple(extra_args)
        self.store_dir = store_dir
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.cluster_name = cluster_name

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def spawn(self) -> "NatsServer":
        """Start the process without waiting for it (a cluster starts its members together)."""
        argv = [NATS_SERVER, "-js", "-sd", self.store_dir, "-a", "127.0.0.1",
                "-p", str(self.port), "-n", self.name, *self.extra_args]
        if self.cluster_port is not None:
            argv += ["--cluster_name", self.cluster_name,
                     "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self._spawn(argv)
        return self

    def start(self) -> "NatsServer":
        self.spawn()
        self.wait_line(r"Server is ready")
        return self

    def restart(self) -> "NatsServer":
        self.kill()
        return self.start()


class NatsCluster:
    """Three routed nats-servers with JetStream: a cluster on loopback ports."""

    def __init__(self, base_dir: Path, size: int = 3):
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(os.fspath(base_dir / f"n{index}"), name=f"n{index}",
                       cluster_port=cluster_ports[index],
                       routes=[p for i, p in enumerate(cluster_ports) if i != index])
            for index in range(size)]

    def start(self) -> "NatsCluster":
        for server in self.servers:
            server.spawn()
        for server in self.servers:
            server.wait_line(r"Server is ready")
        for server in self.servers:  # streams can be created once a metadata leader exists
            server.wait_line(r"metadata leader")
        return self

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()


class ShipProcess(_LoggedProcess):
    """`ringtail ship` for some tenants of one daemon."""

    def __init__(self, nats_url: str, socket_path: str, node: str, tenants: list[int], *,
                 stream: str = "RINGTAIL", replicas: int = 1, cwd: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        super().__init__("ship")
        self.argv = [*_ringtail_command(), "ship", "--nats", nats_url, "--socket", socket_path,
                     "--node", node, "--stream", stream, "--replicas", str(replicas)]
        for tenant in tenants:
            self.argv += ["--tenant", str(tenant)]
        self.argv += list(extra_args)
        self.cwd = cwd

    def start(self) -> "ShipProcess":
        self._spawn(self.argv, cwd=self.cwd)
        return self

    def restart(self) -> "ShipProcess":
        self.kill()
        return self.start()

    def wait_exit(self, timeout: float = READY_TIMEOUT_S) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        self._reap()
        return code


# --- reading the stream from a test ------------------------------------------------


def read_subject(url: str, node: str, tenant_id: int, stream: str = "RINGTAIL"):
    """Every ShippedMessage on the tenant's subject, in stream order (fleet tail's reader)."""
    from ringtail.service.fleet import fleet_tail
    messages = []
    asyncio.run(fleet_tail(url, node, tenant_id, messages.append, stream=stream))
    return messages


def shipped_next_sequence(url: str, node: str, tenant_id: int, stream: str = "RINGTAIL") -> int:
    """Where the tenant's shipped history ends (0: nothing shipped, or no stream yet)."""
    from nats.js.errors import NotFoundError

    from ringtail.service.fleet import connect_nats, last_message, subject

    async def read() -> int:
        nc = await connect_nats(url, "ringtail-test")
        try:
            js = nc.jetstream()
            try:
                last = await last_message(js, stream, subject(node, tenant_id))
            except NotFoundError:
                return 0
            return 0 if last is None else last.next_sequence
        finally:
            await nc.close()

    try:
        return asyncio.run(read())
    except Exception:  # NATS restarting: not shipped as far as the caller can tell
        return -1


def wait_shipped(url: str, node: str, tenant_id: int, next_sequence: int, *,
                 stream: str = "RINGTAIL", timeout: float = CONDITION_TIMEOUT_S,
                 alive=lambda: True) -> int:
    """Wait until the tenant's shipped history reaches `next_sequence` (a condition
    poll with a deadline that fails the test, not a synchronisation sleep)."""
    import time
    deadline = time.monotonic() + timeout
    reached = -1
    while time.monotonic() < deadline:
        reached = shipped_next_sequence(url, node, tenant_id, stream)
        if reached >= next_sequence:
            return reached
        assert alive(), "a process the wait depends on exited"
        time.sleep(CONDITION_POLL_S)
    raise AssertionError(f"tenant {tenant_id}: shipped up to {reached}, not {next_sequence}, "
                         f"within {timeout} s")
