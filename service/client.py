"""Clients of the ringtail daemon.

`Client` is the Trio client: `await client.publish(records)` returns the Ack
once the batch is durable; `client.subscribe(...)` is an async iterator of
Records, Gap and End events. The synchronous `Publisher` for plain Python GPU
workers lives in service/publisher.py.

A daemon that stops in order sends a fatal Error (SHUTTING_DOWN) before it
closes, and that Error is what a call raises. A connection that ends without
one (EOF, ECONNRESET, EPIPE: the daemon was killed or crashed) raises
RingtailError with code CONNECTION_LOST, which no daemon sends.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import ssl
from typing import AsyncIterator, Iterable

import trio

from ringtail.ioring.producers import PRODUCER_ACK_COUNT_MAX
from ringtail.service import protocol
from ringtail.service.errors import RingtailError, connection_lost_error
from ringtail.service.protocol import (CLOSED, NEED_DATA, Ack, End, Error, ErrorCode, Gap, Hello,
                                       Publish, Records, RemoteProtocolError, Restore, StartKind,
                                       Subscribe,
                                       Welcome)

RECEIVE_SIZE_BYTES = protocol.RECEIVE_SIZE_BYTES
# Publish batches sent but not yet acknowledged by one pipelined publisher.
PIPELINE_BATCH_COUNT_MAX = 16
assert PIPELINE_BATCH_COUNT_MAX <= PRODUCER_ACK_COUNT_MAX
# Seconds a client reads, after a send failed (EPIPE, ECONNRESET), for the
# Error frame the daemon may have sent before it closed. A daemon that stopped
# in order left it in our receive buffer, so reading ends at once (EOF); the
# bound only matters for a peer that stopped reading but never closed.
SEND_FAILURE_READ_TIMEOUT_S = 1.0


class Client:
    """One connection to a daemon, for one tenant.

    Resource handling: owns the stream; use `async with await Client.connect(...)`
    or call `aclose()`.

    Error handling: every failure of the connection is a RingtailError: the
    daemon's Error frame, or CONNECTION_LOST when it ended without one.
    """

    def __init__(self, stream: trio.abc.Stream, tenant_id: int, peer: str = "",
                 producer_id: int = 0):
        self.stream = stream
        self.tenant_id = tenant_id
        # Exactly once (docs/PROTOCOL.md 4.12): the Hello names this producer and
        # every Publish carries a producer sequence, from next_producer_sequence
        # unless publish_many() is given them (to resend a batch with its own).
        self.producer_id = producer_id
        self.next_producer_sequence = 0
        self.peer = peer  # the daemon's socket path or host:port, for messages; "" if unknown
        self.connection = protocol.Connection(protocol.CLIENT)
        self.welcome: Welcome | None = None
        self._batch_ids = itertools.count(1)
        self._eof = False  # the daemon closed its side (receive_some returned b"")

    @classmethod
    async def connect(cls, socket_path: str, tenant_id: int, *, token: bytes = b"",
                      client_name: str = "ringtail-client",
                      producer_id: int | None = None) -> "Client":
        """Connect over the Unix socket and complete the handshake.

        Raises:
            OSError: the socket cannot be reached.
            RingtailError: the daemon refused the Hello.
        """
        stream = await trio.open_unix_socket(socket_path)
        return await cls.connect_stream(stream, tenant_id, token=token, client_name=client_name,
                                        peer=socket_path, producer_id=producer_id)

    @classmethod
    async def connect_stream(cls, stream: trio.abc.Stream, tenant_id: int, *,
                             token: bytes = b"", client_name: str = "ringtail-client",
                             peer: str = "", producer_id: int | None = None) -> "Client":
        """Handshake on a stream already connected (the stream is closed on failure).

        `peer` names the daemon (socket path or host:port) in error messages.
        `producer_id`: None (default) picks a random one, so a batch resent on
        a new Client with the same producer id and producer sequence is stored
        once; 0 names no producer (at least once).
        """
        if producer_id is None:
            producer_id = secrets.randbits(64) or 1
        client = cls(stream, tenant_id, peer, producer_id)
        try:
            await client._handshake(token, client_name)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client

    @classmethod
    async def connect_tcp(cls, host: str, port: int, tenant_id: int, *, token: bytes | str,
                          ssl_context: ssl.SSLContext | None = None, plaintext: bool = False,
                          client_name: str = "ringtail-client",
                          producer_id: int | None = None) -> "Client":
        """Connect over TCP, TLS unless `plaintext` (the daemon allows that on loopback only).

        `ssl_context` defaults to the system's trust store
        (`ssl.create_default_context()`); see `client_ssl_context()`.

        Raises:
            OSError: the address cannot be reached.
            RingtailError: the TLS handshake failed or the daemon refused the Hello.
        """
        if isinstance(token, str):
            token = token.encode()
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if not plaintext:
            stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                    server_hostname=host)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as error:
                await trio.aclose_forcefully(stream)
                raise RingtailError(ErrorCode.AUTH_FAILED,
                                    f"TLS handshake with {host}:{port} failed: "
                                    f"{error.__cause__ or error}") from error
        return await cls.connect_stream(stream, tenant_id, token=token, client_name=client_name,
                                        peer=f"{host}:{port}", producer_id=producer_id)

    async def _handshake(self, token: bytes, client_name: str) -> None:
        await self._send(Hello(self.tenant_id, token, client_name,
                               producer_id=self.producer_id))
        event = await self.next_event()
        if isinstance(event, Error):
            raise RingtailError.from_event(event)
        if not isinstance(event, Welcome):
            raise RingtailError(ErrorCode.MALFORMED_FRAME, f"expected Welcome, got {event!r}")
        self.welcome = event

    async def _send(self, event) -> None:
        data = self.connection.send(event)
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as error:  # as in next_event(): callers catch one type
            raise await self._failure_after_send(error) from error

    async def _failure_after_send(self, error: trio.BrokenResourceError) -> RingtailError:
        """A send failed (EPIPE, ECONNRESET): the daemon's Error frame if it sent
        one before closing (SHUTTING_DOWN on an orderly stop), else CONNECTION_LOST."""
        with trio.move_on_after(SEND_FAILURE_READ_TIMEOUT_S):
            try:
                while True:  # ends: EOF, a reset or the timeout raise, or an Error returns
                    event = await self.next_event()
                    if isinstance(event, Error) and event.fatal:
                        return RingtailError.from_event(event)
            except RingtailError as lost:
                if lost.code != ErrorCode.CONNECTION_LOST:
                    return lost
            except trio.BusyResourceError:
                pass  # another task is reading: it will see the daemon's Error, if any
        return self._connection_lost(_failure_detail(error))

    def _connection_lost(self, detail: str = "") -> RingtailError:
        """CONNECTION_LOST for this connection (naming the daemon's address)."""
        if self.welcome is None and isinstance(self.stream, trio.SSLStream):
            hint = ("before the Welcome, as a daemon refusing the client's certificate "
                    "(mutual TLS) also does")
            detail = f"{detail}; {hint}" if detail else hint
        return connection_lost_error(self.peer, detail)

    async def next_event(self):
        """The next event from the daemon.

        Raises:
            RingtailError: CONNECTION_LOST: the connection ended (EOF, a reset,
                or EOF in the middle of a frame) without an Error frame.
            RemoteProtocolError: the daemon sent bytes that break the protocol.
        """
        while True:
            try:
                event = self.connection.next_event()
            except RemoteProtocolError as error:
                if not self._eof:
                    raise
                # After EOF the codec only refuses the partial frame the daemon
                # left: it died (or was cut off) in the middle of a write.
                buffered = self.connection.statistics().buffered_bytes
                raise self._connection_lost(
                    f"it ended {buffered} bytes into a frame") from error
            if event is CLOSED:
                raise self._connection_lost()
            if event is not NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE_BYTES)
            except trio.BrokenResourceError as error:  # ECONNRESET; TLS: the cause names the alert
                raise self._connection_lost(_failure_detail(error)) from error
            self._eof = not data
            self.connection.receive_data(data)

    async def publish(self, records: bytes) -> Ack:
        """Publish one batch and wait until it is durable.

        Raises:
            RingtailError: the batch was rejected (code and record index say why).
        """
        acks = await self.publish_many([records])
        return acks[0]

    async def publish_many(self, batches: Iterable[bytes],
                           window: int = PIPELINE_BATCH_COUNT_MAX,
                           producer_sequences: Iterable[int] | None = None) -> list[Ack]:
        """Publish batches with up to `window` unacknowledged; acks in order.

        A producer Client numbers them from `next_producer_sequence`, or with
        `producer_sequences` (one per batch: to resend batches that got no
        answer, with the numbers they were first sent with, for example on a
        new Client with the same `producer_id`). The daemon answers a batch it
        already stored with its original Ack.

        Raises:
            RingtailError: the first rejected batch, once every batch already
                sent has been answered (so the connection can be used again);
                later batches are not sent. Its `acks` are this call's stored
                batches, in order. A fatal error is raised at once.
        """
        if self.producer_id and window > PRODUCER_ACK_COUNT_MAX:
            raise ValueError(f"window {window} is over PRODUCER_ACK_COUNT_MAX "
                             f"({PRODUCER_ACK_COUNT_MAX}): a producer's resends must stay within "
                             "the daemon's window of its last stored batches")
        sequences = None if producer_sequences is None else iter(producer_sequences)
        acks: list[Ack] = []
        in_flight: collections.deque[int] = collections.deque()
        rejection: RingtailError | None = None
        for records in batches:
            if len(in_flight) >= window:
                rejection = await self._collect(in_flight.popleft(), acks, rejection)
            if rejection is not None:
                break
            batch_id = next(self._batch_ids)
            sequence = None
            if self.producer_id:
                if sequences is None:
                    sequence = self.next_producer_sequence
                    self.next_producer_sequence += 1
                else:
                    sequence = next(sequences)
            await self._send(Publish(batch_id, records, sequence))
            in_flight.append(batch_id)
        while in_flight:
            rejection = await self._collect(in_flight.popleft(), acks, rejection)
        if rejection is not None:
            rejection.acks = acks
            raise rejection
        return acks

    async def _collect(self, batch_id: int, acks: list[Ack],
                       rejection: RingtailError | None) -> RingtailError | None:
        """Wait for one batch's answer: append its Ack, or keep the first rejection."""
        try:
            acks.append(await self._reply(batch_id))
        except RingtailError as error:
            if error.fatal or error.batch_id != batch_id:
                raise
            return rejection or error
        return rejection

    async def _reply(self, batch_id: int) -> Ack:
        while True:
            event = await self.next_event()
            if isinstance(event, Ack):
                if event.batch_id != batch_id:
                    raise RingtailError(ErrorCode.INTERNAL,
                                        f"ack for batch {event.batch_id}, expected {batch_id}")
                return event
            if isinstance(event, Error):
                raise RingtailError.from_event(event)

    async def restore(self, first_sequence: int, record_count: int) -> Welcome:
        """Send Restore (docs/PROTOCOL.md 4.13) and return the daemon's Welcome for
        the recreated ring; then publish the snapshot's records in order.

        Raises:
            RingtailError: the daemon refused it (FORBIDDEN, RESTORE_REFUSED,
                TENANT_UNAVAILABLE), or its Welcome does not start at
                `first_sequence` (INTERNAL).
        """
        await self._send(Restore(first_sequence, record_count))
        event = await self.next_event()
        if isinstance(event, Error):
            raise RingtailError.from_event(event)
        if not (isinstance(event, Welcome) and
                event.oldest_sequence == event.next_sequence == first_sequence):
            raise RingtailError(ErrorCode.INTERNAL, f"the daemon answered Restore at sequence "
                                f"{first_sequence} with {event!r}; expected a Welcome whose "
                                "oldest and next sequence are that sequence")
        self.welcome = event
        return event

    async def subscribe(self, start: StartKind | str = StartKind.OLDEST, start_value: int = 0,
                        *, follow: bool = False, opcodes: Iterable[int] = (),
                        epoch_min: int = 0, epoch_max: int = 0xFFFF_FFFF,
                        failure_only: bool = False) -> AsyncIterator[Records | Gap | End]:
        """Yield Records and Gap events; End (and return) when not following.

        Raises:
            RingtailError: the daemon sent an Error.
        """
        if isinstance(start, str):
            start = StartKind[start.upper()]
        await self._send(Subscribe(start, start_value, follow, failure_only, epoch_min,
                                   epoch_max, frozenset(opcodes)))
        while True:
            event = await self.next_event()
            if isinstance(event, Error):
                raise RingtailError.from_event(event)
            if isinstance(event, (Records, Gap)):
                yield event
            elif isinstance(event, End):
                yield event
                return

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


def _failure_detail(error: trio.BrokenResourceError) -> str:
    """What broke under a BrokenResourceError: "Connection reset by peer", a TLS alert..."""
    cause = error.__cause__ or error
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


def client_ssl_context(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> ssl.SSLContext:
    """TLS settings for `Client.connect_tcp`: trust `ca_file` (else the system's
    CAs) and, for mutual TLS, present `cert_file`/`key_file`."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context
