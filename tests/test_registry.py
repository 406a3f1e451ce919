"""Pull and push against a real registry (Debian's docker-registry on 127.0.0.1).

What fastlayer pushes, skopeo inspects and podman pulls and runs; what
skopeo pushes, fastlayer pulls and builds on. Uploads are counted in the
registry's own access log. Faults: a tampered blob on disk, 401, 404, and
a registry killed in the middle of a push.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import validators
from closures import busybox_closure
from registry_fixture import Registry, token_registry

import fastlayer
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.publish import push_spec
from fastlayer.registry.pull import pull
from fastlayer.registry.push import push_image

pytestmark = pytest.mark.validators
# where the fastlayer under test lives (site-packages once installed, src/ in a dev tree)
SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
ZERO = "sha256:" + "0" * 64


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """A blob cache of the test's own, and no credentials from the host."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp_path / "cache"


def app_spec(tmp_path: Path, unique: bytes = b"", **extra) -> dict:
    root = tmp_path / "root"
    paths, graph = busybox_closure(root)
    spec = {
        "name": "app",
        "tag": "v1",
        "store_root": str(root),
        "contents": {"store_paths": [paths["busybox"], paths["greeting"]], "graph": str(graph)},
        "config": {"Cmd": ["/bin/sh", "-c", "cat /share/greeting"]},
    }
    if unique:
        (tmp_path / "rootfs").mkdir(exist_ok=True)
        (tmp_path / "rootfs" / "unique").write_bytes(unique)
        spec["contents"]["roots"] = [str(tmp_path / "rootfs")]
    spec.update(extra)
    return spec


def skopeo(*args: str) -> str:
    return validators.run_tool([validators.require("skopeo"), *args])


def policy(tmp_path: Path) -> str:
    p = tmp_path / "policy.json"
    p.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    return str(p)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
    )


