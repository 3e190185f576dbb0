"""The fleet tier's layout in NATS JetStream, and the fleet tail that reads it.

`ringtail ship` (service/ship.py) writes, `ringtail tail --nats` reads; both
take every name and header from here, so the two can never disagree. The
layout is a contract (docs/OPERATIONS.md, "Fleet"):

- one stream (default `RINGTAIL`) holding subjects `ringtail.<node>.<tenant>`;
- one message per run of consecutive records of one tenant: the payload is the
  records byte for byte (64 × count bytes), with headers
  `Ringtail-Kind: records`, `Ringtail-Tenant`, `Ringtail-First-Sequence`,
  `Ringtail-Count`, and `Nats-Msg-Id: <node>.<tenant>.<first sequence>`;
- a gap message (`Ringtail-Kind: gap`, empty payload) for ring sequences that
  were evicted before ship read them: `Ringtail-First-Sequence` and
  `Ringtail-Count` name the lost range;
- so on a subject the messages cover the ring's sequences contiguously, in
  order, each exactly once: every message starts where the previous one ended.

Error handling: every failure is a FleetError with a stable `code` (a
FleetErrorCode) and a message that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import re
import sys
from typing import Callable

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX

SUBJECT_PREFIX = "ringtail"
STREAM_NAME_DEFAULT = "RINGTAIL"
# Replicas of a stream ship creates unless --replicas says otherwise. 1 is not
# power-safe on nats-server 2.9 (docs/OPERATIONS.md "Fleet"); use 3 on a cluster.
STREAM_REPLICAS_DEFAULT = 1
# A node name is one NATS subject token: letters, digits, '-' and '_' (no '.',
# '*', '>' or spaces, which would change the subject's shape). 64 bytes fits a
# host name's first label with room for a suffix.
NODE_NAME_SIZE_BYTES_MAX = 64
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,%d}" % NODE_NAME_SIZE_BYTES_MAX)
# Records in one JetStream message: 256 KiB of payload, a quarter of
# nats-server's default max_payload (1 MiB), so headers and a smaller
# configured limit still fit; and one daemon Records frame's worth.
SHIP_MESSAGE_RECORD_COUNT_MAX = 4096
# nats-server's default max_payload (bytes); a server configured lower than one
# full message is refused at start-up with a message naming both values.
NATS_MAX_PAYLOAD_DEFAULT_BYTES = 1 << 20
# Seconds a JetStream API request or publish waits for its answer before the
# caller retries (publishes) or reports the server unreachable (requests).
NATS_REQUEST_TIMEOUT_S = 5.0
# Seconds between nats-py's reconnect attempts to one server during an outage.
NATS_RECONNECT_WAIT_S = 0.5
# Attempts the fleet tail makes to create its consumer: a cluster that just lost
# a node answers consumer creation only once it has elected new leaders
# (seconds); with the waits between attempts this rides out about a minute.
CONSUMER_CREATE_ATTEMPTS_MAX = 12

assert SHIP_MESSAGE_RECORD_COUNT_MAX <= PUBLISH_RECORD_COUNT_MAX
assert SHIP_MESSAGE_RECORD_COUNT_MAX * RECORD_SIZE_BYTES <= NATS_MAX_PAYLOAD_DEFAULT_BYTES // 2

HEADER_KIND = "Ringtail-Kind"
HEADER_TENANT = "Ringtail-Tenant"
HEADER_FIRST = "Ringtail-First-Sequence"
HEADER_COUNT = "Ringtail-Count"
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
KIND_RECORDS = "records"
KIND_GAP = "gap"
# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
JS_ERR_WRONG_LAST_SEQUENCE = 10071
# JetStream's error code for a stream whose subjects overlap another stream's.
JS_ERR_SUBJECTS_OVERLAP = 10065


class FleetErrorCode(enum.Enum):
    """Stable codes of the fleet tier's errors (ship and the fleet tail)."""

    BAD_NODE_NAME = "BAD_NODE_NAME"
    NATS_UNREACHABLE = "NATS_UNREACHABLE"
    NATS_AUTH_FAILED = "NATS_AUTH_FAILED"
    NATS_PAYLOAD_TOO_SMALL = "NATS_PAYLOAD_TOO_SMALL"
    STREAM_CONFLICT = "STREAM_CONFLICT"
    STREAM_NOT_FOUND = "STREAM_NOT_FOUND"
    FOREIGN_MESSAGE = "FOREIGN_MESSAGE"
    DAEMON_REFUSED = "DAEMON_REFUSED"


