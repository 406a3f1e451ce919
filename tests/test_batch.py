"""Batch builds and pushes: several specs planned together, each distinct layer
produced once, a bad spec reported without stopping the others."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import validators
from closures import make_closure

from fastlayer.batch import build_many, push_many
from fastlayer.builder import build_into
from fastlayer.sinks import open_sink
from fastlayer.spec import load_spec

# libc: every image; libssl: a and b; each app: its own image only
PACKAGES = {
    "libc-2.40": {"lib/libc.so": b"libc" * 5000},
    "libssl-3.0": {"lib/libssl.so": b"ssl" * 3000},
    "app-a-1": {"bin/a": b"#!a\n" + b"a" * 777},
    "app-b-1": {"bin/b": b"#!b\n" + b"b" * 555},
    "app-c-1": {"bin/c": b"#!c\n" + b"c" * 333},
}
REFS = {"libssl-3.0": ["libc-2.40"], "app-a-1": ["libssl-3.0", "libc-2.40"],
        "app-b-1": ["libssl-3.0", "libc-2.40"], "app-c-1": ["libc-2.40"]}  # fmt: skip


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """A blob cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def batch(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    root = tmp_path / "root"
    paths, graph = make_closure(root, PACKAGES, REFS)
    specs = []
    for app in ("a", "b", "c"):
        spec = {
            "name": f"127.0.0.1:5000/team/{app}",
            "tag": "1",
            "store_root": str(root),
            "contents": {"store_paths": [paths[f"app-{app}-1"]], "graph": str(graph)},
            "config": {"Cmd": [f"/bin/{app}"]},
        }
        f = tmp_path / f"img-{app}.json"
        f.write_text(json.dumps(spec))
        specs.append(f)
    return paths, specs


def layers_of(archive: Path) -> list[tuple[str, list[str]]]:
    """(sha256 of the layer's bytes, store paths in it) of each layer, read with tarfile."""
    out = []
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in manifest[0]["Layers"]:
            data = tar.extractfile(name).read()  # type: ignore[union-attr]
            with tarfile.open(fileobj=__import__("io").BytesIO(data)) as layer:
                tops = sorted({
                    "/".join(m.name.split("/")[:4]) for m in layer.getmembers()
                    if m.name.count("/") >= 3 and m.name.startswith("/nix/store/")
                })  # fmt: skip
            out.append((hashlib.sha256(data).hexdigest(), tops))
    return out


def test_batch_plans_shared_layers_once_and_apart_from_own_paths(batch, tmp_path):
    paths, specs = batch
    out = tmp_path / "out"
    result = build_many([str(s) for s in specs], str(out), cache=str(tmp_path / "cache"))
    assert not result.failed
    got = {s.stem: layers_of(out / f"{s.stem}.tar") for s in specs}
    libc, ssl = [paths["libc-2.40"]], [paths["libssl-3.0"]]
    # written out by hand: most widely used first, each image's own path alone,
    # the customisation layer (no store path) last
    assert [p for _, p in got["img-a"]] == [libc, ssl, [paths["app-a-1"]], []]
    assert [p for _, p in got["img-b"]] == [libc, ssl, [paths["app-b-1"]], []]
    assert [p for _, p in got["img-c"]] == [libc, [paths["app-c-1"]], []]
    # a shared layer is the same bytes in every image that has it
    assert got["img-a"][0][0] == got["img-b"][0][0] == got["img-c"][0][0]
    assert got["img-a"][1][0] == got["img-b"][1][0]
    c = result.counts()
    # 5 distinct store layers in 8 store layer slots: 3 copied from earlier images
    assert (c["images"], c["layers_built"], c["layers_reused"]) == (3, 5, 3)


def test_batch_images_equal_the_same_plans_built_alone(batch, tmp_path):
    """An image out of a batch is what the builder gives for the same spec and
    plan on its own, with no cache and nothing copied from another image."""
    _, specs = batch
    result = build_many([str(s) for s in specs], str(tmp_path / "out"), cache=False)
    for item in result.items:
        spec = load_spec(str(item.source))
        alone = tmp_path / f"{item.name}-alone.tar"
        build_into(spec, lambda m, s=spec, o=alone: open_sink(str(o), name=s.name, mtime=m),
                   plan=item.result.plan, cache=False)  # fmt: skip
        assert alone.read_bytes() == Path(item.output).read_bytes()


def test_a_bad_spec_is_reported_and_the_others_are_built(batch, tmp_path):
    _, specs = batch
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "max_layers": "many"}')
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "fastlayer", "build", str(specs[0]), str(bad), str(specs[1]),
         "-o", str(out), "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("fastlayer: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "max_layers" in errors[0]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img-a.tar", "img-b.tar"]
    assert r.stderr.splitlines()[-1].startswith("fastlayer: 2 of 3 images built; layers: ")


