"""ringtail's snapshot file: one tenant's records at a cut, compressed and checked.

docs/FORMAT.md ("Snapshot file") is the contract; this docstring is the map.
All integers are little-endian::

    offset          size  what
    --------------  ----  --------------------------------------------------
    0                128  header
    128             40+n  chunk 0: chunk header (40 bytes), n compressed bytes
    ...                   chunk 1 .. chunk_count - 1, back to back
    trailer_offset    64  trailer; the file ends right after it

Header (128 bytes)::

      0   8  magic            b"RTSNAP\\r\\n" (SNAPSHOT_MAGIC)
      8   4  format_version   u32 = 1 (SNAPSHOT_FORMAT_VERSION)
     12   4  header_size      u32 = 128
     16   4  tenant_id        u32, the tenant the records were read from
     20   4  chunk_record_count_max  u32, 1 ..= SNAPSHOT_CHUNK_RECORD_COUNT_MAX
     24   8  first_sequence   u64, sequence of the first record
     32   8  record_count     u64, records in the file (0: an empty tenant)
     40   8  chunk_count      u64 = ceil(record_count / chunk_record_count_max)
     48   8  created_ns       u64, ns since the Unix epoch
     56  32  source_node      UTF-8, zero-padded (the host the cut was taken on)
     88  24  reserved         zero
    112  16  checksum         BLAKE3(bytes 0..112), first 16 bytes

Chunk header (40 bytes), then `compressed_size` bytes of one zstd frame
whose content is `record_count x 64` bytes of records::

      0   4  magic            b"RTSC"
      4   4  record_count     u32, 1 ..= chunk_record_count_max
      8   8  first_sequence   u64, the previous chunk's first + its count
     16   4  compressed_size  u32, 1 ..= SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX
     20   4  reserved         zero
     24  16  checksum         BLAKE3(chunk header bytes 0..24 || compressed bytes
                              || uncompressed records), first 16 bytes

Every chunk but the last holds exactly chunk_record_count_max records.

Trailer (64 bytes)::

      0   8  magic            b"RTSNEND\\0"
      8   8  chunk_count      u64, as in the header
     16   8  record_count     u64, as in the header
     24   8  trailer_offset   u64, this trailer's own offset
     32  32  file_checksum    BLAKE3(every byte of the file before this field)

Nothing here imports Trio: the daemon-facing part (taking the cut) is in
service/; restoring writes a ring file with ioring's own writer.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator

import blake3
import zstandard
from ringtail.ioring.errors import RingCorruptError, RingFormatError
from ringtail.ioring.files import write_file_atomically
from ringtail.ioring.record import RECORD_SIZE_BYTES

__all__ = [
    "SNAPSHOT_CHUNK_RECORD_COUNT_MAX", "SNAPSHOT_FORMAT_VERSION", "SNAPSHOT_MAGIC",
    "SnapshotCorruptError", "SnapshotFormatError", "SnapshotHeader", "SnapshotInfo",
    "SnapshotWriter", "inspect_snapshot", "is_snapshot_file", "iter_snapshot_chunks", "read_snapshot_header",
    "verify_snapshot", "write_snapshot",
]

SNAPSHOT_MAGIC = b"RTSNAP\r\n"  # \r\n: a text-mode copy that mangles line ends is caught
SNAPSHOT_FORMAT_VERSION = 1
SNAPSHOT_HEADER_SIZE_BYTES = 128
CHUNK_MAGIC = b"RTSC"
CHUNK_HEADER_SIZE_BYTES = 40
TRAILER_MAGIC = b"RTSNEND\0"
TRAILER_SIZE_BYTES = 64
CHECKSUM_SIZE_BYTES = 16
FILE_CHECKSUM_SIZE_BYTES = 32
SOURCE_NODE_SIZE_BYTES = 32
# Records per compressed chunk: 16,384 x 64 B = 1 MiB uncompressed. A reader
# holds one chunk (its compressed and uncompressed bytes, about 2 MiB) at a
# time; larger chunks compress a little better but cost more reader memory
# and make a damaged chunk lose more.
SNAPSHOT_CHUNK_RECORD_COUNT_MAX = 16_384
SNAPSHOT_CHUNK_SIZE_BYTES_MAX = SNAPSHOT_CHUNK_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
# The largest compressed chunk a reader accepts: zstd's worst case for 1 MiB
# of incompressible input is ZSTD_compressBound(1 MiB) = 1 MiB + 4 KiB + a few
# bytes; 1 MiB + 64 KiB covers it with room, and keeps a damaged size field
# from making a reader allocate more.
SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX = SNAPSHOT_CHUNK_SIZE_BYTES_MAX + 65_536
# zstd level 3 (its default): measured on the demo's records, levels above it
# gain under 2 % in size for several times the CPU.
SNAPSHOT_ZSTD_LEVEL = 3

_HEADER = struct.Struct("<8sIIIIQQQQ32s24s")
_CHUNK_HEAD = struct.Struct("<4sIQII")
_TRAILER_HEAD = struct.Struct("<8sQQQ")
assert _HEADER.size + CHECKSUM_SIZE_BYTES == SNAPSHOT_HEADER_SIZE_BYTES
assert _CHUNK_HEAD.size + CHECKSUM_SIZE_BYTES == CHUNK_HEADER_SIZE_BYTES
assert _TRAILER_HEAD.size + FILE_CHECKSUM_SIZE_BYTES == TRAILER_SIZE_BYTES
assert SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX < 1 << 32  # fits compressed_size (u32)
assert SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX > SNAPSHOT_CHUNK_SIZE_BYTES_MAX + \
    SNAPSHOT_CHUNK_SIZE_BYTES_MAX // 256 + 512  # above ZSTD_compressBound


class SnapshotFormatError(RingFormatError):
    """Not a snapshot ringtail can read (magic, version, header fields)."""


class SnapshotCorruptError(RingCorruptError):
    """A snapshot's bytes failed a checksum, a size or a position check (names the offset)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotHeader:
    tenant_id: int
    first_sequence: int
    record_count: int
    created_ns: int
    source_node: str
    chunk_record_count_max: int = SNAPSHOT_CHUNK_RECORD_COUNT_MAX
    format_version: int = SNAPSHOT_FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        return -(-self.record_count // self.chunk_record_count_max)

    @property
    def next_sequence(self) -> int:
        """The sequence after the last record (the cut)."""
        return self.first_sequence + self.record_count

    def encode(self) -> bytes:
        node = self.source_node.encode()[:SOURCE_NODE_SIZE_BYTES]
        body = _HEADER.pack(SNAPSHOT_MAGIC, self.format_version, SNAPSHOT_HEADER_SIZE_BYTES,
                            self.tenant_id, self.chunk_record_count_max, self.first_sequence,
                            self.record_count, self.chunk_count, self.created_ns,
                            node.ljust(SOURCE_NODE_SIZE_BYTES, b"\0"), bytes(24))
        return body + _checksum(body)


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a full verification found (every check passed)."""

    path: str
    header: SnapshotHeader
    file_size_bytes: int
    uncompressed_size_bytes: int

    @property
    def compression_ratio(self) -> float:
        return self.uncompressed_size_bytes / max(1, self.file_size_bytes)

    def rows(self) -> list[tuple[str, str]]:
        header = self.header
        last = (str(header.next_sequence - 1) if header.record_count else "none (empty)")
        return [
            ("path", self.path),
            ("kind", "snapshot"),
            ("format version", str(header.format_version)),
            ("tenant id", str(header.tenant_id)),
            ("first sequence", str(header.first_sequence)),
            ("last sequence", last),
            ("records", str(header.record_count)),
            ("chunks", f"{header.chunk_count} of up to {header.chunk_record_count_max} records"),
            ("created", str(header.created_ns)),
            ("source node", header.source_node),
            ("file size", f"{self.file_size_bytes} bytes"),
            ("compression", f"{self.compression_ratio:.2f}x "
                            f"({self.uncompressed_size_bytes} bytes of records)"),
        ]


def _checksum(*parts: bytes | memoryview) -> bytes:
    hasher = blake3.blake3()
    for part in parts:
        hasher.update(part)
    return hasher.digest(CHECKSUM_SIZE_BYTES)


def is_snapshot_file(path: str | os.PathLike) -> bool:
    """True if the file starts with SNAPSHOT_MAGIC (nothing else is checked)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(SNAPSHOT_MAGIC)) == SNAPSHOT_MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


