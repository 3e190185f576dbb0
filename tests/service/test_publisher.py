"""The synchronous Publisher against real daemon processes (and one scripted peer).

Daemons are `ringtail serve` subprocesses; a test waits for the "ringtail ready"
line on their stderr, never for a sleep. Record i carries i in slot_idx, so the
ring's contents read back as the list of published indices.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy
import pytest

from ringtail.ioring.record import RECORD_DTYPE, SlotRecord
from ringtail.service import protocol
from ringtail.service.errors import RingtailError
from ringtail.service.protocol import Ack, Error, ErrorCode, Hello, Publish, Welcome
from ringtail.service.publisher import (BUFFER_RECORD_COUNT_MAX, Publisher, PublisherClosedError,
                                        PublisherFullError)

RINGTAIL = str(Path(sys.executable).with_name("ringtail"))
TENANT = 7
# Large enough that no test evicts a record (duplicates from resends included).
CAPACITY_RECORD_COUNT = 262_144
# Guards against a hung daemon or peer; never a synchronisation delay.
READY_TIMEOUT_S = 60.0
FLUSH_TIMEOUT_S = 60.0


def record(index: int, tenant_id: int = TENANT) -> bytes:
    return SlotRecord(timestamp_ns=1_700_000_000_000_000_000 + index, slot_idx=index,
                      tenant_id=tenant_id, opcode=index % 16, args=(index, 0, 0, 1)).encode()


def indices(data: bytes) -> list[int]:
    """slot_idx of each record: which published record it is."""
    return numpy.frombuffer(data, dtype=RECORD_DTYPE)["slot_idx"].tolist()


class Daemon:
    """A `ringtail serve` process on a data dir and socket that survive restarts."""

    def __init__(self, directory: Path):
        self.data_dir = directory / "data"
        self.socket = str(directory / "s.sock")
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [RINGTAIL, "serve", "--data-dir", str(self.data_dir), "--socket", self.socket,
             "--capacity", str(CAPACITY_RECORD_COUNT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        lines = self.lines = queue.Queue()
        threading.Thread(target=self._drain, args=(self.process, lines), daemon=True).start()
        seen = []
        while True:
            line = lines.get(timeout=READY_TIMEOUT_S)
            assert line is not None, f"the daemon exited before it was ready: {seen}"
            seen.append(line)
            if "ringtail ready" in line:
                return

    @staticmethod
    def _drain(process: subprocess.Popen, lines: queue.Queue) -> None:
        for line in process.stderr:  # keep reading: a full pipe would stall the daemon
            lines.put(line)
        lines.put(None)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=READY_TIMEOUT_S)

    def tail(self) -> bytes:
        """Every retained record of the tenant, byte-identical (`ringtail tail --format raw`)."""
        result = subprocess.run(
            [RINGTAIL, "tail", "--socket", self.socket, "--tenant", str(TENANT),
             "--format", "raw"], capture_output=True, timeout=READY_TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="rtpub-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon(short_dir):
    daemon = Daemon(short_dir)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def publishers():
    """Publishers made by a test, closed even when it fails."""
    made: list[Publisher] = []

    def make(*args, **kwargs) -> Publisher:
        publisher = Publisher(*args, **kwargs)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.close(timeout=0)


def assert_at_least_once_in_order(ids: list[int], expected: list[int], reconnects: int) -> None:
    """Every expected record is there; a repeat only restarts an earlier run (a resend)."""
    assert set(ids) == set(expected)
    position = {index: rank for rank, index in enumerate(expected)}
    ranks = [position[index] for index in ids]
    stretches = [[ranks[0]]]
    for rank in ranks[1:]:
        if rank == stretches[-1][-1] + 1:
            stretches[-1].append(rank)
        else:
            stretches.append([rank])
    assert stretches[0][0] == 0
    for before, after in zip(stretches, stretches[1:]):
        assert after[0] <= before[-1] + 1, "a record went missing between two resends"
    assert stretches[-1][-1] == len(expected) - 1
    assert len(stretches) - 1 <= reconnects, "records repeated without a reconnect"


def test_public_surface_is_pinned_and_the_top_level_name_is_the_same_class():
    import ringtail
    from ringtail.service import publisher as module
    assert sorted(module.__all__) == sorted([
        "BLOCK_TIMEOUT_S_DEFAULT", "BUFFER_RECORD_COUNT_MAX", "CLOSE_TIMEOUT_S_DEFAULT",
        "CONNECT_TIMEOUT_S", "FLUSH_TIMEOUT_S_DEFAULT", "POLICIES", "RECONNECT_DELAY_S_MAX",
        "RECONNECT_DELAY_S_MIN", "SEND_TIMEOUT_S", "TRANSIENT_RETRY_COUNT_MAX",
        "UNACKED_BATCH_COUNT_MAX", "Publisher", "PublisherClosedError", "PublisherError",
        "PublisherFullError", "PublisherStatistics"])
    assert all(hasattr(module, name) for name in module.__all__)
    assert ringtail.Publisher is Publisher
    assert [field.name for field in dataclasses.fields(module.PublisherStatistics)] == [
        "published", "acked", "dropped_full", "rejected", "resent", "reconnects", "buffered",
        "connected", "last_error", "last_disconnect_error"]


# -- against a real daemon ----------------------------------------------------------------


def test_flushed_records_are_tailed_exactly_and_in_order(daemon, publishers):
    publisher = publishers(daemon.socket, TENANT)
    records = [record(index) for index in range(20_000)]
    for one in records[:15_000]:
        assert publisher.publish(one) == 1
    assert publisher.publish(b"".join(records[15_000:15_010])) == 10  # several at once
    array = numpy.frombuffer(b"".join(records[15_010:]), dtype=RECORD_DTYPE).copy()
    assert publisher.publish_many(array) == len(array)  # a prebuilt numpy buffer
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert (stats.published, stats.acked, stats.buffered) == (20_000, 20_000, 0)
    assert (stats.dropped_full, stats.rejected, stats.resent) == (0, 0, 0)
    assert stats.connected and stats.last_error is None
    assert daemon.tail() == b"".join(records)
    assert publisher.close() is True


@pytest.mark.parametrize("exactly_once", [True, False], ids=["exactly-once", "at-least-once"])
def test_daemon_killed_and_restarted_mid_stream_loses_nothing_under_block(daemon, publishers,
                                                                          exactly_once):
    publisher = publishers(daemon.socket, TENANT, policy="block", exactly_once=exactly_once)
    expected = list(range(40_000))
    for index in expected[:1_000]:
        publisher.publish(record(index))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True  # connected before the kill
    for index in expected[1_000:30_000]:  # still in flight when the daemon dies
        publisher.publish(record(index))
    daemon.kill()
    for index in expected[30_000:35_000]:  # the daemon is down
        assert publisher.publish(record(index)) == 1
    daemon.start()  # same data dir, same socket
    for index in expected[35_000:]:
        publisher.publish(record(index))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert stats.reconnects >= 1
    assert (stats.published, stats.acked, stats.buffered) == (40_000, 40_000, 0)
    assert (stats.dropped_full, stats.rejected) == (0, 0)
    if exactly_once:  # batches resent after the kill were answered from the window
        assert indices(daemon.tail()) == expected
    else:
        assert_at_least_once_in_order(indices(daemon.tail()), expected, stats.reconnects)


def test_killed_daemon_is_reported_as_connection_lost_and_stopped_one_as_shutting_down(
        daemon, publishers):
    publisher = publishers(daemon.socket, TENANT)
    publisher.publish(record(0))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    assert publisher.statistics().last_disconnect_error is None
    daemon.kill()
    daemon.start()
    publisher.publish(record(1))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True  # so it noticed and reconnected
    lost = publisher.statistics().last_disconnect_error
    assert isinstance(lost, RingtailError) and lost.code == ErrorCode.CONNECTION_LOST
    assert re.fullmatch(
        rf"CONNECTION_LOST: the daemon at {re.escape(daemon.socket)} closed the connection "
        r"without a reply \(no Error frame\): it may have crashed or been killed; see its log "
        r"\(journalctl -u ringtail, or the stderr of `ringtail serve`\)", str(lost)), lost
    daemon.stop()  # SIGTERM: the daemon says so before it closes
    daemon.start()
    publisher.publish(record(2))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert isinstance(stats.last_disconnect_error, RingtailError)
    assert stats.last_disconnect_error.code == ErrorCode.SHUTTING_DOWN
    assert (stats.acked, stats.reconnects) == (3, 2)


def test_daemon_down_under_drop_counts_dropped_records_and_never_raises(daemon, publishers):
    buffer_count = 256
    publisher = publishers(daemon.socket, TENANT, policy="drop",
                           buffer_record_count_max=buffer_count)
    for index in range(100):
        publisher.publish(record(index))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    daemon.kill()
    taken = [publisher.publish(record(index)) for index in range(100, 2_100)]
    # Nothing can drain while the daemon is down: the buffer takes exactly its size.
    assert taken == [1] * buffer_count + [0] * (2_000 - buffer_count)
    down = publisher.statistics()
    assert (down.published, down.acked) == (2_100, 100)
    assert down.dropped_full == 2_000 - buffer_count and down.buffered == buffer_count
    daemon.start()
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    taken_after = [publisher.publish(record(index)) for index in range(2_100, 2_200)]
    assert taken_after == [1] * 100
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert stats.published == stats.acked + stats.dropped_full + stats.rejected
    assert (stats.published, stats.dropped_full, stats.buffered) == (2_200, 2_000 - buffer_count, 0)
    assert stats.reconnects >= 1
    expected = list(range(100 + buffer_count)) + list(range(2_100, 2_200))
    assert indices(daemon.tail()) == expected  # exactly once, in publish order


def test_bad_records_are_rejected_alone_and_the_others_go_through(daemon, publishers):
    publisher = publishers(daemon.socket, TENANT)
    records = [record(index) for index in range(1_000)]
    bad = {10: record(10, tenant_id=TENANT + 1), 500: b"\0" * 64}  # wrong tenant, bad magic
    sent = [bad.get(index, one) for index, one in enumerate(records)]
    assert publisher.publish(b"".join(sent)) == 1_000
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert (stats.acked, stats.rejected, stats.published) == (998, 2, 1_000)
    assert stats.last_error.code in (ErrorCode.WRONG_TENANT, ErrorCode.BAD_RECORD_MAGIC)
    assert daemon.tail() == b"".join(one for index, one in enumerate(records) if index not in bad)


def test_batch_refused_by_the_daemon_is_counted_not_resent(daemon, publishers):
    publisher = publishers(daemon.socket, TENANT, check_records=False)
    for index in range(10):
        publisher.publish(record(index))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    # Published alone after a flush, the bad record is a batch of its own.
    publisher.publish(record(10, tenant_id=TENANT + 1))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    for index in range(11, 21):
        publisher.publish(record(index))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    stats = publisher.statistics()
    assert (stats.acked, stats.rejected, stats.resent) == (20, 1, 0)
    assert stats.last_error.code == ErrorCode.WRONG_TENANT
    assert stats.connected  # a refused batch does not end the connection
    assert indices(daemon.tail()) == list(range(10)) + list(range(11, 21))


def test_flush_is_false_while_the_daemon_is_down_and_true_once_it_serves(short_dir, publishers):
    daemon = Daemon(short_dir)
    publisher = publishers(daemon.socket, TENANT)
    for index in range(50):
        publisher.publish(record(index))
    assert publisher.flush(0.05) is False
    stats = publisher.statistics()
    assert stats.buffered == 50 and not stats.connected
    daemon.start()
    try:
        assert publisher.flush(FLUSH_TIMEOUT_S) is True
        assert publisher.statistics().acked == 50
        assert indices(daemon.tail()) == list(range(50))
    finally:
        daemon.stop()


def test_records_of_concurrent_threads_all_arrive_each_in_its_order(daemon, publishers):
    publisher = publishers(daemon.socket, TENANT)
    thread_count, per_thread = 4, 5_000

    def work(thread_index: int) -> None:
        for index in range(per_thread):
            publisher.publish(record(thread_index * per_thread + index))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    ids = indices(daemon.tail())
    assert sorted(ids) == list(range(thread_count * per_thread))
    for n in range(thread_count):
        mine = [index for index in ids if index // per_thread == n]
        assert mine == sorted(mine)


# -- no daemon at all -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop", "block"])
def test_publish_never_raises_without_a_daemon(short_dir, publishers, policy):
    publisher = publishers(str(short_dir / "absent.sock"), TENANT, policy=policy,
                           block_timeout_s=0.01, buffer_record_count_max=8)
    taken = [publisher.publish(record(index)) for index in range(12)]
    assert taken == [1] * 8 + [0] * 4
    assert publisher.publish(b"".join(record(index) for index in range(12, 15))) == 0
    stats = publisher.statistics()
    assert (stats.published, stats.buffered, stats.dropped_full, stats.acked) == (15, 8, 7, 0)
    assert publisher.close(timeout=0.01) is False  # abandoned, and said so
    assert publisher.statistics().buffered == 8


def test_block_policy_raises_full_error_when_asked(short_dir, publishers):
    publisher = publishers(str(short_dir / "absent.sock"), TENANT, policy="block",
                           block_timeout_s=0.05, raise_on_full=True, buffer_record_count_max=4)
    for index in range(3):
        assert publisher.publish(record(index)) == 1
    with pytest.raises(PublisherFullError, match=r"1 of 2 records were taken") as caught:
        publisher.publish(record(3) + record(4))
    assert (caught.value.accepted_count, caught.value.record_count) == (1, 2)
    stats = publisher.statistics()
    assert (stats.published, stats.buffered, stats.dropped_full) == (4, 4, 0)


def test_misuse_raises_typed_errors(short_dir, publishers):
    publisher = publishers(str(short_dir / "absent.sock"), TENANT)
    with pytest.raises(ValueError, match=r"whole 64-byte records, got 63 bytes"):
        publisher.publish(b"\0" * 63)
    with pytest.raises(ValueError, match=r"got 0 bytes"):
        publisher.publish(b"")
    publisher.close(timeout=0)
    with pytest.raises(PublisherClosedError, match=r"after close\(\)"):
        publisher.publish(record(0))
    with pytest.raises(ValueError, match=r"policy 'lossy'"):
        Publisher("x.sock", TENANT, policy="lossy")
    with pytest.raises(ValueError, match=r"BUFFER_RECORD_COUNT_MAX"):
        Publisher("x.sock", TENANT, buffer_record_count_max=BUFFER_RECORD_COUNT_MAX + 1)
    with pytest.raises(ValueError, match=r"tenant_id = -1 is not an integer"):
        Publisher("x.sock", -1)


def test_context_manager_flushes_on_exit(daemon):
    with Publisher(daemon.socket, TENANT) as publisher:
        for index in range(100):
            publisher.publish(record(index))
    assert publisher.statistics().acked == 100
    assert indices(daemon.tail()) == list(range(100))
    assert publisher.close() is True  # closing again repeats the answer


# -- a scripted peer, for what a real daemon does not do on demand ---------------------------


class ScriptedPeer:
    """A Unix-socket server that speaks the protocol and follows a script per connection.

    script(connection_index, publish_event) returns "ack", "close" or an ErrorCode.
    """

    def __init__(self, directory: Path, script, count_max: list[int]):
        self.path = str(directory / "peer.sock")
        self.script = script
        self.count_max = count_max  # Welcome.publish_record_count_max per connection
        self.received: list[list[Publish]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.settimeout(READY_TIMEOUT_S)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for index in range(len(self.count_max)):
            peer, _ = self.listener.accept()
            with peer:
                peer.settimeout(READY_TIMEOUT_S)
                self.received.append([])
                self._connection(index, peer)

    def _connection(self, index: int, peer: socket.socket) -> None:
        connection = protocol.Connection(protocol.SERVER)
        while True:
            event = connection.next_event()
            if event is protocol.NEED_DATA:
                connection.receive_data(peer.recv(1 << 16))
                continue
            if event is protocol.CLOSED:
                return
            if isinstance(event, Hello):
                peer.sendall(connection.send(Welcome(event.tenant_id, self.count_max[index],
                                                     0, 0, CAPACITY_RECORD_COUNT, "peer")))
            elif isinstance(event, Publish):
                self.received[index].append(event)
                action = self.script(index, event)
                if action == "close":
                    return
                if action == "ack":
                    peer.sendall(connection.send(Ack(event.batch_id, 0,
                                                     event.record_count - 1)))
                else:
                    peer.sendall(connection.send(Error(action, "scripted", event.batch_id)))


def test_unacked_batches_are_resent_byte_identical_after_the_connection_breaks(
        short_dir, publishers):
    # Connection 0 reads one batch and hangs up without an Ack; connection 1
    # allows only 2 records per batch, so the kept batch is also split.
    peer = ScriptedPeer(short_dir, lambda index, event: "close" if index == 0 else "ack",
                        count_max=[4096, 2])
    publisher = publishers(peer.path, TENANT)
    records = [record(index) for index in range(5)]
    publisher.publish(b"".join(records))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    first, second = peer.received
    lost = b"".join(event.records for event in first)
    again = b"".join(event.records for event in second)
    assert lost == b"".join(records)  # one publish call, one batch
    assert again == lost  # resent in order, byte-identical
    assert all(event.record_count <= 2 for event in second)
    stats = publisher.statistics()
    assert (stats.acked, stats.resent, stats.reconnects, stats.rejected) == (5, 5, 1, 0)
    # The peer hung up without an Error frame: that is what the publisher reports.
    assert stats.last_disconnect_error.code == ErrorCode.CONNECTION_LOST


def test_transiently_refused_batch_is_resent_then_acked(short_dir, publishers):
    refusals = []

    def script(index, event):
        if not refusals:
            refusals.append(event.batch_id)
            return ErrorCode.STORAGE_FAILED
        return "ack"

    peer = ScriptedPeer(short_dir, script, count_max=[4096])
    publisher = publishers(peer.path, TENANT)
    publisher.publish(b"".join(record(index) for index in range(3)))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    (received,) = peer.received
    assert [event.records for event in received] == [b"".join(record(i) for i in range(3))] * 2
    stats = publisher.statistics()
    assert (stats.acked, stats.rejected, stats.resent, stats.reconnects) == (3, 0, 3, 0)
    assert stats.last_error.code == ErrorCode.STORAGE_FAILED


def test_batch_refused_as_too_large_is_split_and_resent_in_order(short_dir, publishers):
    # The peer's Welcome allows 4096 records but it refuses any batch over 2
    # records with the non-fatal BATCH_TOO_LARGE (a limit lowered after the
    # handshake): the publisher halves the batch until it fits.
    def script(index, event):
        return ErrorCode.BATCH_TOO_LARGE if event.record_count > 2 else "ack"

    peer = ScriptedPeer(short_dir, script, count_max=[4096])
    publisher = publishers(peer.path, TENANT)
    records = [record(index) for index in range(5)]
    publisher.publish(b"".join(records))
    assert publisher.flush(FLUSH_TIMEOUT_S) is True
    (received,) = peer.received
    assert [event.record_count for event in received] == [5, 2, 2, 1]
    acked = [event.records for event in received if event.record_count <= 2]
    assert b"".join(acked) == b"".join(records)  # in publish order, byte-identical
    stats = publisher.statistics()
    assert (stats.acked, stats.rejected, stats.reconnects) == (5, 0, 0)
    assert stats.resent == 5  # the refused batch's parts
    assert stats.last_error.code == ErrorCode.BATCH_TOO_LARGE and stats.connected
