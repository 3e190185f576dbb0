"""Import and export of vyre-runtime's VRRL0001 replay log.

vyre-runtime (Rust) keeps a fixed-capacity circular log of every slot record its
host published. ringtail reads such a log (`import_vrrl`) and writes one
(`export_vrrl`) byte for byte as the original would have left it. docs/VRRL.md
is the contract; this docstring is the map. Little-endian, no padding::

    offset            size  field
    ----------------  ----  ---------------------------------------------------
    0                    8  magic       b"VRRL0001"                (VRRL_MAGIC)
    8                    4  version     u32 = 1                  (VRRL_VERSION)
    12                   4  flags       u32 = 0 (read, never checked: see below)
    16                   8  capacity    u64, 1 ..= 1_048_576 (VRRL_CAPACITY_MAX)
    24                   8  next_slot   u64 write cursor; the original reads it
                                        modulo capacity
    32                  64  slot 0      a 64-byte slot record (ioring.record)
    32 + 64 * s         64  slot s
    32 + 64 * (cap-1)   64  slot capacity - 1
    32 + 64 * cap           end of file (bytes past it are ignored)

    +---------+----+----+--------+---------++--------+--------+-----+----------+
    | VRRL0001| v1 | fl |capacity|next_slot|| slot 0 | slot 1 | ... | slot c-1 |
    +---------+----+----+--------+---------++--------+--------+-----+----------+
     <-------------- 32-byte header ------->  <------ capacity x 64 bytes ---->

A slot whose record magic (its first u32) is 0 is empty: never written. Any
other value than 0 or 0xDEADBEEF is a damaged slot.

Publishing (the original, per record): write the record at slot `next_slot`,
then rewrite the header's cursor with `(next_slot + 1) % capacity`. So after n
publishes into a fresh (all zero) ring, record i lies in slot `i % capacity`,
the cursor is `n % capacity`, and the oldest retained record is at the cursor.

Replay order: start at slot `next_slot % capacity`, walk the ring once,
skip empty slots.

Validation mirrors vyre-runtime's `RingLog::open` and `replay_records`
(vyre-runtime/src/replay.rs, later src/replay/mod.rs): bad magic, version other
than 1, capacity 0 and capacity over 1_048_576 are rejected; flags are read and
ignored; next_slot is taken modulo capacity; a body shorter than
`capacity x 64` fails (the original fails its replay with an I/O error on the
missing slot); bytes past the body are ignored; a slot magic other than 0 or
0xDEADBEEF fails the whole replay. Every rejection here is a `VrrlFormatError`
naming the bad value, the limit and what to do.
"""

from __future__ import annotations

import dataclasses
import errno
import operator
import os
import struct
from collections.abc import Callable, Iterable

import numpy

from ringtail.ioring.errors import VrrlFormatError
from ringtail.ioring.files import write_file_atomically
from ringtail.ioring.record import RECORD_MAGIC, RECORD_SIZE_BYTES

__all__ = [
    "VRRL_CAPACITY_MAX",
    "VRRL_CAPACITY_MIN",
    "VRRL_HEADER_SIZE_BYTES",
    "VRRL_MAGIC",
    "VRRL_VERSION",
    "VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX",
    "VrrlHeader",
    "VrrlWriter",
    "export_vrrl",
    "import_vrrl",
    "read_vrrl_header",
    "vrrl_file_size_bytes",
    "write_vrrl_file",
]

# File identity, the first 8 bytes ("Vyre Ring-Replay Log", format 0001).
VRRL_MAGIC = b"VRRL0001"
# The only header version vyre-runtime writes or accepts (its LOG_VERSION).
VRRL_VERSION = 1
# magic 8 + version 4 + flags 4 + capacity 8 + next_slot 8; the first record
# slot starts right after it (vyre-runtime's HEADER_BYTES).
VRRL_HEADER_SIZE_BYTES = 32
# A zero-capacity ring can hold nothing; vyre-runtime rejects it (ZeroCapacity).
VRRL_CAPACITY_MIN = 1
# vyre-runtime's MAX_REPLAY_RECORDS. Bounds what a header can make a reader
# allocate: a full ring is 32 + 1_048_576 x 64 bytes = 64 MiB + 32 bytes, which
# is the most memory import_vrrl reads at once (export_vrrl writes with pwrite,
# a VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX piece at a time).
VRRL_CAPACITY_MAX = 1_048_576