# -- writing ------------------------------------------------------------------------


class SnapshotWriter:
    """Writes one snapshot through a file descriptor, chunk by chunk.

    The header is written first, so the record range must be known up
    front: `add()` takes the records in sequence order and `finish()` checks
    that exactly `record_count` came, then writes the trailer.
    """

    def __init__(self, fd: int, header: SnapshotHeader):
        assert 1 <= header.chunk_record_count_max <= SNAPSHOT_CHUNK_RECORD_COUNT_MAX
        self._fd = fd
        self.header = header
        self._hasher = blake3.blake3()
        self._compressor = zstandard.ZstdCompressor(level=SNAPSHOT_ZSTD_LEVEL)
        self._pending = bytearray()
        self._next_sequence = header.first_sequence
        self._chunks = 0
        self.size_bytes = 0
        self._write(header.encode())

    def _write(self, data: bytes) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size_bytes += len(data)

    def add(self, records: bytes | memoryview) -> None:
        """Append records (whole 64-byte records, in sequence order)."""
        assert len(records) % RECORD_SIZE_BYTES == 0
        self._pending += records
        step = self.header.chunk_record_count_max * RECORD_SIZE_BYTES
        while len(self._pending) >= step:
            self._write_chunk(bytes(self._pending[:step]))
            del self._pending[:step]

    def _write_chunk(self, records: bytes) -> None:
        count = len(records) // RECORD_SIZE_BYTES
        compressed = self._compressor.compress(records)
        assert 0 < len(compressed) <= SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX
        head = _CHUNK_HEAD.pack(CHUNK_MAGIC, count, self._next_sequence, len(compressed), 0)
        self._write(head + _checksum(head, compressed, records))
        self._write(compressed)
        self._next_sequence += count
        self._chunks += 1

    def finish(self) -> None:
        """Write the last chunk and the trailer.

        Raises:
            ValueError: the records added are not exactly the header's count.
        """
        if self._pending:
            self._write_chunk(bytes(self._pending))
            self._pending.clear()
        header = self.header
        if self._next_sequence != header.next_sequence or self._chunks != header.chunk_count:
            raise ValueError(f"snapshot got records {header.first_sequence}.."
                             f"{self._next_sequence - 1}, its header promised "
                             f"{header.first_sequence}..{header.next_sequence - 1}")
        head = _TRAILER_HEAD.pack(TRAILER_MAGIC, self._chunks, header.record_count,
                                  self.size_bytes)
        self._hasher.update(head)
        data = head + self._hasher.digest(FILE_CHECKSUM_SIZE_BYTES)
        os.write(self._fd, data)
        self.size_bytes += len(data)


