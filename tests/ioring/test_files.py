"""Whole files written atomically (ioring/files.py): all or nothing, never litter."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from ringtail.ioring.files import write_file_atomically


def test_bytes_are_written_synced_and_renamed_into_place(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_file_atomically(path, bytearray(b"x" * 100_000))
    assert path.read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["out.bin"]
    assert synced == [stat.S_IFREG, stat.S_IFDIR]  # the file, then its directory


def test_an_existing_file_is_replaced_or_refused(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    write_file_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(FileExistsError, match="out.bin exists; it was left as it is"):
        write_file_atomically(path, b"newer", replace=False)
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failing_fill_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fill(fd):
        os.write(fd, b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_file_atomically(path, fill)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_existing_temporary_path_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "out.bin"
    temporary = tmp_path / "out.bin.creating"
    temporary.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_file_atomically(path, b"new", temporary_path=os.fspath(temporary))
    assert temporary.read_bytes() == b"someone else's"
    assert not path.exists()


def test_a_symlink_planted_at_the_temporary_path_is_not_followed(tmp_path):
    path = tmp_path / "out.bin"
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    temporary = tmp_path / "out.bin.creating"
    temporary.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_file_atomically(path, b"new", temporary_path=os.fspath(temporary))
    assert target.read_bytes() == b"precious"
    assert not path.exists()


def test_without_hard_links_an_existing_file_is_still_refused(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "out.bin"
    write_file_atomically(path, b"first", replace=False)
    assert path.read_bytes() == b"first"
    with pytest.raises(FileExistsError, match="out.bin exists"):
        write_file_atomically(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_another_link_error_propagates_and_cleans_up(tmp_path, monkeypatch):
    def failing_link(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError, match="Input/output error"):
        write_file_atomically(tmp_path / "out.bin", b"x", replace=False)
    assert os.listdir(tmp_path) == []
