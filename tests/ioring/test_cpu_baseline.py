"""The daemon's native code runs on x86-64 CPUs without AVX-512 (checked under qemu-user).

Why: the PyPI `liburing` 2026 wheels were built for their build machine's CPU
and died with SIGILL (`vmovups %zmm0`) on AVX2-only machines, the kind most
servers are (shared/notes/iouring-from-python.md). A signal cannot be caught,
so the only guard is to run the daemon's native calls on an emulated CPU that
lacks the newer instructions: `qemu-x86_64 -cpu Haswell` offers AVX2 and no
AVX-512 (x86-64-v3), `-cpu Nehalem` offers SSE4.2 and no AVX (x86-64-v2).

The child (`CHILD_SOURCE`) imports everything `ringtail serve` imports and makes
the calls the daemon makes: records encoded with struct and with numpy, blake3
over a 64 KiB batch and per chunk (whole and resumed from a partial chunk's
hasher, as ioring/format.py does), the vectorised publish checks and replay
filter, a ring written by the thread backend inside Trio and read back and
recovered, an OpenSSL context, and `UringBackend()`, which qemu-user refuses
with ENOSYS (it does not emulate io_uring). The computed bytes must equal those
of the same child run natively.

Measured on qemu 7.2 (Debian 12) with numpy 2.4.6: the child passes under
Haswell and Nehalem; under `-cpu qemu64` (x86-64-v1) importing numpy dies with
SIGILL (its wheels' baseline is x86-64-v2: `pinsrq` in module set-up), so
x86-64-v2 is the floor and qemu64 is not tested. The child takes 5-7 s under
emulation (importing numpy is most of it).

The guard can fail: qemu enforces each model's instruction set, so a test runs
one instruction just above each model's level and expects SIGILL, and one at
its level and expects success.
"""

from __future__ import annotations

import json
import pathlib
import platform
import shutil
import signal
import subprocess
import sys

import pytest

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parents[2]
# One emulated child run; measured 5-7 s on a 2-vCPU EPYC, so this only stops
# a hang from eating the suite.
QEMU_RUN_TIMEOUT_S = 60
# (qemu CPU model, x86-64 level). Haswell is the level the daemon must run on;
# Nehalem is the lowest that passes (numpy needs x86-64-v2, see above).
CPU_MODELS = [("Haswell", "x86-64-v3"), ("Nehalem", "x86-64-v2")]
# Machine code for one instruction (each followed by `ret` when run), as
# `as` encodes it. Keys are the x86-64 level the instruction needs.
INSTRUCTIONS = {
    "x86-64-v2": ("ptest %xmm0,%xmm0", "660f3817c0"),  # SSE4.1
    "x86-64-v3": ("vpxor %ymm0,%ymm0,%ymm0", "c5fdefc0"),  # AVX2
    "x86-64-v4": ("vpxord %zmm0,%zmm0,%zmm0", "62f17d48efc0"),  # AVX-512F (EVEX)
}
LEVEL_ABOVE = {"x86-64-v2": "x86-64-v3", "x86-64-v3": "x86-64-v4"}

if platform.machine() != "x86_64":
    pytest.skip(f"CPU-baseline checks emulate x86-64 CPU models; this machine is "
                f"{platform.machine()}", allow_module_level=True)


@pytest.fixture(scope="module")
def qemu() -> str:
    """Path of qemu-x86_64; a missing one fails the test (never a silent skip)."""
    path = shutil.which("qemu-x86_64")
    if path is None:
        pytest.fail("qemu-x86_64 is not installed, so the CPU-baseline guard cannot run; "
                    "run `make test` (it installs Debian's qemu-user) or "
                    "`apt-get install qemu-user`")
    return path


def python_command(arguments: list[str], cpu_model: str | None, qemu_path: str | None
                   ) -> list[str]:
    """The venv's Python with `arguments`, emulated on `cpu_model` unless it is None."""
    command = [sys.executable, *arguments]
    if cpu_model is not None:
        command = [qemu_path, "-cpu", cpu_model, *command]
    return command