def write_snapshot(path: str | os.PathLike, header: SnapshotHeader,
                   chunks: Iterable[bytes | memoryview]) -> int:
    """Write a complete snapshot atomically (a temporary file, fsync, rename).

    Returns the file's size in bytes. An exception from `chunks` leaves no file.
    """
    size = 0

    def fill(fd: int) -> None:
        nonlocal size
        writer = SnapshotWriter(fd, header)
        for records in chunks:
            writer.add(records)
        writer.finish()
        size = writer.size_bytes

    write_file_atomically(path, fill)
    return size


def new_header(tenant_id: int, first_sequence: int, record_count: int,
               source_node: str | None = None) -> SnapshotHeader:
    return SnapshotHeader(tenant_id, first_sequence, record_count, time.time_ns(),
                          socket.gethostname() if source_node is None else source_node)


# -- reading ------------------------------------------------------------------------


def _decode_header(path: str, data: bytes, file_size_bytes: int) -> SnapshotHeader:
    if len(data) < SNAPSHOT_HEADER_SIZE_BYTES:
        raise SnapshotCorruptError(path, len(data), (
            f"file ends inside the {SNAPSHOT_HEADER_SIZE_BYTES}-byte header ({len(data)} "
            "bytes); the snapshot is truncated: copy it again"))
    (magic, version, header_size, tenant_id, chunk_max, first, count, chunk_count, created,
     node, _reserved) = _HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotFormatError(path, f"not a ringtail snapshot (magic {magic!r}, expected "
                                        f"{SNAPSHOT_MAGIC!r})")
    if _checksum(data[:_HEADER.size]) != data[_HEADER.size:SNAPSHOT_HEADER_SIZE_BYTES]:
        raise SnapshotCorruptError(path, 0, (
            "header checksum mismatch: the header bytes 0..127 were damaged; copy the "
            "snapshot again from its source"))
    if version != SNAPSHOT_FORMAT_VERSION or header_size != SNAPSHOT_HEADER_SIZE_BYTES:
        raise SnapshotFormatError(path, (
            f"snapshot format version {version} (header size {header_size}) is not "
            f"supported; this ringtail reads version {SNAPSHOT_FORMAT_VERSION}: upgrade it"))
    if not 1 <= chunk_max <= SNAPSHOT_CHUNK_RECORD_COUNT_MAX:
        raise SnapshotFormatError(path, (
            f"chunk_record_count_max {chunk_max} is outside 1..{SNAPSHOT_CHUNK_RECORD_COUNT_MAX}"))
    header = SnapshotHeader(tenant_id, first, count, created,
                            node.rstrip(b"\0").decode(errors="replace"), chunk_max, version)
    if header.chunk_count != chunk_count or first + count >= 1 << 64:
        raise SnapshotFormatError(path, (
            f"header fields disagree: {count} records in chunks of {chunk_max} make "
            f"{header.chunk_count} chunks, the header says {chunk_count}"))
    smallest = SNAPSHOT_HEADER_SIZE_BYTES + chunk_count * (CHUNK_HEADER_SIZE_BYTES + 1) \
        + TRAILER_SIZE_BYTES
    if file_size_bytes < smallest:
        raise SnapshotCorruptError(path, file_size_bytes, (
            f"file of {file_size_bytes} bytes is shorter than the {smallest} bytes "
            f"{chunk_count} chunks need at least; the snapshot is truncated: copy it again"))
    return header


