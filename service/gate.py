"""The tenant gate: who may connect, publish and subscribe, and how fast.

Every admission decision of the daemon is made here, at the points of a
connection's life where the handler (service/connection.py) asks:

1. accepted: `connection_slot(peer)` holds one of its listener's slots (Unix
   and TCP have their own caps, so a TCP flood never locks out local
   publishers) for as long as the connection is open, and one of the peer's
   PEER_UNAUTHENTICATED_COUNT_MAX pre-Hello slots until its Hello arrives; a
   refused connection is answered under `refusal_slot(transport)` (a bounded
   number at once, within the handshake timeout; the rest are closed at once);
2. a Hello: `admit(peer, hello, revoke)` checks the auth-failure limiter and
   the access policy (service/auth.py), opens the tenant (service/tenants.py;
   a peer creates at most `peer_tenant_creations_max` tenants) and holds one
   of the tenant's slots on that listener (its `connections_max`, and never
   more than half the listener's); a SIGHUP
   (`reconfigure`) re-checks every admitted connection and calls `revoke` on
   those no longer allowed, and so does `watch_expiry` when the credentials
   a connection was admitted with expire;
3. a Publish: `admit_publish(admission, publish)` checks the role, holds the
   batch to the tenant's records-per-second quota (waits in quota_mode
   "slow", refuses QUOTA_EXCEEDED in "reject") and checks its records
   (ioring.record.check_records, shared with the Publisher's pre-check);
4. a Subscribe: `admit_subscribe(admission)` checks the role, and
   `subscriber_slot(tenant_id)` holds one of the tenant's subscriber slots
   while the subscription runs (usable by an in-process subscriber too);
5. a Restore: `restore(admission, restore, published)` checks the admin role
   and that the tenant is empty and the connection's alone, swaps its empty
   ring for one that starts at the snapshot's first sequence, and keeps the
   tenant the connection's alone until it ends (docs/PROTOCOL.md 4.13).

Slots are context managers: a slot taken is given back on every way out.
A refusal that ends the connection raises `Refused` (code and message for
the fatal Error); a refusal of one batch is returned as a ProtocolError (the
connection goes on).

The gate counts its own decisions (auth failures by tenant and reason,
FORBIDDEN, records delayed, slots held) and
`statistics()` returns them as a frozen `GateStatistics`. Batches refused
are counted where every refusal of a batch meets, in the connection handler.

Time comes from a `Clock` (service/quotas.py): the daemon's Trio clock, or a
fake one in tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import trio

from ringtail.ioring import RingError
from ringtail.ioring.record import RECORD_FAULT_MAGIC, RECORD_MAGIC, RECORD_SIZE_BYTES, check_records
from ringtail.ioring.restore import restore_request_problem
from ringtail.service.auth import (AUTH_FAILURE_COUNT_MAX, AUTH_FAILURE_WINDOW_S, Access, AccessPolicy,
                                   AuthError, AuthFailureLimiter, ForbiddenError, Peer, Role)
from ringtail.service.protocol import ErrorCode, Hello, ProtocolError, Publish, Restore
from ringtail.service.quotas import TENANT_SUBSCRIBER_COUNT_MAX, Clock, QuotaSettings, TokenBucket
from ringtail.service.tenants import (TENANT_COUNT_MAX, Tenant, TenantLimitError, TenantRegistry,
                                      UnknownTenantError)

log = logging.getLogger("ringtail.server")

# Connections at once on the Unix socket: the local publishers and
# subscribers a sidecar serves. Each costs two small tasks, up to
# RECEIVE_BUFFER_BYTES_MAX of buffered input and what it has unacknowledged
# (service/limits.py sums it). Config `unix_connections_max` may lower it.
UNIX_CONNECTION_COUNT_MAX = 1024
# Connections at once on the TCP listener (remote tailing, mostly): a cap of
# its own, so silent or hostile TCP peers can never take the slots local
# publishers need. A TLS connection costs ~50 KiB more (OpenSSL's buffers).
# Config `tcp_connections_max` may lower it.
TCP_CONNECTION_COUNT_MAX = 256
# Every connection at once, both listeners: what the memory bound and the
# file-descriptor budget (deploy/ringtail.service LimitNOFILE) count.
CONNECTION_COUNT_MAX = UNIX_CONNECTION_COUNT_MAX + TCP_CONNECTION_COUNT_MAX
# Connections of one peer (a uid on the Unix socket, an IP address on TCP)
# that have not sent their Hello yet. A well-behaved client sends it at once,
# so a peer holds a few at a time; a peer that connects and stays silent (or
# recycles connections that fail authentication) is held to this many, and
# each is closed after HANDSHAKE_TIMEOUT_S (service/connection.py). Half the
# TCP cap: room for a burst of workers starting at once on one host (the
# daemon may accept them all before it reads the first Hello), never a whole
# listener. Config `peer_unauthenticated_max` may lower it.
PEER_UNAUTHENTICATED_COUNT_MAX = 128
# Refused connections (over a cap) answered at once, per listener. Answering
# means a fatal Error frame, after the TLS handshake on TCP, within
# HANDSHAKE_TIMEOUT_S of the accept: a silent peer holds a descriptor until
# then. Past this many, a refused connection is closed at once with no Error
# frame (its peer sees EOF and retries with backoff), so a flood of connects
# past every cap holds at most this many descriptors per listener.
REFUSAL_COUNT_MAX = 32
# A tenant's connections on one listener are at most the listener's cap
# divided by this, whatever its `connections_max`: one tenant (or 1,024 idle
# connections of it) can never take every slot of a listener.
TENANT_LISTENER_SHARE_DIVISOR = 2
# Tenants one peer (uid / address) may create on first use (create_tenants =
# true). Each costs a ring file of its full size on disk (posix_fallocate,
# docs/FORMAT.md), about `capacity` bytes of memory and three descriptors, and
# TENANT_COUNT_MAX is daemon-wide, so one peer may take a quarter of it.
# Tenants that already have a ring file or a [tenants.N] table are not
# creations. Config `peer_tenant_creations_max` may lower it.
PEER_TENANT_CREATION_COUNT_MAX = TENANT_COUNT_MAX // 4
# Seconds a welcomed connection may go without a Publish, a Subscribe or a
# Ping (answered with a Pong) while it has nothing in flight and no
# subscription running; then it gets a fatal Error(IDLE_TIMEOUT) and its slot
# is freed. Long enough for any client that pings or publishes now and then;
# the Publisher reconnects by itself. Config `idle_timeout_s` may lower it.
CONNECTION_IDLE_TIMEOUT_S = 300.0
# Subscribers per tenant (each holds one replay read, 256 KiB, at most);
# a tenant's `subscribers_max` may lower it (service/quotas.py).
SUBSCRIBER_COUNT_MAX = TENANT_SUBSCRIBER_COUNT_MAX
# Distinct (tenant, reason) series of auth failures kept. A failed peer names
# any tenant id it likes, so past this bound new pairs are folded into
# ("other", "other"): a bad client cannot grow the daemon's memory or the
# metrics scrape without limit. 256 x ~200 B.
AUTH_FAILURE_SERIES_COUNT_MAX = 256
AUTH_FAILURE_REASON_SIZE_MAX = 64  # characters kept of a reason label
OTHER_LABEL = "other"
# Why a Hello was refused (a label of ringtail_auth_failures_total).
REASON_RATE_LIMITED = "rate_limited"  # too many recent failures: not checked
REASON_BAD_CREDENTIALS = "bad_credentials"  # AUTH_FAILED
REASON_FORBIDDEN = "forbidden"  # valid credentials, nothing granted on the tenant

assert AUTH_FAILURE_SERIES_COUNT_MAX > 0
assert SUBSCRIBER_COUNT_MAX <= CONNECTION_COUNT_MAX
# One peer's silent connections never fill a listener, nor do one tenant's.
assert PEER_UNAUTHENTICATED_COUNT_MAX <= min(UNIX_CONNECTION_COUNT_MAX,
                                          TCP_CONNECTION_COUNT_MAX) // 2
assert TENANT_LISTENER_SHARE_DIVISOR >= 2
assert 1 <= PEER_TENANT_CREATION_COUNT_MAX < TENANT_COUNT_MAX
assert REFUSAL_COUNT_MAX >= 1 and CONNECTION_IDLE_TIMEOUT_S > 0

TRANSPORTS = ("unix", "tcp")
# Config key -> (the constant it may not exceed, that constant's name): every
# connection limit a config may set, for its check and for `serve --limits`.
CONNECTION_LIMIT_CEILINGS = {
    "unix_connections_max": (UNIX_CONNECTION_COUNT_MAX, "UNIX_CONNECTION_COUNT_MAX"),
    "tcp_connections_max": (TCP_CONNECTION_COUNT_MAX, "TCP_CONNECTION_COUNT_MAX"),
    "peer_unauthenticated_max": (PEER_UNAUTHENTICATED_COUNT_MAX, "PEER_UNAUTHENTICATED_COUNT_MAX"),
    "peer_tenant_creations_max": (PEER_TENANT_CREATION_COUNT_MAX, "PEER_TENANT_CREATION_COUNT_MAX"),
    "idle_timeout_s": (CONNECTION_IDLE_TIMEOUT_S, "CONNECTION_IDLE_TIMEOUT_S"),
}


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The connection limits a config sets (service/config.py): each may be
    lowered from its constant above, never raised."""

    unix_connections_max: int = UNIX_CONNECTION_COUNT_MAX
    tcp_connections_max: int = TCP_CONNECTION_COUNT_MAX
    peer_unauthenticated_max: int = PEER_UNAUTHENTICATED_COUNT_MAX
    peer_tenant_creations_max: int = PEER_TENANT_CREATION_COUNT_MAX
    idle_timeout_s: float = CONNECTION_IDLE_TIMEOUT_S

    def listener_max(self, transport: str) -> int:
        return self.unix_connections_max if transport == "unix" else self.tcp_connections_max

    def problem(self) -> str | None:
        """What is wrong with these values ("KEY = VALUE; use ..."), or None."""
        for key, (ceiling, name) in CONNECTION_LIMIT_CEILINGS.items():
            value = getattr(self, key)
            low = 0.001 if isinstance(ceiling, float) else 1
            if not low <= value <= ceiling:
                return (f"{key} = {value}; use {low} to {ceiling} ({name}; a config may lower "
                        "a limit, never raise it)")
        return None


