"""`ringtail bench --diff`: diff throughput and snapshot compression (issue 11).

Builds two runs of the same work (the demo's record generator, service/demo.py,
shuffled inside each epoch in run B, other timestamps), writes each as a ring
file, a VRRL0001 file and a snapshot, and measures:

- the comparison engine alone (records already in memory), records/s per side;
- `diff` from each file kind on both sides (reads, checksums, decompression
  included), records/s per side;
- `snapshot` writing and verifying, MB/s of records, and the compression
  ratio on the demo's records.

Prints a table (or --json); --write-doc rewrites the "Diff and snapshots"
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy
import trio
from ringtail.ioring import open_ring
from ringtail.ioring.record import RECORD_DTYPE, RECORD_SIZE_BYTES
from ringtail.ioring.snapshot import new_header, verify_snapshot, write_snapshot
from ringtail.ioring.vrrl import VRRL_CAPACITY_MAX, export_vrrl
from ringtail.service import diff, diff_command
from ringtail.service.demo import worker_records

DOC_SECTION_TITLE = "## Diff and snapshots"
# Records per side: 1,000,000 (64 MB) full, 200,000 quick. The VRRL format
# caps a file at VRRL_CAPACITY_MAX records.
RECORD_COUNT = {"full": 1_000_000, "quick": 200_000, "micro": 20_000}  # micro: the smoke test
assert max(RECORD_COUNT.values()) <= VRRL_CAPACITY_MAX
# The demo's generator: epoch = index // 1000, slot = index % 256 (repeats).
WORKER_COUNT = 2
DEMO_BATCH_RECORD_COUNT = 1024  # the demo's publish batch (service/demo.py)


def build_runs(count: int) -> tuple[bytes, bytes]:
    """Run A as the demo publishes it; run B: the same records shuffled inside
    each epoch, with other timestamps."""
    per_worker = count // WORKER_COUNT
    # The demo's workers publish at once, in batches of DEMO_BATCH_RECORD_COUNT:
    # the ring holds their batches interleaved.
    workers = [worker_records(worker, per_worker) for worker in range(WORKER_COUNT)]
    step = DEMO_BATCH_RECORD_COUNT * RECORD_SIZE_BYTES
    a = b"".join(data[offset:offset + step] for offset in range(0, len(workers[0]), step)
                 for data in workers)
    array = numpy.frombuffer(a, dtype=RECORD_DTYPE).copy()
    rng = numpy.random.default_rng(7)
    keys = array["epoch"].astype(numpy.float64) + rng.random(len(array)) * 0.5
    shuffled = array[numpy.argsort(keys, kind="stable")]
    # A shuffle must keep repeats of a slot in their order: repeat n of a
    # slot is matched with repeat n. Put each slot's repeats back in order.
    b_array = _keep_repeat_order(array, shuffled)
    b_array["timestamp_ns"] += 10**15
    return a, b_array.tobytes()


def _keep_repeat_order(original: numpy.ndarray, shuffled: numpy.ndarray) -> numpy.ndarray:
    result = shuffled.copy()
    for epoch in numpy.unique(original["epoch"]):
        mask = shuffled["epoch"] == epoch
        part = shuffled[mask]
        source = original[original["epoch"] == epoch]
        # Slots in the shuffled arrival order; each slot's records in original order.
        order = numpy.argsort(source["slot_idx"], kind="stable")
        by_slot = source[order]
        target = numpy.argsort(part["slot_idx"], kind="stable")
        rebuilt = numpy.empty_like(part)
        rebuilt[target] = by_slot
        result[mask] = rebuilt
    return result


def _diff_rate(make_stream, count: int, options) -> tuple[dict, object]:
    """Records/s per side, by the wall clock and by this process's CPU time (the
    second is what the diff costs, whatever else the machine runs)."""
    async def run():
        return await diff.diff_streams(make_stream("a"), make_stream("b"), options)
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = trio.run(run)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"wall": count / wall, "cpu": count / cpu}, summary


def run(profile: str, directory: str | None = None, progress=print) -> dict:
    count = RECORD_COUNT[profile]
    results: dict = {"profile": profile, "records_per_side": count,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "load_start": os.getloadavg()[0]}
    progress(f"building two runs of {count:,} records")
    runs = dict(zip("ab", build_runs(count)))
    options = diff.make_options()
    piece = 65_536 * RECORD_SIZE_BYTES

    def memory_stream(side):
        data = runs[side]
        return diff.arrays_from_bytes(data[i:i + piece] for i in range(0, len(data), piece))

    rate, summary = _diff_rate(memory_stream, count, options)
    assert summary.identical, summary.line()
    results["engine_records_per_s"] = rate
    with tempfile.TemporaryDirectory(dir=directory, prefix="ringtail-bench-diff-") as temp:
        paths: dict[tuple[str, str], str] = {}
        for side, data in runs.items():
            ring_path = os.path.join(temp, f"{side}.ring")
            with open_ring(ring_path, capacity=1 << 20, tenant_id=1, io="threads",
                           sync="none") as ring:
                step = ring.batch_record_count_max * RECORD_SIZE_BYTES
                for offset in range(0, len(data), step):
                    ring.append(data[offset:offset + step])
            paths[side, "ring"] = ring_path
            vrrl_path = os.path.join(temp, f"{side}.vrrl")
            export_vrrl([data[i:i + 64] for i in range(0, len(data), 64)], vrrl_path, count)
            paths[side, "vrrl"] = vrrl_path
            snapshot_path = os.path.join(temp, f"{side}.snap")
            start = time.perf_counter()
            size = write_snapshot(snapshot_path, new_header(1, 0, count), [data])
            write_seconds = time.perf_counter() - start
            paths[side, "snapshot"] = snapshot_path
            if side == "a":
                start = time.perf_counter()
                verify_snapshot(snapshot_path)
                verify_seconds = time.perf_counter() - start
                results["snapshot"] = {
                    "bytes": size, "ratio": len(data) / size,
                    "write_mb_per_s": len(data) / write_seconds / 1e6,
                    "verify_mb_per_s": len(data) / verify_seconds / 1e6}
        results["files"] = {}
        for kind in ("ring", "vrrl", "snapshot"):
            progress(f"diff of two {kind} files")

            def file_stream(side, kind=kind):
                return diff_command.file_stream(diff_command.parse_source(paths[side, kind]))
            rate, summary = _diff_rate(file_stream, count, options)
            assert summary.identical, summary.line()
            results["files"][kind] = rate
    results["load_end"] = os.getloadavg()[0]
    return results


def table(results: dict) -> str:
    snapshot = results["snapshot"]
    def rate(value: dict) -> str:
        return (f"{value['wall']:,.0f} records/s per side ({value['cpu']:,.0f} per CPU "
                "second)")
    rows = [("diff engine, records in memory", rate(results["engine_records_per_s"]))]
    rows += [(f"diff of two {kind} files", rate(value))
             for kind, value in results["files"].items()]
    rows += [("snapshot compression (demo records)", f"{snapshot['ratio']:.1f}x "
                                                     f"({snapshot['bytes']:,} bytes)"),
             ("snapshot write", f"{snapshot['write_mb_per_s']:,.0f} MB/s of records"),
             ("snapshot verify", f"{snapshot['verify_mb_per_s']:,.0f} MB/s of records")]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | result |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def render_section(results: dict, argv: list[str]) -> str:
    return (f"{DOC_SECTION_TITLE}\n\n"
            f"Written by `{' '.join(argv)}` (bench/replay.py): {results['records_per_side']:,} "
            f"records per side, the demo's generator (service/demo.py; run B shuffled inside "
            f"each epoch, other timestamps), {results['machine']}, load average "
            f"{results['load_start']:.1f} at the start. Target (issue 11): at least "
            f"1,000,000 records/s compared per side.\n\n{table(results)}\n")


def command(args, argv: list[str]) -> int:
    profile = "quick" if args.quick else "full"
    quiet = args.json
    progress = (lambda line: None) if quiet else (
        lambda line: print(f"  {line}", flush=True))
    results = run(profile, args.dir, progress)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(table(results))
    if args.write_doc:
        from ringtail.bench.doc import update_section
        update_section(DOC_SECTION_TITLE, render_section(results, argv))
    return 0


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--dir")
    raise SystemExit(command(parser.parse_args(), ["python", "-m", "ringtail.bench.replay"]))