def read_snapshot_header(path: str | os.PathLike) -> SnapshotHeader:
    """The validated header alone (for `inspect`-like listings; checks no chunk)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        return _decode_header(path, file.read(SNAPSHOT_HEADER_SIZE_BYTES), size)


def inspect_snapshot(path: str | os.PathLike) -> SnapshotInfo:
    """The header's facts (no chunk is read or checked: `verify_snapshot` does that)."""
    header = read_snapshot_header(path)
    return SnapshotInfo(os.fspath(path), header, os.path.getsize(path),
                        header.record_count * RECORD_SIZE_BYTES)


def _read_exact(file, path: str, offset: int, size: int, what: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise SnapshotCorruptError(path, offset + len(data), (
            f"file ends inside {what} (read {len(data)} of {size} bytes); the snapshot is "
            "truncated: copy it again"))
    return data


def iter_snapshot_chunks(path: str | os.PathLike,
                         progress: Callable[[int, int], None] | None = None
                         ) -> Iterator[tuple[int, bytes]]:
    """Yield (first_sequence, records) per chunk, each chunk verified before it is yielded.

    The whole-file checksum and the trailer are checked after the last chunk,
    so a consumer that must not act on a damaged file verifies it first
    (`verify_snapshot`) or acts only once this iterator is exhausted.

    Raises:
        SnapshotFormatError: not a snapshot, or an unsupported version.
        SnapshotCorruptError: any check failed; names the offset.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        header_bytes = file.read(SNAPSHOT_HEADER_SIZE_BYTES)
        header = _decode_header(path, header_bytes, file_size)
        hasher = blake3.blake3(header_bytes)
        decompressor = zstandard.ZstdDecompressor()
        offset = SNAPSHOT_HEADER_SIZE_BYTES
        sequence = header.first_sequence
        for chunk_index in range(header.chunk_count):
            head = _read_exact(file, path, offset, CHUNK_HEADER_SIZE_BYTES,
                               f"the header of chunk {chunk_index}")
            magic, count, first, compressed_size, _ = _CHUNK_HEAD.unpack_from(head)
            expected_count = min(header.chunk_record_count_max, header.next_sequence - sequence)
            if (magic != CHUNK_MAGIC or count != expected_count or first != sequence
                    or not 0 < compressed_size <= SNAPSHOT_CHUNK_COMPRESSED_SIZE_BYTES_MAX):
                raise SnapshotCorruptError(path, offset, (
                    f"chunk {chunk_index} header is damaged (magic {magic!r}, {count} records "
                    f"from sequence {first}, {compressed_size} compressed bytes; expected "
                    f"{expected_count} records from {sequence}); copy the snapshot again"))
            compressed = _read_exact(file, path, offset + CHUNK_HEADER_SIZE_BYTES,
                                     compressed_size, f"chunk {chunk_index}")
            try:
                records = decompressor.decompress(compressed,
                                                  max_output_size=count * RECORD_SIZE_BYTES)
            except zstandard.ZstdError as error:
                raise SnapshotCorruptError(path, offset, (
                    f"chunk {chunk_index} (sequences {first}..{first + count - 1}) does not "
                    f"decompress ({error}); the bytes were damaged: copy the snapshot "
                    "again")) from None
            if (len(records) != count * RECORD_SIZE_BYTES
                    or _checksum(head[:_CHUNK_HEAD.size], compressed, records)
                    != head[_CHUNK_HEAD.size:]):
                raise SnapshotCorruptError(path, offset, (
                    f"chunk {chunk_index} (sequences {first}..{first + count - 1}) failed its "
                    "checksum; the bytes were damaged: copy the snapshot again"))
            hasher.update(head)
            hasher.update(compressed)
            yield first, records
            offset += CHUNK_HEADER_SIZE_BYTES + compressed_size
            sequence += count
            if progress is not None:
                progress(sequence - header.first_sequence, header.record_count)
        trailer = _read_exact(file, path, offset, TRAILER_SIZE_BYTES, "the trailer")
        magic, chunk_count, record_count, trailer_offset = _TRAILER_HEAD.unpack_from(trailer)
        hasher.update(trailer[:_TRAILER_HEAD.size])
        if (magic, chunk_count, record_count, trailer_offset) != (
                TRAILER_MAGIC, header.chunk_count, header.record_count, offset):
            raise SnapshotCorruptError(path, offset, (
                f"trailer is damaged (magic {magic!r}, {chunk_count} chunks, {record_count} "
                f"records, offset {trailer_offset}; expected {header.chunk_count}, "
                f"{header.record_count}, {offset}); copy the snapshot again"))
        if hasher.digest(FILE_CHECKSUM_SIZE_BYTES) != trailer[_TRAILER_HEAD.size:]:
            raise SnapshotCorruptError(path, offset, (
                "whole-file checksum mismatch: the file was changed after it was written; "
                "copy the snapshot again"))
        if file_size != offset + TRAILER_SIZE_BYTES:
            raise SnapshotCorruptError(path, offset + TRAILER_SIZE_BYTES, (
                f"{file_size - offset - TRAILER_SIZE_BYTES} bytes follow the trailer; a "
                "snapshot ends with its trailer: copy it again"))


def verify_snapshot(path: str | os.PathLike,
                    progress: Callable[[int, int], None] | None = None) -> SnapshotInfo:
    """Check every byte of a snapshot (memory: one chunk at a time).

    Raises:
        SnapshotFormatError, SnapshotCorruptError: as `iter_snapshot_chunks`.
    """
    path = os.fspath(path)
    uncompressed = 0
    for _, records in iter_snapshot_chunks(path, progress):
        uncompressed += len(records)
    header = read_snapshot_header(path)
    return SnapshotInfo(path, header, os.stat(path).st_size, uncompressed)
