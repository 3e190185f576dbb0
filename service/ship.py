"""`ringtail ship`: each tenant's records, through the daemon, into NATS JetStream, exactly once.

Per tenant, one loop (docs/OPERATIONS.md, "Fleet"):

1. **Resume point, from JetStream itself.** The subject's last message says
   where the shipped history ends (`first + count`), and its stream sequence
   is the `Nats-Expected-Last-Subject-Sequence` of the next publish. No local
   cursor exists that could disagree with the stream.
2. **Subscribe on the daemon** from that sequence (from the oldest record when
   the subject is empty), following. A start that the ring evicted meanwhile
   comes back as a Gap, which is shipped as a gap message naming the range.
3. **Publish runs** of consecutive records (up to SHIP_MESSAGE_RECORD_COUNT_MAX
   per message), one message in flight per tenant, each with `Nats-Msg-Id`
   and the expected last subject sequence. A resend of a message the server
   already stored is answered as a duplicate (the server's duplicate window);
   a publish that would not directly follow the subject's last message is
   refused by the server (wrong last sequence). Either way ship goes back to
   step 1, so a message can neither repeat nor skip records, whatever
   crashed or timed out in between: ship, the daemon, or a NATS node.

Why one message in flight per tenant: the expected-last-subject-sequence of
a message is the stream sequence of the one before it, known only from its
ack. Pipelining without it could store message k+1 after k failed, a hole no
later step notices. Throughput comes from message size instead: a message
carries everything the daemon has delivered (up to 4,096 records), so a
backlog ships in large messages; tenants ship concurrently.

While NATS is unreachable, ship stops reading from the daemon; the ring keeps
what it can hold, and what it evicts meanwhile becomes a gap message when
shipping resumes. While the daemon is unreachable, ship retries with capped
backoff. SIGTERM or SIGINT stops it cleanly (exit 0).

Error handling: FleetError (service/fleet.py) for what an operator must fix
(foreign messages on a ringtail subject, a stream whose subjects conflict, a
daemon that refuses the tenant); everything else is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket as socket_module
import time
from typing import Iterable

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service import protocol
from ringtail.service.errors import RingtailError, connection_lost_error
from ringtail.service.fleet import (JS_ERR_SUBJECTS_OVERLAP, JS_ERR_WRONG_LAST_SEQUENCE,
                                    KIND_GAP, KIND_RECORDS, NATS_REQUEST_TIMEOUT_S,
                                    SHIP_MESSAGE_RECORD_COUNT_MAX, STREAM_NAME_DEFAULT,
                                    STREAM_REPLICAS_DEFAULT,
                                    SUBJECT_PREFIX, FleetError, FleetErrorCode, last_message,
                                    check_node_name, connect_nats, message_headers, subject)
from ringtail.service.protocol import (CLOSED, NEED_DATA, End, Error, ErrorCode, Gap, Hello,
                                       Records, StartKind, Subscribe, Welcome)

log = logging.getLogger("ringtail.ship")

# Backoff between attempts while NATS or the daemon is unreachable: doubles
# from the minimum to the cap, back to the minimum after progress. The cap
# bounds how late ship notices a recovered peer (s).
RETRY_BACKOFF_MIN_S = 0.05
RETRY_BACKOFF_MAX_S = 2.0
# Events decoded from the daemon per turn before they are published: one
# turn holds at most this many Records frames (256 KiB each at most: 2 MiB),
# besides asyncio's read buffer (128 KiB) and the socket's.
DAEMON_EVENTS_PER_TURN_MAX = 8
# Seconds between status lines in the log (shipped, lag, gaps).
STATUS_INTERVAL_S = 10.0
# Seconds of JetStream's duplicate window for a stream ship creates: only a
# resend of the message just in flight needs it, after a timeout or restart.
STREAM_DUPLICATE_WINDOW_S = 120.0
# Daemon error codes that a restart or a wait can cure: retried, not fatal.
DAEMON_TRANSIENT_CODES = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.CONNECTION_LOST,
                                    ErrorCode.TENANT_UNAVAILABLE, ErrorCode.TOO_MANY_CONNECTIONS,
                                    ErrorCode.TOO_MANY_SUBSCRIBERS, ErrorCode.STORAGE_FAILED,
                                    ErrorCode.HANDSHAKE_TIMEOUT})

assert 0 < RETRY_BACKOFF_MIN_S <= RETRY_BACKOFF_MAX_S
assert DAEMON_EVENTS_PER_TURN_MAX >= 1


class _Resync(Exception):
    """Go back to step 1: the stream, not ship's memory, says where shipping stands."""


