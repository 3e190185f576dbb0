"""`RingFile.read(..., cached_only=True)`: the event loop's read (issue 9, item 5).

It returns what a plain read returns when the page cache holds the range, and
raises BlockingIOError, without waiting for the disk, when it does not. Real
files and the real page cache: POSIX_FADV_DONTNEED drops the file's clean
pages (the ring is written with sync="batch", so its pages are clean).
"""

from __future__ import annotations

import os

import numpy
import pytest

from ringtail.ioring import open_ring
from ringtail.ioring.record import RECORD_DTYPE, RECORD_MAGIC

RECORD_COUNT = 8192
# POSIX_FADV_DONTNEED calls made before the test gives up (each ~10 us): a
# page still in another CPU's LRU batch (the thread backend wrote it) or
# locked by readahead in flight survives a call; and a no-wait read that
# misses starts readahead (read_ahead_kb, 8 MiB here) without waiting for it,
# which may bring the pages back before the next read. 20 calls failed 1 run
# in 30; 1,000 passed 65 of 65, 25 of them beside a daemon test run.
DROP_ATTEMPT_COUNT_MAX = 1000


def drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_cached_only_read_never_waits_for_the_disk(tmp_path):
    path = os.fspath(tmp_path / "cached.ring")
    records = numpy.zeros(RECORD_COUNT, dtype=RECORD_DTYPE)
    records["magic"] = RECORD_MAGIC
    records["tenant_id"] = 3
    records["timestamp_ns"] = numpy.arange(RECORD_COUNT)
    with open_ring(path, capacity=1 << 16, tenant_id=3, io="threads", sync="batch") as ring:
        for first in range(0, RECORD_COUNT, 4096):
            ring.append(records[first:first + 4096].tobytes())
    with open_ring(path, io="threads", sync="batch", tenant_id=3) as ring:
        expected = records[1000:5096].tobytes()
        # Just written, so in the page cache. (Not after a plain read: that
        # may leave a readahead mark, and a no-wait read stops there, as
        # if not cached; the daemon then reads on a thread, which is fine.)
        assert ring.read(1000, 4096, cached_only=True) == expected
        for _ in range(DROP_ATTEMPT_COUNT_MAX):
            drop_from_page_cache(path)
            try:
                data = ring.read(1000, 4096, cached_only=True)
            except BlockingIOError:
                break  # not in the page cache: refused, nothing waited for
            assert data == expected  # still cached: the same bytes, never others
        else:
            pytest.fail(f"no cached-only read was refused in {DROP_ATTEMPT_COUNT_MAX} "
                        "drops of the file's pages")
        assert ring.read(1000, 4096) == expected  # waits for the disk
