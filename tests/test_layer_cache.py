"""The layer cache (issue 10), used as a hostile user would: it may make a build
faster, never different, and a damaged, raced, full, read-only or lying cache
must still give the right image or one clear error.

Expected values never come from the cache: images are compared with builds
made without it, layer hashes are recomputed with hashlib, registry uploads
are counted in the registry's own access log, and layouts are unpacked by
umoci (which checks every blob digest).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import validators
from cache_helpers import (
    DEEP,
    SRC,
    build_to_pipe,
    cli,
    entry_files,
    entry_path,
    layout_files,
    make_world,
    noise,
    one_error_line,
    sha256_hex,
    warnings_of,
)

import fastlayer
from fastlayer.cli import main
from fastlayer.errors import CacheMismatch
from fastlayer.publish import push_spec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs no test changes: read-only for every test of this module."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> bytes:
    """The image built without any cache: what every cached build must equal."""
    out = tmp_path_factory.mktemp("reference") / "img.tar"
    fastlayer.build(world.spec, str(out), cache=False)
    return out.read_bytes()


@pytest.fixture(autouse=True)
def own_cache_home(tmp_path, monkeypatch) -> Path:
    """A default cache (and registry blob cache) of the test's own; no host credentials."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FASTLAYER_CACHE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return tmp_path / "xdg" / "fastlayer"


def layer_blobs(archive: bytes) -> list[bytes]:
    """Each layer's bytes of a docker-archive, in manifest order."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        return [t.extractfile(n).read() for n in manifest["Layers"]]


def diff_ids(archive: bytes) -> list[str]:
    return ["sha256:" + sha256_hex(x) for x in layer_blobs(archive)]


def entries_by_diff_id(cache: Path) -> dict[str, str]:
    """diff_id -> key of the cache's entries."""
    return {json.loads(v)["diff_id"]: k for k, v in entry_files(cache).items()}


# --- 1. warm == cold == no cache ----------------------------------------------------------


def test_reference_holds_the_store_files(world, reference):
    """The reference itself is right: its layers hash to its config's diff_ids and
    the deep store file is in it byte for byte."""
    with tarfile.open(fileobj=io.BytesIO(reference)) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config = json.load(t.extractfile(manifest["Config"]))
    assert config["rootfs"]["diff_ids"] == diff_ids(reference)
    assert len(manifest["Layers"]) == 9  # 2 base, 4 store, [[layers]], roots, customisation
    deep = world.paths["libdeep-2.1"] + "/" + DEEP  # nixpkgs' absolute member names
    found = []
    for blob in layer_blobs(reference):
        with tarfile.open(fileobj=io.BytesIO(blob)) as t:
            if deep in t.getnames():
                found.append(t.extractfile(deep).read())
    assert found == [(world.on_disk("libdeep-2.1") / DEEP).read_bytes()]


@pytest.mark.parametrize("output", ["file", "pipe"])
def test_docker_archive_warm_equals_cold_equals_no_cache(world, reference, tmp_path, output):
    cache = tmp_path / "cache"
    got = []
    for _ in ("cold", "warm"):
        if output == "pipe":
            got.append(build_to_pipe(world.spec, tmp_path, cache=str(cache)))
        else:
            out = tmp_path / f"img-{len(got)}.tar"
            fastlayer.build(world.spec, str(out), cache=str(cache))
            got.append(out.read_bytes())
        assert len(entry_files(cache)) == 8  # 6 layers of ours and 2 verified base regions
    assert got[0] == reference and got[1] == reference


