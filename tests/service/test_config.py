"""Config loading: the embedded default, TOML overrides, and errors that name key and file."""

import pytest

from service.config import (DEFAULT_CAPACITY_RECORD_COUNT, ConfigError, ServeConfig,
                            load_config)
from service.tenants import TenantSettings


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