def start_python(arguments: list[str], cpu_model: str | None, qemu_path: str | None
                 ) -> subprocess.Popen:
    return subprocess.Popen(python_command(arguments, cpu_model, qemu_path),
                            cwd=REPOSITORY_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_python(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a start_python process (at most QEMU_RUN_TIMEOUT_S) and return its result."""
    try:
        stdout, stderr = process.communicate(timeout=QEMU_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"{' '.join(process.args[:4])} ... did not finish within "
                    f"{QEMU_RUN_TIMEOUT_S} s")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def describe_status(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    if returncode == 128 + signal.SIGILL:
        return "exit status 132 (a shell's report of SIGILL)"
    return f"exit status {returncode}"


CHILD_SOURCE = r'''
import json, os, ssl, tempfile, time
started = time.monotonic()
import blake3, numpy, trio
import ringtail.service.cli, ringtail.service.server  # everything `ringtail serve` imports
from ringtail.ioring.errors import BackendUnavailableError
from ringtail.ioring.format import (CHUNK_RECORD_COUNT, RECORD_SIZE_BYTES, Header, checksum,
                                    chunk_checksum, decode_header, encode_batch_entries)
from ringtail.ioring.record import RECORD_DTYPE, RECORD_MAGIC, SlotRecord, as_array
from ringtail.ioring.ring import open_ring
from ringtail.ioring.uring import UringBackend
from ringtail.service.gate import publish_problem
from ringtail.service.subscribers import RecordFilter
imported = time.monotonic()

TENANT_ID = 7
FILE_ID = 0x1234
COUNT = 1024  # one full 64 KiB batch
SPLIT = 100  # records in a first append that ends inside a chunk
report = {}

# Records: struct encoding == numpy encoding (filled by column), and back.
records = [SlotRecord(timestamp_ns=1_700_000_000_000_000_000 + n * 1000, slot_idx=n,
                      tenant_id=TENANT_ID, opcode=n % 16, args=(n, n + 1, n + 2, n + 3),
                      epoch=n % 5, slot_status=n % 3, failure_class=n % 6,
                      backend_code=n % 7, output_digest=n * 0x9E3779B97F4A7C15 % 2**64)
           for n in range(COUNT)]
batch = b"".join(record.encode() for record in records)
array = numpy.zeros(COUNT, dtype=RECORD_DTYPE)
array["magic"] = RECORD_MAGIC
for name in ("timestamp_ns", "slot_idx", "tenant_id", "opcode", "args", "epoch",
             "slot_status", "failure_class", "backend_code", "output_digest"):
    array[name] = [getattr(record, name) for record in records]
assert array.tobytes() == batch, "numpy and struct encodings differ"
assert [SlotRecord.decode(batch[n * RECORD_SIZE_BYTES:(n + 1) * RECORD_SIZE_BYTES])
        for n in (0, 511, COUNT - 1)] == [records[0], records[511], records[-1]]
digest_sum = int(as_array(batch)["output_digest"].sum(dtype=numpy.uint64))
assert digest_sum == sum(record.output_digest for record in records) % 2**64
report["records"] = {"count": COUNT, "size_bytes": len(batch), "digest_sum": digest_sum}

# blake3: a known answer, the batch, chunk entries whole and resumed mid-chunk.
assert blake3.blake3(b"").hexdigest() == (
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
whole, _ = encode_batch_entries(FILE_ID, 0, batch, None)
head, tail_hasher = encode_batch_entries(FILE_ID, 0, batch[:SPLIT * RECORD_SIZE_BYTES], None)
rest, _ = encode_batch_entries(FILE_ID, SPLIT, batch[SPLIT * RECORD_SIZE_BYTES:], tail_hasher)
assert head[0] == whole[0] and rest == whole[1:], "resumed chunk hashes differ"
assert whole[0][1][16:] == chunk_checksum(
    FILE_ID, 0, batch[:CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES])
header = Header(generation=3, capacity=4096, oldest_sequence=0, next_sequence=COUNT,
                batch_first_sequence=0, tenant_id=TENANT_ID, created_ns=1, file_id=FILE_ID)
assert decode_header(header.encode()) == header
report["blake3"] = {"batch": blake3.blake3(batch).hexdigest(),
                    "batch_checksum": checksum(batch).hex(),
                    "chunk_entries": [entry.hex() for _, entry in whole]}

# The vectorised checks of publish (publish_problem over ioring's check_records)
# and of filtered replay.
assert publish_problem(batch, TENANT_ID) is None
bad = bytearray(batch)
bad[700 * RECORD_SIZE_BYTES:700 * RECORD_SIZE_BYTES + 4] = (0x0BADF00D).to_bytes(4, "little")
bad_magic = publish_problem(bytes(bad), TENANT_ID)
wrong_tenant = publish_problem(batch, TENANT_ID + 1)
selected = RecordFilter(opcodes=frozenset({3, 9}), epoch_min=1, epoch_max=3,
                        failure_only=True).select(batch)
report["checks"] = {"bad_magic": [bad_magic[0].name, bad_magic[1]],
                    "wrong_tenant": [wrong_tenant[0].name, wrong_tenant[1]],
                    "filter_selected": selected.tolist()}

# A ring written by the thread backend inside Trio (completion fd), read back,
# recovered on reopen; then what io=auto chooses here.
async def write_and_read(path):
    with open_ring(path, capacity=4096, tenant_id=TENANT_ID, io="threads",
                   sync="batch") as ring:
        ring.submit(batch)
        while not ring.reap():
            await trio.lowlevel.wait_readable(ring.completion_fd)
        assert ring.read(0, COUNT) == batch
    with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
        assert ring.next_sequence == COUNT and ring.read(0, COUNT) == batch
    with open_ring(path, tenant_id=TENANT_ID, io="auto") as ring:
        return ring.backend

with tempfile.TemporaryDirectory() as directory:
    auto_backend = trio.run(write_and_read, os.path.join(directory, "tenant.ring"))
report["ring"] = {"read_back": True, "auto_backend": auto_backend}

ssl.create_default_context()  # OpenSSL picks its code paths by CPUID

try:
    UringBackend().close()
    report["uring"] = {"constructed": True}
except BackendUnavailableError as error:
    report["uring"] = {"constructed": False, "error": type(error).__name__,
                       "message": str(error)}

with open("/proc/self/maps") as maps:
    paths = {line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]}
report["native_libraries"] = sorted(os.path.basename(path) for path in paths)
report["seconds"] = {"import": round(imported - started, 2),
                     "total": round(time.monotonic() - started, 2)}
print(json.dumps(report))
'''

# Computed bytes that must not depend on the CPU the child runs on.
COMPUTED_SECTIONS = ("records", "blake3", "checks")
# Native code the daemon loads (seen in a running daemon's /proc/PID/maps):
# the child must have exercised each.
NATIVE_LIBRARY_PREFIXES = ("blake3.", "_multiarray_umath.", "_umath_linalg.",
                           "libscipy_openblas", "_ssl.", "libcrypto.", "_ctypes.")


def child_report(result: subprocess.CompletedProcess, cpu_model: str | None) -> dict:
    """The child's report; fails naming how it died where it did not finish."""
    where = f"under qemu -cpu {cpu_model}" if cpu_model else "natively"
    assert result.returncode == 0, (
        f"the daemon's native calls failed {where}: {describe_status(result.returncode)} "
        f"(SIGILL means a library uses instructions this CPU lacks); stderr:\n"
        f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def child_results(qemu) -> dict[str | None, subprocess.CompletedProcess]:
    """The child's run natively (key None) and under each CPU model, all started at
    once: each emulated run is one CPU-bound process of 5-7 s, so on a machine with
    two cores or more they take the time of one instead of the sum."""
    started = {model: start_python(["-c", CHILD_SOURCE], model, qemu if model else None)
               for model in [None, *(model for model, _ in CPU_MODELS)]}
    try:
        return {model: finish_python(process) for model, process in started.items()}
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def native_report(child_results) -> dict:
    return child_report(child_results[None], None)


@pytest.mark.parametrize("cpu_model, level", CPU_MODELS)
def test_daemon_native_calls_run_on_an_emulated_cpu_without_avx512(
        child_results, native_report, cpu_model, level):
    report = child_report(child_results[cpu_model], cpu_model)

    for section in COMPUTED_SECTIONS:
        assert report[section] == native_report[section], (
            f"{section} computed under -cpu {cpu_model} differs from the native run")
    assert report["checks"]["bad_magic"] == ["BAD_RECORD_MAGIC", 700]
    assert report["checks"]["wrong_tenant"] == ["WRONG_TENANT", 0]
    assert report["ring"] == {"read_back": True, "auto_backend": "threads"}
    # qemu-user does not emulate io_uring: its syscalls answer ENOSYS.
    uring = report["uring"]
    assert uring["constructed"] is False
    assert uring["error"] == "BackendUnavailableError"
    assert "[ENOSYS]" in uring["message"], uring["message"]
    for prefix in NATIVE_LIBRARY_PREFIXES:
        assert any(name.startswith(prefix) for name in report["native_libraries"]), (
            f"the child never loaded {prefix}*; loaded: {report['native_libraries']}")


INSTRUCTION_SOURCE = r'''
import ctypes, mmap, sys
code = bytes.fromhex(sys.argv[1]) + b"\xc3"  # the instruction, then ret
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
print("ran")
'''


@pytest.mark.parametrize("cpu_model, level", CPU_MODELS)
def test_an_instruction_above_the_emulated_level_dies_with_sigill(qemu, cpu_model, level):
    allowed_text, allowed_code = INSTRUCTIONS[level]
    above_text, above_code = INSTRUCTIONS[LEVEL_ABOVE[level]]
    # Both emulated runs at once (independent processes), then their checks in turn.
    allowed = start_python(["-c", INSTRUCTION_SOURCE, allowed_code], cpu_model, qemu)
    above = start_python(["-c", INSTRUCTION_SOURCE, above_code], cpu_model, qemu)
    result, above_result = finish_python(allowed), finish_python(above)
    assert (result.returncode, result.stdout) == (0, "ran\n"), (
        f"{allowed_text} ({level}) should run under -cpu {cpu_model}: "
        f"{describe_status(result.returncode)}; stderr:\n{result.stderr[-2000:]}")

    result = above_result
    assert result.returncode == -signal.SIGILL, (
        f"{above_text} ({LEVEL_ABOVE[level]}) should die with SIGILL under -cpu {cpu_model}, "
        f"so the guard above can fail; got {describe_status(result.returncode)}")
