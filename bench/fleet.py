"""Fleet benchmark: `ringtail ship` into a local JetStream, beside a direct nats-py client.

A benchmark, not a test: it prints one table and asserts nothing::

    .venv/bin/ringtail bench --fleet [--quick] [--json] [--write-doc]

What it runs, for an R1 stream on one nats-server and an R3 stream on a
3-node loopback cluster (file storage both):

- **backlog**: BACKLOG records already in the ring, then `ringtail ship`
  starts; shipped records/s until the stream holds them all;
- **lag under load**: ship running, one Publisher offering LAG_RATE records/s
  for LAG_S seconds, each record stamped with its publish time; lag = the
  JetStream message's stored time minus the record's stamp, p50 and p99 over
  every record (so it includes the daemon's durability and ship);
- **direct**: the same records published straight to JetStream by a Python
  client, one record per message, `js.publish_async` in windows of
  DIRECT_WINDOW: records/s. The ratio backlog / direct is issue 10's target
  (at least 10x), and lag p99 under 1 s at 100 k records/s.

It needs Debian's nats-server (`make test` installs it); without it the
benchmark says so and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy

from ringtail.bench.e2e import Daemon, default_directory, load_average
from ringtail.bench.natsserver import (NATS_SERVER, NatsCluster, NatsServer, ShipProcess,
                                       wait_shipped)

DOC_SECTION_TITLE = "## Fleet: ship to JetStream (ringtail bench --fleet)"
TENANT = 1
NODE = "bench"
LAG_TIMESTAMP_OFFSET = 4  # timestamp_ns sits at bytes 4..11 of a record
DIRECT_WINDOW = 1_000
PROFILES = {
    "full": dict(backlog=1_000_000, lag_rate=100_000, lag_s=5.0, direct=100_000),
    "quick": dict(backlog=200_000, lag_rate=100_000, lag_s=2.0, direct=20_000),
}


def _records(count: int, stamp_ns: int = 0) -> bytes:
    from ringtail.ioring.record import SlotRecord
    record = bytearray(SlotRecord(tenant_id=TENANT, opcode=1).encode())
    if stamp_ns:
        struct.pack_into("<Q", record, LAG_TIMESTAMP_OFFSET, stamp_ns)
    return bytes(record) * count


def _publish_backlog(socket_path: str, count: int) -> None:
    from ringtail.service.publisher import Publisher
    data = _records(4096)
    with Publisher(socket_path, TENANT) as publisher:
        left = count
        while left:
            step = min(left, 4096)
            publisher.publish_many(data[:step * 64])
            left -= step
        assert publisher.flush(timeout=300), "the backlog was not acknowledged"


def _offer(socket_path: str, rate: int, seconds: float) -> int:
    """Publish at `rate` records/s for `seconds`, each record stamped with time.time_ns()."""
    from ringtail.service.publisher import Publisher
    step = max(1, rate // 1000)  # one step per millisecond
    sent = 0
    with Publisher(socket_path, TENANT) as publisher:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - sent
            if due <= 0:
                time.sleep(0.0005)  # load pacing, not synchronisation
                continue
            count = min(due, step * 4)
            publisher.publish_many(_records(count, time.time_ns()))
            sent += count
        assert publisher.flush(timeout=120), "the offered load was not acknowledged"
    return sent


async def _stored(url: str, stream: str, start_sequence: int) -> list[tuple[int, bytes]]:
    """(stored time in ns, records) of every message on the subject from `start_sequence`."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from ringtail.service.fleet import connect_nats, subject
    nc = await connect_nats(url, "ringtail-bench")
    messages: list[tuple[int, bytes]] = []
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        subscription = await js.subscribe(
            subject(NODE, TENANT), stream=stream, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=start_sequence))
        while True:
            msg = await subscription.next_msg(timeout=30)
            messages.append((int(msg.metadata.timestamp.timestamp() * 1e9), msg.data))
            if msg.metadata.sequence.stream >= last:
                break
        await subscription.unsubscribe()
    finally:
        await nc.close()
    return messages


def _lags_ns(messages: list[tuple[int, bytes]]) -> numpy.ndarray:
    """Per record: its message's stored time minus the record's publish stamp."""
    lags = []
    for stored_ns, data in messages:
        raw = numpy.frombuffer(data, dtype=numpy.uint8).reshape(-1, 64)
        stamps = raw[:, LAG_TIMESTAMP_OFFSET:LAG_TIMESTAMP_OFFSET + 8].copy().view("<u8")
        lags.append(stored_ns - stamps.astype(numpy.int64).ravel())
    return numpy.concatenate(lags)


def _shipping_rate(messages: list[tuple[int, bytes]]) -> float:
    """Records/s between the first and the last message's stored times (ship's start-up,
    a process launch, is not shipping)."""
    records = sum(len(data) for _, data in messages[1:]) // 64
    return records / max(1e-9, (messages[-1][0] - messages[0][0]) / 1e9)


async def _direct(url: str, count: int) -> float:
    """Records/s published straight to JetStream, one per message, windows of DIRECT_WINDOW."""
    from ringtail.service.fleet import connect_nats
    nc = await connect_nats(url, "ringtail-bench-direct")
    try:
        js = nc.jetstream()
        await js.add_stream(name="DIRECT", subjects=["direct.>"])
        record = _records(1)
        started = time.perf_counter()
        for offset in range(0, count, DIRECT_WINDOW):
            futures = [await js.publish_async("direct.bench", record)
                       for _ in range(min(DIRECT_WINDOW, count - offset))]
            await asyncio.gather(*futures)
        return count / (time.perf_counter() - started)
    finally:
        await nc.close()