# Records an export checks and writes at once: 4,096 x 64 B = a 256 KiB piece,
# the most an export holds besides its input (the file is written with pwrite,
# never built in memory).
VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX = 4096
VRRL_EXPORT_CHUNK_SIZE_BYTES = VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX * RECORD_SIZE_BYTES

# The header's byte offsets are the contract (docs/VRRL.md).
_HEADER_STRUCT = struct.Struct("<8sIIQQ")
_NEXT_SLOT_OFFSET = 24
_RECORD_MAGIC_STRUCT = struct.Struct("<I")
_SLOT_EMPTY_MAGIC = 0
# Records are read as rows of sixteen little-endian u32 words; word 0 is the
# record magic.
_RECORD_WORD_COUNT = RECORD_SIZE_BYTES // 4

assert _HEADER_STRUCT.size == VRRL_HEADER_SIZE_BYTES
assert struct.calcsize("<8sIIQ") == _NEXT_SLOT_OFFSET
assert len(VRRL_MAGIC) == 8
assert RECORD_SIZE_BYTES % 4 == 0
assert 1 <= VRRL_CAPACITY_MIN <= VRRL_CAPACITY_MAX
assert RECORD_MAGIC != _SLOT_EMPTY_MAGIC


@dataclasses.dataclass(frozen=True, slots=True)
class VrrlHeader:
    """The validated header of a VRRL0001 file, as stored.

    Attributes:
        capacity: record slots in the ring, 1 ..= VRRL_CAPACITY_MAX.
        next_slot: the write cursor as stored. The original tolerates a value
            >= capacity and reads it modulo capacity; see `replay_start_slot`.
        version: always VRRL_VERSION (other versions are rejected).
        flags: as stored; vyre-runtime writes 0 and never checks it.
        file_size_bytes: size of the file when the header was read; may exceed
            `vrrl_file_size_bytes(capacity)` (trailing bytes are ignored).
    """

    capacity: int
    next_slot: int
    version: int
    flags: int
    file_size_bytes: int

    @property
    def replay_start_slot(self) -> int:
        """The slot replay starts from: next_slot modulo capacity."""
        return self.next_slot % self.capacity

    @property
    def trailing_size_bytes(self) -> int:
        """Bytes past the last record slot, which readers ignore."""
        return self.file_size_bytes - vrrl_file_size_bytes(self.capacity)


def vrrl_file_size_bytes(capacity: int) -> int:
    """Size in bytes of a VRRL0001 file with `capacity` slots: 32 + capacity x 64."""
    return VRRL_HEADER_SIZE_BYTES + capacity * RECORD_SIZE_BYTES


