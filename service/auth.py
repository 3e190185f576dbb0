"""Who a peer is, and what it may do: credentials, grants, roles, failure limits.

- A Unix-socket peer is identified by the kernel (`SO_PEERCRED`: uid, gid);
  a TCP peer by the bearer token in its Hello. Tokens are stored only as
  `sha256:<64 hex>` in the config and compared with `hmac.compare_digest`
  against every configured hash (no early exit on a match). A token carries
  256 random bits, so a plain SHA-256 is enough: there is nothing to
  brute-force that a salt or a slow hash would protect.
- A grant gives roles on one tenant (or, in `admins`, on every tenant) to one
  credential: a uid, a gid or a token hash, optionally until an expiry time.
- Roles: `publish`, `subscribe`, and `admin` (publish and subscribe; in
  `admins`, on every tenant). See docs/PROTOCOL.md section 10.
- `AuthFailureLimiter` refuses a peer (uid or IP address) that failed
  authentication AUTH_FAILURE_COUNT_MAX times within AUTH_FAILURE_WINDOW_S,
  until its window ends, without checking its credentials.

This module has no sockets of its own and no Trio: the daemon hands it the
peer's credentials and the current time.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import hashlib
import hmac
import re
import secrets
import socket
import struct

# -- limits ---------------------------------------------------------------------------

# Failed authentications one peer (a uid on the Unix socket, an IP address on
# TCP) may make per window before it is refused outright until the window
# ends: slows online guessing to 10 tries a minute per address, while a
# misconfigured client still sees its real error (AUTH_FAILED) at once.
AUTH_FAILURE_COUNT_MAX = 10
AUTH_FAILURE_WINDOW_S = 60.0
# Peers whose failures are remembered: 4,096 x ~200 B = 800 KiB at most. Past
# it the oldest entry is forgotten (an attacker with more addresses than this
# is not stopped by a per-peer limit anyway).
AUTH_FAILURE_PEER_COUNT_MAX = 4096
# Random bytes in a token made by `ringtail token new` (256 bits).
TOKEN_RANDOM_SIZE_BYTES = 32
TOKEN_PREFIX = "rt_"
TOKEN_HASH_PREFIX = "sha256:"
TOKEN_HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")

assert AUTH_FAILURE_COUNT_MAX >= 1 and AUTH_FAILURE_WINDOW_S > 0


class Role(str, enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    ADMIN = "admin"


ROLE_NAMES = tuple(role.value for role in Role)
UNIX_AUTH_CHOICES = ("socket_mode", "peercred")


class AuthError(Exception):
    """Credentials refused: unknown, expired, or rate limited. Wire code AUTH_FAILED."""


class ForbiddenError(Exception):
    """Valid credentials that lack the role for the request. Wire code FORBIDDEN."""


# -- tokens ---------------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: `rt_` + 43 URL-safe base64 characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_SIZE_BYTES)


def hash_token(token: str | bytes) -> str:
    """The form stored in the config: `sha256:<64 lowercase hex>`."""
    if isinstance(token, str):
        token = token.encode()
    return TOKEN_HASH_PREFIX + hashlib.sha256(token).hexdigest()


# -- credentials and grants -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """What the daemon knows of a connection before its Hello is checked."""

    transport: str  # "unix" | "tcp"
    uid: int | None = None  # Unix socket only (SO_PEERCRED)
    gid: int | None = None
    address: str = ""  # TCP: the IP address

    @property
    def limiter_key(self) -> str:
        return f"uid {self.uid}" if self.transport == "unix" else f"address {self.address}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix stream socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """Roles for one credential: exactly one of uid, gid, token_hash is set."""

    roles: frozenset[str]
    uid: int | None = None
    gid: int | None = None
    token_hash: str | None = None
    expires: datetime.datetime | None = None  # aware, UTC; tokens only

    def matches_peer(self, peer: Peer) -> bool:
        if peer.transport != "unix":
            return False  # uid/gid grants are for the Unix socket only
        return ((self.uid is not None and self.uid == peer.uid)
                or (self.gid is not None and self.gid == peer.gid))


def expand_roles(roles: frozenset[str]) -> frozenset[str]:
    if Role.ADMIN.value in roles:
        return frozenset(ROLE_NAMES)
    return roles


@dataclasses.dataclass(frozen=True, slots=True)
class Access:
    """The outcome of a Hello: roles on the tenant, and which credential matched."""

    roles: frozenset[str]
    credential: str  # for logs: "uid 1000", "token sha256:ab12...", "socket mode"
    # The soonest expiry of the grants that matched (None: none expires). At
    # that time a connection admitted with these credentials is checked again
    # and ended if they no longer hold (service/gate.py, `watch_expiry`).
    expires: datetime.datetime | None = None

    def allows(self, role: Role) -> bool:
        return role.value in self.roles


OPEN_ACCESS = Access(frozenset(ROLE_NAMES), "socket mode")


class AccessPolicy:
    """Every grant of one config, checked in constant time per token.

    Immutable: a reload builds a new policy and swaps it in.
    """

    def __init__(self, unix_auth: str, tenant_grants: dict[int, tuple[Grant, ...]],
                 admins: tuple[Grant, ...]):
        assert unix_auth in UNIX_AUTH_CHOICES
        self.unix_auth = unix_auth
        self.tenant_grants = tenant_grants
        self.admins = admins

    def check(self, peer: Peer, token: bytes, tenant_id: int,
              now: datetime.datetime) -> Access:
        """The roles `peer` (with `token`) has on `tenant_id`.

        Raises:
            AuthError: no credential is valid (unknown or expired token, peer
                uid/gid in no list).
            ForbiddenError: the credentials are valid, but grant nothing on
                this tenant.
        """
        if peer.transport == "unix" and self.unix_auth == "socket_mode":
            return OPEN_ACCESS  # the socket file's mode is the access control
        presented = hash_token(token) if token else None
        roles: set[str] = set()
        credentials: list[str] = []
        known = False
        expired: Grant | None = None
        soonest: datetime.datetime | None = None  # of the grants that matched
        for tenant, grants in self._scopes():
            for grant in grants:
                matched = self._matches(grant, peer, presented)
                if not matched:
                    continue
                if grant.expires is not None and grant.expires <= now:
                    expired = grant
                    continue
                known = True
                if grant.expires is not None and (soonest is None or grant.expires < soonest):
                    soonest = grant.expires
                if tenant is None or tenant == tenant_id:
                    roles |= (expand_roles(grant.roles) if tenant is not None
                              else frozenset(ROLE_NAMES))
                    credentials.append(describe(grant, admin=tenant is None))
        if not known:
            if expired is not None:
                raise AuthError(f"the token expired at {expired.expires.isoformat()}; "
                                "ask the operator for a new one (`ringtail token new`)")
            if token:
                raise AuthError("the token is not valid on this daemon (unknown, rotated or "
                                "mistyped); check the token and the daemon's config")
            if peer.transport != "unix":  # no uid/gid over TCP: only a token can match
                raise AuthError(f"a token is required on TCP (peer {peer.address or 'unknown'} "
                                "sent none); pass --token or set RINGTAIL_TOKEN (make one "
                                "with `ringtail token new`)")
            raise AuthError(f"peer uid {peer.uid} gid {peer.gid} is in no allow-list of this "
                            "daemon's config; add it to a tenant's grants or connect with a "
                            "token")
        if not roles:
            raise ForbiddenError(f"these credentials grant nothing on tenant {tenant_id}; "
                                 "use the tenant's own credentials or an admin's")
        return Access(frozenset(roles), ", ".join(credentials), soonest)

    def _scopes(self):
        yield None, self.admins
        yield from self.tenant_grants.items()

    def _matches(self, grant: Grant, peer: Peer, presented: str | None) -> bool:
        if grant.token_hash is not None:
            # Every token grant is compared (the loop never stops at a match),
            # so the time taken does not tell which hash matched.
            return presented is not None and hmac.compare_digest(
                grant.token_hash.encode(), presented.encode())
        return self.unix_auth == "peercred" and grant.matches_peer(peer)


def describe(grant: Grant, admin: bool = False) -> str:
    if grant.token_hash is not None:
        text = f"token {grant.token_hash[:19]}..."
    elif grant.uid is not None:
        text = f"uid {grant.uid}"
    else:
        text = f"gid {grant.gid}"
    return ("admin " if admin else "") + text


# -- failure rate limit ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AuthStatistics:
    failures: int
    refused_rate_limited: int
    peers_tracked: int


class AuthFailureLimiter:
    """Per-peer count of failed authentications in a fixed window.

    Resource handling: at most AUTH_FAILURE_PEER_COUNT_MAX peers are kept
    (oldest first out). Times are seconds on any monotonic clock the caller
    uses consistently.
    """

    def __init__(self, count_max: int = AUTH_FAILURE_COUNT_MAX,
                 window_s: float = AUTH_FAILURE_WINDOW_S,
                 peer_count_max: int = AUTH_FAILURE_PEER_COUNT_MAX):
        self.count_max = count_max
        self.window_s = window_s
        self.peer_count_max = peer_count_max
        self._windows: collections.OrderedDict[str, list] = collections.OrderedDict()
        self._failures = 0
        self._refused = 0

    def retry_after_s(self, key: str, now: float) -> float | None:
        """Seconds until `key` may try again, or None if it may try now."""
        window = self._windows.get(key)
        if window is None:
            return None
        start, count = window
        if now - start >= self.window_s:
            del self._windows[key]
            return None
        if count >= self.count_max:
            self._refused += 1
            return start + self.window_s - now
        return None

    def record_failure(self, key: str, now: float) -> None:
        self._failures += 1
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            self._windows[key] = [now, 1]
        else:
            window[1] += 1
        self._windows.move_to_end(key)
        while len(self._windows) > self.peer_count_max:
            self._windows.popitem(last=False)

    def statistics(self) -> AuthStatistics:
        return AuthStatistics(self._failures, self._refused, len(self._windows))
