"""The io_uring binding's aarch64 path, run for real inside an emulated aarch64 Python.

Run by tests/aarch64/run.py as `qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11
-I -B tests/aarch64/check_binding.py ...` with Debian's arm64 CPython. It prints
one JSON line: each check's verdict ("ok", plus "detail" or "error"), the
structs' layout (compared with the host's by the runner), and "ok" for all of
them; the exit status is 0 only if every check passed.

Checks with libatomic in the sysroot (`--expect libatomic`):

- machine: platform.machine() is aarch64 and uring_abi chose by it;
- ordering_kind: `_Ordering()` takes the libatomic path;
- acquire_release: store_release then load_acquire round-trip several u32
  values (0 and 0xFFFFFFFF among them) in a c_uint32 buffer and touch only
  those 4 bytes;
- ring_enosys: `Ring(8)` raises OSError ENOSYS (qemu-user has no io_uring);
- backend_enosys: `UringBackend()` raises BackendUnavailableError naming ENOSYS.

Without libatomic (`--expect no-libatomic`):

- ordering_refused: `_Ordering()` raises BackendUnavailableError that says to
  install libatomic1;
- backend_refused_twice: `UringBackend()` raises that error, and again on a
  second call in the same process (the daemon may open several rings).

Both: layout: the kernel-ABI structs have the sizes the kernel's header gives
(Params 120, Sqe 64, Cqe 16, the offset structs 40); the module also asserts
this at import.

`--import package` imports the real `ioring` package (numpy and blake3 arm64
wheels in `--site`); `--import files` skips ioring/__init__.py (and so numpy
and blake3) and imports only the modules the binding needs. The mode is named
in the output: nothing falls back silently.

This file runs on the host too (the runner imports `binding_layout` from it),
so at module level it needs only the standard library.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import json
import os
import platform
import sys
import types

# Sizes from include/uapi/linux/io_uring.h, the same on every architecture.
ABI_SIZES_BYTES = {"Params": 120, "Sqe": 64, "Cqe": 16, "SqringOffsets": 40,
                   "CqringOffsets": 40}
# Values the acquire/release round trip stores: the extremes, each sign of a
# 32-bit int, and patterns whose bytes differ (a byte-order or width bug shows).
ROUND_TRIP_VALUES = (0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0x01020304, 0xFFFFFFFF)
# Neighbours on each side of the word under test; they must survive every store.
GUARD_LOW, GUARD_HIGH = 0xA5A5A5A5, 0x5A5A5A5A


def import_ioring(root: str, mode: str, site: str | None) -> types.ModuleType:
    """Make `ioring` importable from `root`; returns the package module."""
    if mode == "package":
        for directory in (site, root):
            if directory:
                sys.path.insert(0, directory)
        return importlib.import_module("ioring")
    # An empty package with the real directory as its path: submodules import
    # as usual, but ioring/__init__.py (numpy, blake3) never runs.
    package = types.ModuleType("ioring")
    package.__path__ = [os.path.join(root, "ioring")]
    package.__package__ = "ioring"
    sys.modules["ioring"] = package
    return package


def binding_layout(uring_abi: types.ModuleType) -> dict:
    """Size and field offsets of each kernel-ABI struct of the binding."""
    layout = {}
    for name in ABI_SIZES_BYTES:
        struct = getattr(uring_abi, name)
        layout[name] = {"size": ctypes.sizeof(struct),
                        "offsets": {field[0]: getattr(struct, field[0]).offset
                                    for field in struct._fields_}}
    return layout


def run_check(checks: dict, name: str, function) -> None:
    """Record `function()`'s detail, or the exception it raised, under `name`."""
    try:
        checks[name] = {"ok": True, "detail": function()}
    except Exception as error:  # reported in the JSON line, never swallowed
        checks[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}


def expect_raises(kind: type, function, *needles: str) -> str:
    """Call `function`; it must raise `kind` with every needle in its message."""
    try:
        function()
    except kind as error:
        missing = [needle for needle in needles if needle not in str(error)]
        assert not missing, f"{type(error).__name__} lacks {missing}: {error}"
        return f"{type(error).__name__}: {error}"
    raise AssertionError(f"{function} raised nothing; expected {kind.__name__}")


def check_machine(uring_abi) -> str:
    machine = platform.machine()
    assert machine == "aarch64", f"platform.machine() is {machine!r}, not 'aarch64'"
    assert uring_abi._MACHINE == "aarch64", uring_abi._MACHINE
    return machine