def read_vrrl_header(path: str | os.PathLike) -> VrrlHeader:
    """Read and validate the header of a VRRL0001 file (one 32-byte read).

    Checks everything `import_vrrl` checks except the record slots themselves,
    so a header this returns belongs to a file of the right size.

    Args:
        path: the VRRL0001 file.

    Returns:
        The header, with the cursor as stored.

    Raises:
        VrrlFormatError: the file is shorter than a header, has the wrong magic
            or version, a capacity outside 1 ..= VRRL_CAPACITY_MAX, or is
            shorter than its capacity needs.
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as file:
        file_size_bytes = os.fstat(file.fileno()).st_size
        header_bytes = file.read(VRRL_HEADER_SIZE_BYTES)
    return _parse_header(path, header_bytes, file_size_bytes)


def import_vrrl(path: str | os.PathLike) -> list[bytes]:
    """Read a VRRL0001 replay log and return its records in replay order.

    Replay order starts at slot `next_slot % capacity` and walks the ring once,
    skipping empty slots (record magic 0), as vyre-runtime's `replay_records`
    does. Records come back byte-identical to the stored slots.

    Reads the header, then the whole body with one bounded read (at most
    VRRL_CAPACITY_MAX x 64 bytes = 64 MiB); numpy finds the live slots. The file
    should not be written while it is read (the original has no way to tell a
    reader it is mid-write): copy a live log first.

    Args:
        path: the VRRL0001 file.

    Returns:
        Each retained record as 64 bytes, oldest first.

    Raises:
        VrrlFormatError: a bad header (see `read_vrrl_header`), a body shorter
            than capacity x 64 bytes, or a slot whose record magic is neither 0
            nor 0xDEADBEEF.
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb", buffering=0) as file:
        file_size_bytes = os.fstat(file.fileno()).st_size
        header = _parse_header(path, _read_exact(file, VRRL_HEADER_SIZE_BYTES),
                               file_size_bytes)
        body_size_bytes = header.capacity * RECORD_SIZE_BYTES
        body = _read_exact(file, body_size_bytes)
    if len(body) != body_size_bytes:
        # The file shrank between fstat and read.
        raise VrrlFormatError(path, _short_body_message(
            header.capacity, VRRL_HEADER_SIZE_BYTES + len(body)))

    words = numpy.frombuffer(body, dtype="<u4").reshape(
        header.capacity, _RECORD_WORD_COUNT)
    start = header.replay_start_slot
    # Slot numbers in replay order: start, start+1, ..., capacity-1, 0, ..., start-1.
    replay_slots = numpy.roll(numpy.arange(header.capacity, dtype=numpy.int64),
                              -start)
    magics = words[replay_slots, 0]
    damaged = (magics != _SLOT_EMPTY_MAGIC) & (magics != RECORD_MAGIC)
    if damaged.any():
        slot = int(replay_slots[numpy.argmax(damaged)])
        raise VrrlFormatError(path, _damaged_slot_message(
            slot, int(words[slot, 0]), int(damaged.sum())))

    live_slots = replay_slots[magics == RECORD_MAGIC]
    # A 64-byte void view turns each selected row into one `bytes` in C.
    records = numpy.frombuffer(body, dtype=numpy.dtype((numpy.void,
                                                        RECORD_SIZE_BYTES)))
    result = records[live_slots].tolist()
    assert len(result) == int(numpy.count_nonzero(magics))
    return result


def export_vrrl(records: Iterable[bytes], path: str | os.PathLike,
                capacity: int) -> None:
    """Write `records` as the VRRL0001 file the original would hold.

    The result is byte-identical to a fresh vyre-runtime ring of `capacity`
    slots after publishing `records` one by one: record i in slot
    `i % capacity` (later records overwrite earlier ones), cursor
    `len(records) % capacity`, untouched slots all zero, size
    32 + capacity x 64. With more records than capacity only the last
    `capacity` survive, in order.

    Records are consumed as a stream and written to the file in pieces of at
    most VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX records (`VrrlWriter`), so memory
    does not grow with the record count or the capacity.
    The file is written atomically: a temporary file in the same directory is
    written, fsynced, renamed over `path`, and the directory is fsynced. A
    crash leaves either the old `path` or the new one, never a partial file
    (a stray `.<name>.*.vrrl-tmp` may remain beside it). The new file has mode
    0600: it holds tenant data.

    Args:
        records: 64-byte slot records in replay (publish) order.
        path: where to write; replaced if it exists.
        capacity: slots in the ring, 1 ..= VRRL_CAPACITY_MAX.

    Raises:
        ValueError: capacity out of range; a record that is not 64 bytes or
            whose magic is not 0xDEADBEEF (the original's readers would skip a
            0 magic and reject any other, so the record could not come back).
            Nothing is written.
        OSError: the file cannot be written; `path` is left as it was.
    """
    _check_export_capacity(capacity)

    def fill(fd: int) -> None:
        writer = VrrlWriter(fd, capacity)
        piece = bytearray()
        for index, record in enumerate(records):
            _check_export_record(index, record)
            piece += record
            if len(piece) == VRRL_EXPORT_CHUNK_SIZE_BYTES:
                writer.write(piece)
                piece.clear()
        if piece:
            writer.write(piece)
        writer.finish()

    write_file_atomically(path, fill, temporary_suffix=".vrrl-tmp", mode=0o600)  # tenant data


def write_vrrl_file(path: str | os.PathLike, fill: Callable[[int], None]) -> None:
    """Write a VRRL0001 file atomically (as `export_vrrl`): `fill(fd)` makes a
    `VrrlWriter` on `fd`, feeds it, and finishes it; if it raises, `path` is
    left as it was and the temporary file is removed."""
    write_file_atomically(path, fill, temporary_suffix=".vrrl-tmp", mode=0o600)  # tenant data


