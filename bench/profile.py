"""Profile the daemon under one bench load with py-spy; print self/total time by function.

    .venv/bin/python -m ringtail.bench.profile ingest          # sync=batch, 4 publishers x 1,024
    .venv/bin/python -m ringtail.bench.profile ingest-small    # sync=batch, 4 publishers x 1 record
    .venv/bin/python -m ringtail.bench.profile replay          # unfiltered replays from oldest, looped

Needs py-spy (in the test extra's venv) and permission to ptrace the daemon
(same user; root in a container). The raw profile is kept with --out.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:
    sys.path.insert(0, _REPOSITORY)

from ringtail.bench import e2e  # noqa: E402


def aggregate(path: str, top: int = 25) -> str:
    """Self and total sample shares per function from py-spy's raw (collapsed) output."""
    self_counts: collections.Counter = collections.Counter()
    total_counts: collections.Counter = collections.Counter()
    samples = 0
    with open(path) as file:
        for line in file:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            samples += count
            frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0] + ")"
                      if " (" in frame else frame for frame in stack.split(";")]
            frames = [frame.replace(_REPOSITORY + "/", "") for frame in frames]
            self_counts[frames[-1]] += count
            for frame in set(frames):
                total_counts[frame] += count
    lines = [f"{samples} samples", "", "| self % | total % | function (file) |", "|---:|---:|---|"]
    for frame, count in self_counts.most_common(top):
        lines.append(f"| {100 * count / samples:.1f} | {100 * total_counts[frame] / samples:.1f} "
                     f"| `{frame}` |")
    lines += ["", "by total:", "", "| total % | function (file) |", "|---:|---|"]
    for frame, count in total_counts.most_common(top):
        lines.append(f"| {100 * count / samples:.1f} | `{frame}` |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("ingest", "ingest-small", "replay"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", default=None, help="keep py-spy's raw output here")
    parser.add_argument("--idle", action="store_true", help="py-spy --idle (count waiting)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ringtail-profile-",
                                     dir=e2e.default_directory()) as work:
        out = args.out or os.path.join(work, "profile.txt")
        workers = e2e.Workers(4)
        sync = "none" if args.scenario == "replay" else "batch"
        daemon = e2e.Daemon(work, "profile", sync, 1 << 22 if args.scenario == "replay"
                            else e2e.INGEST_CAPACITY)
        try:
            if args.scenario == "replay":
                for index in range(2):
                    workers.send(index, "fill", socket_path=daemon.socket,
                                 tenant_id=e2e.REPLAY_TENANT, record_count=1_500_000)
                for index in range(2):
                    workers.receive(index)
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(daemon.pid), "-d", str(args.seconds), "-r", "250",
                 "-f", "raw", "-o", out, "--nonblocking", *(["--idle"] if args.idle else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            deadline = time.monotonic() + args.seconds + 0.5
            if args.scenario == "replay":
                replays = 0
                while time.monotonic() < deadline:
                    workers.send(0, "replay", socket_path=daemon.socket,
                                 tenant_id=e2e.REPLAY_TENANT, opcodes=[])
                    result = workers.receive(0)
                    replays += 1
                print(f"{replays} replays, last {3_000_000 / result['seconds']:,.0f} records/s")
            else:
                batch = 1024 if args.scenario == "ingest" else 1
                cell = e2e.ingest_cell(daemon, workers, 4, batch, e2e.INGEST_WINDOW,
                                       args.seconds + 1, 0.1)
                print(f"{cell['records_per_s']:,.0f} records/s, "
                      f"{cell['cpu_s_per_m']:.2f} CPU s per M records")
            spy.wait(60)
        finally:
            daemon.stop()
            workers.close()
        print(aggregate(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
