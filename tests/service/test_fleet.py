"""The fleet tier against real nats-server processes (Debian's, JetStream on).

What ship promises (docs/OPERATIONS.md, "Fleet"): the tenant's subject holds
the ring's sequences contiguously, in order, each exactly once (records, or a
gap message for sequences the ring evicted before ship read them), across
SIGKILL of ship, of the daemon and of nats-server; the fleet tail reads it
back byte-identical to the local tail.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.fleet import (KIND_GAP, KIND_RECORDS, FleetError, FleetErrorCode,
                                    check_node_name, default_node_name, parse_message)
from ringtail.service.ship import _subject_covers

from .conftest import RINGTAIL, run_cli
from .fleet_worker import worker_record
from ringtail.bench.natsserver import (NATS_SERVER, READY_TIMEOUT_S, NatsCluster, NatsServer, ShipProcess,
                         read_subject, shipped_next_sequence, wait_shipped)

assert os.path.exists(NATS_SERVER), (
    f"{NATS_SERVER} is missing: `make test` installs Debian's nats-server (Makefile test-tools)")

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE = "node-a"
TENANT = 3


# --- units, no server -------------------------------------------------------------------


def test_node_names_are_one_subject_token():
    assert check_node_name("gpu-17_a") == "gpu-17_a"
    for bad in ("", "a.b", "a*", ">", "a b", "x" * 65):
        with pytest.raises(FleetError) as caught:
            check_node_name(bad)
        assert caught.value.code is FleetErrorCode.BAD_NODE_NAME
    assert default_node_name("gpu17.cluster.example.com") == "gpu17"
    assert default_node_name("weird host!") == "weird-host-"


def test_stream_subjects_must_cover_the_nodes_subjects():
    wanted = "ringtail.node-a.*"
    assert _subject_covers("ringtail.>", wanted)
    assert _subject_covers("ringtail.*.*", wanted)
    assert _subject_covers("ringtail.node-a.*", wanted)
    assert _subject_covers(">", wanted)
    assert not _subject_covers("ringtail.node-a.3", wanted)
    assert not _subject_covers("ringtail.node-b.*", wanted)
    assert not _subject_covers("other.>", wanted)
    assert not _subject_covers("ringtail.*", wanted)


def test_a_message_not_made_by_ship_is_refused_by_name():
    records = worker_record(TENANT, 0, 0) * 2
    good = {"Ringtail-Kind": "records", "Ringtail-Tenant": "3", "Ringtail-First-Sequence": "10",
            "Ringtail-Count": "2"}
    shipped = parse_message("ringtail.n.3", 7, good, records)
    assert (shipped.kind, shipped.first_sequence, shipped.next_sequence) == (KIND_RECORDS, 10, 12)
    gap = dict(good, **{"Ringtail-Kind": "gap", "Ringtail-Count": "5"})
    assert parse_message("ringtail.n.3", 8, gap, b"").next_sequence == 15
    for headers, data in ((None, b"hello"), (good, records[:64]), (dict(good, **{
            "Ringtail-Kind": "x"}), records), (gap, records), ({"Ringtail-Kind": "records"},
                                                              records)):
        with pytest.raises(FleetError) as caught:
            parse_message("ringtail.n.3", 9, headers, data)
        assert caught.value.code is FleetErrorCode.FOREIGN_MESSAGE
        assert "message 9 on subject ringtail.n.3" in caught.value.message


# --- helpers ---------------------------------------------------------------------------------


# `ringtail tail` runs in this process here (run_cli: cli.main, as the console script
# runs it): a subprocess would spend most of its time starting Python. `ringtail
# ship` and `ringtail serve` stay processes (they run until signalled).


def ring_records(socket_path: str, tenant_id: int) -> bytes:
    """The tenant's retained records, byte for byte, from the local tail."""
    result = run_cli("tail", "--socket", socket_path, "--tenant", str(tenant_id),
                     "--format", "raw")
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def fleet_tail_raw(url: str, node: str, tenant_id: int, *extra: str) -> bytes:
    result = run_cli("tail", "--nats", url, "--node", node, "--tenant", str(tenant_id),
                     "--format", "raw", *extra)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def check_contiguous(messages, start: int = 0) -> int:
    """The subject's messages cover start.. contiguously and in order; returns the end."""
    expected = start
    for message in messages:
        assert message.first_sequence == expected, (
            f"message {message.stream_sequence} starts at {message.first_sequence}, "
            f"expected {expected}: a {'gap' if message.first_sequence > expected else 'duplicate'}")
        expected = message.next_sequence
    return expected


