"""`ringtail diff` (docs/REPLAY.md): two runs built here, compared through every
source type on both sides (tenant:T through a real daemon, the daemon's ring
file read directly while it runs, a VRRL0001 file, a snapshot file).

Run A publishes epochs 0..9, slots 0..999 each, in slot order. Run B does the
same work with the records shuffled inside each epoch, other timestamps and
another tenant id: identical to A. Run C is B with one output_digest changed
(epoch 6, slot 789) and one record missing (epoch 8, slot 5).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess

import numpy
import pytest
import trio
from ringtail.ioring.record import RECORD_DTYPE, SlotRecord, output_digest
from ringtail.ioring.snapshot import SnapshotHeader, write_snapshot
from ringtail.ioring.vrrl import export_vrrl
from ringtail.service.diff import (
    DiffSourceError,
    EpochGrouper,
    arrays_from_bytes,
    compare_epoch,
    diff_streams,
    make_options,
)

from tests.service.conftest import RINGTAIL, DaemonProcess, run_cli, short_socket_dir

COMMAND_TIMEOUT_S = 120
EPOCH_COUNT, SLOT_COUNT = 10, 1000
TENANT_A, TENANT_B, TENANT_C = 1, 2, 3
SOURCE_KINDS = ("tenant", "ring", "vrrl", "snapshot")


def ringtail(*args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """`ringtail` as its own process, through the console script."""
    return subprocess.run([RINGTAIL, *args], input=input, capture_output=True,
                          timeout=COMMAND_TIMEOUT_S)


def work(epoch: int, slot: int, tenant_id: int, timestamp_ns: int, **changes) -> SlotRecord:
    """The record one unit of work leaves: a function of (epoch, slot) only, but for
    the timestamp and the tenant."""
    fields = dict(timestamp_ns=timestamp_ns, slot_idx=slot, tenant_id=tenant_id,
                  opcode=(slot * 7 + epoch) % 16, args=(epoch, slot, epoch * slot, 1),
                  epoch=epoch, slot_status=slot % 3, failure_class=slot % 5,
                  backend_code=slot % 11, output_digest=output_digest(f"{epoch}:{slot}".encode()))
    fields.update(changes)
    return SlotRecord(**fields)


def run_records(tenant_id: int, shuffle_seed: int | None, timestamp_start_ns: int,
                changed: dict[tuple[int, int], dict] | None = None,
                missing: set[tuple[int, int]] = frozenset()) -> bytes:
    rng = random.Random(shuffle_seed)
    out, timestamp = [], timestamp_start_ns
    for epoch in range(EPOCH_COUNT):
        slots = list(range(SLOT_COUNT))
        if shuffle_seed is not None:
            rng.shuffle(slots)
        for slot in slots:
            if (epoch, slot) in missing:
                continue
            timestamp += 1000
            out.append(work(epoch, slot, tenant_id, timestamp,
                            **(changed or {}).get((epoch, slot), {})).encode())
    return b"".join(out)


CHANGED_DIGEST = 0x0123456789ABCDEF


@pytest.fixture(scope="module")
def runs():
    a = run_records(TENANT_A, None, 1_700_000_000_000_000_000)
    b = run_records(TENANT_B, 5, 1_800_000_000_000_000_000)
    c = run_records(TENANT_C, 6, 1_900_000_000_000_000_000,
                    changed={(6, 789): {"output_digest": CHANGED_DIGEST}}, missing={(8, 5)})
    return {"a": (TENANT_A, a), "b": (TENANT_B, b), "c": (TENANT_C, c)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, runs):
    """{(run, kind): source argument} for runs a, b, c and every source kind.

    One daemon and one set of files for the module: every test here only reads
    them (a diff opens the ring files O_RDONLY and replays tenants without follow).
    """
    tmp_path = tmp_path_factory.mktemp("diff-sources")
    server = DaemonProcess(os.fspath(tmp_path / "data"),
                           os.path.join(short_socket_dir(tmp_path), "diff.sock"),
                           {"io": "threads"}, cwd=os.fspath(tmp_path))
    try:
        server.start()
        yield build_sources(server, tmp_path, runs)
    finally:
        server.close()


def build_sources(server: DaemonProcess, tmp_path, runs) -> dict:
    result = {}
    for name, (tenant_id, data) in runs.items():
        published = run_cli("publish", "--raw", "--tenant", str(tenant_id), "--socket",
                            server.socket_path, input=data)
        assert published.returncode == 0, published.stderr.decode()
        records = [data[i:i + 64] for i in range(0, len(data), 64)]
        vrrl = os.fspath(tmp_path / f"{name}.vrrl")
        export_vrrl(records, vrrl, len(records))
        snapshot = os.fspath(tmp_path / f"{name}.snap")
        write_snapshot(snapshot, SnapshotHeader(tenant_id, 0, len(records), 1, "test"), [data])
        result[name, "tenant"] = f"tenant:{tenant_id}"
        result[name, "ring"] = os.path.join(server.data_dir, f"tenant-{tenant_id}.ring")
        result[name, "vrrl"] = vrrl
        result[name, "snapshot"] = snapshot
    result["socket"] = server.socket_path
    return result


def diff(sources, a: str, b: str, *options: str, process: bool = False
         ) -> subprocess.CompletedProcess:
    """`ringtail diff A B`, in this process (run_cli) unless `process`."""
    run = ringtail if process else run_cli
    return run("diff", a, b, "--socket", sources["socket"], *options)


def test_same_work_shuffled_with_other_timestamps_is_identical_for_every_pair_of_sources(
        sources):
    for kind_a, kind_b in itertools.product(SOURCE_KINDS, SOURCE_KINDS):
        result = diff(sources, sources["a", kind_a], sources["b", kind_b])
        assert result.returncode == 0, (kind_a, kind_b, result.stdout, result.stderr)
        assert result.stdout.decode().splitlines()[-1] == (
            "identical: 10 epochs compared: 10 identical, 0 divergent; 10000 records in A, "
            "10000 in B; 0 only in A, 0 only in B")


def test_a_changed_digest_and_a_missing_slot_are_named_for_every_source_kind(sources):
    digest = f"{output_digest(b'6:789'):016x}"
    for index, (kind_a, kind_b) in enumerate(zip(SOURCE_KINDS,
                                                 SOURCE_KINDS[1:] + SOURCE_KINDS[:1])):
        # The first pair through the console script: exit status 1 from a real process.
        result = diff(sources, sources["a", kind_a], sources["c", kind_b], process=index == 0)
        assert result.returncode == 1, (kind_a, kind_b, result.stderr)
        lines = result.stdout.decode().splitlines()
        assert lines == [
            "epoch 6: divergent: 1 slots differ, 0 records only in A, 0 only in B "
            "(A 1000 records, B 1000)",
            f"  slot 789: output_digest: A {digest}, B 0123456789abcdef",
            "divergent: 10 epochs compared: 8 identical, 2 divergent; 10000 records in A, "
            "9999 in B; 1 only in A, 0 only in B"], (kind_a, kind_b)
        # The other way round, every divergent epoch, as JSON.
        result = diff(sources, sources["c", kind_b], sources["a", kind_a], "--all", "--json")
        assert result.returncode == 1
        report = json.loads(result.stdout)
        assert [epoch["epoch"] for epoch in report["divergent_epochs"]] == [6, 8]
        six, eight = report["divergent_epochs"]
        assert six["slots"] == [{"slot_idx": 789, "occurrence": 0, "kind": "fields", "fields": [
            {"field": "output_digest", "a": "0123456789abcdef", "b": digest}]}]
        assert eight["slots"] == [{"slot_idx": 5, "occurrence": 0, "kind": "only_b"}]
        assert report["summary"] | {"first_divergent_epoch": 6} == report["summary"]
        assert report["summary"]["only_in_b"] == 1


def test_strict_order_reports_the_reorder_and_options_narrow_the_diff(sources):
    # Same order, other timestamps: identical even in strict order.
    a_again = sources["a", "snapshot"]
    result = diff(sources, sources["a", "tenant"], a_again, "--strict-order")
    assert result.returncode == 0, result.stdout
    result = diff(sources, sources["a", "ring"], sources["b", "vrrl"], "--strict-order")
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("epoch 0: divergent: 0 slots differ, 0 records only in A")
    assert lines[1].startswith("  order differs at position 0 of the epoch's matched records: "
                               "A has slot 0, B has slot ")
    # Asked for, the timestamps differ everywhere.
    result = diff(sources, sources["a", "vrrl"], sources["b", "snapshot"], "--include",
                  "timestamp_ns", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["summary"]["epochs_divergent"] == 10
    # --ignore and --epochs leave nothing that differs.
    result = diff(sources, sources["a", "snapshot"], sources["c", "ring"],
                  "--ignore", "output_digest", "--epochs", "0..7")
    assert result.returncode == 0, result.stdout
    assert b"8 epochs compared: 8 identical" in result.stdout


def test_an_epoch_past_the_limit_is_an_error_naming_it_and_the_option(sources):
    result = diff(sources, sources["a", "vrrl"], sources["b", "tenant"],
                  "--epoch-record-max", "999")
    assert result.returncode == 1
    assert ("A: epoch 0 holds more than 999 records (the per-epoch limit, "
            "DIFF_EPOCH_RECORD_COUNT_MAX); raise it with --epoch-record-max N"
            in result.stderr.decode())


@pytest.mark.parametrize("argv, message", [
    (["tenant:x", "tenant:1"], "'tenant:x': use tenant:T"),
    (["/nonexistent/file", "tenant:1"], "No such file or directory"),
    (["tenant:1", "tenant:2", "--ignore", "slot_idx"], "unknown or key field slot_idx"),
    (["tenant:1", "tenant:2", "--epochs", "3..1"], "X must not exceed Y"),
])
def test_usage_errors_exit_2(tmp_path, argv, message):
    result = run_cli("diff", *argv, "--socket", os.fspath(tmp_path / "none.sock"))
    assert result.returncode == 2
    assert message in result.stderr.decode()


def test_a_file_that_is_no_source_is_a_usage_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello, world")
    result = ringtail("diff", os.fspath(path), os.fspath(path))
    assert result.returncode == 2
    assert b"is not a ring, VRRL0001 or snapshot file (it starts with b'hello, w')" \
        in result.stderr


# -- the engine, in process ---------------------------------------------------------


def records_array(*records: SlotRecord) -> numpy.ndarray:
    return numpy.frombuffer(b"".join(r.encode() for r in records), dtype=RECORD_DTYPE)


def test_repeats_of_a_slot_are_matched_in_arrival_order():
    first, second = work(0, 4, 1, 1), work(0, 4, 1, 2, opcode=99)
    other = work(0, 7, 1, 3)
    options = make_options()
    same = compare_epoch(0, records_array(first, other, second),
                         records_array(other, first, second), options)
    assert not same.divergent
    swapped = compare_epoch(0, records_array(first, second), records_array(second, first),
                            options)
    assert swapped.differing_count == 2
    assert [(s.slot_idx, s.occurrence, s.fields) for s in swapped.slots] == [
        (4, 0, (("opcode", first.opcode, 99),)), (4, 1, (("opcode", 99, first.opcode),))]


def test_a_record_of_an_epoch_already_closed_is_an_error():
    grouper = EpochGrouper("B", 100)
    assert grouper.feed(records_array(work(0, 1, 1, 1))) == []
    assert [epoch for epoch, _ in grouper.feed(records_array(work(2, 1, 1, 1)))] == [0]
    with pytest.raises(DiffSourceError, match=r"B: a record of epoch 0 arrived after epoch 2"):
        grouper.feed(records_array(work(0, 2, 1, 1)))


def test_an_epoch_may_overlap_the_next_one():
    grouper = EpochGrouper("A", 100)
    done = grouper.feed(records_array(work(0, 1, 1, 1), work(1, 1, 1, 2), work(0, 2, 1, 3)))
    assert done == []
    done = grouper.feed(records_array(work(2, 1, 1, 4)))
    assert [(epoch, len(records)) for epoch, records in done] == [(0, 2)]
    assert [(epoch, len(records)) for epoch, records in grouper.finish()] == [(1, 1), (2, 1)]


async def test_diff_streams_holds_at_most_two_epochs_per_side():
    """Memory is bounded by the largest epoch, not the run: 50 epochs of 100
    records, fed 30 at a time, never have more than two epochs and one piece
    held at once."""
    data = b"".join(work(e, s, 1, 0).encode() for e in range(50) for s in range(100))
    pieces = [data[i:i + 64 * 30] for i in range(0, len(data), 64 * 30)]
    options = make_options(epoch_record_count_max=100)
    with trio.fail_after(60):
        summary = await diff_streams(arrays_from_bytes(pieces), arrays_from_bytes(pieces[::1]),
                                     options)
    assert (summary.epochs_compared, summary.epochs_identical, summary.records_a) == (
        50, 50, 5000)
    assert 2 * 100 < summary.held_record_count_max <= 2 * 100 + 30
