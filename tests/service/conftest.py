"""Shared fixtures for the daemon's integration tests: real processes, real sockets.

- `daemon` is a factory: `daemon(capacity=1024, sync="none", io="threads")`
  starts `ringtail serve` in the test's temporary directory and returns a
  `DaemonProcess` once the daemon has logged "ringtail ready" (its stderr is
  read line by line on a thread; nothing here sleeps to synchronise). Every
  process a test starts is SIGKILLed at teardown if it is still alive.
- `RecordFactory` makes distinct, valid slot records for one tenant from a
  seeded random: timestamps strictly increase (so records never repeat and
  start-at-time has something to find), the other fields vary.
- `read_all()` replays a tenant from the daemon (subscribe, no follow) and
  returns every record with its sequence, plus any Gap and the End.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from ringtail.ioring.record import RECORD_SIZE_BYTES, SlotRecord
from ringtail.service.client import Client

from ..conftest import require_uring
from ..ioring.conftest import flip_byte
from ringtail.service.protocol import (FRAME_HEADER_SIZE_BYTES, End, Gap, Hello, Records, StartKind,
                                       decode_frame, encode_event)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Seconds a daemon may take to log "ringtail ready", or to exit after a signal,
# before the test fails (generous: a slow CI box, never a synchronisation sleep).
DAEMON_READY_TIMEOUT_S = 30.0
DAEMON_EXIT_TIMEOUT_S = 45.0  # longer than the daemon's SHUTDOWN_GRACE_S (30 s)
READY_MARKER = "ringtail ready"
SOCKET_PATH_SIZE_MAX = 100  # sun_path holds 108 bytes; keep well under it


def ringtail_executable() -> str:
    """The console script of the venv the tests run in."""
    beside_python = Path(sys.executable).parent / "ringtail"
    if beside_python.exists():
        return os.fspath(beside_python)
    return os.fspath(REPO_ROOT / ".venv" / "bin" / "ringtail")


RINGTAIL = ringtail_executable()


def run_cli(*argv: str, input: bytes = b"", cwd: str | None = None
            ) -> subprocess.CompletedProcess:
    """`ringtail ARGV` run in this process, through the console script's own entry
    point (`ringtail.service.cli.main`, whose return value the script hands to
    sys.exit), with stdin given and stdout and stderr captured as bytes; the
    result has a subprocess's fields (args, returncode, stdout, stderr).

    Why: a `ringtail` subprocess spends its time starting Python and importing
    trio, numpy and the service (~0.7 s on an idle 2-core box, 2-4 s on a loaded
    one) before the command runs; a test that checks what a command prints and
    its exit status gets the same answer here. Tests about the process itself
    (a signal, a terminal, the console script, `ringtail serve`) keep a
    subprocess. Call it from synchronous code only (the commands run trio.run).
    stdout is not a terminal, as with capture_output: no progress bars. Output to a
    stream bound at import time (a `file=sys.stderr` default argument, as
    fleet.print_gap has) is not captured: a test that looks for it fails, so such
    a command stays a subprocess.
    """
    from ringtail.service.cli import main
    stdin = io.TextIOWrapper(io.BytesIO(input))
    stdout = io.TextIOWrapper(io.BytesIO(), write_through=True)
    stderr = io.TextIOWrapper(io.BytesIO(), write_through=True)
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_handlers = logging.root.handlers[:]  # main() calls logging.basicConfig
    saved_cwd = os.getcwd()
    try:
        sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
        if cwd is not None:
            os.chdir(cwd)
        try:
            status = main(list(argv))
        except SystemExit as exit_:  # what the console script would exit with
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        logging.root.handlers[:] = saved_handlers
        os.chdir(saved_cwd)
    stdout.flush()
    stderr.flush()
    return subprocess.CompletedProcess([RINGTAIL, *argv], status, stdout.buffer.getvalue(),
                                       stderr.buffer.getvalue())


class DaemonProcess:
    """One `ringtail serve` process (restartable on the same data dir and socket).

    Resource handling: `close()` SIGKILLs a live process and joins the stderr
    reader; the `daemon` fixture calls it at teardown.
    """

    def __init__(self, data_dir: str, socket_path: str, options: dict[str, object],
                 cwd: str, wrapper: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.options = dict(options)
        self.cwd = cwd
        self.wrapper = tuple(wrapper)  # argv prefix, e.g. tests/seccomp_exec.py
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._lines: list[str] = []  # every stderr line of every run
        self._run_lines: list[str] = []  # this run's lines
        self._condition = threading.Condition()
        self._ready = False
        self._eof = False
        self._reader: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def command(self) -> list[str]:
        argv = [*self.wrapper, RINGTAIL, "serve", "--data-dir", self.data_dir,
                "--socket", self.socket_path]
        for name, value in self.options.items():
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv

    def spawn(self) -> subprocess.Popen:
        """Start the process without waiting for it to be ready."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._join_reader()
        with self._condition:
            self._ready = False
            self._eof = False
            self._run_lines = []
        self.process = subprocess.Popen(self.command(), cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.starts += 1
        self._reader = threading.Thread(target=self._read_stderr, args=(self.process,),
                                        name=f"ringtail-stderr-{self.process.pid}", daemon=True)
        self._reader.start()
        return self.process

    def start(self) -> "DaemonProcess":
        """Start and block until the daemon logs "ringtail ready" (fail, never hang)."""
        self.spawn()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._ready or self._eof,
                                     timeout=DAEMON_READY_TIMEOUT_S)
            ready, eof = self._ready, self._eof
        if not ready:
            if not eof:
                self.process.kill()
            self.process.wait()
            pytest.fail(f"ringtail serve did not become ready (exit status "
                        f"{self.process.returncode}); stderr:\n{self.stderr}")

    async def astart(self) -> "DaemonProcess":
        """`start()` on a worker thread, so a Trio test's other tasks keep running."""
        return await trio.to_thread.run_sync(self.start)

    def send_signal(self, signum: int) -> None:
        """Send a signal now (no waiting)."""
        self.process.send_signal(signum)

    def wait(self) -> int:
        """Block until the process exits; its status (-N for signal N)."""
        try:
            return self.process.wait(timeout=DAEMON_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"ringtail serve did not exit within {DAEMON_EXIT_TIMEOUT_S} s; "
                        f"stderr:\n{self.stderr}")

    def wait_for_stderr(self, text: str) -> None:
        """Block until this run logs a line containing `text` (fail after a timeout)."""
        with self._condition:
            found = self._condition.wait_for(
                lambda: any(text in line for line in self._run_lines) or self._eof,
                timeout=DAEMON_READY_TIMEOUT_S)
            found = found and any(text in line for line in self._run_lines)
        if not found:
            pytest.fail(f"ringtail serve never logged {text!r}; stderr:\n{self.run_stderr}")

    async def await_stderr(self, text: str) -> None:
        await trio.to_thread.run_sync(self.wait_for_stderr, text)

    def limit_open_files(self, count: int) -> None:
        """Lower the running daemon's RLIMIT_NOFILE (soft and hard) to `count`."""
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (count, count))

    async def await_exit(self) -> int:
        return await trio.to_thread.run_sync(self.wait)

    def kill(self, signum: int = signal.SIGKILL) -> int:
        """Send `signum` and wait for the exit; returns the exit status."""
        self.send_signal(signum)
        status = self.wait()
        self._join_reader()
        return status

    def stop(self) -> int:
        """SIGTERM (orderly shutdown) and wait; returns the exit status."""
        return self.kill(signal.SIGTERM)

    def restart(self) -> "DaemonProcess":
        """Stop the daemon if it runs (SIGTERM), then start it again, same dir and socket."""
        if self.alive:
            status = self.stop()
            assert status == 0, f"orderly stop exited {status}; stderr:\n{self.stderr}"
        return self.start()

    async def arestart(self) -> "DaemonProcess":
        return await trio.to_thread.run_sync(self.restart)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._join_reader()

    # -- state ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def stderr(self) -> str:
        """Everything every run of this daemon wrote to stderr so far."""
        with self._condition:
            return "".join(self._lines)

    @property
    def run_stderr(self) -> str:
        """What the current (or last) run wrote to stderr so far."""
        with self._condition:
            return "".join(self._run_lines)

    def ring_path(self, tenant_id: int) -> str:
        return os.path.join(self.data_dir, f"tenant-{tenant_id}.ring")

    # -- internals -------------------------------------------------------------------

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace")
            with self._condition:
                self._lines.append(line)
                self._run_lines.append(line)
                if READY_MARKER in line:
                    self._ready = True
                self._condition.notify_all()
        process.stderr.close()
        with self._condition:
            self._eof = True
            self._condition.notify_all()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=DAEMON_EXIT_TIMEOUT_S)
            assert not self._reader.is_alive(), "stderr reader did not finish"
            self._reader = None


