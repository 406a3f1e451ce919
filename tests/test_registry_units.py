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


def _blob(n: int) -> Blob:
    return Blob(f"sha256:{n:064x}", n, "application/vnd.oci.image.layer.v1.tar+gzip")


def test_runs_saving_at_the_same_time_keep_each_others_entries(tmp_path):
    """Each save re-reads the file under the lock: the later save keeps the
    earlier one's entries, of its registry and of others."""
    path = str(tmp_path / "c.json")
    first, second, other = (BlobCache(r, path) for r in ("reg:1", "reg:1", "reg:2"))
    first.remember("a/one", _blob(1), _blob(11).digest, "gzip")
    second.remember("a/two", _blob(2), _blob(12).digest, "gzip")
    other.remember("b/x", _blob(3), _blob(13).digest, "zstd")
    for cache in (first, other, second):
        cache.save()
    again = BlobCache("reg:1", path)
    assert again.layer(_blob(11).digest, "gzip") == _blob(1)
    assert again.layer(_blob(12).digest, "gzip") == _blob(2)
    assert BlobCache("reg:2", path).layer(_blob(13).digest, "zstd") == _blob(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.lock"]  # no temps


def test_a_save_waits_for_a_held_lock_only_briefly(tmp_path):
    import fcntl
    import time

    from fastlayer.registry import cache as cache_mod

    path = tmp_path / "c.json"
    cache = BlobCache("reg:1", str(path))
    cache.remember("a/b", _blob(1), _blob(2).digest, "gzip")
    with open(f"{path}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run that hangs while saving
        start = time.monotonic()
        cache.save()
        took = time.monotonic() - start
    assert cache_mod.LOCK_WAIT - 0.1 <= took < cache_mod.LOCK_WAIT + 2
    assert BlobCache("reg:1", str(path)).layer(_blob(2).digest, "gzip") == _blob(1)


def test_a_broken_cache_is_replaced_by_the_next_save(tmp_path, capsys):
    path = tmp_path / "c.json"
    good = {"digest": _blob(5).digest, "size": 5, "mediaType": "t"}
    path.write_text(json.dumps({"reg:1": {
        "layers": {f"gzip:{_blob(6).digest}": good, f"gzip:{_blob(7).digest}": {"size": "5"},
                   f"lz4:{_blob(8).digest}": good},
        "repos": {_blob(5).digest: ["a/b"], _blob(9).digest: "a/b"}}}))  # fmt: skip
    cache = BlobCache("reg:1", str(path))
    assert capsys.readouterr().err == (
        f"fastlayer: warning: registry blob cache {path}: 3 malformed entries dropped "
        "(only a hint: carrying on)\n"
    )
    assert cache.layer(_blob(6).digest, "gzip") == Blob(_blob(5).digest, 5, "t")
    assert cache.repos_with(_blob(5).digest) == ["a/b"] and cache.repos_with(_blob(9).digest) == []
    cache.remember("a/c", _blob(1))
    cache.save()
    BlobCache("reg:1", str(path))
    assert capsys.readouterr().err == ""  # what was written reads back clean
