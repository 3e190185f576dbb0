"""Storage-engine benchmark: RingFile driven from Trio, against the disk's ceiling.

A benchmark, not a test: it prints a table and asserts nothing. Run it from the
repository root::

    .venv/bin/python bench/engine.py              # full run, about 80 s
    .venv/bin/python bench/engine.py --quick      # about 15 s, noisier
    .venv/bin/python bench/engine.py --write-doc  # also rewrite the engine
                                                  # section of docs/BENCHMARKS.md

What one cell measures (batch sizes 1, 64, 1,024 and 4,096 records):

- engine: `RingFile.submit(batch)`, then `await
  trio.lowlevel.wait_readable(ring.completion_fd)`, then `ring.reap()`, in a
  loop, one batch in flight, exactly as the daemon drives a tenant's ring;
  backends `uring` and `threads`, `sync="none"` and `sync="batch"`. The batches
  are a fixed list of pre-built `bytes`, so building records is not measured.
- ceiling: a plain loop of `os.pwritev` of the same batch (64-byte records) at
  sequential offsets of a file of the same size, with and without an
  `os.fdatasync` after each batch. No Trio, no header, no checksums: the most
  a single-threaded writer can get from this disk at that commit size.

Per-batch time is submit-to-reap (engine) or pwritev-to-fdatasync-return
(ceiling). Records/s is records written over the cell's measured wall time.
For one batch size the six variants run interleaved, in several rounds of a
slice each, so drifts and other processes' bursts hit all of them alike.

Files live in a temporary directory on the same file system as the repository
(never tmpfs), are zero-filled and fsynced before timing (so fdatasync never
pays block allocation: the ring's steady state after its first wrap), are
fdatasynced between cells (so one cell's dirty pages are not flushed on the
next cell's clock), and are removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import re
import select
import shlex
import subprocess
import sys
import tempfile
import time

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:  # `python bench/engine.py` puts bench/ first
    sys.path.insert(0, _REPOSITORY)

from ringtail.bench.doc import DOC_PATH, update_section  # noqa: E402

import numpy  # noqa: E402
import trio  # noqa: E402

from ringtail.ioring import (RECORD_DTYPE, RECORD_MAGIC, RECORD_SIZE_BYTES,  # noqa: E402
                             BackendUnavailableError, Layout, open_ring)

BATCH_RECORD_COUNTS = (1, 64, 1024, 4096)
BACKENDS = ("uring", "threads")
SYNCS = ("none", "batch")
# 64 MiB of records per file: large enough that a cell's batches stay in one
# pass or wrap a few times, small enough to zero-fill in well under a second.
RING_CAPACITY_RECORD_COUNT = 1 << 20
TENANT_ID = 7
# Distinct pre-built batches per cell, capped at 16 MiB of records in all.
BATCH_POOL_COUNT_MAX = 64
BATCH_POOL_RECORD_COUNT_MAX = 1 << 18
# Measured time per cell, split over interleaved rounds (see run_all); each
# slice starts with an unrecorded warm-up of WARMUP_FRACTION of its time.
CELL_SECONDS_FULL = 2.5
CELL_SECONDS_QUICK = 0.35
ROUND_COUNT_FULL = 5
ROUND_COUNT_QUICK = 2
WARMUP_FRACTION = 0.15
# Bounds the per-batch timing list (8 bytes each as numpy int64 later).
CELL_BATCH_COUNT_MAX = 2_000_000
# The headline comparison and its target.
HEADLINE_BATCH_RECORD_COUNT = 1024
HEADLINE_TARGET_PERCENT = 60.0
ZERO_FILL_STEP_BYTES = 1 << 20

DOC_SECTION_TITLE = "## Storage engine (bench/engine.py)"

assert RING_CAPACITY_RECORD_COUNT % max(BATCH_RECORD_COUNTS) == 0
assert BATCH_POOL_RECORD_COUNT_MAX >= max(BATCH_RECORD_COUNTS)


@dataclasses.dataclass(frozen=True, slots=True)
class CellResult:
    batch_record_count: int
    kind: str  # "plain" or "engine"
    backend: str  # "pwritev" for the plain loop
    sync: str
    batch_count: int
    seconds: float
    batch_us_p50: float
    batch_us_p99: float

    @property
    def records_per_second(self) -> float:
        return self.batch_count * self.batch_record_count / self.seconds

    @property
    def label(self) -> str:
        if self.kind == "plain":
            return ("plain os.pwritev + os.fdatasync" if self.sync == "batch"
                    else "plain os.pwritev, no sync")
        return f"engine {self.backend}, sync={self.sync} (Trio)"


# -- inputs ----------------------------------------------------------------------


def build_batches(batch_record_count: int) -> list[bytes]:
    """A fixed pool of distinct, valid record batches (built once, untimed)."""
    pool_count = max(2, min(BATCH_POOL_COUNT_MAX,
                            BATCH_POOL_RECORD_COUNT_MAX // batch_record_count))
    total = pool_count * batch_record_count
    records = numpy.zeros(total, dtype=RECORD_DTYPE)
    index = numpy.arange(total, dtype=numpy.uint64)
    records["magic"] = RECORD_MAGIC
    records["timestamp_ns"] = time.time_ns() + index
    records["slot_idx"] = index % 4096
    records["tenant_id"] = TENANT_ID
    records["opcode"] = index % 7
    records["args"] = index[:, None] % 1000
    records["epoch"] = 1
    records["output_digest"] = index * numpy.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    data = records.tobytes()
    size = batch_record_count * RECORD_SIZE_BYTES
    return [data[offset:offset + size] for offset in range(0, len(data), size)]


def zero_fill(fd: int, offset: int, end: int) -> None:
    """Write zeros over [offset, end) and make them durable (allocates blocks)."""
    zeros = bytes(ZERO_FILL_STEP_BYTES)
    view = memoryview(zeros)
    while offset < end:
        step = min(ZERO_FILL_STEP_BYTES, end - offset)
        offset += os.pwrite(fd, view[:step], offset)
    os.fsync(fd)


def prepare_ring(path: str) -> None:
    """Create a ring file and zero-fill its data region (headers untouched)."""
    open_ring(path, capacity=RING_CAPACITY_RECORD_COUNT, tenant_id=TENANT_ID,
              io="threads").close()
    layout = Layout(RING_CAPACITY_RECORD_COUNT)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        zero_fill(fd, layout.data_offset, layout.file_size_bytes)
    finally:
        os.close(fd)


def flush_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def summarize(batch_record_count: int, kind: str, backend: str, sync: str,
              slices: "Slices") -> CellResult:
    values = numpy.asarray(slices.durations_ns, dtype=numpy.int64) / 1000.0
    return CellResult(batch_record_count, kind, backend, sync, len(slices.durations_ns),
                      slices.elapsed_ns / 1e9,
                      float(numpy.percentile(values, 50)),
                      float(numpy.percentile(values, 99)))


# -- the two loops ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Slices:
    """What the slices of one cell measured so far (merged into a CellResult)."""

    durations_ns: list[int] = dataclasses.field(default_factory=list)
    elapsed_ns: int = 0
    batch_index: int = 0  # which pooled batch comes next
    offset: int = 0  # plain loop only: where the next batch goes


def run_plain_slice(fd: int, batches: list[bytes], sync: str, seconds: float,
                    slices: Slices) -> None:
    """The ceiling: pwritev (+ fdatasync) per batch at sequential offsets."""
    file_size = RING_CAPACITY_RECORD_COUNT * RECORD_SIZE_BYTES
    batch_size = len(batches[0])
    pool_count = len(batches)
    clock = time.perf_counter_ns
    pwritev, fdatasync = os.pwritev, os.fdatasync
    do_sync = sync == "batch"

    def one() -> None:
        pwritev(fd, [batches[slices.batch_index % pool_count]], slices.offset)
        if do_sync:
            fdatasync(fd)
        slices.batch_index += 1
        slices.offset = (slices.offset + batch_size) % file_size

    warm_end = clock() + int(seconds * WARMUP_FRACTION * 1e9)
    while clock() < warm_end:
        one()
    durations = slices.durations_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    now = start
    while now < deadline and len(durations) < CELL_BATCH_COUNT_MAX:
        one()
        finished = clock()
        durations.append(finished - now)
        now = finished
    slices.elapsed_ns += now - start


async def run_engine_slice(ring, batches: list[bytes], seconds: float,
                           slices: Slices) -> None:
    """The daemon's loop: submit, wait on the completion fd, reap; one in flight."""
    pool_count = len(batches)
    clock = time.perf_counter_ns
    submit, reap = ring.submit, ring.reap
    wait_readable = trio.lowlevel.wait_readable
    completion_fd = ring.completion_fd

    async def one() -> None:
        submit(batches[slices.batch_index % pool_count])
        slices.batch_index += 1
        while True:
            await wait_readable(completion_fd)
            if reap():
                return

    warm_end = clock() + int(seconds * WARMUP_FRACTION * 1e9)
    while clock() < warm_end:
        await one()
    durations = slices.durations_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    now = start
    while now < deadline and len(durations) < CELL_BATCH_COUNT_MAX:
        await one()
        finished = clock()
        durations.append(finished - now)
        now = finished
    slices.elapsed_ns += now - start


