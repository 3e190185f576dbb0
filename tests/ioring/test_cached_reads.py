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
# POSIX_FADV_DONTNEED calls made before the test gives up: a page still in
# another CPU's LRU batch (the thread backend wrote it) survives one call.
DROP_ATTEMPT_COUNT_MAX = 20


def drop_from_page_cache(path: str, offset: int, size: int) -> None:
    """Drop the file's pages until a no-wait read of [offset, offset + size)
    (the plain syscall, not the code under test) finds them gone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(DROP_ATTEMPT_COUNT_MAX):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                if os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT) < size:
                    return  # partly gone
            except BlockingIOError:
                return
        pytest.fail(f"{path}: still in the page cache after {DROP_ATTEMPT_COUNT_MAX} "
                    "POSIX_FADV_DONTNEED calls")
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
        drop_from_page_cache(path, ring.layout.record_offset(1000), len(expected))
        with pytest.raises(BlockingIOError):
            ring.read(1000, 4096, cached_only=True)
        assert ring.read(1000, 4096) == expected  # waits for the disk