class _Unavailable(Exception):
    """NATS or the daemon cannot be reached now: retry after a backoff."""


@dataclasses.dataclass(frozen=True, slots=True)
class TenantShipStatistics:
    tenant_id: int
    shipped_next_sequence: int | None  # the next ring sequence to ship; None: not known yet
    seen_next_sequence: int  # one past the newest sequence the daemon has shown ship
    lag_records: int  # seen but not yet acknowledged by JetStream
    lag_seconds: float  # age of the oldest record seen but not yet acknowledged


@dataclasses.dataclass(frozen=True, slots=True)
class ShipStatistics:
    records_shipped: int
    messages_shipped: int
    gaps: int  # gap messages published
    gap_records: int  # ring sequences those gaps name
    reconnects: int  # retries after NATS or the daemon became unreachable
    resyncs: int  # returns to the stream's last message (duplicate, wrong last sequence)
    tenants: tuple[TenantShipStatistics, ...]


class _TenantState:
    __slots__ = ("tenant_id", "shipped_next", "last_stream_sequence", "seen_next",
                 "oldest_unshipped_at")

    def __init__(self, tenant_id: int):
        self.tenant_id = tenant_id
        self.shipped_next: int | None = None
        self.last_stream_sequence = 0
        self.seen_next = 0
        self.oldest_unshipped_at: float | None = None  # monotonic time, None: nothing pending