class Worker:
    """tests/service/fleet_worker.py in its own process."""

    def __init__(self, socket_path: str, tenant_id: int, index: int):
        self.index = index
        self.tenant_id = tenant_id
        env = dict(os.environ, PYTHONPATH=os.fspath(REPO_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.service.fleet_worker", socket_path, str(tenant_id),
             str(index)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
            env=env, text=True)
        self.published = 0

    def publish(self, count: int, rate: int = 0) -> None:
        self.process.stdin.write(f"{count} {rate}\n" if rate else f"{count}\n")
        self.process.stdin.flush()
        self.published += count

    def flush(self) -> dict:
        import json
        self.process.stdin.write("flush\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"worker {self.index} exited (code {self.process.poll()})"
        return json.loads(line)

    def records(self) -> list[bytes]:
        return [worker_record(self.tenant_id, self.index, i) for i in range(self.published)]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=READY_TIMEOUT_S)


@pytest.fixture
def processes():
    """Everything a test starts, SIGKILLed at teardown if still alive."""
    started: list = []
    yield started
    for process in reversed(started):
        process.close()


@pytest.fixture
def nats(tmp_path, processes):
    def start(**kwargs) -> NatsServer:
        server = NatsServer(os.fspath(tmp_path / f"nats-{len(processes)}"), **kwargs).start()
        processes.append(server)
        return server
    return start


def split(data: bytes) -> list[bytes]:
    return [data[i:i + RECORD_SIZE_BYTES] for i in range(0, len(data), RECORD_SIZE_BYTES)]


# --- exactly once through kills ------------------------------------------------------------

FLEET_WORKER_COUNT = 4
FLEET_VICTIMS = ("ship", "nats", "daemon")
# (records, kill rounds): `make test` kills each victim once in 50 k records;
# `make soak` each three times in 200 k (the order of the rounds is seeded).
FLEET_LOADS = [pytest.param(50_000, FLEET_VICTIMS, id="50k-3-kills"),
               pytest.param(200_000, FLEET_VICTIMS * 3, id="200k-9-kills",
                            marks=pytest.mark.soak)]
# Records/s each worker publishes at: a round lasts about a second, so a kill
# lands while batches are in flight.
FLEET_WORKER_RATE = 6_000


@pytest.mark.parametrize("record_count, kill_rounds", FLEET_LOADS)
def test_ship_delivers_every_record_exactly_once_through_sigkills(daemon, nats, processes,
                                                                    tmp_path, record_count,
                                                                    kill_rounds):
    """`record_count` records from 4 Publisher processes; ship, nats-server and the
    daemon SIGKILLed in turn at seeded moments while publishing goes on; afterwards
    the stream equals the ring (no duplicate, no gap) and holds every acknowledged
    record, and the fleet tail reads it back byte-identical to the local tail."""
    rng = random.Random(20261202)
    rounds = list(kill_rounds)
    rng.shuffle(rounds)
    server = nats()
    node = daemon(capacity=262_144, io="threads")
    ship = ShipProcess(server.url, node.socket_path, NODE, [TENANT], cwd=os.fspath(tmp_path))
    processes.append(ship.start())
    workers = [Worker(node.socket_path, TENANT, index) for index in range(FLEET_WORKER_COUNT)]
    processes.extend(workers)
    per_round = record_count // FLEET_WORKER_COUNT // len(rounds)
    kills = {"ship": 0, "nats": 0, "daemon": 0}
    for victim in rounds:
        shipped_before = max(0, shipped_next_sequence(server.url, NODE, TENANT))
        for worker in workers:
            worker.publish(per_round, FLEET_WORKER_RATE)
        # a seeded moment inside this round's records: once that much more has shipped
        target = shipped_before + rng.randrange(1, per_round * FLEET_WORKER_COUNT // 2)
        wait_shipped(server.url, NODE, TENANT, target, alive=lambda: ship.process.poll() is None)
        {"ship": ship, "nats": server, "daemon": node}[victim].kill()
        kills[victim] += 1
        {"ship": ship, "nats": server, "daemon": node}[victim].restart()
    remainder = record_count - per_round * FLEET_WORKER_COUNT * len(rounds)
    workers[0].publish(remainder)
    for worker in workers:
        statistics = worker.flush()
        assert statistics["flushed"] and statistics["acked"] >= worker.published, statistics
        assert statistics["rejected"] == statistics["dropped_full"] == 0, statistics

    ring = ring_records(node.socket_path, TENANT)
    wait_shipped(server.url, NODE, TENANT, len(ring) // RECORD_SIZE_BYTES,
                 alive=lambda: ship.process.poll() is None)
    messages = read_subject(server.url, NODE, TENANT)
    assert check_contiguous(messages) == len(ring) // RECORD_SIZE_BYTES
    assert all(message.kind == KIND_RECORDS for message in messages), "the ring never wrapped"
    shipped = b"".join(message.records for message in messages)
    assert shipped == ring  # the stream equals the ring: exactly once from ring to stream
    published = [record for worker in workers for record in worker.records()]
    assert len(published) == record_count
    assert set(published) <= set(split(shipped)), "an acknowledged record is missing"
    # Exactly once from the Publisher too (docs/PROTOCOL.md 4.12): no record is
    # in the ring twice although batches were resent across daemon kills, and
    # each worker's records are in the ring in its publish order.
    stored = split(shipped)
    assert len(stored) == len(set(stored)) == record_count, (
        f"{len(stored) - len(set(stored))} records stored twice")
    position = {record: index for index, record in enumerate(stored)}
    for worker in workers:
        order = [position[record] for record in worker.records()]
        assert order == sorted(order), "a worker's records are out of publish order"
    print(f"\nfleet: {record_count} records, kills {kills}, {len(messages)} messages, "
          "no record stored twice")
    assert fleet_tail_raw(server.url, NODE, TENANT) == ring
    ship.process.send_signal(15)
    assert ship.wait_exit() == 0
    assert "stopped: shipped" in "\n".join(ship.lines)


# --- an outage that wraps the ring ---------------------------------------------------------


OUTAGE_RECORD_COUNT = 20_000  # 1.28 MB: far more than ship's buffers and the 1,024-record ring


def test_a_nats_outage_that_wraps_the_ring_ships_a_gap_naming_the_exact_range(
        daemon, nats, processes, tmp_path):
    server = nats()
    node = daemon(capacity=1024, io="threads")
    ship = ShipProcess(server.url, node.socket_path, NODE, [TENANT], cwd=os.fspath(tmp_path))
    processes.append(ship.start())
    worker = Worker(node.socket_path, TENANT, 0)
    processes.append(worker)
    worker.publish(500)
    assert worker.flush()["flushed"]
    wait_shipped(server.url, NODE, TENANT, 500)
    server.kill()
    # The 1,024-record ring wraps many times; ship holds what it had read (the
    # message it retries, its socket buffers: a few hundred KiB), the rest is
    # evicted unshipped.
    worker.publish(OUTAGE_RECORD_COUNT)
    assert worker.flush()["flushed"]
    server.start()  # same port and store: the stream survives
    total = 500 + OUTAGE_RECORD_COUNT
    wait_shipped(server.url, NODE, TENANT, total, alive=lambda: ship.process.poll() is None)
    messages = read_subject(server.url, NODE, TENANT)
    assert check_contiguous(messages) == total
    gaps = [m for m in messages if m.kind == KIND_GAP]
    assert gaps, "the ring wrapped past unshipped records: a gap message must say so"
    ring = split(ring_records(node.socket_path, TENANT))
    oldest = total - len(ring)
    lost = {s for gap in gaps for s in range(gap.first_sequence, gap.next_sequence)}
    assert lost and max(lost) < oldest, "a gap names only sequences the ring no longer holds"
    expected = [worker_record(TENANT, 0, i) for i in range(total)]
    for message in messages:
        if message.kind == KIND_RECORDS:
            assert split(message.records) == expected[message.first_sequence:
                                                      message.next_sequence]
    log = "\n".join(ship.lines)
    for gap in gaps:
        assert f"sequences {gap.first_sequence}..{gap.next_sequence - 1} were evicted" in log
    # A process: print_gap's default stream is the sys.stderr of import time, which
    # run_cli cannot capture.
    table = subprocess.run([RINGTAIL, "tail", "--nats", server.url, "--node", NODE, "--tenant",
                            str(TENANT)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0
    assert f"gap: sequences {gaps[0].first_sequence}..{gaps[0].next_sequence - 1}" in table.stderr


# --- a three-node cluster --------------------------------------------------------------------


def test_r3_stream_keeps_everything_when_a_node_is_killed(daemon, processes, tmp_path):
    cluster = NatsCluster(tmp_path / "cluster").start()
    processes.append(cluster)
    node = daemon(capacity=65_536, io="threads")
    ship = ShipProcess(cluster.url, node.socket_path, NODE, [TENANT], replicas=3,
                       cwd=os.fspath(tmp_path))
    processes.append(ship.start())
    worker = Worker(node.socket_path, TENANT, 0)
    processes.append(worker)
    worker.publish(10_000)
    wait_shipped(cluster.url, NODE, TENANT, 2_000, alive=lambda: ship.process.poll() is None)
    victim = random.Random(3).choice(cluster.servers)
    victim.kill()
    worker.publish(10_000)
    assert worker.flush()["flushed"]
    survivors = ",".join(s.url for s in cluster.servers if s is not victim)
    wait_shipped(survivors, NODE, TENANT, 20_000, alive=lambda: ship.process.poll() is None)
    messages = read_subject(survivors, NODE, TENANT)
    assert check_contiguous(messages) == 20_000
    assert b"".join(m.records for m in messages) == ring_records(node.socket_path, TENANT)


# --- bad input ----------------------------------------------------------------------------


def run_ship(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([RINGTAIL, "ship", *argv], capture_output=True, text=True,
                          timeout=READY_TIMEOUT_S * 2, cwd=cwd)


def test_unreachable_nats_is_a_clear_error(daemon, tmp_path):
    node = daemon(capacity=1024, io="threads")
    from ringtail.bench.natsserver import free_port
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_ship("--nats", url, "--socket", node.socket_path, "--tenant", "1",
                      "--node", NODE, cwd=tmp_path)
    assert result.returncode == 1
    assert "NATS_UNREACHABLE" in result.stderr and url in result.stderr
    tail = run_cli("tail", "--nats", url, "--node", NODE, "--tenant", "1")
    assert tail.returncode == 1 and b"NATS_UNREACHABLE" in tail.stderr


def test_refused_credentials_are_named(daemon, tmp_path, processes):
    server = NatsServer(os.fspath(tmp_path / "nats-auth"),
                        extra_args=("--user", "ringtail", "--pass", "right")).start()
    processes.append(server)
    node = daemon(capacity=1024, io="threads")
    result = run_ship("--nats", f"nats://ringtail:wrong@127.0.0.1:{server.port}", "--socket",
                      node.socket_path, "--tenant", "1", "--node", NODE, cwd=tmp_path)
    assert result.returncode == 1
    assert "NATS_AUTH_FAILED" in result.stderr, result.stderr


def test_a_stream_whose_subjects_conflict_is_refused_and_nothing_is_lost(daemon, nats,
                                                                          tmp_path):
    import asyncio

    from ringtail.service.fleet import connect_nats
    server = nats()

    async def make_streams() -> None:
        nc = await connect_nats(server.url, "test")
        js = nc.jetstream()
        await js.add_stream(name="OTHER", subjects=["ringtail.>"])
        await js.add_stream(name="NARROW", subjects=["elsewhere.>"])
        await nc.close()

    asyncio.run(make_streams())
    node = daemon(capacity=1024, io="threads")
    worker = Worker(node.socket_path, TENANT, 0)
    try:
        worker.publish(100)
        assert worker.flush()["flushed"]
    finally:
        worker.close()
    before = ring_records(node.socket_path, TENANT)
    overlapping = run_ship("--nats", server.url, "--socket", node.socket_path, "--tenant",
                           str(TENANT), "--node", NODE, cwd=tmp_path)
    assert overlapping.returncode == 1
    assert "STREAM_CONFLICT" in overlapping.stderr and "--stream" in overlapping.stderr
    narrow = run_ship("--nats", server.url, "--socket", node.socket_path, "--tenant",
                      str(TENANT), "--node", NODE, "--stream", "NARROW", cwd=tmp_path)
    assert narrow.returncode == 1
    assert "STREAM_CONFLICT" in narrow.stderr and "elsewhere.>" in narrow.stderr
    assert ring_records(node.socket_path, TENANT) == before and len(before) == 100 * 64


def test_a_foreign_message_on_a_ringtail_subject_stops_ship_with_its_sequence(
        daemon, nats, tmp_path):
    import asyncio

    from ringtail.service.fleet import connect_nats
    server = nats()

    async def publish_foreign() -> None:
        nc = await connect_nats(server.url, "test")
        js = nc.jetstream()
        await js.add_stream(name="RINGTAIL", subjects=["ringtail.>"])
        await js.publish(f"ringtail.{NODE}.{TENANT}", b"not records")
        await nc.close()

    asyncio.run(publish_foreign())
    node = daemon(capacity=1024, io="threads")
    result = run_ship("--nats", server.url, "--socket", node.socket_path, "--tenant",
                      str(TENANT), "--node", NODE, cwd=tmp_path)
    assert result.returncode == 1
    assert "FOREIGN_MESSAGE" in result.stderr and "message 1 on subject" in result.stderr


def test_a_bad_node_name_is_a_usage_error(tmp_path):
    result = run_ship("--nats", "nats://127.0.0.1:1", "--tenant", "1", "--node", "a.b",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "BAD_NODE_NAME" in result.stderr


def test_ship_serves_its_figures_to_prometheus(daemon, nats, processes, tmp_path):
    import urllib.request
    server = nats()
    node = daemon(capacity=1024, io="threads")
    worker = Worker(node.socket_path, TENANT, 0)
    processes.append(worker)
    worker.publish(700)
    assert worker.flush()["flushed"]
    ship = ShipProcess(server.url, node.socket_path, NODE, [TENANT], cwd=os.fspath(tmp_path),
                       extra_args=("--metrics", "127.0.0.1:0"))
    processes.append(ship.start())
    port = int(ship.wait_line(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
    wait_shipped(server.url, NODE, TENANT, 700, alive=lambda: ship.process.poll() is None)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert "ringtail_ship_records_total 700.0" in text
    assert "ringtail_ship_gaps_total 0.0" in text
    assert f'ringtail_ship_lag_records{{tenant="{TENANT}"}} 0.0' in text


def test_fleet_tail_filters_print_what_the_local_tail_prints(daemon, nats, processes, tmp_path):
    """--opcode, --epochs, --failure-only and --since: the fleet tail filters each
    message's records itself; its output equals the daemon-filtered local tail's."""
    from .fleet_worker import TIMESTAMP_BASE_NS
    server = nats()
    node = daemon(capacity=65_536, io="threads")
    workers = [Worker(node.socket_path, TENANT, index) for index in range(2)]
    processes.extend(workers)
    for worker in workers:  # one after the other: timestamps increase along the ring
        worker.publish(3_000)  # opcode = worker index, epoch = index // 1000
        assert worker.flush()["flushed"]
    ship = ShipProcess(server.url, node.socket_path, NODE, [TENANT], cwd=os.fspath(tmp_path))
    processes.append(ship.start())
    wait_shipped(server.url, NODE, TENANT, 6_000, alive=lambda: ship.process.poll() is None)
    for options in (["--opcode", "1", "--epochs", "1..1"], ["--epochs", "2.."],
                    ["--failure-only"], ["--since", str(TIMESTAMP_BASE_NS + 2_500)],
                    ["--since", str(TIMESTAMP_BASE_NS + 2_500), "--opcode", "1"],
                    ["--since", "2023-11-14T22:13:21Z"]):
        local = run_cli("tail", "--socket", node.socket_path, "--tenant", str(TENANT),
                        "--format", "json", *options)
        fleet = run_cli("tail", "--nats", server.url, "--node", NODE, "--tenant", str(TENANT),
                        "--format", "json", *options)
        assert local.returncode == fleet.returncode == 0, (local.stderr, fleet.stderr)
        assert fleet.stdout == local.stdout, options
        expected = {"--failure-only": 0}.get(options[0])
        lines = fleet.stdout.count(b"\n")
        assert lines == expected if expected is not None else lines > 0, options


def _ship_children(url: str) -> list[int]:
    """Pids of live `ringtail ship` processes shipping to `url`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    argv = file.read().split(b"\0")
            except OSError:
                continue
            if b"ship" in argv and url.encode() in argv:
                found.append(int(entry))
    return found


def test_serve_runs_ship_from_the_config_and_stops_it(daemon, nats, processes, tmp_path):
    from .conftest import write_config
    server = nats()
    config = write_config(tmp_path, f'[ship]\nnats = "{server.url}"\ntenants = [{TENANT}]\n'
                                    f'node = "{NODE}"\n')
    node = daemon(capacity=1024, io="threads", config=config)
    worker = Worker(node.socket_path, TENANT, 0)
    processes.append(worker)
    worker.publish(500)
    assert worker.flush()["flushed"]
    wait_shipped(server.url, NODE, TENANT, 500, alive=lambda: node.alive)
    assert "starting ship for tenants [3]" in node.stderr
    assert _ship_children(server.url), "ship runs as the daemon's child"
    assert node.stop() == 0
    assert _ship_children(server.url) == [], "the daemon stops its ship child"


def test_a_bad_ship_table_is_a_config_error(tmp_path):
    from .conftest import write_config
    # The four `ringtail serve` processes run at once (each its own config, data dir
    # and socket); each must exit 2 naming what is wrong.
    started = []
    for index, (table, message) in enumerate((
            ('nats = "nats://127.0.0.1:4222"\n', "ship.tenants"),
            ('tenants = [1]\n', "needs nats"),
            ('nats = "x"\ntenants = [1]\nnode = "a.b"\n', "ship.node"),
            ('nats = "x"\ntenants = [1]\ncolour = 1\n', "no key 'colour'"))):
        config = write_config(tmp_path, "[ship]\n" + table, name=f"ringtail-{index}.toml")
        started.append((message, subprocess.Popen(
            [RINGTAIL, "serve", "--config", config, "--data-dir",
             os.fspath(tmp_path / f"d-{index}"), "--socket",
             os.fspath(tmp_path / f"s-{index}.sock")], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for message, process in started:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 2, stderr
            assert message in stderr, (message, stderr)
    finally:
        for _, process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
