"""Base images in every supported format read back as the same layers."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard
from tarref import reference_image
from test_stream_nix import make_store, run_cli, write_conf

from fastlayer.emit import ReaderSource
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.sources.base_image import open_image


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def base(tmp_path) -> tuple[Path, list[bytes], dict]:
    """A docker-archive built by fastlayer, with its layers' bytes and its conf."""
    conf = make_store(tmp_path)
    conf["config"] = {"Env": ["FROM_PARENT=1", "LAST=parent"]}
    out = tmp_path / "base.tar"
    r = run_cli("stream-nix", str(write_conf(tmp_path, conf, "base.json")), "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        layers = [t.extractfile(p).read() for p in manifest["Layers"]]
    return out, layers, conf


def read_all(image) -> list[bytes]:
    out = []
    for layer in image.layers:
        with layer.open() as f:
            out.append(f.read())
    return out


def add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data))


def legacy_archive(path: Path, layers: list[bytes], config: dict, tag: str) -> None:
    """Docker image spec v1 only: layer dirs with json/VERSION, a parent chain."""
    with tarfile.open(path, "w") as t:
        parent = None
        for i, data in enumerate(layers):
            layer_id = hashlib.sha256(f"{i}{parent}".encode()).hexdigest()
            meta = {"id": layer_id, **({"parent": parent} if parent else {})}
            if i == len(layers) - 1:
                meta.update(config=config["config"], architecture="amd64", os="linux")
            add(t, f"{layer_id}/VERSION", b"1.0")
            add(t, f"{layer_id}/json", json.dumps(meta).encode())
            add(t, f"{layer_id}/layer.tar", data)
            parent = layer_id
        name, _, tg = tag.rpartition(":")
        add(t, "repositories", json.dumps({name: {tg: parent}}).encode())


