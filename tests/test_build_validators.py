"""Images from `fastlayer build`, loaded and run by podman, unpacked by umoci."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import validators
from closures import busybox_closure, make_closure
from test_base_image import legacy_archive, oci_layout

import fastlayer

pytestmark = pytest.mark.validators


@pytest.fixture(scope="module")
def closure(tmp_path_factory):
    validators.require("busybox")
    root = tmp_path_factory.mktemp("closure") / "root"
    paths, graph = busybox_closure(root)
    return root, paths, graph


def spec(closure, **extra) -> dict:
    root, paths, graph = closure
    s = {
        "name": "reg.example:5000/team/app",
        "store_root": str(root),
        "contents": {"store_paths": [paths["busybox"]], "graph": str(graph)},
        "config": {"Cmd": ["/bin/sh", "-c", f"cat {paths['greeting']}/share/greeting"]},
    }
    s.update(extra)
    return s


def test_runs_with_fake_nss_and_registry_name(tmp_path, closure, podman):
    out = tmp_path / "app.tar"
    result = fastlayer.build(spec(closure, fake_nss=True, tag="nss"), str(out))
    names = podman.load(out)
    assert "reg.example:5000/team/app:nss" in names
    ref = "reg.example:5000/team/app:nss"
    assert podman.run(ref) == "hello from fastlayer\n"
    assert podman.run(ref, "id", "nobody").startswith("uid=65534(nobody) gid=65534(nobody)")
    assert podman.run(ref, "whoami") == "root\n"
    inspect = podman.inspect(ref)
    assert inspect["Id"] == result.image_id.removeprefix("sha256:")
    assert len(inspect["RootFS"]["Layers"]) == 3


def test_permissions_inside_the_container(tmp_path, closure, podman):
    s = spec(
        closure,
        tag="perm",
        uid=1000,
        gid=1000,
        fake_nss={
            "passwd": ["user:x:1000:1000:user:/home/user:/bin/sh"],
            "group": ["user:x:1000:"],
        },
        extra_commands="mkdir -p home/user/data",
        permissions=[{"path": "/home/user*", "uid": 1000, "gid": 1000, "mode": "0750"}],
    )
    s["uid"], s["gid"] = 0, 0
    s["permissions"].append({"path": "/nix*", "uid": 1000})
    out = tmp_path / "perm.tar"
    fastlayer.build(s, str(out))
    podman.load(out)
    ref = "reg.example:5000/team/app:perm"
    got = podman.run(ref, "stat", "-c", "%u %g %a %n", "/home/user", "/home/user/data", user="1000")
    assert got.splitlines() == ["1000 1000 750 /home/user", "1000 1000 750 /home/user/data"]
    store = podman.run(ref, "stat", "-c", "%a %n", "/nix", "/nix/store", user="1000")
    assert store.splitlines() == ["755 /nix", "755 /nix/store"]


def test_arm64_and_variant_in_inspect(tmp_path, closure, podman):
    out = tmp_path / "arm.tar"
    fastlayer.build(spec(closure, tag="arm", architecture="arm64", variant="v8"), str(out))
    podman.load(out)
    inspect = podman.inspect("reg.example:5000/team/app:arm")
    assert inspect["Architecture"] == "arm64"
    # podman's inspect has no variant field: skopeo reads the config podman would
    skopeo = validators.require("skopeo")
    config = json.loads(
        validators.run_tool([skopeo, "inspect", "--config", f"docker-archive:{out}"])
    )
    assert (config["architecture"], config["variant"], config["os"]) == ("arm64", "v8", "linux")


def test_budget_two_layers_holds_every_path(tmp_path, podman):
    validators.require("busybox")
    root = tmp_path / "root"
    packages = {f"pkg{i:02d}": {f"share/pkg{i:02d}": f"{i}\n"} for i in range(40)}
    bb_paths, _ = busybox_closure(root)
    bb_graph = json.loads((root / "graph.json").read_text())
    paths, graph = make_closure(root, packages, {"pkg00": [f"pkg{i:02d}" for i in range(1, 40)]})
    nodes = json.loads(graph.read_text()) + bb_graph  # 40 packages, busybox, greeting
    nodes[0]["references"].append(bb_paths["busybox"])
    graph.write_text(json.dumps(nodes))
    s = {
        "name": "many",
        "tag": "t",
        "store_root": str(root),
        "max_layers": 2,
        "contents": {"store_paths": [paths["pkg00"], bb_paths["busybox"]], "graph": str(graph)},
    }
    out = tmp_path / "many.tar"
    fastlayer.build(s, str(out))
    podman.load(out)
    assert len(podman.inspect("localhost/many:t")["RootFS"]["Layers"]) == 2
    listing = podman.run("localhost/many:t", "ls", "/nix/store").split()
    assert len(listing) == 42  # nothing dropped
    assert podman.run("localhost/many:t", "cat", f"{paths['pkg39']}/share/pkg39") == "39\n"


@pytest.mark.parametrize("fmt", ["docker", "legacy", "oci-zstd"])
def test_base_layers_prepended_in_budget(tmp_path, closure, podman, fmt):
    base_out = tmp_path / "base.tar"
    base = fastlayer.build(
        spec(
            closure,
            tag="base",
            max_layers=2,
            include_store_paths=True,
            contents={"store_paths": [closure[1]["greeting"]], "graph": str(closure[2])},
            config={"Env": ["FROM_PARENT=1", "LAST_LAYER=parent"]},
        ),
        str(base_out),
    )  # 2 layers: the greeting path and a customisation layer
    assert len(base.layers) == 2
    if fmt == "legacy":
        with tarfile.open(base_out) as t:
            manifest = json.load(t.extractfile("manifest.json"))[0]
            layers = [t.extractfile(p).read() for p in manifest["Layers"]]
        legacy_archive(tmp_path / "legacy.tar", layers, base.config, "base/old:v1")
        base_path = tmp_path / "legacy.tar"
    elif fmt == "oci-zstd":
        with tarfile.open(base_out) as t:
            manifest = json.load(t.extractfile("manifest.json"))[0]
            layers = [t.extractfile(p).read() for p in manifest["Layers"]]
        oci_layout(tmp_path / "layout", layers, base.config, "zstd", "v1")
        base_path = tmp_path / "layout"
    else:
        base_path = base_out
    child = spec(
        closure,
        tag=f"child-{fmt}",
        from_image=str(base_path),
        max_layers=4,
        config={
            "Env": ["FROM_CHILD=1", "LAST_LAYER=child"],
            "Cmd": ["/bin/sh", "-c", "echo $FROM_PARENT $LAST_LAYER $FROM_CHILD"],
        },
    )
    out = tmp_path / "child.tar"
    fastlayer.build(child, str(out))
    podman.load(out)
    ref = f"reg.example:5000/team/app:child-{fmt}"
    inspect = podman.inspect(ref)
    assert len(inspect["RootFS"]["Layers"]) == 4
    assert podman.run(ref) == "1 child 1\n"
    greeting = closure[1]["greeting"]
    assert podman.run(ref, "cat", f"{greeting}/share/greeting") == "hello from fastlayer\n"


def test_upper_layers_override_lower_after_umoci_unpack(tmp_path, closure):
    root = tmp_path / "rootfs-a"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("from the base\n")
    (root / "etc" / "only-base").write_text("kept\n")
    base_out = tmp_path / "base.tar"
    fastlayer.build({"name": "base", "tag": "b", "contents": {"roots": [str(root)]}}, str(base_out))
    upper = tmp_path / "rootfs-b"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("from the child\n")
    out = tmp_path / "child.tar"
    fastlayer.build(
        {
            "name": "child",
            "tag": "c",
            "from_image": str(base_out),
            "contents": {"roots": [str(upper)]},
        },
        str(out),
    )
    oci = validators.skopeo_copy_to_oci(out, tmp_path / "oci", "c")
    rootfs = validators.umoci_unpack(oci, "c", tmp_path / "bundle")
    assert (rootfs / "etc" / "motd").read_text() == "from the child\n"
    assert (rootfs / "etc" / "only-base").read_text() == "kept\n"


def test_store_path_symlink_stays_a_symlink(tmp_path):
    root = tmp_path / "root"
    paths, graph = make_closure(root, {"real": {"share/x": "x\n"}}, {})
    link_name = "/nix/store/" + "l" * 32 + "-alias"
    (root / link_name.lstrip("/")).symlink_to(paths["real"])
    nodes = json.loads(graph.read_text())
    nodes.append({"path": link_name, "references": [paths["real"]], "narSize": 1})
    graph.write_text(json.dumps(nodes))
    out = tmp_path / "img.tar"
    fastlayer.build(
        {
            "name": "sym",
            "tag": "s",
            "store_root": str(root),
            "contents": {"store_paths": [link_name], "graph": str(graph)},
        },
        str(out),
    )
    oci = validators.skopeo_copy_to_oci(out, tmp_path / "oci", "s")
    rootfs = validators.umoci_unpack(oci, "s", tmp_path / "bundle")
    alias = rootfs / link_name.lstrip("/")
    assert alias.is_symlink() and str(Path(alias.readlink())) == paths["real"]
    assert (rootfs / paths["real"].lstrip("/") / "share" / "x").read_text() == "x\n"
