"""Load generators for bench/e2e.py: one process each, commands as JSON lines.

Run by bench/e2e.py as ``python -m bench.worker`` (from the repository root);
each line on stdin is one command (a JSON object), answered by one JSON line
on stdout. Not a test and not a client to copy: the publishers speak the wire
protocol with a blocking socket and pre-built frames (`socket.sendmsg` of an
8+8-byte header and the batch's records, Acks parsed by struct), so that the
figures measure the daemon, not a client. The codec (service/protocol/)
does the handshake and the Subscribe.

All timestamps are `time.perf_counter_ns()`, CLOCK_MONOTONIC on Linux, the
same clock in every process of the machine: a command names absolute instants
(`warm_ns`, `start_ns`, `end_ns`) so that several workers run one cell in step
and the orchestrator samples the daemon's CPU time at the same instants.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:
    sys.path.insert(0, _REPOSITORY)

import numpy  # noqa: E402

from ringtail.ioring.record import RECORD_DTYPE, RECORD_MAGIC, RECORD_SIZE_BYTES  # noqa: E402
from ringtail.service import protocol  # noqa: E402
from ringtail.service.protocol import (NEED_DATA, FrameType, Hello, StartKind, Subscribe,  # noqa: E402
                                       Welcome)

_HEADER = struct.Struct("<IHH")
_PUBLISH_HEAD = struct.Struct("<IHHQ")
_ACK = struct.Struct("<IHHQQQ")
_RECORDS_HEAD = struct.Struct("<IHHQ")
_SPARSE_HEAD = struct.Struct("<IHHQI")
_ACK_SIZE = _ACK.size
RECEIVE_SIZE_BYTES = protocol.RECEIVE_SIZE_BYTES  # the one read size of every side
_TIMESTAMP_OFFSET = RECORD_DTYPE.fields["timestamp_ns"][1]
# Latency samples kept per worker and cell (int64, 8 MiB at most).
LATENCY_SAMPLE_COUNT_MAX = 1 << 20


def make_records(tenant_id: int, count: int, opcode_modulus: int = 16) -> bytes:
    array = numpy.zeros(count, dtype=RECORD_DTYPE)
    array["magic"] = RECORD_MAGIC
    array["timestamp_ns"] = time.time_ns()
    array["slot_idx"] = numpy.arange(count, dtype=numpy.uint32)
    array["tenant_id"] = tenant_id
    array["opcode"] = numpy.arange(count, dtype=numpy.uint32) % opcode_modulus
    return array.tobytes()


class RawClient:
    """A blocking Unix-socket connection: codec handshake, then raw frames."""

    def __init__(self, socket_path: str, tenant_id: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.connection = protocol.Connection(protocol.CLIENT)
        self.sock.sendall(self.connection.send(Hello(tenant_id, b"", "ringtail-bench")))
        event = self.event()
        if not isinstance(event, Welcome):
            raise RuntimeError(f"expected Welcome, got {event!r}")
        self.welcome = event
        self.buffer = bytearray()

    def event(self):
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                return event
            self.connection.receive_data(self.sock.recv(RECEIVE_SIZE_BYTES))

    def close(self) -> None:
        self.sock.close()

    def read_frames(self, handle) -> None:
        """One recv; `handle(frame_type, buffer, start, end)` per whole frame."""
        data = self.sock.recv(RECEIVE_SIZE_BYTES)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        buffer = self.buffer
        buffer += data
        position, size_all = 0, len(buffer)
        while size_all - position >= 8:
            size, frame_type, _flags = _HEADER.unpack_from(buffer, position)
            end = position + 8 + size
            if end > size_all:
                break
            if frame_type == FrameType.ERROR:
                raise RuntimeError(f"daemon error: {protocol.decode_frame(bytes(buffer[position:end]))}")
            handle(frame_type, buffer, position, end)
            position = end
        del buffer[:position]


def _wait_until(instant_ns: int) -> None:
    while True:
        left = instant_ns - time.perf_counter_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9, 0.05))


def ingest(socket_path: str, tenant_id: int, batch: int, window: int,
           warm_ns: int, start_ns: int, end_ns: int) -> dict:
    """Publish batches of `batch` records, `window` unacknowledged, until end_ns.

    Counts records whose Ack arrived in [start_ns, end_ns) and the send-to-ack
    latency of every batch sent in that window.
    """
    client = RawClient(socket_path, tenant_id)
    pool = [make_records(tenant_id, batch) for _ in range(8)]
    sock = client.sock
    sent_at: dict[int, int] = {}
    latencies = numpy.empty(LATENCY_SAMPLE_COUNT_MAX, dtype=numpy.int64)
    state = {"latency_count": 0, "acked": 0}
    batch_id = 0
    pack = _PUBLISH_HEAD.pack
    frame_size = 8 + batch * RECORD_SIZE_BYTES
    ack_type = int(FrameType.ACK)

    def on_frame(frame_type, buffer, start, end):
        if frame_type != ack_type:
            return
        _s, _t, _f, acked_id, _first, _last = _ACK.unpack_from(buffer, start)
        now = time.perf_counter_ns()
        sent = sent_at.pop(acked_id)
        if start_ns <= now < end_ns:
            state["acked"] += batch
        if sent >= start_ns and now < end_ns and state["latency_count"] < LATENCY_SAMPLE_COUNT_MAX:
            latencies[state["latency_count"]] = now - sent
            state["latency_count"] += 1

    _wait_until(warm_ns)
    while True:
        now = time.perf_counter_ns()
        if now >= end_ns:
            break
        if len(sent_at) < window:
            batch_id += 1
            sent_at[batch_id] = time.perf_counter_ns()
            sock.sendmsg([pack(frame_size, 3, 0, batch_id), pool[batch_id & 7]])
            if len(sent_at) < window:
                continue
        client.read_frames(on_frame)
    while sent_at:  # drain: the daemon answers every batch it read
        client.read_frames(on_frame)
    client.close()
    count = state["latency_count"]
    return {"acked": state["acked"], "latencies_ns": latencies[:count].tolist()
            if count <= 200_000 else numpy.random.default_rng(1).choice(
                latencies[:count], 200_000, replace=False).tolist(),
            "latency_count": count}


def fill(socket_path: str, tenant_id: int, record_count: int, batch: int = 4096,
         window: int = 8) -> dict:
    """Publish record_count records as fast as the daemon takes them."""
    client = RawClient(socket_path, tenant_id)
    pool = [make_records(tenant_id, batch) for _ in range(4)]
    outstanding = [0]
    sent = 0
    started = time.perf_counter()

    def on_frame(frame_type, buffer, start, end):
        if frame_type == FrameType.ACK:
            outstanding[0] -= 1

    batch_id = 0
    while sent < record_count or outstanding[0]:
        if sent < record_count and outstanding[0] < window:
            batch_id += 1
            count = min(batch, record_count - sent)
            records = pool[batch_id & 3][:count * RECORD_SIZE_BYTES]
            client.sock.sendmsg([_PUBLISH_HEAD.pack(8 + len(records), 3, 0, batch_id), records])
            sent += count
            outstanding[0] += 1
            continue
        client.read_frames(on_frame)
    client.close()
    return {"records": sent, "seconds": time.perf_counter() - started}


def replay(socket_path: str, tenant_id: int, opcodes: list[int]) -> dict:
    """Subscribe from oldest (no follow) and count records until End."""
    client = RawClient(socket_path, tenant_id)
    started = time.perf_counter_ns()
    client.sock.sendall(client.connection.send(Subscribe(
        StartKind.OLDEST, 0, False, False, 0, 0xFFFF_FFFF, frozenset(opcodes))))
    state = {"records": 0, "end": None, "first": None}
    records_type, sparse_flag = int(FrameType.RECORDS), protocol.RECORDS_FLAG_SPARSE
    end_type = int(FrameType.END)

    def on_frame(frame_type, buffer, start, end):
        if frame_type == records_type:
            _s, _t, flags = _HEADER.unpack_from(buffer, start)
            if flags & sparse_flag:
                state["records"] += _SPARSE_HEAD.unpack_from(buffer, start)[4]
            else:
                state["records"] += (end - start - 16) // RECORD_SIZE_BYTES
        elif frame_type == end_type:
            state["end"] = struct.unpack_from("<Q", buffer, start + 8)[0]

    while state["end"] is None:
        client.read_frames(on_frame)
    seconds = (time.perf_counter_ns() - started) / 1e9
    client.close()
    return {"delivered": state["records"], "end_sequence": state["end"], "seconds": seconds}


def tail_subscribe(socket_path: str, tenant_id: int, start_ns: int, end_ns: int) -> dict:
    """Follow from latest; latency = arrival - the record's timestamp_ns (perf_counter)."""
    client = RawClient(socket_path, tenant_id)
    client.sock.sendall(client.connection.send(Subscribe(
        StartKind.LATEST, 0, True, False, 0, 0xFFFF_FFFF, frozenset())))
    client.sock.settimeout(0.2)
    latencies = []
    records_type = int(FrameType.RECORDS)
    state = {"count": 0}

    def on_frame(frame_type, buffer, start, end):
        if frame_type != records_type:
            return
        now = time.perf_counter_ns()
        stamps = numpy.frombuffer(bytes(buffer[start + 16:end]), dtype=RECORD_DTYPE)["timestamp_ns"]
        stamps = stamps.astype(numpy.int64)
        keep = stamps[(stamps >= start_ns) & (stamps < end_ns)]
        state["count"] += len(keep)
        latencies.append(now - keep)

    while time.perf_counter_ns() < end_ns + 200_000_000:
        try:
            client.read_frames(on_frame)
        except socket.timeout:
            continue
    client.close()
    joined = numpy.concatenate(latencies) if latencies else numpy.empty(0, numpy.int64)
    return {"count": state["count"], "latencies_ns": joined.tolist()[:400_000]}


