"""The image builder: specs, layering within budgets, customisation, config, tags."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from closures import busybox_closure, make_closure

import fastlayer
from fastlayer.builder import derive_tag, inherit_config
from fastlayer.errors import FastlayerError
from fastlayer.sources.customisation import fake_nss_files
from fastlayer.spec import FakeNss


def read_image(path: Path) -> tuple[dict, dict, list[tarfile.TarFile]]:
    t = tarfile.open(path)
    manifest = json.load(t.extractfile("manifest.json"))[0]
    config = json.load(t.extractfile(manifest["Config"]))
    layers = [tarfile.open(fileobj=io.BytesIO(t.extractfile(p).read())) for p in manifest["Layers"]]
    return manifest, config, layers


@pytest.fixture
def closure(tmp_path):
    root = tmp_path / "root"
    paths, graph = busybox_closure(root)
    return root, paths, graph


def spec_for(tmp_path: Path, closure, **extra) -> dict:
    root, paths, graph = closure
    spec = {
        "name": "reg.example:5000/team/app",
        "store_root": str(root),
        "contents": {"store_paths": [paths["busybox"]], "graph": str(graph)},
        "config": {"Cmd": ["/bin/sh", "-c", "cat /share/greeting"], "Env": ["A=1"]},
    }
    spec.update(extra)
    return spec


def test_build_layers_and_names(tmp_path, closure):
    out = tmp_path / "app.tar"
    result = fastlayer.build(spec_for(tmp_path, closure), str(out))
    manifest, config, layers = read_image(out)
    assert manifest["RepoTags"] == [f"reg.example:5000/team/app:{result.tag}"]
    assert len(result.tag) == 32
    assert config["rootfs"]["diff_ids"] == [x.diff_id for x in result.layers]
    assert len(layers) == 3  # two store paths, one customisation layer
    names = layers[-1].getnames()
    assert "/bin/sh" in names and layers[-1].getmember("/bin/sh").issym()
    assert layers[-1].getmember("/bin/busybox").linkname.endswith("-busybox/bin/busybox")
    assert "/share/greeting" not in names  # only contents are linked, not their closure
    assert config["created"] == "1970-01-01T00:00:01Z"
    assert config["config"]["Env"] == ["A=1"]


def test_tag_is_derived_from_content(tmp_path, closure):
    a = fastlayer.build(spec_for(tmp_path, closure), str(tmp_path / "a.tar"))
    b = fastlayer.build(spec_for(tmp_path, closure), str(tmp_path / "b.tar"))
    assert a.tag == b.tag and a.image_id == b.image_id
    c = fastlayer.build(
        spec_for(tmp_path, closure, config={"Env": ["A=2"]}), str(tmp_path / "c.tar")
    )
    assert c.tag != a.tag
    assert derive_tag({"x": 1}) != derive_tag({"x": 2})


def test_created_is_independent_of_mtime(tmp_path, closure):
    a = fastlayer.build(spec_for(tmp_path, closure), str(tmp_path / "a.tar"))
    now = fastlayer.build(spec_for(tmp_path, closure, created="now"), str(tmp_path / "n.tar"))
    created = datetime.fromisoformat(now.config["created"].replace("Z", "+00:00")).timestamp()
    assert abs(created - time.time()) < 120
    assert [x.diff_id for x in a.layers] == [x.diff_id for x in now.layers]
    moved = fastlayer.build(
        spec_for(tmp_path, closure, mtime="2001-02-03T04:05:06Z"), str(tmp_path / "m.tar")
    )
    assert moved.layers[0].diff_id != a.layers[0].diff_id
    _, _, layers = read_image(tmp_path / "m.tar")
    assert {m.mtime for m in layers[0].getmembers()} == {981173106}


def test_budget_keeps_every_path(tmp_path):
    packages = {f"pkg{i:02d}": {f"share/f{i}": f"{i}\n"} for i in range(42)}
    refs = {"pkg00": [f"pkg{i:02d}" for i in range(1, 42)]}
    paths, graph = make_closure(tmp_path / "root", packages, refs)
    spec = {
        "name": "many",
        "store_root": str(tmp_path / "root"),
        "max_layers": 2,
        "contents": {"store_paths": [paths["pkg00"]], "graph": str(graph)},
    }
    out = tmp_path / "many.tar"
    fastlayer.build(spec, str(out))
    _, config, layers = read_image(out)
    assert len(layers) == 2
    tops = {n.split("/")[3] for n in layers[0].getnames() if n.count("/") >= 3}
    assert tops == {p.split("/")[3] for p in paths.values()}


def test_fake_nss_exact_files(tmp_path, closure):
    files = fake_nss_files(
        FakeNss(passwd=["app:x:1000:1000::/home/app:/bin/sh"], group=["app:x:1000:"])
    )
    assert files["etc/passwd"] == (
        "root:x:0:0:root user:/var/empty:/bin/sh\n"
        "app:x:1000:1000::/home/app:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/var/empty:/bin/sh\n"
    )
    assert files["etc/group"] == "root:x:0:\napp:x:1000:\nnobody:x:65534:\n"
    assert files["etc/nsswitch.conf"] == "hosts: files dns\n"
    out = tmp_path / "nss.tar"
    fastlayer.build(spec_for(tmp_path, closure, fake_nss=True), str(out))
    _, _, layers = read_image(out)
    custom = layers[-1]
    assert custom.extractfile("/etc/passwd").read().decode().startswith("root:x:0:0:")
    assert custom.getmember("/var/empty").isdir()


def test_permissions_and_extra_commands(tmp_path, closure):
    spec = spec_for(
        tmp_path,
        closure,
        extra_commands="mkdir -p home/user && echo hi > home/user/note && chmod 600 home/user/note",
        permissions=[
            {"path": "/home/user*", "uid": 1000, "gid": 100},
            {"path": "/home/user/note", "mode": "0640"},
        ],
        uid=0,
    )
    out = tmp_path / "perm.tar"
    fastlayer.build(spec, str(out))
    _, _, layers = read_image(out)
    custom = layers[-1]
    user = custom.getmember("/home/user")
    note = custom.getmember("/home/user/note")
    assert (user.uid, user.gid) == (1000, 100)
    assert (note.uid, note.mode) == (0, 0o640)  # the later rule replaced the owner rule
    assert custom.getmember("/home").uid == 0


def test_include_store_paths_false_and_empty_image(tmp_path, closure):
    out = tmp_path / "only.tar"
    fastlayer.build(spec_for(tmp_path, closure, include_store_paths=False), str(out))
    _, config, layers = read_image(out)
    assert len(layers) == 1
    empty = tmp_path / "empty.tar"
    result = fastlayer.build({"name": "empty"}, str(empty))
    _, config, layers = read_image(empty)
    assert len(layers) == 1 and layers[0].getnames() == []
    assert result.layers[0].diff_id == config["rootfs"]["diff_ids"][0]


def test_base_image_counts_in_budget(tmp_path, closure):
    base_out = tmp_path / "base.tar"
    base_spec = spec_for(
        tmp_path,
        closure,
        config={
            "Env": ["FROM_PARENT=1", "LAST_LAYER=parent"],
            "WorkingDir": "/base",
            "Labels": {"a": "1"},
        },
    )
    fastlayer.build(base_spec, str(base_out))  # 3 layers
    child = spec_for(
        tmp_path,
        closure,
        from_image=str(base_out),
        max_layers=5,
        config={"Env": ["FROM_CHILD=1", "LAST_LAYER=child"], "Labels": {"b": "2"}},
    )
    out = tmp_path / "child.tar"
    result = fastlayer.build(child, str(out))
    _, config, layers = read_image(out)
    assert len(layers) == 5
    assert config["config"]["Env"] == ["FROM_PARENT=1", "LAST_LAYER=child", "FROM_CHILD=1"]
    assert config["config"]["WorkingDir"] == "/base"
    assert config["config"]["Labels"] == {"a": "1", "b": "2"}
    base_cfg = read_image(base_out)[1]
    assert config["rootfs"]["diff_ids"][:3] == base_cfg["rootfs"]["diff_ids"]
    assert config["history"][:3] == base_cfg["history"]
    assert result.layers[3].paths  # the store layer lists its paths
    with pytest.raises(FastlayerError, match="max layers 4 leaves no layer for store paths"):
        fastlayer.build({**child, "max_layers": 4}, str(tmp_path / "x.tar"))


def test_shared_paths_share_layers(tmp_path, closure):
    root, paths, graph = closure
    one = fastlayer.build(spec_for(tmp_path, closure), str(tmp_path / "one.tar"))
    other = spec_for(
        tmp_path,
        closure,
        name="other",
        contents={"store_paths": [paths["greeting"]], "graph": str(graph)},
    )
    two = fastlayer.build(other, str(tmp_path / "two.tar"))
    shared = {x.diff_id for x in one.layers} & {x.diff_id for x in two.layers}
    greeting_layer = [x.diff_id for x in one.layers if x.paths == [paths["greeting"]]]
    assert greeting_layer and set(greeting_layer) <= shared


def test_inherit_config_rules():
    base = {"Cmd": ["b"], "Entrypoint": ["e"], "User": "1", "ExposedPorts": {"80/tcp": {}}}
    assert inherit_config(base, {"User": "2"})["User"] == "2"
    assert inherit_config(base, {})["Cmd"] == ["b"]
    assert "Cmd" not in inherit_config(base, {"Entrypoint": ["x"]})
    merged = inherit_config(base, {"ExposedPorts": {"443/tcp": {}}})["ExposedPorts"]
    assert merged == {"80/tcp": {}, "443/tcp": {}}


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "patch,expected",
    [
        ({"colour": "red"}, "unknown key 'colour'; known keys: name, tag, contents"),
        ({"max_layers": "ten"}, "max_layers: must be an integer"),
        ({"name": "Bad Name"}, "is not a valid image name"),
        ({"config": {"Cmdd": []}}, "config: unknown key 'Cmdd' (did you mean Cmd?)"),
        ({"contents": {"roots": ["/does/not/exist"]}}, "path does not exist: /does/not/exist"),
        ({"created": "yesterday"}, "not 'now', epoch seconds or ISO 8601"),
    ],
)
def test_spec_errors_are_one_line(tmp_path, patch, expected):
    spec = {"name": "app", **patch}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    r = run_cli("build", str(path), "-o", str(tmp_path / "out.tar"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
    assert not (tmp_path / "out.tar").exists()


def test_graph_must_cover_contents(tmp_path, closure):
    root, paths, graph = closure
    spec = spec_for(tmp_path, closure)
    nodes = [n for n in json.loads(graph.read_text()) if not n["path"].endswith("-busybox")]
    for n in nodes:
        n["references"] = [r for r in n["references"] if not r.endswith("-busybox")]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(nodes))
    spec["contents"]["graph"] = str(partial)
    with pytest.raises(FastlayerError, match="does not cover store path .*-busybox"):
        fastlayer.build(spec, str(tmp_path / "x.tar"))


def test_cli_toml_metadata_and_tag(tmp_path, closure):
    root, paths, graph = closure
    (tmp_path / "app.toml").write_text(f'''
name = "team/app"
tag = "v1"
store_root = "root"
[contents]
store_paths = ["{paths["busybox"]}"]
graph = "root/graph.json"
[config]
Cmd = ["/bin/sh"]
''')
    r = run_cli("build", "app.toml", "-o", "app.tar", "--metadata", "meta.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "v1\n"
    meta = json.loads((tmp_path / "meta.json").read_text())
    manifest, config, _ = read_image(tmp_path / "app.tar")
    assert meta["name"] == "team/app" and meta["tag"] == "v1"
    assert meta["image_id"] == "sha256:" + manifest["Config"].removesuffix(".json")
    assert [x["diff_id"] for x in meta["layers"]] == config["rootfs"]["diff_ids"]
    assert [paths["greeting"]] in [x["paths"] for x in meta["layers"]]
    s = subprocess.run(
        [sys.executable, "-m", "fastlayer", "stream", "app.toml"], cwd=tmp_path, capture_output=True
    )
    assert s.returncode == 0 and s.stdout == (tmp_path / "app.tar").read_bytes()


def test_bare_files_land_at_root(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    link = tmp_path / "alias"
    link.symlink_to("tool")
    out = tmp_path / "files.tar"
    fastlayer.build({"name": "files", "contents": {"files": [str(tool), str(link)]}}, str(out))
    _, _, layers = read_image(out)
    member = layers[-1].getmember("/tool")
    assert member.isreg() and member.mode == 0o755
    assert layers[-1].extractfile("/tool").read() == b"#!/bin/sh\necho tool\n"
    assert layers[-1].getmember("/alias").linkname == "tool"


def test_progress_display_on_a_terminal(tmp_path, closure):
    """A terminal gets a progress bar (layer k of n, bytes, rate); a pipe gets nothing."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(spec_for(tmp_path, closure)))
    env = {**os.environ, "PYTHONPATH": str(Path(fastlayer.__file__).parent.parent)}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlayer", "build", str(spec), "-o", str(tmp_path / "t.tar")],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = screen.decode(errors="replace")
    assert "layer 1/3" in text and "layer 3/3" in text and "B/s" in text, text
    quiet = run_cli("build", str(spec), "-o", str(tmp_path / "pipe.tar"))
    assert quiet.returncode == 0 and quiet.stderr == ""
