"""A test-only io_uring binding that dies by a real SIGILL at set-up.

Like the PyPI liburing 2026 wheels on a CPU without AVX-512: the probe child
(ioring/probe.py) imports it through RINGTAIL_TEST_URING_BINDING and executes
an illegal instruction (x86-64 `ud2`, aarch64 `udf #0`) from an executable
page, so the kernel kills the child with SIGILL. Never used by the daemon.
"""

import ctypes
import mmap
import platform

_ILLEGAL = {"x86_64": b"\x0f\x0b", "aarch64": b"\x00\x00\x00\x00"}


class UringBackend:
    def __init__(self) -> None:
        code = _ILLEGAL[platform.machine()]
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        ctypes.CFUNCTYPE(None)(address)()  # SIGILL: the process ends here
        raise AssertionError("an illegal instruction ran")
