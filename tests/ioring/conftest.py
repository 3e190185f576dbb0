"""Shared fixtures for the storage-engine tests.

The engine is imported as `ringtail.ioring` (its installed name; the
repository keeps it at ioring/).
"""

from __future__ import annotations

import os

import pytest

from ringtail.ioring.record import SlotRecord

TENANT_ID = 7
IO_BACKENDS = ("uring", "threads")


@pytest.fixture(params=IO_BACKENDS)
def io(request) -> str:
    """Run the test once per I/O backend, both for real (tests/conftest.py checks
    that io_uring works here, or that the run opted out and says why)."""
    if request.param == "uring":
        from tests.conftest import require_uring
        require_uring()
    return request.param


@pytest.fixture
def ring_path(tmp_path) -> str:
    """Where a test's ring file goes (it does not exist yet)."""
    return os.fspath(tmp_path / "tenant.ring")


def make_record(number: int, tenant_id: int = TENANT_ID) -> bytes:
    """One well-formed slot record; records with different numbers differ."""
    return SlotRecord(tenant_id=tenant_id, opcode=number & 0xFFFF_FFFF,
                      timestamp_ns=number, slot_idx=number & 0xFFFF_FFFF).encode()


def make_records(first_number: int, count: int, tenant_id: int = TENANT_ID) -> bytes:
    """`count` distinct records numbered first_number, first_number + 1, ..."""
    return b"".join(make_record(number, tenant_id)
                    for number in range(first_number, first_number + count))


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (damage the stored bytes)."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        assert len(old) == 1, f"offset {offset} is past the end of {path}"
        os.pwrite(fd, bytes([old[0] ^ mask]), offset)
    finally:
        os.close(fd)


def read_bytes(path: str, size: int, offset: int) -> bytes:
    """`size` bytes of a file at `offset` (inspect what is stored)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def write_bytes(path: str, data: bytes, offset: int) -> None:
    """Overwrite a file's bytes at `offset` in place (craft or damage what is stored)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
