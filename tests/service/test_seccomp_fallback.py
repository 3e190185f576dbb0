"""io_uring refused for real: the daemon under a seccomp filter like Docker's default.

tests/seccomp_exec.py installs a filter (everything allowed; io_uring_setup,
io_uring_enter and io_uring_register fail with EPERM, as under Docker >= 25
and containerd 2) and execs the daemon, so the refusal comes from the kernel,
not from a monkeypatch. With `--io auto` the daemon says once why it fell back
and serves on the thread backend; with `--io uring` it exits 1 naming the cause.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import trio

from ringtail.service.client import Client
from tests.service.conftest import (DAEMON_READY_TIMEOUT_S, REPO_ROOT, RecordFactory,
                                    read_all)

SECCOMP_WRAPPER = (sys.executable, os.fspath(REPO_ROOT / "tests" / "seccomp_exec.py"))
FALLBACK_MARKER = "io_uring unavailable ("
TIMEOUT_S = 60
# io_uring_setup, io_uring_enter, io_uring_register: the generic syscall
# numbers, the same on x86_64 and aarch64.
IO_URING_SYSCALL_NUMBERS = {"io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427}

if platform.machine() not in ("x86_64", "aarch64"):
    pytest.skip(f"the io_uring syscall numbers here are x86_64's and aarch64's; this machine "
                f"is {platform.machine()}", allow_module_level=True)

# Each io_uring syscall with arguments the kernel rejects cheaply (0 entries,
# fd -1), so without the filter none answers EPERM and none makes a ring.
SYSCALL_SOURCE = r'''
import ctypes, errno, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
calls = {"io_uring_setup": (425, ctypes.c_long(0), params),
         "io_uring_enter": (426, ctypes.c_long(-1), ctypes.c_long(0), ctypes.c_long(0),
                            ctypes.c_long(0), None, ctypes.c_long(0)),
         "io_uring_register": (427, ctypes.c_long(-1), ctypes.c_long(0), None,
                               ctypes.c_long(0))}
answers = {}
for name, (number, *arguments) in calls.items():
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *arguments)
    answers[name] = "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(answers))
'''


def io_uring_syscall_answers(wrapper: tuple[str, ...]) -> dict[str, str]:
    result = subprocess.run([*wrapper, sys.executable, "-c", SYSCALL_SOURCE],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_launcher_refuses_every_io_uring_syscall_with_eperm():
    unfiltered = io_uring_syscall_answers(())
    assert "EPERM" not in unfiltered.values(), (
        f"this machine already refuses io_uring ({unfiltered}): the tests below cannot "
        f"tell the launcher's refusal from the host's")
    assert set(unfiltered) == set(IO_URING_SYSCALL_NUMBERS)

    assert io_uring_syscall_answers(SECCOMP_WRAPPER) == dict.fromkeys(
        IO_URING_SYSCALL_NUMBERS, "EPERM")


def fallback_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if FALLBACK_MARKER in line]


async def test_io_auto_under_seccomp_says_why_once_and_serves_on_threads(daemon):
    server = daemon(io="auto", sync="batch", wrapper=SECCOMP_WRAPPER)
    [ready] = [line for line in server.run_stderr.splitlines() if "ringtail ready" in line]
    assert "io=threads" in ready, ready

    # Two tenants: two ring files opened after the fallback, still one line.
    factories = {tenant_id: RecordFactory(tenant_id, seed=tenant_id) for tenant_id in (1, 2)}
    published = {tenant_id: factory.records(300) for tenant_id, factory in factories.items()}
    with trio.fail_after(TIMEOUT_S):
        for tenant_id, data in published.items():
            async with await Client.connect(server.socket_path, tenant_id) as client:
                [ack] = await client.publish_many([data])
            assert (ack.first_sequence, ack.last_sequence) == (0, 299)
        for tenant_id, data in published.items():
            replay = await read_all(server.socket_path, tenant_id)
            assert replay.gaps == [] and replay.sequences == list(range(300))
            assert replay.data == data

    assert server.stop() == 0
    lines = fallback_lines(server.stderr)
    assert len(lines) == 1, f"expected one fallback line; stderr:\n{server.stderr}"
    assert "EPERM" in lines[0], lines[0]


def test_io_uring_under_seccomp_exits_1_naming_eperm(daemon):
    server = daemon(io="uring", wrapper=SECCOMP_WRAPPER, wait=False)
    try:  # refusing should take no longer than getting ready
        status = server.process.wait(timeout=DAEMON_READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ringtail serve --io uring kept running with io_uring refused; "
                    f"stderr:\n{server.stderr}")
    assert status == 1, server.stderr
    assert "EPERM" in server.stderr and "io_uring" in server.stderr, server.stderr
    assert "ringtail ready" not in server.stderr