class Refused(Exception):
    """The gate refused the connection: send Error(code, message), then close."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectionSlot:
    """One accepted connection's hold on the gate (see Gate.connection_slot):
    `hello_received()` gives back the peer's pre-Hello slot."""

    def __init__(self, gate: "Gate", peer_key: str):
        self._gate = gate
        self._peer_key = peer_key
        self._unauthenticated = True

    def hello_received(self) -> None:
        """The Hello arrived: the connection no longer counts as unauthenticated (idempotent)."""
        if self._unauthenticated:
            self._unauthenticated = False
            self._gate._release_unauthenticated(self._peer_key)


def publish_problem(records: bytes, tenant_id: int) -> tuple[ErrorCode, int, str] | None:
    """The first bad record of a publish batch as (code, index, message), or None.

    The check itself is ioring.record.check_records (shared with the
    Publisher's pre-check); this words it for the wire.
    """
    fault = check_records(records, tenant_id)
    if fault is None:
        return None
    if fault.fault == RECORD_FAULT_MAGIC:
        return (ErrorCode.BAD_RECORD_MAGIC, fault.index,
                f"record {fault.index} has magic 0x{fault.value:08x}, expected "
                f"0x{RECORD_MAGIC:08x}; the batch was rejected whole, fix the encoder and resend")
    return (ErrorCode.WRONG_TENANT, fault.index,
            f"record {fault.index} has tenant_id {fault.value} but this "
            f"connection is tenant {tenant_id}; the batch was rejected whole")


