"""Storage failures and a bad data dir, as the user sees them (issue 9, item 18).

A publish that runs out of disk space gets STORAGE_FAILED whose message names
ENOSPC, the free bytes, the directory and what to do, whole (it was cut at 256
characters and said only "short write"). The full disk is real: the data dir is
a small tmpfs mounted for the test, the ring's next pages are a hole, and the
rest of the file system is filled. Mounting needs root: the test fails (never
skips) where it cannot mount.

`ringtail serve` with a data dir that is a file says which path is in the way
and what to do (it printed "[Errno 17] File exists: 'PATH'").
"""

from __future__ import annotations

import os
import re
import subprocess

import trio

from ringtail.ioring.format import Layout
from ringtail.ioring.ring import open_ring
from ringtail.service.client import Client, RingtailError
from ringtail.service.protocol import ERROR_MESSAGE_SIZE_BYTES_MAX, ErrorCode
from tests.ioring.test_full_disk import fill_file_system, small_tmpfs
from tests.service.conftest import RINGTAIL, RecordFactory

TENANT = 3
CAPACITY = 256
ACKNOWLEDGED = 40  # records 0..39 lie in the ring's first data page
TIMEOUT_S = 60


async def test_storage_failed_names_enospc_and_what_to_do_in_full(daemon, tmp_path):
    factory = RecordFactory(TENANT, seed=5)
    built = os.fspath(tmp_path / "built.ring")
    with open_ring(built, capacity=CAPACITY, tenant_id=TENANT, io="threads") as ring:
        ring.append(factory.records(ACKNOWLEDGED))
    layout = Layout(CAPACITY)
    with open(built, "rb") as file:
        allocated = file.read(layout.data_offset + 4096)
    with small_tmpfs(os.fspath(tmp_path / "mnt")) as mount:
        data_dir = os.path.join(mount, "data")
        os.mkdir(data_dir, 0o700)
        path = os.path.join(data_dir, f"tenant-{TENANT}.ring")
        with open(path, "wb") as file:  # the pages after the first data page are a hole
            file.write(allocated)
            file.truncate(layout.file_size_bytes)
            # The producer slots stay allocated (zero: empty), so the first
            # write to fail is the records' (a short write), not a slot copy's.
            file.seek(layout.producer_offset)
            file.write(bytes(layout.file_size_bytes - layout.producer_offset))
        server = daemon(data_dir=data_dir, capacity=CAPACITY, io="threads")
        try:
            fill_file_system(mount)
            with trio.fail_after(TIMEOUT_S):
                async with await Client.connect(server.socket_path, TENANT) as client:
                    assert client.welcome.next_sequence == ACKNOWLEDGED
                    try:
                        await client.publish(factory.records(30))
                    except RingtailError as error:
                        failure = error
                    else:
                        raise AssertionError("a publish on a full disk was acknowledged")
        finally:
            server.close()  # before the unmount
    assert failure.code == ErrorCode.STORAGE_FAILED
    message = failure.message
    assert message.startswith(f"batch 1 is not durable: {path}: ENOSPC (No space left on "
                              "device: "), message
    assert (f"the file system holding {data_dir} is full: free space there (or move the data "
            "dir to a larger one), then restart the daemon") in message, message
    # Whole: it ends with the operation that failed, and is longer than the old cut.
    assert re.search(r"\(short write: operation \d wrote \d+ of \d+ bytes\)$", message), message
    assert 256 < len(message.encode()) <= ERROR_MESSAGE_SIZE_BYTES_MAX


def test_a_data_dir_that_is_a_file_is_named_with_what_to_do(tmp_path):
    in_the_way = tmp_path / "data"
    in_the_way.write_bytes(b"not a directory")
    result = subprocess.run(
        [RINGTAIL, "serve", "--data-dir", os.fspath(in_the_way / "rings"),
         "--socket", os.fspath(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"ringtail serve: data dir {in_the_way / 'rings'} cannot be a directory: {in_the_way} "
        "is a file; point --data-dir (or data_dir in the config) at a directory, or move it "
        "away")