def short_socket_dir(tmp_path: Path) -> str:
    """A directory whose socket path fits sun_path (pytest's tmp paths can be long)."""
    if len(os.fspath(tmp_path / "ringtail.sock")) <= SOCKET_PATH_SIZE_MAX:
        return os.fspath(tmp_path)
    return tempfile.mkdtemp(prefix="rt-", dir="/tmp")


@pytest.fixture
def daemon(tmp_path):
    """Factory: `daemon(capacity=..., sync=..., io=..., data_dir=..., socket_path=...)`.

    Starts `ringtail serve` and returns the ready DaemonProcess; options left
    at None are not passed (the daemon's defaults apply). `wrapper` is an argv
    prefix the daemon runs under (e.g. tests/seccomp_exec.py).
    """
    started: list[DaemonProcess] = []
    socket_dir = short_socket_dir(tmp_path)
    counter = iter(range(1_000_000))

    def start(*, capacity: int | None = None, sync: str | None = None, io: str | None = None,
              data_dir: str | None = None, socket_path: str | None = None,
              config: str | None = None, wait: bool = True,
              wrapper: tuple[str, ...] = ()) -> DaemonProcess:
        if io == "uring":
            require_uring()  # skipped only where the run opted out, saying why
        index = next(counter)
        data_dir = data_dir or os.fspath(tmp_path / f"data-{index}")
        socket_path = socket_path or os.path.join(socket_dir, f"rt-{index}.sock")
        process = DaemonProcess(data_dir, socket_path,
                                {"capacity": capacity, "sync": sync, "io": io, "config": config},
                                cwd=os.fspath(tmp_path), wrapper=wrapper)
        started.append(process)
        if wait:
            process.start()
        else:
            process.spawn()
        return process

    yield start
    for process in started:
        process.close()