@dataclasses.dataclass(frozen=True, slots=True)
class TenantGateStatistics:
    connections: int  # admitted connections open now
    subscribers: int  # subscriber slots held now
    records_delayed: int  # records held back to the records/s quota (quota_mode "slow")
    paced: bool  # the tenant has a records/s quota


@dataclasses.dataclass(frozen=True, slots=True)
class GateStatistics:
    connections_open: int  # daemon-wide slots held (both listeners)
    connections_by_listener: Mapping[str, int]  # "unix" / "tcp" -> slots held
    unauthenticated: int  # connections that have not sent their Hello yet
    refusals_unanswered: int  # refused connections closed with no Error (REFUSAL_COUNT_MAX)
    # Refused Hellos by (tenant label, reason), folded past AUTH_FAILURE_SERIES_COUNT_MAX.
    auth_failures: Mapping[tuple[str, str], int]
    auth_failure_reasons: Mapping[str, int]  # the same refusals by reason alone (never folded)
    role_refusals: int  # FORBIDDEN for a Publish or Subscribe after the Hello
    tenants: Mapping[int, TenantGateStatistics]  # tenants that had a Hello admitted

    @property
    def auth_rate_limited(self) -> int:
        return self.auth_failure_reasons.get(REASON_RATE_LIMITED, 0)

    @property
    def forbidden(self) -> int:
        """Every FORBIDDEN: at the Hello and for a role later."""
        return self.auth_failure_reasons.get(REASON_FORBIDDEN, 0) + self.role_refusals