def tail_fanout(socket_path: str, tenant_id: int, subscribers: int, start_ns: int,
                end_ns: int) -> dict:
    """`subscribers` followers of one tenant from latest, on one selector:
    latency = arrival - the record's timestamp_ns (perf_counter), per record."""
    import selectors
    clients = [RawClient(socket_path, tenant_id) for _ in range(subscribers)]
    for client in clients:
        client.sock.sendall(client.connection.send(Subscribe(
            StartKind.LATEST, 0, True, False, 0, 0xFFFF_FFFF, frozenset())))
        client.sock.setblocking(False)
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    latencies = []
    records_type = int(FrameType.RECORDS)
    state = {"count": 0, "frames": 0}

    def on_frame(frame_type, buffer, start, end):
        if frame_type != records_type:
            return
        now = time.perf_counter_ns()
        state["frames"] += 1
        stamps = numpy.frombuffer(buffer, dtype=RECORD_DTYPE, offset=start + 16,
                                  count=(end - start - 16) // RECORD_SIZE_BYTES)["timestamp_ns"]
        stamps = stamps.astype(numpy.int64)  # a copy: the buffer is trimmed after this frame
        keep = stamps[(stamps >= start_ns) & (stamps < end_ns)]
        state["count"] += len(keep)
        if len(keep):
            latencies.append(now - keep)

    while time.perf_counter_ns() < end_ns + 200_000_000:
        for key, _ in selector.select(0.05):
            try:
                key.data.read_frames(on_frame)
            except BlockingIOError:
                pass
    selector.close()
    for client in clients:
        client.close()
    joined = numpy.concatenate(latencies) if latencies else numpy.empty(0, numpy.int64)
    if len(joined) > 400_000:
        joined = numpy.random.default_rng(1).choice(joined, 400_000, replace=False)
    return {"count": state["count"], "frames": state["frames"], "latencies_ns": joined.tolist()}


def copy_sink(socket_path: str) -> dict:
    """The pipe ceiling's reader: accept one Unix-socket connection, recv_into
    one buffer until EOF; bytes and seconds from accept to EOF."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(1)
    connection, _ = listener.accept()
    started = time.perf_counter_ns()
    buffer = bytearray(RECEIVE_SIZE_BYTES)
    total = 0
    while True:
        got = connection.recv_into(buffer)
        if not got:
            break
        total += got
    seconds = (time.perf_counter_ns() - started) / 1e9
    connection.close()
    listener.close()
    os.unlink(socket_path)
    return {"bytes": total, "seconds": seconds}


def copy_source(socket_path: str, file_path: str, offset: int, size: int,
                step: int = 256 << 10) -> dict:
    """The pipe ceiling's writer: the same bytes from the file (preadv into one
    buffer, the replay's read size) to the sink's socket, `sendall` each."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    fd = os.open(file_path, os.O_RDONLY)
    buffer = bytearray(step)
    view = memoryview(buffer)
    sent = 0
    started = time.perf_counter_ns()
    try:
        while sent < size:
            got = os.preadv(fd, [view[:min(step, size - sent)]], offset + sent)
            if not got:
                raise RuntimeError(f"{file_path} ends at {offset + sent}")
            sock.sendall(view[:got])
            sent += got
    finally:
        os.close(fd)
        sock.close()
    return {"bytes": sent, "seconds": (time.perf_counter_ns() - started) / 1e9}


def tail_publish(socket_path: str, tenant_id: int, rate: float, warm_ns: int, end_ns: int,
                 tick_ns: int = 1_000_000) -> dict:
    """Offer `rate` records/s: every tick a batch stamped with perf_counter_ns."""
    client = RawClient(socket_path, tenant_id)
    array = numpy.frombuffer(bytearray(make_records(tenant_id, 4096)), dtype=RECORD_DTYPE)
    sock = client.sock
    sock.setblocking(False)
    sent = acked = 0
    batch_id = 0
    ack_type = int(FrameType.ACK)

    def on_frame(frame_type, buffer, start, end):
        nonlocal acked
        if frame_type == ack_type:
            acked += 1

    _wait_until(warm_ns)
    began = time.perf_counter_ns()
    next_tick = began
    while True:
        now = time.perf_counter_ns()
        if now >= end_ns:
            break
        due = int((now - began) * rate / 1e9) - sent
        if due > 0:
            count = min(due, 4096)
            array["timestamp_ns"][:count] = now
            batch_id += 1
            sock.setblocking(True)
            sock.sendmsg([_PUBLISH_HEAD.pack(8 + 64 * count, 3, 0, batch_id),
                          array[:count].tobytes()])
            sock.setblocking(False)
            sent += count
        try:
            client.read_frames(on_frame)
        except BlockingIOError:
            pass
        next_tick += tick_ns
        delay = next_tick - time.perf_counter_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
    client.close()
    return {"sent": sent, "batches": batch_id, "acked_batches": acked}


# The paced stall pass publishes at this share of the unpaced pass's rate.
PACED_STALL_RATE_SHARE = 0.5
# The paced pass sleeps after every this many records (load pacing).
PACE_STEP_RECORDS = 256


def _worst_publish_gap(publish, records: list[bytes], rounds: int, rate: float) -> int:
    """The longest gap (ns) between consecutive publish() returns over
    `rounds` x len(records) records; with `rate`, paced to it (the pacing
    sleeps themselves are not gaps)."""
    worst = 0
    clock = time.perf_counter_ns
    began = previous = clock()
    count = 0
    for _ in range(rounds):
        for record in records:
            publish(record)
            now = clock()
            if now - previous > worst:
                worst = now - previous
            previous = now
            count += 1
            if rate and count % PACE_STEP_RECORDS == 0:
                ahead = began + count * 1e9 / rate - now
                if ahead > 0:
                    time.sleep(ahead / 1e9)  # load pacing, not synchronisation
                    previous = clock()
    return worst


def sync_publisher(socket_path: str, tenant_id: int, record_count: int) -> dict:
    """ringtail.service.publisher.Publisher.publish() of one record at a time, in this thread."""
    from ringtail.service.publisher import BLOCK_TIMEOUT_S_DEFAULT, Publisher
    data = make_records(tenant_id, 4096)
    records = [data[i * 64:(i + 1) * 64] for i in range(4096)]
    result = {"block_timeout_s": BLOCK_TIMEOUT_S_DEFAULT}
    with Publisher(socket_path, tenant_id) as publisher:
        publish = publisher.publish
        for _ in range(3):  # let it connect and warm up
            for record in records:
                publish(record)
        publisher.flush(30.0)
        # Amortised: a tight loop, one clock read per 4,096 records.
        # Wall time includes the sender thread's turns at the GIL; the caller
        # thread's own CPU time (thread_time) is what publish() itself costs.
        rounds = max(1, record_count // 4096)
        started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(rounds):
            for record in records:
                publish(record)
        elapsed = time.perf_counter_ns() - started
        result["amortised_ns"] = elapsed / (rounds * 4096)
        result["caller_cpu_ns"] = (time.thread_time_ns() - cpu_started) / (rounds * 4096)
        publisher.flush(30.0)
        # Stall: the longest gap between consecutive publish() returns, first
        # as fast as the caller can go (past what the sender and the daemon
        # drain, the buffer fills and "block" holds the caller: backpressure),
        # then paced at half that pass's rate (the buffer never fills: what is
        # left is the sender thread's turns at the GIL).
        started = time.perf_counter_ns()
        result["worst_stall_ns"] = _worst_publish_gap(publish, records, rounds, 0.0)
        unpaced_rate = rounds * 4096 * 1e9 / (time.perf_counter_ns() - started)
        publisher.flush(30.0)
        result["paced_rate"] = PACED_STALL_RATE_SHARE * unpaced_rate
        result["paced_worst_stall_ns"] = _worst_publish_gap(publish, records, rounds,
                                                            result["paced_rate"])
        publisher.flush(30.0)
        stats = publisher.statistics()
        result["acked"] = stats.acked
        result["dropped_full"] = stats.dropped_full
    return result


def redis_tail(port: int, rate: float, warm_ns: int, start_ns: int, end_ns: int) -> dict:
    """XADD at `rate` (pipelined per 1 ms tick) from a thread; XREAD BLOCK on another connection."""
    import threading

    import redis
    reader = redis.Redis(port=port)
    writer = redis.Redis(port=port)
    stream = f"tail-{rate:.0f}"
    latencies = []
    stop = threading.Event()

    def publish():
        _wait_until(warm_ns)
        began = time.perf_counter_ns()
        sent = 0
        next_tick = began
        while not stop.is_set():
            now = time.perf_counter_ns()
            if now >= end_ns:
                break
            due = int((now - began) * rate / 1e9) - sent
            if due > 0:
                pipe = writer.pipeline(transaction=False)
                payload = now.to_bytes(8, "little") + b"x" * 56
                for _ in range(due):
                    pipe.xadd(stream, {"f": payload})
                pipe.execute()
                sent += due
            next_tick += 1_000_000
            delay = next_tick - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)

    thread = threading.Thread(target=publish)
    last = "$"
    thread.start()
    while time.perf_counter_ns() < end_ns + 100_000_000:
        reply = reader.xread({stream: last}, block=100, count=10_000)
        now = time.perf_counter_ns()
        for _name, entries in reply or ():
            for entry_id, fields in entries:
                last = entry_id
                stamp = int.from_bytes(fields[b"f"][:8], "little")
                if start_ns <= stamp < end_ns:
                    latencies.append(now - stamp)
    stop.set()
    thread.join()
    return {"count": len(latencies), "latencies_ns": latencies[:400_000]}


COMMANDS = {"ingest": ingest, "fill": fill, "replay": replay, "tail_subscribe": tail_subscribe,
            "tail_fanout": tail_fanout, "tail_publish": tail_publish,
            "sync_publisher": sync_publisher, "redis_tail": redis_tail,
            "copy_sink": copy_sink, "copy_source": copy_source}


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("op")
        try:
            result = COMMANDS[name](**command)
        except Exception as error:  # reported to the orchestrator, which fails the cell
            result = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