# -- records -----------------------------------------------------------------------

TIMESTAMP_START_NS = 1_700_000_000_000_000_000


class RecordFactory:
    """Distinct valid records for one tenant, reproducible from a seed.

    Timestamps strictly increase across every record the factory makes (a
    step of 1,000..1,999 ns), so no two records are equal and any value
    between two neighbours' timestamps exists for start-at-time tests.
    """

    def __init__(self, tenant_id: int, seed: int = 0,
                 timestamp_start_ns: int = TIMESTAMP_START_NS):
        self.tenant_id = tenant_id
        self.random = random.Random(seed)
        self.timestamp_ns = timestamp_start_ns
        self.count = 0

    def slot_record(self, **overrides) -> SlotRecord:
        rng = self.random
        self.timestamp_ns += 1000 + rng.randrange(1000)
        failed = rng.random() < 0.3
        fields = dict(
            timestamp_ns=self.timestamp_ns,
            slot_idx=self.count & 0xFFFF_FFFF,
            tenant_id=self.tenant_id,
            opcode=rng.randrange(16),
            args=tuple(rng.getrandbits(32) for _ in range(4)),
            epoch=rng.randrange(10),
            slot_status=rng.randrange(1, 4) if failed else 0,
            failure_class=rng.randrange(0, 6) if failed else 0,
            backend_code=rng.getrandbits(16) if failed else 0,
            output_digest=rng.getrandbits(64) if failed and rng.random() < 0.5 else 0,
        )
        fields.update(overrides)
        self.count += 1
        return SlotRecord(**fields)

    def record(self, **overrides) -> bytes:
        return self.slot_record(**overrides).encode()

    def records(self, count: int, **overrides) -> bytes:
        return b"".join(self.record(**overrides) for _ in range(count))