class _TenantState:
    """One tenant's slots and quota bucket. `update()` swaps settings (SIGHUP)
    in place: counts carry over; the bucket is replaced only if the rate changed."""

    def __init__(self, settings: QuotaSettings, clock: Clock):
        self.clock = clock
        self.settings = settings
        self.bucket = self._bucket(settings)
        self.connections = 0
        self.by_listener = dict.fromkeys(TRANSPORTS, 0)  # the same connections by transport
        self.subscribers = 0
        self.records_delayed = 0
        self.restoring = False  # a connection restores into it (Gate.restore)

    def _bucket(self, settings: QuotaSettings) -> TokenBucket | None:
        if not settings.records_per_second:
            return None
        return TokenBucket(settings.records_per_second, settings.burst, self.clock.now())

    def update(self, settings: QuotaSettings) -> None:
        old, self.settings = self.settings, settings
        if (old.records_per_second, old.burst) != (settings.records_per_second, settings.burst):
            self.bucket = self._bucket(settings)

    def statistics(self) -> TenantGateStatistics:
        return TenantGateStatistics(self.connections, self.subscribers, self.records_delayed,
                                    self.bucket is not None)


class Admission:
    """One admitted connection as the gate knows it: who, which tenant, what it may do."""

    def __init__(self, peer: Peer, token: bytes, tenant: Tenant, access: Access,
                 revoke: Callable[[ErrorCode, str], None]):
        self.peer = peer
        self.token = token
        self.tenant = tenant
        self.access = access
        self.revoke = revoke  # called by a reload that no longer allows it
        self.subscribed = False
        # Set when a re-check replaces `access` (a reload): `watch_expiry` then
        # waits for the new credentials' expiry.
        self.access_changed = trio.Event()
        self.restoring = False  # it sent a Restore that was admitted: the tenant is its own


