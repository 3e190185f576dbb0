"""The io_uring kernel ABI, spoken directly through ctypes: no native code of ours.

Only ioring/uring.py imports this module. It binds the three syscalls
(io_uring_setup 425, io_uring_enter 426, io_uring_register 427: the same
numbers on x86_64 and aarch64, from asm-generic), maps the submission and
completion rings and the SQE array, and reads and writes the ring indices with
the memory ordering the kernel's ABI asks for. It loads only the C library
(and, on aarch64, libatomic); nothing here needs more than the baseline
instruction set of its architecture, so it cannot die with SIGILL the way the
2026 PyPI `liburing` wheels did (built for x86-64-v4, see
shared/notes/iouring-from-python.md). TigerBeetle (Zig's std.os.linux.IoUring)
and tokio (the `io-uring` crate) drive the kernel the same way, without C
liburing.

Memory ordering (the kernel side is io_uring/io_uring.c):

- CQ tail: the kernel writes a CQE, then store-releases the tail. We must
  load-acquire the tail before reading the CQEs it covers.
- CQ head: we must finish reading a CQE before the kernel may reuse its slot,
  so the head is store-released after the reads.
- SQ tail: with no SQPOLL thread, the kernel reads the SQ in our own thread,
  inside io_uring_enter, so program order suffices; we store-release it anyway
  so the ring stays correct if SQPOLL is ever turned on.

On x86-64 (TSO) an aligned 32-bit load is already an acquire and a store a
release, and a ctypes access is a real load or store (each is an opaque call,
so no compiler reorders across it): plain accesses are correct. On aarch64
they are not: there we call libatomic's `__atomic_load_4(ptr, ACQUIRE)` and
`__atomic_store_4(ptr, value, RELEASE)` (LDAR/STLR; the notes' sketch measured +4.7 us per chain for it; executed under
qemu-aarch64 by `make check-aarch64`, not yet on aarch64 hardware).
Any other architecture is refused with BackendUnavailableError rather than
run with guessed ordering.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import struct

from ringtail.ioring.errors import BackendUnavailableError

# -- syscall numbers (asm-generic/unistd.h; x86_64 uses the same three) --------
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

# -- opcodes and flags (include/uapi/linux/io_uring.h) ----------------------------
IORING_OP_NOP = 0
IORING_OP_FSYNC = 3
IORING_OP_READ = 22
IORING_OP_WRITE = 23

IOSQE_IO_LINK = 1 << 2
IOSQE_CQE_SKIP_SUCCESS = 1 << 6
IORING_FSYNC_DATASYNC = 1 << 0

IORING_ENTER_GETEVENTS = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1  # sq flags: CQEs wait in the kernel's overflow list
IORING_REGISTER_EVENTFD = 4

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_CQE_SKIP = 1 << 11  # Linux 5.17: IOSQE_CQE_SKIP_SUCCESS honoured
# What ringtail's chains need of the kernel; a kernel without them is refused
# at set-up (EINVAL-class refusal), never run with weaker semantics.
IORING_FEATURES_REQUIRED = IORING_FEAT_NODROP | IORING_FEAT_CQE_SKIP

SQE_SIZE_BYTES = 64
CQE_SIZE_BYTES = 16


class SqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class CqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", SqringOffsets), ("cq_off", CqringOffsets)]


class Sqe(ctypes.Structure):
    """struct io_uring_sqe, the fields a read, write, fsync or nop uses."""

    _fields_ = [("opcode", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("ioprio", ctypes.c_uint16), ("fd", ctypes.c_int32),
                ("off", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("op_flags", ctypes.c_uint32),
                ("user_data", ctypes.c_uint64), ("buf_index", ctypes.c_uint16),
                ("personality", ctypes.c_uint16), ("splice_fd_in", ctypes.c_int32),
                ("addr3", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


class Cqe(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


# The same layouts for the hot path (struct packs are ~5x cheaper than
# setting ctypes fields one by one).
_SQE_STRUCT = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE_STRUCT = struct.Struct("<QiI")

# The kernel ABI, checked at import (a wrong layout would write garbage SQEs).
assert ctypes.sizeof(SqringOffsets) == 40 and ctypes.sizeof(CqringOffsets) == 40
assert ctypes.sizeof(Params) == 120
assert ctypes.sizeof(Sqe) == SQE_SIZE_BYTES and Sqe.user_data.offset == 32
assert Sqe.op_flags.offset == 28 and Sqe.addr.offset == 16 and Sqe.len.offset == 24
assert ctypes.sizeof(Cqe) == CQE_SIZE_BYTES
assert _SQE_STRUCT.size == SQE_SIZE_BYTES and _CQE_STRUCT.size == CQE_SIZE_BYTES


def errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))


def os_error(value: int, what: str) -> OSError:
    """An OSError for errno `value` (PermissionError, InterruptedError, ... by errno)."""
    return OSError(value, f"{what}: {os.strerror(value)} [{errno_name(value)}]")


# -- the C library and the memory-ordering helpers ------------------------------

_MACHINE = platform.machine().lower()
_ATOMIC_ACQUIRE = 2  # __ATOMIC_ACQUIRE
_ATOMIC_RELEASE = 3  # __ATOMIC_RELEASE


def _load_libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class _Ordering:
    """load_acquire / store_release of a u32 in shared memory, per architecture.

    `machine` is this host's; tests pass "aarch64" on x86_64 to run the
    libatomic path against a real io_uring (libatomic's acquire/release are
    correct on x86_64 too, merely unneeded).
    """

    def __init__(self, machine: str = _MACHINE) -> None:
        if machine in ("x86_64", "amd64"):
            # TSO: plain aligned loads are acquires and stores are releases.
            self.load_acquire = _plain_load
            self.store_release = _plain_store
            self.kind = "plain (x86-64 TSO)"
        elif machine in ("aarch64", "arm64"):
            name = ctypes.util.find_library("atomic") or "libatomic.so.1"
            try:
                libatomic = ctypes.CDLL(name)
            except OSError as error:
                raise BackendUnavailableError(
                    f"io_uring needs libatomic on aarch64 for acquire/release ring "
                    f"indices, and it cannot be loaded ({error}); install it "
                    "(Debian/Ubuntu: apt-get install libatomic1)") from error
            # By item, not attribute: inside a class body `libatomic.__atomic_load_4`
            # would be name-mangled to `_Ordering__atomic_load_4`.
            load = libatomic["__atomic_load_4"]
            load.restype, load.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int]
            store = libatomic["__atomic_store_4"]
            store.restype = None
            store.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
            self.load_acquire = lambda address: load(address, _ATOMIC_ACQUIRE)
            self.store_release = lambda address, value: store(address, value, _ATOMIC_RELEASE)
            self.kind = "libatomic acquire/release (aarch64)"
        else:
            raise BackendUnavailableError(
                f"io_uring ring indices need acquire/release ordering and ringtail has "
                f"it only for x86_64 and aarch64, not {machine}; use --io threads")


def _plain_load(address: int) -> int:
    return ctypes.c_uint32.from_address(address).value


def _plain_store(address: int, value: int) -> None:
    ctypes.c_uint32.from_address(address).value = value


_libc = None
_ordering: _Ordering | None = None


def _runtime():
    """The C library and the ordering helpers, loaded once; a refusal is raised
    again on every call (nothing half-initialised is kept)."""
    global _libc, _ordering
    if _ordering is None:
        libc, ordering = _load_libc(), _Ordering()
        _libc, _ordering = libc, ordering
    return _libc, _ordering


class _Mapping:
    """One mmap of the ring fd, unmapped by close()."""

    def __init__(self, libc, fd: int, size: int, offset: int, what: str):
        address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, offset)
        if address in (None, ctypes.c_void_p(-1).value):
            raise os_error(ctypes.get_errno(), f"mmap of the io_uring {what}")
        self.libc, self.address, self.size = libc, address, size

    def close(self) -> None:
        if self.address is not None:
            self.libc.munmap(self.address, self.size)
            self.address = None


class Ring:
    """One io_uring instance: the fd, its three mappings, and raw SQE/CQE access.

    A thin layer: no chains, no buffers, no policy (ioring/uring.py has those).

    Resource handling: owns the ring fd and its mappings; `close()` unmaps
    them and closes the fd (the kernel then cancels or finishes what is in
    flight; callers must reap first so buffers outlive the kernel's use).

    Error handling: set-up failures raise OSError with the errno (EPERM under
    seccomp or kernel.io_uring_disabled, ENOSYS without io_uring or under
    qemu-user and gVisor, ENOMEM for locked memory on old kernels, EINVAL for
    flags this kernel lacks), or BackendUnavailableError when the kernel lacks
    a feature the chains need or the architecture has no ordering helpers.
    """

    def __init__(self, entries: int, ordering: _Ordering | None = None) -> None:
        assert entries > 0 and entries & (entries - 1) == 0, entries
        self.fd = -1
        self._mappings: list[_Mapping] = []
        self._sqe_bytes = self._cqe_bytes = None
        libc, default_ordering = _runtime()
        ordering = ordering or default_ordering
        self._libc = libc
        self._load_acquire = ordering.load_acquire
        self._store_release = ordering.store_release
        self.ordering = ordering.kind
        params = Params()
        fd = libc.syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries),
                          ctypes.byref(params))
        if fd < 0:
            raise os_error(ctypes.get_errno(), "io_uring_setup")
        self.fd = fd
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise
        self.features = params.features
        missing = IORING_FEATURES_REQUIRED & ~params.features
        if missing:
            self.close()
            raise BackendUnavailableError(
                f"this kernel's io_uring lacks features 0x{missing:x} (needs IORING_FEAT_NODROP "
                f"and IORING_FEAT_CQE_SKIP: Linux 5.17 or later); use --io threads")

    def _map(self, params: Params) -> None:
        libc = self._libc
        sq_size = params.sq_off.array + params.sq_entries * 4
        cq_size = params.cq_off.cqes + params.cq_entries * CQE_SIZE_BYTES
        if params.features & IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        sq = _Mapping(libc, self.fd, sq_size, IORING_OFF_SQ_RING, "submission ring")
        self._mappings.append(sq)
        if params.features & IORING_FEAT_SINGLE_MMAP:
            cq = sq
        else:
            cq = _Mapping(libc, self.fd, cq_size, IORING_OFF_CQ_RING, "completion ring")
            self._mappings.append(cq)
        sqes = _Mapping(libc, self.fd, params.sq_entries * SQE_SIZE_BYTES, IORING_OFF_SQES,
                        "SQE array")
        self._mappings.append(sqes)

        self.sq_entries = params.sq_entries
        self.cq_entries = params.cq_entries
        self._sq_head = sq.address + params.sq_off.head
        self._sq_tail = sq.address + params.sq_off.tail
        self._sq_flags = sq.address + params.sq_off.flags
        self._sq_mask = ctypes.c_uint32.from_address(sq.address + params.sq_off.ring_mask).value
        # The SQ index array maps ring slot i to SQE i, set once: an SQE is
        # always written in the slot its tail position names.
        self._sq_array = (ctypes.c_uint32 * params.sq_entries).from_address(
            sq.address + params.sq_off.array)
        for index in range(params.sq_entries):
            self._sq_array[index] = index
        self._sqes = (Sqe * params.sq_entries).from_address(sqes.address)
        # Byte views for the hot path: one struct pack per SQE, one unpack per CQE.
        self._sqe_bytes = memoryview((ctypes.c_char * (params.sq_entries * SQE_SIZE_BYTES))
                                     .from_address(sqes.address)).cast("B")
        self._cqe_bytes = memoryview((ctypes.c_char * (params.cq_entries * CQE_SIZE_BYTES))
                                     .from_address(cq.address + params.cq_off.cqes)).cast("B")
        self._cq_head = cq.address + params.cq_off.head
        self._cq_tail = cq.address + params.cq_off.tail
        self._cq_mask = ctypes.c_uint32.from_address(cq.address + params.cq_off.ring_mask).value
        self._cqes = (Cqe * params.cq_entries).from_address(cq.address + params.cq_off.cqes)
        # Our copy of the SQ tail: SQEs filled but not yet handed to the kernel.
        self._sq_tail_local = _plain_load(self._sq_tail)

    # -- submission ---------------------------------------------------------------

    def sq_space_left(self) -> int:
        """SQ slots free: entries minus SQEs the kernel has not consumed yet."""
        head = self._load_acquire(self._sq_head)
        return self.sq_entries - ((self._sq_tail_local - head) & 0xFFFFFFFF)

    def sqe_claim(self) -> Sqe:
        """The next free SQE, zeroed. The caller must check sq_space_left() first."""
        assert self.sq_space_left() > 0
        index = self._sq_tail_local & self._sq_mask
        sqe = self._sqes[index]
        ctypes.memset(ctypes.addressof(sqe), 0, SQE_SIZE_BYTES)
        self._sq_tail_local = (self._sq_tail_local + 1) & 0xFFFFFFFF
        return sqe

    def sqe_write(self, opcode: int, flags: int, fd: int, offset: int, address: int,
                  length: int, op_flags: int, user_data: int) -> None:
        """Fill the next free SQE in one pack (the hot path; sqe_claim() is the
        readable one). The caller must check sq_space_left() first."""
        index = self._sq_tail_local & self._sq_mask
        _SQE_STRUCT.pack_into(self._sqe_bytes, index * SQE_SIZE_BYTES, opcode, flags, 0, fd,
                              offset, address, length, op_flags, user_data, 0, 0, 0, 0, 0)
        self._sq_tail_local = (self._sq_tail_local + 1) & 0xFFFFFFFF

    def sq_pending(self) -> int:
        """SQEs claimed but not yet consumed by the kernel."""
        return (self._sq_tail_local - self._load_acquire(self._sq_head)) & 0xFFFFFFFF

    def sq_publish(self) -> int:
        """Make every claimed SQE visible to the kernel; returns how many are pending."""
        self._store_release(self._sq_tail, self._sq_tail_local)
        return self.sq_pending()

    def enter(self, to_submit: int, min_complete: int = 0, flags: int = 0) -> int:
        """io_uring_enter once. Returns SQEs consumed; raises OSError with the errno.

        EINTR, EAGAIN and EBUSY come back as InterruptedError / BlockingIOError /
        OSError(EBUSY) for the caller to retry; nothing was lost.
        """
        if min_complete:
            flags |= IORING_ENTER_GETEVENTS
        result = self._libc.syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_long(self.fd),
                                    ctypes.c_long(to_submit), ctypes.c_long(min_complete),
                                    ctypes.c_long(flags), ctypes.c_void_p(None),
                                    ctypes.c_long(0))
        if result < 0:
            raise os_error(ctypes.get_errno(), "io_uring_enter")
        return result

    # -- completion ---------------------------------------------------------------

    def cq_drain(self) -> list[tuple[int, int]]:
        """Every completion the kernel has posted, as (user_data, res), oldest first.

        CQEs that overflowed the completion ring (kept by the kernel, NODROP)
        are flushed back into it by an io_uring_enter with GETEVENTS, and read.
        """
        completions = self._cq_read()
        while self._load_acquire(self._sq_flags) & IORING_SQ_CQ_OVERFLOW:
            try:
                self.enter(0, 0, flags=IORING_ENTER_GETEVENTS)
            except InterruptedError:
                continue
            completions += self._cq_read()
        return completions

    def _cq_read(self) -> list[tuple[int, int]]:
        head = _plain_load(self._cq_head)  # only we write the head
        tail = self._load_acquire(self._cq_tail)
        if head == tail:
            return []
        completions = []
        view, mask, unpack = self._cqe_bytes, self._cq_mask, _CQE_STRUCT.unpack_from
        while head != tail:
            user_data, res, _ = unpack(view, (head & mask) * CQE_SIZE_BYTES)
            completions.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._store_release(self._cq_head, head)  # the slots may be reused now
        return completions

    def register_eventfd(self, event_fd: int) -> None:
        value = ctypes.c_int32(event_fd)
        result = self._libc.syscall(ctypes.c_long(SYS_IO_URING_REGISTER),
                                    ctypes.c_long(self.fd), ctypes.c_long(IORING_REGISTER_EVENTFD),
                                    ctypes.byref(value), ctypes.c_long(1))
        if result < 0:
            raise os_error(ctypes.get_errno(), "io_uring_register(IORING_REGISTER_EVENTFD)")

    def close(self) -> None:
        # Views into the mappings must not be used after unmapping.
        self._sqes = self._cqes = self._sq_array = None
        for view in (self._sqe_bytes, self._cqe_bytes):
            if view is not None:
                view.release()
        self._sqe_bytes = self._cqe_bytes = None
        for mapping in self._mappings:
            mapping.close()
        self._mappings.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def buffer_address(data: bytes) -> int:
    """Address of a bytes object's payload (valid while the object is referenced)."""
    assert type(data) is bytes
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
