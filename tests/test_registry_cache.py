"""A layer cache shared through a registry: "machines" are separate cache homes
and store copies against one docker-registry on 127.0.0.1. Machine B pushes
what machine A built without reading the store or uploading a blob; damaged
entries fall back to building the layer, with a warning, never a wrong image."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter

import machines
import pytest
import validators
from closures import make_closure
from hostile_registry import Hostile
from registry_fixture import Registry

from fastlayer import untrusted
from fastlayer.cache.remote import ARTIFACT, parse_entry
from fastlayer.publish import push_spec

PACKAGES = {
    "libc-2.40": {"lib/libc.so": b"libc" * 50000, "share/deep/a/b/c.txt": b"deep\n" * 999},
    "libssl-3.0": {"lib/libssl.so": b"ssl" * 30000},
    "app-1": {"bin/app": b"#!app\n" + b"a" * 7777},
}
REFS = {"libssl-3.0": ["libc-2.40"], "app-1": ["libssl-3.0", "libc-2.40"]}
OCI = "application/vnd.oci.image.manifest.v1+json"


class Machine(machines.Machine):
    """A machine that pushes in this process."""

    def push(self, monkeypatch, dest: str, **kw):
        monkeypatch.setenv("XDG_CACHE_HOME", str(self.home))
        return push_spec(str(self.spec), dest, insecure=True, **kw)


@pytest.fixture
def world(tmp_path, registry):
    origin = tmp_path / "origin"
    paths, _ = make_closure(origin, PACKAGES, REFS)
    a = Machine(tmp_path, "a", origin, paths)
    b = Machine(tmp_path, "b", origin, paths)
    return a, b, paths


def manifest(registry: Registry, repo: str, ref: str) -> dict:
    req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{ref}",
                                 headers={"Accept": OCI})  # fmt: skip
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def put_manifest(registry: Registry, repo: str, ref: str, doc: dict) -> None:
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{ref}", data=json.dumps(doc).encode(),
        method="PUT", headers={"Content-Type": OCI},
    )  # fmt: skip
    urllib.request.urlopen(req).close()


def entry_tags(registry: Registry, repo: str) -> list[str]:
    with urllib.request.urlopen(f"http://{registry.host}/v2/{repo}/tags/list") as r:
        return sorted(json.load(r)["tags"] or [])


@pytest.mark.validators
def test_machine_b_pushes_what_a_built_reading_no_store_and_uploading_nothing(
    world, registry, monkeypatch, tmp_path
):
    a, b, paths = world
    cache = f"docker://{registry.host}/ci/cache"
    first = a.push(monkeypatch, f"docker://{registry.host}/team/a:1", cache_repo=cache)
    assert first.stats.uploaded == 4  # 3 store layers + customisation layer, all new
    tags = entry_tags(registry, "ci/cache")
    assert len(tags) == 3  # one entry per store layer, tagged by its key
    entry = manifest(registry, "ci/cache", tags[0])
    assert entry["artifactType"] == ARTIFACT
    pushed_blobs = {x["digest"] for x in manifest(registry, "team/a", "1")["layers"]}
    assert entry["layers"][0]["digest"] in pushed_blobs

    # B's store copy differs inside a store path: any read of it would give
    # another layer, so the same manifest digest proves B read none of it
    deep = b.root / paths["libc-2.40"].lstrip("/") / "share/deep/a/b/c.txt"
    deep.write_bytes(b"not what A had\n")
    strace = shutil.which("strace")
    log = tmp_path / "opens.log"
    dest = f"docker://{registry.host}/team/b:1"
    argv = [sys.executable, "-m", "fastlayer", "push", str(b.spec), dest, "--insecure", "-q",
            "--cache-repo", cache]  # fmt: skip
    if strace:
        argv = [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log), *argv]
    env = {**os.environ, "XDG_CACHE_HOME": str(b.home)}
    mark = registry.mark()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first.digest
    assert registry.uploads_since(mark) == []  # every blob mounted from the cache repository
    if strace:
        store = str(b.root / "nix/store")
        opened = [line for line in log.read_text().splitlines() if store in line]
        # no file of the store is opened; the only directories listed are those of
        # the contents' root, whose symlinks the customisation layer holds
        assert [x for x in opened if "O_DIRECTORY" not in x] == []
        root = str(b.root) + paths["app-1"]
        assert opened and all(f'"{root}' in x for x in opened)
    skopeo = validators.require("skopeo")
    raw = validators.run_tool([skopeo, "inspect", "--tls-verify=false", "--raw",
                               f"docker://{registry.host}/team/b:1"])  # fmt: skip
    assert json.loads(raw)["layers"] == manifest(registry, "team/a", "1")["layers"]
    validators.run_tool([skopeo, "copy", "--src-tls-verify=false", dest,
                         f"oci:{tmp_path / 'oci'}:b"])  # fmt: skip


@pytest.mark.validators
def test_damaged_entries_fall_back_to_building_with_a_warning(world, registry, monkeypatch, capsys):
    a, b, paths = world
    cache = f"docker://{registry.host}/ci/damaged"
    first = a.push(monkeypatch, f"docker://{registry.host}/team/da:1", cache_repo=cache)
    tags = entry_tags(registry, "ci/damaged")
    layers = manifest(registry, "team/da", "1")["layers"]
    assert len(tags) == 3
    entries = {t: manifest(registry, "ci/damaged", t) for t in tags}
    by_blob = {e["layers"][0]["digest"]: t for t, e in entries.items()}
    # 1: a wrong digest: the registry refuses a manifest naming a missing blob, so
    # another layer's blob (real, but not of the size the entry says)
    t1 = by_blob[layers[0]["digest"]]
    wrong = json.loads(json.dumps(entries[t1]))
    wrong["layers"][0]["digest"] = layers[1]["digest"]
    put_manifest(registry, "ci/damaged", t1, wrong)
    # 2: the tag of another entry deleted
    t2 = by_blob[layers[1]["digest"]]
    req = urllib.request.Request(f"http://{registry.host}/v2/ci/damaged/manifests/{t2}",
                                 headers={"Accept": OCI}, method="HEAD")  # fmt: skip
    with urllib.request.urlopen(req) as r:
        digest = r.headers["Docker-Content-Digest"]
    conn = http.client.HTTPConnection(registry.host)
    conn.request("DELETE", f"/v2/ci/damaged/manifests/{digest}")
    assert conn.getresponse().status == 202
    conn.close()
    # 3: a third entry's blob deleted from the registry's storage
    t3 = by_blob[layers[2]["digest"]]
    assert t3 not in (t1, t2)
    registry.blob_path(layers[2]["digest"]).unlink()

    capsys.readouterr()
    second = b.push(monkeypatch, f"docker://{registry.host}/team/db:1", cache_repo=cache)
    err = capsys.readouterr().err
    assert second.digest == first.digest  # the same image, every layer built afresh
    assert second.build.remote_hits == 0 and second.stats.compressed >= 3
    warnings = [line for line in err.splitlines() if "warning" in line and "ci/damaged" in line]
    # one line per entry that did not hold (the deleted tag is a plain miss)
    assert sorted(w.split(" entry ")[1][:12] for w in warnings) == sorted([t1[:12], t3[:12]])
    assert all(w.endswith("the layer is built") for w in warnings)
    skopeo = validators.require("skopeo")
    raw = validators.run_tool([skopeo, "inspect", "--tls-verify=false", "--raw",
                               f"docker://{registry.host}/team/db:1"])  # fmt: skip
    assert [x["digest"] for x in json.loads(raw)["layers"]] == [x["digest"] for x in layers]


def _forward(real: str):
    """A Hostile route that passes a request on to the real registry."""

    def fn(h, m) -> None:
        conn = http.client.HTTPConnection(real, timeout=30)
        body = h.server.owner.seen[-1].body
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host",)}
        conn.request(h.command, h.path, body=body or None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        drop = ("connection", "transfer-encoding")
        h.send(r.status, data, {k: v for k, v in r.getheaders() if k.lower() not in drop})
        conn.close()

    return fn


def _refuse(h, m) -> None:
    h.send(400, b'{"errors": [{"code": "MANIFEST_INVALID", "message": "no artifacts here"}]}',
           {"Content-Type": "application/json"})  # fmt: skip


@pytest.mark.validators
def test_a_registry_that_refuses_the_entries_still_gets_the_image(
    world, registry, monkeypatch, capsys
):
    a, _, _ = world
    proxy = Hostile()
    try:
        proxy.on("PUT", r"/v2/ci/refused/manifests/.*", _refuse)
        for method in ("GET", "HEAD", "PUT", "POST", "PATCH"):
            proxy.on(method, r"/.*", _forward(registry.host))
        result = a.push(monkeypatch, f"docker://{proxy.host}/team/r:1",
                        cache_repo=f"docker://{proxy.host}/ci/refused")  # fmt: skip
    finally:
        proxy.stop()
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "warning" in line] == [
        line for line in err.splitlines() if "ci/refused" in line and "not written" in line
    ]
    assert "no artifacts here" in err
    assert manifest(registry, "team/r", "1")["config"]["digest"] == result.config_digest


@pytest.mark.parametrize(
    "change",
    [
        {"artifactType": "application/vnd.other+json"},
        {
            "annotations": {
                "org.fastlayer.cache.diff-id": "sha256:xyz",
                "org.fastlayer.cache.size": "1",
            }
        },  # fmt: skip
        {
            "annotations": {
                "org.fastlayer.cache.diff-id": "sha256:" + "a" * 64,
                "org.fastlayer.cache.size": "-1",
            }
        },  # fmt: skip
        {"layers": []},
        {
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": "sha256:" + "b" * 64,
                    "size": 5,
                    "annotations": {"org.fastlayer.cache.kind": "gzip/2-x"},
                }
            ]
        },  # fmt: skip
    ],
)
def test_an_entry_not_in_our_shape_is_refused(change):
    good = {
        "schemaVersion": 2, "mediaType": OCI, "artifactType": ARTIFACT,
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + "b" * 64, "size": 5,
                    "annotations": {"org.fastlayer.cache.kind": "gzip/2-x"}}],
        "annotations": {"org.fastlayer.cache.diff-id": "sha256:" + "a" * 64,
                        "org.fastlayer.cache.size": "10"},
    }  # fmt: skip
    hit = parse_entry(good, "entry")
    assert hit.entry.blobs == {"gzip/2-x": ("sha256:" + "b" * 64, 5)} and hit.entry.size == 10
    with pytest.raises(untrusted.Invalid):
        parse_entry({**good, **change}, "entry")


@pytest.mark.validators
def test_a_batch_shares_the_cache_too(world, registry, monkeypatch, tmp_path):
    from fastlayer.batch import push_many

    a, b, paths = world
    cache = f"docker://{registry.host}/ci/batch"

    def specs(m: Machine) -> list[str]:
        other = json.loads(m.spec.read_text())
        other["name"], other["contents"]["store_paths"] = "ssl", [paths["libssl-3.0"]]
        (m.spec.parent / "ssl.json").write_text(json.dumps(other))
        return [str(m.spec), str(m.spec.parent / "ssl.json")]

    monkeypatch.setenv("XDG_CACHE_HOME", str(a.home))
    first = push_many(specs(a), f"docker://{registry.host}/ta", insecure=True, cache_repo=cache)
    assert not first.failed and len(entry_tags(registry, "ci/batch")) == 3
    monkeypatch.setenv("XDG_CACHE_HOME", str(b.home))
    mark = registry.mark()
    second = push_many(specs(b), f"docker://{registry.host}/tb", insecure=True, cache_repo=cache)
    assert not second.failed and registry.uploads_since(mark) == []
    for name in ("app", "ssl"):
        assert manifest(registry, f"tb/{name}", "1") == manifest(registry, f"ta/{name}", "1")
    # the images share the libc and libssl layers: one lookup per key and one size
    # check per blob for the whole batch, not one per image
    asked = Counter((m, u) for m, u, _ in registry.requests()[mark:] if "/ci/batch/" in u)
    gets = [n for (m, u), n in asked.items() if m == "GET" and "/manifests/" in u]
    heads = [n for (m, u), n in asked.items() if m == "HEAD" and "/blobs/" in u]
    assert len(gets) == 3 and set(gets) == {1}
    assert len(heads) >= 3 and set(heads) == {1}


@pytest.mark.validators
def test_machine_b_checks_each_blob_once_in_the_cache_and_mounts_it(
    world, registry, monkeypatch, capsys
):
    """B's requests per layer: the entry, one HEAD of its blob in the cache
    repository (its size), the mount; no HEAD in the target. An entry whose size
    alone is wrong is caught by that HEAD, and the layer is built."""
    a, b, _ = world
    cache = f"docker://{registry.host}/ci/sizes"
    first = a.push(monkeypatch, f"docker://{registry.host}/team/sa:1", cache_repo=cache)
    layers = [x["digest"] for x in manifest(registry, "team/sa", "1")["layers"]]
    mark = registry.mark()
    second = b.push(monkeypatch, f"docker://{registry.host}/team/sb:1", cache_repo=cache)
    assert second.digest == first.digest and second.build.remote_hits == 3
    asked = registry.requests()[mark:]
    for digest in layers[:3]:  # the store layers, from the entries
        hexd = digest.split(":")[1]  # a mount's query has it as sha256%3A...
        assert [(m, s) for m, u, s in asked if hexd in u] == [("HEAD", 200), ("POST", 201)]
        assert [u for m, u, _ in asked if hexd in u][0].startswith("/v2/ci/sizes/blobs/")
    assert not [u for m, u, _ in asked if u.startswith("/v2/team/sb/blobs/sha256:")
                and u.rsplit("/", 1)[1] in layers[:3]]  # fmt: skip

    tag = entry_tags(registry, "ci/sizes")[0]
    lie = manifest(registry, "ci/sizes", tag)
    lie["layers"][0]["size"] += 1  # the right blob, the wrong size
    put_manifest(registry, "ci/sizes", tag, lie)
    b.home = b.home.with_name("xdg2")  # an empty local cache again
    capsys.readouterr()
    third = b.push(monkeypatch, f"docker://{registry.host}/team/sc:1", cache_repo=cache)
    err = capsys.readouterr().err
    assert third.digest == first.digest and third.build.remote_hits == 2
    assert f"entry {tag[:12]}: its blob is missing or not as described" in err


def test_a_cache_on_another_registry_warns_once_not_per_layer(world, registry, tmp_path):
    """A layer is mounted only within one registry: a cache elsewhere can give a push
    nothing. One warning, not one per layer the cache knows; the image is A's."""
    a, b, _ = world
    other = Registry(tmp_path / "other").start()
    try:
        cache = f"docker://{other.host}/ci/cache"

        def push(m: Machine, dest: str) -> subprocess.CompletedProcess:
            argv = [sys.executable, "-m", "fastlayer", "push", str(m.spec), dest, "--insecure",
                    "-q", "--cache-repo", cache]  # fmt: skip
            env = {**os.environ, "XDG_CACHE_HOME": str(m.home)}
            p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stderr
            return p

        first = push(a, f"docker://{other.host}/team/a:1")  # the entries, written there
        assert len(entry_tags(other, "ci/cache")) == 3
        p = push(b, f"docker://{registry.host}/team/b:1")
    finally:
        other.stop()
    assert p.stdout == first.stdout  # the same image
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "another registry" in warnings[0], p.stderr