class FleetError(Exception):
    """A fleet-tier failure: `code` (FleetErrorCode) and a message that says what to do."""

    def __init__(self, code: FleetErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def check_node_name(node: str) -> str:
    """`node`, or FleetError BAD_NODE_NAME saying what a node name may hold."""
    if not NODE_NAME_PATTERN.fullmatch(node):
        raise FleetError(FleetErrorCode.BAD_NODE_NAME,
                         f"node name {node!r} must be 1..{NODE_NAME_SIZE_BYTES_MAX} letters, "
                         "digits, '-' or '_' (it is one NATS subject token); pass --node NAME")
    return node


def default_node_name(hostname: str) -> str:
    """The host name's first label with other characters as '-': a valid node name."""
    label = hostname.split(".", 1)[0] or "node"
    return re.sub(r"[^A-Za-z0-9_-]", "-", label)[:NODE_NAME_SIZE_BYTES_MAX]


def subject(node: str, tenant_id: int) -> str:
    return f"{SUBJECT_PREFIX}.{node}.{tenant_id}"


def message_id(node: str, tenant_id: int, first_sequence: int) -> str:
    """Nats-Msg-Id of the message whose run starts at `first_sequence` (unique per subject)."""
    return f"{node}.{tenant_id}.{first_sequence}"


@dataclasses.dataclass(frozen=True, slots=True)
class ShippedMessage:
    """One message of a ringtail subject: a run of records, or a gap."""

    kind: str  # KIND_RECORDS or KIND_GAP
    tenant_id: int
    first_sequence: int
    count: int  # records carried, or sequences lost
    stream_sequence: int  # the message's sequence in the JetStream stream
    records: bytes = b""

    @property
    def next_sequence(self) -> int:
        """The ring sequence the next message on the subject starts at."""
        return self.first_sequence + self.count


def message_headers(kind: str, node: str, tenant_id: int, first_sequence: int, count: int,
                    expected_last_subject_sequence: int) -> dict[str, str]:
    return {
        HEADER_MSG_ID: message_id(node, tenant_id, first_sequence),
        HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected_last_subject_sequence),
        HEADER_KIND: kind,
        HEADER_TENANT: str(tenant_id),
        HEADER_FIRST: str(first_sequence),
        HEADER_COUNT: str(count),
    }


def parse_message(subject_name: str, stream_sequence: int, headers: dict | None,
                  data: bytes | None) -> ShippedMessage:
    """The ShippedMessage a stream message holds.

    Raises:
        FleetError: FOREIGN_MESSAGE, the message was not written by `ringtail ship`.
    """
    headers = headers or {}
    data = data or b""

    def foreign(why: str) -> FleetError:
        return FleetError(FleetErrorCode.FOREIGN_MESSAGE,
                          f"message {stream_sequence} on subject {subject_name} was not written "
                          f"by ringtail ship ({why}); the subjects ringtail.<node>.<tenant> "
                          "belong to ship alone: remove the message or ship to another stream "
                          "(--stream)")

    kind = headers.get(HEADER_KIND)
    try:
        tenant_id = int(headers[HEADER_TENANT])
        first = int(headers[HEADER_FIRST])
        count = int(headers[HEADER_COUNT])
    except (KeyError, ValueError):
        raise foreign(f"headers {sorted(headers)} lack {HEADER_TENANT}, {HEADER_FIRST} or "
                      f"{HEADER_COUNT}") from None
    if kind == KIND_RECORDS:
        if count < 1 or len(data) != count * RECORD_SIZE_BYTES:
            raise foreign(f"{len(data)} payload bytes for {count} records")
    elif kind == KIND_GAP:
        if count < 1 or data:
            raise foreign(f"a gap of {count} sequences with {len(data)} payload bytes")
    else:
        raise foreign(f"{HEADER_KIND} is {kind!r}")
    if first < 0 or tenant_id < 0:
        raise foreign("negative sequence or tenant")
    return ShippedMessage(kind, tenant_id, first, count, stream_sequence, data)


