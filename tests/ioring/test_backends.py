"""I/O backends: choice at open, completion signalling, and failed chains.

Failures are made for real where this machine allows it: a short write comes
from RLIMIT_FSIZE in a child process, on both backends. A failing fdatasync
cannot be made for real here (it needs a failing disk, e.g. dm-error), so one
test injects it with a fake backend.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import textwrap

import pytest

import ringtail.ioring.backend as backend_module

from ringtail.ioring.backend import open_backend
from ringtail.ioring.chain import FDATASYNC, IO_CHOICES, ChainResult, Write, errno_result
from ringtail.ioring.errors import RingFailedError, RingRangeError
from ringtail.ioring.format import Layout
from ringtail.ioring.probe import probe_uring
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.ioring.ring import open_ring

from .conftest import TENANT_ID, make_records

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ring_module = importlib.import_module("ringtail.ioring.ring")
uring_module = importlib.import_module("ringtail.ioring.uring")


# -- choosing a backend -------------------------------------------------------------


@pytest.mark.parametrize("io, name", [("uring", "uring"), ("threads", "threads"),
                                      ("auto", "uring")])  # io_uring works on this machine
def test_open_backend_gives_the_named_backend(io, name):
    backend = open_backend(io)
    try:
        assert backend.name == name
        assert backend.completion_fd >= 0
    finally:
        backend.close()


def test_open_ring_reports_its_backend(ring_path, io):
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID, io=io) as ring:
        assert ring.backend == io == ring.statistics().backend
    with open_ring(ring_path, tenant_id=TENANT_ID, io="auto") as ring:
        assert ring.backend == "uring"


def test_an_unknown_backend_name_is_rejected():
    assert IO_CHOICES == ("auto", "uring", "threads")
    with pytest.raises(ValueError, match=r"^io='epoll' is not one of auto, uring, threads$"):
        open_backend("epoll")


SECCOMP_EXEC = os.path.join(REPOSITORY_ROOT, "tests", "seccomp_exec.py")
PROBE_BINDING = "RINGTAIL_TEST_URING_BINDING"


def _fresh_probe(monkeypatch):
    """Forget this process's probe verdict, so the next `auto` probes again."""
    monkeypatch.setattr(backend_module, "_probe_result", None)
    monkeypatch.setattr(backend_module, "_fallback_logged", False)


