"""`fastlayer stream-nix`, checked by the real consumers: podman, skopeo, umoci.

A small fake Nix store is built under a temporary ROOT and read through
`--root ROOT`. The images it gives must load in podman (which rejects a wrong
diff_id), run busybox under `podman run`, and unpack through skopeo and umoci
(which verify every digest) to exactly the files, modes, owners, mtimes,
symlink targets and contents of the store plus the customisation layer.

FASTLAYER_TEST_BUILDER=reference runs every check against nixpkgs'
stream_layered_image.py instead (its path in FASTLAYER_REFERENCE_SCRIPT), in a
private mount namespace with ROOT/nix/store bind-mounted on /nix/store (root
only): that validates these tests against the tool fastlayer replaces. With
only FASTLAYER_REFERENCE_SCRIPT set, test_identical_to_reference also compares
the two archives byte for byte; without it, that test compares the layers that
do not hold the host's busybox with the digests recorded from nixpkgs' script
(tests/data/nixpkgs/).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import pytest
from nixpkgs_ref import recorded
from validators import (
    Entry,
    ValidatorError,
    entry_of,
    find_tool,
    read_docker_archive,
    require_root,
    skopeo_copy_to_oci,
    umoci_unpack,
    unavailable,
    walk_rootfs,
    walk_tree,
)

pytestmark = pytest.mark.validators

CREATED = "2024-01-02T03:04:05+00:00"
MTIME = 1704164645
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

REFERENCE = os.environ.get("FASTLAYER_REFERENCE_SCRIPT")
USE_REFERENCE = os.environ.get("FASTLAYER_TEST_BUILDER") == "reference"

# The `[uid, gid, uname, gname]` variants every image test runs with.
OWNERS = {"root": ("0", "0", "root", "root"), "uid1000": ("1000", "100", "user", "users")}


# --- running the command under test ----------------------------------------

_REF_NAMESPACE = (
    'mount -t tmpfs none /nix && mkdir /nix/store && mount --bind "$1/nix/store" /nix/store'
    ' && shift && exec "$@"'
)


@functools.cache
def _stream_nix_missing() -> str | None:
    if USE_REFERENCE:
        if not (REFERENCE and os.path.isfile(REFERENCE)):
            return "FASTLAYER_TEST_BUILDER=reference needs FASTLAYER_REFERENCE_SCRIPT"
        if os.geteuid() != 0 or not os.path.isdir("/nix") or not find_tool("unshare"):
            return "the reference builder needs root, unshare and a /nix directory"
        return None
    proc = subprocess.run(
        [sys.executable, "-m", "fastlayer", "stream-nix", "--help"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"`fastlayer stream-nix` not available: {last}"
    return None


def require_stream_nix() -> None:
    missing = _stream_nix_missing()
    if missing:
        unavailable(missing)


def reference_argv(conf: Path, root: Path, tag_args=()) -> list:
    """nixpkgs' script on `conf`, seeing ROOT/nix/store as /nix/store (needs root)."""
    return ["unshare", "-m", "sh", "-c", _REF_NAMESPACE, "sh", str(root),
            sys.executable, REFERENCE, str(conf), *tag_args]  # fmt: skip


def stream_nix_argv(conf: Path, root: Path, *, out: Path | None = None, tag=None) -> list:
    """The command writing conf's image to `out`, or to stdout when out is None."""
    tag_args = ["-t", tag] if tag else []
    if USE_REFERENCE:
        argv = reference_argv(conf, root, tag_args)
        if out is not None:  # the script only writes to stdout
            argv = ["sh", "-c", 'out="$1"; shift; exec "$@" > "$out"', "sh", str(out), *argv]
        return argv
    out_args = ["-o", str(out)] if out is not None else []
    return [
        sys.executable,
        "-m",
        "fastlayer",
        "stream-nix",
        "--root",
        str(root),
        str(conf),
        *out_args,
        *tag_args,
    ]


