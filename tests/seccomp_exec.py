"""Run a command with io_uring refused by seccomp, as Docker's default profile does.

Usage: python tests/seccomp_exec.py COMMAND [ARGUMENT...]

Installs a seccomp filter that allows every system call except
io_uring_setup, io_uring_enter and io_uring_register, which fail with EPERM
(what Docker >= 25 and containerd 2 do by default), then execs COMMAND in
this process. A seccomp filter survives exec and is inherited by children, so
COMMAND and everything it starts run under it; it cannot be removed.

The filter is built by PyPI `pyseccomp` (pure Python, ctypes over the
system's libseccomp.so.2: Debian's libseccomp2). libseccomp sets
PR_SET_NO_NEW_PRIVS before loading it, so no privilege is needed.

Exit status 2 with a message on stderr when the filter cannot be installed;
otherwise the process becomes COMMAND.
"""

from __future__ import annotations

import errno
import os
import sys

REFUSED_SYSCALL_NAMES = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def install_filter() -> None:
    """Refuse the io_uring system calls with EPERM in this process and its future children."""
    import pyseccomp

    syscall_filter = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in REFUSED_SYSCALL_NAMES:
        syscall_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    syscall_filter.load()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: {argv[0]} COMMAND [ARGUMENT...]", file=sys.stderr)
        return 2
    try:
        install_filter()
    except ImportError as error:
        print(f"seccomp_exec: {error}; install the test extra (`make test`, or "
              f"`pip install -e '.[test]'`), which has pyseccomp", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as error:
        print(f"seccomp_exec: cannot install the seccomp filter ({error}); it needs "
              f"libseccomp.so.2 (Debian: libseccomp2) and a kernel with seccomp filters",
              file=sys.stderr)
        return 2
    try:
        os.execvp(argv[1], argv[1:])
    except OSError as error:
        print(f"seccomp_exec: cannot run {argv[1]!r}: {error}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
