"""Each command-line flag does what its help says, seen from outside the program.

`build --format/--compress`, `pull --os/--arch/--variant`, `push -j`,
`push --image-tag`, `push --compress` run as a user would run them
(`python -m fastlayer`), against a registry on 127.0.0.1 where one is needed;
what they wrote or sent is read back with tarfile, json and hashlib.
(`nix-db --store-root` is in test_critical_edges.py.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from hostile_registry import OCI_MANIFEST, Handler, Hostile, Image, sha

import fastlayer

SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "PYTHONPATH": SRC, "XDG_CACHE_HOME": str(tmp_path / "cache"),
         "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "docker")}  # fmt: skip
    for k in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        e.pop(k, None)
    return e


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastlayer", *args], capture_output=True,
                          env=env, timeout=120)  # fmt: skip


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr.decode()
    return r


def spec(tmp_path: Path, layers: int = 1, name: str = "app") -> Path:
    """A spec with `layers` explicit layers of distinct random bytes."""
    entries = []
    for i in range(layers):
        d = tmp_path / f"{name}-layer{i}"
        d.mkdir()
        (d / "data").write_bytes(os.urandom(2048))
        entries.append({"paths": [str(d / "data")], "dest": f"/l{i}"})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "tag": "1", "layers": entries}))
    return path


# -- build --format, --compress ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive", "oci-dir"])
def test_build_format(tmp_path, env, fmt):
    out = tmp_path / "out"
    ok(cli(env, "build", str(spec(tmp_path)), "-o", str(out), "--format", fmt, "-q"))
    if fmt == "oci-dir":
        assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
        assert json.loads((out / "index.json").read_text())["manifests"]
        return
    with tarfile.open(out) as t:
        names = set(t.getnames())
    if fmt == "oci-archive":
        assert {"oci-layout", "index.json"} <= names and "manifest.json" not in names
    else:
        assert "manifest.json" in names and "oci-layout" not in names


@pytest.mark.parametrize("kind, magic", [("gzip", GZIP_MAGIC), ("zstd", ZSTD_MAGIC)])
def test_build_compress_the_archive_and_oci_layers(tmp_path, env, kind, magic):
    out = tmp_path / "img"  # no extension: only --compress decides
    ok(cli(env, "build", str(spec(tmp_path)), "-o", str(out), "--compress", kind, "-q"))
    assert out.read_bytes()[: len(magic)] == magic
    layout = tmp_path / "layout"
    ok(cli(env, "build", str(spec(tmp_path, name="oci")), "-o", str(layout), "--format",
           "oci-dir", "--compress", kind, "-q"))  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith("+" + kind)
        data = (blobs / layer["digest"][7:]).read_bytes()
        assert data[: len(magic)] == magic and sha(data) == layer["digest"]


# -- pull --os, --arch, --variant ----------------------------------------------------

PLATFORMS = [("linux", "amd64", ""), ("linux", "arm64", "v8"), ("linux", "arm64", "v7"),
             ("windows", "amd64", "")]  # fmt: skip


def multi_platform(reg: Hostile) -> dict[tuple[str, str, str], Image]:
    """An index of one image per platform, each with a layer naming its platform."""
    images = {p: Image.make("/".join(p).encode()) for p in PLATFORMS}
    entries = []
    for (os_name, arch, variant), image in images.items():
        platform = {
            "os": os_name,
            "architecture": arch,
            **({"variant": variant} if variant else {}),
        }
        entries.append({"mediaType": OCI_MANIFEST, "digest": image.digest,
                        "size": len(image.manifest), "platform": platform})  # fmt: skip
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    by_digest = {i.digest: i for i in images.values()}
    blobs = {k: v for i in images.values() for k, v in i.blobs.items()}

    def manifest(h: Handler, m) -> None:
        if m[1] == "multi":
            h.send(200, index, {"Content-Type": OCI_INDEX})
        else:
            h.send(200, by_digest[m[1]].manifest, {"Content-Type": OCI_MANIFEST})

    reg.on("GET", r"/v2/team/app/manifests/(.+)", manifest)
    reg.on("GET", r"/v2/team/app/blobs/(.+)", lambda h, m: h.send(200, blobs[m[1]]))
    return images


def layer_text(archive: Path) -> bytes:
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        layer = tarfile.open(fileobj=io.BytesIO(t.extractfile(manifest["Layers"][0]).read()))
        return layer.extractfile("greeting").read()


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--arch", "amd64"], ("linux", "amd64", "")),
        (["--arch", "arm64", "--variant", "v7"], ("linux", "arm64", "v7")),
        (["--arch", "arm64", "--variant", "v8"], ("linux", "arm64", "v8")),
        (["--os", "windows", "--arch", "amd64"], ("windows", "amd64", "")),
    ],
)
def test_pull_picks_the_platform_asked_for(hostile, tmp_path, env, flags, want):
    reg = hostile()
    images = multi_platform(reg)
    out = tmp_path / "img.tar"
    ok(cli(env, "pull", "--insecure", "-q", *flags, f"{reg.host}/team/app:multi",
           "-o", str(out)))  # fmt: skip
    assert layer_text(out) == "/".join(want).encode()
    asked = [s.path.rsplit("/", 1)[1] for s in reg.seen if "/manifests/" in s.path]
    assert asked == ["multi", images[want].digest]


def test_pull_of_a_platform_the_index_lacks_names_what_it_has(hostile, tmp_path, env):
    reg = hostile()
    multi_platform(reg)
    r = cli(env, "pull", "--insecure", "-q", "--arch", "arm64", "--variant", "v6",
            f"{reg.host}/team/app:multi", "-o", str(tmp_path / "img.tar"))  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert "no linux/arm64/v6 image" in err and "linux/arm64/v8" in err and "windows/amd64" in err
    assert not (tmp_path / "img.tar").exists()


# -- push -j, --image-tag, --compress ------------------------------------------------


def uploads(reg: Hostile, hold: float = 0.0) -> dict:
    """A registry taking any push; each blob upload is held up to `hold` seconds
    unless another is in flight, and the most at once is kept in state["most"]."""
    state = {"now": 0, "most": 0, "lock": threading.Lock()}
    reg.on("HEAD", r"/v2/.*", lambda h, m: h.send(404))
    counter = iter(range(1, 10**6))
    reg.on("POST", r"/v2/team/app/blobs/uploads/", lambda h, m: h.send(
        202, b"", {"Location": f"/upload/{next(counter)}"}))  # fmt: skip

    def put(h: Handler, m) -> None:
        with state["lock"]:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and state["most"] < 2:
            time.sleep(0.01)
        with state["lock"]:
            state["now"] -= 1
        h.send(201)

    reg.on("PUT", r"/upload/.*", put)
    reg.on("PUT", r"/v2/team/app/manifests/.*", lambda h, m: h.send(201))
    return state


def uploaded(reg: Hostile) -> dict[str, bytes]:
    """digest -> body of every completed blob upload."""
    out = {}
    for s in reg.seen:
        if s.method == "PUT" and s.path.startswith("/upload/"):
            out[s.path.split("digest=", 1)[1].replace("%3A", ":")] = s.body
    return out


@pytest.mark.parametrize("jobs, least, most", [(1, 1, 1), (3, 2, 3)])
def test_push_jobs_bounds_the_uploads_in_flight(hostile, tmp_path, env, jobs, least, most):
    reg = hostile()
    state = uploads(reg, hold=0.3 if jobs == 1 else 5.0)
    ok(cli(env, "push", "--insecure", "-q", "-j", str(jobs), str(spec(tmp_path, layers=4)),
           f"docker://{reg.host}/team/app:1"))  # fmt: skip
    assert len(uploaded(reg)) == 6  # four layers, the customisation layer, the config
    assert least <= state["most"] <= most


def test_push_image_tag_picks_one_image_of_many(hostile, tmp_path, env):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    ok(cli(env, "build", str(spec(tmp_path, name="a")), "-o", str(a), "-q"))
    ok(cli(env, "build", str(spec(tmp_path, name="b")), "-o", str(b), "-q"))
    both = tmp_path / "both.tar"
    ok(cli(env, "merge", str(a), str(b), "-o", str(both)))
    with tarfile.open(b) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config_b = t.extractfile(manifest["Config"]).read()
    reg = hostile()
    uploads(reg)
    dest = f"docker://{reg.host}/team/app:1"
    r = cli(env, "push", "--insecure", "-q", str(both), dest)
    err = r.stderr.decode()
    assert r.returncode == 1 and "a:1" in err and "b:1" in err, err  # which one? names both
    assert [s for s in reg.seen if s.method != "GET"] == []
    ok(cli(env, "push", "--insecure", "-q", "--image-tag", "b:1", str(both), dest))
    assert uploaded(reg)[sha(config_b)] == config_b  # b's config, byte for byte


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_push_compress_sets_the_layer_blobs(hostile, tmp_path, env, kind):
    image = tmp_path / "img.tar"
    ok(cli(env, "build", str(spec(tmp_path)), "-o", str(image), "-q"))
    with tarfile.open(image) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        layers = [t.extractfile(name).read() for name in manifest["Layers"]]
    reg = hostile()
    uploads(reg)
    ok(cli(env, "push", "--insecure", "-q", "--compress", kind, str(image),
           f"docker://{reg.host}/team/app:1"))  # fmt: skip
    blobs = uploaded(reg)
    puts = [s.body for s in reg.seen if s.method == "PUT" and "/manifests/" in s.path]
    assert len(puts) == 2 and puts[0] == puts[1]  # by digest, then the tag
    descs = json.loads(puts[0])["layers"]
    assert len(descs) == len(layers) == 2 and len(blobs) == 3  # and the config
    suffix = {"none": ".tar", "gzip": ".tar+gzip", "zstd": ".tar+zstd"}[kind]
    for desc, layer in zip(descs, layers, strict=True):
        blob = blobs[desc["digest"]]
        assert desc["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
        assert desc["mediaType"].endswith(suffix)
        if kind == "none":
            assert blob == layer
        elif kind == "gzip":
            assert blob[:2] == GZIP_MAGIC and gzip.decompress(blob) == layer
        else:
            import zstandard

            assert blob[:4] == ZSTD_MAGIC
            assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == layer
