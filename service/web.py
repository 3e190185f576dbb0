"""The web page: tenants at a glance, and a live tail of one tenant.

Routes (served by service/http.py's listener, beside /metrics):

- `/` and `/tenants/T`: static pages (service/static/), no data in them;
  the page's script asks the event streams below for everything.
- `/static/NAME`: the page's script and style, shipped in the package;
  nothing is fetched from elsewhere at run time.
- `/api/tenants`: a Server-Sent Events stream, one `tenants` event every
  WEB_TICK_S: every opened tenant the token may subscribe to, with its
  next and oldest sequence, capacity, fill, subscribers and failure records
  seen (the page draws records/s from successive next sequences).
- `/api/tenants/T/records`: a Server-Sent Events stream of tenant T's
  records, history then live, through the socket's own subscription path
  (service/subscribers.py `run_subscription`): no gap and no duplicate at
  the seam by construction; a reader that falls behind eviction gets a `gap`
  event naming the lost range, like any slow subscriber, and never slows a
  publisher (the subscription only reads the ring). Query: `history=N`
  (start N records back, at most WEB_HISTORY_RECORD_COUNT_MAX) or
  `from=SEQ` (resume after a reconnect: no duplicate); `opcodes=1,2`,
  `epoch_min`, `epoch_max`, `failure_only=1`, applied by the daemon
  (RecordFilter). A `stats` event every WEB_TICK_S carries the ring's
  next sequence for the records/s plot.

Access: the same bearer tokens and roles as TCP. The page keeps the token
the viewer types in `sessionStorage` and sends it as `Authorization: Bearer
...` on `fetch()` (which reads the event stream; EventSource cannot set a
header), so a token never appears in a URL, a server log or a cookie. A
stream needs the `subscribe` role on the tenant (`admin` has it); the list
shows only tenants the token may subscribe to; a tenant it may not read is
refused (403) whether or not it exists. Over plain HTTP off loopback the
API answers 403 (service/http.py: HTTPS needs `tls_cert`). The credentials
are checked again every tick, so a reload that revokes a token ends its
streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hmac
import importlib.resources
import json
import logging
import re

import numpy
import trio

from ringtail.ioring import RingError, RingRangeError
from ringtail.ioring.record import RECORD_DTYPE, failure_class_name
from ringtail.service.auth import AuthError, Peer, Role, expand_roles, hash_token
from ringtail.service.gate import Refused
from ringtail.service.http import Request, Response, StreamResponse, Writer
from ringtail.service.protocol import (TOKEN_SIZE_BYTES_MAX, End, ErrorCode, Gap, Hello,
                                       ProtocolError, StartKind, Subscribe)
from ringtail.service.subscribers import RecordFilter, run_subscription

log = logging.getLogger("ringtail.web")

# -- limits ---------------------------------------------------------------------------

# Seconds between `tenants` and `stats` events (the sparkline's resolution),
# and between re-checks of a stream's credentials.
WEB_TICK_S = 1.0
# Records of history a tail starts with when the page gives no `from`; the
# page keeps at most WEB_ROWS_KEPT_MAX rows, so more would be dropped on arrival.
WEB_HISTORY_RECORD_COUNT_MAX = 500
# Rows the tenant page keeps (oldest dropped first); the page reads it from
# the stream's `hello` event. 500 rows x ~1 KiB of DOM each.
WEB_ROWS_KEPT_MAX = 500
# Records per `records` event: one subscription read (up to 4,096) is cut
# into events of at most this many, ~150 B of JSON each: ~150 KiB per event.
WEB_EVENT_RECORD_COUNT_MAX = 1024
# Records the failure count reads per tenant per tick (16,384 x 64 B = 1 MiB),
# and per tick of one list stream over all its tenants (65,536 x 64 B = 4 MiB,
# a few ms of verified reads on the daemon's event loop): the count of busy
# tenants catches up over several ticks instead of one long read.
WEB_FAILURE_SCAN_RECORD_COUNT_MAX = 16 * 1024
WEB_FAILURE_SCAN_TICK_RECORD_COUNT_MAX = 64 * 1024
# Characters of an opcode list in a query (the protocol caps opcodes at
# SUBSCRIBE_OPCODE_COUNT_MAX; this only bounds the parse).
WEB_QUERY_SIZE_MAX = 1024

assert WEB_HISTORY_RECORD_COUNT_MAX <= WEB_ROWS_KEPT_MAX
assert WEB_FAILURE_SCAN_RECORD_COUNT_MAX <= WEB_FAILURE_SCAN_TICK_RECORD_COUNT_MAX

WEB_CLIENT_NAME = "web page"  # the Hello's client_name in the daemon's logs
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8",
                "index.html": "text/html; charset=utf-8",
                "tenant.html": "text/html; charset=utf-8",
                "favicon.svg": "image/svg+xml"}
TENANT_PAGE = re.compile(r"^/tenants/(\d{1,10})/?$")
TENANT_RECORDS = re.compile(r"^/api/tenants/(\d{1,10})/records$")
# Content-Security-Policy: the page runs only its own script and style.
PAGE_HEADERS = (("content-security-policy", "default-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; frame-ancestors 'none'"),)


def _load_static() -> dict[str, bytes]:
    folder = importlib.resources.files("ringtail.service") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def sse(event: str, payload) -> bytes:
    """One Server-Sent Events message (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class WebError(Exception):
    """A request the web page refuses: an HTTP status and a message naming the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- what the page reads from the daemon ---------------------------------------------------


def records_payload(data: bytes, first_sequence: int, sequences) -> list[list]:
    """Records as rows: [seq, ts_ns, slot, opcode, args, epoch, status, failure_class,
    failure_name, backend_code, digest_hex, failed]."""
    rows = numpy.frombuffer(data, dtype=RECORD_DTYPE)
    if sequences is None:
        sequences = range(first_sequence, first_sequence + len(rows))
    failed = ((rows["slot_status"] != 0) | (rows["failure_class"] != 0)
              | (rows["backend_code"] != 0) | (rows["output_digest"] != 0)).tolist()
    classes = rows["failure_class"].tolist()
    return [[sequence, ts, slot, opcode, args, epoch, status, failure, failure_class_name(failure),
             backend, f"{digest:016x}", bad]
            for sequence, ts, slot, opcode, args, epoch, status, failure, backend, digest, bad
            in zip(sequences, rows["timestamp_ns"].tolist(), rows["slot_idx"].tolist(),
                   rows["opcode"].tolist(), rows["args"].tolist(), rows["epoch"].tolist(),
                   rows["slot_status"].tolist(), classes, rows["backend_code"].tolist(),
                   rows["output_digest"].tolist(), failed)]


@dataclasses.dataclass(slots=True)
class _FailureCount:
    scanned_to: int  # sequences below this were counted
    count: int = 0
    exact: bool = True  # False once eviction overtook the count (then a lower bound)


class FailureCounter:
    """Failure records seen per tenant: every record retained when first
    looked at, and every one committed since, counted while a tenant list is
    watched (WEB_FAILURE_SCAN_RECORD_COUNT_MAX per tenant per tick). Bounded
    by TENANT_COUNT_MAX entries."""

    FAILURES = RecordFilter(failure_only=True)

    def __init__(self):
        self._counts: dict[int, _FailureCount] = {}

    def update(self, tenant, budget: int) -> tuple[_FailureCount, int]:
        """Count what was committed since the last look, reading at most
        `budget` records (and WEB_FAILURE_SCAN_RECORD_COUNT_MAX); returns the
        count and the records read."""
        ring = tenant.ring
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        state = self._counts.get(tenant.tenant_id)
        if state is None:
            state = self._counts[tenant.tenant_id] = _FailureCount(oldest)
        if state.scanned_to < oldest:  # evicted before it was counted
            state.scanned_to, state.exact = oldest, False
        count = min(next_sequence - state.scanned_to, WEB_FAILURE_SCAN_RECORD_COUNT_MAX, budget)
        if count <= 0:
            return state, 0
        try:
            data = ring.read(state.scanned_to, count)
        except RingRangeError:
            return state, 0  # evicted meanwhile: the next tick skips ahead
        state.count += len(self.FAILURES.select(data))
        state.scanned_to += count
        return state, count


# HTTP statuses for the gate's refusals (service/gate.py `Refused`).
REFUSAL_STATUS = {ErrorCode.AUTH_FAILED: 401, ErrorCode.FORBIDDEN: 403,
                  ErrorCode.UNKNOWN_TENANT: 404, ErrorCode.TENANT_UNAVAILABLE: 503,
                  ErrorCode.TOO_MANY_CONNECTIONS: 503, ErrorCode.TOO_MANY_SUBSCRIBERS: 503}


def refusal(error: Refused) -> WebError:
    return WebError(REFUSAL_STATUS.get(error.code, 403), error.message)


class DaemonAccess:
    """The daemon's credentials, tenants and subscriber slots, as the page uses them.

    The one place web.py reaches into the daemon. A tail goes through the
    gate (service/gate.py) exactly as a TCP connection's Hello and Subscribe
    do: the same tokens and roles, the auth-failure limiter, the tenant's
    connection and subscriber caps, and revocation by a reload. The list
    asks the current config's access policy which opened tenants a token may
    subscribe to, in one pass over its token grants (no slot held, nothing
    counted for tenants it cannot see);
    a token valid nowhere is refused through the gate, so it is counted and
    rate limited like a bad Hello. The page never creates a tenant.
    """

    def __init__(self, daemon):
        self.daemon = daemon
        self._policy_source = None
        self._policy = None

    def tenants(self) -> dict:
        return dict(self.daemon.registry.tenants)

    def tenant_name(self, tenant_id: int) -> str:
        settings = self.daemon.registry.settings.get(tenant_id)
        return settings.name if settings is not None else ""

    def _current_policy(self):
        config = self.daemon.config  # a reload swaps the whole config
        if config is not self._policy_source:
            self._policy_source, self._policy = config, config.access_policy()
        return self._policy

    def readable_tenants(self, token: bytes) -> tuple[bool, frozenset[int]]:
        """(admin, tenant ids) on which `token` has the subscribe role, in one
        pass over the config's token grants: the same outcome as the access
        policy's check per tenant (service/auth.py), at O(grants) per tick
        instead of O(tenants x grants).

        Raises:
            AuthError: the token is valid on no tenant (unknown, expired).
        """
        policy = self._current_policy()
        presented = hash_token(token).encode()
        now = _utc_now()
        admin, readable, known, expired = False, set(), False, None
        for tenant_id, grants in [(None, policy.admins), *policy.tenant_grants.items()]:
            for grant in grants:
                # Every grant compared, none skipped on a match (as the policy does).
                if grant.token_hash is None or not hmac.compare_digest(
                        grant.token_hash.encode(), presented):
                    continue
                if grant.expires is not None and grant.expires <= now:
                    expired = grant
                    continue
                known = True
                if tenant_id is None:
                    admin = True
                elif Role.SUBSCRIBE.value in expand_roles(grant.roles):
                    readable.add(tenant_id)
        if not known:
            raise AuthError("the token is not valid on this daemon" if expired is None
                            else f"the token expired at {expired.expires.isoformat()}")
        return admin, frozenset(readable)

    def refuse(self, peer: Peer, token: bytes, tenant_id: int) -> WebError:
        """A bad token's refusal, counted and rate limited by the gate as a Hello's."""
        try:
            with self.daemon.gate.admit(peer, Hello(tenant_id, token, WEB_CLIENT_NAME),
                                        lambda code, message: None):
                pass
        except Refused as error:
            return refusal(error)
        return WebError(401, "the token is not valid on this daemon")

    def subscribers(self, tenant_id: int) -> int:
        state = self.daemon.gate.statistics().tenants.get(tenant_id)
        return state.subscribers if state is not None else 0

    @contextlib.contextmanager
    def subscription(self, peer: Peer, token: bytes, tenant_id: int, revoke):
        """Admit a tail as the gate admits a connection's Hello and Subscribe, and
        hold a subscriber slot; yields the Admission; `revoke(code, message)` if
        a reload disallows it or its token expires (`Gate.watch_expiry`).

        Raises:
            WebError: the gate's refusal (401, 403, 404, 503).
        """
        gate = self.daemon.gate
        with contextlib.ExitStack() as stack:
            try:
                admission = stack.enter_context(
                    gate.admit(peer, Hello(tenant_id, token, WEB_CLIENT_NAME), revoke))
                gate.admit_subscribe(admission)
                stack.enter_context(gate.subscriber_slot(tenant_id))
            except Refused as error:
                raise refusal(error) from None
            yield admission

    @property
    def counters(self):
        return self.daemon.subscriptions


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- the routes -------------------------------------------------------------------------------


def _bearer(request: Request) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise WebError(401, "send the token as 'Authorization: Bearer <token>' (the page "
                            "asks for it); tokens never go in URLs")
    token = token.strip().encode()
    if len(token) > TOKEN_SIZE_BYTES_MAX:
        raise WebError(401, f"the token is {len(token)} bytes, over TOKEN_SIZE_BYTES_MAX "
                            f"({TOKEN_SIZE_BYTES_MAX}); paste the token `ringtail token new` "
                            "printed")
    return token


def _uint(query: dict[str, str], name: str, default: int, maximum: int) -> int:
    value = query.get(name, "")
    if value == "":
        return default
    if not (value.isascii() and value.isdigit()) or int(value) > maximum:
        raise WebError(400, f"{name} = {value[:40]!r} is not an integer in 0..{maximum}")
    return int(value)


def tail_subscribe(query: dict[str, str], oldest: int, next_sequence: int) -> Subscribe:
    """The Subscribe a tail's query asks for (validated like a wire Subscribe).

    Raises:
        WebError: 400 naming the bad parameter.
    """
    opcodes_text = query.get("opcodes", "")
    if len(opcodes_text) > WEB_QUERY_SIZE_MAX:
        raise WebError(400, f"opcodes is over {WEB_QUERY_SIZE_MAX} characters "
                            "(WEB_QUERY_SIZE_MAX); filter on fewer opcodes")
    opcodes = []
    for item in filter(None, (part.strip() for part in opcodes_text.split(","))):
        if not (item.isascii() and item.isdigit()):
            raise WebError(400, f"opcodes: {item[:40]!r} is not an integer; write e.g. 1,2,7")
        opcodes.append(int(item))
    if "from" in query:
        start = _uint(query, "from", 0, 2**64 - 1)
    else:
        history = _uint(query, "history", WEB_HISTORY_RECORD_COUNT_MAX,
                        WEB_HISTORY_RECORD_COUNT_MAX)
        start = max(oldest, next_sequence - history)
    failure_only = query.get("failure_only", "") in ("1", "true", "on")
    try:
        return Subscribe(start=StartKind.SEQUENCE, start_value=start, follow=True,
                         failure_only=failure_only,
                         epoch_min=_uint(query, "epoch_min", 0, 0xFFFF_FFFF),
                         epoch_max=_uint(query, "epoch_max", 0xFFFF_FFFF, 0xFFFF_FFFF),
                         opcodes=frozenset(opcodes))
    except ProtocolError as error:
        raise WebError(400, str(error)) from None


class WebApp:
    """The page's handlers, for service/http.py (returns None for paths it does not serve)."""

    def __init__(self, daemon):
        self.access = DaemonAccess(daemon)
        self.failures = FailureCounter()
        self.static = _load_static()

    async def __call__(self, request: Request):
        path = request.path
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if TENANT_PAGE.match(path):
                return self._static("tenant.html")
            if path.startswith("/static/"):
                name = path.removeprefix("/static/")
                return self._static(name) if name in self.static else None
            if path == "/favicon.ico":
                return self._static("favicon.svg")
            if path == "/api/tenants":
                return self._tenant_list(request)
            match = TENANT_RECORDS.match(path)
            if match:
                return self._tail(request, int(match.group(1)))
        except WebError as error:
            return Response(error.status, str(error).encode() + b"\n",
                            headers=(("www-authenticate", 'Bearer realm="ringtail"'),)
                            if error.status == 401 else ())
        return None

    def _static(self, name: str) -> Response:
        return Response(200, self.static[name], STATIC_FILES[name], PAGE_HEADERS)

    def _check_transport(self, request: Request) -> None:
        if not request.secure:
            raise WebError(403, "the web page's data needs HTTPS or a loopback listener: set "
                                "tls_cert and tls_key, or http_listen on 127.0.0.1 / [::1]")

    def _peer(self, request: Request) -> Peer:
        return Peer("tcp", address=request.peer_address)

    # -- the tenant list --------------------------------------------------------------

    def _visible(self, peer: Peer, token: bytes) -> list:
        """Opened tenants this token may subscribe to, by id.

        Raises:
            WebError: 401 if the token is valid on no tenant (counted and rate
                limited by the gate as a bad Hello).
        """
        try:
            admin, readable = self.access.readable_tenants(token)
        except AuthError:
            raise self.access.refuse(peer, token, 0) from None
        return [tenant for tenant_id, tenant in sorted(self.access.tenants().items())
                if admin or tenant_id in readable]

    def _tenant_list(self, request: Request) -> StreamResponse:
        self._check_transport(request)
        token, peer = _bearer(request), self._peer(request)
        self._visible(peer, token)  # refuse a bad token before the stream starts

        async def stream(write: Writer) -> None:
            while True:
                try:
                    visible = self._visible(peer, token)
                except WebError as error:  # revoked by a reload
                    await write(sse("refused", {"status": error.status, "message": str(error)}))
                    return
                budget = [WEB_FAILURE_SCAN_TICK_RECORD_COUNT_MAX]
                await write(sse("tenants", {"time": trio.current_time(),
                                            "tenants": [self._summary(t, budget)
                                                        for t in visible]}))
                await trio.sleep(WEB_TICK_S)  # the list's refresh period

        return StreamResponse(stream)

    def _summary(self, tenant, budget: list[int]) -> dict:
        ring = tenant.ring
        failures, read = self.failures.update(tenant, budget[0])
        budget[0] -= read
        kept = ring.next_sequence - ring.oldest_sequence
        return {"id": tenant.tenant_id, "name": self.access.tenant_name(tenant.tenant_id),
                "next": ring.next_sequence, "oldest": ring.oldest_sequence,
                "capacity": ring.capacity, "fill": kept / ring.capacity,
                "subscribers": self.access.subscribers(tenant.tenant_id),
                "failures": failures.count, "failures_exact": failures.exact,
                "failures_behind": ring.next_sequence - failures.scanned_to}

    # -- one tenant's tail --------------------------------------------------------------

    def _tail(self, request: Request, tenant_id: int) -> StreamResponse:
        self._check_transport(request)
        token, peer = _bearer(request), self._peer(request)
        if tenant_id not in self.access.tenants():
            raise WebError(404, f"no tenant {tenant_id} is open on this daemon (none published "
                                "to it since it started); the list at / shows those that are")
        revoked = _Revocation()
        stack = contextlib.ExitStack()
        admission = stack.enter_context(self.access.subscription(peer, token, tenant_id, revoked))
        tenant = admission.tenant
        try:
            ring = tenant.ring
            subscribe = tail_subscribe(request.query, ring.oldest_sequence, ring.next_sequence)
            if subscribe.start_value > ring.next_sequence:
                raise WebError(400, f"from = {subscribe.start_value} is past tenant "
                                    f"{tenant_id}'s next sequence {ring.next_sequence}; "
                                    "reload the page")
        except BaseException:
            stack.close()
            raise

        async def stream(write: Writer) -> None:
            lock = trio.Lock()  # the subscription and the ticker write whole events

            async def send(payload: bytes) -> None:
                async with lock:
                    await write(payload)

            async def send_event(event) -> None:
                if isinstance(event, Gap):
                    await send(sse("gap", {"first": event.first_lost_sequence,
                                           "last": event.last_lost_sequence}))
                elif isinstance(event, End):
                    await send(sse("end", {"next": event.next_sequence}))

            async def send_records(first_sequence: int, data: bytes, sequences) -> None:
                rows = records_payload(data, first_sequence, sequences)
                for start in range(0, len(rows), WEB_EVENT_RECORD_COUNT_MAX):
                    await send(sse("records", rows[start:start + WEB_EVENT_RECORD_COUNT_MAX]))

            async def tick() -> None:
                while True:
                    await send(sse("stats", {"time": trio.current_time(),
                                             "next": ring.next_sequence,
                                             "oldest": ring.oldest_sequence}))
                    await trio.sleep(WEB_TICK_S)  # the plot's period

            await send(sse("hello", {
                "tenant": tenant_id, "name": self.access.tenant_name(tenant_id),
                "start": subscribe.start_value, "oldest": ring.oldest_sequence,
                "next": ring.next_sequence, "capacity": ring.capacity,
                "rows_max": WEB_ROWS_KEPT_MAX,
                "filter": {"opcodes": sorted(subscribe.opcodes),
                           "epoch_min": subscribe.epoch_min, "epoch_max": subscribe.epoch_max,
                           "failure_only": subscribe.failure_only}}))
            async with trio.open_nursery() as nursery:
                revoked.scope = nursery.cancel_scope
                if revoked.message is not None:  # a reload came before the hello went
                    nursery.cancel_scope.cancel()
                nursery.start_soon(tick)
                # Its token's expiry ends it then, as a connection (issue 9, item 8).
                nursery.start_soon(self.access.daemon.gate.watch_expiry, admission)
                try:
                    await run_subscription(tenant, subscribe, send_event, send_records,
                                           self.access.counters)
                except (RingError, ProtocolError) as error:
                    log.error("web: tenant %d: tail stopped: %s", tenant_id, error)
                    await send(sse("refused", {"status": 500, "message": str(error)}))
                nursery.cancel_scope.cancel()
            if revoked.message is not None:
                with trio.move_on_after(WEB_TICK_S):  # a last word, not a wait on the peer
                    await send(sse("refused", {"status": revoked.status,
                                               "message": revoked.message}))

        return StreamResponse(stream, on_close=stack.close)


class _Revocation:
    """The gate's revoke callback for one tail: a reload ended its access."""

    def __init__(self):
        self.scope: trio.CancelScope | None = None
        self.status = 403
        self.message: str | None = None

    def __call__(self, code: ErrorCode, message: str) -> None:
        self.status, self.message = REFUSAL_STATUS.get(code, 403), message
        if self.scope is not None:
            self.scope.cancel()
