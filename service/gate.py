"""The tenant gate: who may connect, publish and subscribe, and how fast.

Every admission decision of the daemon is made here, at the points of a
connection's life where the handler (service/connection.py) asks:

1. accepted: `connection_slot()` holds one of CONNECTION_COUNT_MAX daemon-wide
   slots for as long as the connection is open;
2. a Hello: `admit(peer, hello, revoke)` checks the auth-failure limiter and
   the access policy (service/auth.py), opens the tenant (service/tenants.py)
   and holds one of the tenant's `connections_max` slots; a SIGHUP
   (`reconfigure`) re-checks every admitted connection and calls `revoke` on
   those no longer allowed, and so does `watch_expiry` when the credentials
   a connection was admitted with expire;
3. a Publish: `admit_publish(admission, publish)` checks the role, holds the
   batch to the tenant's records-per-second quota (waits in quota_mode
   "slow", refuses QUOTA_EXCEEDED in "reject") and checks its records
   (ioring.record.check_records, shared with the Publisher's pre-check);
4. a Subscribe: `admit_subscribe(admission)` checks the role, and
   `subscriber_slot(tenant_id)` holds one of the tenant's subscriber slots
   while the subscription runs (usable by an in-process subscriber too).

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
from ringtail.service.auth import (AUTH_FAILURE_COUNT_MAX, AUTH_FAILURE_WINDOW_S, Access, AccessPolicy,
                                   AuthError, AuthFailureLimiter, ForbiddenError, Peer, Role)
from ringtail.service.protocol import ErrorCode, Hello, ProtocolError, Publish
from ringtail.service.quotas import TENANT_SUBSCRIBER_COUNT_MAX, Clock, QuotaSettings, TokenBucket
from ringtail.service.tenants import Tenant, TenantLimitError, TenantRegistry, UnknownTenantError

log = logging.getLogger("ringtail.server")

# Connections at once, daemon-wide (each costs two small tasks and up to one
# frame of buffered input, RECEIVE_BUFFER_BYTES_MAX; service/limits.py sums it).
CONNECTION_COUNT_MAX = 1024
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


class Refused(Exception):
    """The gate refused the connection: send Error(code, message), then close."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
    connections_open: int  # daemon-wide slots held
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
        self.subscribers = 0
        self.records_delayed = 0

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


class Gate:
    """Every admission decision; see the module docstring.

    `quota_settings(tenant_id)` gives a tenant's current QuotaSettings (read
    again at each reload); `registry` opens tenants on a Hello.
    """

    def __init__(self, policy: AccessPolicy, registry: TenantRegistry,
                 quota_settings: Callable[[int], QuotaSettings], clock: Clock):
        self._policy = policy
        self._registry = registry
        self._quota_settings = quota_settings
        self._clock = clock
        self._limiter = AuthFailureLimiter()
        self._tenants: dict[int, _TenantState] = {}  # bounded by TENANT_COUNT_MAX
        self._admitted: set[Admission] = set()  # bounded by CONNECTION_COUNT_MAX
        self._connections_open = 0
        self._auth_failures: dict[tuple[str, str], int] = {}
        self._auth_failure_reasons: dict[str, int] = {}  # the REASON_* set
        self._role_refusals = 0

    # -- accepted ----------------------------------------------------------------------

    @contextlib.contextmanager
    def connection_slot(self) -> Iterator[None]:
        """One of CONNECTION_COUNT_MAX slots while the connection is open.

        Raises:
            Refused: TOO_MANY_CONNECTIONS, every slot is held.
        """
        if self._connections_open >= CONNECTION_COUNT_MAX:
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"{CONNECTION_COUNT_MAX} connections are open (CONNECTION_COUNT_MAX); "
                          "close idle connections and retry with backoff")
        self._connections_open += 1
        try:
            yield
        finally:
            self._connections_open -= 1

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
        tenant = self._open_tenant(hello.tenant_id)
        state = self._tenant_state(hello.tenant_id)
        limit = state.settings.connections_max
        if state.connections >= limit:
            raise Refused(ErrorCode.TOO_MANY_CONNECTIONS,
                          f"tenant {hello.tenant_id} has {limit} connections open (its "
                          "connections_max); close idle connections and retry with backoff")
        # No await from the checks to here: a reload sees every admitted connection.
        admission = Admission(peer, hello.token, tenant, access, revoke)
        state.connections += 1
        self._admitted.add(admission)
        try:
            yield admission
        finally:
            state.connections -= 1
            self._admitted.discard(admission)

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

    def _open_tenant(self, tenant_id: int) -> Tenant:
        try:
            return self._registry.get(tenant_id)
        except (UnknownTenantError, TenantLimitError) as error:
            raise Refused(ErrorCode.UNKNOWN_TENANT, str(error)) from None
        except (RingError, OSError) as error:  # OSError: creating the file (ENOSPC, EACCES)
            log.error("tenant %d cannot be opened: %s", tenant_id, error)
            raise Refused(ErrorCode.TENANT_UNAVAILABLE,
                          f"tenant {tenant_id}'s ring cannot be opened: {error}") from None

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
            self._connections_open,
            MappingProxyType(dict(self._auth_failures)),
            MappingProxyType(dict(self._auth_failure_reasons)), self._role_refusals,
            MappingProxyType({tenant_id: state.statistics()
                              for tenant_id, state in self._tenants.items()}))


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
