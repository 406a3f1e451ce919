"""Explicit layers ([[layers]]) and root layers (contents.root_layers), read back
with tarfile; the budget they share with store and base layers; one image run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import pytest
import validators
from closures import make_closure

import fastlayer
from fastlayer.errors import FastlayerError


def read_image(path: Path) -> tuple[dict, list[bytes]]:
    """The config and each layer's bytes, in manifest order."""
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config = json.load(t.extractfile(manifest["Config"]))
        return config, [t.extractfile(p).read() for p in manifest["Layers"]]


def members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        return {m.name: m for m in t.getmembers()}


def content(layer: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        return t.extractfile(name).read()


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def monorepo(tmp_path: Path) -> Path:
    """A project without Nix: packages, vendored libraries, a rootfs."""
    repo = tmp_path / "repo"
    for name in ("api", "web", "worker"):
        write(repo / "packages" / name / "main.py", f"print('{name}')\n")
    write(repo / "packages" / "web" / "static" / "index.html", "<p>hi</p>\n")
    write(repo / "vendor" / "libfoo.so", "foo", 0o755)
    write(repo / "vendor" / "libbar.so", "bar", 0o755)
    write(repo / "vendor" / "README", "not a library")
    write(repo / "tools" / "run", "#!/bin/sh\n", 0o755)
    (repo / "tools" / "run-link").symlink_to("run")
    for d in ("etc", "opt", "srv", "usr", "var"):
        write(repo / "rootfs" / d / "marker", f"{d}\n")
    write(repo / "rootfs" / "TOPFILE", "top\n")
    (repo / "rootfs" / "lib").symlink_to("usr/lib")
    return repo


def spec_file(directory: Path, text: str) -> Path:
    path = directory / "app.toml"
    path.write_text(text)
    return path


def test_each_entry_is_a_layer_with_its_files(tmp_path, monorepo, monkeypatch):
    spec = spec_file(
        monorepo,
        """
name = "app"
uid = 1000
gid = 100
mtime = 1700000000
[contents]
files = ["tools/run"]
[[layers]]
paths = ["vendor/*.so", "tools/run-link"]
dest = "/usr/lib"
[[layers]]
name = "packages"
paths = ["packages/web", "packages/api"]
dest = "/app/packages"
""",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths resolve from the spec's folder
    out = tmp_path / "app.tar"
    fastlayer.build(str(spec), str(out))
    config, layers = read_image(out)
    assert len(layers) == 3  # two explicit layers and the customisation layer
    libs, pkgs, custom = (members(x) for x in layers)
    assert list(libs) == [
        "/usr",
        "/usr/lib",
        "/usr/lib/libbar.so",
        "/usr/lib/libfoo.so",
        "/usr/lib/run-link",
    ]
    assert libs["/usr"].isdir() and libs["/usr"].mode == 0o755
    assert libs["/usr/lib/libfoo.so"].mode == 0o755
    assert libs["/usr/lib/run-link"].issym() and libs["/usr/lib/run-link"].linkname == "run"
    assert content(layers[0], "/usr/lib/libbar.so") == b"bar"
    for m in libs.values():
        assert (m.uid, m.gid, m.mtime) == (1000, 100, 1700000000)
    assert list(pkgs) == [
        "/app",
        "/app/packages",
        "/app/packages/api",
        "/app/packages/api/main.py",
        "/app/packages/web",
        "/app/packages/web/main.py",
        "/app/packages/web/static",
        "/app/packages/web/static/index.html",
    ]
    assert content(layers[1], "/app/packages/web/static/index.html") == b"<p>hi</p>\n"
    assert list(custom) == ["/run"]  # contents.files stay in the customisation layer
    comments = [h["comment"] for h in config["history"]]
    assert comments == ["layers[0] in /usr/lib", "layer packages", "customisation layer"]
    # the diff_ids in the config are the sha256 of the bytes
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(x).hexdigest() for x in layers
    ]


def test_same_directory_same_diff_id_in_two_images(tmp_path, monorepo):
    # the second image reads a copy elsewhere on disk, with other file times
    copy = tmp_path / "copy" / "vendor"
    shutil.copytree(monorepo / "vendor", copy)
    os.utime(copy / "libfoo.so", (1, 1))
    shared = {"paths": ["vendor"], "dest": "/opt"}
    one = {
        "name": "one",
        "layers": [shared, {"paths": [str(monorepo / "packages")], "dest": "/app"}],
        "contents": {"files": [str(monorepo / "tools" / "run")]},
        "config": {"Cmd": ["/one"]},
    }
    other = {
        "name": "reg.example/other",
        "created": "2024-01-01T00:00:00Z",
        "layers": [
            {"paths": [str(monorepo / "tools")], "dest": "/"},
            {"paths": [str(copy)], "dest": "/opt", "name": "vendored"},
        ],
        "contents": {"roots": [str(monorepo / "rootfs")]},
        "fake_nss": True,
    }
    cwd = os.getcwd()
    os.chdir(monorepo)  # a dict's relative paths resolve from the working directory
    try:
        a = fastlayer.build(one, str(tmp_path / "one.tar"))
    finally:
        os.chdir(cwd)
    b = fastlayer.build(other, str(tmp_path / "other.tar"))
    assert a.image_id != b.image_id
    assert a.layers[0].diff_id == b.layers[1].diff_id
    _, bytes_a = read_image(tmp_path / "one.tar")
    _, bytes_b = read_image(tmp_path / "other.tar")
    assert bytes_a[0] == bytes_b[1]
    assert list(members(bytes_a[0])) == [
        "/opt",
        "/opt/vendor",
        "/opt/vendor/README",
        "/opt/vendor/libbar.so",
        "/opt/vendor/libfoo.so",
    ]
    others = {a.layers[1].diff_id, a.layers[2].diff_id, b.layers[0].diff_id, b.layers[2].diff_id}
    assert a.layers[0].diff_id not in others
    # a different owner is a different layer
    c = fastlayer.build({**other, "uid": 7}, str(tmp_path / "c.tar"))
    assert c.layers[1].diff_id != b.layers[1].diff_id


def test_permission_rules_apply_to_explicit_layers(tmp_path, monorepo):
    s = {
        "name": "perm",
        "layers": [{"paths": [str(monorepo / "tools" / "run")], "dest": "/srv/bin"}],
        "permissions": [{"path": "/srv*", "uid": 33, "mode": "0700"}],
    }
    fastlayer.build(s, str(tmp_path / "p.tar"))
    _, layers = read_image(tmp_path / "p.tar")
    got = {n: (m.uid, m.gid, oct(m.mode)) for n, m in members(layers[0]).items()}
    assert got == {
        "/srv": (33, 0, "0o700"),
        "/srv/bin": (33, 0, "0o700"),
        "/srv/bin/run": (33, 0, "0o700"),
    }


def test_per_directory_root_layers(tmp_path, monorepo):
    s = {
        "name": "roots",
        "contents": {"roots": [str(monorepo / "rootfs")], "root_layers": "per-directory"},
    }
    fastlayer.build(s, str(tmp_path / "r.tar"))
    config, layers = read_image(tmp_path / "r.tar")
    assert [list(members(x)) for x in layers] == [
        ["/etc", "/etc/marker"],
        ["/opt", "/opt/marker"],
        ["/srv", "/srv/marker"],
        ["/usr", "/usr/marker"],
        ["/var", "/var/marker"],
        ["/TOPFILE", "/lib"],  # top-level files and symlinks: the customisation layer
    ]
    assert [h["comment"] for h in config["history"]][:2] == [
        "root directory /etc",
        "root directory /opt",
    ]
    # the default keeps every root in the customisation layer
    del s["contents"]["root_layers"]
    fastlayer.build(s, str(tmp_path / "one.tar"))
    assert len(read_image(tmp_path / "one.tar")[1]) == 1


def test_per_directory_beyond_the_budget_merges_into_the_last(tmp_path, monorepo):
    s = {
        "name": "roots",
        "max_layers": 4,  # 1 customisation layer: 3 left for five directories
        "contents": {"roots": [str(monorepo / "rootfs")], "root_layers": "per-directory"},
    }
    fastlayer.build(s, str(tmp_path / "r.tar"))
    config, layers = read_image(tmp_path / "r.tar")
    assert [list(members(x)) for x in layers] == [
        ["/etc", "/etc/marker"],
        ["/opt", "/opt/marker"],
        ["/srv", "/srv/marker", "/usr", "/usr/marker", "/var", "/var/marker"],
        ["/TOPFILE", "/lib"],
    ]
    assert config["history"][2]["comment"] == "root directory /srv and 2 more"
    assert content(layers[2], "/var/marker") == b"var\n"


def test_per_root_layers_and_explicit_layers_in_order(tmp_path, monorepo):
    second = tmp_path / "overlay"
    write(second / "etc" / "marker", "overridden\n")
    s = {
        "name": "order",
        "layers": [{"paths": [str(monorepo / "vendor" / "README")], "dest": "/doc"}],
        "contents": {
            "roots": [str(monorepo / "rootfs"), str(second)],
            "root_layers": "per-root",
        },
        "fake_nss": True,
    }
    fastlayer.build(s, str(tmp_path / "o.tar"))
    config, layers = read_image(tmp_path / "o.tar")
    names = [list(members(x)) for x in layers]
    assert names[0] == ["/doc", "/doc/README"]
    assert names[1] == [
        "/TOPFILE",
        "/etc",
        "/etc/marker",
        "/lib",
        "/opt",
        "/opt/marker",
        "/srv",
        "/srv/marker",
        "/usr",
        "/usr/marker",
        "/var",
        "/var/marker",
    ]
    assert names[2] == ["/etc", "/etc/marker"]
    assert content(layers[2], "/etc/marker") == b"overridden\n"
    assert "/etc/passwd" in names[3] and "/etc/marker" not in names[3]
    assert [h["comment"] for h in config["history"]] == [
        "layers[0] in /doc",
        "contents.roots[0]",
        "contents.roots[1]",
        "customisation layer",
    ]


def test_budget_with_store_paths(tmp_path, monorepo):
    root = tmp_path / "store"
    paths, graph = make_closure(
        root,
        {"a": {"share/a": "a\n"}, "b": {"share/b": "b\n"}, "c": {"share/c": "c\n"}},
        {"a": ["b", "c"]},
    )
    s = {
        "name": "mixed",
        "store_root": str(root),
        "max_layers": 6,
        "layers": [{"paths": [str(monorepo / "vendor")], "dest": "/opt"}],
        "contents": {
            "store_paths": [paths["a"]],
            "graph": str(graph),
            "link_store_paths": False,
            "roots": [str(monorepo / "rootfs")],
            "root_layers": "per-directory",
        },
    }
    # 6 = 1 explicit + 1 customisation + root layers (all but one of the 4 left) + store
    fastlayer.build(s, str(tmp_path / "m.tar"))
    config, layers = read_image(tmp_path / "m.tar")
    assert len(layers) == 6
    names = [list(members(x)) for x in layers]
    store = names[0]
    assert store[:2] == ["/nix", "/nix/store"]
    assert {n for n in store if n.count("/") == 3} == set(paths.values())
    assert names[1][0] == "/opt"
    assert names[2] == ["/etc", "/etc/marker"]
    assert names[3] == ["/opt", "/opt/marker"]
    assert names[4] == ["/srv", "/srv/marker", "/usr", "/usr/marker", "/var", "/var/marker"]
    assert names[5] == ["/TOPFILE", "/lib"]


def test_budget_errors(tmp_path, monorepo):
    base = fastlayer.build(
        {"name": "base", "layers": [{"paths": [str(monorepo / "vendor")]}]},
        str(tmp_path / "base.tar"),
    )
    assert len(base.layers) == 2
    two = [{"paths": [str(monorepo / "vendor")]}, {"paths": [str(monorepo / "tools")]}]
    s = {"name": "child", "from_image": str(tmp_path / "base.tar"), "layers": two, "max_layers": 4}
    with pytest.raises(FastlayerError) as e:
        fastlayer.build(s, str(tmp_path / "x.tar"))
    assert str(e.value) == (
        "max_layers 4 is less than 5: 2 base image layers + 2 explicit layers "
        "+ 1 customisation layer"
    )
    assert not (tmp_path / "x.tar").exists()
    fastlayer.build({**s, "max_layers": 5}, str(tmp_path / "x.tar"))  # exactly full
    assert len(read_image(tmp_path / "x.tar")[1]) == 5
    roots = {"roots": [str(monorepo / "rootfs")], "root_layers": "per-directory"}
    with pytest.raises(FastlayerError, match="max_layers 5 leaves no layer for contents.root_"):
        fastlayer.build({**s, "max_layers": 5, "contents": roots}, str(tmp_path / "y.tar"))
    # known before any base is read: the spec file and the key are named
    spec = spec_file(tmp_path, 'name = "x"\nmax_layers = 2\n' + '[[layers]]\npaths = ["/"]\n' * 2)
    with pytest.raises(FastlayerError) as e:
        fastlayer.build(str(spec), str(tmp_path / "z.tar"))
    assert str(e.value) == (
        f"spec {spec}: max_layers 2 is less than 3: 2 explicit layers + 1 customisation layer"
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("layers = 3", "layers: must be a list, not an integer 3"),
        ("layers = [3]", "layers[0]: must be an object, not an integer 3"),
        ("[[layers]]\ndest = '/x'", "layers[0] needs 'paths'"),
        ("[[layers]]\npaths = 'vendor'", "layers[0].paths: must be a list"),
        ("[[layers]]\npaths = [1]", "layers[0].paths[0]: must be a string"),
        ("[[layers]]\npaths = []", "layers[0].paths: empty"),
        ("[[layers]]\npaths = ['']", "layers[0].paths[0]: not a usable path"),
        ("[[layers]]\npaths = ['vendor']\ndest = 'opt'", "layers[0].dest: must be an absolute"),
        ("[[layers]]\npaths = ['vendor']\ndest = '/a/../..'", "layers[0].dest: must be an abs"),
        ("[[layers]]\npaths = ['vendor']\ndest = 1", "layers[0].dest: must be a string"),
        ("[[layers]]\npaths = ['vendor']\nname = 1", "layers[0].name: must be a string or null"),
        ("[[layers]]\npaths = ['vendor']\nfrom = 'x'", "layers[0]: unknown key(s) from (known:"),
        ("[[layers]]\npaths = ['nope/*.so']", "layers[0].paths[0] matches nothing: "),
        ("[[layers]]\npaths = ['vendor', 'gone']", "layers[0].paths[1] matches nothing: "),
        ("[contents]\nroot_layers = 'each'", "contents.root_layers must be one of customisation"),
        ("[contents]\nroot_layers = true", "contents.root_layers: must be a string, not true"),
    ],
)
def test_bad_keys_are_one_line_naming_file_and_key(monorepo, toml, expected):
    spec = spec_file(monorepo, 'name = "app"\n' + toml + "\n")
    with pytest.raises(FastlayerError) as e:
        fastlayer.build(str(spec), str(monorepo / "out.tar"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"spec {spec}: ")
    assert expected in message
    assert not (monorepo / "out.tar").exists()


def test_two_paths_with_one_name_are_refused(tmp_path, monorepo):
    write(tmp_path / "other" / "api" / "x", "x")
    s = {
        "name": "dup",
        "layers": [{"paths": [str(monorepo / "packages" / "api"), str(tmp_path / "other/api")]}],
    }
    with pytest.raises(FastlayerError, match=r"layers\[0\]: .*/api and .*/api both go to /api$"):
        fastlayer.build(s, str(tmp_path / "d.tar"))


def special_file(where: Path, kind: str) -> Path:
    path = where / kind
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block: it must be refused by its type
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return path


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_are_refused_by_type(tmp_path, kind):
    tree = tmp_path / "tree"
    write(tree / "ok", "ok")
    special = special_file(tree, kind)
    # named directly, inside a listed directory, inside a root directory layer
    direct = {"name": "s", "layers": [{"paths": [str(special)]}]}
    with pytest.raises(FastlayerError, match=rf"layers\[0\].paths\[0\]: .*/tree/.* is a {kind}"):
        fastlayer.build(direct, str(tmp_path / "a.tar"))
    inside = {"name": "s", "layers": [{"paths": [str(tree)], "dest": "/x"}]}
    with pytest.raises(FastlayerError, match=rf"layers\[0\] in /x: .*/tree/.* is a {kind}"):
        fastlayer.build(inside, str(tmp_path / "b.tar"))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    shutil.move(str(tree), rootfs / "tree")
    roots = {"name": "s", "contents": {"roots": [str(rootfs)], "root_layers": "per-directory"}}
    with pytest.raises(FastlayerError, match=rf"root directory /tree: .* is a {kind}"):
        fastlayer.build(roots, str(tmp_path / "c.tar"))
    assert not any(p.name.endswith(".tar") for p in tmp_path.iterdir())


def test_a_device_is_refused(tmp_path):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    s = {"name": "dev", "layers": [{"paths": ["/dev/null"], "dest": "/x"}]}
    with pytest.raises(FastlayerError, match="/dev/null is a character device"):
        fastlayer.build(s, str(tmp_path / "d.tar"))


@pytest.mark.validators
def test_podman_runs_files_from_two_explicit_layers(tmp_path, podman):
    busybox = validators.require("busybox")
    data = tmp_path / "data"
    write(data / "greeting", "hello from an explicit layer\n")
    write(data / "sub" / "second", "and a second file\n")
    s = {
        "name": "explicit",
        "tag": "t",
        "layers": [
            {"paths": [busybox], "dest": "/bin", "name": "busybox"},
            {"paths": [str(data / "*")], "dest": "/srv/data"},
        ],
        "config": {"Cmd": ["/bin/busybox", "cat", "/srv/data/greeting", "/srv/data/sub/second"]},
    }
    out = tmp_path / "explicit.tar"
    result = fastlayer.build(s, str(out))
    assert "localhost/explicit:t" in podman.load(out)
    inspect = podman.inspect("localhost/explicit:t")
    assert inspect["RootFS"]["Layers"] == [x.diff_id for x in result.layers]
    assert len(inspect["RootFS"]["Layers"]) == 3
    got = podman.run("localhost/explicit:t")
    assert got == "hello from an explicit layer\nand a second file\n"


def test_readme_documents_the_keys():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "[[layers]]" in readme
    for key in ("paths = [", "dest = ", "name = ", "root_layers = "):
        assert key in readme
    for value in ("customisation", "per-root", "per-directory"):
        assert f'"{value}"' in readme
    assert "max_layers 4 is less than 5: 2 base image layers + 2 explicit layers +" in readme
