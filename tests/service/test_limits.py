"""service/limits.py: the cross-module limits relate, and the memory bound adds up."""

from __future__ import annotations

import subprocess

import pytest

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service import limits
from ringtail.service.batcher import PENDING_RECORD_COUNT_MAX
from ringtail.service.config import ConfigError, load_config
from ringtail.service.connection import CONNECTION_UNACKED_SIZE_BYTES_MAX
from ringtail.service.gate import (CONNECTION_COUNT_MAX, CONNECTION_LIMIT_CEILINGS,
                                   ConnectionLimits)
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX
from ringtail.service.tenants import TENANT_COUNT_MAX

from .conftest import RINGTAIL, write_config

UNANSWERED = "publish records unanswered, or a replay read"


def test_the_worst_case_memory_is_the_sum_of_its_terms_at_their_limits():
    terms = {term.name: term for term in limits.worst_case_memory(65_536)}
    assert terms["connection receive buffer"].total_bytes == \
        CONNECTION_COUNT_MAX * RECEIVE_BUFFER_BYTES_MAX
    # Bounded in bytes: the unanswered records plus the one batch parsed and
    # waiting for room (no longer CONNECTION_UNACKED_BATCH_COUNT_MAX full batches).
    assert terms[UNANSWERED].size_bytes == \
        CONNECTION_UNACKED_SIZE_BYTES_MAX + PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
    assert terms[UNANSWERED].count == CONNECTION_COUNT_MAX
    assert terms["records waiting for a tenant's writer"].total_bytes == \
        TENANT_COUNT_MAX * PENDING_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
    assert terms["chunk-table mirror per ring"].total_bytes == TENANT_COUNT_MAX * 65_536
    total = sum(term.total_bytes for term in terms.values())
    assert total == limits.memory_bound_bytes(CONNECTION_COUNT_MAX, TENANT_COUNT_MAX, 65_536)
    text = limits.describe_limits(65_536)
    assert "total" in text and f"{total / (1 << 20):,.1f} MiB" in text
    for term in terms.values():
        assert term.formula in text


def test_a_larger_ring_capacity_raises_only_the_table_term():
    small = {t.name: t.total_bytes for t in limits.worst_case_memory(65_536)}
    large = {t.name: t.total_bytes for t in limits.worst_case_memory(1 << 20)}
    assert {name for name in small if small[name] != large[name]} == \
        {"chunk-table mirror per ring"}


def test_lowered_connection_limits_lower_the_connection_terms():
    lowered = ConnectionLimits(unix_connections_max=64, tcp_connections_max=16)
    terms = {t.name: t for t in limits.worst_case_memory(65_536, lowered)}
    assert terms["connection receive buffer"].count == 80
    assert terms[UNANSWERED].count == 80


def test_serve_limits_prints_every_connection_limit_as_configured(tmp_path):
    config = write_config(tmp_path, """
        tcp_connections_max = 16
        idle_timeout_s = 60
    """)
    result = subprocess.run([RINGTAIL, "serve", "--limits", "--config", config],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    for key in CONNECTION_LIMIT_CEILINGS:
        assert any(line.split()[:1] == [key] for line in lines), key
    assert any(line.split()[:2] == ["tcp_connections_max", "16"] for line in lines)
    assert any(line.split()[:2] == ["idle_timeout_s", "60"] for line in lines)
    bound = limits.memory_bound_bytes(1024 + 16, TENANT_COUNT_MAX, 65_536)
    assert f"{bound / (1 << 20):,.1f} MiB" in result.stdout


def test_the_daemon_returns_freed_batches_to_the_system():
    assert limits.return_freed_buffers_promptly()  # glibc here: mallopt exists and took it


def test_a_config_may_lower_a_connection_limit_never_raise_it(tmp_path):
    lowered = load_config(write_config(tmp_path, "unix_connections_max = 64\nidle_timeout_s = 30\n"))
    assert lowered.connection_limits == ConnectionLimits(unix_connections_max=64,
                                                         idle_timeout_s=30.0)
    for text, message in (("unix_connections_max = 5000", "unix_connections_max = 5000; use 1 "
                           "to 1024 (UNIX_CONNECTION_COUNT_MAX; a config may lower a limit, "
                           "never raise it)"),
                          ("idle_timeout_s = 0", "idle_timeout_s = 0.0; use 0.001 to 300.0"),
                          ("peer_unauthenticated_max = true", "must be int, got bool")):
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(tmp_path, text + "\n"))
        assert message in str(caught.value)
