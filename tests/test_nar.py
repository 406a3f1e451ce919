"""NAR hashing against Nix itself: `nix-store --dump` bytes and `nix-hash --type sha256`."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import random
import shutil
import socket
import subprocess
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from fastlayer._native.nar import nar_walk
from validators import require

from fastlayer.commands import nar_hash as nar_hash_cmd
from fastlayer.errors import FastlayerError
from fastlayer.nix import base32
from fastlayer.nix.nar import nar_hash, nar_hash_many, walk

NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\nexperimental-features = nix-command"}


def nix_dump(path: Path | bytes | str) -> bytes:
    exe = require("nix-store")
    return subprocess.run(
        [exe, "--dump", path], check=True, capture_output=True, env=NIX_ENV
    ).stdout


def nix_hash(path: Path | bytes | str) -> str:
    exe = require("nix-hash")
    out = subprocess.run(
        [exe, "--type", "sha256", "--base32", path], check=True, capture_output=True, env=NIX_ENV
    )
    return out.stdout.decode().strip()


def our_nar(path: Path | bytes | str, bufsize: int = 1 << 20) -> bytes:
    chunks: list[bytes] = []
    size = nar_walk(os.fsencode(path), lambda mv: chunks.append(bytes(mv)), 0, None, bufsize)
    data = b"".join(chunks)
    assert size == len(data)
    return data


def assert_matches_nix(path: Path | bytes | str) -> None:
    ours = nar_hash(path)
    ref = nix_dump(path)
    digest = hashlib.sha256(ref).digest()
    if ours.nar_size != len(ref) or ours.nar_hash != "sha256:" + base32.encode(digest):
        # Byte comparison first: it says where the serialisation differs.
        assert our_nar(path) == ref
    assert ours.nar_size == len(ref)
    assert ours.nar_hash == "sha256:" + nix_hash(path)
    assert ours.sri == "sha256-" + base64.b64encode(digest).decode()


def make_tree(root: Path) -> Path:
    """Every kind of thing a NAR holds, plus names whose byte order is unusual."""
    root.mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    exe = root / "bin" / "tool"
    exe.parent.mkdir()
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    (root / "bin" / "group-exec-only").write_bytes(b"x")
    (root / "bin" / "group-exec-only").chmod(0o654)  # NAR records the owner bit only
    (root / "eight").write_bytes(b"12345678")  # no padding
    (root / "dangling").symlink_to("../does/not/exist")
    (root / "to-dir").symlink_to("bin")  # a symlink to a directory is not followed
    (root / "abs-link").symlink_to("/" + "t" * 300)
    # Byte order: "B" < "_" < "a" < "a-b" < "a.b" < "a0" < "é" (UTF-8) < 0xff.
    for name in ["a", "B", "_", "a-b", "a.b", "a0", "Z", "é", ".hidden", "~"]:
        (root / name).write_text(name)
    bad = os.fsencode(root) + b"/latin1-\xe9\xff"  # not UTF-8
    with open(bad, "wb") as f:
        f.write(b"non-utf8 name")
    os.symlink(b"target-\xff", os.fsencode(root) + b"/link-\xfe")
    deep = root / "deep"
    deep.mkdir()
    d = deep
    for i in range(200):
        d = d / f"lv{i % 7}"
        d.mkdir()
    (d / "bottom").write_text("deep")
    rng = random.Random(5)
    big = root / "big.bin"
    big.write_bytes(rng.randbytes(3 * (1 << 20) + 13))  # spans several buffers
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("nar") / "tree")


def test_tree_matches_nix(tree: Path) -> None:
    assert_matches_nix(tree)


def test_small_buffer_same_bytes(tree: Path) -> None:
    # A tiny buffer forces every framing and content split; bytes must not change.
    assert our_nar(tree, bufsize=4096) == nix_dump(tree)


@pytest.mark.parametrize(
    "name", ["empty-file", "bin/tool", "dangling", "to-dir", "empty-dir", "eight", "deep"]
)
def test_single_paths_match_nix(tree: Path, name: str) -> None:
    assert_matches_nix(tree / name)


def test_trailing_slash_follows_like_nix(tree: Path) -> None:
    # nix-hash resolves "link/" through the kernel, so hashes the directory.
    assert_matches_nix(f"{tree}/to-dir/")
    assert nar_hash(f"{tree}/to-dir/") == nar_hash(tree / "bin")


def test_non_utf8_paths(tree: Path) -> None:
    assert_matches_nix(os.fsencode(tree) + b"/latin1-\xe9\xff")
    assert_matches_nix(os.fsencode(tree) + b"/link-\xfe")


@pytest.mark.parametrize("pipelined", [False, True])
def test_pipelined_and_plain_agree(tree: Path, pipelined: bool) -> None:
    # Pipelined: a second thread hashes while the walker fills the next buffers.
    info = nar_hash(tree, pipelined=pipelined)
    assert info.nar_hash == "sha256:" + nix_hash(tree)


def test_pipelined_error_with_buffers_in_flight(tmp_path: Path) -> None:
    # The walk fails after handing out several buffers; none may be freed early.
    (tmp_path / "a-big").write_bytes(os.urandom(5 << 20))
    os.mkfifo(tmp_path / "b-fifo")
    for _ in range(3):
        with pytest.raises(FastlayerError, match="b-fifo: a fifo"):
            nar_hash(tmp_path, pipelined=True)


def test_many_in_parallel_keeps_order(tree: Path) -> None:
    paths = [tree / n for n in sorted(os.listdir(tree)) if n.isascii()]
    assert nar_hash_many(paths, jobs=4) == [nar_hash(p) for p in paths]
    assert nar_hash_many([]) == []


def test_many_reports_the_failing_path(tree: Path) -> None:
    with pytest.raises(FastlayerError, match="missing-one"):
        nar_hash_many([tree / "bin", tree / "missing-one", tree / "eight"], jobs=2)


def test_base32_matches_nix_to_base32() -> None:
    exe = require("nix-hash")
    for data in (b"", b"abc", bytes(range(256))):
        digest = hashlib.sha256(data).digest()
        out = subprocess.run(
            [exe, "--type", "sha256", "--to-base32", digest.hex()],
            check=True,
            capture_output=True,
            env=NIX_ENV,
        )
        assert base32.encode(digest) == out.stdout.decode().strip()
        assert base32.decode(base32.encode(digest)) == digest
    with pytest.raises(ValueError):
        base32.decode("e" * 32)  # 'e' is not in the alphabet


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FastlayerError, match="nope"):
        nar_hash(tmp_path / "nope")


def test_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "pipe")
    with pytest.raises(FastlayerError, match=r"d/pipe: a fifo"):
        nar_hash(tmp_path)


def test_socket_is_refused(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(FastlayerError, match="sock: a socket"):
            nar_hash(tmp_path)
    finally:
        s.close()


def test_unreadable_file() -> None:
    # Root reads any file, so as root hash from a forked child running as nobody.
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        (base / "secret").write_text("x")
        (base / "secret").chmod(0)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report the error message (or nothing) and exit at once
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                nar_hash(base)
            except FastlayerError as e:
                os.write(wfd, str(e).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            message = r.read().decode()
        os.waitpid(pid, 0)
        assert message == f"{base}/secret: cannot open: Permission denied"
    finally:
        shutil.rmtree(base)


def _edit_during_read(path: Path, edit) -> None:
    """Walk path's NAR; at the first full buffer (mid-file), apply edit to the file."""
    done = []

    def sink(mv: memoryview) -> None:
        if not done:
            done.append(1)
            edit()

    walk(path, sink)


def test_file_growing_while_read_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "grows"
    f.write_bytes(b"x" * (3 << 20))

    def grow() -> None:
        with open(f, "ab") as out:
            out.write(b"more")

    with pytest.raises(FastlayerError, match="grows: file changed while being read"):
        _edit_during_read(f, grow)


def test_file_shrinking_while_read_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "shrinks"
    f.write_bytes(b"x" * (3 << 20))
    with pytest.raises(FastlayerError, match="shrinks: file shrank while being read"):
        _edit_during_read(f, lambda: os.truncate(f, 10))


def test_cli_prints_both_forms(tree: Path) -> None:
    parser = argparse.ArgumentParser()
    nar_hash_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["nar-hash", str(tree / "bin"), str(tree / "eight")])
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    lines = out.getvalue().splitlines()
    first = nar_hash(tree / "bin")
    assert lines[0] == f"{first.nar_hash} {first.sri} {first.nar_size} {tree / 'bin'}"
    assert len(lines) == 2