class VrrlWriter:
    """A VRRL0001 file filled from a stream of records (the export side).

    Records arrive in pieces of any size (a replay's Records frames, say);
    each is checked (vectorised) and written to its slots with `pwrite`, in
    pieces of at most VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX records, so the
    writer holds no records itself: memory is one piece, whatever the
    capacity or the record count. Record i goes to slot i % capacity, as the
    original publishes. `finish` writes the header.

    Resource handling: writes to `fd`, which the caller owns (and fsyncs).
    """

    def __init__(self, fd: int, capacity: int):
        self.capacity = _check_export_capacity(capacity)
        self.fd = fd
        self.record_count = 0
        os.ftruncate(fd, vrrl_file_size_bytes(capacity))  # unwritten slots read as zero

    def write(self, records: bytes | bytearray | memoryview) -> None:
        """Append whole 64-byte records (each must have the record magic).

        Raises:
            ValueError: not whole records, or a record whose magic is not
                RECORD_MAGIC (named by its index in the export).
        """
        with memoryview(records).cast("B") as view:
            size = len(view)
            if size % RECORD_SIZE_BYTES:
                raise ValueError(
                    f"{size} bytes are not whole {RECORD_SIZE_BYTES}-byte records "
                    f"(RECORD_SIZE_BYTES); pass whole records")
            for start in range(0, size, VRRL_EXPORT_CHUNK_SIZE_BYTES):
                self._write_piece(view[start:start + VRRL_EXPORT_CHUNK_SIZE_BYTES])

    def _write_piece(self, piece: memoryview) -> None:
        count = len(piece) // RECORD_SIZE_BYTES
        magics = numpy.frombuffer(piece, dtype="<u4").reshape(count, _RECORD_WORD_COUNT)[:, 0]
        bad = numpy.flatnonzero(magics != RECORD_MAGIC)
        if len(bad):
            index = int(bad[0])
            _check_export_record(self.record_count + index,
                                 bytes(piece[index * RECORD_SIZE_BYTES:
                                             (index + 1) * RECORD_SIZE_BYTES]))
        capacity = self.capacity
        if count > capacity:  # only the last `capacity` of the piece survive
            skipped = count - capacity
            piece = piece[skipped * RECORD_SIZE_BYTES:]
            self.record_count += skipped
            count = capacity
        slot = self.record_count % capacity
        head = min(count, capacity - slot)
        _pwrite_all(self.fd, piece[:head * RECORD_SIZE_BYTES],
                    VRRL_HEADER_SIZE_BYTES + slot * RECORD_SIZE_BYTES)
        if head < count:
            _pwrite_all(self.fd, piece[head * RECORD_SIZE_BYTES:], VRRL_HEADER_SIZE_BYTES)
        self.record_count += count

    def finish(self, *, shrink: bool = False) -> None:
        """Write the header. With `shrink`, a ring that never wrapped gets the
        capacity of the records written (at least VRRL_CAPACITY_MIN): the file
        a fresh ring of that capacity holds after the same publishes."""
        if shrink and self.record_count < self.capacity:
            self.capacity = max(VRRL_CAPACITY_MIN, self.record_count)
            os.ftruncate(self.fd, vrrl_file_size_bytes(self.capacity))
        _pwrite_all(self.fd, _HEADER_STRUCT.pack(VRRL_MAGIC, VRRL_VERSION, 0, self.capacity,
                                                 self.record_count % self.capacity), 0)


def _check_export_capacity(capacity: int) -> int:
    capacity = operator.index(capacity)
    if not VRRL_CAPACITY_MIN <= capacity <= VRRL_CAPACITY_MAX:
        raise ValueError(
            f"VRRL capacity {capacity} is outside {VRRL_CAPACITY_MIN}..="
            f"{VRRL_CAPACITY_MAX} records (VRRL_CAPACITY_MIN..=VRRL_CAPACITY_MAX);"
            f" choose a capacity in that range")
    return capacity


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            count = os.pwrite(fd, view[written:], offset + written)
            if count == 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing at byte offset {offset + written}")
            written += count