def test_cli_stream_to_a_pipe_warm_equals_no_cache(world, reference, tmp_path):
    """`fastlayer build -o -` read through a real pipe: warm, and with --no-cache."""
    spec = world.write_spec("pipe-spec.json")
    cache = tmp_path / "cache"
    fastlayer.build(world.spec, str(tmp_path / "warmup.tar"), cache=str(cache))
    warm = cli("build", "-q", str(spec), "-o", "-", "--cache", str(cache))
    assert warm.returncode == 0, warm.stderr.decode()
    assert warm.stdout == reference
    assert warnings_of(warm.stderr.decode()) == []
    bare = cli("build", "-q", str(spec), "-o", "-", "--no-cache")
    assert bare.returncode == 0 and bare.stdout == reference


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_oci_archive_and_layout_warm_equal_cold(world, tmp_path, compress):
    cache = tmp_path / "cache"
    archives, layouts = [], []
    for run in ("nocache", "cold", "warm"):
        use = False if run == "nocache" else str(cache)
        out = tmp_path / f"{run}.tar"
        fastlayer.build(world.spec, str(out), format="oci-archive", compress=compress, cache=use)
        archives.append(out.read_bytes())
        piped = build_to_pipe(world.spec, tmp_path, format="oci-archive", compress=compress,
                              cache=use)  # fmt: skip
        assert piped == archives[-1]
        layout = tmp_path / f"{run}-layout"
        fastlayer.build(world.spec, str(layout), format="oci-dir", compress=compress, cache=use)
        layouts.append(layout_files(layout))
    assert archives[0] == archives[1] == archives[2]
    assert layouts[0] == layouts[1] == layouts[2]
    # every blob of the layout is named by its own sha256 (recomputed here)
    assert all(p.rsplit("/", 1)[1] == h for p, h in layouts[2].items() if "/blobs/" in f"/{p}")
    # and the warm layout rebuilt in place is the same again
    again = fastlayer.build(
        world.spec, str(tmp_path / "warm-layout"), format="oci-dir", compress=compress,
        cache=str(cache),
    )  # fmt: skip
    assert layout_files(tmp_path / "warm-layout") == layouts[0]
    assert again.reused == 6 and again.read_bytes == 0