def stream_nix(conf: Path, root: Path, out: Path, tag=None) -> Path:
    require_stream_nix()
    proc = subprocess.run(
        stream_nix_argv(conf, root, out=out, tag=tag),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stream-nix failed:\n{proc.stderr.decode(errors='replace')}"
    return out


# --- the fake store --------------------------------------------------------


def store_path(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[b % 32] for b in digest) + "-" + name


class Store(NamedTuple):
    root: Path
    busybox: str
    data: str
    alias: str  # a store path that is itself a symlink (to data's share/)
    big: str
    etc: str
    long_name: str  # a file name that needs a PAX header

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def _write(path: Path, content: bytes | str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)


def make_store(root: Path) -> Store:
    """The fake store under ROOT; directories are made under umask 022 whatever
    the caller's, so the layers' bytes (and recorded digests) do not depend on it."""
    old_umask = os.umask(0o022)
    try:
        return _make_store(root)
    finally:
        os.umask(old_umask)


def _make_store(root: Path) -> Store:
    busybox_exe = "/bin/busybox" if os.path.isfile("/bin/busybox") else find_tool("busybox")
    if busybox_exe is None:
        unavailable("busybox-static not installed (needed for a runnable image)")
    rng = random.Random(20240102)
    long_name = "x" * 120 + ".txt"
    s = Store(
        root,
        store_path("busybox-static-1.35.0"),
        store_path("hello-data-1.0"),
        store_path("data-alias"),
        store_path("big-blob-2.0"),
        store_path("etc-files"),
        long_name,
    )

    bb = s.host(s.busybox)
    (bb / "bin").mkdir(parents=True)
    shutil.copyfile(busybox_exe, bb / "bin/busybox")
    (bb / "bin/busybox").chmod(0o755)
    for applet in ("sh", "cat", "ls", "stat", "readlink", "sha256sum", "test", "echo"):
        (bb / "bin" / applet).symlink_to("busybox")

    d = s.host(s.data)
    _write(d / "bin/hello", f"#!{s.busybox}/bin/sh\necho hello from store\n", 0o755)
    _write(d / "share/doc/README", "hello readme\n", 0o644)
    _write(d / "share/doc/ro.txt", "read only\n", 0o444)
    _write(d / "share/doc/caf\u00e9.txt", "non-ascii name\n", 0o644)
    _write(d / "share/doc/empty", b"", 0o644)
    _write(d / "share/doc/block512", rng.randbytes(512), 0o644)
    # Component-wise order traps: a < a/b < a-b < a.c (string order differs).
    _write(d / "share/a/b", "a/b\n", 0o644)
    _write(d / "share/a-b", "a-b\n", 0o644)
    _write(d / "share/a.c", "a.c\n", 0o644)
    _write(d / "share/deep/1/2/3/4/5/leaf.txt", "deep leaf\n", 0o444)
    _write(d / "share/long" / long_name, "long name\n", 0o644)
    (d / "share/emptydir").mkdir()
    (d / "share/emptydir").chmod(0o750)
    (d / "share/link-to-dir").symlink_to("doc")
    (d / "share/link-to-file").symlink_to("doc/README")
    (d / "share/dangling").symlink_to("../does-not-exist")
    (d / "share/abs-link").symlink_to(f"{s.busybox}/bin/busybox")
    (d / "share/long-target").symlink_to(f"long/{long_name}")
    _write(d / "lib/libfoo.so.1.2", rng.randbytes(70_000), 0o555)
    (d / "lib/libfoo.so.1").symlink_to("libfoo.so.1.2")
    (d / "lib/libfoo.so").symlink_to("libfoo.so.1")
    os.link(d / "lib/libfoo.so.1.2", d / "lib/libfoo-hardlink.so")
    (d / "share/doc").chmod(0o555)  # read-only dirs, as in a real store

    s.host(s.alias).symlink_to(f"{s.data}/share")

    b = s.host(s.big)
    _write(b / "lib/big.so", rng.randbytes(3 * 1024 * 1024 + 123), 0o555)

    e = s.host(s.etc)
    _write(e / "etc/os-release", "ID=fake\n", 0o444)
    _write(e / "etc/profile", "export A=1\n", 0o644)
    for path in (s.busybox, s.data, s.big, s.etc):
        s.host(path).chmod(0o555)
    return s


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return make_store(tmp_path_factory.mktemp("fakestore"))


# --- customisation layers and confs ----------------------------------------


def make_customisation(store: Store, name: str, entries: list[tuple]) -> tuple[str, dict]:
    """Write store path `name` holding `layer.tar` + `checksum` from
    (member, kind, mode, content) tuples, as nixpkgs' customisation layer is a
    store path too; return it and the Entries the layer should unpack to."""
    path = store_path(name)
    directory = store.host(path)
    directory.mkdir(parents=True)
    buf = io.BytesIO()
    expected = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, kind, mode, content in entries:
            ti = tarfile.TarInfo(member)
            ti.mode, ti.mtime = mode, MTIME
            data = None
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, content
            else:
                data = content.encode()
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
            digest = hashlib.sha256(data).hexdigest() if data is not None else None
            mode = 0o777 if kind == "symlink" else mode
            expected["/" + member] = Entry(
                kind, mode, 0, 0, content if kind == "symlink" else digest, MTIME
            )
    (directory / "layer.tar").write_bytes(buf.getvalue())
    (directory / "checksum").write_text(hashlib.sha256(buf.getvalue()).hexdigest())
    return path, expected


def write_conf(
    path: Path,
    *,
    layers,
    customisation: str,
    tag: str,
    owner: str = "root",
    env=(),
    cmd=None,
    from_image: str | None = None,
) -> Path:
    uid, gid, uname, gname = OWNERS[owner]
    config = {"Env": list(env), "Labels": {"org.example.test": "fastlayer"}}
    if cmd:
        config["Cmd"] = list(cmd)
    conf = {
        "architecture": ARCH,
        "config": config,
        "os": "linux",
        "store_dir": "/nix/store",
        "from_image": from_image,
        "store_layers": [list(layer) for layer in layers],
        "customisation_layer": customisation,
        "repo_tag": tag,
        "created": CREATED,
        "mtime": CREATED,
        "uid": uid,
        "gid": gid,
        "uname": uname,
        "gname": gname,
    }
    path.write_text(json.dumps(conf, indent=2))
    return path


def expected_store_tree(store: Store, paths, owner: str) -> dict:
    """The Entries the store layers holding `paths` must unpack to."""
    uid, gid = int(OWNERS[owner][0]), int(OWNERS[owner][1])
    ours = {"uid": uid, "gid": gid, "mtime": MTIME, "with_mtime": True}
    tree = {
        "/nix": Entry("dir", 0o755, uid, gid, None, MTIME),
        "/nix/store": Entry("dir", 0o755, uid, gid, None, MTIME),
    }
    for path in paths:
        host = store.host(path)
        tree[path] = entry_of(host, **ours)
        if not host.is_symlink():
            tree.update(walk_tree(host, path, **ours))
    return tree


class Image(NamedTuple):
    path: Path
    tag: str
    owner: str
    conf: dict
    expected: dict  # rootfs path -> Entry


# The store layers of `image_conf` whose bytes are the same on every machine (all
# but the host's busybox): tests/data/nixpkgs/validators.json.gz records their
# digests as nixpkgs' script wrote them.
HOST_INDEPENDENT_LAYERS = (1, 2)


def image_conf(store: Store, work: Path, owner: str) -> tuple[Path, list, dict, str]:
    """The conf of an image of the whole fake store in 3 store layers +
    customisation: (conf file, store layers, customisation layer's Entries, tag)."""
    custom, custom_tree = make_customisation(
        store,
        f"customisation-layer-{owner}",
        [
            ("bin", "symlink", 0o777, f"{store.busybox}/bin"),
            ("etc", "dir", 0o755, None),
            ("etc/motd", "file", 0o644, "welcome\n"),
            ("tmp", "dir", 0o1777, None),
        ],
    )
    layers = [[store.busybox], [store.data, store.alias], [store.big, store.etc]]
    tag = f"localhost/fastlayer-test/{owner}:v1"
    conf = write_conf(
        work / "conf.json",
        layers=layers,
        customisation=custom,
        tag=tag,
        owner=owner,
        env=["PATH=/bin", "GREETING=hello from config"],
        cmd=["/bin/sh", "-c", "echo $GREETING"],
    )
    return conf, layers, custom_tree, tag


@pytest.fixture(scope="module", params=sorted(OWNERS))
def image(request, store, tmp_path_factory) -> Image:
    """An image of the whole fake store in 3 store layers + customisation."""
    owner = request.param
    work = tmp_path_factory.mktemp(f"image-{owner}")
    conf, layers, custom_tree, tag = image_conf(store, work, owner)
    out = stream_nix(conf, store.root, work / "image.tar")
    expected = expected_store_tree(store, [p for layer in layers for p in layer], owner)
    expected.update(custom_tree)
    return Image(out, tag, owner, json.loads(conf.read_text()), expected)


@pytest.fixture(scope="module")
def loaded(image, podman) -> Image:
    names = podman.load(image.path)
    assert names == [image.tag]
    return image


# --- the tests -------------------------------------------------------------


def test_archive_layers_match_their_names_and_diff_ids(image, store):
    arc = read_docker_archive(image.path)
    assert len(arc.layer_names) == 4  # 3 store layers + customisation
    assert arc.layer_names == [f"{d}/layer.tar" for d in arc.layer_digests]
    assert arc.config["rootfs"]["diff_ids"] == [f"sha256:{d}" for d in arc.layer_digests]
    assert arc.manifest[0]["Config"] == f"{arc.config_digest}.json"
    assert arc.manifest[0]["RepoTags"] == [image.tag]
    custom = store.host(image.conf["customisation_layer"])
    assert arc.layer_digests[-1] == (custom / "checksum").read_text()


def test_podman_load_and_inspect(loaded, podman):
    arc = read_docker_archive(loaded.path)
    info = podman.inspect(loaded.tag)
    assert info["Id"] == arc.config_digest
    assert info["RootFS"]["Layers"] == [f"sha256:{d}" for d in arc.layer_digests]
    assert info["RepoTags"] == [loaded.tag]
    assert info["Architecture"] == ARCH and info["Os"] == "linux"
    assert info["Config"]["Env"] == ["PATH=/bin", "GREETING=hello from config"]
    assert info["Config"]["Cmd"] == ["/bin/sh", "-c", "echo $GREETING"]
    assert info["Config"]["Labels"] == {"org.example.test": "fastlayer"}
    assert info["Created"].startswith("2024-01-02T03:04:05")


def test_oci_unpack_gives_exact_rootfs(image, tmp_path):
    require_root("umoci keeps the layers' file owners only as root")
    oci = skopeo_copy_to_oci(image.path, tmp_path / "oci", "t")
    rootfs = umoci_unpack(oci, "t", tmp_path / "bundle")
    actual = walk_rootfs(rootfs, with_mtime=True)
    missing = sorted(set(image.expected) - set(actual))
    extra = sorted(set(actual) - set(image.expected))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    wrong = {p: (actual[p], e) for p, e in image.expected.items() if actual[p] != e}
    assert not wrong, "(unpacked, expected):\n" + "\n".join(f"{p}: {v}" for p, v in wrong.items())


def _ls_quoted(name: str) -> str:
    """A name as busybox `ls` prints it in the C locale: one `?` per non-ASCII byte."""
    return "".join(c if c.isascii() else "?" * len(c.encode()) for c in name)


def test_podman_runs_busybox_image(loaded, podman, store):
    assert podman.run(loaded.tag) == "hello from config\n"
    s, d = store, store.data
    script = f"""
        cat {d}/share/doc/README
        {d}/bin/hello
        ls {d}/share/doc
        readlink {s.alias}
        cat {s.alias}/doc/README {d}/share/link-to-dir/ro.txt {d}/share/long-target
        sha256sum {s.big}/lib/big.so {d}/lib/libfoo-hardlink.so
        stat -c '%a %u %g %n' {d}/share/doc/ro.txt {d}/bin/hello {d}/share/emptydir /tmp
        test -L {d}/share/dangling && ! test -e {d}/share/dangling && echo dangling ok
        echo "$PATH"
    """
    uid, gid = OWNERS[loaded.owner][:2]
    big_sha = loaded.expected[f"{s.big}/lib/big.so"].data
    lib_sha = loaded.expected[f"{d}/lib/libfoo.so.1.2"].data
    expected = [
        "hello readme",
        "hello from store",
        *sorted(map(_ls_quoted, os.listdir(s.host(d) / "share/doc"))),
        f"{d}/share",
        "hello readme",
        "read only",
        "long name",
        f"{big_sha}  {s.big}/lib/big.so",
        f"{lib_sha}  {d}/lib/libfoo-hardlink.so",
        f"444 {uid} {gid} {d}/share/doc/ro.txt",
        f"755 {uid} {gid} {d}/bin/hello",
        f"750 {uid} {gid} {d}/share/emptydir",
        "1777 0 0 /tmp",
        "dangling ok",
        "/bin",
    ]
    assert podman.run(loaded.tag, "/bin/sh", "-ec", script).splitlines() == expected


def test_stdout_streams_into_podman_load(store, fresh_podman, tmp_path):
    podman = fresh_podman
    custom, _ = make_customisation(
        store, "customisation-piped", [("bin", "symlink", 0o777, f"{store.busybox}/bin")]
    )
    conf = write_conf(
        tmp_path / "conf.json",
        layers=[[store.busybox], [store.data]],
        customisation=custom,
        tag="localhost/fastlayer-test/conf-tag:v1",
        env=["PATH=/bin"],
    )
    tag = "localhost/fastlayer-test/piped:v2"  # -t overrides the conf's repo_tag
    require_stream_nix()
    proc = subprocess.Popen(
        stream_nix_argv(conf, store.root, tag=tag),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        names = podman.load(stdin=proc.stdout)
    finally:
        proc.stdout.close()  # so a failed load can't leave the writer blocked
        rc = proc.wait(timeout=600)
    assert rc == 0
    assert names == [tag]

    # The same bytes as -o FILE, which podman identifies as the same image.
    out = stream_nix(conf, store.root, tmp_path / "image.tar", tag=tag)
    piped = subprocess.run(
        stream_nix_argv(conf, store.root, tag=tag),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    ).stdout
    assert piped == out.read_bytes()
    arc = read_docker_archive(out)
    assert arc.manifest[0]["RepoTags"] == [tag]
    info = podman.inspect(tag)
    assert info["Id"] == arc.config_digest
    assert info["RootFS"]["Layers"] == arc.config["rootfs"]["diff_ids"]
    assert podman.run(tag, "cat", f"{store.data}/share/doc/README") == "hello readme\n"


def test_from_image_layers_come_first_and_env_merges(store, podman, tmp_path):
    base_custom, base_tree = make_customisation(
        store, "customisation-base", [("bin", "symlink", 0o777, f"{store.busybox}/bin")]
    )
    base_conf = write_conf(
        tmp_path / "base.json",
        layers=[[store.busybox]],
        customisation=base_custom,
        tag="localhost/fastlayer-test/base:v1",
        env=["FROM_PARENT=1", "LAST=parent"],
    )
    base_image = store_path("base-image.tar")  # fromImage is a store path too
    base = read_docker_archive(stream_nix(base_conf, store.root, store.host(base_image)))

    child_custom, child_tree = make_customisation(
        store,
        "customisation-child",
        [("etc", "dir", 0o755, None), ("etc/motd", "file", 0o644, "child\n")],
    )
    child_conf = write_conf(
        tmp_path / "child.json",
        layers=[[store.data, store.alias]],
        customisation=child_custom,
        tag="localhost/fastlayer-test/child:v1",
        env=["FROM_CHILD=1", "LAST=child"],
        cmd=["/bin/sh", "-c", "echo $LAST $FROM_PARENT $FROM_CHILD"],
        from_image=base_image,
    )
    child_path = stream_nix(child_conf, store.root, tmp_path / "child.tar")
    child = read_docker_archive(child_path)

    assert child.layer_names[:2] == base.layer_names
    assert child.member_names[:2] == base.layer_names  # copied first, as they are
    assert len(child.layer_names) == 4
    assert child.config["rootfs"]["diff_ids"] == [f"sha256:{d}" for d in child.layer_digests]
    assert child.layer_digests[:2] == base.layer_digests
    merged = ["FROM_PARENT=1", "LAST=child", "FROM_CHILD=1"]
    assert child.config["config"]["Env"] == merged

    assert podman.load(child_path) == ["localhost/fastlayer-test/child:v1"]
    info = podman.inspect("localhost/fastlayer-test/child:v1")
    assert info["Config"]["Env"] == merged
    assert info["RootFS"]["Layers"] == child.config["rootfs"]["diff_ids"]
    assert podman.run("localhost/fastlayer-test/child:v1") == "child 1 1\n"

    require_root("umoci keeps the layers' file owners only as root")
    oci = skopeo_copy_to_oci(child_path, tmp_path / "oci", "child")
    actual = walk_rootfs(umoci_unpack(oci, "child", tmp_path / "bundle"), with_mtime=True)
    expected = expected_store_tree(store, [store.busybox, store.data, store.alias], "root")
    expected.update(base_tree)
    expected.update(child_tree)
    assert actual == expected


@pytest.mark.parametrize("image", ["root"], indirect=True)
def test_validators_reject_a_corrupted_layer(image, fresh_podman, tmp_path):
    """The checks above could fail: one flipped byte must be refused by all three."""
    podman = fresh_podman
    data = bytearray(image.path.read_bytes())
    with tarfile.open(image.path) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
        data[big.offset_data + big.size // 2] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    with pytest.raises(ValidatorError, match="(?i)digest"):
        podman.load(bad)
    with pytest.raises(ValidatorError, match="(?i)digest"):
        skopeo_copy_to_oci(bad, tmp_path / "bad-oci", "t")

    oci = skopeo_copy_to_oci(image.path, tmp_path / "oci", "t")
    umoci_unpack(oci, "t", tmp_path / "good")  # unpacks before the flip: the flip is the cause
    blob = max((oci / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob_data = bytearray(blob.read_bytes())
    blob_data[len(blob_data) // 2] ^= 0xFF
    blob.write_bytes(blob_data)
    # skopeo's layers are gzip: the flip breaks the gzip stream before umoci's digest check
    with pytest.raises(ValidatorError, match="(?i)digest mismatch|gzip: invalid checksum|corrupt"):
        umoci_unpack(oci, "t", tmp_path / "bundle")


def test_identical_to_reference(image, store, tmp_path):
    """The store layers that do not hold the host's busybox have the digests
    nixpkgs' script gave them (recorded in tests/data/nixpkgs/validators.json.gz).
    The whole archive cannot be recorded: the busybox layer holds this machine's
    busybox, and the config its digest and architecture. With
    FASTLAYER_REFERENCE_SCRIPT set, the whole archive is also compared byte for
    byte with a live run (which needs root and /nix)."""
    rec = recorded("validators")["owners"][image.owner]
    assert image.conf["store_layers"] == rec["layers"]
    arc = read_docker_archive(image.path)
    assert [arc.layer_digests[i] for i in rec["checked"]] == rec["layer_digests"]
    if USE_REFERENCE or not REFERENCE:
        return  # nothing live to compare with (or the image is the reference's own)
    if os.geteuid() != 0 or not os.path.isdir("/nix"):
        pytest.skip("running the reference on a --root store needs root and /nix")
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(image.conf))
    ref = subprocess.run(
        reference_argv(conf, store.root),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    ).stdout
    assert ref == image.path.read_bytes()