class Gate:
    """Every admission decision; see the module docstring.

    `quota_settings(tenant_id)` gives a tenant's current QuotaSettings (read
    again at each reload); `registry` opens tenants on a Hello.
    """

    def __init__(self, policy: AccessPolicy, registry: TenantRegistry,
                 quota_settings: Callable[[int], QuotaSettings], clock: Clock,
                 limits: Callable[[], ConnectionLimits] = ConnectionLimits):
        """`limits()` gives the current ConnectionLimits (read at each decision,
        so a reload applies to new connections)."""
        self._policy = policy
        self._registry = registry
        self._quota_settings = quota_settings
        self._clock = clock
        self.limits = limits
        self._limiter = AuthFailureLimiter()
        self._tenants: dict[int, _TenantState] = {}  # bounded by TENANT_COUNT_MAX
        self._admitted: set[Admission] = set()  # bounded by CONNECTION_COUNT_MAX
        self._open = dict.fromkeys(TRANSPORTS, 0)  # slots held per listener
        # Peer key -> its connections without a Hello yet (keys with a count
        # only: at most CONNECTION_COUNT_MAX keys).
        self._unauthenticated: dict[str, int] = {}
        self._refusing = dict.fromkeys(TRANSPORTS, 0)  # refusals being answered
        self._refusals_unanswered = 0
        # Peer key -> tenants it created (keys with a count only: each created
        # a tenant, so at most TENANT_COUNT_MAX keys).
        self._created: dict[str, int] = {}
        self._auth_failures: dict[tuple[str, str], int] = {}
        self._auth_failure_reasons: dict[str, int] = {}  # the REASON_* set
        self._role_refusals = 0

    # -- accepted ----------------------------------------------------------------------

    @contextlib.contextmanager
    def connection_slot(self, peer: Peer | None = None) -> Iterator[ConnectionSlot]:
        """One of the peer's listener's slots while the connection is open, and
        one of the peer's pre-Hello slots until `slot.hello_received()`.

        Raises:
            Refused: TOO_MANY_CONNECTIONS: the listener's slots are all held, or
                the peer has PEER_UNAUTHENTICATED_COUNT_MAX connections without
                a Hello. Answer it under `refusal_slot()`.
        """
        peer = peer or Peer("unix")
        limits = self.limits()
        transport = peer.transport
        limit = limits.listener_max(transport)
        if self._open[transport] >= limit:
            name = "UNIX_CONNECTION_COUNT_MAX" if transport == "unix" else "TCP_CONNECTION_COUNT_MAX"
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"{limit} connections are open on the {transport} listener ({name} "
                          f"or {transport}_connections_max); close idle connections and retry "
                          "with backoff")
        key = peer.limiter_key
        waiting = self._unauthenticated.get(key, 0)
        if waiting >= limits.peer_unauthenticated_max:
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"{key} has {waiting} connections that sent no Hello yet "
                          "(PEER_UNAUTHENTICATED_COUNT_MAX or peer_unauthenticated_max); send "
                          "Hello right after connecting, and retry with backoff")
        self._open[transport] += 1
        self._unauthenticated[key] = waiting + 1
        slot = ConnectionSlot(self, key)
        try:
            yield slot
        finally:
            self._open[transport] -= 1
            slot.hello_received()

    def _release_unauthenticated(self, key: str) -> None:
        count = self._unauthenticated[key] - 1
        if count:
            self._unauthenticated[key] = count
        else:
            del self._unauthenticated[key]

    @contextlib.contextmanager
    def refusal_slot(self, transport: str) -> Iterator[bool]:
        """While a refused connection is answered: True, one of REFUSAL_COUNT_MAX
        answers of its listener is held; False, too many are being answered:
        close it now without an Error (counted)."""
        if self._refusing[transport] >= REFUSAL_COUNT_MAX:
            self._refusals_unanswered += 1
            yield False
            return
        self._refusing[transport] += 1
        try:
            yield True
        finally:
            self._refusing[transport] -= 1

    # -- a Hello -----------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, peer: Peer, hello: Hello,
              revoke: Callable[[ErrorCode, str], None]) -> Iterator[Admission]:
        """Authenticate the Hello, open its tenant, hold one of its connection slots.

        `revoke(code, message)` is called if a reload no longer allows it.

        Raises:
            Refused: AUTH_FAILED, FORBIDDEN, UNKNOWN_TENANT, TENANT_UNAVAILABLE or
                TOO_MANY_CONNECTIONS; the message names the cause and what to do.
        """
        access = self._authenticate(peer, hello)
        tenant = self._open_tenant(peer, hello.tenant_id)
        state = self._tenant_state(hello.tenant_id)
        _refuse_while_restoring(state, hello.tenant_id)
        transport = peer.transport
        share = self.limits().listener_max(transport) // TENANT_LISTENER_SHARE_DIVISOR
        if state.connections >= state.settings.connections_max:
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"tenant {hello.tenant_id} has {state.settings.connections_max} "
                          "connections open (its connections_max); close idle connections "
                          "and retry with backoff")
        if state.by_listener[transport] >= share:
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"tenant {hello.tenant_id} has {share} connections open on the "
                          f"{transport} listener, the most one tenant may hold (its cap / "
                          "TENANT_LISTENER_SHARE_DIVISOR); close idle connections and retry "
                          "with backoff")
        # No await from the checks to here: a reload sees every admitted connection.
        admission = Admission(peer, hello.token, tenant, access, revoke)
        state.connections += 1
        state.by_listener[transport] += 1
        self._admitted.add(admission)
        try:
            yield admission
        finally:
            state.connections -= 1
            state.by_listener[transport] -= 1
            self._admitted.discard(admission)
            if admission.restoring:
                state.restoring = False

    def _authenticate(self, peer: Peer, hello: Hello) -> Access:
        key, now = peer.limiter_key, self._clock.now()
        retry_after_s = self._limiter.retry_after_s(key, now)
        if retry_after_s is not None:
            self._count_auth_failure(hello.tenant_id, REASON_RATE_LIMITED)
            raise Refused(ErrorCode.AUTH_FAILED,
                          f"too many failed authentications from {key} (AUTH_FAILURE_COUNT_MAX "
                          f"{AUTH_FAILURE_COUNT_MAX} per {AUTH_FAILURE_WINDOW_S:.0f} s); retry in "
                          f"{retry_after_s:.0f} s with valid credentials")
        try:
            return self._policy.check(peer, hello.token, hello.tenant_id, _utc_now())
        except AuthError as error:
            self._limiter.record_failure(key, now)
            self._count_auth_failure(hello.tenant_id, REASON_BAD_CREDENTIALS)
            log.warning("authentication failed: %s, tenant %d: %s", key, hello.tenant_id, error)
            raise Refused(ErrorCode.AUTH_FAILED, str(error)) from None
        except ForbiddenError as error:
            self._count_auth_failure(hello.tenant_id, REASON_FORBIDDEN)
            raise Refused(ErrorCode.FORBIDDEN, str(error)) from None

    def _open_tenant(self, peer: Peer, tenant_id: int) -> Tenant:
        creates = self._registry.would_create(tenant_id)
        key = peer.limiter_key
        if creates:
            created, limit = self._created.get(key, 0), self.limits().peer_tenant_creations_max
            if created >= limit:
                raise Refused(ErrorCode.UNKNOWN_TENANT,
                              f"tenant {tenant_id} does not exist and {key} has created "
                              f"{created} tenants (PEER_TENANT_CREATION_COUNT_MAX or "
                              "peer_tenant_creations_max); use an existing tenant, or configure "
                              f"[tenants.{tenant_id}] and reload")
        try:
            tenant = self._registry.get(tenant_id)
        except (UnknownTenantError, TenantLimitError) as error:
            raise Refused(ErrorCode.UNKNOWN_TENANT, str(error)) from None
        except (RingError, OSError) as error:  # OSError: creating the file (ENOSPC, EACCES)
            log.error("tenant %d cannot be opened: %s", tenant_id, error)
            raise Refused(ErrorCode.TENANT_UNAVAILABLE,
                          f"tenant {tenant_id}'s ring cannot be opened: {error}") from None
        if creates:
            self._count_creation(key, tenant_id)
        return tenant

    def _count_creation(self, key: str, tenant_id: int) -> None:
        self._created[key] = self._created.get(key, 0) + 1
        log.info("tenant %d created on first use by %s (%d of its %d)", tenant_id, key,
                 self._created[key], self.limits().peer_tenant_creations_max)

    async def prepare(self, peer: Peer, hello: Hello) -> None:
        """Before `admit`: open the Hello's tenant on a worker thread if admit()
        would open (or create) it on the event loop (issue 9, item 5), so
        admit() finds it open. Only for a Hello admit() would get as far as
        opening: credentials that pass (nothing is counted or limited here:
        admit() checks them again and counts) and a creation within the
        peer's cap (counted here when it happens, as admit() would).

        Raises:
            Refused: TENANT_UNAVAILABLE, the ring cannot be opened or created.
        """
        tenant_id, key = hello.tenant_id, peer.limiter_key
        if not self._registry.would_open(tenant_id):
            return
        if self._limiter.retry_after_s(key, self._clock.now()) is not None:
            return
        try:
            self._policy.check(peer, hello.token, tenant_id, _utc_now())
        except (AuthError, ForbiddenError):
            return  # admit() refuses it, and counts the failure
        creates = self._registry.would_create(tenant_id)
        if creates and self._created.get(key, 0) >= self.limits().peer_tenant_creations_max:
            return  # admit() refuses it
        try:
            opened = await self._registry.open_on_thread(tenant_id)
        except (RingError, OSError) as error:  # OSError: creating the file (ENOSPC, EACCES)
            log.error("tenant %d cannot be opened: %s", tenant_id, error)
            raise Refused(ErrorCode.TENANT_UNAVAILABLE,
                          f"tenant {tenant_id}'s ring cannot be opened: {error}") from None
        if opened and creates:
            self._count_creation(key, tenant_id)

    def _tenant_state(self, tenant_id: int) -> _TenantState:
        state = self._tenants.get(tenant_id)
        if state is None:  # one per opened tenant: bounded by TENANT_COUNT_MAX
            state = self._tenants[tenant_id] = _TenantState(self._quota_settings(tenant_id),
                                                            self._clock)
        return state

    def _count_auth_failure(self, tenant_id: int, reason: str) -> None:
        """The one place a refused Hello is counted (by tenant and reason, and by reason)."""
        self._auth_failure_reasons[reason] = self._auth_failure_reasons.get(reason, 0) + 1
        key = (str(tenant_id), reason[:AUTH_FAILURE_REASON_SIZE_MAX])
        if key not in self._auth_failures and \
                len(self._auth_failures) >= AUTH_FAILURE_SERIES_COUNT_MAX:
            key = (OTHER_LABEL, OTHER_LABEL)
        self._auth_failures[key] = self._auth_failures.get(key, 0) + 1

    # -- requests after the Hello ------------------------------------------------------

    def _require(self, admission: Admission, role: Role) -> None:
        if admission.access.allows(role):
            return
        self._role_refusals += 1
        raise Refused(ErrorCode.FORBIDDEN,
                      f"these credentials ({admission.access.credential}) may not "
                      f"{role.value} on tenant {admission.tenant.tenant_id}; grant the "
                      f"{role.value} role in the tenant's grants or use other credentials")

    async def admit_publish(self, admission: Admission, event: Publish) -> ProtocolError | None:
        """The role, the records/s quota (may wait), then the records: the batch's
        refusal (QUOTA_EXCEEDED, BAD_RECORD_MAGIC, WRONG_TENANT) or None.

        Raises:
            Refused: FORBIDDEN, the credentials may not publish.
        """
        self._require(admission, Role.PUBLISH)
        refusal = await self._pace(admission.tenant.tenant_id, event)
        if refusal is not None:
            return refusal
        problem = publish_problem(event.records, admission.tenant.tenant_id)
        if problem is None:
            return None
        code, index, message = problem
        return ProtocolError(code, message, batch_id=event.batch_id, record_index=index)

    async def _pace(self, tenant_id: int, event: Publish) -> ProtocolError | None:
        """Hold the batch to the tenant's records/s quota: wait ("slow") or refuse."""
        state = self._tenants[tenant_id]
        bucket = state.bucket
        if bucket is None:
            return None
        count = len(event.records) // RECORD_SIZE_BYTES
        now = self._clock.now()
        if state.settings.mode == "reject":
            if bucket.try_take(count, now):
                return None
            wait_s = bucket.seconds_until(count, now)
            advice = (f"retry in {wait_s:.3f} s" if wait_s != float("inf") else
                      f"split it: batches over burst_records ({bucket.burst_records}) never fit")
            return ProtocolError(
                ErrorCode.QUOTA_EXCEEDED,
                f"tenant {tenant_id} is over its quota of "
                f"{state.settings.records_per_second} records/s (burst {bucket.burst_records}); "
                f"the batch of {count} records was refused whole; {advice}",
                batch_id=event.batch_id)
        deadline = bucket.reserve(count, now)
        if deadline > now:
            state.records_delayed += count
            await self._clock.sleep_until(deadline)  # pacing to the quota, not synchronisation
        return None

    def admit_subscribe(self, admission: Admission) -> None:
        """The role; from here a reload re-checks the subscribe role too.

        Raises:
            Refused: FORBIDDEN, the credentials may not subscribe.
        """
        self._require(admission, Role.SUBSCRIBE)
        admission.subscribed = True

    @contextlib.contextmanager
    def subscriber_slot(self, tenant_id: int) -> Iterator[None]:
        """One of the tenant's subscriber slots while a subscription runs.

        For any subscriber of an opened tenant: a connection's, or an
        in-process one's (a web page's event stream).

        Raises:
            Refused: TOO_MANY_SUBSCRIBERS.
        """
        state = self._tenant_state(tenant_id)
        _refuse_while_restoring(state, tenant_id)
        limit = min(SUBSCRIBER_COUNT_MAX, state.settings.subscribers_max)
        if state.subscribers >= limit:
            raise Refused(ErrorCode.TOO_MANY_SUBSCRIBERS,
                          f"tenant {tenant_id} has {limit} subscribers "
                          "(SUBSCRIBER_COUNT_MAX or its subscribers_max); retry later")
        state.subscribers += 1
        try:
            yield
        finally:
            state.subscribers -= 1

    # -- a Restore ---------------------------------------------------------------------

    async def restore(self, admission: Admission, restore: Restore, published: bool) -> None:
        """A Restore (docs/PROTOCOL.md 4.13): the checks, then the tenant's empty
        ring replaced by one whose next sequence is `restore.first_sequence`.
        From the checks on, until the connection ends, the tenant is this
        connection's alone: other Hellos and subscribers are refused.

        `published`: the connection sent a Publish before (refused).

        Raises:
            Refused: FORBIDDEN (no admin role); RESTORE_REFUSED, the message
                names the check that failed and what to do; TENANT_UNAVAILABLE,
                the new ring could not be written or opened.
        """
        self._require(admission, Role.ADMIN)
        tenant = admission.tenant
        tenant_id, ring = tenant.tenant_id, tenant.ring
        state = self._tenants[tenant_id]
        queued = tenant.writer.statistics().pending_records
        if published:
            problem = ("this connection sent a Publish before it; send Restore first, on a new "
                       "connection")
        elif admission.restoring:
            problem = "this connection restored already; one Restore per connection"
        elif state.connections > 1 or state.subscribers:
            problem = (f"tenant {tenant_id} has {state.connections - 1} other connections and "
                       f"{state.subscribers} subscribers; a restore needs the tenant to itself: "
                       "close them and restore again, or restore into another tenant")
        elif ring.next_sequence > ring.oldest_sequence:
            problem = (f"tenant {tenant_id} holds records {ring.oldest_sequence}.."
                       f"{ring.next_sequence - 1}; a restore goes into an empty tenant only. "
                       f"To start over (a restore cut short leaves a prefix): stop the daemon, "
                       f"delete {ring.path}, start it and restore again; or restore into "
                       "another tenant")
        elif queued or ring.in_flight:
            problem = (f"tenant {tenant_id} has {queued} records still being written (a "
                       "connection that just closed); restore again once they are, into "
                       "another tenant if they land")
        else:
            problem = restore_request_problem(restore.first_sequence, restore.record_count,
                                              ring.capacity)
        if problem:
            raise Refused(ErrorCode.RESTORE_REFUSED,
                          f"restore into tenant {tenant_id} refused: {problem}")
        state.restoring = admission.restoring = True
        try:
            await self._registry.replace_empty_ring(tenant, restore.first_sequence)
        except (RingError, OSError) as error:
            raise Refused(ErrorCode.TENANT_UNAVAILABLE,
                          f"tenant {tenant_id}'s ring could not be recreated for the restore "
                          f"(nothing was restored): {error}") from None

    # -- reload ------------------------------------------------------------------------

    def reconfigure(self, policy: AccessPolicy, removed: set[int]) -> int:
        """Apply a reloaded config: the new policy and quotas at once; every
        admitted connection re-checked, and revoked (UNKNOWN_TENANT for a
        removed tenant, AUTH_FAILED, FORBIDDEN) if no longer allowed.
        Returns how many were revoked."""
        self._policy = policy
        for tenant_id, state in self._tenants.items():
            state.update(self._quota_settings(tenant_id))
        return sum(self._recheck(admission, removed) for admission in list(self._admitted))

    def _recheck(self, admission: Admission, removed: set[int], why: str = "a reload") -> bool:
        tenant_id = admission.tenant.tenant_id
        if tenant_id in removed:
            admission.revoke(ErrorCode.UNKNOWN_TENANT,
                             f"tenant {tenant_id} was removed from the config by a reload")
            return True
        try:
            access = self._policy.check(admission.peer, admission.token, tenant_id, _utc_now())
        except AuthError as error:
            admission.revoke(ErrorCode.AUTH_FAILED, f"credentials revoked by {why}: {error}")
            return True
        except ForbiddenError as error:
            admission.revoke(ErrorCode.FORBIDDEN, f"role revoked by {why}: {error}")
            return True
        if admission.subscribed and not access.allows(Role.SUBSCRIBE):
            admission.revoke(ErrorCode.FORBIDDEN, f"role subscribe revoked by {why}")
            return True
        admission.access = access
        admission.access_changed.set()
        return False

    # -- expiry ------------------------------------------------------------------------

    async def watch_expiry(self, admission: Admission) -> None:
        """End `admission` when the credentials it holds expire (issue 9, item 8).

        At the soonest expiry of the grants that admitted it (Access.expires),
        the connection is checked again as a reload checks it, and revoked
        (AUTH_FAILED "the token expired at ...", or FORBIDDEN if an expired
        grant gave a role it uses) if they no longer hold; a reload that
        changes its access restarts the wait. Returns once it revoked;
        otherwise runs until cancelled (the connection ended).
        """
        while True:
            admission.access_changed = changed = trio.Event()
            expires = admission.access.expires
            delay_s = (math.inf if expires is None
                       else max(0.0, (expires - _utc_now()).total_seconds()))
            with trio.move_on_after(delay_s):
                await changed.wait()
            if changed.is_set():
                continue  # a reload re-checked it: wait for the new expiry
            if self._recheck(admission, set(), why="their expiry"):
                return

    # -- statistics --------------------------------------------------------------------

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            sum(self._open.values()), MappingProxyType(dict(self._open)),
            sum(self._unauthenticated.values()), self._refusals_unanswered,
            MappingProxyType(dict(self._auth_failures)),
            MappingProxyType(dict(self._auth_failure_reasons)), self._role_refusals,
            MappingProxyType({tenant_id: state.statistics()
                              for tenant_id, state in self._tenants.items()}))


def _refuse_while_restoring(state: _TenantState, tenant_id: int) -> None:
    if state.restoring:
        raise Refused(ErrorCode.TENANT_UNAVAILABLE,
                      f"tenant {tenant_id} is being restored (`ringtail restore`) by another "
                      "connection, which has it to itself until it ends; reconnect with backoff")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