def check_layout(uring_abi) -> dict:
    layout = binding_layout(uring_abi)
    sizes = {name: layout[name]["size"] for name in layout}
    assert sizes == ABI_SIZES_BYTES, f"sizes {sizes} differ from the kernel's {ABI_SIZES_BYTES}"
    return sizes


def check_ordering_kind(uring_abi) -> str:
    ordering = uring_abi._Ordering()
    assert "aarch64" in ordering.kind and "libatomic" in ordering.kind, ordering.kind
    assert ordering.load_acquire is not uring_abi._plain_load
    assert ordering.store_release is not uring_abi._plain_store
    return ordering.kind


def check_acquire_release(uring_abi) -> str:
    ordering = uring_abi._Ordering()
    words = (ctypes.c_uint32 * 3)(GUARD_LOW, 0, GUARD_HIGH)
    address = ctypes.addressof(words) + ctypes.sizeof(ctypes.c_uint32)
    for value in ROUND_TRIP_VALUES:
        ordering.store_release(address, value)
        assert words[1] == value, f"store_release({value:#x}) left {words[1]:#x}"
        loaded = ordering.load_acquire(address)
        assert type(loaded) is int and loaded == value, (
            f"load_acquire gave {loaded!r}, not {value:#x}")
        assert (words[0], words[2]) == (GUARD_LOW, GUARD_HIGH), (
            f"storing {value:#x} changed a neighbour: {words[0]:#x} {words[2]:#x}")
    words[1] = 0x13579BDF  # a plain store, then the acquire load must see it
    assert ordering.load_acquire(address) == 0x13579BDF
    return f"{len(ROUND_TRIP_VALUES)} values round-tripped; neighbours unchanged"


def check_ring_enosys(uring_abi) -> str:
    try:
        ring = uring_abi.Ring(8)
    except OSError as error:
        assert error.errno == errno.ENOSYS, f"errno {error.errno}, not ENOSYS: {error}"
        assert "[ENOSYS]" in str(error), str(error)
        return f"OSError: {error}"
    ring.close()
    raise AssertionError("Ring(8) set up an io_uring; qemu-user has none")


def run_with_libatomic(uring_abi, uring, errors, checks: dict) -> None:
    run_check(checks, "ordering_kind", lambda: check_ordering_kind(uring_abi))
    run_check(checks, "acquire_release", lambda: check_acquire_release(uring_abi))
    run_check(checks, "ring_enosys", lambda: check_ring_enosys(uring_abi))
    run_check(checks, "backend_enosys", lambda: expect_raises(
        errors.BackendUnavailableError, uring.UringBackend, "[ENOSYS]"))


def run_without_libatomic(uring_abi, uring, errors, checks: dict) -> None:
    needles = ("libatomic", "apt-get install libatomic1")
    run_check(checks, "ordering_refused", lambda: expect_raises(
        errors.BackendUnavailableError, uring_abi._Ordering, *needles))
    run_check(checks, "backend_refused_twice", lambda: [expect_raises(
        errors.BackendUnavailableError, uring.UringBackend, *needles) for _ in range(2)][-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))), help="repository root holding ioring/")
    parser.add_argument("--import", dest="import_mode", choices=("package", "files"),
                        required=True)
    parser.add_argument("--site", help="directory with the arm64 numpy and blake3 (package)")
    parser.add_argument("--expect", choices=("libatomic", "no-libatomic"), required=True)
    arguments = parser.parse_args(argv)
    report = {"expect": arguments.expect, "import": arguments.import_mode,
              "python": sys.version.split()[0], "machine": platform.machine(), "checks": {}}
    checks = report["checks"]
    try:
        package = import_ioring(arguments.root, arguments.import_mode, arguments.site)
        uring_abi = importlib.import_module("ringtail.ioring.uring_abi")  # asserts the ABI sizes
        uring = importlib.import_module("ringtail.ioring.uring")
        errors = importlib.import_module("ringtail.ioring.errors")
    except Exception as error:  # reported below; nothing else can run
        checks["import"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    else:
        location = getattr(package, "__file__", None) or package.__path__[0]
        checks["import"] = {"ok": True, "detail": location}
        if arguments.import_mode == "package":
            numpy = sys.modules["numpy"]
            report["numpy"] = f"{numpy.__version__} from {os.path.dirname(numpy.__file__)}"
        report["layout"] = binding_layout(uring_abi)
        run_check(checks, "machine", lambda: check_machine(uring_abi))
        run_check(checks, "layout", lambda: check_layout(uring_abi))
        if arguments.expect == "libatomic":
            run_with_libatomic(uring_abi, uring, errors, checks)
        else:
            run_without_libatomic(uring_abi, uring, errors, checks)
    report["ok"] = all(check["ok"] for check in checks.values())
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