def damage_snapshot(path: str, where: str) -> int:
    """Flip one bit of the snapshot file at `path` in its "header", a "chunk"
    (the middle of the file) or its "trailer"; the offset damaged."""
    size = os.path.getsize(path)
    offset = {"header": 40, "chunk": size // 2, "trailer": size - 10}[where]
    flip_byte(path, offset, 0x40)
    return offset


def split_records(data: bytes) -> list[bytes]:
    """64-byte records of `data`, in order."""
    assert len(data) % RECORD_SIZE_BYTES == 0
    return [data[offset:offset + RECORD_SIZE_BYTES]
            for offset in range(0, len(data), RECORD_SIZE_BYTES)]


@pytest.fixture
def record_factory():
    """`record_factory(tenant_id, seed=0)` -> RecordFactory."""
    return RecordFactory


# -- replay ------------------------------------------------------------------------


@dataclasses.dataclass
class Replay:
    """What a non-follow subscription returned."""

    records: list[tuple[int, bytes]]  # (sequence, 64 bytes), in arrival order
    gaps: list[Gap]
    frames: list[Records]
    end: End | None
    welcome: object = None

    @property
    def sequences(self) -> list[int]:
        return [sequence for sequence, _ in self.records]

    @property
    def by_sequence(self) -> dict[int, bytes]:
        return dict(self.records)

    @property
    def data(self) -> bytes:
        return b"".join(record for _, record in self.records)


def frame_records(event: Records) -> list[tuple[int, bytes]]:
    """(sequence, record) pairs of a Records frame, dense or sparse."""
    records = split_records(event.records)
    if event.sequences is None:
        sequences = range(event.first_sequence, event.first_sequence + len(records))
    else:
        sequences = event.sequences
    return list(zip(sequences, records, strict=True))


REPLAY_TIMEOUT_S = 60.0


async def read_all(socket_path: str, tenant_id: int, start: StartKind | str = StartKind.OLDEST,
                   start_value: int = 0, **filters) -> Replay:
    """Every record a non-follow subscription returns (fails after REPLAY_TIMEOUT_S)."""
    replay = Replay([], [], [], None)
    with trio.fail_after(REPLAY_TIMEOUT_S):
        async with await Client.connect(socket_path, tenant_id) as client:
            replay.welcome = client.welcome
            async for event in client.subscribe(start, start_value, follow=False, **filters):
                if isinstance(event, Records):
                    replay.frames.append(event)
                    replay.records.extend(frame_records(event))
                elif isinstance(event, Gap):
                    replay.gaps.append(event)
                elif isinstance(event, End):
                    replay.end = event
    assert replay.end is not None, "a non-follow subscription must finish with End"
    return replay


# -- raw connections ---------------------------------------------------------------

RAW_TIMEOUT_S = 30.0


class RawPeer:
    """A Unix-socket connection that speaks frames by hand (for bad input).

    Frames from the daemon are cut by their 8-byte header and decoded with
    `protocol.decode_frame`, so no client-side state table gets in the way.
    """

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = bytearray()
        self.closed = False

    @classmethod
    async def connect(cls, socket_path: str) -> "RawPeer":
        return cls(await trio.open_unix_socket(socket_path))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def hello(self, tenant_id: int) -> object:
        """Send Hello, return the daemon's answer (Welcome or Error)."""
        await self.send(encode_event(Hello(tenant_id, b"", "raw-test")))
        return await self.read_frame()

    async def read_frame(self):
        """The next frame's event, or None once the daemon closed the connection."""
        with trio.fail_after(RAW_TIMEOUT_S):
            while True:
                if len(self.buffer) >= FRAME_HEADER_SIZE_BYTES:
                    (size,) = struct.unpack_from("<I", self.buffer)
                    end = FRAME_HEADER_SIZE_BYTES + size
                    if len(self.buffer) >= end:
                        frame = bytes(self.buffer[:end])
                        del self.buffer[:end]
                        return decode_frame(frame)
                if self.closed:
                    assert not self.buffer, (
                        f"the daemon closed the connection inside a frame: {bytes(self.buffer)!r}")
                    return None
                try:
                    data = await self.stream.receive_some(256 * 1024)
                except trio.BrokenResourceError:  # ECONNRESET: it closed with our bytes unread
                    data = b""
                if not data:
                    self.closed = True
                self.buffer += data

    async def frames_until_closed(self) -> list:
        frames = []
        while (event := await self.read_frame()) is not None:
            frames.append(event)
        return frames

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- access control helpers (test_auth, test_tls, test_quotas, test_reload) ------------

TCP_READY_PATTERN = re.compile(r"tcp (\S+):(\d+) \((?:tls|mtls|plaintext)\)")


def write_config(directory: Path, text: str, name: str = "ringtail.toml") -> str:
    """Write a TOML config (dedented) and return its path."""
    path = Path(directory) / name
    path.write_text(textwrap.dedent(text))
    return os.fspath(path)


def tcp_port(process: DaemonProcess) -> int:
    """The TCP port a ready daemon logged in its "ringtail ready" line."""
    match = TCP_READY_PATTERN.search(process.run_stderr)
    assert match, f"no TCP listener in the ready line:\n{process.run_stderr}"
    return int(match.group(2))


@contextlib.contextmanager
def effective_gid(gid: int):
    """Run the block with effective gid `gid` (root keeps its capabilities, so
    paths stay reachable); SO_PEERCRED reports the gid a socket connected with."""
    previous = os.getegid()
    os.setegid(gid)
    try:
        yield
    finally:
        os.setegid(previous)


async def connect_as_gid(socket_path: str, tenant_id: int, gid: int, token: bytes = b""):
    """A Client whose Unix connection the daemon sees as coming from `gid`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with effective_gid(gid):
            sock.connect(socket_path)
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return await Client.connect_stream(stream, tenant_id, token=token)
