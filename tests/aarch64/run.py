"""Run tests/aarch64/check_binding.py under qemu-aarch64 with Debian's arm64 CPython.

`make check-aarch64` runs this, and so does `make test`
(tests/ioring/test_aarch64_path.py): it adds arm64 as a dpkg foreign
architecture (root or sudo, once), downloads arm64 .debs and the arm64 numpy
and blake3 wheels, and takes about half a minute the first time.

Why: ioring/uring_abi.py has an aarch64-only path (libatomic acquire/release
for the ring indices) that no x86_64 machine executes, and NVIDIA Grace hosts
are aarch64. qemu-user runs it for real: the same libatomic, the same ctypes.

The sysroot (default build/aarch64-sysroot, ignored by git; set
RINGTAIL_AARCH64_SYSROOT to move it) holds two trees extracted with `dpkg -x`
from the same .debs, `with-libatomic/` and `without-libatomic/` (every package
but libatomic1), and `site/` with the unzipped wheels. A stamp file records what
was fetched; a later run reuses it, `--rebuild` fetches again.

Output: progress on stderr; on stdout one JSON line per emulated run (from
check_binding.py), then a summary line with the layout comparison against this
host's structs and the time each step took. Exit status 0 only if every check
passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
import time
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
REPOSITORY_ROOT = HERE.parents[1]
SYSROOT_ENVIRONMENT_VARIABLE = "RINGTAIL_AARCH64_SYSROOT"
DEFAULT_SYSROOT = REPOSITORY_ROOT / "build" / "aarch64-sysroot"
STAMP_NAME = "stamp.json"

# The minimal set of arm64 packages, each checked by leaving it out (measured
# with Debian 12's 3.11.2): without any one the checks cannot run.
DEBIAN_PACKAGES = (
    "python3.11-minimal",  # /usr/bin/python3.11
    "libpython3.11-minimal",  # the core standard library (encodings, os, importlib)
    "libpython3.11-stdlib",  # ctypes, mmap, json, argparse
    "libc6",  # libc, libm, ld-linux-aarch64.so.1
    "zlib1g",  # the interpreter is linked to libz.so.1
    "libexpat1",  # and to libexpat.so.1
    "libffi8",  # _ctypes
    "libatomic1",  # under test: __atomic_load_4 / __atomic_store_4
    # numpy's wheel (import package): its extensions need libgcc_s.so.1.
    # libstdc++6 is needed only by numpy.fft, which ioring never imports.
    "libgcc-s1",
)
LIBATOMIC_PACKAGE = "libatomic1"
WHEELS = ("numpy", "blake3")  # what ioring/__init__.py imports beyond the stdlib
WHEEL_PLATFORM = "manylinux2014_aarch64"
PYTHON_VERSION = "3.11"  # Debian 12's python3.11, the interpreter in the sysroot
# One emulated run; measured 5 s (files) and 9 s (package, numpy's import is
# most of it) on this machine, so this only stops a hang.
QEMU_RUN_TIMEOUT_S = 180
# apt-get update, download and pip download: network-bound, measured 2-5 s.
FETCH_TIMEOUT_S = 900


def log(message: str) -> None:
    print(f"check-aarch64: {message}", file=sys.stderr, flush=True)


def run(command: list[str], timeout_s: float, root: bool = False,
        cwd: pathlib.Path | None = None) -> str:
    """Run `command` (with sudo when `root` and we are not root); returns stdout."""
    if root and os.geteuid() != 0:
        command = ["sudo", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                            cwd=cwd, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"check-aarch64: {' '.join(command)} exited with status "
                         f"{result.returncode}:\n{result.stderr.strip()}")
    return result.stdout


def ensure_arm64_apt() -> None:
    """Make `apt-get download PACKAGE:arm64` work: the architecture and its lists."""
    native = run(["dpkg", "--print-architecture"], 60).strip()
    foreign = run(["dpkg", "--print-foreign-architectures"], 60).split()
    if native != "arm64" and "arm64" not in foreign:
        log("adding arm64 as a dpkg foreign architecture (dpkg --add-architecture arm64)")
        run(["dpkg", "--add-architecture", "arm64"], 60, root=True)
    policy = run(["apt-cache", "policy", "python3.11-minimal:arm64"], 60)
    if "Candidate:" not in policy or "Candidate: (none)" in policy:
        log("fetching the arm64 package lists (apt-get update)")
        run(["apt-get", "update", "-q"], FETCH_TIMEOUT_S, root=True)


def fetch_debs(directory: pathlib.Path) -> list[str]:
    directory.mkdir(parents=True)
    command = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # apt drops to the _apt user to download, which cannot write here;
        # we are root already, so the sandbox buys nothing.
        command += ["-o", "APT::Sandbox::User=root"]
    log(f"downloading {len(DEBIAN_PACKAGES)} arm64 packages (apt-get download)")
    run(command + [f"{name}:arm64" for name in DEBIAN_PACKAGES], FETCH_TIMEOUT_S,
        cwd=directory)
    return sorted(path.name for path in directory.glob("*.deb"))


def extract_debs(debs: pathlib.Path, target: pathlib.Path, skip: str | None) -> None:
    target.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        if skip is not None and deb.name.startswith(f"{skip}_"):
            continue
        run(["dpkg", "-x", str(deb), str(target)], 120)


def fetch_wheels(wheels: pathlib.Path) -> list[str]:
    log(f"downloading arm64 wheels of {', '.join(WHEELS)} (pip download)")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version",
         PYTHON_VERSION, "--implementation", "cp", "-d", str(wheels), *WHEELS],
        FETCH_TIMEOUT_S)
    names = sorted(path.name for path in wheels.glob("*.whl"))
    assert len(names) == len(WHEELS), names
    return names


def unzip_wheels(wheels: pathlib.Path, site: pathlib.Path) -> None:
    site.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)


def build_sysroot(sysroot: pathlib.Path, with_wheels: bool, timings: dict) -> dict:
    """Fetch and extract everything into `sysroot`; returns the stamp it wrote."""
    if sysroot.exists():
        shutil.rmtree(sysroot)
    sysroot.mkdir(parents=True)
    started = time.monotonic()
    ensure_arm64_apt()
    timings["apt_lists_s"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    debs = fetch_debs(sysroot / "debs")
    timings["deb_download_s"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    extract_debs(sysroot / "debs", sysroot / "with-libatomic", None)
    extract_debs(sysroot / "debs", sysroot / "without-libatomic", LIBATOMIC_PACKAGE)
    timings["deb_extract_s"] = round(time.monotonic() - started, 2)
    wheels: list[str] = []
    if with_wheels:
        started = time.monotonic()
        wheels = fetch_wheels(sysroot / "wheels")
        timings["wheel_download_s"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        unzip_wheels(sysroot / "wheels", sysroot / "site")
        timings["wheel_unzip_s"] = round(time.monotonic() - started, 2)
    stamp = {"packages": list(DEBIAN_PACKAGES), "debs": debs, "wheels": wheels}
    (sysroot / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def reusable(sysroot: pathlib.Path, with_wheels: bool) -> dict | None:
    """The stamp of a complete earlier build for the same packages, or None."""
    try:
        stamp = json.loads((sysroot / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("packages") != list(DEBIAN_PACKAGES) or (with_wheels and not stamp["wheels"]):
        return None
    if not all((sysroot / tree / "usr/bin/python3.11").exists()
               for tree in ("with-libatomic", "without-libatomic")):
        return None
    return stamp


PRINT_LOCK = threading.Lock()


def emulated_check(sysroot: pathlib.Path, tree: str, import_mode: str, expect: str,
                   timings: dict) -> dict:
    """One run of check_binding.py under qemu-aarch64; returns its JSON report."""
    root = sysroot / tree
    command = ["qemu-aarch64", "-L", str(root), str(root / "usr/bin/python3.11"),
               "-I", "-B",  # isolated from this host's environment; no .pyc in the tree
               "-X", "faulthandler",  # a native crash names its Python frame on stderr
               str(HERE / "check_binding.py"), "--root", str(REPOSITORY_ROOT),
               "--import", import_mode, "--expect", expect]
    if import_mode == "package":
        command += ["--site", str(sysroot / "site")]
    log(f"running check_binding.py --expect {expect} under qemu-aarch64 ({tree})")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=QEMU_RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    timings[f"run_{expect}_s"] = round(time.monotonic() - started, 2)
    lines = result.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"check-aarch64: check_binding.py ({expect}) exited with status "
                         f"{result.returncode} and no report:\n{result.stderr.strip()}")
    with PRINT_LOCK:  # the two checks run at once (main); one whole line each
        print(json.dumps(report, sort_keys=True), flush=True)
    assert report["ok"] == (result.returncode == 0), (report["ok"], result.returncode)
    return report


def host_layout() -> dict:
    """This host's layout of the same structs (x86_64 on our machines)."""
    sys.path.insert(0, str(HERE))
    import check_binding
    check_binding.import_ioring(str(REPOSITORY_ROOT), "files", None)
    from ringtail.ioring import uring_abi
    return check_binding.binding_layout(uring_abi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--import", dest="import_mode", choices=("package", "files"),
                        default="package",
                        help="package: the real ioring package with arm64 numpy and blake3 "
                             "wheels (default); files: only the binding's modules, no PyPI")
    parser.add_argument("--rebuild", action="store_true", help="fetch and extract again")
    arguments = parser.parse_args(argv)
    if shutil.which("qemu-aarch64") is None:
        raise SystemExit("check-aarch64: qemu-aarch64 is missing; apt-get install qemu-user "
                         "(make test-tools does it on x86_64)")
    sysroot = pathlib.Path(os.environ.get(SYSROOT_ENVIRONMENT_VARIABLE) or DEFAULT_SYSROOT)
    with_wheels = arguments.import_mode == "package"
    timings: dict = {}
    stamp = None if arguments.rebuild else reusable(sysroot, with_wheels)
    if stamp is None:
        started = time.monotonic()
        stamp = build_sysroot(sysroot, with_wheels, timings)
        timings["sysroot_build_s"] = round(time.monotonic() - started, 2)
    else:
        log(f"reusing the sysroot in {sysroot} (--rebuild fetches again)")
    # Two independent emulated processes (5-10 s each): run at once.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        checks = [pool.submit(emulated_check, sysroot, "with-libatomic", arguments.import_mode,
                              "libatomic", timings),
                  pool.submit(emulated_check, sysroot, "without-libatomic",
                              arguments.import_mode, "no-libatomic", timings)]
        reports = [check.result() for check in checks]
    host = host_layout()
    layouts_match = all(report.get("layout") == host for report in reports)
    summary = {"summary": True, "host_machine": platform.machine(), "sysroot": str(sysroot),
               "debs": stamp["debs"], "wheels": stamp["wheels"],
               "layout_matches_host": layouts_match, "timings": timings,
               "failed": sorted(f"{report['expect']}:{name}" for report in reports
                                for name, check in report["checks"].items() if not check["ok"])}
    summary["ok"] = layouts_match and all(report["ok"] for report in reports)
    print(json.dumps(summary, sort_keys=True), flush=True)
    log("all checks passed" if summary["ok"] else f"FAILED: {', '.join(summary['failed'])}"
        + ("" if layouts_match else "; struct layout differs from this host's"))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