@pytest.mark.validators  # registry, skopeo or umoci
def test_push_warm_equals_cold_equals_no_cache(world, registry, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dest = f"docker://{registry.host}/cache/same"
    cold = push_spec(world.spec, dest + ":cold", insecure=True, cache=str(cache))
    mark = registry.mark()
    warm = push_spec(world.spec, dest + ":warm", insecure=True, cache=str(cache))
    assert registry.uploads_since(mark) == []
    assert warm.build.reused == 6 and warm.build.read_bytes == 0
    # no layer cache and no registry blob cache either: everything computed afresh
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    bare = push_spec(world.spec, dest + ":bare", insecure=True, cache=False)
    assert cold.digest == warm.digest == bare.digest
    assert not (tmp_path / "empty" / "fastlayer" / "layers").exists()
    raw = validators.run_tool([
        validators.require("skopeo"), "inspect", "--raw", "--tls-verify=false",
        f"{dest}:warm",
    ])  # fmt: skip
    assert "sha256:" + sha256_hex(raw.encode()) == cold.digest


@pytest.fixture(scope="module")
def warm_layout(world, tmp_path_factory) -> tuple[Path, Path]:
    """A cache and an OCI layout both filled by one build of world.spec."""
    top = tmp_path_factory.mktemp("warm-layout")
    fastlayer.build(world.spec, str(top / "layout"), format="oci-dir", cache=str(top / "cache"))
    return top / "cache", top / "layout"


CHANGES = {
    "owner": lambda w: {"uid": 1000, "gid": 100, "uname": "app", "gname": "users"},
    "mtime": lambda w: {"mtime": "2001-02-03T04:05:06Z"},
    "permissions": lambda w: {
        "permissions": [{"path": "/var/srv/*", "mode": "0600"}, {"path": "/etc/*", "uid": 7}]
    },
    "dest": lambda w: {"layers": [{**w.spec["layers"][0], "dest": "/opt"}]},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_recipe_is_a_new_key(world, warm_layout, tmp_path, change):
    """Same inputs, other rules: an in-place layout (which skips what the cache
    names) must come out as a fresh build of the changed spec, never the old layers."""
    cache, layout = tmp_path / "cache", tmp_path / "layout"
    shutil.copytree(warm_layout[0], cache)
    shutil.copytree(warm_layout[1], layout)
    spec = {**world.spec, **CHANGES[change](world)}
    fastlayer.build(spec, str(tmp_path / "fresh"), format="oci-dir", cache=False)
    fresh = layout_files(tmp_path / "fresh")
    assert fresh["index.json"] != layout_files(layout)["index.json"]  # the change matters
    fastlayer.build(spec, str(layout), format="oci-dir", cache=str(cache))
    assert {p: h for p, h in layout_files(layout).items() if p in fresh} == fresh


@pytest.mark.validators  # registry, skopeo or umoci
def test_file_edited_in_place_with_its_mtime_put_back_is_seen(tmp_path):
    """[[layers]] and roots files are no store paths: their walk key holds every
    entry's size, mtime, ctime and inode, so an edit that keeps size and mtime is
    still a new layer (in a layout updated in place, which would skip a known one)."""
    world = make_world(tmp_path / "w", base=False)
    cache, layout = tmp_path / "cache", tmp_path / "layout"
    fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    for f, text in (("rootfs/etc/motd", "WELCOME\n"), ("srv/index.html", "<p>SERVED</p>\n")):
        path = world.top / f
        st = os.stat(path)
        assert len(text) == st.st_size
        path.write_text(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    assert result.reused == 4  # the store layers only
    fastlayer.build(world.spec, str(tmp_path / "fresh"), format="oci-dir", cache=False)
    fresh = layout_files(tmp_path / "fresh")
    assert {p: h for p, h in layout_files(layout).items() if p in fresh} == fresh
    rootfs = validators.umoci_unpack(layout, "t1", tmp_path / "bundle")
    assert (rootfs / "etc" / "motd").read_text() == "WELCOME\n"
    assert (rootfs / "var" / "srv" / "index.html").read_text() == "<p>SERVED</p>\n"


# --- 2. a warm build reads nothing it does not need ----------------------------------------


def poison_deep_file(world) -> Path:
    """Replace a file deep in libdeep by a fifo: any walk of that store path fails
    naming it (a plain deletion would only make a smaller layer). The store
    path's root is untouched: its lstat is the same."""
    root = world.on_disk("libdeep-2.1")
    before = os.lstat(root)
    deep = root / DEEP
    deep.unlink()
    os.mkfifo(deep)
    after = os.lstat(root)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino, before.st_mtime_ns, before.st_ctime_ns,
    )  # fmt: skip
    return deep


@pytest.mark.validators  # registry, skopeo or umoci
def test_warm_push_and_layout_read_no_skipped_store_path(registry, tmp_path, capsys):
    world = make_world(tmp_path / "w")
    original = (world.on_disk("libdeep-2.1") / DEEP).read_bytes()
    cache = tmp_path / "cache"
    dest = f"docker://{registry.host}/cache/unread:1"
    first = push_spec(world.spec, dest, insecure=True, cache=str(cache))
    layout = tmp_path / "layout"
    fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    before = layout_files(layout)

    deep = poison_deep_file(world)
    mark = registry.mark()
    again = push_spec(world.spec, dest, insecure=True, cache=str(cache))
    assert registry.uploads_since(mark) == []
    assert again.digest == first.digest
    assert again.build.reused == 6 and again.build.read_bytes == 0
    fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    assert layout_files(layout) == before
    rootfs = validators.umoci_unpack(layout, "t1", tmp_path / "bundle")
    assert (rootfs / world.paths["libdeep-2.1"].lstrip("/") / DEEP).read_bytes() == original

    # outputs that need the bytes: the fifo is found and named, with or without cache
    spec = world.write_spec()
    for flags in (["--no-cache"], ["--cache", str(cache)]):
        out_dir = tmp_path / f"out{len(flags)}"
        out_dir.mkdir()
        rc = main(["build", "-q", str(spec), "-o", str(out_dir / "img.tar"), *flags])
        err = capsys.readouterr().err
        assert rc == 1
        one_error_line(err, str(deep), "fifo")
        assert os.listdir(out_dir) == []


@pytest.mark.validators  # registry, skopeo or umoci
def test_one_new_store_path_writes_one_blob_and_reads_one_path(registry, tmp_path):
    world = make_world(tmp_path / "w", base=False)
    cache = tmp_path / "cache"
    layout = tmp_path / "layout"
    dest = f"docker://{registry.host}/cache/onepath:1"
    fastlayer.build(world.spec, str(layout), format="oci-dir", compress="gzip", cache=str(cache))
    first = push_spec(world.spec, dest, insecure=True, cache=str(cache))
    before = layout_files(layout)
    poison_deep_file(world)  # libdeep's layer must not be read again

    # app-1.0 rebuilt by "Nix": a new store path, the old one left as it was
    changed = world.with_new_path(
        "app-1.0", "app-1.1", {"bin/app": b"#!/bin/sh\necho app 1.1\n", "share/doc/README": b"x"}
    )
    result = fastlayer.build(
        changed, str(layout), format="oci-dir", compress="gzip", cache=str(cache)
    )
    after = layout_files(layout)
    new = sorted(set(after) - set(before))
    assert set(before) - set(after) == set()
    assert all(after[p] == h for p, h in before.items() if p != "index.json")
    app_layer = next(x for x in result.layers if any("app-1.1" in p for p in x.paths))
    config_digest = result.image_id
    manifest = json.loads((layout / "index.json").read_text())["manifests"]
    expect = {app_layer.digest, config_digest, *(m["digest"] for m in manifest)}
    # the customisation layer links the new path's files into / : it changes too
    custom = result.layers[-1].digest
    expect.add(custom)
    assert new == sorted("blobs/sha256/" + d.removeprefix("sha256:") for d in expect)
    assert len(new) == 4  # the new store layer, customisation layer, config, manifest
    assert result.reused == 5  # 3 store layers, [[layers]], roots
    assert result.read_bytes == app_layer.size
    rootfs = validators.umoci_unpack(layout, "t1", tmp_path / "bundle")
    app = rootfs / changed["contents"]["store_paths"][0].lstrip("/") / "bin" / "app"
    assert app.read_bytes() == b"#!/bin/sh\necho app 1.1\n"

    mark = registry.mark()
    pushed = push_spec(changed, dest, insecure=True, cache=str(cache))
    uploads = sorted(registry.uploads_since(mark))
    assert uploads == sorted([app_layer.digest, custom, config_digest])
    assert pushed.digest != first.digest


# --- 3. damaged and lying entries -----------------------------------------------------------


def damage(path: Path, how: str, elsewhere: Path) -> None:
    path.unlink()
    if how == "garbage":
        path.write_bytes(noise("garbage", 3000))
    elif how == "wrong types":
        path.write_text(json.dumps({"diff_id": 7, "size": "big", "blobs": []}))
    elif how == "bad digest":
        path.write_text(json.dumps({"diff_id": "sha256:xyz", "size": 10240, "blobs": {}}))
    elif how == "negative size":
        path.write_text(json.dumps({"diff_id": "sha256:" + "a" * 64, "size": -1, "blobs": {}}))
    elif how == "another key's entry":  # well-formed, but written for another recipe
        other = next(p for p in path.parent.parent.rglob("*.json") if p.name != path.name)
        path.write_bytes(other.read_bytes())
    elif how == "symlink to /etc/passwd":
        path.symlink_to("/etc/passwd")
    elif how == "dangling symlink":
        path.symlink_to(elsewhere / "missing.json")
    elif how == "symlink loop":
        path.symlink_to(path.name)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "socket":
        here = os.getcwd()
        os.chdir(path.parent)  # a socket's path must be short
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(here)
    elif how == "directory":
        path.mkdir()
    elif how == "10 MiB file":
        path.write_bytes(b"{" + b" " * (10 << 20) + b"}")
    else:
        raise AssertionError(how)


DAMAGES = [
    "garbage", "wrong types", "bad digest", "negative size", "another key's entry",
    "symlink to /etc/passwd",
    "dangling symlink", "symlink loop", "fifo", "socket", "directory", "10 MiB file",
]  # fmt: skip


@pytest.fixture(scope="module")
def warm_cache(world, tmp_path_factory) -> tuple[Path, list]:
    """A cache filled by one build, and that build's layer keys (image order)."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    result = fastlayer.build(world.spec, str(cache.parent / "img.tar"), cache=str(cache))
    return cache, result.layer_keys


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_entry_warns_and_is_rebuilt(world, reference, warm_cache, tmp_path, how, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache[0], cache)
    keys = warm_cache[1]
    i = 4  # the libdeep store layer (base 0-1, then store layers)
    good = entry_path(cache, keys[i]).read_bytes()
    damage(entry_path(cache, keys[i]), how, tmp_path)

    capsys.readouterr()
    got = build_to_pipe(world.spec, tmp_path, cache=str(cache))
    err = capsys.readouterr().err
    assert got == reference
    warned = warnings_of(err)
    assert len(warned) == 1, err
    assert keys[i] in warned[0] and "dropped" in warned[0]
    entry = entry_path(cache, keys[i])
    assert not entry.is_symlink() and entry.is_file()
    assert json.loads(entry.read_bytes()) == json.loads(good)
    assert json.loads(good)["diff_id"] == diff_ids(reference)[i]
    # and it is used again, without a word
    assert build_to_pipe(world.spec, tmp_path, cache=str(cache)) == reference
    assert capsys.readouterr().err == ""


def test_entry_of_another_size_is_corrected_silently(world, reference, warm_cache, tmp_path):
    """A well-formed entry whose size is not the layer's: never trusted (the layer is
    spooled and hashed), and the right facts replace it."""
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache[0], cache)
    keys = warm_cache[1]
    entry = entry_path(cache, keys[4])
    right = json.loads(entry.read_bytes())
    entry.write_text(json.dumps({**right, "diff_id": diff_ids(reference)[5], "size": 10240}))
    assert build_to_pipe(world.spec, tmp_path, cache=str(cache)) == reference
    assert json.loads(entry.read_bytes()) == right


def lie(cache: Path, victim: str, other: str) -> Path:
    """Make the entry of diff_id victim claim diff_id other (its size kept)."""
    path = entry_path(cache, entries_by_diff_id(cache)[victim])
    doc = json.loads(path.read_bytes())
    path.write_text(json.dumps({**doc, "diff_id": other, "blobs": {}}))
    return path


def test_lying_entry_on_a_pipe_fails_once_then_heals(world, reference, tmp_path):
    spec = world.write_spec("lie-spec.json")
    cache = tmp_path / "cache"
    fastlayer.build(world.spec, str(tmp_path / "warmup.tar"), cache=str(cache))
    ids = diff_ids(reference)
    entry = lie(cache, ids[4], ids[3])
    bad = cli("build", "-q", str(spec), "-o", "-", "--cache", str(cache))
    assert bad.returncode == 1
    line = one_error_line(bad.stderr.decode(), ids[3], ids[4], "layer cache")
    assert "run the build again" in line
    assert not entry.exists()  # dropped
    assert len(bad.stdout) < len(reference)  # the stream was cut: no whole image
    # the next build is right, and records the truth
    assert build_to_pipe(world.spec, tmp_path, cache=str(cache)) == reference
    assert ids[4] in entries_by_diff_id(cache)


def test_lying_entry_fails_an_oci_archive_on_a_pipe_then_heals(world, reference, tmp_path):
    cache = tmp_path / "cache"
    right = build_to_pipe(world.spec, tmp_path, format="oci-archive", cache=False)
    fastlayer.build(world.spec, str(tmp_path / "warmup.tar"), cache=str(cache))
    ids = diff_ids(reference)
    lie(cache, ids[5], ids[2])  # app's entry names greeting's layer (same size)
    with pytest.raises(CacheMismatch, match=ids[5]):
        build_to_pipe(world.spec, tmp_path, format="oci-archive", cache=str(cache))
    assert build_to_pipe(world.spec, tmp_path, format="oci-archive", cache=str(cache)) == right
    assert ids[5] in entries_by_diff_id(cache)


def test_lying_entry_fails_stream_nix_on_a_pipe_then_heals(tmp_path):
    from test_stream_nix import make_store

    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(make_store(tmp_path)))
    cache = tmp_path / "cache"
    ok = cli("stream-nix", str(conf), "--cache", str(cache))
    assert ok.returncode == 0, ok.stderr.decode()
    ids = diff_ids(ok.stdout)  # lib, app, customisation
    assert sorted(entries_by_diff_id(cache)) == sorted(ids[:2])
    lie(cache, ids[1], ids[0])
    bad = cli("stream-nix", str(conf), "--cache", str(cache))
    assert bad.returncode == 1
    one_error_line(bad.stderr.decode(), ids[0], ids[1], "layer cache")
    again = cli("stream-nix", str(conf), "--cache", str(cache))
    assert again.returncode == 0 and again.stdout == ok.stdout
    assert sorted(entries_by_diff_id(cache)) == sorted(ids[:2])


# --- 4. concurrent builds ---------------------------------------------------------------------


def test_two_processes_fill_one_cache_at_once(world, reference, tmp_path):
    spec = world.write_spec("race-spec.json")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": SRC}
    argv = [sys.executable, "-m", "fastlayer", "build", "-q", str(spec), "--cache", str(cache)]
    to_file = subprocess.Popen([*argv, "-o", str(tmp_path / "a.tar")], env=env,
                               stderr=subprocess.PIPE)  # fmt: skip
    to_pipe = subprocess.Popen([*argv, "-o", "-"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    piped, pipe_err = to_pipe.communicate(timeout=300)
    _, file_err = to_file.communicate(timeout=300)
    assert (to_file.returncode, to_pipe.returncode) == (0, 0), (file_err, pipe_err)
    assert warnings_of(file_err.decode() + pipe_err.decode()) == []
    assert piped == reference and (tmp_path / "a.tar").read_bytes() == reference
    found = entry_files(cache)
    assert len(found) == 8
    assert {json.loads(v)["diff_id"] for v in found.values()} <= set(diff_ids(reference))
    assert not [p for p in cache.rglob("*") if p.name.startswith(".entry-")]


# --- 5. a deleted store path ------------------------------------------------------------------


@pytest.mark.validators  # registry, skopeo or umoci
def test_deleted_store_path_is_an_error_never_a_cached_image(registry, tmp_path, capsys):
    world = make_world(tmp_path / "w", base=False)
    cache = tmp_path / "cache"
    layout = tmp_path / "layout"
    dest = f"docker://{registry.host}/cache/deleted:1"
    fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    push_spec(world.spec, dest, insecure=True, cache=str(cache))
    gone = world.paths["data-3"]
    shutil.rmtree(world.on_disk("data-3"))
    spec = world.write_spec()
    before = layout_files(layout)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (
        ["build", "-q", str(spec), "-o", str(out_dir / "img.tar")],
        ["build", "-q", str(spec), "-o", str(layout), "--format", "oci-dir"],
        ["push", "-q", "--insecure", str(spec), dest],
    ):
        rc = main([*argv, "--cache", str(cache)])
        err = capsys.readouterr().err
        assert rc == 1, argv
        one_error_line(err, gone)
    assert os.listdir(out_dir) == []
    assert layout_files(layout) == before
    with pytest.raises(fastlayer.FastlayerError, match=gone):
        build_to_pipe(world.spec, tmp_path, cache=str(cache))

    # put back under the same name with other bytes (a repair, a re-substitution):
    # a new root inode/ctime, so a new key, never the old layer
    blob = world.on_disk("data-3") / "share" / "data" / "blob.bin"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(noise("other data", 120_000))
    fastlayer.build(world.spec, str(layout), format="oci-dir", cache=str(cache))
    fastlayer.build(world.spec, str(tmp_path / "fresh"), format="oci-dir", cache=False)
    assert layout_files(layout) == {**before, **layout_files(tmp_path / "fresh")}


# --- 6. a full or read-only cache -------------------------------------------------------------


def fill(where: Path) -> None:
    """Use every byte of the file system at where."""
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert os.statvfs(where).f_bavail == 0


def test_full_disk_cache_builds_the_same_image(world, reference, tiny_fs, capsys):
    cache = tiny_fs / "cache"
    (cache / "layers" / "v1").mkdir(parents=True)  # so the failure is the write itself
    fill(tiny_fs)
    capsys.readouterr()
    got = build_to_pipe(world.spec, tiny_fs.parent, cache=str(cache))
    err = capsys.readouterr().err
    assert got == reference
    warned = warnings_of(err)
    assert len(warned) == 1 and "No space left on device" in warned[0], err
    assert str(cache) in warned[0] and "building without caching" in warned[0]
    assert entry_files(cache) == {}
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []  # no temporary left


def test_read_only_cache_builds_the_same_image(world, reference, tiny_fs, capsys):
    cache = tiny_fs / "cache"
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    capsys.readouterr()
    got = build_to_pipe(world.spec, tiny_fs.parent, cache=str(cache))
    err = capsys.readouterr().err
    assert got == reference
    warned = warnings_of(err)
    assert len(warned) == 1 and "Read-only file system" in warned[0], err
    # a warm cache made read-only afterwards is still used, and still right
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
    fastlayer.build(world.spec, str(tiny_fs.parent / "warm.tar"), cache=str(cache))
    assert len(entry_files(cache)) == 8
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    got = build_to_pipe(world.spec, tiny_fs.parent, cache=str(cache))
    assert got == reference
    assert capsys.readouterr().err == ""


# --- 7. verified base regions -----------------------------------------------------------------


def test_verified_base_is_remembered_but_not_past_a_change(world, tmp_path, capsys, monkeypatch):
    """A base verified once is not hashed again while its file is unchanged; its
    bytes changed in place (same size, mtime put back) must fail the build."""
    from fastlayer import builder

    top = tmp_path / "w"
    w = make_world(top)
    cache = tmp_path / "cache"
    seen: list[bool] = []

    class Spy(builder.ReaderSource):  # records only: the real source does the work
        def __init__(self, layer, verify=True):
            seen.append(verify)
            super().__init__(layer, verify)

    monkeypatch.setattr(builder, "ReaderSource", Spy)
    outs = []
    for _ in range(2):
        out = tmp_path / f"img{len(outs)}.tar"
        fastlayer.build(w.spec, str(out), cache=str(cache))
        outs.append(out.read_bytes())
    assert seen == [True, True, False, False]  # the second build trusted what it had checked
    assert outs[0] == outs[1]

    # a damaged record of a verified region: dropped with a word, verified again
    entry = entry_path(cache, entries_by_diff_id(cache)[diff_ids(outs[0])[0]])
    entry.write_bytes(b"\0not json")
    seen.clear()
    capsys.readouterr()
    fastlayer.build(w.spec, str(tmp_path / "img2.tar"), cache=str(cache))
    assert len(warnings_of(capsys.readouterr().err)) == 1
    assert seen == [True, False] and (tmp_path / "img2.tar").read_bytes() == outs[0]

    base = Path(w.spec["from_image"])
    blob = layer_blobs(base.read_bytes())[1]
    data = bytearray(base.read_bytes())
    at = data.index(blob) + len(blob) // 2
    st = os.stat(base)
    with open(base, "r+b") as f:  # in place: same inode, same size
        f.seek(at)
        f.write(bytes([data[at] ^ 1]))
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(base)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino, st.st_size, st.st_mtime_ns,
    )  # fmt: skip
    spec = w.write_spec()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    seen.clear()
    rc = main(["build", "-q", str(spec), "-o", str(out_dir / "img.tar"), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 1
    one_error_line(err, "l1/layer.tar", "sha256:" + sha256_hex(blob))
    assert os.listdir(out_dir) == []
    assert seen[1] is True


# --- 8. the cache command and where the cache lives -------------------------------------------


def test_cache_info_and_prune(world, reference, tmp_path, capsys):
    cache = tmp_path / "cache"
    fastlayer.build(world.spec, str(tmp_path / "a.tar"), cache=str(cache))
    capsys.readouterr()
    assert main(["cache", "info", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    size = sum(len(v) for v in entry_files(cache).values())
    assert f"layer cache: {cache}" in out and f"entries: 8 ({size} bytes)" in out

    # least recently used first: four entries made old, then a budget for four
    paths = sorted(cache.glob("layers/v1/*/*.json"))
    for p in paths[:4]:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    keep = sum(p.stat().st_size for p in paths[4:])
    assert main(["cache", "prune", "--cache", str(cache), "--max-size", str(keep)]) == 0
    assert sorted(cache.glob("layers/v1/*/*.json")) == paths[4:]
    for p in paths[4:6]:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    assert main(["cache", "prune", "--cache", str(cache), "--older-than", "1"]) == 0
    assert sorted(cache.glob("layers/v1/*/*.json")) == paths[6:]

    assert main(["cache", "prune", "--cache", str(cache), "--max-size", "0"]) == 0
    assert "removed 2 entries; 0 left (0 bytes)" in capsys.readouterr().out
    assert entry_files(cache) == {}
    cold = build_to_pipe(world.spec, tmp_path, cache=str(cache))
    assert cold == reference and len(entry_files(cache)) == 8


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--max-size", "lots"], "--max-size 'lots'"),
        (["--max-size", "-1"], "--max-size '-1'"),
        (["--max-size", "1Q"], "--max-size '1Q'"),
        (["--max-size", ""], "--max-size ''"),
        (["--older-than", "-2"], "--older-than -2"),
        (["--older-than", "nan"], "--older-than nan"),
        ([], "--max-size"),
    ],
)
def test_cache_prune_refuses_bad_arguments(tmp_path, capsys, args, culprit):
    cache = tmp_path / "cache"
    assert main(["cache", "prune", "--cache", str(cache), *args]) == 1
    one_error_line(capsys.readouterr().err, culprit)


def test_no_cache_writes_nothing_and_fastlayer_cache_moves_it(
    world, reference, tmp_path, capsys, monkeypatch, own_cache_home
):
    spec = world.write_spec("where-spec.json")
    out = tmp_path / "img.tar"
    assert main(["build", "-q", str(spec), "-o", str(out), "--no-cache"]) == 0
    assert out.read_bytes() == reference
    assert not own_cache_home.exists()

    moved = tmp_path / "moved"
    monkeypatch.setenv("FASTLAYER_CACHE", str(moved))
    assert main(["build", "-q", str(spec), "-o", str(out)]) == 0
    assert out.read_bytes() == reference
    assert len(entry_files(moved)) == 8 and not own_cache_home.exists()
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert f"layer cache: {moved}\nentries: 8 " in capsys.readouterr().out

    # --cache wins over FASTLAYER_CACHE; without either, XDG_CACHE_HOME/fastlayer
    assert main(["build", "-q", str(spec), "-o", str(out), "--cache", str(tmp_path / "c")]) == 0
    assert len(entry_files(tmp_path / "c")) == 8
    monkeypatch.delenv("FASTLAYER_CACHE")
    assert main(["build", "-q", str(spec), "-o", str(out)]) == 0
    assert len(entry_files(own_cache_home)) == 8
