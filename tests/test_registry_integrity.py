"""Every byte pulled is the byte promised: a tampered manifest, config or blob is refused.

A registry on 127.0.0.1 (hostile_registry.py) serves images that are wrong in
exactly one way each; every other check would pass. Each pull must fail with a
message naming what was wrong and leave nothing at or beside the output.
Expected digests are computed here from the bytes served (hashlib), never by
fastlayer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hostile_registry import OCI_MANIFEST, Image, sha

import fastlayer
from fastlayer.errors import FastlayerError
from fastlayer.registry.pull import pull

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(autouse=True)
def no_host_state(tmp_path, monkeypatch):
    """No credentials or blob cache of the machine's user."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == []  # nothing written, no temporary left beside it


def fetch(host: str, ref: str, out: Path, fmt: str = "docker-archive"):
    name = "img" if fmt == "oci-dir" else "img.tar"
    return pull(f"{host}/team/app{ref}", str(out / name), format=fmt, insecure=True,
                timeout=10, stall=5)  # fmt: skip


def rebuilt(image: Image, config: bytes | None = None, **layer_desc) -> Image:
    """image with another config (its descriptor following it) or layer descriptor fields."""
    manifest = json.loads(image.manifest)
    if config is not None:
        manifest["config"] = {**manifest["config"], "digest": sha(config), "size": len(config)}
    manifest["layers"][0].update(layer_desc)
    new = Image(image.layer, config or image.config).with_manifest(json.dumps(manifest).encode())
    return new


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-dir"])
def test_a_manifest_other_than_the_pinned_digest_is_refused(hostile, out, fmt):
    good = Image.make(b"the image you pinned\n")
    evil = Image.make(b"what the registry sends\n")  # self-consistent, all blobs served
    assert len(evil.manifest) == len(good.manifest)  # only its digest gives it away
    reg = hostile().serve_image(evil)
    with pytest.raises(FastlayerError, match=f"manifest {good.digest} hashes to {evil.digest}"):
        fetch(reg.host, f"@{good.digest}", out, fmt)
    assert not any(sha(evil.layer).split(":")[1] in s.path for s in reg.seen)  # no layer asked


def test_an_index_entry_whose_manifest_differs_is_refused(hostile, out):
    good = Image.make(b"the image the index names\n")
    evil = Image.make(b"what the registry sends\n")
    assert len(evil.manifest) == len(good.manifest)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": good.digest, "size": len(good.manifest),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()  # fmt: skip
    reg = hostile()
    reg.on("GET", r"/v2/team/app/manifests/1", lambda h, m: h.send(
        200, index, {"Content-Type": OCI_INDEX}))  # fmt: skip
    reg.serve_image(evil)
    with pytest.raises(FastlayerError, match=f"manifest {good.digest} hashes to {evil.digest}"):
        pull(f"{reg.host}/team/app:1", str(out / "img.tar"), insecure=True, arch="amd64",
             timeout=10, stall=5)  # fmt: skip


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-dir"])
def test_a_config_other_than_its_descriptor_is_refused(hostile, out, fmt):
    image = Image.make()
    config = json.loads(image.config)
    promised = json.dumps({**config, "config": {"Env": ["MODE=safe"]}}).encode()
    served = json.dumps({**config, "config": {"Env": ["MODE=evil"]}}).encode()
    assert len(served) == len(promised)  # same size, valid JSON, right diff_ids: only the digest
    bad = rebuilt(image, promised)
    bad.blobs[sha(promised)] = served
    reg = hostile().serve_image(bad)
    message = f"blob {sha(promised)} served with digest {sha(served)}"
    with pytest.raises(FastlayerError, match=message):
        fetch(reg.host, f"@{bad.digest}", out, fmt)


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-dir"])
def test_a_blob_shorter_than_its_descriptor_is_refused(hostile, out, fmt):
    """The digest is right but the descriptor says 5 more bytes: the manifest lies."""
    image = Image.make()
    bad = rebuilt(image, size=len(image.layer) + 5)
    reg = hostile().serve_image(bad)
    message = f"is {len(image.layer)} bytes, not {len(image.layer) + 5}"
    with pytest.raises(FastlayerError, match=message):
        fetch(reg.host, f"@{bad.digest}", out, fmt)


def test_a_config_shorter_than_its_descriptor_is_refused(hostile, out):
    image = Image.make()
    manifest = json.loads(image.manifest)
    manifest["config"]["size"] += 3
    bad = Image(image.layer, image.config).with_manifest(json.dumps(manifest).encode())
    reg = hostile().serve_image(bad)
    with pytest.raises(FastlayerError, match=f"is {len(image.config)} bytes, not"):
        fetch(reg.host, f"@{bad.digest}", out)