def oci_layout(root: Path, layers: list[bytes], config: dict, compress: str, ref: str) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    descs = []
    for data in layers:
        if compress == "gzip":
            stored, mt = gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        else:
            stored = zstandard.ZstdCompressor().compress(data)
            mt = "application/vnd.oci.image.layer.v1.tar+zstd"
        descs.append({"mediaType": mt, **blob(stored)})
    cfg = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **blob(json.dumps(config).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": descs,
    }
    mdesc = {
        "mediaType": manifest["mediaType"],
        **blob(json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": ref},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def test_docker_archive_current(base):
    path, layers, _ = base
    image = open_image(str(path))
    assert read_all(image) == layers
    assert [x.size for x in image.layers] == [len(x) for x in layers]  # stored uncompressed
    assert image.diff_ids == [sha(x) for x in layers]
    assert image.config["config"]["Env"] == ["FROM_PARENT=1", "LAST=parent"]


def test_legacy_spec_follows_parent_chain(tmp_path, base):
    path, layers, _ = base
    legacy = tmp_path / "legacy.tar"
    config = open_image(str(path)).config
    legacy_archive(legacy, layers, config, "old/app:v1")
    image = open_image(str(legacy))
    assert image.diff_ids == [sha(x) for x in layers]
    assert image.repo_tags == ["old/app:v1"]
    assert image.config["config"]["Env"] == ["FROM_PARENT=1", "LAST=parent"]
    assert read_all(image) == layers


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_oci_layout_and_archive(tmp_path, base, compress):
    path, layers, _ = base
    config = open_image(str(path)).config
    layout = tmp_path / "layout"
    oci_layout(layout, layers, config, compress, "v1")
    for where in (layout, tmp_path / "oci.tar"):
        if where.suffix == ".tar":
            with tarfile.open(where, "w") as t:
                t.add(layout, arcname=".")  # ./ prefixes, as tar -C dir . makes them
        image = open_image(str(where), tag="v1")
        assert image.diff_ids == [sha(x) for x in layers]
        assert read_all(image) == layers


def test_multi_image_archive_pick_by_tag(tmp_path, base):
    path, layers, _ = base
    multi = tmp_path / "multi.tar"
    with tarfile.open(path) as src, tarfile.open(multi, "w") as dst:
        manifest = json.load(src.extractfile("manifest.json"))
        for m in src.getmembers():
            if m.name != "manifest.json":
                dst.addfile(m, src.extractfile(m))
        second = dict(manifest[0], RepoTags=["second:2"], Layers=manifest[0]["Layers"][:1])
        # a second image sharing the first layer, with its own config
        cfg = json.load(src.extractfile(manifest[0]["Config"]))
        cfg["rootfs"]["diff_ids"] = cfg["rootfs"]["diff_ids"][:1]
        data = json.dumps(cfg).encode()
        second["Config"] = hashlib.sha256(data).hexdigest() + ".json"
        add(dst, second["Config"], data)
        add(dst, "manifest.json", json.dumps([manifest[0], second]).encode())
    with pytest.raises(FastlayerError, match="holds 2 images; pick one by tag: .*second:2"):
        open_image(str(multi))
    assert open_image(str(multi), tag="second:2").diff_ids == [sha(layers[0])]
    with pytest.raises(FastlayerError, match="no image tagged 'nope:1'"):
        open_image(str(multi), tag="nope:1")


def test_symlinked_layer_entries(tmp_path, base):
    path, layers, _ = base
    linked = tmp_path / "linked.tar"
    with tarfile.open(path) as src, tarfile.open(linked, "w") as dst:
        manifest = json.load(src.extractfile("manifest.json"))
        first = manifest[0]["Layers"][0]
        for m in src.getmembers():
            if m.name == "manifest.json":
                continue
            dst.addfile(m, src.extractfile(m))
        link = tarfile.TarInfo("again/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../" + first
        dst.addfile(link)
        manifest[0]["Layers"].append("again/layer.tar")
        cfg = json.load(src.extractfile(manifest[0]["Config"]))
        cfg["rootfs"]["diff_ids"].append(cfg["rootfs"]["diff_ids"][0])
        data = json.dumps(cfg).encode()
        manifest[0]["Config"] = hashlib.sha256(data).hexdigest() + ".json"
        add(dst, manifest[0]["Config"], data)
        add(dst, "manifest.json", json.dumps(manifest).encode())
    image = open_image(str(linked))
    assert read_all(image)[-1] == layers[0]


def test_tampered_layer_fails_when_read(tmp_path, base):
    path, layers, _ = base
    config = open_image(str(path)).config
    layout = tmp_path / "layout"
    oci_layout(layout, layers, config, "gzip", "v1")
    manifest_blob = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_blob.split(":")[1]).read_text())
    victim = layout / "blobs/sha256" / manifest["layers"][1]["digest"].split(":")[1]
    victim.write_bytes(gzip.compress(layers[1][:-1] + b"X"))
    image = open_image(str(layout))
    ReaderSource(image.layers[0], verify=True).pump(lambda b: None)  # an intact one passes
    with pytest.raises(DigestMismatch, match="hashes to sha256:"):
        ReaderSource(image.layers[1], verify=True).pump(lambda b: None)
    # trusted (the default): one plain copy, no hashing, the claimed diff_id
    assert ReaderSource(image.layers[1]).pump(lambda b: None) == image.layers[1].diff_id[7:]


def test_not_an_image(tmp_path):
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as t:
        add(t, "hello", b"x")
    with pytest.raises(FastlayerError, match="neither a docker-archive"):
        open_image(str(junk))
    with pytest.raises(FastlayerError, match="does not exist"):
        open_image(str(tmp_path / "missing.tar"))


@pytest.mark.parametrize("fmt", ["legacy", "oci-gzip", "oci-zstd-archive"])
def test_stream_nix_on_converted_bases(tmp_path, base, fmt):
    """A legacy or OCI base gives the same image as its docker-archive form."""
    path, layers, conf = base
    config = open_image(str(path)).config
    if fmt == "legacy":
        converted = tmp_path / "legacy.tar"
        legacy_archive(converted, layers, config, "old/app:v1")
    else:
        converted = tmp_path / "layout"
        oci_layout(converted, layers, config, fmt.split("-")[1], "v1")
        if fmt.endswith("archive"):
            with tarfile.open(tmp_path / "oci.tar", "w") as t:
                t.add(converted, arcname=".")
            converted = tmp_path / "oci.tar"
    child = copy.deepcopy(conf)
    child["config"] = {"Env": ["FROM_CHILD=1", "LAST=child"]}
    child["from_image"] = str(converted)
    r = run_cli("stream-nix", str(write_conf(tmp_path, child, "child.json")))
    assert r.returncode == 0, r.stderr
    t = tarfile.open(fileobj=io.BytesIO(r.stdout))
    manifest = json.load(t.extractfile("manifest.json"))[0]
    cfg = json.load(t.extractfile(manifest["Config"]))
    assert cfg["rootfs"]["diff_ids"][: len(layers)] == [sha(x) for x in layers]
    assert [t.extractfile(p).read() for p in manifest["Layers"][: len(layers)]] == layers
    assert cfg["config"]["Env"] == ["FROM_PARENT=1", "LAST=child", "FROM_CHILD=1"]
    # the store layers are the very ones a docker-archive base gives
    same = copy.deepcopy(child)
    same["from_image"] = str(path)
    assert cfg["rootfs"]["diff_ids"] == json.loads(json.dumps(_diff_ids(reference_image(same))))


def _diff_ids(archive: bytes) -> list[str]:
    t = tarfile.open(fileobj=io.BytesIO(archive))
    manifest = json.load(t.extractfile("manifest.json"))[0]
    return json.load(t.extractfile(manifest["Config"]))["rootfs"]["diff_ids"]
