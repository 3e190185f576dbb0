"""Probe io_uring once, in a child process, before any ring uses it.

A native fault (SIGILL from code built for a newer CPU, SIGSEGV) cannot be
caught by `try`, and a hang in a binding cannot be interrupted from Python:
either would take the daemon with it. So the daemon's exact calls run first in
a child (`python -m ringtail.ioring.probe DIR`): set up a ring and its eventfd, one good
linked chain (write, write, fdatasync) on a temporary file in DIR, one failing
chain (a write to a read-only descriptor, then fdatasync: the write fails with
EBADF and the fdatasync is cancelled), a check of the file's bytes, teardown.
The child prints one JSON line. The parent reads it, or the signal that killed
the child, or the timeout, and turns it into a ProbeResult whose `message` is
the one log line an operator needs: the cause and the fix.

Measured: the probe takes about 0.3 s (most of it starting Python and numpy).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

# Seconds the child may take. A healthy probe takes ~0.3 s; a slow-flush disk
# adds one fdatasync (measured up to ~8 ms p99 here). Past this, the binding
# or the disk is hung, and the daemon must not wait on it.
PROBE_TIMEOUT_S = 10.0
# Test hook: a module with a `UringBackend` class the child uses instead of
# ioring.uring (tests/ioring/faulty_bindings.py raises a real SIGILL there).
# Read only by the probe child, never by the daemon's own write path.
BINDING_ENVIRONMENT_VARIABLE = "RINGTAIL_TEST_URING_BINDING"
DEFAULT_BINDING = "ringtail.ioring.uring"

_GOOD_DATA_BYTES = 4096 + 128  # one data block and one header-sized write
_FALLBACK = ("using the thread backend (pwritev+fdatasync on a worker thread: same "
             "guarantees, slower per batch)")

# What a signal that killed the child most likely means, and what to do.
SIGNAL_CAUSES = {
    signal.SIGILL: "illegal instruction: native code in the io_uring binding needs a "
                   "newer CPU than this one; report it with `lscpu` output",
    signal.SIGSEGV: "segmentation fault in native code; report it with the kernel version",
    signal.SIGBUS: "bus error in native code; report it with the kernel version",
    signal.SIGABRT: "the binding aborted; report it with the probe's stderr",
    signal.SIGKILL: "killed (the out-of-memory killer, or a resource limit)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the probe found.

    Attributes:
        ok: io_uring ran the daemon's calls correctly here.
        cause: "" when ok; else one of "refused" (set-up answered EPERM,
            ENOSYS, EINVAL...), "signal" (the child was killed by a signal),
            "timeout", "failed" (the calls misbehaved or the child broke).
        message: one line for the log: what happened and what to do.
        duration_s: wall time of the probe.
    """

    ok: bool
    cause: str
    message: str
    duration_s: float

    def fallback_line(self) -> str:
        return f"io_uring unavailable ({self.message}); {_FALLBACK}"


def probe_uring(directory: str | os.PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the probe child against a temporary file in `directory` and judge it."""
    directory = os.fspath(directory)
    import ringtail  # the directory holding the `ringtail` package goes on the child's path
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(ringtail.__file__)))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [package_parent] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else []))
    environment["PYTHONFAULTHANDLER"] = "1"  # a native crash names its frame on stderr
    started = time.monotonic()
    try:
        child = subprocess.run([sys.executable, "-m", "ringtail.ioring.probe", directory],
                               capture_output=True, text=True, timeout=timeout_s,
                               env=environment, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, "timeout",
                           f"the io_uring probe did not finish within {timeout_s:g} s "
                           "(PROBE_TIMEOUT_S): io_uring or the disk under "
                           f"{directory} hangs; check dmesg, or run with --io threads",
                           time.monotonic() - started)
    except OSError as error:
        return ProbeResult(False, "failed", f"the io_uring probe could not start: {error}",
                           time.monotonic() - started)
    duration_s = time.monotonic() - started
    if child.returncode < 0:
        number = -child.returncode
        try:
            name = signal.Signals(number).name
            meaning = SIGNAL_CAUSES.get(signal.Signals(number), "killed by a signal")
        except ValueError:
            name, meaning = f"signal {number}", "killed by a signal"
        return ProbeResult(False, "signal",
                           f"the io_uring probe process was killed by {name} ({meaning})",
                           duration_s)
    report = _last_json_line(child.stdout)
    if child.returncode != 0 or report is None:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult(False, "failed",
                           f"the io_uring probe exited with status {child.returncode}: {tail}",
                           duration_s)
    if report.get("ok"):
        return ProbeResult(True, "", "io_uring works here", duration_s)
    return ProbeResult(False, report.get("cause", "failed"), report.get("message", "?"),
                       duration_s)


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# -- the child --------------------------------------------------------------------


def _wait_results(backend, count: int) -> list:
    results: list = []
    while len(results) < count:
        select.select([backend.completion_fd], [], [])  # the parent's timeout bounds this
        results += backend.reap()
    return results


def run_probe(directory: str) -> dict:
    """The daemon's exact calls on a temporary file in `directory`. Returns the report."""
    from ringtail.ioring.chain import FDATASYNC, Write
    from ringtail.ioring.errors import BackendUnavailableError

    binding = importlib.import_module(os.environ.get(BINDING_ENVIRONMENT_VARIABLE)
                                      or DEFAULT_BINDING)
    try:
        backend = binding.UringBackend()
    except BackendUnavailableError as error:
        return {"ok": False, "cause": "refused", "message": str(error)}
    fd, path = tempfile.mkstemp(prefix=".ringtail-io-probe-", dir=directory)
    read_only = -1
    try:
        good = bytes(range(256)) * 16 + b"\x5a" * 128
        assert len(good) == _GOOD_DATA_BYTES
        backend.submit(fd, [Write(0, good[:4096]), Write(4096, good[4096:]), FDATASYNC], 1)
        first = _wait_results(backend, 1)
        read_only = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        backend.submit(read_only, [Write(0, b"\xff" * 64), FDATASYNC], 2)
        second = _wait_results(backend, 1)
        stored = os.pread(fd, _GOOD_DATA_BYTES + 1, 0)
        backend.close()
    finally:
        if read_only >= 0:
            os.close(read_only)
        os.close(fd)
        os.unlink(path)
    problems = []
    if [(r.tag, r.errno) for r in first] != [(1, 0)]:
        problems.append(f"a good chain gave {first!r}, not one success")
    if [(r.tag, r.errno) for r in second] != [(2, errno.EBADF)]:
        problems.append(f"a failing chain gave {second!r}, not one EBADF")
    if stored != good:
        problems.append("the file does not hold the good chain's bytes")
    if problems:
        return {"ok": False, "cause": "failed",
                "message": "io_uring chains misbehave here: " + "; ".join(problems)
                           + "; run with --io threads and report it"}
    return {"ok": True}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ringtail.ioring.probe DIRECTORY", file=sys.stderr)
        return 2
    print(json.dumps(run_probe(argv[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
