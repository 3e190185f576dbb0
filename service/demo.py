"""`make demo`: the daemon on its embedded default, shown working end to end.

In a fresh temporary directory: start `ringtail serve` with no arguments,
publish records from two simulated GPU workers, tail them back, compare,
inspect the ring file, stop the daemon with SIGTERM, and print what happened.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading

import trio

from ringtail.ioring import SlotRecord
from ringtail.ioring.record import output_digest
from ringtail.service.client import Client
from ringtail.service.protocol import Records

TENANT_ID = 1
RECORD_COUNT = 20_000
WORKER_COUNT = 2
READY_TIMEOUT_S = 30.0


def ringtail(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringtail.service.cli", *args], cwd=cwd,
                          capture_output=True, text=True, check=False)


def start_daemon(directory: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `ringtail serve` (no flags) and wait for its ready line."""
    process = subprocess.Popen([sys.executable, "-m", "ringtail.service.cli", "serve"], cwd=directory,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in process.stderr:
            lines.append(line.rstrip())
            if "ringtail ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S) or process.poll() is not None:
        process.kill()
        raise SystemExit("the daemon did not start:\n" + "\n".join(lines))
    return process, lines


def worker_records(worker: int, count: int) -> bytes:
    rng = random.Random(worker)
    out = []
    for index in range(count):
        failed = rng.random() < 0.01
        out.append(SlotRecord(
            timestamp_ns=1_790_000_000_000_000_000 + index, slot_idx=index % 256,
            tenant_id=TENANT_ID, opcode=rng.randrange(8), args=(worker, index, 0, 0),
            epoch=index // 1000, slot_status=2 if failed else 0,
            failure_class=rng.choice((1, 2, 3)) if failed else 0,
            output_digest=output_digest(index.to_bytes(8, "little")) if failed else 0).encode())
    return b"".join(out)


async def publish_and_tail(socket: str) -> tuple[int, int, int]:
    per_worker = RECORD_COUNT // WORKER_COUNT
    payloads = [worker_records(worker, per_worker) for worker in range(WORKER_COUNT)]
    acked: dict[int, bytes] = {}

    async def worker(index: int) -> None:
        async with await Client.connect(socket, TENANT_ID, client_name=f"gpu-worker-{index}") as client:
            data = payloads[index]
            step = 1024 * 64
            batches = [data[offset:offset + step] for offset in range(0, len(data), step)]
            for batch, ack in zip(batches, await client.publish_many(batches)):
                for position in range(ack.last_sequence - ack.first_sequence + 1):
                    acked[ack.first_sequence + position] = batch[position * 64:(position + 1) * 64]

    async with trio.open_nursery() as nursery:
        for index in range(WORKER_COUNT):
            nursery.start_soon(worker, index)
    tailed = {}
    async with await Client.connect(socket, TENANT_ID, client_name="demo-tail") as client:
        async for event in client.subscribe("oldest"):
            if isinstance(event, Records):
                for position in range(len(event.records) // 64):
                    tailed[event.first_sequence + position] = \
                        event.records[position * 64:(position + 1) * 64]
    failures = 0
    async with await Client.connect(socket, TENANT_ID) as client:
        async for event in client.subscribe("oldest", failure_only=True):
            if isinstance(event, Records):
                failures += len(event.records) // 64
    if tailed != acked:
        raise SystemExit("DEMO FAILED: tailed records differ from acknowledged ones")
    return len(acked), len(tailed), failures


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ringtail-demo-") as directory:
        print(f"ringtail demo in {directory}\n")
        process, log_lines = start_daemon(directory)
        try:
            acked, tailed, failures = trio.run(publish_and_tail,
                                               os.path.join(directory, "ringtail.sock"))
            tail = ringtail("tail", "--tenant", str(TENANT_ID), "--from", str(acked - 5),
                            cwd=directory)
            inspect = ringtail("inspect", "ringtail-data", cwd=directory)
            verify = ringtail("verify", "ringtail-data", cwd=directory)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        print("daemon log:")
        for line in log_lines:
            print("  " + line)
        print(f"\npublished {acked} records from {WORKER_COUNT} workers, all acknowledged durable")
        print(f"tailed back {tailed} records: byte-identical, in sequence order")
        print(f"failure-only replay found {failures} records carrying failure evidence")
        print("\n$ ringtail tail --tenant 1 --from", acked - 5)
        print(tail.stdout.rstrip())
        print("\n$ ringtail inspect ringtail-data")
        print(inspect.stdout.rstrip())
        print("\n$ ringtail verify ringtail-data")
        print(verify.stdout.rstrip())
        print(f"\ndaemon stopped by SIGTERM, exit status {code}")
        return 0 if code == 0 and verify.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
