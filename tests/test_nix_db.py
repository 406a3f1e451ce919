"""The Nix database fastlayer writes, checked by real Nix (nix-store --verify)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from nixbuild import closure_in_store, nix_build, verify_store

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import load_graph
from fastlayer.nix.db import hash_hex, registrations

NIX_EXPR = r"""
let
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  leaf = mk "fl-db-leaf"
    "/bin/mkdir -p $out/bin; echo leaf > $out/bin/data; /bin/chmod +x $out/bin/data";
  mid = mk "fl-db-mid" "/bin/mkdir $out; /bin/ln -s ${leaf}/bin/data $out/link";
in mk "fl-db-top" "/bin/mkdir $out; echo ${mid} > $out/deps"
"""


@pytest.fixture(scope="module")
def closure(tmp_path_factory):
    """A real closure (nix-build as root into /nix/store) and its graph file."""
    work = tmp_path_factory.mktemp("nixdb")
    top, info = nix_build(NIX_EXPR, work)
    graph = work / "graph.json"
    graph.write_text(json.dumps(info))
    return top, info, graph


def checked_copy(root: Path, dest: Path) -> Path:
    """A copy of root to verify: Nix silently repairs what it checks."""
    shutil.copytree(root, dest, symlinks=True)
    return dest


def populate(root: Path, info: list[dict]) -> None:
    for node in info:
        dest = root / node["path"].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", node["path"], str(dest)], check=True)


def test_db_verifies_with_real_nix(tmp_path, closure):
    top, info, graph = closure
    root = tmp_path / "rootfs"
    populate(root, info)
    assert main(["nix-db", str(graph), str(root), "--gcroot", top]) == 0
    db = root / "nix/var/nix/db/db.sqlite"
    assert (root / "nix/var/nix/db/schema").read_text() == "10"
    rows = sqlite3.connect(db).execute("select path, hash, narSize from ValidPaths").fetchall()
    assert sorted(r[0] for r in rows) == sorted(n["path"] for n in info)
    assert all(r[1] != "sha256:" + "0" * 64 and r[2] > 0 for r in rows)  # Nix would repair zeros
    by_path = {n["path"]: n for n in info}
    for path, h, size in rows:
        assert h == "sha256:" + hash_hex(by_path[path]["narHash"])
        assert size == by_path[path]["narSize"]
    check = checked_copy(root, tmp_path / "check")
    r = verify_store(check)
    assert r.returncode == 0, r.stderr
    assert sorted(closure_in_store(check, top)) == sorted(n["path"] for n in info)
    assert os.readlink(root / "nix/var/nix/gcroots/docker" / os.path.basename(top)) == top
    # one edited file: verify fails
    data = next(check.glob("nix/store/*-fl-db-leaf/bin/data"))
    data.chmod(0o755)
    data.write_text("tampered\n")
    assert verify_store(check).returncode != 0


def test_same_inputs_same_bytes(tmp_path, closure):
    top, info, graph = closure
    outs = []
    for name in ("a", "b"):
        root = tmp_path / name
        populate(root, info)
        assert main(["nix-db", str(graph), str(root), "--registration-time", "7"]) == 0
        outs.append((root / "nix/var/nix/db/db.sqlite").read_bytes())
    assert outs[0] == outs[1]


def test_corrupt_store_is_never_registered(tmp_path, closure):
    top, info, graph = closure
    root = tmp_path / "rootfs"
    populate(root, info)
    leaf = next(root.glob("nix/store/*-fl-db-leaf/bin/data"))
    leaf.chmod(0o755)
    leaf.write_text("changed\n")
    with pytest.raises(FastlayerError, match="fl-db-leaf: its contents hash to"):
        registrations(load_graph(str(graph)), on_disk=lambda p: str(root) + p)


@pytest.mark.validators
def test_image_with_nix_db_verifies_after_unpack(tmp_path, closure):
    import validators

    import fastlayer

    top, info, graph = closure
    out = tmp_path / "nixdb.tar"
    spec = {
        "name": "nixdb",
        "tag": "t",
        "nix_db": True,
        "nix_uid": 1000,
        "nix_gid": 100,
        "contents": {"store_paths": [top], "graph": str(graph)},
    }
    first = fastlayer.build(spec, str(out))
    again = fastlayer.build(spec, str(tmp_path / "again.tar"))
    assert [x.diff_id for x in again.layers] == [x.diff_id for x in first.layers]  # same db bytes
    oci = validators.skopeo_copy_to_oci(out, tmp_path / "oci", "t")
    rootfs = validators.umoci_unpack(oci, "t", tmp_path / "bundle")
    db = rootfs / "nix/var/nix/db/db.sqlite"
    assert db.stat().st_uid == 1000 and db.stat().st_gid == 100
    rows = sqlite3.connect(db).execute("select hash, narSize from ValidPaths").fetchall()
    assert all(h != "sha256:" + "0" * 64 and size > 0 for h, size in rows)  # Nix repairs zeros
    check = checked_copy(rootfs, tmp_path / "check")
    r = verify_store(check)
    assert r.returncode == 0, r.stderr
    assert sorted(closure_in_store(check, top)) == sorted(n["path"] for n in info)


OTHER_EXPR = r"""
builtins.derivation {
  name = "fl-db-other";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/mkdir $out; echo other > $out/data" ];
}
"""


@pytest.mark.validators
def test_base_image_database_is_merged(tmp_path, closure):
    import validators

    import fastlayer

    top, info, graph = closure
    other, other_info = nix_build(OTHER_EXPR, tmp_path / "other")
    (tmp_path / "other.json").write_text(json.dumps(other_info))
    base = tmp_path / "base.tar"
    fastlayer.build(
        {
            "name": "base",
            "tag": "b",
            "nix_db": True,
            "contents": {"store_paths": [other], "graph": str(tmp_path / "other.json")},
        },
        str(base),
    )
    out = tmp_path / "child.tar"
    fastlayer.build(
        {
            "name": "child",
            "tag": "c",
            "nix_db": True,
            "from_image": str(base),
            "contents": {"store_paths": [top], "graph": str(graph)},
        },
        str(out),
    )
    oci = validators.skopeo_copy_to_oci(out, tmp_path / "oci", "c")
    rootfs = validators.umoci_unpack(oci, "c", tmp_path / "bundle")
    check = checked_copy(rootfs, tmp_path / "check")
    r = verify_store(check)
    assert r.returncode == 0, r.stderr
    for root in (top, other):  # the base's registrations survive next to ours
        assert root in closure_in_store(check, root)
    paths = {
        p
        for (p,) in sqlite3.connect(rootfs / "nix/var/nix/db/db.sqlite").execute(
            "select path from ValidPaths"
        )
    }
    assert paths == {n["path"] for n in info} | {other}


def test_merge_refuses_a_path_registered_with_another_hash():
    from fastlayer.nix.db import Registration, merge

    base = [Registration("/nix/store/aaa-x", "11" * 32, 10, [])]
    same = [
        Registration("/nix/store/aaa-x", "11" * 32, 10, []),
        Registration("/nix/store/bbb-y", "22" * 32, 20, ["/nix/store/aaa-x"]),
    ]
    assert {r.path for r in merge(base, same)} == {"/nix/store/aaa-x", "/nix/store/bbb-y"}
    with pytest.raises(FastlayerError, match="aaa-x is registered in the base image"):
        merge(base, [Registration("/nix/store/aaa-x", "33" * 32, 10, [])])
