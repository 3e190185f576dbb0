"""A GPU-worker stand-in for the fleet tests: a process publishing through `Publisher`.

    python fleet_worker.py SOCKET TENANT WORKER

Reads commands on stdin, one per line: `N [RATE]` publishes the worker's next
N records, at RATE records/s if given (paced in steps of PACE_STEP_RECORDS, so
a test's kills land while publishing goes on; publish() returns at once, the
Publisher sends in the background and reconnects across daemon restarts); `flush` waits until every record so far
is acknowledged and prints one JSON line of the Publisher's statistics. EOF
closes the Publisher and exits.

Record i of worker w is unique in the tenant: args = (w, i, 0, 0), slot_idx = i,
timestamp_ns = TIMESTAMP_BASE_NS + w * WORKER_TIMESTAMP_STRIDE_NS + i (so a worker's
records are stamped after every record of the workers before it); `worker_record(tenant, w, i)` builds it,
so the test can rebuild every record a worker published.
"""

from __future__ import annotations

import json
import sys
import time

from ringtail.ioring.record import SlotRecord

TIMESTAMP_BASE_NS = 1_700_000_000_000_000_000
FLUSH_TIMEOUT_S = 120.0  # across daemon restarts: generous, fails loudly in the JSON
PACE_STEP_RECORDS = 256
WORKER_TIMESTAMP_STRIDE_NS = 1_000_000_000  # records published between two pacing pauses


def worker_record(tenant_id: int, worker: int, index: int) -> bytes:
    return SlotRecord(timestamp_ns=TIMESTAMP_BASE_NS + worker * WORKER_TIMESTAMP_STRIDE_NS + index,
                      slot_idx=index,
                      tenant_id=tenant_id, opcode=worker, args=(worker, index, 0, 0),
                      epoch=index // 1000).encode()


def main() -> int:
    from ringtail.service.publisher import Publisher
    socket_path, tenant_id, worker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    published = 0
    with Publisher(socket_path, tenant_id, client_name=f"fleet-worker-{worker}") as publisher:
        for line in sys.stdin:
            command = line.strip()
            if command == "flush":
                done = publisher.flush(timeout=FLUSH_TIMEOUT_S)
                statistics = publisher.statistics()
                print(json.dumps({"flushed": done, "published": published,
                                  "acked": statistics.acked,
                                  "rejected": statistics.rejected,
                                  "dropped_full": statistics.dropped_full}), flush=True)
            elif command:
                count, _, rate = command.partition(" ")
                started = time.monotonic()
                for index in range(int(count)):
                    publisher.publish(worker_record(tenant_id, worker, published))
                    published += 1
                    if rate and index % PACE_STEP_RECORDS == PACE_STEP_RECORDS - 1:
                        ahead = started + (index + 1) / float(rate) - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)  # load pacing, not synchronisation
    return 0


if __name__ == "__main__":
    sys.exit(main())