# -- the run ------------------------------------------------------------------------


async def run_all(directory: str, seconds: float, rounds: int, progress) -> list[CellResult]:
    """Every cell, batch size by batch size.

    For one batch size the variants run interleaved: `rounds` rounds, each
    giving every variant `seconds / rounds`, so that slow drifts and bursts
    from other processes on the machine hit every variant alike.
    """
    plain_path = os.path.join(directory, "plain.dat")
    fd = os.open(plain_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    rings = {}
    try:
        zero_fill(fd, 0, RING_CAPACITY_RECORD_COUNT * RECORD_SIZE_BYTES)
        for backend in BACKENDS:
            for sync in SYNCS:
                path = os.path.join(directory, f"{backend}-{sync}.ring")
                prepare_ring(path)
                try:
                    rings[backend, sync] = (open_ring(path, tenant_id=TENANT_ID, io=backend,
                                                      sync=sync), path)
                except BackendUnavailableError as error:
                    progress(f"skipping backend {backend}: {error}")
        results = []
        slice_seconds = seconds / rounds
        for batch_record_count in BATCH_RECORD_COUNTS:
            batches = build_batches(batch_record_count)
            plain = {sync: Slices() for sync in SYNCS}
            engine = {key: Slices() for key in rings}
            for _ in range(rounds):
                for sync in SYNCS:
                    gc.collect()
                    run_plain_slice(fd, batches, sync, slice_seconds, plain[sync])
                    os.fdatasync(fd)  # untimed: leave no dirty pages to the next slice
                for key, (ring, path) in rings.items():
                    gc.collect()
                    await run_engine_slice(ring, batches, slice_seconds, engine[key])
                    flush_file(path)
            for sync in SYNCS:
                results.append(summarize(batch_record_count, "plain", "pwritev", sync,
                                         plain[sync]))
                progress(format_row(results[-1], None))
            for (backend, sync), slices in engine.items():
                results.append(summarize(batch_record_count, "engine", backend, sync, slices))
                progress(format_row(results[-1], None))
        return results
    finally:
        for ring, _ in rings.values():
            ring.close()
        os.close(fd)


# -- the binding's own cost per chain ----------------------------------------------

# One chain as the daemon's 1,024-record batch writes it at its simplest: 64 KiB
# of records, a 128-byte header, fdatasync (the notes' reference chain).
BINDING_CHAIN_DATA_BYTES = 64 * 1024
BINDING_CHAIN_HEADER_BYTES = 128
BINDING_CHAIN_COUNT_FULL = 2000
BINDING_CHAIN_COUNT_QUICK = 300


@dataclasses.dataclass(frozen=True, slots=True)
class BindingResult:
    variant: str
    sync: str
    chain_us_p50: float
    chain_us_p99: float


def run_binding(directory: str, chain_count: int) -> list[BindingResult]:
    """The same chain, interleaved, through: the plain calls inline, our io_uring
    binding (submit, select on the eventfd, reap: no Trio) and the thread backend.
    """
    from ringtail.ioring.chain import FDATASYNC, Write
    from ringtail.ioring.threads import ThreadBackend
    from ringtail.ioring.uring import UringBackend

    path = os.path.join(directory, "binding.dat")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    data = bytes(range(256)) * (BINDING_CHAIN_DATA_BYTES // 256)
    header = b"\x5a" * BINDING_CHAIN_HEADER_BYTES
    header_offset = BINDING_CHAIN_DATA_BYTES + 4096
    zero_fill(fd, 0, header_offset + 4096)
    backends = {"threads": ThreadBackend()}
    try:
        backends["uring"] = UringBackend()
    except BackendUnavailableError:
        pass
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for index in range(chain_count):
            for sync in SYNCS:
                operations = [Write(0, data), Write(header_offset, header)]
                if sync == "batch":
                    operations.append(FDATASYNC)
                started = time.perf_counter()
                os.pwrite(fd, data, 0)
                os.pwrite(fd, header, header_offset)
                if sync == "batch":
                    os.fdatasync(fd)
                samples.setdefault(("plain pwrite x2 (+ fdatasync)", sync), []).append(
                    time.perf_counter() - started)
                for name, backend in backends.items():
                    started = time.perf_counter()
                    backend.submit(fd, operations, index)
                    results = []
                    while not results:
                        select.select([backend.completion_fd], [], [])
                        results = backend.reap()
                    samples.setdefault((f"{name} backend chain", sync), []).append(
                        time.perf_counter() - started)
                    assert [result.ok for result in results] == [True], results
    finally:
        for backend in backends.values():
            backend.close()
        os.close(fd)
    return [BindingResult(variant, sync,
                          float(numpy.percentile(values, 50)) * 1e6,
                          float(numpy.percentile(values, 99)) * 1e6)
            for (variant, sync), values in sorted(samples.items(),
                                                   key=lambda item: (item[0][1], item[0][0]))]


def binding_table(results: list[BindingResult]) -> str:
    plain = {r.sync: r for r in results if r.variant.startswith("plain")}
    lines = ["| chain | sync | µs/chain p50 | µs/chain p99 | × plain p50 |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        ratio = r.chain_us_p50 / plain[r.sync].chain_us_p50 if r.sync in plain else 0
        lines.append(f"| {r.variant} | {'fdatasync' if r.sync == 'batch' else 'none'} "
                     f"| {r.chain_us_p50:,.1f} | {r.chain_us_p99:,.1f} | ×{ratio:.2f} |")
    return "\n".join(lines)


# -- reporting ------------------------------------------------------------------------


def ceiling_for(results: list[CellResult], cell: CellResult) -> CellResult | None:
    for other in results:
        if (other.kind == "plain" and other.sync == cell.sync
                and other.batch_record_count == cell.batch_record_count):
            return other
    return None


def format_row(cell: CellResult, ceiling: CellResult | None) -> str:
    percent = ("" if ceiling is None or cell.kind == "plain"
               else f"{100 * cell.records_per_second / ceiling.records_per_second:.0f}%")
    return (f"| {cell.batch_record_count:,} | {cell.label} | {cell.records_per_second:,.0f} "
            f"| {cell.batch_us_p50:,.1f} | {cell.batch_us_p99:,.1f} | {percent or '—'} |")


def table(results: list[CellResult]) -> str:
    lines = ["| batch (records) | variant | records/s | µs/batch p50 | µs/batch p99 "
             "| % of ceiling |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [format_row(cell, ceiling_for(results, cell)) for cell in results]
    return "\n".join(lines)


def headline(results: list[CellResult]) -> str:
    for cell in results:
        if (cell.kind == "engine" and cell.backend == "uring" and cell.sync == "batch"
                and cell.batch_record_count == HEADLINE_BATCH_RECORD_COUNT):
            ceiling = ceiling_for(results, cell)
            percent = 100 * cell.records_per_second / ceiling.records_per_second
            verdict = "met" if percent >= HEADLINE_TARGET_PERCENT else "MISSED"
            return (f"Headline: {HEADLINE_BATCH_RECORD_COUNT:,}-record batches, sync=batch: "
                    f"the engine (io_uring, driven from Trio) wrote "
                    f"{cell.records_per_second:,.0f} records/s, {percent:.0f}% of the plain "
                    f"os.pwritev + os.fdatasync loop ({ceiling.records_per_second:,.0f} "
                    f"records/s); target ≥ {HEADLINE_TARGET_PERCENT:.0f}%: {verdict}.")
    return "Headline: the io_uring backend was unavailable; no headline ratio."


def _first_line(path: str, pattern: str) -> str:
    try:
        with open(path) as file:
            for line in file:
                if re.match(pattern, line):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def file_system_of(path: str) -> str:
    """'<device> <type> at <mount point>' for the mount holding `path`."""
    path = os.path.realpath(path)
    best = ("unknown", "unknown", "")
    try:
        with open("/proc/self/mounts") as file:
            for line in file:
                device, mount_point, fs_type = line.split()[:3]
                if ((path == mount_point or path.startswith(mount_point.rstrip("/") + "/"))
                        and len(mount_point) >= len(best[2])):
                    best = (device, fs_type, mount_point)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}) mounted at {best[2] or '?'}"


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", _REPOSITORY, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_lines(directory: str, seconds: float, rounds: int) -> list[str]:
    executable = os.path.relpath(sys.executable) if sys.executable else "python"
    if executable.startswith("../"):
        executable = sys.executable
    command = shlex.join([executable, *sys.argv])
    return [
        f"- command: `{command}` (in {_REPOSITORY}, commit {git_commit()})",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"{_first_line('/proc/cpuinfo', r'model name')}",
        f"- kernel: Linux {platform.release()}; Python {platform.python_version()} "
        f"({platform.python_implementation()}); trio {trio.__version__}; "
        f"numpy {numpy.__version__}",
        f"- files: {directory} on {file_system_of(directory)}",
        f"- load average at start (1/5/15 min): {load_average()}; other processes on "
        f"the machine share its CPUs and its disk, so a high load means noisy rows",
        f"- ring capacity {RING_CAPACITY_RECORD_COUNT:,} records "
        f"({RING_CAPACITY_RECORD_COUNT * RECORD_SIZE_BYTES >> 20} MiB of records); "
        f"{seconds:g} s measured per cell, in {rounds} interleaved slices of "
        f"{seconds / rounds:g} s, each after {seconds / rounds * WARMUP_FRACTION:g} s of "
        "unrecorded warm-up",
    ]


DOC_INTRO = """\
`bench/engine.py` measures the storage engine alone (no sockets, no protocol),
driven the way the daemon drives it: `ring.submit(batch)`, then
`await trio.lowlevel.wait_readable(ring.completion_fd)`, then `ring.reap()`,
one batch in flight, from a fixed list of pre-built `bytes` batches (building
records is not measured). In the same run it measures the ceiling: a plain
`os.pwritev` loop writing the same 64-byte records at sequential offsets of a
zero-filled file of the same size, with and without `os.fdatasync` after each
batch. "% of ceiling" compares records/s with the plain loop of the same batch
size and the same sync mode. µs/batch is submit-to-reap (engine) or
pwritev-to-return (plain loop); p50 and p99 are over every batch of the cell.
For one batch size the six variants run interleaved (several rounds, a slice
of each variant per round), so drifts and other processes' bursts on the
machine hit all of them alike.

Run it with `.venv/bin/python bench/engine.py` (about 80 s; `--quick` for
about 15 s, noisier; `--write-doc` rewrites this section and no other). The
numbers below are from one run on the machine described; on this kind of
virtual disk they vary by ±30% between runs (shared/notes), so compare rows
of the same run, not runs.
"""

DOC_READING = """\
Where the engine's time goes (measured while writing this benchmark, same
machine, 1,024-record batches, io_uring, sync=batch; p50 per batch, ±30%):

| part of one batch | µs | what it is |
|---|---:|---|
| `submit()`: planning the chain | ~140 | one BLAKE3 per 4 KiB chunk (16 here, ~1.5 µs of hashing each) plus ~4 µs of Python per chunk (hasher set-up and copy, struct packing, entry objects), the header encode and checksum |
| `submit()`: SQEs, `io_uring_enter` (then liburing; now our ctypes binding, see the table above) | ~13 | |
| waiting for the chain (Trio `wait_readable`) | ~310 | the kernel: data write, table-entry write, header write, fdatasync as one linked chain |
| `reap()` and commit | ~24 | eventfd read, CQE peek, installing 16 entries in the table mirror |
| plain loop, for comparison | ~200 | one `pwritev` + `fdatasync` |

So the gap to the plain loop is, in order: Python planning (~140 µs, paid
while no I/O is in flight, because the loop plans only after the previous
chain is reaped); io_uring itself (a linked write + fsync chain took ~80 µs
more than the same two calls made synchronously, in an interleaved
micro-benchmark; most likely because the fsync, and perhaps the buffered
writes, run on io_uring's worker threads, a cross-CPU wake-up each on a
2-CPU VM: not confirmed by tracing); the format's extra
writes (table entries and header land in the same fdatasync: ~35 µs); reap
and commit (~24 µs). Ways to close it, for the engine's owners: plan batch
N+1 while batch N's chain is in flight (its chunk hashes depend only on
batch N's records, not on its completion), which hides the planning behind
the fdatasync; and cut the per-chunk Python work (one prefix pack per chunk,
no hasher copies for whole chunks, entries packed into one buffer).

Small batches (1 and 64 records) are dominated by the fixed per-batch cost
(planning, one Trio wait, reap). With sync=batch the thread backend keeps up
with io_uring on this machine: it pays a thread hand-off per batch but runs
plain pwrite + fdatasync calls, avoiding the io_uring overhead above (it is
the fallback where io_uring is refused, with the same guarantees). The
sync=none rows measure a page-cache copy plus the engine's fixed cost: they
say nothing about durability (a power cut can lose acknowledged batches in
that mode; docs/FORMAT.md, "Durability modes"). p99 columns in the
milliseconds are other processes' disk flushes landing in the sample (see
the load average above).
"""


DOC_BINDING = """\
### The io_uring binding's own cost per chain

One chain of 64 KiB of records and a 128-byte header (plus fdatasync, or
not), interleaved: the same calls made inline (`os.pwrite` twice, then
`os.fdatasync`), our ctypes io_uring binding (`UringBackend.submit`, `select`
on its eventfd, `reap`: no Trio), and the thread backend (the same plain calls
on a worker thread, signalled through an eventfd). "× plain" is the chain's
p50 over the plain calls' p50, same run.
"""


def render_section(results: list[CellResult], machine: list[str], load_end: str,
                   binding: list[BindingResult]) -> str:
    return "\n".join([
        DOC_SECTION_TITLE, "", DOC_INTRO, *machine, f"- load average at the end: {load_end}",
        "", table(results), "",
        headline(results), "", DOC_BINDING, binding_table(binding), "", DOC_READING,
    ])


def update_doc(section: str, path: str = DOC_PATH) -> None:
    """Replace this benchmark's section of docs/BENCHMARKS.md; keep every other."""
    update_section(DOC_SECTION_TITLE, section, path)


def default_directory() -> str:
    """The system temp dir if it shares the repository's file system, else the repository."""
    candidate = tempfile.gettempdir()
    if os.stat(candidate).st_dev == os.stat(_REPOSITORY).st_dev:
        return candidate
    return _REPOSITORY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{CELL_SECONDS_QUICK:g} s per cell (about 15 s in all)")
    parser.add_argument("--cell-seconds", type=float, default=None,
                        help=f"seconds per cell (default {CELL_SECONDS_FULL:g})")
    parser.add_argument("--dir", default=None,
                        help="where to put the temporary files (default: the system temp "
                             "dir if it is on the repository's file system)")
    parser.add_argument("--write-doc", action="store_true",
                        help=f"rewrite the '{DOC_SECTION_TITLE[3:]}' section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    seconds = args.cell_seconds or (CELL_SECONDS_QUICK if args.quick else CELL_SECONDS_FULL)
    rounds = ROUND_COUNT_QUICK if args.quick else ROUND_COUNT_FULL
    if not 0 < seconds <= 60:
        parser.error(f"--cell-seconds {seconds} is outside 0..60")
    parent = args.dir or default_directory()
    with tempfile.TemporaryDirectory(prefix="ringtail-bench-", dir=parent) as directory:
        machine = machine_lines(directory, seconds, rounds)
        print("ringtail storage-engine benchmark")
        print("\n".join(machine), flush=True)
        print(flush=True)
        print("\n".join(table([]).splitlines()), flush=True)
        results = trio.run(run_all, directory, seconds, rounds,
                           lambda line: print(line, flush=True))
        binding = run_binding(directory, BINDING_CHAIN_COUNT_QUICK if args.quick
                              else BINDING_CHAIN_COUNT_FULL)
    print()
    print(table(results))
    print()
    print(binding_table(binding))
    print()
    print(headline(results))
    load_end = load_average()
    print(f"load average at the end: {load_end}")
    if args.write_doc:
        update_doc(render_section(results, machine, load_end, binding))
        print(f"\nwrote the engine section of {os.path.relpath(DOC_PATH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
