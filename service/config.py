"""Daemon settings: the embedded default, overridden by a TOML file, then flags.

Example (every key optional; see deploy/ringtail.example.toml)::

    data_dir = "/var/lib/ringtail"
    socket = "/run/ringtail/ringtail.sock"
    socket_mode = "0600"
    sync = "batch"          # batch | none
    io = "auto"             # auto | uring | threads
    capacity = 1048576      # records per tenant ring created on first use
    create_tenants = true   # false: only the tenants listed below are served

    [tenants.7]
    capacity = 65536
    sync = "none"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib

from ioring import IO_CHOICES, SYNC_CHOICES
from ioring.format import capacity_problem
from service.tenants import TENANT_ID_MAX, TenantSettings

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
    tenants: dict[int, TenantSettings] = dataclasses.field(default_factory=dict)

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
        return self

    @property
    def default_tenant(self) -> TenantSettings:
        return TenantSettings(self.capacity, self.sync)


_TOP_KEYS = {"data_dir": str, "socket": str, "socket_mode": str, "sync": str, "io": str,
             "capacity": int, "create_tenants": bool, "tenants": dict}
_TENANT_KEYS = {"capacity": int, "sync": str}


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
    values = {key: document[key] for key in _TOP_KEYS if key in document and key != "tenants"}
    if "socket_mode" in values:
        try:
            values["socket_mode"] = int(values["socket_mode"], 8)
        except ValueError:
            raise ConfigError(f"{path}: socket_mode = {values['socket_mode']!r}; "
                              "write an octal mode such as \"0660\"") from None
    base = base or ServeConfig()
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
        settings = TenantSettings(table.get("capacity", config.capacity),
                                  table.get("sync", config.sync))
        problem = capacity_problem(settings.capacity)
        if problem:
            raise ConfigError(f"{path}: {where}.capacity: {problem}")
        if settings.sync not in SYNC_CHOICES:
            raise ConfigError(f"{path}: {where}.sync = {settings.sync!r}; use one of {SYNC_CHOICES}")
        tenants[int(key)] = settings
    return dataclasses.replace(config, tenants=tenants).validate(path)


def _check_keys(path: str, prefix: str, table: dict, allowed: dict) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {prefix}{key}; known keys: "
                              f"{', '.join(sorted(allowed))}")
        if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {prefix}{key} must be {allowed[key].__name__}, "
                              f"got {type(value).__name__} {value!r}")


def resolve_paths(config: ServeConfig) -> ServeConfig:
    return dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir),
                               socket=os.path.abspath(config.socket))
