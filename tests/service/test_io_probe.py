"""The daemon's io_uring probe and crash reporting, against real daemon processes.

The faults are real: tests/uring_sigill.py executes an illegal instruction in
the probe child (what the 2026 liburing wheels did on CPUs without AVX-512),
and the faulthandler test sends the daemon a real SIGSEGV.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

from ringtail.service.client import Client

from ..conftest import require_uring
from .conftest import RecordFactory

SIGILL_BINDING = ("env", "RINGTAIL_TEST_URING_BINDING=tests.uring_sigill")
TENANT_ID = 5


def _ready_line(process) -> str:
    return next(line for line in process.stderr.splitlines() if "ringtail ready" in line)


async def test_io_auto_uses_io_uring_where_it_works_never_silently_threads(daemon):
    require_uring()
    process = daemon(io="auto")
    async with await Client.connect(process.socket_path, TENANT_ID) as client:
        await client.publish(RecordFactory(TENANT_ID).records(10))
    assert _ready_line(process).endswith("io=uring")
    assert re.search(rf"tenant {TENANT_ID}: .* io=uring ", process.stderr)
    assert "io_uring unavailable" not in process.stderr


async def test_a_probe_killed_by_sigill_leaves_the_daemon_serving_on_threads(daemon):
    process = daemon(io="auto", wrapper=SIGILL_BINDING)
    factory = RecordFactory(TENANT_ID)
    records = factory.records(100)
    async with await Client.connect(process.socket_path, TENANT_ID) as client:
        ack = await client.publish(records)
    assert (ack.first_sequence, ack.last_sequence) == (0, 99)
    fallback = [line for line in process.stderr.splitlines() if "io_uring unavailable" in line]
    assert len(fallback) == 1, process.stderr
    assert re.search(r"WARNING io_uring unavailable \(the io_uring probe process was killed "
                     r"by SIGILL \(illegal instruction: native code in the io_uring binding "
                     r"needs a newer CPU than this one; report it with `lscpu` output\)\); "
                     r"using the thread backend \(pwritev\+fdatasync on a worker thread: "
                     r"same guarantees, slower per batch\)$", fallback[0]), fallback[0]
    assert _ready_line(process).endswith("io=threads")
    assert process.alive


def test_io_uring_with_a_failing_probe_exits_1_naming_the_cause(daemon):
    process = daemon(io="uring", wrapper=SIGILL_BINDING, wait=False)
    assert process.wait() == 1
    assert re.search(r"ringtail serve: --io uring: io_uring unavailable \(the io_uring probe "
                     r"process was killed by SIGILL \(illegal instruction", process.stderr)
    assert "ringtail ready" not in process.stderr
    assert "Traceback" not in process.stderr


def test_the_fallback_is_exported_as_a_metric(daemon, tmp_path):
    config = tmp_path / "metrics.toml"
    config.write_text('metrics_listen = "127.0.0.1:0"\n')
    process = daemon(io="auto", wrapper=SIGILL_BINDING, config=str(config))
    url = re.search(r"metrics listening on (http://\S+)", process.stderr).group(1)
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'ringtail_io_uring_fallback{cause="signal"} 1.0' in text


async def test_a_native_crash_of_the_daemon_is_written_to_its_log(daemon):
    """faulthandler: a real SIGSEGV leaves the signal's name and the stacks in stderr."""
    process = daemon(io="threads")
    process.send_signal(signal.SIGSEGV)
    assert await process.await_exit() == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in process.stderr
    assert re.search(r"Thread 0x[0-9a-f]+|Current thread 0x[0-9a-f]+", process.stderr)


def test_the_probe_is_runnable_by_hand(tmp_path):
    """What docs/OPERATIONS.md tells an operator to run: one JSON line, exit 0."""
    require_uring()
    child = subprocess.run([sys.executable, "-m", "ringtail.ioring.probe", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert (child.returncode, child.stdout) == (0, '{"ok": true}\n'), child.stderr
