"""The native layer streamer equals nixpkgs' tarfile output byte for byte."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile

import pytest
from fastlayer._native.tarstream import LayerStream, pack_header, pystr_cmp
from tarref import reference_layer

from fastlayer.emit import Owner, pump, store_layer
from fastlayer.errors import FastlayerError

OWNERS = [
    Owner(),
    Owner(mtime=1_700_000_000, uid=1000, gid=100, uname="user", gname="users"),
    # non-ASCII and over-long names, ids past the octal fields: all pax records
    Owner(mtime=8**11 + 5, uid=3_000_000, gid=2**21, uname="üser", gname="g" * 40),
]


def fsname(parent: str, raw: bytes) -> str:
    return os.fsdecode(os.fsencode(parent) + b"/" + raw)


def write(path: str, data: bytes = b"", mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


@pytest.fixture
def store(tmp_path):
    """A store with every kind of entry the issue lists."""
    s = tmp_path / "nix" / "store"
    s.mkdir(parents=True)
    a = str(s / "0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0")
    os.makedirs(a + "/bin")
    write(a + "/bin/app", b"#!/bin/sh\necho hi\n" * 100, 0o755)
    write(a + "/bin/ro", b"read only", 0o444)
    write(a + "/bin/setuid", b"s", 0o4755)
    write(a + "/empty")
    os.makedirs(a + "/share/empty-dir")
    # component-wise order: a < a/b < a-c, unlike plain string order
    os.makedirs(a + "/a/b")
    write(a + "/a/b/f", b"ab")
    write(a + "/a-c", b"ac")
    write(a + "/a.c", b"a.c")
    for n in (99, 100, 101, 255):
        write(a + "/" + "n" * n, str(n).encode())
    deep = a
    for i in range(40):
        deep += f"/level{i:02d}-" + "d" * 20
    os.makedirs(deep)
    write(deep + "/leaf", b"deep")
    write(a + "/é-utf8", b"x")
    write(a + "/日本語", b"x")
    # non-UTF-8 names and names whose byte order differs from code point order
    for raw in (b"\xff\xfe", b"\xc3A", b"\xc3\xa9z", b"\xed\xa0\x80", b"\xef\xbf\xbd", b"z\x80"):
        write(fsname(a, raw), raw)
    os.symlink("bin/app", a + "/link-file")
    os.symlink("share", a + "/link-dir")
    os.symlink("/nowhere/" + "q" * 150, a + "/dangling-long")
    os.symlink("/nowhere/é", a + "/dangling-utf8")
    os.link(a + "/bin/app", a + "/hardlink")
    b = str(s / "1b2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-lib-2.0")
    os.makedirs(b + "/lib")
    write(b + "/lib/libx.so", os.urandom(300_000), 0o555)
    os.link(a + "/bin/app", b + "/lib/hardlink-other-path")
    single = str(s / "2c2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-single-file")
    write(single, b"just a file\n")
    sym = str(s / "3d2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-symlink-path")
    os.symlink(a, sym)
    return [a, b, single, sym]


def native(paths, owner) -> tuple[bytes, str, int]:
    stream = store_layer(paths, owner)
    out = bytearray()
    digest = pump(stream, out.extend)
    return bytes(out), digest, stream.size


@pytest.mark.parametrize("owner", OWNERS, ids=["root", "user", "pax-fields"])
def test_layer_bytes_equal_tarfile(store, owner):
    data, digest, size = native(store, owner)
    ref = reference_layer(store, owner.mtime, owner.uid, owner.gid, owner.uname, owner.gname)
    assert len(data) == size == len(ref)
    assert data == ref
    assert digest == hashlib.sha256(ref).hexdigest()


def test_every_path_and_kind_present(store, tmp_path):
    data, _, _ = native(store, Owner())
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with tarfile.open(path) as t:
        members = {m.name: m for m in t.getmembers()}
    assert list(members)[:2] == ["/nix", "/nix/store"]
    a = store[0]
    assert members[a + "/bin/app"].mode == 0o755
    assert members[a + "/bin/setuid"].mode == 0o4755
    assert members[a + "/link-dir"].issym() and members[a + "/link-dir"].linkname == "share"
    assert a + "/link-dir/empty-dir" not in members  # symlinked dirs are not entered
    assert members[a + "/hardlink"].isreg() and members[a + "/hardlink"].size == 1800
    assert members[store[3]].issym() and members[store[3]].linkname == a
    assert members[store[2]].isreg()
    assert len(data) % 10240 == 0


def test_order_is_component_wise_python_str_order(store):
    names = [n.decode("utf-8", "surrogateescape") for n in store_layer(store, Owner()).names()]
    a = store[0]
    assert names.index(a + "/a") < names.index(a + "/a/b/f") < names.index(a + "/a-c")
    # \xc3A decodes to U+DCC3 'A', which sorts after U+00E9 although 0xC3 0x41 < 0xC3 0xA9
    assert names.index(fsname(a, b"\xc3\xa9z")) < names.index(fsname(a, b"\xc3A"))


@pytest.mark.parametrize(
    "a,b",
    [
        (b"a", b"b"),
        (b"a", b"a-c"),
        (b"\xc3A", b"\xc3\xa9"),
        (b"\xff", b"\xef\xbf\xbd"),
        (b"\xed\xa0\x80", b"\xed\x9f\xbf"),
        (b"\xf0\x90\x80\x80", b"\xef\xbf\xbf"),
        (b"x", b"x"),
    ],
)
def test_name_comparison_matches_python(a, b):
    sa, sb = os.fsdecode(a), os.fsdecode(b)
    expected = (sa > sb) - (sa < sb)
    assert pystr_cmp(a, b) == expected
    assert pystr_cmp(b, a) == -expected


def test_pack_header_matches_tarinfo():
    for name, kind, link in [
        ("/x/" + "é" * 60, tarfile.DIRTYPE, ""),
        ("/l", tarfile.SYMTYPE, "t" * 120),
    ]:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mode, ti.mtime = kind, link, 0o755, 12345
        ti.uname, ti.gname = "root", "wheel"
        got = pack_header(
            name.encode(), kind, 0o755, 0, 12345, 0, 0, b"root", b"wheel", link.encode()
        )
        assert got == ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_empty_layer_has_only_store_dirs():
    stream = store_layer([], Owner())
    out = bytearray()
    pump(stream, out.extend)
    assert bytes(out) == reference_layer([], 1, 0, 0, "root", "root")


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_are_a_clear_error(tmp_path, kind):
    p = tmp_path / "nix/store/5e2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-special"
    p.mkdir(parents=True)
    target = p / kind
    if kind == "fifo":
        os.mkfifo(target)
    else:
        sock = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(p)  # a relative name: AF_UNIX paths are limited to 108 bytes
        try:
            sock.bind(kind)
        finally:
            os.chdir(cwd)
            sock.close()
    with pytest.raises(FastlayerError, match=f"{target} is a {kind}"):
        store_layer([str(p)], Owner())


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "nix/store/nope")
    with pytest.raises(FastlayerError, match=f"cannot stat {missing}"):
        store_layer([missing], Owner())


def test_file_changed_between_walk_and_read_aborts(store):
    stream = store_layer(store, Owner())
    with open(store[1] + "/lib/libx.so", "ab") as f:
        f.write(b"more")
    with pytest.raises(FastlayerError, match="libx.so"):
        pump(stream, lambda b: None)


def test_file_changed_while_read_aborts(tmp_path):
    p = tmp_path / "nix/store/6f2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-big"
    p.mkdir(parents=True)
    big = p / "big"
    big.write_bytes(b"x" * (3 << 20))
    stream = store_layer([str(p)], Owner())
    buf = bytearray(1 << 20)
    assert stream.fill(buf) == len(buf)  # mid-file now
    with open(big, "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(OSError, match="shrank while it was read: .*big"):
        while stream.fill(buf):
            pass


def test_file_rewritten_same_size_while_read_aborts(tmp_path):
    p = tmp_path / "nix/store/7g2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-big"
    p.mkdir(parents=True)
    big = p / "big"
    big.write_bytes(b"x" * (3 << 20))
    stream = store_layer([str(p)], Owner())
    buf = bytearray(1 << 20)
    stream.fill(buf)
    with open(big, "r+b") as f:
        f.write(b"y" * 10)
    os.utime(big, ns=(0, 10**9))
    with pytest.raises(OSError, match="changed while it was read: .*big"):
        while stream.fill(buf):
            pass


def test_unreadable_file_is_named():
    # outside pytest's 0700 tmp dirs, so that an unprivileged user can walk it
    top = tempfile.mkdtemp(prefix="fastlayer-test-")
    os.chmod(top, 0o755)
    p = pathlib.Path(top, "nix/store/8h2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-secret")
    p.mkdir(parents=True)
    secret = p / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    code = (
        "import os,sys\n"
        "from fastlayer.emit import store_layer, Owner\n"
        "from fastlayer.errors import FastlayerError\n"
        "if os.getuid() == 0: os.setgid(65534); os.setuid(65534)\n"
        f"try: store_layer([{str(p)!r}], Owner())\n"
        "except FastlayerError as e: print(e); sys.exit(3)\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        shutil.rmtree(top)
    assert r.returncode == 3, r.stderr
    assert f"cannot read {secret}" in r.stdout


class _Hasher:
    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return len(b)


def test_file_over_8gib_uses_pax_size(tmp_path):
    p = tmp_path / "nix/store/9i2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-huge"
    p.mkdir(parents=True)
    huge = p / "huge"
    size = 8 * 2**30 + 1
    try:
        with open(huge, "wb") as f:
            f.truncate(size)
    except OSError as e:
        pytest.skip(f"cannot make an {size}-byte sparse file here: {e}")
    if os.stat(huge).st_blocks * 512 > 2**20 or shutil.disk_usage(tmp_path).free < 2**30:
        pytest.skip("filesystem does not keep sparse files sparse")
    stream = store_layer([str(p)], Owner())
    head = bytearray(4096)
    stream.fill(head)
    assert b"size=8589934593\n" in head  # tarfile's pax record for sizes past 8 GiB
    stream = store_layer([str(p)], Owner())
    digest = pump(stream, lambda b: None)
    ref = _Hasher()
    reference_layer([str(p)], 1, 0, 0, "root", "root", out=ref)
    assert stream.size == ref.n
    assert digest == ref.h.hexdigest()


def test_stream_is_consumed_once(store):
    stream = store_layer(store[:1], Owner())
    pump(stream, lambda b: None)
    assert stream.fill(bytearray(10)) == 0


def test_layerstream_rejects_bad_roots():
    with pytest.raises(TypeError):
        LayerStream([], [("not-bytes", b"x")], 1, 0, 0, b"r", b"r")


def test_permissions_come_from_disk(store):
    st = os.lstat(store[0] + "/bin/ro")
    assert stat.S_IMODE(st.st_mode) == 0o444
    data, _, _ = native(store[:1], Owner())
    assert b"0000444\0" in data