def test_push_build_inspected_by_skopeo_run_by_podman(registry, podman, tmp_path):
    ref = f"{registry.host}/team/app:v1"
    result = push_spec(app_spec(tmp_path), f"docker://{ref}", insecure=True)
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Digest"] == result.digest
    assert info["Layers"] == [x.digest for x in result.layers]
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert {x["mediaType"] for x in raw["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    podman("pull", "--tls-verify=false", ref)
    assert podman.run(ref) == "hello from fastlayer\n"
    assert podman.inspect(ref)["RootFS"]["Layers"] == [x.diff_id for x in result.layers]


def test_repush_uploads_nothing_and_a_leaf_change_one_layer(registry, tmp_path, monkeypatch):
    dest = f"docker://{registry.host}/team/leaf:v1"
    spec = app_spec(tmp_path)
    first = push_spec(spec, dest, insecure=True)
    assert (first.stats.layers, first.stats.uploaded, first.stats.config) == (3, 3, "uploaded")

    mark = registry.mark()
    again = push_spec(spec, dest, insecure=True)
    assert registry.uploads_since(mark) == []
    assert again.digest == first.digest
    assert again.stats.compressed == 0  # the cache named each blob: HEAD, no gzip

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    mark = registry.mark()
    cold = push_spec(spec, dest, insecure=True)
    assert registry.uploads_since(mark) == []  # deterministic gzip: same blobs
    assert cold.digest == first.digest and cold.stats.compressed == 3

    greeting = next((tmp_path / "root" / "nix" / "store").glob("*-greeting"))
    (greeting / "share" / "greeting").write_text("a changed leaf\n")
    mark = registry.mark()
    # Nix never edits a store path in place (a change is a new path), so the layer
    # cache looks only at a store path's root (README, "Layer cache"): this
    # stand-in for a rebuilt leaf goes past it
    changed = push_spec(spec, dest, insecure=True, cache=False)
    new = [x.digest for x in changed.layers if x.digest not in {y.digest for y in first.layers}]
    assert len(new) == 1
    assert sorted(registry.uploads_since(mark)) == sorted([new[0], changed.config_digest])
    assert changed.digest != first.digest


def test_pull_what_skopeo_pushed_and_build_on_it(registry, podman, tmp_path):
    base_tar = tmp_path / "base.tar"
    fastlayer.build(app_spec(tmp_path, name="base", tag="1"), str(base_tar))
    ref = f"{registry.host}/skopeo/base:1"
    skopeo(
        "--policy",
        policy(tmp_path),
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"docker-archive:{base_tar}",
        f"docker://{ref}",
    )
    digest = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))["Digest"]

    out = tmp_path / "by-tag.tar"
    by_tag = cli(
        "pull",
        "--insecure",
        "-q",
        ref,
        "-o",
        str(out),
        "--final-name",
        "base",
        "--final-tag",
        "pinned",
    )
    assert by_tag.returncode == 0, by_tag.stderr
    assert by_tag.stdout.strip() == digest
    assert f"pin it as {registry.host}/skopeo/base@{digest}" in by_tag.stderr
    assert validators.read_docker_archive(out).manifest[0]["RepoTags"] == ["base:pinned"]

    pulled = tmp_path / "pulled.tar"
    result = pull(f"{ref.split(':1')[0]}@{digest}", str(pulled), insecure=True)
    original = validators.read_docker_archive(base_tar)
    got = validators.read_docker_archive(pulled)
    assert got.config["rootfs"] == original.config["rootfs"]
    assert got.manifest[0]["RepoTags"] == [f"{registry.host}/skopeo/base:latest"]
    oci = tmp_path / "pulled-oci"
    pull(f"{registry.host}/skopeo/base@{digest}", str(oci), format="oci-dir", insecure=True)
    validators.umoci_unpack(oci, "latest", tmp_path / "bundle")  # checks every digest

    child = {
        "name": "child",
        "tag": "1",
        "from_image": str(pulled),
        "contents": {"roots": [str(_rootfs(tmp_path))]},
        "config": {"Cmd": ["/bin/sh", "-c", "cat /share/greeting /child"]},
    }
    child_tar = tmp_path / "child.tar"
    fastlayer.build(child, str(child_tar))
    (name,) = podman.load(child_tar)
    assert podman.run(name) == "hello from fastlayer\nchild\n"
    built_on_oci = fastlayer.build({**child, "from_image": str(oci)}, str(tmp_path / "c2.tar"))
    assert built_on_oci.layers[0].diff_id == original.config["rootfs"]["diff_ids"][0]

    # Pushing the child to another repository: base layers are mounted, never read.
    pushed = push_spec(child, f"docker://{registry.host}/team/child:1", insecure=True)
    n_base = len(result.layers)
    assert pushed.stats.mounted == n_base and pushed.stats.unread == n_base


def _rootfs(tmp_path: Path) -> Path:
    d = tmp_path / "child-root"
    d.mkdir(exist_ok=True)
    (d / "child").write_text("child\n")
    return d


