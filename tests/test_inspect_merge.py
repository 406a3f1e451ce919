"""`fastlayer inspect` and `fastlayer merge`, checked with podman, skopeo and umoci."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import validators
from test_sinks import config_for, make_store

from fastlayer.cli import main
from fastlayer.emit import Owner, StreamSource, fsencode, store_layer, walk
from fastlayer.sinks import open_sink

ALICE = Owner(mtime=7, uid=1000, gid=100, uname="alice", gname="users")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("store")
    return root, make_store(root)


def build(store, out, layers, tags, fmt="docker-archive", compress="none", owner=None, cmd="x"):
    """An image of the given store path indices, one layer each."""
    root, paths = store
    with open_sink(str(out), fmt, compress) as sink:
        written = [
            sink.add_layer(StreamSource(store_layer([paths[i]], owner or Owner(), str(root))))
            for i in layers
        ]
        config = config_for([x.diff_id for x in written])
        config["config"]["Cmd"] = [cmd]
        return sink.finish(config, tags)


def inspect_json(capsys, *args) -> dict:
    assert main(["inspect", "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_lists_layers_store_paths_and_config(store, tmp_path, capsys):
    record = build(store, tmp_path / "a.tar", [0, 1, 2], ["app:1"])
    (img,) = inspect_json(capsys, tmp_path / "a.tar")["images"]
    assert img["repo_tags"] == ["app:1"]
    assert img["config"]["config"]["Cmd"] == ["x"]
    assert [x["diff_id"] for x in img["layers"]] == [x.diff_id for x in record.layers]
    assert [x["size"] for x in img["layers"]] == [x.size for x in record.layers]
    assert [x["store_paths"] for x in img["layers"]] == [[p] for p in store[1]]
    assert all(x["top_dirs"] == [] for x in img["layers"])


def test_inspect_shows_layers_two_images_share(store, tmp_path, capsys):
    a = build(store, tmp_path / "a.tar", [0, 1], ["app:1"])
    b = build(store, tmp_path / "b", [2, 0, 1], ["app:2"], "oci-dir", "gzip", cmd="y")
    result = inspect_json(capsys, tmp_path / "a.tar", tmp_path / "b")
    assert [(x["diff_id"], x["in_a"], x["in_b"]) for x in result["shared"]] == [
        (a.layers[0].diff_id, 1, 2),
        (a.layers[1].diff_id, 2, 3),
    ]
    assert b.layers[0].diff_id not in {x["diff_id"] for x in result["shared"]}
    assert main(["inspect", str(tmp_path / "a.tar"), str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "shared: 2 layers" in text and store[1][2] in text


def test_inspect_names_top_directories_of_other_layers(tmp_path, capsys):
    etc = tmp_path / "etc"
    (etc / "ssl").mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    layer = walk([], [(fsencode(str(etc)), b"/etc"), (fsencode(str(etc)), b"/var")], Owner())
    with open_sink(str(tmp_path / "c.tar")) as sink:
        written = sink.add_layer(StreamSource(layer))
        sink.finish(config_for([written.diff_id]), [])
    (img,) = inspect_json(capsys, tmp_path / "c.tar")["images"]
    assert img["repo_tags"] == []
    assert img["layers"][0]["top_dirs"] == ["/etc", "/var"]
    assert img["layers"][0]["store_paths"] == []


def without(src: Path, dst: Path, drop: str) -> Path:
    with tarfile.open(src) as a, tarfile.open(dst, "w") as b:
        for m in a:
            if m.name != drop:
                b.addfile(m, a.extractfile(m) if m.isreg() else None)
    return dst


def test_inspect_reads_the_legacy_form_alone(store, tmp_path, capsys):
    record = build(store, tmp_path / "a.tar", [0, 1, 2], ["reg.example:5000/t/app:1"])
    legacy = without(tmp_path / "a.tar", tmp_path / "legacy.tar", "manifest.json")
    (img,) = inspect_json(capsys, legacy)["images"]
    assert img["repo_tags"] == ["reg.example:5000/t/app:1"]
    assert [x["diff_id"] for x in img["layers"]] == [x.diff_id for x in record.layers]
    assert img["config"]["config"]["Cmd"] == ["x"]


def test_inspect_reports_a_corrupt_layer(store, tmp_path, capsys):
    build(store, tmp_path / "a.tar", [0], ["app:1"])
    data = bytearray((tmp_path / "a.tar").read_bytes())
    at = data.index(b"3\n3\n3\n" if b"3\n3\n3\n" in data else b"0\n0\n0\n")
    data[at] ^= 1
    (tmp_path / "a.tar").write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path / "a.tar")]) == 1
    assert "hashes to" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.tar")]) == 1
    assert "missing.tar" in capsys.readouterr().err


@pytest.fixture
def merged(store, tmp_path):
    one = build(store, tmp_path / "one.tar", [0, 1], ["reg.example:5000/t/one:1"])
    anon = build(store, tmp_path / "anon.tar", [0, 1, 2], [], cmd="anon")
    alice = build(store, tmp_path / "alice.tar", [0], ["alice:1"], owner=ALICE)
    out = tmp_path / "all.tar"
    ins = [tmp_path / n for n in ("one.tar", "anon.tar", "alice.tar")]
    assert main(["merge", *map(str, ins), "-o", str(out)]) == 0
    return out, ins, {"one": one, "anon": anon, "alice": alice}


def test_merge_keeps_every_image_and_stores_shared_layers_once(merged):
    out, ins, records = merged
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        layer_files = [m.name for m in tar.getmembers() if m.isreg() and "layer.tar" in m.name]
        merged_members = {m.name: m for m in tar.getmembers()}
    assert [m["RepoTags"] for m in manifest] == [["reg.example:5000/t/one:1"], None, ["alice:1"]]
    # one: 2 layers, anon: the same 2 + 1, alice: 1 of its own
    assert len(layer_files) == len(set(layer_files)) == 4
    # every input entry is in the output with its header as it was
    for path in ins:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name in ("manifest.json", "repositories"):
                    continue
                got = merged_members[m.name]
                assert got.get_info() == m.get_info(), m.name


def test_podman_loads_merged_images_untagged_included(merged, fresh_podman):
    out, _, records = merged
    names = fresh_podman.load(out)
    assert "reg.example:5000/t/one:1" in names and "localhost/alice:1" in names
    anon = fresh_podman.inspect(records["anon"].config_digest[7:])
    assert anon["RepoTags"] == []
    assert anon["RootFS"]["Layers"] == [x.diff_id for x in records["anon"].layers]
    assert fresh_podman.inspect("alice:1")["Id"] == records["alice"].config_digest[7:]


def test_merged_layers_keep_their_owners(merged, tmp_path):
    validators.require_root("umoci keeps owners only as root")
    out, _, _ = merged
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    validators.run_tool([validators.require("skopeo"), "--policy", policy, "copy", "--quiet",
                         f"docker-archive:{out}:alice:1", f"oci:{tmp_path / 'oci'}:a"])  # fmt: skip
    rootfs = validators.umoci_unpack(tmp_path / "oci", "a", tmp_path / "bundle")
    owners = {
        (st.st_uid, st.st_gid)
        for d, dirs, files in os.walk(rootfs / "nix" / "store")
        for st in [os.lstat(os.path.join(d, n)) for n in dirs + files]
    }
    assert owners == {(1000, 100)}


def test_merge_refuses_what_is_not_a_docker_archive(store, tmp_path, capsys):
    build(store, tmp_path / "a.tar", [0], ["app:1"])
    build(store, tmp_path / "o.tar", [0], ["app:2"], "oci-archive")
    out = tmp_path / "all.tar"
    assert main(["merge", str(tmp_path / "a.tar"), str(tmp_path / "o.tar"), "-o", str(out)]) == 1
    assert "o.tar has no manifest.json" in capsys.readouterr().err
    assert not out.exists()


def test_merge_refuses_two_different_entries_of_one_name(store, tmp_path, capsys):
    build(store, tmp_path / "a.tar", [0], ["app:1"])
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        name = json.loads(tarfile.open(tmp_path / "a.tar").extractfile("manifest.json").read())[0]
        for member, data in [(name["Layers"][0], b"other"), ("manifest.json", b"[]")]:
            ti = tarfile.TarInfo(member)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    assert main(["merge", str(tmp_path / "a.tar"), str(bad), "-o", str(tmp_path / "x.tar")]) == 1
    assert "differs from the one in" in capsys.readouterr().err


def test_inspect_of_a_registry_reference_points_to_pull(capsys):
    assert main(["inspect", "docker://127.0.0.1:9/team/app:1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is in a registry" in err
    assert "fastlayer pull docker://127.0.0.1:9/team/app:1 -o FILE" in err
