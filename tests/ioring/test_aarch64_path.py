"""The io_uring binding's aarch64-only path, executed for real under qemu-aarch64.

NVIDIA Grace GPU hosts are aarch64, and ioring/uring_abi.py takes a path there
(libatomic load-acquire/store-release of the ring indices) that no x86_64
machine executes. tests/aarch64/run.py runs tests/aarch64/check_binding.py in
Debian's arm64 CPython under qemu-aarch64: the ordering helpers round-trip,
the struct layouts match this host's, io_uring set-up is refused cleanly
(qemu-user answers ENOSYS), and without libatomic the refusal says how to fix
it. This test found two real bugs in that path (a name-mangled libatomic
symbol, and a refusal that was not raised again) before any aarch64 host did.

The first run builds build/aarch64-sysroot (arm64 .debs and wheels, ~15 s);
later runs reuse it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "aarch64", "run.py")

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="the qemu-aarch64 check runs from x86_64 hosts")


def test_the_aarch64_ordering_and_refusal_paths_run_under_qemu():
    child = subprocess.run([sys.executable, RUNNER], capture_output=True, text=True,
                           timeout=600)
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0, child.stdout + child.stderr
    summary = lines[-1]
    assert summary["ok"] and summary["layout_matches_host"] and summary["failed"] == []
    runs = {line["expect"]: line for line in lines[:-1]}
    assert runs["libatomic"]["checks"]["ordering_kind"]["detail"] == \
        "libatomic acquire/release (aarch64)"
    assert "[ENOSYS]" in runs["libatomic"]["checks"]["backend_enosys"]["detail"]
    assert "apt-get install libatomic1" in \
        runs["no-libatomic"]["checks"]["backend_refused_twice"]["detail"]
