"""Whole files written atomically: a reader, or a crash, sees the old file or the new one.

One recipe for every file written whole (a new ring file, a VRRL export, the
benchmark doc): create a temporary file in the same directory (O_EXCL |
O_NOFOLLOW: never an existing file, never through a planted symlink), fill
it, fsync it, rename it into place (or link it, to refuse an existing file),
then fsync the directory so that the new name survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from typing import Callable

# Random bytes in a default temporary name (16 hex digits): two writers never
# pick the same name by chance, and O_EXCL refuses one that exists anyway.
TEMPORARY_NAME_TOKEN_SIZE_BYTES = 8

_TEMPORARY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# link(2) errors of a file system without hard links (vfat, some FUSE mounts):
# there, refusing an existing file falls back to a check before the rename.
_NO_HARD_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def write_file_atomically(path: str | os.PathLike,
                          contents: bytes | bytearray | memoryview | Callable[[int], None], *,
                          replace: bool = True, temporary_path: str | None = None,
                          temporary_suffix: str = ".tmp", mode: int = 0o600) -> None:
    """Put a complete file at `path`, or leave `path` as it was.

    Args:
        path: the file to create (or replace).
        contents: the bytes, or a function that fills the file through its
            descriptor (open for writing; it may also size it, e.g. fallocate).
        replace: False refuses an existing `path`: the temporary file is
            hard-linked to `path`, which fails if `path` exists, then unlinked.
        temporary_path: the temporary file, in `path`'s directory; by default
            `.<name>.<16 hex digits><temporary_suffix>` beside `path`.
        temporary_suffix: the end of a default temporary name.
        mode: permission bits of the new file (the umask applies).

    Raises:
        FileExistsError: `replace` is False and `path` exists, or
            `temporary_path` exists (a creation in progress, or a stale one
            the caller should remove first).
        OSError: writing, syncing or renaming failed; the temporary file is
            removed and `path` is as it was.

    Error handling: whatever fails before the rename (including a function
    passed as `contents`) removes the temporary file and propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if temporary_path is None:
        token = secrets.token_hex(TEMPORARY_NAME_TOKEN_SIZE_BYTES)
        temporary_path = os.path.join(
            directory, f".{os.path.basename(path)}.{token}{temporary_suffix}")
    # A rename is atomic only inside one directory (one file system).
    assert os.path.dirname(os.path.abspath(temporary_path)) == directory
    fd = os.open(temporary_path, _TEMPORARY_FLAGS, mode)
    published = False
    try:
        try:
            if callable(contents):
                contents(fd)
            else:
                _write_all(fd, contents)
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(temporary_path, path, replace)
        published = True
    finally:
        if not published:  # cleanup only: the exception propagates
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary_path)
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make the directory's entries (a created or renamed name) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temporary_path: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(temporary_path, path)
        return
    try:
        os.link(temporary_path, path, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{path} exists; it was left as it is",
                              path) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINK_ERRNOS:
            raise
        # No hard links here: check, then rename (a creator racing between
        # the two could be replaced; one writer per directory avoids that).
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, f"{path} exists; it was left as it is",
                                  path) from None
        os.rename(temporary_path, path)
        return
    os.unlink(temporary_path)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (it may write fewer than asked)."""
    with memoryview(data).cast("B") as view:
        written = 0
        while written < len(view):
            count = os.write(fd, view[written:])
            if count == 0:  # never for a regular file; do not spin on it
                raise OSError(errno.EIO, f"write wrote nothing ({written} of {len(view)} bytes)")
            written += count