@pytest.mark.parametrize(
    "digest",
    ["sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha256:" + "0" * 64 + "/../x", "sha256:../x"],
)
@pytest.mark.parametrize("which", ["config", "layer"])
def test_a_descriptor_digest_outside_the_grammar_is_refused_before_any_use(
    hostile, out, digest, which
):
    image = Image.make()
    manifest = json.loads(image.manifest)
    target = manifest["config"] if which == "config" else manifest["layers"][0]
    target["digest"] = digest
    bad = Image(image.layer, image.config).with_manifest(json.dumps(manifest).encode())
    reg = hostile().serve_image(bad)
    field = "config.digest" if which == "config" else "layers[0].digest"
    with pytest.raises(FastlayerError, match=rf"manifest\.{re.escape(field)}: .*not a digest"):
        fetch(reg.host, f"@{bad.digest}", out)
    asked = [f"/v2/team/app/manifests/{bad.digest}"]
    if which == "layer":  # the config comes first; no request is built from the bad digest
        asked.append(f"/v2/team/app/blobs/{sha(image.config)}")
    assert [s.path for s in reg.seen] == asked


# -- OCI layouts on disk: their JSON blobs are checked against their descriptors -----


def oci_base(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello").write_text("hi\n")
    base = tmp_path / "base-oci"
    spec = {"name": "base", "tag": "1", "contents": {"roots": [str(root)]},
            "config": {"Env": ["MODE=safe"]}}  # fmt: skip
    fastlayer.build(spec, str(base), format="oci-dir")
    return base


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def test_a_same_size_edit_of_an_oci_base_config_is_refused(tmp_path):
    base = oci_base(tmp_path)
    index = json.loads((base / "index.json").read_text())
    manifest = json.loads(blob(base, index["manifests"][0]["digest"]).read_bytes())
    config = blob(base, manifest["config"]["digest"])
    data = config.read_bytes()
    assert data.count(b"MODE=safe") == 1
    config.write_bytes(data.replace(b"MODE=safe", b"MODE=evil"))
    out = tmp_path / "child.tar"
    with pytest.raises(FastlayerError, match="does not match its descriptor's digest and size"):
        fastlayer.build({"name": "child", "tag": "1", "from_image": str(base)}, str(out))
    assert not out.exists()


def test_a_same_size_edit_of_an_oci_base_manifest_is_refused(tmp_path):
    base = oci_base(tmp_path)
    index = json.loads((base / "index.json").read_text())
    manifest = blob(base, index["manifests"][0]["digest"])
    raw = manifest.read_bytes()
    doc = json.loads(raw)

    def compact(pad: int) -> bytes:  # the same manifest plus an annotation, compact JSON
        return json.dumps({**doc, "annotations": {"x": "y" * pad}}, separators=(",", ":")).encode()

    edited = compact(len(raw) - len(compact(0)))
    assert len(edited) == len(raw)
    assert hashlib.sha256(edited).digest() != hashlib.sha256(raw).digest()
    manifest.write_bytes(edited)
    out = tmp_path / "child.tar"
    with pytest.raises(FastlayerError, match="does not match its descriptor's digest and size"):
        fastlayer.build({"name": "child", "tag": "1", "from_image": str(base)}, str(out))
    assert not out.exists()


# -- redirects: a 303 is followed with a GET ----------------------------------------


def test_an_upload_answered_with_303_is_followed_with_a_get_not_sent_again(tmp_path, hostile):
    """RFC 9110: after 303 See Other the client GETs the Location; the blob is not
    sent a second time to wherever the registry points, and the GET carries no
    Content-Length (with one, the server waited for a body: a stall until the limit)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 5000)
    reg = hostile()
    reg.on("HEAD", r"/v2/.*", lambda h, m: h.send(404))
    reg.on("POST", r"/v2/team/app/blobs/uploads/", lambda h, m: h.send(
        202, b"", {"Location": "/upload/1"}))  # fmt: skip
    reg.on("PUT", r"/upload/.*", lambda h, m: h.send(303, b"", {"Location": "/done"}))
    reg.on("GET", r"/done", lambda h, m: h.send(201))
    reg.on("PUT", r"/v2/team/app/manifests/.*", lambda h, m: h.send(201))
    spec = {"name": "app", "tag": "1", "contents": {"roots": [str(root)]}}
    fastlayer.push_spec(spec, f"docker://{reg.host}/team/app:1", insecure=True, timeout=20)
    done = [s for s in reg.seen if s.path == "/done"]
    assert [(s.method, s.body) for s in done] == [("GET", b"")] * 2  # the layer, the config
    assert all("content-length" not in s.headers for s in done)