def test_auto_probes_once_per_process_and_a_killed_probe_falls_back_with_one_line(
        monkeypatch, caplog, tmp_path):
    # A test-only binding that executes a real illegal instruction, as the
    # 2026 liburing wheels did on CPUs without AVX-512.
    monkeypatch.setenv(PROBE_BINDING, "tests.uring_sigill")
    _fresh_probe(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ioring"):
        backends = [open_backend("auto", tmp_path) for _ in range(3)]
    try:
        assert [backend.name for backend in backends] == ["threads"] * 3
    finally:
        for backend in backends:
            backend.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ioring"]
    assert len(warnings) == 1  # said once per process, in one clear line
    assert re.fullmatch(r"io_uring unavailable \(the io_uring probe process was killed by "
                        r"SIGILL \(illegal instruction: .*\)\); using the thread backend "
                        r"\(pwritev\+fdatasync on a worker thread: same guarantees, "
                        r"slower per batch\)", warnings[0]), warnings[0]
    assert backend_module._probe_result.cause == "signal"
    assert os.listdir(tmp_path) == []  # the probe's temporary file is gone


def test_io_uring_chosen_explicitly_does_not_consult_the_probe(monkeypatch, tmp_path):
    monkeypatch.setenv(PROBE_BINDING, "tests.uring_sigill")
    _fresh_probe(monkeypatch)
    backend = open_backend("uring", tmp_path)
    try:
        assert backend.name == "uring"
        assert backend_module._probe_result is None
    finally:
        backend.close()


def test_probe_passes_here_and_leaves_nothing_behind(tmp_path):
    result = probe_uring(tmp_path)
    assert (result.ok, result.cause) == (True, "")
    assert os.listdir(tmp_path) == []


def test_a_hung_probe_is_killed_at_its_timeout(monkeypatch, tmp_path):
    monkeypatch.setenv(PROBE_BINDING, "tests.uring_hang")
    result = probe_uring(tmp_path, timeout_s=2.0)
    assert (result.ok, result.cause) == (False, "timeout")
    assert result.message.startswith("the io_uring probe did not finish within 2 s "
                                     "(PROBE_TIMEOUT_S)")
    assert "--io threads" in result.message


def test_a_probe_child_that_breaks_reports_its_last_stderr_line(monkeypatch, tmp_path):
    monkeypatch.setenv(PROBE_BINDING, "tests.no_such_binding")
    result = probe_uring(tmp_path)
    assert (result.ok, result.cause) == (False, "failed")
    assert result.message == ("the io_uring probe exited with status 1: ModuleNotFoundError: "
                              "No module named 'tests.no_such_binding'")


@pytest.mark.parametrize("io", ["uring", "auto"])
def test_io_uring_refused_by_seccomp_is_named_with_its_fix(io, tmp_path):
    """For real: a seccomp filter answers io_uring_setup with EPERM, as Docker's does."""
    script = textwrap.dedent(f"""
        import json, logging
        from ringtail.ioring.backend import open_backend
        from ringtail.ioring.errors import BackendUnavailableError
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        try:
            backend = open_backend({io!r}, {os.fspath(tmp_path)!r})
        except BackendUnavailableError as error:
            print(json.dumps({{"error": str(error)}}))
        else:
            print(json.dumps({{"backend": backend.name}}))
            backend.close()
    """)
    child = subprocess.run([sys.executable, SECCOMP_EXEC, sys.executable, "-c", script],
                           capture_output=True, text=True, cwd=REPOSITORY_ROOT, timeout=60)
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout)
    if io == "uring":
        assert outcome == {"error": (
            "io_uring_setup: Operation not permitted [EPERM]; io_uring is blocked: a seccomp "
            "profile (Docker >= 25 and containerd 2 defaults) or sysctl "
            "kernel.io_uring_disabled; allow io_uring_setup, io_uring_enter and "
            "io_uring_register, or run with --io threads")}
    else:
        assert outcome == {"backend": "threads"}
        lines = child.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "io_uring unavailable (io_uring_setup: Operation not permitted [EPERM]; "
            "io_uring is blocked: a seccomp profile"), child.stderr


# -- completions -----------------------------------------------------------------------


def _readable(fd: int, timeout_s: float) -> bool:
    return fd in select.select([fd], [], [], timeout_s)[0]


def test_completion_fd_is_readable_exactly_when_a_chain_has_finished(ring_path, io):
    with open_ring(ring_path, capacity=256, tenant_id=TENANT_ID, io=io) as ring:
        fd = ring.completion_fd
        assert not _readable(fd, 0)  # nothing submitted, nothing to reap
        assert ring.reap() == []
        for first in range(0, 300, 30):
            ticket = ring.submit(make_records(first, 30))
            # The timeout only guards against a hang; it is not a timing assertion.
            assert _readable(fd, 5.0), "no completion signal within 5 s"
            assert ring.reap() == [ticket]  # readable means the chain is done
            assert not ring.in_flight
            assert not _readable(fd, 0)  # reaping drained the signal
            assert ring.next_sequence == ticket.next_sequence
        assert ring.read(ring.oldest_sequence, 300 - ring.oldest_sequence) == \
            make_records(ring.oldest_sequence, 300 - ring.oldest_sequence)


# -- a real short write: RLIMIT_FSIZE in a child process -----------------------------

CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from ringtail.ioring.errors import RingFailedError
    from ringtail.ioring.record import SlotRecord
    from ringtail.ioring.ring import open_ring

    path, io, limit, first, count = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    records = b"".join(SlotRecord(tenant_id=7, opcode=i, timestamp_ns=i, slot_idx=i).encode()
                       for i in range(first, first + count))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    ring = open_ring(path, tenant_id=7, io=io)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = {"next_before": ring.next_sequence}
    try:
        ring.append(records)
        out["append"] = "returned"
    except RingFailedError as error:
        out["append"] = "RingFailedError"
        out["errno"], out["message"] = error.errno, str(error)
        try:
            ring.submit(records[:64])
            out["submit_after"] = "returned"
        except RingFailedError as again:
            out["submit_after"] = "same" if again is error else str(again)
    out["next_after"] = ring.next_sequence
    out["failed"] = ring.failed is not None
    out["acknowledged_readable"] = ring.read(0, first) == b"".join(
        SlotRecord(tenant_id=7, opcode=i, timestamp_ns=i, slot_idx=i).encode()
        for i in range(first))
    ring.close()
    print(json.dumps(out))
""")

LAYOUT = Layout(256)
ACKNOWLEDGED = 40
BATCH = 60  # 40..99: one data write of 3840 bytes at record_offset(40)
BATCH_OFFSET = LAYOUT.record_offset(ACKNOWLEDGED)
BATCH_SIZE_BYTES = BATCH * RECORD_SIZE_BYTES


# The ring was closed cleanly (sealed) before the child reopens it: its first
# chain starts with the unsealed header and an fdatasync (operations 0 and 1),
# so the batch's data write is operation 2.
@pytest.mark.parametrize("limit, errno_value, cause, message", [
    # The limit falls inside the batch's data: the write is cut short.
    (LAYOUT.record_offset(70) + 10, errno.EIO, "short write",
     rf"short write: operation 2 wrote {30 * RECORD_SIZE_BYTES + 10} of "
     rf"{BATCH_SIZE_BYTES} bytes"),
    # The limit is where the batch's data starts: nothing of it can be written.
    (BATCH_OFFSET, errno.EFBIG, r"EFBIG \(File too large\)",
     rf"write of {BATCH_SIZE_BYTES} bytes at {BATCH_OFFSET} \(operation 2\) failed: "
     r"File too large \[EFBIG\]"),
], ids=["cut-short", "refused"])
def test_a_write_past_the_file_size_limit_fails_the_ring_and_keeps_acknowledged_records(
        ring_path, io, limit, errno_value, cause, message):
    assert LAYOUT.data_offset < limit < LAYOUT.file_size_bytes
    with open_ring(ring_path, capacity=256, tenant_id=TENANT_ID, io=io) as ring:
        ring.append(make_records(0, ACKNOWLEDGED))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, ring_path, io, str(limit), str(ACKNOWLEDGED), str(BATCH)],
        cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["append"] == "RingFailedError"
    assert out["errno"] == errno_value
    # Cause first (issue 9, item 18), then what to do, then the operation.
    assert re.fullmatch(
        rf"{re.escape(ring_path)}: {cause}: batch 40\.\.99 is not durable; check the disk, "
        rf"the file system holding {re.escape(os.path.dirname(ring_path))} and the daemon's "
        r"limits \(ulimit -f\), then restart the daemon: the ring refuses writes until it is "
        rf"reopened, and recovery then keeps what of the batch verifies \({message}\)",
        out["message"]), out["message"]
    assert out["submit_after"] == "same"  # later submits raise the same error
    assert out["next_before"] == out["next_after"] == ACKNOWLEDGED
    assert out["failed"] and out["acknowledged_readable"]
    # Reopened without the limit: every acknowledged record is intact, nothing more.
    with open_ring(ring_path, tenant_id=TENANT_ID, io=io) as ring:
        report = ring.recovery_report
        assert report.dropped_tail is None and report.dropped_head is None
        assert (ring.oldest_sequence, ring.next_sequence) == (0, ACKNOWLEDGED)
        assert ring.read(0, ACKNOWLEDGED) == make_records(0, ACKNOWLEDGED)
        assert ring.append(make_records(500, BATCH)).first_sequence == ACKNOWLEDGED
        assert ring.read(ACKNOWLEDGED, BATCH) == make_records(500, BATCH)


# -- an injected fdatasync failure --------------------------------------------------


class FdatasyncFailsBackend:
    """Implements the Backend protocol with plain syscalls, but its fdatasync can be
    made to fail with EIO: this fake injects an fdatasync EIO, which cannot be made
    for real on this machine (it needs a failing device)."""

    name = "fake"

    def __init__(self) -> None:
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fail_fdatasync = False
        self._results: list[ChainResult] = []

    def submit(self, fd: int, operations: list, tag: int) -> None:
        result = ChainResult(tag)
        for index, op in enumerate(operations):
            if op is FDATASYNC:
                if self.fail_fdatasync:
                    result = errno_result(tag, index, errno.EIO, op)
                    break
                os.fdatasync(fd)
            else:
                assert os.pwrite(fd, op.data, op.offset) == len(op.data)
        self._results.append(result)
        os.eventfd_write(self.completion_fd, 1)

    def reap(self) -> list[ChainResult]:
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass
        results, self._results = self._results, []
        return results

    def close(self) -> None:
        os.close(self.completion_fd)


def test_a_failed_fdatasync_fails_the_ring_loudly_and_keeps_the_cursor(ring_path, monkeypatch):
    backend = FdatasyncFailsBackend()
    monkeypatch.setattr(ring_module, "open_backend", lambda io, probe_directory=None: backend)
    with open_ring(ring_path, capacity=128, tenant_id=TENANT_ID) as ring:
        assert ring.backend == "fake"
        ring.append(make_records(0, 10))
        backend.fail_fdatasync = True
        ticket = ring.submit(make_records(10, 20))
        assert _readable(ring.completion_fd, 5.0)
        with pytest.raises(RingFailedError,
                           match=r": EIO \(Input/output error\): batch 10\.\.29 is not "
                                 r"durable; the device reported an I/O error: check the disk "
                                 r"\(dmesg, SMART\) and `ringtail verify .*`, then restart the "
                                 r"daemon: .* \(fdatasync \(operation \d+\) failed: "
                                 r"Input/output error \[EIO\]\)") as caught:
            ring.reap()
        error = caught.value
        assert (error.errno, error.path) == (errno.EIO, ring_path)
        assert ticket.first_sequence == 10
        assert ring.next_sequence == 10  # the cursor never moves past a failed chain
        assert ring.failed is error and not ring.in_flight
        for operation in (lambda: ring.submit(make_records(30, 1)),
                          lambda: ring.append(make_records(30, 1)), ring.reap):
            with pytest.raises(RingFailedError) as again:
                operation()
            assert again.value is error
        statistics = ring.statistics()
        assert (statistics.batches_committed, statistics.records_committed,
                statistics.fdatasync_count) == (1, 10, 1)
        assert ring.read(0, 10) == make_records(0, 10)  # acknowledged records still read
        with pytest.raises(RingRangeError, match=r"^sequences 10\.\.10 are not all retained"):
            ring.read(10, 1)


# -- buffer lifetime ---------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["uring", "threads"])
def test_a_chains_buffers_are_released_once_reaped(backend_name, ring_path):
    # The backend must hold each buffer until its chain is reaped, and no longer:
    # holding it past reap grows memory by every batch ever written.
    data = bytes(range(256)) * 16
    fd = os.open(ring_path, os.O_RDWR | os.O_CREAT, 0o600)
    backend = open_backend(backend_name)
    try:
        baseline = sys.getrefcount(data)
        for tag in range(1, 51):
            backend.submit(fd, [Write(0, data), FDATASYNC], tag)
            assert _readable(backend.completion_fd, 5.0)
            results = backend.reap()
            while not results:
                assert _readable(backend.completion_fd, 5.0)
                results = backend.reap()
            assert [result.ok for result in results] == [True]
        assert sys.getrefcount(data) == baseline
    finally:
        backend.close()
        os.close(fd)
