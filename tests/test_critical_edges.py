"""Edges where one changed line would change what a user gets, with nothing else noticing.

Each test pins a boundary or a merge rule against a value computed here,
independently of fastlayer: Python's tarfile for tar bytes, `nix-store
--dump` for NAR sizes, dict literals for configs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from closures import make_closure
from fastlayer._native.tarstream import pack_header
from tarref import reference_layer

import fastlayer
from fastlayer.emit import Owner, pump, store_layer
from fastlayer.errors import FastlayerError
from fastlayer.sinks import open_sink

SRC = str(Path(fastlayer.__file__).resolve().parent.parent)

# -- tar headers: PAX exactly when tarfile uses it --------------------------------------


def tarfile_header(name: str, kind: bytes, link: str = "", uname="root", gname="root") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime, ti.uname, ti.gname = kind, link, 0o644, 1, uname, gname
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@pytest.mark.parametrize("length", [99, 100, 101])
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
def test_a_name_of_100_bytes_has_no_pax_header_101_has(length, kind):
    """ustar's name field holds 100 bytes; tarfile adds a pax record only past that
    (a directory's name counts its trailing slash)."""
    name = "/" + "n" * (length - 1)
    link = "target" if kind == tarfile.SYMTYPE else ""
    want = tarfile_header(name, kind, link)
    got = pack_header(name.encode(), kind, 0o644, 0, 1, 0, 0, b"root", b"root", link.encode())
    assert got == want
    pax = kind == tarfile.DIRTYPE and length >= 100 or length > 100
    assert (len(got) > 512) == pax  # a pax header costs at least two more blocks


@pytest.mark.parametrize("length", [100, 101])
def test_a_link_target_of_100_bytes_has_no_pax_header(length):
    link = "t" * length
    got = pack_header(b"/l", tarfile.SYMTYPE, 0o644, 0, 1, 0, 0, b"root", b"root", link.encode())
    assert got == tarfile_header("/l", tarfile.SYMTYPE, link)
    assert (len(got) > 512) == (length > 100)


@pytest.mark.parametrize("length", [32, 33])
def test_owner_names_of_32_bytes_fit_33_need_pax(length):
    uname, gname = "u" * length, "g" * length
    owner = (uname.encode(), gname.encode())
    got = pack_header(b"/f", tarfile.REGTYPE, 0o644, 0, 1, 0, 0, *owner, b"")
    assert got == tarfile_header("/f", tarfile.REGTYPE, uname=uname, gname=gname)
    assert (len(got) > 512) == (length > 32)


@pytest.fixture
def short_dir():
    """A directory with a short absolute name (tmp_path's is longer than 100 bytes)."""
    d = tempfile.mkdtemp(prefix="fl-")
    yield Path(d)
    shutil.rmtree(d)


def test_a_layer_with_names_of_exactly_100_bytes_equals_tarfile(short_dir):
    top = short_dir / "app"
    top.mkdir()
    prefix = len(str(top)) + 1
    (top / ("f" * (100 - prefix))).write_text("exactly 100\n")  # archived name: 100 bytes
    (top / ("g" * (101 - prefix))).write_text("101\n")
    (top / ("d" * (99 - prefix))).mkdir()  # 99 bytes + "/" = 100
    os.symlink("x" * 100, top / "link")
    assert {len(str(p)) for p in top.iterdir()} == {99, 100, 101, prefix + 4}
    out = bytearray()
    digest = pump(store_layer([str(top)], Owner(mtime=1)), out.extend)
    want = reference_layer([str(top)], 1, 0, 0, "root", "root")
    assert bytes(out) == want
    assert digest == hashlib.sha256(want).hexdigest()


# -- config inheritance --------------------------------------------------------------


def read_config(path: Path) -> dict:
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        return json.load(t.extractfile(manifest["Config"]))


def test_volumes_labels_and_ports_merge_with_the_base_child_winning(tmp_path):
    base = tmp_path / "base.tar"
    fastlayer.build({"name": "base", "tag": "1", "config": {
        "Volumes": {"/data": {}, "/shared": {}}, "Labels": {"a": "base", "b": "base"},
        "ExposedPorts": {"80/tcp": {}}, "Cmd": ["/base"]}}, str(base))  # fmt: skip
    child = tmp_path / "child.tar"
    fastlayer.build({"name": "child", "tag": "1", "from_image": str(base), "config": {
        "Volumes": {"/cache": {}}, "Labels": {"b": "child"}, "ExposedPorts": {"443/tcp": {}}}},
        str(child))  # fmt: skip
    config = read_config(child)["config"]
    assert config["Volumes"] == {"/data": {}, "/shared": {}, "/cache": {}}
    assert config["Labels"] == {"a": "base", "b": "child"}
    assert config["ExposedPorts"] == {"80/tcp": {}, "443/tcp": {}}
    assert config["Cmd"] == ["/base"]


# -- the Nix database: narSize is checked like narHash ---------------------------------


@pytest.mark.validators
def test_a_graph_whose_nar_size_is_wrong_is_refused(tmp_path):
    import validators

    nix_store = validators.require("nix-store")
    store = tmp_path / "store"
    paths, graph = make_closure(store, {"tool": {"bin/tool": b"#!/bin/sh\necho x\n"}}, {})
    path = paths["tool"]
    dump = subprocess.run([nix_store, "--dump", str(store) + path], capture_output=True, check=True)
    true_size = len(dump.stdout)  # Nix's own serialisation, not fastlayer's
    nodes = json.loads(graph.read_text())
    env = {**os.environ, "PYTHONPATH": SRC}

    def nix_db(size: int, root: Path) -> subprocess.CompletedProcess:
        nodes[0]["narSize"] = size
        graph.write_text(json.dumps(nodes))
        return subprocess.run(
            [sys.executable, "-m", "fastlayer", "nix-db", str(graph), str(root),
             "--store-root", str(store)], capture_output=True, text=True, env=env,
        )  # fmt: skip

    for wrong in (true_size + 8, true_size - 8):
        root = tmp_path / f"root-{wrong}"
        root.mkdir()
        r = nix_db(wrong, root)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"its NAR is {true_size} bytes, the graph says {wrong}" in r.stderr
        assert path in r.stderr
        assert list(root.iterdir()) == []
    root = tmp_path / "root-right"
    r = nix_db(true_size, root)
    assert r.returncode == 0, r.stderr
    rows = (
        sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
        .execute("select path, narSize from ValidPaths")
        .fetchall()
    )
    assert rows == [(path, true_size)]


# -- spools: memory only under the cap ----------------------------------------------


@pytest.mark.parametrize("size, on_disk", [(4095, False), (4096, True), (1 << 20, True)])
def test_a_spool_over_fastlayer_spool_memory_goes_to_tmpdir(tmp_path, monkeypatch, size, on_disk):
    from fastlayer.sinks.spool import Spool

    monkeypatch.setenv("FASTLAYER_SPOOL_MEMORY", "4096")
    spool = Spool(size, str(tmp_path))
    try:
        target = os.readlink(f"/proc/self/fd/{spool.fd}")
        if on_disk:  # an unlinked file in the spool directory, not memory
            assert target.startswith(str(tmp_path / "fastlayer-spool-")), target
            assert target.endswith(" (deleted)")
        else:
            assert target.startswith("/memfd:fastlayer-spool"), target
        assert list(tmp_path.iterdir()) == []  # unlinked at once either way
    finally:
        spool.close()


def test_spool_memory_zero_means_always_disk(tmp_path, monkeypatch):
    from fastlayer.sinks.spool import Spool

    monkeypatch.setenv("FASTLAYER_SPOOL_MEMORY", "0")
    spool = Spool(1, str(tmp_path))
    try:
        assert os.readlink(f"/proc/self/fd/{spool.fd}").startswith(str(tmp_path))
    finally:
        spool.close()


# -- archive writer: a source must produce exactly the bytes it announced ------------


class Lying:
    """A layer source whose bytes differ in number from the size it announced: the
    header written before them would lie, and a reader would misparse the archive."""

    def __init__(self, announced: int, produced: int):
        self.size, self.produced = announced, produced

    def pump(self, write) -> str:
        data = tar_of(self.produced)
        write(memoryview(data))
        return hashlib.sha256(data).hexdigest()


def tar_of(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("f")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    data = buf.getvalue()
    return data[:n] if n <= len(data) else data + b"\0" * (n - len(data))


@pytest.mark.parametrize("produced", [10240 - 512, 10240 + 512])
def test_a_layer_of_another_size_than_announced_leaves_no_archive(tmp_path, produced):
    out = tmp_path / "out" / "img.tar"
    out.parent.mkdir()
    with pytest.raises(OSError, match=f"layer produced {produced} bytes, not the 10240 announced"):
        with open_sink(str(out), "docker-archive", "none") as sink:
            sink.add_layer(Lying(10240, produced))
    assert list(out.parent.iterdir()) == []


# -- verify_base through build() -----------------------------------------------------


def tampered_base(tmp_path: Path) -> tuple[Path, str]:
    """A base whose layer bytes were changed in place (same size); (path, claimed diff_id)."""
    root = tmp_path / "base-root"
    root.mkdir()
    (root / "data").write_bytes(b"A" * 4096)
    built = tmp_path / "built.tar"
    fastlayer.build({"name": "base", "tag": "1", "contents": {"roots": [str(root)]}}, str(built))
    claimed = read_config(built)["rootfs"]["diff_ids"][0]
    base = tmp_path / "base.tar"
    with tarfile.open(built) as src, tarfile.open(base, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and member.name.endswith("layer.tar"):
                assert data.count(b"A" * 64) > 0
                data = data.replace(b"A" * 64, b"B" * 64)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return base, claimed


def test_build_verifies_base_layers_unless_verify_base_is_false(tmp_path):
    base, claimed = tampered_base(tmp_path)
    out = tmp_path / "child.tar"
    spec = {"name": "child", "tag": "1", "from_image": str(base)}
    with pytest.raises(FastlayerError, match=f"not its diff_id {claimed}"):
        fastlayer.build(spec, str(out))
    assert not out.exists()
    fastlayer.build({**spec, "verify_base": False}, str(out))  # trusted: copied as it is
    assert read_config(out)["rootfs"]["diff_ids"][0] == claimed
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        first = t.extractfile(manifest["Layers"][0]).read()
    assert b"B" * 64 in first and hashlib.sha256(first).hexdigest() != claimed[7:]


# -- the derived tag: the formula README gives ------------------------------------------


def test_the_derived_tag_is_the_config_hash_readme_states(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("tagged\n")
    out = tmp_path / "img.tar"
    result = fastlayer.build(
        {"name": "app", "contents": {"roots": [str(root)]},
         "config": {"Env": ["A=1"], "Labels": {"z": "1", "a": "2"}}}, str(out)
    )  # fmt: skip
    config = read_config(out)
    # README: sha256 of json.dumps(config, sort_keys=True), first 32 hex characters
    want = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]
    assert result.tag == want
    with tarfile.open(out) as t:
        assert json.load(t.extractfile("manifest.json"))[0]["RepoTags"] == [f"app:{want}"]


# -- found by the sampled cosmic-ray run ---------------------------------------------


@pytest.mark.parametrize("wrap", ["map", "pipe", "over"])
def test_steps_nested_too_deep_are_one_error_whatever_the_step(wrap):
    from fastlayer.plan.pipeline import MAX_NESTING, compile_pipeline

    step: list = ["popularity_contest"]
    for _ in range(MAX_NESTING + 2):
        step = {"map": ["map", step], "pipe": ["pipe", [step]], "over": ["over", "x", step]}[wrap]
    with pytest.raises(FastlayerError, match=f"nested deeper than {MAX_NESTING} levels"):
        compile_pipeline([step])


def test_a_single_file_store_path_is_linked_by_its_name(tmp_path):
    """link_store_paths: a store path that is one file becomes /<name> -> the path."""
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    path = "/nix/store/" + "a" * 32 + "-tool"
    (tmp_path / path.lstrip("/")).write_text("#!/bin/sh\n")
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([{"path": path, "references": [path], "narSize": 1}]))
    out = tmp_path / "img.tar"
    fastlayer.build({"name": "app", "tag": "1", "store_root": str(tmp_path),
                     "contents": {"store_paths": [path], "graph": str(graph),
                                  "link_store_paths": True}}, str(out))  # fmt: skip
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        top = tarfile.open(fileobj=io.BytesIO(t.extractfile(manifest["Layers"][-1]).read()))
        link = top.getmember("/tool")
    assert link.issym() and link.linkname == path


def test_a_base_whose_config_section_is_null_is_a_base(tmp_path):
    """The image spec makes `config` optional; some bases carry `"config": null`."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("base\n")
    base = tmp_path / "base"
    fastlayer.build({"name": "base", "tag": "1", "contents": {"roots": [str(root)]}}, str(base),
                    format="oci-dir")  # fmt: skip
    blobs = base / "blobs" / "sha256"

    def put(doc: dict) -> tuple[str, int]:
        raw = json.dumps(doc).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return "sha256:" + digest, len(raw)

    index = json.loads((base / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    config["config"] = None
    manifest["config"]["digest"], manifest["config"]["size"] = put(config)
    index["manifests"][0]["digest"], index["manifests"][0]["size"] = put(manifest)
    (base / "index.json").write_text(json.dumps(index))
    out = tmp_path / "child.tar"
    fastlayer.build({"name": "child", "tag": "1", "from_image": str(base),
                     "config": {"Cmd": ["/f"]}}, str(out))  # fmt: skip
    child = read_config(out)
    assert child["config"] == {"Cmd": ["/f"]}
    assert child["rootfs"]["diff_ids"][0] == config["rootfs"]["diff_ids"][0]