class DaemonSubscription:
    """A follow subscription on the daemon's Unix socket, on asyncio (nats-py's
    loop), over the same sans-IO protocol.Connection the Trio client uses.

    Resource handling: owns the socket; use `async with`.
    Error handling: RingtailError for the daemon's Error frames and for
    CONNECTION_LOST; OSError when the socket cannot be reached.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 socket_path: str):
        self._reader = reader
        self._writer = writer
        self._socket_path = socket_path
        self._connection = protocol.Connection(protocol.CLIENT)
        self.welcome: Welcome | None = None

    @classmethod
    async def open(cls, socket_path: str, tenant_id: int, start: StartKind,
                   start_value: int) -> "DaemonSubscription":
        reader, writer = await asyncio.open_unix_connection(socket_path)
        subscription = cls(reader, writer, socket_path)
        try:
            await subscription._send(Hello(tenant_id, b"", "ringtail-ship"))
            events = await subscription.next_events()
            if not isinstance(events[0], Welcome):
                raise RingtailError(ErrorCode.MALFORMED_FRAME,
                                    f"expected Welcome, got {events[0]!r}")
            subscription.welcome = events[0]
            await subscription._send(Subscribe(start, start_value, follow=True))
        except BaseException:
            writer.close()
            raise
        return subscription

    async def _send(self, event) -> None:
        self._writer.write(self._connection.send(event))
        await self._writer.drain()

    async def next_events(self) -> list:
        """At least one event: every one already decodable, up to DAEMON_EVENTS_PER_TURN_MAX.

        Raises:
            RingtailError: an Error frame from the daemon, or CONNECTION_LOST.
        """
        events: list = []
        while len(events) < DAEMON_EVENTS_PER_TURN_MAX:
            try:
                event = self._connection.next_event()
            except protocol.RemoteProtocolError as error:
                raise connection_lost_error(self._socket_path, str(error)) from error
            if event is NEED_DATA:
                if events:
                    break
                try:
                    data = await self._reader.read(protocol.RECEIVE_SIZE_BYTES)
                except ConnectionError as error:
                    raise connection_lost_error(self._socket_path, str(error)) from error
                self._connection.receive_data(data)
                continue
            if event is CLOSED:
                raise connection_lost_error(self._socket_path)
            if isinstance(event, Error):
                raise RingtailError.from_event(event)
            events.append(event)
        return events

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> "DaemonSubscription":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


class Shipper:
    """Ships tenants from one daemon to one JetStream stream (see the module docstring).

    Args:
        nats_url: the NATS server(s), e.g. "nats://127.0.0.1:4222".
        socket_path: the daemon's Unix socket.
        node: this machine's name in the subjects (one subject token).
        tenants: the tenant ids to ship.
        stream: the JetStream stream; created if missing with `replicas` replicas.
    """

    def __init__(self, nats_url: str, socket_path: str, node: str, tenants: Iterable[int], *,
                 stream: str = STREAM_NAME_DEFAULT, replicas: int = STREAM_REPLICAS_DEFAULT):
        self.nats_url = nats_url
        self.socket_path = socket_path
        self.node = check_node_name(node)
        self.stream = stream
        self.replicas = replicas
        self._tenants = {tenant_id: _TenantState(tenant_id) for tenant_id in tenants}
        if not self._tenants:
            raise ValueError("ship needs at least one tenant (--tenant T)")
        self._nc = None
        self._js = None
        self._message_record_count_max = SHIP_MESSAGE_RECORD_COUNT_MAX
        self._records_shipped = self._messages_shipped = 0
        self._gaps = self._gap_records = self._reconnects = self._resyncs = 0

    def statistics(self) -> ShipStatistics:
        now = time.monotonic()
        tenants = []
        for state in self._tenants.values():
            shipped = state.shipped_next if state.shipped_next is not None else state.seen_next
            tenants.append(TenantShipStatistics(
                state.tenant_id, state.shipped_next, state.seen_next,
                max(0, state.seen_next - shipped),
                0.0 if state.oldest_unshipped_at is None else now - state.oldest_unshipped_at))
        return ShipStatistics(self._records_shipped, self._messages_shipped, self._gaps,
                              self._gap_records, self._reconnects, self._resyncs, tuple(tenants))

    async def run(self) -> None:
        """Ship until cancelled; FleetError for what an operator must fix."""
        self._nc = await connect_nats(self.nats_url, f"ringtail-ship-{self.node}")
        try:
            self._js = self._nc.jetstream(timeout=NATS_REQUEST_TIMEOUT_S)
            payload_max = self._nc.max_payload
            self._message_record_count_max = min(SHIP_MESSAGE_RECORD_COUNT_MAX,
                                                 (payload_max - 4096) // RECORD_SIZE_BYTES)
            if self._message_record_count_max < 1:
                raise FleetError(FleetErrorCode.NATS_PAYLOAD_TOO_SMALL,
                                 f"the NATS server's max_payload is {payload_max} bytes, too "
                                 "small for one 64-byte record with headers; raise max_payload")
            await self._ensure_stream()
            async with asyncio.TaskGroup() as group:
                for state in self._tenants.values():
                    group.create_task(self._ship_tenant(state))
                group.create_task(self._report_status())
        except* FleetError as errors:
            raise errors.exceptions[0] from None
        finally:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _ensure_stream(self) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import APIError, NotFoundError
        wanted = subject(self.node, "*")
        try:
            info = await self._js.stream_info(self.stream)
        except NotFoundError:
            info = None
        except (asyncio.TimeoutError, OSError) as error:
            raise FleetError(FleetErrorCode.NATS_UNREACHABLE,
                             f"NATS at {self.nats_url} did not answer a JetStream request "
                             f"({error or type(error).__name__}); is JetStream enabled (-js)?") \
                from None
        if info is not None:
            subjects = list(info.config.subjects or [])
            if not any(_subject_covers(pattern, wanted) for pattern in subjects):
                raise FleetError(FleetErrorCode.STREAM_CONFLICT,
                                 f"stream {self.stream!r} exists with subjects {subjects}, which "
                                 f"do not cover {wanted}; add `{SUBJECT_PREFIX}.>` to its "
                                 "subjects or ship to another stream (--stream)")
            return
        config = StreamConfig(name=self.stream, subjects=[f"{SUBJECT_PREFIX}.>"],
                              storage=StorageType.FILE, num_replicas=self.replicas,
                              duplicate_window=STREAM_DUPLICATE_WINDOW_S)
        try:
            await self._js.add_stream(config)
        except APIError as error:
            if error.err_code == JS_ERR_SUBJECTS_OVERLAP:
                raise FleetError(FleetErrorCode.STREAM_CONFLICT,
                                 f"cannot create stream {self.stream!r} for "
                                 f"{SUBJECT_PREFIX}.>: another stream already holds "
                                 f"overlapping subjects ({error.description}); ship into that "
                                 "stream (--stream NAME) or remove the overlap") from None
            raise FleetError(FleetErrorCode.STREAM_CONFLICT,
                             f"cannot create stream {self.stream!r} with {self.replicas} "
                             f"replica(s): {error.description} (JetStream error "
                             f"{error.err_code}); fix --replicas or the server's JetStream "
                             "limits") from None
        log.info("created JetStream stream %s (subjects %s.>, %d replica(s))", self.stream,
                 SUBJECT_PREFIX, self.replicas)

    async def _ship_tenant(self, state: _TenantState) -> None:
        backoff = RETRY_BACKOFF_MIN_S
        while True:
            before = self._records_shipped + self._gaps
            try:
                await self._ship_session(state)
            except _Resync as why:
                self._resyncs += 1
                log.info("tenant %d: resuming from the stream's last message (%s)",
                         state.tenant_id, why)
                continue
            except _Unavailable as why:
                self._reconnects += 1
                log.warning("tenant %d: %s; retrying in %.2f s", state.tenant_id, why, backoff)
            if self._records_shipped + self._gaps > before:
                backoff = RETRY_BACKOFF_MIN_S
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_BACKOFF_MAX_S)

    async def _ship_session(self, state: _TenantState) -> None:
        tenant_id = state.tenant_id
        subject_name = subject(self.node, tenant_id)
        try:
            last = await last_message(self._js, self.stream, subject_name)
        except (asyncio.TimeoutError, OSError) as error:
            raise _Unavailable(f"NATS did not answer ({error or type(error).__name__})") from None
        except Exception as error:  # nats-py's own errors while disconnected
            if isinstance(error, FleetError):
                raise
            raise _Unavailable(f"NATS request failed ({error!r})") from None
        if last is None:
            state.shipped_next, state.last_stream_sequence = None, 0
            start, start_value = StartKind.OLDEST, 0
        else:
            state.shipped_next, state.last_stream_sequence = last.next_sequence, last.stream_sequence
            start, start_value = StartKind.SEQUENCE, last.next_sequence
        try:
            subscription = await DaemonSubscription.open(self.socket_path, tenant_id, start,
                                                         start_value)
        except OSError as error:
            raise _Unavailable(f"the daemon's socket {self.socket_path} cannot be reached "
                               f"({error.strerror or error})") from None
        except RingtailError as error:
            raise self._daemon_failure(error, state) from None
        async with subscription:
            welcome = subscription.welcome
            state.seen_next = max(state.seen_next, welcome.next_sequence)
            if state.shipped_next is not None and state.shipped_next < state.seen_next:
                state.oldest_unshipped_at = time.monotonic()
            expected = start_value if start is StartKind.SEQUENCE else None
            while True:
                try:
                    events = await subscription.next_events()
                except RingtailError as error:
                    raise self._daemon_failure(error, state) from None
                if state.oldest_unshipped_at is None:
                    state.oldest_unshipped_at = time.monotonic()
                expected = await self._ship_events(state, events, expected)
                if state.shipped_next is not None and state.shipped_next >= state.seen_next:
                    state.oldest_unshipped_at = None

    async def _ship_events(self, state: _TenantState, events: list, expected: int | None
                           ) -> int | None:
        """Publish one turn's events: consecutive Records as runs, each Gap as a
        gap message. `expected` is the sequence the daemon must send next (None
        before the first); returns it after these events.

        Raises:
            _Resync: the daemon's events do not follow on (or ended a follow).
        """
        run_first: int | None = None
        run: list[bytes] = []
        for event in events:
            if isinstance(event, Records):
                if event.sequences is not None or (
                        expected is not None and event.first_sequence != expected):
                    raise _Resync(f"the daemon sent sequence {event.first_sequence}, "
                                  f"expected {expected}")
                if run_first is None:
                    run_first = event.first_sequence
                run.append(event.records)
                expected = event.first_sequence + event.record_count
                state.seen_next = max(state.seen_next, expected)
            elif isinstance(event, Gap):
                if run:
                    await self._publish_run(state, run_first, b"".join(run))
                    run_first, run = None, []
                if expected is not None and event.first_lost_sequence != expected:
                    raise _Resync(f"the daemon sent a gap from {event.first_lost_sequence}, "
                                  f"expected {expected}")
                await self._publish_gap(state, event)
                expected = event.last_lost_sequence + 1
            elif isinstance(event, End):
                raise _Resync("the daemon ended a follow subscription")
        if run:
            await self._publish_run(state, run_first, b"".join(run))
        return expected

    async def _publish_gap(self, state: _TenantState, gap: Gap) -> None:
        count = gap.last_lost_sequence - gap.first_lost_sequence + 1
        await self._publish(state, KIND_GAP, gap.first_lost_sequence, count, b"")
        self._gaps += 1
        self._gap_records += count
        log.warning("tenant %d: sequences %d..%d were evicted from the ring before ship read "
                    "them; shipped a gap message", state.tenant_id, gap.first_lost_sequence,
                    gap.last_lost_sequence)

    def _daemon_failure(self, error: RingtailError, state: _TenantState) -> Exception:
        if error.code in DAEMON_TRANSIENT_CODES:
            return _Unavailable(f"the daemon: {error}")
        if error.code == ErrorCode.BAD_SUBSCRIBE:
            return FleetError(FleetErrorCode.DAEMON_REFUSED,
                              f"tenant {state.tenant_id}: the stream holds this node's records "
                              f"up to sequence {(state.shipped_next or 1) - 1}, past the "
                              f"daemon's ring ({error.message}); the ring was recreated or "
                              "replaced. Ship it under a new --node name, or delete the "
                              f"subject {subject(self.node, state.tenant_id)} from the stream")
        return FleetError(FleetErrorCode.DAEMON_REFUSED,
                          f"tenant {state.tenant_id}: the daemon at {self.socket_path} refused "
                          f"the subscription: {error}")

    async def _publish_run(self, state: _TenantState, first: int, records: bytes) -> None:
        step = self._message_record_count_max * RECORD_SIZE_BYTES
        for offset in range(0, len(records), step):
            chunk = records[offset:offset + step]
            await self._publish(state, KIND_RECORDS, first + offset // RECORD_SIZE_BYTES,
                                len(chunk) // RECORD_SIZE_BYTES, chunk)

    async def _publish(self, state: _TenantState, kind: str, first: int, count: int,
                       payload: bytes) -> None:
        """Publish one message and wait for its ack; retry the same message while
        NATS is unreachable. Raises _Resync on a duplicate or a wrong last sequence."""
        from nats.errors import Error as NatsError
        from nats.js.errors import APIError
        if state.shipped_next is not None and first != state.shipped_next:
            raise _Resync(f"message from {first} does not follow the shipped "
                          f"{state.shipped_next}")
        headers = message_headers(kind, self.node, state.tenant_id, first, count,
                                  state.last_stream_sequence)
        subject_name = subject(self.node, state.tenant_id)
        backoff = RETRY_BACKOFF_MIN_S
        while True:
            try:
                ack = await self._js.publish(subject_name, payload,
                                             timeout=NATS_REQUEST_TIMEOUT_S, headers=headers)
            except APIError as error:
                if error.err_code == JS_ERR_WRONG_LAST_SEQUENCE:
                    raise _Resync(f"JetStream refused message {first}: {error.description}") \
                        from None
                reason = f"JetStream error {error.err_code}: {error.description}"
            except (asyncio.TimeoutError, OSError, NatsError) as error:
                reason = f"{type(error).__name__} {error}".strip()
            else:
                if ack.duplicate:
                    raise _Resync(f"JetStream already held message {first} (stream sequence "
                                  f"{ack.seq})")
                state.last_stream_sequence = ack.seq
                state.shipped_next = first + count
                if kind == KIND_RECORDS:
                    self._records_shipped += count
                    self._messages_shipped += 1
                return
            self._reconnects += 1
            log.warning("tenant %d: publishing message %d: %s; retrying in %.2f s",
                        state.tenant_id, first, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_BACKOFF_MAX_S)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            statistics = self.statistics()
            lag = max((t.lag_records for t in statistics.tenants), default=0)
            log.info("shipped %d records in %d messages; gaps %d (%d records); reconnects %d; "
                     "max lag %d records", statistics.records_shipped,
                     statistics.messages_shipped, statistics.gaps, statistics.gap_records,
                     statistics.reconnects, lag)


class ShipCollector:
    """Prometheus figures of one Shipper, read from its statistics() (metrics only read)."""

    def __init__(self, shipper: Shipper):
        self._shipper = shipper

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        statistics = self._shipper.statistics()
        for name, value, help_text in (
                ("records", statistics.records_shipped, "records JetStream acknowledged"),
                ("messages", statistics.messages_shipped, "record messages acknowledged"),
                ("gaps", statistics.gaps, "gap messages published (ring evicted unshipped)"),
                ("gap_records", statistics.gap_records, "sequences the gap messages name"),
                ("reconnects", statistics.reconnects,
                 "retries after NATS or the daemon was unreachable"),
                ("resyncs", statistics.resyncs,
                 "returns to the stream's last message (duplicate, wrong last sequence)")):
            yield CounterMetricFamily(f"ringtail_ship_{name}", help_text, value=value)
        lag_records = GaugeMetricFamily("ringtail_ship_lag_records",
                                        "records the daemon showed ship, not yet in JetStream",
                                        labels=["tenant"])
        lag_seconds = GaugeMetricFamily("ringtail_ship_lag_seconds",
                                        "age of the oldest record not yet in JetStream",
                                        labels=["tenant"])
        for tenant in statistics.tenants:
            lag_records.add_metric([str(tenant.tenant_id)], tenant.lag_records)
            lag_seconds.add_metric([str(tenant.tenant_id)], tenant.lag_seconds)
        yield lag_records
        yield lag_seconds


def serve_metrics(shipper: Shipper, host: str, port: int) -> int:
    """/metrics for `shipper` on HOST:PORT (prometheus_client's own HTTP thread); the port."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry()
    registry.register(ShipCollector(shipper))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]


def _subject_covers(pattern: str, wanted: str) -> bool:
    """True when the NATS subject pattern `pattern` matches every subject `wanted` matches
    (`wanted` may end in '*')."""
    pattern_tokens, wanted_tokens = pattern.split("."), wanted.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(wanted_tokens) > index
        if index >= len(wanted_tokens):
            return False
        if token != "*" and token != wanted_tokens[index]:
            return False
        if token != "*" and wanted_tokens[index] in ("*", ">"):
            return False
    return len(pattern_tokens) == len(wanted_tokens)


async def ship_until_signalled(shipper: Shipper) -> None:
    """Run `shipper` until SIGTERM or SIGINT, then stop cleanly."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped = []

    def stop() -> None:
        stopped.append(True)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        await shipper.run()
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    statistics = shipper.statistics()
    log.info("stopped: shipped %d records in %d messages; gaps %d (%d records); "
             "reconnects %d", statistics.records_shipped, statistics.messages_shipped,
             statistics.gaps, statistics.gap_records, statistics.reconnects)


def default_node() -> str:
    from ringtail.service.fleet import default_node_name
    return default_node_name(socket_module.gethostname())
