"""Daemon settings: the embedded default, overridden by a TOML file, then flags.

Example (every key optional; see deploy/ringtail.example.toml)::

    data_dir = "/var/lib/ringtail"
    socket = "/run/ringtail/ringtail.sock"
    socket_mode = "0600"
    sync = "batch"          # batch | none
    io = "auto"             # auto | uring | threads
    capacity = 1048576      # records per tenant ring created on first use
    create_tenants = true   # false: only the tenants listed below are served
    http_listen = "127.0.0.1:9464"  # HTTP: web page, /metrics, /healthz, /readyz; "": off

    unix_auth = "peercred"  # socket_mode | peercred
    admins = [{ uid = 0 }]
    tcp_listen = "0.0.0.0:7400"
    tls_cert = "/etc/ringtail/server.pem"
    tls_key = "/etc/ringtail/server.key"

    unix_connections_max = 1024      # connection limits (docs/OPERATIONS.md, "Sizing"):
    tcp_connections_max = 256        #   each may be lowered, never raised
    peer_unauthenticated_max = 128
    peer_tenant_creations_max = 256
    idle_timeout_s = 300.0

    [tenants.7]
    name = "trainer"
    capacity = 65536
    sync = "none"
    grants = [
      { uid = 1001, roles = ["publish"] },
      { token = "sha256:<64 hex>", roles = ["subscribe"], expires = 2027-01-01T00:00:00Z },
    ]
    records_per_second = 50000
    quota_mode = "slow"     # slow | reject
    connections_max = 64
    subscribers_max = 16

docs/OPERATIONS.md ("Tenants and access", "TLS", "Quotas", "Reload") explains each.
"""

from __future__ import annotations

import dataclasses
import datetime
import grp
import ipaddress
import os
import ssl
import socket
import tomllib

from ringtail.ioring import IO_CHOICES, SYNC_CHOICES
from ringtail.ioring.format import capacity_problem
from ringtail.service.auth import (ROLE_NAMES, TOKEN_HASH_PATTERN, TOKEN_PREFIX, UNIX_AUTH_CHOICES,
                                   AccessPolicy, Grant)
from ringtail.service.gate import (CONNECTION_IDLE_TIMEOUT_S, CONNECTION_LIMIT_CEILINGS,
                                   PEER_TENANT_CREATION_COUNT_MAX, PEER_UNAUTHENTICATED_COUNT_MAX,
                                   TCP_CONNECTION_COUNT_MAX, UNIX_CONNECTION_COUNT_MAX,
                                   ConnectionLimits)
from ringtail.service.quotas import (QUOTA_MODES, RECORDS_PER_SECOND_MAX, TENANT_CONNECTION_COUNT_MAX,
                                     TENANT_SUBSCRIBER_COUNT_MAX, QuotaSettings)
from ringtail.service.ship_process import ShipConfigError, ShipSettings, ship_settings
from ringtail.service.tenants import TENANT_ID_MAX, TenantSettings

DEFAULT_DATA_DIR = "ringtail-data"
DEFAULT_SOCKET = "ringtail.sock"
# 65,536 records x 64 B = 4 MiB per tenant created on first use.
DEFAULT_CAPACITY_RECORD_COUNT = 65_536


