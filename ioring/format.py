"""ringtail's ring file: byte layout, encoding and checksums (no I/O here).

docs/FORMAT.md is the contract; this module is its executable form. All
integers are little-endian. A ring of capacity C records (C a multiple of 64)
holding T = C / 64 chunks is laid out as::

    offset                      size             what
    --------------------------  ---------------  ---------------------------------
    0                           4096             header copy 0 (128 bytes used)
    4096                        4096             header copy 1 (128 bytes used)
    8192                        table_size       chunk table A: T entries x 32 B
    8192 + table_size           table_size       chunk table B: T entries x 32 B
    data_offset                 C x 64           records, slot = sequence mod C
    producer_offset             S x 1024         version 2: S producer slots, two
                                                 512-byte copies each (producers.py)

    table_size  = T * 32 rounded up to 4096
    data_offset = 8192 + 2 * table_size
    producer_offset = data_offset + C * 64   (the end of a version 1 file)

Header (128 bytes; generation g is written to copy g mod 2)::

      0   8  magic               b"RINGTAIL"
      8   4  format_version      u32 = 2 (1: no producer slots, still read and written)
     12   4  header_size         u32 = 128
     16   8  generation          u64, +1 per header write
     24   8  capacity            u64 records
     32   8  oldest_sequence     u64 first retained sequence
     40   8  next_sequence       u64 the cursor: sequence of the next record
     48   8  batch_first_sequence u64 cursor before the batch this header commits
     56   4  tenant_id           u32
     60   4  chunk_record_count  u32 = 64
     64   8  created_ns          u64 ns since the Unix epoch
     72   8  file_id             u64 random, mixed into every chunk checksum
     80   4  producer_slot_count u32 S, 0..PRODUCER_SLOT_COUNT_MAX; 0 in version 1
     84  28  reserved            zero
    112  16  checksum            BLAKE3(bytes 0..112), first 16 bytes

Chunk entry (32 bytes; chunk k holds sequences [64k, 64k+64) at table
position k mod T; each position has a copy in table A and in table B)::

      0   8  first_sequence      u64 = 64k
      8   4  record_count        u32 1..64 (0: empty entry)
     12   4  reserved            zero
     16  16  checksum            BLAKE3(file_id u64 || first_sequence u64 ||
                                 records || record_count u32), first 16 bytes
"""

from __future__ import annotations

import dataclasses
import struct

import blake3
import numpy

from ringtail.ioring.record import RECORD_SIZE_BYTES, struct_for_dtype

FORMAT_MAGIC = b"RINGTAIL"
# Version 2 added the producer slots (the exactly-once window, producers.py):
# a version 1 file is a version 2 file with producer_slot_count 0, and is
# still opened, read and written as version 1 (its header keeps version 1).
FORMAT_VERSION = 2
FORMAT_VERSIONS_READ = (1, 2)

PAGE_SIZE_BYTES = 4096  # header copies and tables start on their own page
SECTOR_SIZE_BYTES = 512  # the unit a torn write is assumed to tear at
HEADER_SIZE_BYTES = 128
HEADER_COPY_COUNT = 2
HEADER_COPY_OFFSETS = (0, PAGE_SIZE_BYTES)
CHECKSUM_SIZE_BYTES = 16

# A chunk is the unit of checksumming and of eviction: 64 records = 4 KiB,
# one page. Smaller chunks cost more table space and more hash calls per
# replayed record; larger ones evict more records at once.
CHUNK_RECORD_COUNT = 64
CHUNK_SIZE_BYTES = CHUNK_RECORD_COUNT * RECORD_SIZE_BYTES
CHUNK_ENTRY_SIZE_BYTES = 32
TABLE_OFFSET = HEADER_COPY_COUNT * PAGE_SIZE_BYTES

# Capacity bounds, in records. The minimum of two chunks lets a batch evict
# the oldest chunk without touching the chunk it appends to (batches of at
# most 32 records at that size). The maximum keeps
# the in-memory chunk-table mirror (capacity bytes: 16 MiB) and a full-file
# verify (1 GiB of data) affordable on a sidecar.
CAPACITY_RECORD_COUNT_MIN = 2 * CHUNK_RECORD_COUNT
CAPACITY_RECORD_COUNT_MAX = 1 << 24