# --- The fleet tail -----------------------------------------------------------------

Emit = Callable[[ShippedMessage], None]


async def connect_nats(url: str, name: str):
    """A nats-py connection, or FleetError NATS_UNREACHABLE / NATS_AUTH_FAILED
    once every server in `url` (comma-separated) has refused once.

    An operator's wrong URL or credentials fail at start, in seconds; once
    connected, outages are nats-py's to ride out (it reconnects forever).
    """
    import nats

    servers = [part.strip() for part in url.split(",") if part.strip()]
    errors: list[BaseException] = []
    every_server_failed = asyncio.Event()

    async def on_error(error: BaseException) -> None:
        errors.append(error)
        if len(errors) >= len(servers):
            every_server_failed.set()

    connect = asyncio.ensure_future(nats.connect(
        servers, name=name, connect_timeout=NATS_REQUEST_TIMEOUT_S, allow_reconnect=True,
        max_reconnect_attempts=-1, reconnect_time_wait=NATS_RECONNECT_WAIT_S,
        error_cb=on_error))
    failed = asyncio.ensure_future(every_server_failed.wait())
    try:
        await asyncio.wait({connect, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        failed.cancel()
    if connect.done() and connect.exception() is None:
        return connect.result()
    connect.cancel()
    with contextlib.suppress(BaseException):
        await connect
    detail = "; ".join(dict.fromkeys(str(e) or type(e).__name__ for e in errors)) or "no answer"
    if any("authorization" in str(e).lower() or "authentication" in str(e).lower()
           for e in errors):
        raise FleetError(FleetErrorCode.NATS_AUTH_FAILED,
                         f"NATS at {url} refused the credentials ({detail}); put the right "
                         "user:password or token in the URL (nats://user:pass@host:port)")
    raise FleetError(FleetErrorCode.NATS_UNREACHABLE,
                     f"cannot connect to NATS at {url} ({detail}); check the URL and that "
                     "nats-server runs with JetStream (-js)")


async def last_message(js, stream: str, subject_name: str) -> ShippedMessage | None:
    from nats.js.errors import NotFoundError
    try:
        raw = await js.get_last_msg(stream, subject_name)
    except NotFoundError:
        return None
    return parse_message(subject_name, raw.seq, raw.headers, raw.data)


async def find_start(js, stream: str, subject_name: str, sequence: int) -> int:
    """The stream sequence of the first message on the subject that holds ring
    sequences at or after `sequence` (binary search with next-by-subject gets),
    or 0 when every message ends before it."""
    from nats.js.errors import NotFoundError

    async def message_at_or_after(stream_sequence: int) -> ShippedMessage | None:
        try:
            raw = await js.get_msg(stream, stream_sequence, subject=subject_name, next=True)
        except NotFoundError:
            return None
        return parse_message(subject_name, raw.seq, raw.headers, raw.data)

    first = await message_at_or_after(1)
    if first is None:
        return 0
    last = await last_message(js, stream, subject_name)
    assert last is not None
    if last.next_sequence <= sequence:
        return 0
    if first.next_sequence > sequence:
        return first.stream_sequence
    low, high = first.stream_sequence, last.stream_sequence  # low ends before, high does not
    while True:
        middle = (low + high) // 2
        found = await message_at_or_after(middle + 1)
        assert found is not None  # high is at or after middle + 1
        if found.stream_sequence >= high:
            return high
        if found.next_sequence > sequence:
            high = found.stream_sequence
        else:
            low = found.stream_sequence


async def fleet_tail(url: str, node: str, tenant_id: int, emit: Emit, *,
                     stream: str = STREAM_NAME_DEFAULT, start: str = "oldest",
                     start_value: int = 0, follow: bool = False) -> int:
    """Read a shipped tenant from JetStream in sequence order, calling `emit`
    per message (records cut to start at `start_value` for a sequence start).

    `start` is "oldest", "latest" (only records shipped from now on) or
    "sequence". Without `follow` it stops at the subject's last message as of
    the start. Returns the number of messages emitted.

    Raises:
        FleetError: NATS unreachable or refusing, no such stream, a foreign message.
    """
    from nats.js.api import ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    check_node_name(node)
    subject_name = subject(node, tenant_id)
    nc = await connect_nats(url, "ringtail-fleet-tail")
    emitted = 0
    try:
        js = nc.jetstream(timeout=NATS_REQUEST_TIMEOUT_S)
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise FleetError(FleetErrorCode.STREAM_NOT_FOUND,
                             f"NATS at {url} has no stream {stream!r}; start `ringtail ship` "
                             "first or name the stream with --stream") from None
        last = await last_message(js, stream, subject_name)
        if start == "latest":
            if not follow:
                return 0
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        elif start == "sequence":
            first_stream_sequence = await find_start(js, stream, subject_name, start_value)
            if first_stream_sequence == 0:
                if not follow:
                    return 0
                config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
            else:
                config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                        opt_start_seq=first_stream_sequence)
        else:
            if last is None and not follow:
                return 0
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        end = None if follow else last.stream_sequence
        subscription = await _subscribe_retrying(js, subject_name, stream, config, url)
        try:
            while True:
                msg = await subscription.next_msg(timeout=None)
                stream_sequence = msg.metadata.sequence.stream
                shipped = parse_message(subject_name, stream_sequence, msg.headers, msg.data)
                if start == "sequence" and shipped.first_sequence < start_value:
                    skip = start_value - shipped.first_sequence
                    if shipped.kind == KIND_RECORDS:
                        shipped = dataclasses.replace(
                            shipped, first_sequence=start_value, count=shipped.count - skip,
                            records=shipped.records[skip * RECORD_SIZE_BYTES:])
                    else:
                        shipped = dataclasses.replace(shipped, first_sequence=start_value,
                                                      count=shipped.count - skip)
                if shipped.count > 0:
                    emit(shipped)
                    emitted += 1
                if end is not None and stream_sequence >= end:
                    return emitted
        finally:
            await subscription.unsubscribe()
    finally:
        await nc.close()


async def _subscribe_retrying(js, subject_name: str, stream: str, config, url: str):
    """An ordered consumer on the subject; creation is retried while a cluster
    elects leaders (a timeout or 503 right after a node died), then FleetError."""
    from nats.errors import Error as NatsError
    failures: list[str] = []
    for attempt in range(CONSUMER_CREATE_ATTEMPTS_MAX):
        try:
            return await js.subscribe(subject_name, stream=stream, config=config,
                                      ordered_consumer=True)
        except (asyncio.TimeoutError, NatsError) as error:
            failures.append(str(error) or type(error).__name__)
            await asyncio.sleep(min(NATS_RECONNECT_WAIT_S * (attempt + 1), NATS_REQUEST_TIMEOUT_S))
    raise FleetError(FleetErrorCode.NATS_UNREACHABLE,
                     f"NATS at {url} did not create a consumer on {subject_name} in "
                     f"{CONSUMER_CREATE_ATTEMPTS_MAX} attempts ({'; '.join(dict.fromkeys(failures))});"
                     " check the stream's health (nats stream info) and retry")


def print_gap(shipped: ShippedMessage, file=sys.stderr) -> None:
    """The fleet tail's line for a gap message (stderr, like the local tail's gaps)."""
    print(f"ringtail tail: gap: sequences {shipped.first_sequence}.."
          f"{shipped.next_sequence - 1} were evicted from the ring before ship read them",
          file=file, flush=True)