class ConfigError(Exception):
    """A setting is invalid; the message names the file, the key and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    data_dir: str = DEFAULT_DATA_DIR
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o600
    sync: str = "batch"
    io: str = "auto"
    capacity: int = DEFAULT_CAPACITY_RECORD_COUNT
    create_tenants: bool = True
    # Group (name or number) the socket file is given; "": the daemon's own.
    socket_group: str = ""
    # "socket_mode": any local peer that can open the socket may do anything
    # (the embedded default); "peercred": its uid/gid must be granted.
    unix_auth: str = "socket_mode"
    admins: tuple[Grant, ...] = ()  # publish and subscribe on every tenant
    tcp_listen: str = ""  # "HOST:PORT"; "": no TCP listener
    tcp_plaintext: bool = False  # TCP without TLS: loopback addresses only
    tls_cert: str = ""  # PEM certificate chain
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # set: clients must present a certificate it signed (mTLS)
    tenants: dict[int, TenantSettings] = dataclasses.field(default_factory=dict)
    # "HOST:PORT" of the HTTP listener (/metrics, /healthz, /readyz and the web
    # page, service/http.py); "" (the embedded default): no listener, nothing
    # listens on TCP unless asked. metrics_listen is its older name (an alias).
    http_listen: str = ""
    metrics_listen: str = ""
    # The [ship] table: `ringtail ship` run by the daemon as a child process
    # (service/ship_process.py); None (the embedded default): no shipping.
    ship: ShipSettings | None = None
    # Connection limits (service/gate.py, where each constant says why): a
    # config may lower each, never raise it.
    unix_connections_max: int = UNIX_CONNECTION_COUNT_MAX
    tcp_connections_max: int = TCP_CONNECTION_COUNT_MAX
    peer_unauthenticated_max: int = PEER_UNAUTHENTICATED_COUNT_MAX
    peer_tenant_creations_max: int = PEER_TENANT_CREATION_COUNT_MAX
    idle_timeout_s: float = CONNECTION_IDLE_TIMEOUT_S

    @property
    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(**{key: getattr(self, key) for key in CONNECTION_LIMIT_CEILINGS})

    @property
    def http_address(self) -> str:
        """The HTTP listener's "HOST:PORT" (http_listen, else metrics_listen), or ""."""
        return self.http_listen or self.metrics_listen

    def validate(self, source: str = "command line") -> "ServeConfig":
        if self.sync not in SYNC_CHOICES:
            raise ConfigError(f"{source}: sync = {self.sync!r}; use one of {SYNC_CHOICES}")
        if self.io not in IO_CHOICES:
            raise ConfigError(f"{source}: io = {self.io!r}; use one of {IO_CHOICES}")
        problem = capacity_problem(self.capacity)
        if problem:
            raise ConfigError(f"{source}: capacity: {problem}")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"{source}: socket_mode {self.socket_mode:o} is not a file mode")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, f"{source}: metrics_listen")
        if self.http_listen:
            parse_host_port(self.http_listen, f"{source}: http_listen")
            if self.metrics_listen and self.metrics_listen != self.http_listen:
                raise ConfigError(f"{source}: http_listen = {self.http_listen!r} and its alias "
                                  f"metrics_listen = {self.metrics_listen!r} differ; set one")
        self._validate_access(source)
        self._validate_tcp(source)
        problem = self.connection_limits.problem()
        if problem:
            raise ConfigError(f"{source}: {problem}")
        return self

    def _validate_access(self, source: str) -> None:
        if self.socket_group:
            socket_group_id(self.socket_group, source)
        if self.unix_auth not in UNIX_AUTH_CHOICES:
            raise ConfigError(f"{source}: unix_auth = {self.unix_auth!r}; use one of "
                              f"{UNIX_AUTH_CHOICES}")
        if self.unix_auth == "socket_mode":
            for where, grants in [("admins", self.admins)] + [
                    (f"tenants.{key}.grants", t.grants) for key, t in self.tenants.items()]:
                for index, grant in enumerate(grants):
                    if grant.token_hash is None:
                        raise ConfigError(
                            f"{source}: {where}[{index}] grants a uid/gid, which only "
                            "unix_auth = \"peercred\" checks; set unix_auth = \"peercred\" "
                            "(or remove the grant)")

    def _validate_tcp(self, source: str) -> None:
        if not self.tcp_listen:
            for key in ("tls_cert", "tls_key", "tls_client_ca"):
                if getattr(self, key):
                    raise ConfigError(f"{source}: {key} is set but tcp_listen is not; "
                                      "set tcp_listen = \"HOST:PORT\" or remove it")
            return
        host, _ = parse_host_port(self.tcp_listen, f"{source}: tcp_listen")
        if self.tcp_plaintext:
            if not is_loopback(host):
                raise ConfigError(
                    f"{source}: tcp_plaintext = true with tcp_listen = {self.tcp_listen!r}: "
                    "plain TCP is allowed only on a loopback address (127.0.0.1, ::1, "
                    "localhost); listen on loopback or use TLS (tls_cert, tls_key)")
            if self.tls_cert or self.tls_key or self.tls_client_ca:
                raise ConfigError(f"{source}: tcp_plaintext = true with TLS files set; "
                                  "remove tcp_plaintext to use TLS")
            return
        for key in ("tls_cert", "tls_key"):
            if not getattr(self, key):
                raise ConfigError(f"{source}: tcp_listen is set, so TCP uses TLS and {key} is "
                                  "required (a PEM file); or set tcp_plaintext = true on a "
                                  "loopback address")
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{source}: {key} = {path!r}: no such file")

    def access_policy(self) -> AccessPolicy:
        return AccessPolicy(self.unix_auth,
                            {key: tenant.grants for key, tenant in self.tenants.items()},
                            self.admins)

    def tenant_quota(self, tenant_id: int) -> QuotaSettings:
        tenant = self.tenants.get(tenant_id)
        return tenant.quota if tenant is not None else QuotaSettings()

    @property
    def default_tenant(self) -> TenantSettings:
        return TenantSettings(self.capacity, self.sync)


