"""Config loading: the embedded default, TOML overrides, and errors that name key and file."""

import pytest

from ringtail.service.config import (DEFAULT_CAPACITY_RECORD_COUNT, ConfigError, ServeConfig,
                                     load_config)
from ringtail.service.tenants import TenantSettings


def write(tmp_path, text: str) -> str:
    path = tmp_path / "ringtail.toml"
    path.write_text(text)
    return str(path)


def test_embedded_default_is_a_single_user_daemon():
    config = ServeConfig().validate()
    assert config.socket_mode == 0o600
    assert config.sync == "batch" and config.io == "auto"
    assert config.capacity == DEFAULT_CAPACITY_RECORD_COUNT
    assert config.create_tenants is True


def test_toml_overrides_the_default_and_defines_tenants(tmp_path):
    path = write(tmp_path, """
data_dir = "/var/lib/ringtail"
socket_mode = "0660"
sync = "none"
capacity = 1024
create_tenants = false
[tenants.7]
capacity = 4096
[tenants.9]
sync = "batch"
""")
    config = load_config(path)
    assert config.data_dir == "/var/lib/ringtail"
    assert config.socket_mode == 0o660
    assert config.sync == "none" and config.capacity == 1024
    assert config.create_tenants is False
    assert config.tenants == {7: TenantSettings(4096, "none"), 9: TenantSettings(1024, "batch")}


@pytest.mark.parametrize("text, message", [
    ("colour = 1", r"unknown key colour; known keys:"),
    ("capacity = \"big\"", r"capacity must be int, got str"),
    ("capacity = 200", r"capacity: capacity 200 is not a multiple of CHUNK_RECORD_COUNT"),
    ("sync = \"always\"", r"sync = 'always'; use one of"),
    ("io = \"aio\"", r"io = 'aio'; use one of"),
    ("socket_mode = \"rw\"", r"socket_mode = 'rw'; write an octal mode"),
    ("[tenants.abc]\ncapacity = 128", r"\[tenants.abc\]: a tenant key is its numeric id"),
    ("[tenants.7]\nquota = 3", r"unknown key tenants.7.quota"),
    ("[tenants.7]\ncapacity = 0", r"tenants.7.capacity: capacity 0 is below"),
    ("capacity = ", r"not valid TOML"),
])
def test_bad_config_is_refused_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config"):
        load_config(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("text, message", [
    ('unix_auth = "maybe"', r"unix_auth = 'maybe'; use one of"),
    ('[tenants.7]\ngrants = [{ uid = 5, roles = ["publish"] }]',
     r"tenants.7.grants\[0\] grants a uid/gid, which only unix_auth = \"peercred\" checks"),
    ('[tenants.7]\ngrants = [{ token = "rt_abc", roles = ["publish"] }]',
     r"tenants.7.grants\[0\].token is not a token hash; it looks like the token itself"),
    ('unix_auth = "peercred"\n[tenants.7]\ngrants = [{ uid = 5 }]',
     r"tenants.7.grants\[0\].roles is required"),
    ('unix_auth = "peercred"\n[tenants.7]\ngrants = [{ uid = 5, roles = ["write"] }]',
     r"unknown role 'write'"),
    ('unix_auth = "peercred"\n[tenants.7]\ngrants = [{ uid = 5, gid = 6, roles = ["admin"] }]',
     r"needs exactly one of uid, gid, token"),
    ('admins = [{ token = "sha256:' + "0" * 64 + '", roles = ["publish"] }]',
     r"admins\[0\].roles: an admin has every role"),
    ('[tenants.7]\nquota_mode = "drop"', r"tenants.7.quota_mode = 'drop'; use one of"),
    ('[tenants.7]\nconnections_max = 5000', r"tenants.7.connections_max = 5000; use 1 to 1024"),
    ('[tenants.7]\nburst_records = 10', r"tenants.7.burst_records = 10; it needs records_per_second"),
    ('tcp_listen = "0.0.0.0:7400"', r"tcp_listen is set, so TCP uses TLS and tls_cert is required"),
    ('tcp_listen = "10.1.2.3:7400"\ntcp_plaintext = true',
     r"plain TCP is allowed only on a loopback address"),
    ('tcp_listen = "nowhere"', r"tcp_listen = 'nowhere'; write HOST:PORT"),
    ('tls_cert = "/x.pem"', r"tls_cert is set but tcp_listen is not"),
    ('tcp_listen = "127.0.0.1:0"\ntls_cert = "/absent.pem"\ntls_key = "/absent.key"',
     r"tls_cert = '/absent.pem': no such file"),
])
def test_bad_access_settings_are_refused_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(path)


def test_grants_quotas_and_plain_loopback_tcp_load(tmp_path):
    token_hash = "sha256:" + "ab" * 32
    config = load_config(write(tmp_path, f"""
unix_auth = "peercred"
admins = [{{ gid = 10 }}]
tcp_listen = "127.0.0.1:0"
tcp_plaintext = true
[tenants.7]
name = "trainer"
grants = [{{ uid = 1001, roles = ["publish"] }},
          {{ token = "{token_hash}", roles = ["subscribe"], expires = 2030-01-01T00:00:00Z }}]
records_per_second = 500
quota_mode = "reject"
subscribers_max = 3
"""))
    tenant = config.tenants[7]
    assert tenant.name == "trainer" and tenant.quota.burst == 500
    assert tenant.quota.mode == "reject" and tenant.quota.subscribers_max == 3
    assert [g.uid for g in tenant.grants] == [1001, None]
    assert tenant.grants[1].token_hash == token_hash
    assert config.admins[0].gid == 10 and config.admins[0].roles == {"admin"}
