"""Registry pieces that need no registry: references, challenges, credentials, cache."""

from __future__ import annotations

import base64
import json

import pytest

from fastlayer.errors import FastlayerError
from fastlayer.registry.auth import find_credentials, parse_challenge
from fastlayer.registry.cache import Blob, BlobCache
from fastlayer.registry.reference import parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest",
    [
        ("docker://127.0.0.1:5000/a/b:1.0", "127.0.0.1:5000", "a/b", "1.0", None),
        (f"localhost/app@{D}", "localhost", "app", None, D),
        (f"reg.example/t/app:v1@{D}", "reg.example", "t/app", "v1", D),
        ("busybox", "docker.io", "library/busybox", None, None),
        ("team/app:2", "docker.io", "team/app", "2", None),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", None, None),
    ],
)
def test_parse_reference(text, registry, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.reference == (digest or tag or "latest")


@pytest.mark.parametrize(
    "text, culprit",
    [("reg.example/App", "invalid repository name"), ("a/b@sha256:12", "a digest is")],
)
def test_bad_references_name_the_culprit(text, culprit):
    with pytest.raises(FastlayerError, match=culprit):
        parse_reference(text)


def test_parse_challenge():
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "reg.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"').scheme == "basic"


def test_credentials_from_auth_file_are_never_shown(tmp_path, monkeypatch):
    auth = tmp_path / "auth.json"
    secret = "s3cret-pass"
    entry = {"auth": base64.b64encode(f"alice:{secret}".encode()).decode()}
    auth.write_text(json.dumps({"auths": {"https://127.0.0.1:5000/v2/": entry}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    creds = find_credentials("127.0.0.1:5000")
    assert creds is not None and (creds.username, creds.password) == ("alice", secret)
    assert secret not in repr(creds)
    assert find_credentials("127.0.0.1:5001") is None


def test_blob_cache_round_trip(tmp_path):
    path = str(tmp_path / "c.json")
    cache = BlobCache("reg:5000", path)
    blob = Blob("sha256:" + "1" * 64, 10, "application/vnd.oci.image.layer.v1.tar+gzip")
    cache.remember("a/b", blob, "sha256:" + "2" * 64, "gzip")
    cache.save()
    again = BlobCache("reg:5000", path)
    assert again.layer("sha256:" + "2" * 64, "gzip") == blob
    assert again.layer("sha256:" + "2" * 64, "zstd") is None
    assert again.repos_with(blob.digest) == ["a/b"]
    assert BlobCache("other:1", path).layer("sha256:" + "2" * 64, "gzip") is None
