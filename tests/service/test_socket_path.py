"""`serve --socket PATH` replaces only a stale socket, never anything else (issue 9, item 15).

Real daemon processes: a regular file, a FIFO and a symlink at the socket path
are refused with exit status 1 and a message naming the path and what is
there, and are left untouched; a stale socket (its daemon gone) is replaced.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from .conftest import short_socket_dir


def _make_regular(path: str) -> None:
    with open(path, "w") as file:
        file.write("precious data\n")


def _make_fifo(path: str) -> None:
    os.mkfifo(path)


def _make_symlink(path: str) -> None:
    target = path + ".target"
    _make_regular(target)
    os.symlink(target, path)


@pytest.mark.parametrize("make, kind", [(_make_regular, "a regular file"),
                                        (_make_fifo, "a FIFO"),
                                        (_make_symlink, "a symbolic link")],
                         ids=["regular-file", "fifo", "symlink"])
def test_anything_but_a_socket_at_the_socket_path_is_refused_and_kept(daemon, tmp_path,
                                                                      make, kind):
    path = os.path.join(short_socket_dir(tmp_path), "busy.sock")
    make(path)
    before = os.lstat(path)
    process = daemon(socket_path=path, wait=False)
    assert process.wait() == 1
    assert (f"ringtail serve: {path} exists and is {kind}, not a socket; remove it "
            "or choose another --socket") in process.stderr
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if stat.S_ISLNK(after.st_mode):
        with open(path) as file:
            assert file.read() == "precious data\n"


def test_a_stale_socket_is_replaced(daemon, tmp_path):
    path = os.path.join(short_socket_dir(tmp_path), "stale.sock")
    left_behind = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left_behind.bind(path)  # bound, never listening: what a killed daemon leaves
    left_behind.close()
    process = daemon(socket_path=path)
    assert process.alive and stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_socket_in_a_missing_directory_names_the_path(daemon, tmp_path):
    path = os.path.join(short_socket_dir(tmp_path), "no-such-dir", "rt.sock")
    process = daemon(socket_path=path, wait=False)
    assert process.wait() == 1
    assert f"cannot listen on {path}: No such file or directory" in process.stderr
