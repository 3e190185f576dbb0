"""A write chain on a really full file system names ENOSPC (issue 9, item 18).

The ring file sits on a small tmpfs mounted for the test, with the pages the
next batch needs left unallocated (a hole), and the rest of the file system
filled: the batch's data write runs out of space for real. The failure names
ENOSPC, the free bytes, the directory and what to do, and nothing
acknowledged is lost. Mounting needs root: the test fails (never skips) where
it cannot mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

from ringtail.ioring.errors import RingFailedError
from ringtail.ioring.format import Layout
from ringtail.ioring.ring import open_ring

from .conftest import TENANT_ID, make_records

CAPACITY = 256
LAYOUT = Layout(CAPACITY)
ACKNOWLEDGED = 40  # records 0..39 lie in the first data page
MOUNT_SIZE_BYTES = 512 * 1024


@contextlib.contextmanager
def small_tmpfs(directory: str):
    os.makedirs(directory)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE_BYTES}",
                              "tmpfs", directory], capture_output=True, text=True)
    assert mounted.returncode == 0, (
        f"this test mounts a {MOUNT_SIZE_BYTES}-byte tmpfs to fill it for real and needs "
        f"root: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", directory], check=True)


def fill_file_system(directory: str) -> None:
    """Write a filler file until the file system refuses with ENOSPC."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, bytes(4096))
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                return
    finally:
        os.close(fd)


def test_a_batch_on_a_full_file_system_fails_naming_enospc_and_what_to_do(tmp_path, io):
    built = os.fspath(tmp_path / "built.ring")
    with open_ring(built, capacity=CAPACITY, tenant_id=TENANT_ID, io=io) as ring:
        ring.append(make_records(0, ACKNOWLEDGED))
    with open(built, "rb") as file:
        allocated = file.read(LAYOUT.data_offset + 4096)  # headers, tables, first data page
    with small_tmpfs(os.fspath(tmp_path / "mnt")) as directory:
        path = os.path.join(directory, "tenant-7.ring")
        with open(path, "wb") as file:
            file.write(allocated)
            file.truncate(LAYOUT.file_size_bytes)  # the rest is a hole
        with open_ring(path, tenant_id=TENANT_ID, io=io) as ring:
            fill_file_system(directory)
            # 40..69: slots 40..69, the second data page (a hole) needs a new block.
            with pytest.raises(RingFailedError) as caught:
                ring.append(make_records(ACKNOWLEDGED, 30))
            message = str(caught.value)
            assert message.startswith(
                f"{path}: ENOSPC (No space left on device") and " bytes free): batch 40..69 " \
                "is not durable; the file system holding " in message, message
            assert (f"the file system holding {directory} is full: free space there (or move "
                    "the data dir to a larger one), then restart the daemon") in message
            assert ring.read(0, ACKNOWLEDGED) == make_records(0, ACKNOWLEDGED)
        os.unlink(os.path.join(directory, "filler"))
        with open_ring(path, tenant_id=TENANT_ID, io=io) as ring:
            assert ring.read(0, ACKNOWLEDGED) == make_records(0, ACKNOWLEDGED)
            assert ring.next_sequence == ACKNOWLEDGED  # nothing of the failed batch verified
