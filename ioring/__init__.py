"""ioring: ringtail's storage engine (ring-file format, io_uring writer, reader,
recovery, VRRL import/export). Knows nothing of sockets, tenants or Trio.

The public surface is re-exported here explicitly; tests pin it.
"""

from ringtail.ioring.batch import BatchTicket
from ringtail.ioring.backend import open_backend
from ringtail.ioring.chain import IO_CHOICES, ChainResult, FDATASYNC, Write
from ringtail.ioring.errors import (BackendUnavailableError, RingBusyError, RingClosedError,
                                    RingCorruptError, RingError, RingFailedError, RingFormatError,
                                    RingLockedError, RingRangeError, VrrlFormatError)
from ringtail.ioring.format import (BATCH_RECORD_COUNT_MAX, CAPACITY_RECORD_COUNT_MAX,
                                    CAPACITY_RECORD_COUNT_MIN, CHUNK_RECORD_COUNT, FORMAT_VERSION,
                                    Layout)
from ringtail.ioring.record import (FAILURE_CLASS_NAMES, RECORD_DTYPE, RECORD_MAGIC,
                                    RECORD_SIZE_BYTES, SlotRecord, failure_class_name)
from ringtail.ioring.recovery import RecoveryReport
from ringtail.ioring.ring import SYNC_CHOICES, RingFile, RingStatistics, open_ring

__all__ = [
    "BATCH_RECORD_COUNT_MAX", "CAPACITY_RECORD_COUNT_MAX", "CAPACITY_RECORD_COUNT_MIN",
    "CHUNK_RECORD_COUNT", "FAILURE_CLASS_NAMES", "FDATASYNC", "FORMAT_VERSION", "IO_CHOICES",
    "RECORD_DTYPE", "RECORD_MAGIC", "RECORD_SIZE_BYTES", "SYNC_CHOICES",
    "BackendUnavailableError", "BatchTicket", "ChainResult", "Layout", "RecoveryReport",
    "RingBusyError", "RingClosedError", "RingCorruptError", "RingError", "RingFailedError",
    "RingFile", "RingFormatError", "RingLockedError", "RingRangeError", "RingStatistics", "SlotRecord",
    "VrrlFormatError", "Write", "failure_class_name", "open_backend", "open_ring",
]
