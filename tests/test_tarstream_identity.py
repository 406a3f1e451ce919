"""Files are opened relative to their directory and checked once, after the read,
against the walk's lstat: a file swapped for another object after the walk aborts."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from fastlayer.emit import Owner, pump, store_layer
from fastlayer.errors import FastlayerError

NAME = "9k2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-swap"


def make_store(tmp_path):
    p = tmp_path / "nix/store" / NAME
    (p / "sub").mkdir(parents=True)
    for rel, data in [("a", b"A" * 100), ("sub/b", b"B" * 10), ("sub/c", b""), ("z", b"Z")]:
        (p / rel).write_bytes(data)
        os.utime(p / rel, ns=(10**9, 10**9))
    return p


def test_files_of_several_directories_stream_in_full(tmp_path):
    p = make_store(tmp_path)
    out = io.BytesIO()
    pump(store_layer([str(p)], Owner()), out.write)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as t:
        got = {
            m.name.split(NAME, 1)[1]: t.extractfile(m).read() for m in t.getmembers() if m.isfile()
        }
    assert got == {
        "/a": b"A" * 100,
        "/sub/b": b"B" * 10,
        "/sub/c": b"",
        "/z": b"Z",
    }


def test_file_replaced_by_same_size_and_mtime_aborts(tmp_path):
    p = make_store(tmp_path)
    stream = store_layer([str(p)], Owner())
    # another inode (made while the old one lives), same size and mtime
    (p / "sub/b.new").write_bytes(b"X" * 10)
    os.utime(p / "sub/b.new", ns=(10**9, 10**9))
    os.replace(p / "sub/b.new", p / "sub/b")
    with pytest.raises(FastlayerError, match=r"changed since it was listed.*sub/b"):
        pump(stream, lambda b: None)


def test_file_replaced_by_fifo_aborts(tmp_path):
    p = make_store(tmp_path)
    stream = store_layer([str(p)], Owner())
    (p / "a").unlink()
    os.mkfifo(p / "a")
    with pytest.raises(FastlayerError, match=r"changed since it was listed.*/a"):
        pump(stream, lambda b: None)


def test_empty_file_grown_after_the_walk_aborts(tmp_path):
    p = make_store(tmp_path)
    stream = store_layer([str(p)], Owner())
    (p / "sub/c").write_bytes(b"late")
    with pytest.raises(FastlayerError, match=r"changed while it was read.*sub/c"):
        pump(stream, lambda b: None)