# Records per batch: never more than this (4,096 records = 256 KiB per batch
# buffer), and never more than (capacity - 64) / 2, so that a batch plus the
# one after it, plus a chunk, fit in the ring: then the records a batch in
# flight may overwrite (its evictions) and the records of the batch before it
# (the tail recovery verifies) never share a chunk, and recovery can tell a
# torn tail from an eviction (docs/FORMAT.md, "Recovery").
BATCH_RECORD_COUNT_MAX = 4096

# Sequences and generations stay below 2^63, so that a reader in any language
# can do all of FORMAT.md's arithmetic in signed 64-bit integers (and numpy's
# uint64 never wraps). A writer appending 10^9 records a second reaches it in
# 292 years; a header copy holding a larger value is unusable.
SEQUENCE_LIMIT = 1 << 63

# Producer slots (ioring/producers.py holds their layout and rules): each slot
# has two copies of one sector, so a torn write of one leaves the other.
PRODUCER_SLOT_COPY_SIZE_BYTES = SECTOR_SIZE_BYTES
PRODUCER_SLOT_SIZE_BYTES = 2 * PRODUCER_SLOT_COPY_SIZE_BYTES
# Slots a new file gets: the producers (publishing processes) whose recent
# batches a tenant remembers, least recently written replaced first. 64 KiB
# per ring; a sidecar's tenant has a handful of worker processes.
PRODUCER_SLOT_COUNT = 64
# The most any header may declare (a bound on what recovery reads: 1 MiB).
PRODUCER_SLOT_COUNT_MAX = 1024

assert CHUNK_SIZE_BYTES == PAGE_SIZE_BYTES
assert HEADER_SIZE_BYTES <= PAGE_SIZE_BYTES
assert PAGE_SIZE_BYTES % CHUNK_ENTRY_SIZE_BYTES == 0
assert BATCH_RECORD_COUNT_MAX % CHUNK_RECORD_COUNT == 0

_HEADER = struct.Struct("<8sIIQQQQQIIQQI28s")
_HEADER_CHECKED_SIZE = HEADER_SIZE_BYTES - CHECKSUM_SIZE_BYTES
assert _HEADER.size == _HEADER_CHECKED_SIZE
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """One header copy, decoded."""

    generation: int
    capacity: int
    oldest_sequence: int
    next_sequence: int
    batch_first_sequence: int
    tenant_id: int
    created_ns: int
    file_id: int
    format_version: int = FORMAT_VERSION
    chunk_record_count: int = CHUNK_RECORD_COUNT
    producer_slot_count: int = 0  # fixed at creation; 0 in version 1

    def encode(self) -> bytes:
        body = _HEADER.pack(
            FORMAT_MAGIC, self.format_version, HEADER_SIZE_BYTES,
            self.generation, self.capacity, self.oldest_sequence,
            self.next_sequence, self.batch_first_sequence, self.tenant_id,
            self.chunk_record_count, self.created_ns, self.file_id,
            self.producer_slot_count, bytes(28),
        )
        return body + checksum(body)

    @property
    def copy_index(self) -> int:
        return self.generation % HEADER_COPY_COUNT