def _cell(directory: Path, replicas: int, profile: dict, progress) -> dict:
    if replicas == 1:
        servers = NatsServer(os.fspath(directory / "nats")).start()
    else:
        servers = NatsCluster(directory / "cluster").start()
    daemon = ship = None
    try:
        daemon = Daemon(os.fspath(directory), f"daemon-r{replicas}", "batch", 1 << 21)
        progress(f"R{replicas}: publishing a backlog of {profile['backlog']:,} records")
        _publish_backlog(daemon.socket, profile["backlog"])
        ship = ShipProcess(servers.url, daemon.socket, NODE, [TENANT], replicas=replicas,
                           cwd=os.fspath(directory)).start()
        wait_shipped(servers.url, NODE, TENANT, profile["backlog"], timeout=600)
        backlog = asyncio.run(_stored(servers.url, "RINGTAIL", 1))
        backlog_rate = _shipping_rate(backlog)
        progress(f"R{replicas}: backlog shipped at {backlog_rate:,.0f} records/s in "
                 f"{len(backlog)} messages; offering {profile['lag_rate']:,}/s for "
                 f"{profile['lag_s']} s")
        first_lag_message = asyncio.run(_stream_last(servers.url)) + 1
        sent = _offer(daemon.socket, profile["lag_rate"], profile["lag_s"])
        wait_shipped(servers.url, NODE, TENANT, profile["backlog"] + sent, timeout=600)
        lags = _lags_ns(asyncio.run(_stored(servers.url, "RINGTAIL", first_lag_message)))
        progress(f"R{replicas}: direct nats-py client, {profile['direct']:,} records")
        direct_rate = asyncio.run(_direct(servers.url, profile["direct"]))
        return dict(replicas=replicas, backlog_records=profile["backlog"],
                    backlog_rate=backlog_rate, offered_rate=profile["lag_rate"],
                    offered_records=sent, achieved_rate=sent / profile["lag_s"],
                    lag_p50_ms=float(numpy.percentile(lags, 50)) / 1e6,
                    lag_p99_ms=float(numpy.percentile(lags, 99)) / 1e6,
                    direct_rate=direct_rate, ratio=backlog_rate / direct_rate)
    finally:
        if ship is not None:
            ship.terminate()
        if daemon is not None:
            daemon.stop()
        servers.close()


async def _stream_last(url: str) -> int:
    from ringtail.service.fleet import connect_nats
    nc = await connect_nats(url, "ringtail-bench")
    try:
        return (await nc.jetstream().stream_info("RINGTAIL")).state.last_seq
    finally:
        await nc.close()


def run(profile_name: str = "full", directory: str | None = None, progress=print) -> dict:
    profile = PROFILES[profile_name]
    base = Path(tempfile.mkdtemp(prefix="ringtail-fleet-", dir=directory or default_directory()))
    load = load_average()
    try:
        cells = [_cell(base / f"r{replicas}", replicas, profile, progress)
                 for replicas in (1, 3)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return dict(profile=profile_name, load_start=load, cells=cells)


def table(results: dict) -> str:
    lines = ["| stream | backlog shipped | direct nats-py (1 record/msg) | ratio | offered "
             "| lag p50 | lag p99 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for cell in results["cells"]:
        lines.append(
            f"| R{cell['replicas']} | {cell['backlog_rate']:,.0f} rec/s | "
            f"{cell['direct_rate']:,.0f} rec/s | {cell['ratio']:.1f}x | "
            f"{cell['achieved_rate']:,.0f} rec/s | {cell['lag_p50_ms']:.1f} ms | "
            f"{cell['lag_p99_ms']:.1f} ms |")
    return "\n".join(lines)


def render_section(results: dict, argv: list[str]) -> str:
    return (f"{DOC_SECTION_TITLE}\n\n"
            f"Written by `{' '.join(argv)}` (bench/fleet.py), profile {results['profile']}, "
            f"load average {results['load_start']} at the start. Backlog: records already in "
            "the ring when ship starts; direct: the same records published by a Python nats-py "
            "client, one per message, publish_async in windows of 1,000; lag: JetStream's "
            "stored time minus the record's publish stamp, under the offered load. Targets "
            "(issue 10): ratio at least 10x, lag p99 under 1 s at 100 k records/s.\n\n"
            f"{table(results)}\n")


def command(args, argv: list[str]) -> int:
    if not os.path.exists(NATS_SERVER):
        print(f"ringtail bench --fleet: {NATS_SERVER} is missing; install Debian's nats-server "
              "(make test-tools)")
        return 1
    progress = (lambda line: None) if args.json else (lambda line: print(f"  {line}",
                                                                         flush=True))
    results = run("quick" if args.quick else "full", args.dir, progress)
    print(json.dumps(results, indent=1) if args.json else table(results))
    if args.write_doc:
        from ringtail.bench.doc import update_section
        update_section(DOC_SECTION_TITLE, render_section(results, argv))
    return 0