def _parse_header(path: str | os.PathLike, header_bytes: bytes,
                  file_size_bytes: int) -> VrrlHeader:
    """Validate a header in the original's order: size, magic, version, capacity."""
    if len(header_bytes) < VRRL_HEADER_SIZE_BYTES:
        raise VrrlFormatError(
            path,
            f"file is {file_size_bytes} bytes, shorter than the "
            f"{VRRL_HEADER_SIZE_BYTES}-byte VRRL header (VRRL_HEADER_SIZE_BYTES);"
            f" the file is truncated or not a VRRL log: copy it again from its"
            f" source")
    magic, version, flags, capacity, next_slot = _HEADER_STRUCT.unpack(
        header_bytes)
    if magic != VRRL_MAGIC:
        raise VrrlFormatError(
            path,
            f"magic {magic!r} is not {VRRL_MAGIC!r} (VRRL_MAGIC); this is not a"
            f" vyre-runtime replay log: check the path")
    if version != VRRL_VERSION:
        raise VrrlFormatError(
            path,
            f"VRRL version {version} is not supported, only version"
            f" {VRRL_VERSION} (VRRL_VERSION) is; re-export the log with a"
            f" vyre-runtime that writes VRRL0001 version {VRRL_VERSION}")
    # flags: vyre-runtime reads and ignores them (no check), so a log it
    # accepts must import here too. They are reported in VrrlHeader.flags.
    if capacity < VRRL_CAPACITY_MIN:
        raise VrrlFormatError(
            path,
            f"VRRL capacity {capacity} is below the minimum of"
            f" {VRRL_CAPACITY_MIN} record (VRRL_CAPACITY_MIN); the header is"
            f" damaged: recover the log from its source")
    if capacity > VRRL_CAPACITY_MAX:
        raise VrrlFormatError(
            path,
            f"VRRL capacity {capacity} exceeds the maximum of"
            f" {VRRL_CAPACITY_MAX} records (VRRL_CAPACITY_MAX); the header is"
            f" damaged or the log was not written by vyre-runtime: shard it"
            f" into logs of at most {VRRL_CAPACITY_MAX} records")
    if file_size_bytes < vrrl_file_size_bytes(capacity):
        raise VrrlFormatError(path, _short_body_message(capacity,
                                                        file_size_bytes))
    # next_slot >= capacity: vyre-runtime takes it modulo capacity on open,
    # so it is kept as stored and reduced by VrrlHeader.replay_start_slot.
    return VrrlHeader(capacity=capacity, next_slot=next_slot, version=version,
                      flags=flags, file_size_bytes=file_size_bytes)


def _short_body_message(capacity: int, file_size_bytes: int) -> str:
    expected = vrrl_file_size_bytes(capacity)
    return (f"file is {file_size_bytes} bytes, shorter than the {expected} bytes"
            f" a VRRL log of capacity {capacity} needs ({VRRL_HEADER_SIZE_BYTES}"
            f" + {capacity} x {RECORD_SIZE_BYTES}); the file is truncated: copy"
            f" it again, completely, from its source")


def _damaged_slot_message(slot: int, magic: int, damaged_count: int) -> str:
    offset = VRRL_HEADER_SIZE_BYTES + slot * RECORD_SIZE_BYTES
    return (f"slot {slot} at byte offset {offset} has record magic"
            f" 0x{magic:08x}, expected 0x{RECORD_MAGIC:08x} (RECORD_MAGIC) or 0"
            f" (empty slot); {damaged_count} slot(s) are damaged and the"
            f" original refuses to replay such a log: recover it from its"
            f" source")


def _read_exact(file, size_bytes: int) -> bytearray:
    """Read `size_bytes`, retrying short reads; fewer only at end of file."""
    buffer = bytearray(size_bytes)
    with memoryview(buffer) as view:
        filled = 0
        while filled < size_bytes:
            count = file.readinto(view[filled:])
            if not count:
                break
            filled += count
    del buffer[filled:]
    return buffer


def _check_export_record(index: int, record: bytes) -> None:
    size = len(record)
    if size != RECORD_SIZE_BYTES:
        raise ValueError(
            f"record {index} is {size} bytes, a slot record is exactly"
            f" {RECORD_SIZE_BYTES} (RECORD_SIZE_BYTES); pass whole records")
    (magic,) = _RECORD_MAGIC_STRUCT.unpack_from(record)
    if magic != RECORD_MAGIC:
        raise ValueError(
            f"record {index} has magic 0x{magic:08x}, expected"
            f" 0x{RECORD_MAGIC:08x} (RECORD_MAGIC); a VRRL reader skips magic 0"
            f" and rejects any other, so this record could not be read back:"
            f" export only well-formed records")
