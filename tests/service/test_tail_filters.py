"""`ringtail tail --opcode/--epochs/--failure-only/--since` against a real daemon,
over the Unix socket and over --connect (TCP, token, plaintext on loopback).

Each filter's output is checked against the same filter applied here, in
Python, to what was published.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
from ringtail.ioring.record import SlotRecord
from ringtail.service.auth import hash_token, new_token

from tests.service.conftest import (DaemonProcess, RecordFactory, run_cli, short_socket_dir,
                                    tcp_port, write_config)

TENANT = 31
TOKEN = new_token()


def tail_json(where: list[str], *filters: str) -> list[dict]:
    """`ringtail tail --format json` in this process (run_cli: cli.main, as the console
    script runs it); the records it printed."""
    result = run_cli("tail", "--format", "json", "--tenant", str(TENANT), *where, *filters)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A daemon with a TCP listener and 600 varied records in TENANT; (where-lists, records).

    One for the module: every test here only reads TENANT (non-follow tails)."""
    tmp_path = tmp_path_factory.mktemp("tail-filters")
    config = write_config(tmp_path, f"""
        tcp_listen = "127.0.0.1:0"
        tcp_plaintext = true
        [tenants.{TENANT}]
        grants = [{{ token = "{hash_token(TOKEN)}", roles = ["publish", "subscribe"] }}]
        """)
    server = DaemonProcess(os.fspath(tmp_path / "data"),
                           os.path.join(short_socket_dir(tmp_path), "filters.sock"),
                           {"config": config, "io": "threads"}, cwd=os.fspath(tmp_path))
    try:
        server.start()
        factory = RecordFactory(TENANT, seed=11)
        records = [factory.slot_record() for _ in range(600)]
        result = run_cli("publish", "--raw", "--tenant", str(TENANT), "--socket",
                         server.socket_path, input=b"".join(r.encode() for r in records))
        assert result.returncode == 0, result.stderr.decode()
        local = ["--socket", server.socket_path]
        remote = ["--connect", f"127.0.0.1:{tcp_port(server)}", "--token", TOKEN, "--plaintext"]
        yield {"socket": local, "connect": remote}, records
    finally:
        server.close()


def expected(records: list[SlotRecord], keep) -> list[int]:
    return [sequence for sequence, record in enumerate(records) if keep(record)]


@pytest.mark.parametrize("via", ["socket", "connect"])
def test_each_filter_returns_exactly_the_matching_records(published, via):
    where, records = published
    where = where[via]
    got = tail_json(where, "--opcode", "3,7")
    assert [r["sequence"] for r in got] == expected(records, lambda r: r.opcode in (3, 7))
    assert got  # the seed makes some
    got = tail_json(where, "--epochs", "2..4")
    assert [r["sequence"] for r in got] == expected(records, lambda r: 2 <= r.epoch <= 4)
    got = tail_json(where, "--failure-only")
    assert [r["sequence"] for r in got] == expected(records, lambda r: r.has_failure_evidence)
    assert 0 < len(got) < len(records)
    got = tail_json(where, "--opcode", "1,2,3", "--epochs", "5..", "--failure-only")
    assert [r["sequence"] for r in got] == expected(
        records, lambda r: r.opcode in (1, 2, 3) and r.epoch >= 5 and r.has_failure_evidence)


@pytest.mark.parametrize("via", ["socket", "connect"])
def test_since_starts_at_the_first_record_at_or_after_the_time(published, via):
    where, records = published
    where = where[via]
    since_ns = records[400].timestamp_ns
    got = tail_json(where, "--since", str(since_ns))
    assert [r["sequence"] for r in got] == list(range(400, 600))
    # ISO 8601 (microseconds): the first record at or after that instant.
    moment = datetime.datetime.fromtimestamp(records[250].timestamp_ns // 1000 / 1e6,
                                             tz=datetime.UTC)
    iso_ns = records[250].timestamp_ns // 1000 * 1000
    first = next(i for i, r in enumerate(records) if r.timestamp_ns >= iso_ns)
    got = tail_json(where, "--since", moment.isoformat().replace("+00:00", "Z"),
                    "--opcode", "5")
    assert [r["sequence"] for r in got] == [
        i for i in range(first, 600) if records[i].opcode == 5]


@pytest.mark.parametrize("argv, message", [
    (["--opcode", "x"], "--opcode 'x': use comma-separated opcode numbers"),
    (["--opcode", ",".join(map(str, range(65)))], "more than the protocol's "
                                                  "SUBSCRIBE_OPCODE_COUNT_MAX (64)"),
    (["--epochs", "5..2"], "X must not exceed Y"),
    (["--since", "yesterday"], "--since 'yesterday': use an ISO 8601 time"),
    (["--since", "100", "--from", "3"], "--since and --from both say where to start"),
])
def test_bad_filters_are_usage_errors(tmp_path, argv, message):
    result = run_cli("tail", "--tenant", "1", "--socket", str(tmp_path / "none.sock"), *argv)
    assert result.returncode == 2
    assert message in result.stderr.decode()