_TOP_KEYS = {"data_dir": str, "socket": str, "socket_mode": str, "sync": str, "io": str,
             "capacity": int, "create_tenants": bool, "tenants": dict,
             "metrics_listen": str, "http_listen": str,
             "socket_group": str, "unix_auth": str, "admins": list, "tcp_listen": str,
             "tcp_plaintext": bool, "tls_cert": str, "tls_key": str, "tls_client_ca": str, "ship": dict,
             "unix_connections_max": int, "tcp_connections_max": int,
             "peer_unauthenticated_max": int, "peer_tenant_creations_max": int,
             "idle_timeout_s": (int, float)}
_TENANT_KEYS = {"capacity": int, "sync": str, "name": str, "grants": list,
                "records_per_second": int, "burst_records": int, "quota_mode": str,
                "connections_max": int, "subscribers_max": int}
_GRANT_KEYS = {"uid": int, "gid": int, "token": str, "roles": list,
               "expires": datetime.datetime}
_SPECIAL_KEYS = {"tenants", "admins", "ship"}


def load_config(path: str, base: ServeConfig | None = None) -> ServeConfig:
    """Read a TOML config over `base` (the embedded default).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or bad value.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    _check_keys(path, "", document, _TOP_KEYS)
    values = {key: document[key] for key in _TOP_KEYS
              if key in document and key not in _SPECIAL_KEYS}
    if "socket_mode" in values:
        try:
            values["socket_mode"] = int(values["socket_mode"], 8)
        except ValueError:
            raise ConfigError(f"{path}: socket_mode = {values['socket_mode']!r}; "
                              "write an octal mode such as \"0660\"") from None
    base = base or ServeConfig()
    if "admins" in document:
        values["admins"] = tuple(_grant(path, f"admins[{index}]", table, admin=True)
                                 for index, table in enumerate(document["admins"]))
    if "idle_timeout_s" in values:
        values["idle_timeout_s"] = float(values["idle_timeout_s"])
    if "ship" in document:
        try:
            values["ship"] = ship_settings(document["ship"])
        except ShipConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    config = dataclasses.replace(base, **values)
    tenants = {}
    for key, table in document.get("tenants", {}).items():
        where = f"tenants.{key}"
        if not key.isdigit() or int(key) > TENANT_ID_MAX:
            raise ConfigError(f"{path}: [{where}]: a tenant key is its numeric id "
                              f"0..{TENANT_ID_MAX}, e.g. [tenants.7]")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        _check_keys(path, where + ".", table, _TENANT_KEYS)
        settings = TenantSettings(
            table.get("capacity", config.capacity), table.get("sync", config.sync),
            table.get("name", ""),
            tuple(_grant(path, f"{where}.grants[{index}]", grant)
                  for index, grant in enumerate(table.get("grants", []))),
            _quota(path, where, table))
        problem = capacity_problem(settings.capacity)
        if problem:
            raise ConfigError(f"{path}: {where}.capacity: {problem}")
        if settings.sync not in SYNC_CHOICES:
            raise ConfigError(f"{path}: {where}.sync = {settings.sync!r}; use one of {SYNC_CHOICES}")
        tenants[int(key)] = settings
    return dataclasses.replace(config, tenants=tenants).validate(path)


def _grant(path: str, where: str, table: object, admin: bool = False) -> Grant:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be an inline table such as "
                          "{ uid = 1000, roles = [\"publish\"] }")
    _check_keys(path, where + ".", table, _GRANT_KEYS)
    credentials = [key for key in ("uid", "gid", "token") if key in table]
    if len(credentials) != 1:
        raise ConfigError(f"{path}: {where} needs exactly one of uid, gid, token; "
                          f"got {credentials or 'none'}")
    for key in ("uid", "gid"):
        if key in table and not 0 <= table[key] <= 0xFFFF_FFFF:
            raise ConfigError(f"{path}: {where}.{key} = {table[key]} is not a {key}")
    token = table.get("token")
    if token is not None and not TOKEN_HASH_PATTERN.match(token):
        hint = ("it looks like the token itself: store only its hash, the line "
                "`ringtail token new` prints" if token.startswith(TOKEN_PREFIX)
                else "write \"sha256:\" and 64 lowercase hex digits, as `ringtail token new` "
                     "prints")
        raise ConfigError(f"{path}: {where}.token is not a token hash; {hint}")
    if admin:
        if "roles" in table:
            raise ConfigError(f"{path}: {where}.roles: an admin has every role on every "
                              "tenant; remove roles (or grant them in a tenant's grants)")
        roles = frozenset({"admin"})
    else:
        if "roles" not in table or not table["roles"]:
            raise ConfigError(f"{path}: {where}.roles is required, a list of "
                              f"{', '.join(ROLE_NAMES)}")
        unknown = [role for role in table["roles"] if role not in ROLE_NAMES]
        if unknown:
            raise ConfigError(f"{path}: {where}.roles: unknown role {unknown[0]!r}; use "
                              f"{', '.join(ROLE_NAMES)}")
        roles = frozenset(table["roles"])
    expires = table.get("expires")
    if expires is not None:
        if token is None:
            raise ConfigError(f"{path}: {where}.expires applies to tokens only")
        if expires.tzinfo is None:
            raise ConfigError(f"{path}: {where}.expires = {expires}: add a time zone, "
                              "e.g. 2027-01-01T00:00:00Z")
    return Grant(roles, table.get("uid"), table.get("gid"), token, expires)


def _quota(path: str, where: str, table: dict) -> QuotaSettings:
    quota = QuotaSettings(
        records_per_second=table.get("records_per_second", 0),
        burst_records=table.get("burst_records", 0),
        mode=table.get("quota_mode", "slow"),
        connections_max=table.get("connections_max", TENANT_CONNECTION_COUNT_MAX),
        subscribers_max=table.get("subscribers_max", TENANT_SUBSCRIBER_COUNT_MAX))
    if not 0 <= quota.records_per_second <= RECORDS_PER_SECOND_MAX:
        raise ConfigError(f"{path}: {where}.records_per_second = {quota.records_per_second}; "
                          f"use 0 (no quota) to {RECORDS_PER_SECOND_MAX}")
    if quota.burst_records < 0 or (quota.burst_records and not quota.records_per_second):
        raise ConfigError(f"{path}: {where}.burst_records = {quota.burst_records}; it needs "
                          "records_per_second and must be at least 1")
    if quota.mode not in QUOTA_MODES:
        raise ConfigError(f"{path}: {where}.quota_mode = {quota.mode!r}; use one of "
                          f"{QUOTA_MODES}")
    for key, limit in (("connections_max", TENANT_CONNECTION_COUNT_MAX),
                       ("subscribers_max", TENANT_SUBSCRIBER_COUNT_MAX)):
        value = getattr(quota, key)
        if not 1 <= value <= limit:
            raise ConfigError(f"{path}: {where}.{key} = {value}; use 1 to {limit} (a config "
                              "may lower a limit, never raise it)")
    return quota


def server_tls_context(config: ServeConfig, listener: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding the daemon's certificate (tls_cert,
    tls_key), for the TCP or the HTTP listener (named in the error).

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"tls_cert {config.tls_cert} / tls_key {config.tls_key}: cannot "
                          f"load for the {listener}: {error}; give a PEM certificate chain "
                          "and its key") from error
    return context


def parse_host_port(text: str, where: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (host, port)."""
    host, separator, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        separator = ""  # an IPv6 address needs brackets, or the port is ambiguous
    if not separator or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where} = {text!r}; write HOST:PORT, e.g. \"0.0.0.0:7400\" or "
                          "\"[::1]:7400\" (port 0 picks a free port)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def socket_group_id(group: str, source: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{source}: socket_group = {group!r}: no such group") from None


def _check_keys(path: str, prefix: str, table: dict, allowed: dict) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {prefix}{key}; known keys: "
                              f"{', '.join(sorted(allowed))}")
        kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if not isinstance(value, kinds) or (int in kinds and isinstance(value, bool)):
            names = " or ".join(kind.__name__ for kind in kinds)
            raise ConfigError(f"{path}: {prefix}{key} must be {names}, "
                              f"got {type(value).__name__} {value!r}")


def resolve_paths(config: ServeConfig) -> ServeConfig:
    files = {key: os.path.abspath(getattr(config, key))
             for key in ("tls_cert", "tls_key", "tls_client_ca") if getattr(config, key)}
    return dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir),
                               socket=os.path.abspath(config.socket), **files)