class HeaderDecodeError(ValueError):
    """A header copy is unusable; `reason` is a short stable phrase."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}{': ' + detail if detail else ''}")


def decode_header(data: bytes, copy_index: int | None = None) -> Header:
    """Decode one header copy; raise HeaderDecodeError if unusable.

    Checks, in order: size, magic, checksum, version, geometry, the cursor
    (`cursor_problem`) and, given the copy's index, that its generation's
    parity names that copy. A wrong magic or version with a good checksum is
    a format problem, not damage.
    """
    if len(data) < HEADER_SIZE_BYTES:
        raise HeaderDecodeError("truncated", f"{len(data)} of {HEADER_SIZE_BYTES} bytes")
    data = bytes(data[:HEADER_SIZE_BYTES])
    (magic, version, header_size, generation, capacity, oldest, next_sequence,
     batch_first, tenant_id, chunk_count, created_ns, file_id, slot_count, _reserved
     ) = _HEADER.unpack_from(data)
    if magic != FORMAT_MAGIC:
        raise HeaderDecodeError("bad magic", repr(magic))
    if checksum(data[:_HEADER_CHECKED_SIZE]) != data[_HEADER_CHECKED_SIZE:]:
        raise HeaderDecodeError("checksum mismatch")
    if version not in FORMAT_VERSIONS_READ:
        raise HeaderDecodeError("unsupported version", str(version))
    if header_size != HEADER_SIZE_BYTES or chunk_count != CHUNK_RECORD_COUNT or (
            slot_count > (PRODUCER_SLOT_COUNT_MAX if version >= 2 else 0)):
        raise HeaderDecodeError("unsupported geometry",
                                f"header_size={header_size} chunk={chunk_count} "
                                f"producer_slot_count={slot_count} (version {version})")
    problem = cursor_problem(capacity, oldest, batch_first, next_sequence)
    if problem:
        raise HeaderDecodeError(
            "inconsistent cursor",
            f"oldest={oldest} batch_first={batch_first} next={next_sequence} "
            f"capacity={capacity}: {problem}")
    if generation >= SEQUENCE_LIMIT:
        raise HeaderDecodeError("generation out of range",
                                f"{generation} is not below 2^63 (SEQUENCE_LIMIT)")
    if copy_index is not None and generation % HEADER_COPY_COUNT != copy_index:
        # Generation g is only ever written to copy g mod 2. Using a copy found in
        # the other slot would let the next header write overwrite the copy in use.
        raise HeaderDecodeError(
            "generation parity mismatch",
            f"generation {generation} belongs in copy {generation % HEADER_COPY_COUNT}, "
            f"found in copy {copy_index}")
    return Header(generation, capacity, oldest, next_sequence, batch_first,
                  tenant_id, created_ns, file_id, version, chunk_count, slot_count)


def cursor_problem(capacity: int, oldest: int, batch_first: int, next_sequence: int) -> str | None:
    """Why a header's cursor fields cannot have been written by a ringtail writer,
    or None. Values decoded from disk are checked here, never asserted.

    The writer keeps `oldest <= batch_first <= next`, at most `capacity`
    records retained, a last batch of at most R records (R =
    `batch_record_count_max`), and eviction by whole chunks: `oldest` is never
    below `oldest_after_append(0, next)`. A copy that breaks one of these is
    unusable ("inconsistent cursor"); recovery relies on every one of them
    (the last batch's tail never shares a chunk with the head window).
    """
    if next_sequence >= SEQUENCE_LIMIT:
        return "next is not below 2^63 (SEQUENCE_LIMIT)"
    if not oldest <= batch_first <= next_sequence:
        return "oldest <= batch_first <= next does not hold"
    if next_sequence - oldest > capacity:
        return "more records retained than the capacity"
    if capacity_problem(capacity) is None:
        layout = Layout(capacity)
        if next_sequence - batch_first > layout.batch_record_count_max:
            return (f"the last batch holds {next_sequence - batch_first} records, more than "
                    f"a batch can ({layout.batch_record_count_max})")
        if oldest < layout.oldest_after_append(0, next_sequence):
            return (f"oldest is below {layout.oldest_after_append(0, next_sequence)}, "
                    "where writing next_sequence evicted everything older")
    return None


def checksum(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest(CHECKSUM_SIZE_BYTES)


# -- geometry ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Where everything lies for a given capacity and producer slot count.

    The derived sizes are computed once, at construction: the write path reads
    them several times per batch (plan and its paired checks). The slot count
    defaults to what a new file gets (a version 1 file has none).
    """

    capacity: int
    producer_slot_count: int = PRODUCER_SLOT_COUNT
    producer_offset: int = dataclasses.field(init=False, repr=False, compare=False)
    chunk_count: int = dataclasses.field(init=False, repr=False, compare=False)
    table_size_bytes: int = dataclasses.field(init=False, repr=False, compare=False)
    data_offset: int = dataclasses.field(init=False, repr=False, compare=False)
    file_size_bytes: int = dataclasses.field(init=False, repr=False, compare=False)
    batch_record_count_max: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chunk_count = self.capacity // CHUNK_RECORD_COUNT
        raw = chunk_count * CHUNK_ENTRY_SIZE_BYTES
        table_size = -(-raw // PAGE_SIZE_BYTES) * PAGE_SIZE_BYTES
        data_offset = TABLE_OFFSET + 2 * table_size
        for name, value in (
                ("chunk_count", chunk_count), ("table_size_bytes", table_size),
                ("data_offset", data_offset),
                ("producer_offset", data_offset + self.capacity * RECORD_SIZE_BYTES),
                ("file_size_bytes", data_offset + self.capacity * RECORD_SIZE_BYTES
                 + self.producer_slot_count * PRODUCER_SLOT_SIZE_BYTES),
                ("batch_record_count_max",
                 min(BATCH_RECORD_COUNT_MAX, (self.capacity - CHUNK_RECORD_COUNT) // 2))):
            object.__setattr__(self, name, value)

    def table_offset(self, table_index: int) -> int:
        return TABLE_OFFSET + table_index * self.table_size_bytes

    def record_offset(self, sequence: int) -> int:
        """File offset of a sequence's record: O(1) arithmetic."""
        return self.data_offset + (sequence % self.capacity) * RECORD_SIZE_BYTES

    def slot_copy_offset(self, slot: int, copy: int) -> int:
        """File offset of copy `copy` (0 or 1) of producer slot `slot`."""
        return self.producer_offset + slot * PRODUCER_SLOT_SIZE_BYTES \
            + copy * PRODUCER_SLOT_COPY_SIZE_BYTES

    def entry_offset(self, table_index: int, chunk_index: int) -> int:
        position = chunk_index % self.chunk_count
        return self.table_offset(table_index) + position * CHUNK_ENTRY_SIZE_BYTES

    def oldest_after_append(self, oldest: int, next_sequence: int) -> int:
        """Oldest retained sequence once records up to `next_sequence` exist.

        Writing the first record of a chunk evicts the whole chunk that held
        its table position, so eviction happens a chunk at a time.
        """
        last_chunk = (next_sequence - 1) // CHUNK_RECORD_COUNT
        return max(oldest, (last_chunk + 1) * CHUNK_RECORD_COUNT - self.capacity)


def capacity_problem(capacity: int) -> str | None:
    """Why a capacity is unusable, or None if it is fine."""
    if capacity < CAPACITY_RECORD_COUNT_MIN:
        return (f"capacity {capacity} is below CAPACITY_RECORD_COUNT_MIN "
                f"({CAPACITY_RECORD_COUNT_MIN}); use at least {CAPACITY_RECORD_COUNT_MIN} records")
    if capacity > CAPACITY_RECORD_COUNT_MAX:
        return (f"capacity {capacity} exceeds CAPACITY_RECORD_COUNT_MAX "
                f"({CAPACITY_RECORD_COUNT_MAX}); use a smaller capacity")
    if capacity % CHUNK_RECORD_COUNT:
        return (f"capacity {capacity} is not a multiple of CHUNK_RECORD_COUNT "
                f"({CHUNK_RECORD_COUNT}); round it to "
                f"{max(CAPACITY_RECORD_COUNT_MIN, capacity // CHUNK_RECORD_COUNT * CHUNK_RECORD_COUNT)}")
    return None


# -- chunk entries ------------------------------------------------------------


# The chunk entry layout (module docstring); the dtype is its one definition and
# decodes whole tables at once (recovery, verify); the structs are derived.
CHUNK_ENTRY_DTYPE = numpy.dtype([
    ("first_sequence", "<u8"),
    ("record_count", "<u4"),
    ("reserved", "<u4"),
    ("checksum", f"V{CHECKSUM_SIZE_BYTES}"),
])
_ENTRY = struct_for_dtype(CHUNK_ENTRY_DTYPE)
ENTRY_HEAD = struct_for_dtype(CHUNK_ENTRY_DTYPE, 2)  # first_sequence, record_count
assert CHUNK_ENTRY_DTYPE.itemsize == _ENTRY.size == CHUNK_ENTRY_SIZE_BYTES
assert CHUNK_ENTRY_DTYPE.fields["checksum"][1] == CHUNK_ENTRY_SIZE_BYTES - CHECKSUM_SIZE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkEntry:
    first_sequence: int
    record_count: int
    checksum: bytes

    def encode(self) -> bytes:
        return _ENTRY.pack(self.first_sequence, self.record_count, 0, self.checksum)


def decode_entry(data: bytes | memoryview) -> ChunkEntry:
    first_sequence, record_count, _, entry_checksum = _ENTRY.unpack_from(data)
    return ChunkEntry(first_sequence, record_count, entry_checksum)


def chunk_hasher(file_id: int, first_sequence: int) -> "blake3.blake3":
    """A hasher primed for a chunk; feed its records, then `finish_chunk`."""
    hasher = blake3.blake3(_U64.pack(file_id))
    hasher.update(_U64.pack(first_sequence))
    return hasher


def finish_chunk(hasher: "blake3.blake3", record_count: int) -> bytes:
    """Checksum of a chunk whose records were fed to `hasher` (not consumed)."""
    final = hasher.copy()
    final.update(_U32.pack(record_count))
    return final.digest(CHECKSUM_SIZE_BYTES)


def chunk_digest(file_prefix: bytes, first_sequence: int, records: bytes | memoryview,
                 record_count: int) -> bytes:
    """The chunk checksum in one hashing call (`file_prefix` = u64 file_id, packed)."""
    return blake3.blake3(b"".join((file_prefix, _U64.pack(first_sequence), records,
                                   _U32.pack(record_count)))).digest(CHECKSUM_SIZE_BYTES)


def encode_batch_entries(file_id: int, first_sequence: int, records: bytes,
                         tail_hasher: "blake3.blake3 | None"
                         ) -> tuple[list[tuple[int, bytes]], "blake3.blake3 | None"]:
    """Chunk entries for a batch appended at `first_sequence`.

    `tail_hasher` holds the records already in a partial first chunk (None
    when the batch starts a chunk); it is copied, never changed. Returns
    (chunk index, encoded entry) per chunk the batch touches, and the hasher
    of its own partial last chunk (None if it ends on a chunk boundary).
    Full chunks are hashed in one call each: this runs once per batch on the
    write path, so it avoids per-chunk objects.
    """
    assert tail_hasher is not None or first_sequence % CHUNK_RECORD_COUNT == 0
    file_prefix = _U64.pack(file_id)
    end = first_sequence + len(records) // RECORD_SIZE_BYTES
    view = memoryview(records)
    entries = []
    chunk = first_sequence // CHUNK_RECORD_COUNT
    hasher = None
    while chunk * CHUNK_RECORD_COUNT < end:
        start = chunk * CHUNK_RECORD_COUNT
        piece_start = max(start, first_sequence)
        piece_end = min(start + CHUNK_RECORD_COUNT, end)
        piece = view[(piece_start - first_sequence) * RECORD_SIZE_BYTES:
                     (piece_end - first_sequence) * RECORD_SIZE_BYTES]
        count = piece_end - start
        if piece_start == start and count == CHUNK_RECORD_COUNT:
            digest = chunk_digest(file_prefix, start, piece, CHUNK_RECORD_COUNT)
            hasher = None
        else:
            hasher = tail_hasher.copy() if piece_start != start else \
                blake3.blake3(file_prefix + _U64.pack(start))
            hasher.update(piece)
            digest = finish_chunk(hasher, count)
            if count == CHUNK_RECORD_COUNT:
                hasher = None
        entries.append((chunk, _ENTRY.pack(start, count, 0, digest)))
        chunk += 1
    return entries, hasher


def chunk_checksum(file_id: int, first_sequence: int, records: bytes | memoryview) -> bytes:
    hasher = chunk_hasher(file_id, first_sequence)
    hasher.update(records)
    return finish_chunk(hasher, len(records) // RECORD_SIZE_BYTES)


def entry_matches(entry: ChunkEntry, file_id: int, first_sequence: int,
                  records: bytes | memoryview) -> bool:
    """True if `entry` describes exactly these records of this chunk of this file."""
    return (entry.first_sequence == first_sequence
            and entry.record_count * RECORD_SIZE_BYTES == len(records)
            and chunk_checksum(file_id, first_sequence, records) == entry.checksum)