def test_a_batch_refuses_a_file_as_its_output_directory(batch, tmp_path):
    _, specs = batch
    f = tmp_path / "file"
    f.write_text("keep")
    r = subprocess.run(
        [sys.executable, "-m", "fastlayer", "build", *map(str, specs), "-o", str(f)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1 and f.read_text() == "keep"
    assert r.stderr.count("\n") == 1 and "not one" in r.stderr


@pytest.mark.validators
def test_batch_into_one_oci_layout_read_by_skopeo_and_umoci(batch, tmp_path):
    _, specs = batch
    layout = tmp_path / "layout"
    result = build_many([str(s) for s in specs], str(layout), format="oci-dir",
                        cache=str(tmp_path / "cache"))  # fmt: skip
    assert not result.failed
    index = json.loads((layout / "index.json").read_text())
    names = sorted(
        m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
    )
    assert names == ["img-a", "img-b", "img-c"]
    blobs = list((layout / "blobs" / "sha256").iterdir())
    digests = {b.name for b in blobs}
    for b in blobs:
        assert hashlib.sha256(b.read_bytes()).hexdigest() == b.name
    skopeo = validators.require("skopeo")
    for item in result.items:
        out = validators.run_tool([skopeo, "inspect", f"oci:{layout}:{item.name}"])
        layers = json.loads(out)["Layers"]
        assert all(x.removeprefix("sha256:") in digests for x in layers)
    umoci = validators.require("umoci")
    bundle = tmp_path / "bundle"
    validators.run_tool([umoci, "unpack", "--rootless", "--image", f"{layout}:img-b", str(bundle)])
    assert (bundle / "rootfs" / "nix" / "store").is_dir()


@pytest.mark.validators
def test_batch_push_names_each_image_and_a_repush_uploads_nothing(batch, tmp_path, registry):
    _, specs = batch
    prefix = f"docker://{registry.host}/team"
    kw = {"insecure": True, "cache": str(tmp_path / "cache")}
    first = push_many([str(s) for s in specs], prefix, **kw)
    assert not first.failed
    assert sorted(x.output.split("@")[0] for x in first.items) == [
        f"{registry.host}/team/{app}:1" for app in ("a", "b", "c")
    ]
    mark = registry.mark()
    again = push_many([str(s) for s in specs], prefix, **kw)
    assert not again.failed and registry.uploads_since(mark) == []
    assert again.counts()["bytes_read"] == 0
    skopeo = validators.require("skopeo")
    out = validators.run_tool([skopeo, "inspect", "--tls-verify=false",
                               f"docker://{registry.host}/team/c:1"])  # fmt: skip
    assert len(json.loads(out)["Layers"]) == 3


def test_sigterm_stops_every_build_of_a_batch_and_leaves_nothing(batch, tmp_path):
    """The signal reaches the main thread only; the builds in flight on other
    threads stop too, each cleaning up its staging directory and .part file."""
    _, specs = batch
    slow = []
    for s in specs:
        spec = json.loads(s.read_text())
        spec["extra_commands"] = "sleep 3"  # a margin for a loaded machine
        f = tmp_path / f"slow-{s.name}"
        f.write_text(json.dumps(spec))
        slow.append(str(f))
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlayer", "build", *slow, "-o", str(out), "-q", "--no-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )  # fmt: skip
    time.sleep(0.5)
    while proc.poll() is None and not list(tmpdir.iterdir()):
        time.sleep(0.05)  # until a build is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(tmpdir.iterdir()) == []
    assert not [p for p in out.glob(".*") if p.name.endswith(".part")]
    assert not list(out.glob("*.tar"))  # the build in flight was stopped, not finished


def test_shards_build_every_spec_once_and_keep_their_specs_when_more_are_added(tmp_path):
    """--shard K/N: the shards together cover every spec exactly once, and a spec
    stays in its shard when others are added (each spec's shard is its own hash)."""
    specs = []
    for i in range(12):
        f = tmp_path / f"img{i:02d}.json"
        f.write_text(json.dumps({"name": f"team/img{i}", "tag": "1", "config": {"Cmd": [str(i)]}}))
        specs.append(str(f))

    def built(k: int, n: int, given: list[str]) -> set[str]:
        out = tmp_path / f"out-{k}-{n}-{len(given)}"
        r = subprocess.run(
            [sys.executable, "-m", "fastlayer", "build", *given, "-o", str(out),
             "--shard", f"{k}/{n}", "-q", "--no-cache"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1].startswith(f"fastlayer: shard {k}/{n}: ")
        return {p.name for p in out.glob("*.tar")} if out.exists() else set()

    three = [built(k, 3, specs[:9]) for k in (1, 2, 3)]
    assert sorted(x for s in three for x in s) == sorted(f"img{i:02d}.tar" for i in range(9))
    assert all(three)  # 9 specs in 3 shards: none empty (for these names)
    more = [built(k, 3, specs) for k in (1, 2, 3)]
    for before, after in zip(three, more, strict=True):
        assert before <= after  # nothing moved to another shard
    argv = ["build", *specs, "-o", str(tmp_path / "x"), "--shard", "3/2"]
    r = subprocess.run([sys.executable, "-m", "fastlayer", *argv], capture_output=True, text=True)
    assert r.returncode == 1 and "--shard '3/2'" in r.stderr and r.stderr.count("\n") == 1


def test_a_shared_file_layer_is_built_once_even_with_two_jobs(tmp_path):
    """Two specs with the same [[layers]] directory: the second image waits for the
    first and copies that layer, whatever -j says."""
    shared = tmp_path / "assets"
    shared.mkdir()
    (shared / "data.bin").write_bytes(bytes(range(256)) * 2048)
    specs = []
    for app in ("a", "b"):
        f = tmp_path / f"{app}.json"
        f.write_text(json.dumps({
            "name": f"team/{app}", "tag": "1", "config": {"Cmd": [app]},
            "layers": [{"name": "assets", "paths": [str(shared)], "dest": "/srv"}],
        }))  # fmt: skip
        specs.append(str(f))
    result = build_many(specs, str(tmp_path / "out"), jobs=2, cache=str(tmp_path / "cache"))
    c = result.counts()
    assert not result.failed and (c["layers_built"], c["layers_reused"]) == (1, 1)