def test_push_existing_images_sends_stored_blobs(registry, tmp_path):
    spec = app_spec(tmp_path, unique=os.urandom(64))
    oci = tmp_path / "oci"
    fastlayer.build(spec, str(oci), format="oci-dir", compress="zstd")
    r = cli("push", "--insecure", str(oci), f"docker://{registry.host}/team/from-oci:2")
    assert r.returncode == 0, r.stderr
    raw = json.loads(
        skopeo(
            "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/team/from-oci:2"
        )
    )
    assert (
        "sha256:" + hashlib.sha256(json.dumps(raw, indent=2).encode()).hexdigest()
        == r.stdout.strip()
    )
    stored = sorted(p.name for p in (oci / "blobs" / "sha256").iterdir())
    assert all(x["digest"].split(":")[1] in stored for x in raw["layers"])  # not recompressed
    assert {x["mediaType"] for x in raw["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    zstd = push_spec(spec, f"docker://{registry.host}/team/zstd:1", compress="zstd", insecure=True)
    assert {x.media_type for x in zstd.layers} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    back = pull(f"{registry.host}/team/zstd@{zstd.digest}", str(tmp_path / "z.tar"), insecure=True)
    assert validators.read_docker_archive(tmp_path / "z.tar").config["rootfs"]["diff_ids"] == [
        x.diff_id for x in zstd.layers
    ]
    assert [x.digest for x in back.layers] == [x.digest for x in zstd.layers]
    tar = tmp_path / "app.tar"
    built = fastlayer.build(spec, str(tar))
    pushed = push_image(str(tar), f"docker://{registry.host}/team/from-tar", insecure=True)
    assert pushed.tag == "v1" and pushed.config_digest == built.image_id  # config bytes kept


def test_tampered_blob_fails_pull_and_leaves_nothing(registry, tmp_path):
    result = push_spec(
        app_spec(tmp_path, unique=os.urandom(4096)),
        f"docker://{registry.host}/team/tamper:1",
        insecure=True,
    )
    blob = registry.blob_path(result.layers[-1].digest)  # only this image has it
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    for fmt, target in (("docker-archive", out / "img.tar"), ("oci-dir", out / "img")):
        with pytest.raises(DigestMismatch, match=result.layers[-1].digest):
            pull(
                f"{registry.host}/team/tamper@{result.digest}",
                str(target),
                format=fmt,
                insecure=True,
            )
    assert list(out.iterdir()) == []


def test_missing_digest_is_a_404(registry, tmp_path):
    out = tmp_path / "x.tar"
    r = cli("pull", "--insecure", f"{registry.host}/team/app@{ZERO}", "-o", str(out))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "404" in r.stderr and "team/app" in r.stderr
    assert not out.exists()
    # TLS is the default: a plain-HTTP registry is refused unless --insecure
    r = cli("pull", f"{registry.host}/team/app@{ZERO}", "-o", str(out))
    assert r.returncode == 1 and "TLS" in r.stderr and "--insecure" in r.stderr


def test_basic_auth(tmp_path_factory, tmp_path, monkeypatch):
    reg = Registry(tmp_path_factory.mktemp("auth-registry"), {"alice": "wonder-land"}).start()
    try:
        dest = f"docker://{reg.host}/team/private:1"
        spec = app_spec(tmp_path)
        with pytest.raises(FastlayerError, match="needs credentials.*401"):
            push_spec(spec, dest, insecure=True)
        r = cli("pull", "--insecure", f"{reg.host}/team/private:1", "-o", str(tmp_path / "a"))
        assert r.returncode == 1 and "401" in r.stderr and r.stderr.count("\n") == 1

        auth = tmp_path / "auth.json"
        wrong = {"auths": {reg.host: {"username": "alice", "password": "not-it"}}}
        auth.write_text(json.dumps(wrong))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        r = cli("push", "--insecure", "-q", str(_spec_file(tmp_path, spec)), dest)
        assert r.returncode == 1 and "401" in r.stderr and "not-it" not in r.stderr

        token = __import__("base64").b64encode(b"alice:wonder-land").decode()
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        pushed = push_spec(spec, dest, insecure=True)
        pulled = pull(
            f"{reg.host}/team/private@{pushed.digest}", str(tmp_path / "p.tar"), insecure=True
        )
        assert pulled.manifest_digest == pushed.digest
        assert "wonder-land" not in reg.log_path.read_text()
    finally:
        reg.stop()


def _spec_file(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_registry_killed_mid_push_then_push_completes(tmp_path_factory, tmp_path):
    reg = Registry(tmp_path_factory.mktemp("dying-registry")).start()
    try:
        spec = _spec_file(tmp_path, app_spec(tmp_path, unique=os.urandom(48 << 20)))
        dest = f"docker://{reg.host}/team/big:1"
        argv = [sys.executable, "-m", "fastlayer", "push", "--insecure", "-q", str(spec), dest]
        env = {**os.environ, "PYTHONPATH": SRC}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not any(m == "POST" for m, _, _ in reg.requests()):
            assert proc.poll() is None and time.monotonic() < deadline, "push ended too soon"
            time.sleep(0.005)
        reg.kill()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        message = err.decode()
        assert message.count("\n") == 1 and "unreachable" in message and reg.host in message

        reg.start()
        r = cli("push", "--insecure", "-q", str(spec), dest)
        assert r.returncode == 0, r.stderr
        info = json.loads(skopeo("inspect", "--tls-verify=false", dest))
        assert info["Digest"] == r.stdout.strip()
    finally:
        reg.stop()


def test_bearer_tokens_scopes_and_mounts(tmp_path_factory, tmp_path, monkeypatch):
    reg, tokens = token_registry(tmp_path_factory.mktemp("token-registry"), {"bob": "builder"})
    tokens.start()
    try:
        reg.start()
        spec = app_spec(tmp_path)
        dest = f"docker://{reg.host}/team/app:1"
        with pytest.raises(FastlayerError, match="401"):
            push_spec(spec, dest, insecure=True)  # anonymous tokens carry pull only
        auth = tmp_path / "auth.json"
        auth.write_text(
            json.dumps({"auths": {reg.host: {"username": "bob", "password": "builder"}}})
        )
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        pushed = push_spec(spec, dest, insecure=True)
        # the registry's challenge lists the actions in no fixed order
        asked = {
            (user, tuple(sorted(s.rsplit(":", 1)[1].split(","))))
            for user, scopes in tokens.asked
            for s in scopes
            if s.startswith("repository:team/app:")
        }
        assert ("bob", ("pull", "push")) in asked

        other = push_spec(spec, f"docker://{reg.host}/team/copy:1", insecure=True)
        assert (other.stats.mounted, other.stats.uploaded, other.stats.config) == (3, 0, "mounted")
        mount_scopes = {s for user, scopes in tokens.asked for s in scopes if user == "bob"}
        assert "repository:team/app:pull" in mount_scopes  # the mount's source

        monkeypatch.delenv("REGISTRY_AUTH_FILE")
        pulled = pull(
            f"{reg.host}/team/app@{pushed.digest}", str(tmp_path / "a.tar"), insecure=True
        )
        assert pulled.manifest_digest == pushed.digest
        assert (None, ["repository:team/app:pull"]) in tokens.asked
    finally:
        reg.stop()
        tokens.stop()


def test_pull_resolves_an_index_to_the_platform(registry, tmp_path):
    import requests

    repo = f"{registry.host}/team/multi"
    manifests = []
    base = app_spec(tmp_path)
    for arch in ("amd64", "arm64"):
        spec = {**base, "architecture": arch, "tag": arch}
        r = push_spec(spec, f"docker://{repo}:{arch}", insecure=True)
        size = len(
            requests.get(
                f"http://{registry.host}/v2/team/multi/manifests/{r.digest}",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                timeout=30,
            ).content
        )
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": r.digest,
                "size": size,
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
    ).encode()
    put = requests.put(
        f"http://{registry.host}/v2/team/multi/manifests/all",
        data=index,
        timeout=30,
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
    )
    assert put.status_code == 201, put.text
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()

    result = pull(f"{repo}@{index_digest}", str(tmp_path / "arm.tar"), arch="arm64", insecure=True)
    assert result.digest == index_digest and result.manifest_digest == manifests[1]["digest"]
    assert validators.read_docker_archive(tmp_path / "arm.tar").config["architecture"] == "arm64"
    r = cli("pull", "--insecure", f"{repo}:all", "--arch", "s390x", "-o", str(tmp_path / "x"))
    assert (
        r.returncode == 1 and "no linux/s390x image; it has: linux/amd64, linux/arm64" in r.stderr
    )


def test_a_stale_cache_costs_time_not_correctness(registry, tmp_path, cache_home):
    spec = app_spec(tmp_path, unique=os.urandom(256))
    first = push_spec(spec, f"docker://{registry.host}/team/stale:1", insecure=True)
    path = cache_home / "fastlayer" / "registry-blobs.json"
    cache = json.loads(path.read_text())
    mine = cache[registry.host]
    # every blob claimed by a repository that has none, every layer by a blob nobody has
    mine["repos"] = {d: ["team/ghost"] for d in mine["repos"]}
    for entry in mine["layers"].values():
        entry["digest"] = ZERO
    path.write_text(json.dumps(cache))
    dest = f"docker://{registry.host}/team/stale-copy:1"
    again = push_spec(spec, dest, insecure=True)
    assert again.digest == first.digest  # mounts refused (202): uploaded through that session
    assert (again.stats.mounted, again.stats.uploaded, again.stats.config) == (0, 3, "uploaded")
    info = json.loads(skopeo("inspect", "--tls-verify=false", dest))
    assert info["Digest"] == first.digest
