"""`build` reading the layer cache shared through a registry: "machines" are separate
cache homes and store copies against one docker-registry on 127.0.0.1. Machine A
pushes with --cache-repo; machine B builds an OCI layout with compressed layers
from A's blobs without reading its store, byte for byte what a cold build gives;
damaged entries fall back to the store with a warning, never a wrong image."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import machines
import pytest
import validators
from closures import make_closure
from registry_fixture import Registry

from fastlayer.cache.fetch import FetchedLayer, HintFailed, fetch_kind
from fastlayer.errors import FastlayerError
from fastlayer.model import Known

PACKAGES = {
    "libc-2.40": {"lib/libc.so": b"libc" * 50000, "share/deep/a/b/c.txt": b"deep\n" * 999},
    "libssl-3.0": {"lib/libssl.so": b"ssl" * 30000, "etc/ssl.cnf": b"[ssl]\n"},
    "app-1": {"bin/app": b"#!app\n" + b"a" * 7777},
}
REFS = {"libssl-3.0": ["libc-2.40"], "app-1": ["libssl-3.0", "libc-2.40"]}
# in each store path a file whose bytes B's copy changes (same size): a layer built
# from B's store differs from A's, so B's output equals A's only if B read none of them
CHANGED = {"libc-2.40": "lib/libc.so", "libssl-3.0": "etc/ssl.cnf", "app-1": "bin/app"}
OCI = "application/vnd.oci.image.manifest.v1+json"


# the damaged-entry test deletes blobs from the registry's storage (shared by every
# repository): its layers are of other bytes than the other tests'
OWN = {name: {**files, "share/own": b"damaged-entry test\n"} for name, files in PACKAGES.items()}


class Machine(machines.Machine):
    """A machine that builds, and whose store can be spoiled."""

    def build(self, out: Path, *flags: str, env: dict | None = None) -> str:
        """`fastlayer build` in a child process; its stderr. Without env, with an empty
        local cache of its own (B's local cache would remember A's layers under B's
        recipes, which this test's changed store files contradict)."""
        if env is None:
            env = self.env(XDG_CACHE_HOME=str(out) + ".xdg")
        argv = [sys.executable, "-m", "fastlayer", "build", str(self.spec), "-o", str(out),
                "-q", *flags]  # fmt: skip
        p = subprocess.run(argv, env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stderr

    def spoil(self, paths: dict[str, str]) -> None:
        """Change one file per store path, keeping its size (and the graph's narHash)."""
        for name, rel in CHANGED.items():
            f = self.root / paths[name].lstrip("/") / rel
            data = f.read_bytes()
            f.chmod(0o644)
            f.write_bytes(bytes(b ^ 0x20 for b in data[:64]) + data[64:])
            f.chmod(0o444 if not rel.startswith("bin/") else 0o555)


@pytest.fixture(scope="module")
def world(tmp_path_factory, registry):
    """A's app:1 pushed with --cache-repo as gzip and as zstd (entries holding both
    blob kinds), and B's store copy with changed files."""
    base = tmp_path_factory.mktemp("rbuild")
    origin = base / "origin"
    paths, _ = make_closure(origin, PACKAGES, REFS)
    a = Machine(base, "a", origin, paths)
    b = Machine(base, "b", origin, paths)
    b.spoil(paths)
    cache = f"docker://{registry.host}/ci/bcache"
    for kind in ("gzip", "zstd"):
        argv = [sys.executable, "-m", "fastlayer", "push", str(a.spec), "--insecure", "-q",
                f"docker://{registry.host}/team/app-{kind}:1", "--compress", kind,
                "--cache-repo", cache]  # fmt: skip
        subprocess.run(argv, env=a.env(), check=True, capture_output=True)
    entries = _entries(registry, "ci/bcache")
    assert len(entries) == 3 and all(len(e["layers"]) == 2 for e in entries.values())
    return a, b, paths, cache


def tree(root: Path) -> dict[str, str]:
    """Every file of a directory by relative path -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_requests(registry: Registry, mark: int, repo: str) -> list[str]:
    """`METHOD URI` of the requests for repo's documents and blobs since mark."""
    return [f"{m} {u}" for m, u, _ in registry.requests()[mark:] if u.startswith(f"/v2/{repo}/")]


@pytest.mark.validators
def test_b_builds_a_gzip_layout_from_the_shared_cache_reading_no_store(world, registry, tmp_path):
    a, b, _, cache = world
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "gzip", "--no-cache")
    warm = tmp_path / "warm"
    mark = registry.mark()
    flags = ["--format", "oci-dir", "--compress", "gzip", "--cache-repo", cache, "--insecure"]
    strace = shutil.which("strace")
    if strace:  # the files B opens, counted too
        log = tmp_path / "opens.log"
        argv = [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log),
                sys.executable, "-m", "fastlayer", "build", str(b.spec), "-o", str(warm), "-q",
                *flags]  # fmt: skip
        env = b.env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        err = p.stderr
        store = str(b.root / "nix/store")
        opened = [x for x in log.read_text().splitlines() if store in x]
        # no store file is opened; only the directories of the contents' root, whose
        # symlinks the customisation layer holds, are listed
        assert [x for x in opened if "O_DIRECTORY" not in x] == []
    else:
        err = b.build(warm, *flags)
    assert "warning" not in err
    # B's store files differ from A's: had B read any of them, a blob would differ
    assert tree(warm) == tree(cold)
    gets = [x for x in cache_requests(registry, mark, "ci/bcache") if "/blobs/sha256:" in x]
    assert len(gets) == 3  # the three store layers' blobs, downloaded once each
    umoci = validators.require("umoci")
    validators.run_tool([umoci, "unpack", "--rootless", "--image", f"{warm}:1",
                         str(tmp_path / "bundle")])  # fmt: skip
    app = next((tmp_path / "bundle/rootfs/nix/store").glob("*-app-1")) / "bin/app"
    assert app.read_bytes() == b"#!app\n" + b"a" * 7777  # A's bytes, not B's


@pytest.mark.validators
def test_b_builds_a_zstd_oci_archive_from_the_shared_cache(world, tmp_path):
    a, b, _, cache = world
    cold = tmp_path / "cold.tar"
    a.build(cold, "--format", "oci-archive", "--compress", "zstd", "--no-cache")
    warm = tmp_path / "warm.tar"
    err = b.build(warm, "--format", "oci-archive", "--compress", "zstd", "--cache-repo", cache,
                  "--insecure")  # fmt: skip
    assert "warning" not in err
    assert sha(warm) == sha(cold)  # B's store files differ: none of them was read
    skopeo = validators.require("skopeo")
    raw = validators.run_tool([skopeo, "inspect", "--raw", f"oci-archive:{warm}:1"])
    assert [x["mediaType"] for x in json.loads(raw)["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+zstd"
    ] * 4


@pytest.mark.validators
@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_docker_archive_from_downloaded_layers_equals_a_cold_build(
    world, registry, tmp_path, compress
):
    a, b, _, cache = world
    suffix = {"gzip": ".tar.gz", "zstd": ".tar.zst"}[compress]
    cold = tmp_path / f"cold{suffix}"
    a.build(cold, "--no-cache")
    # a docker-archive stores layers uncompressed: the measured rule reads the store,
    # so B (whose store differs) builds another image and asks the registry nothing
    mark = registry.mark()
    own = tmp_path / f"own{suffix}"
    b.build(own, "--cache-repo", cache, "--insecure")
    assert cache_requests(registry, mark, "ci/bcache") == []
    assert sha(own) != sha(cold)
    # forced to download (FASTLAYER_CACHE_FETCH=always): A's image, byte for byte
    warm = tmp_path / f"warm{suffix}"
    env = b.env(FASTLAYER_CACHE_FETCH="always", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    err = b.build(warm, "--cache-repo", cache, "--insecure", env=env)
    assert "warning" not in err
    assert sha(warm) == sha(cold)
    plain = tmp_path / "plain.tar"
    if compress == "gzip":
        import gzip

        plain.write_bytes(gzip.decompress(warm.read_bytes()))
    else:
        import zstandard

        with open(warm, "rb") as f:
            plain.write_bytes(zstandard.ZstdDecompressor().stream_reader(f).read())
    skopeo = validators.require("skopeo")
    raw = validators.run_tool([skopeo, "inspect", "--raw", f"docker-archive:{plain}"])
    assert len(json.loads(raw)["layers"]) == 4


@pytest.mark.validators
def test_a_batch_takes_the_shared_cache_too(world, tmp_path):
    from fastlayer.batch import build_many

    a, b, _, cache = world
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "none", "--no-cache")
    # uncompressed layers: B's batch builds them from B's store...
    out = tmp_path / "none"
    build_many([str(b.spec)], str(out), format="oci-dir", compress="none", cache=False,
               cache_repo=cache, insecure=True)  # fmt: skip
    assert tree(out / "blobs") != tree(cold / "blobs")  # B's changed store files
    # ...and gzip layers from the registry: A's blobs, config and manifest
    cold = tmp_path / "cold-gzip"
    a.build(cold, "--format", "oci-dir", "--compress", "gzip", "--no-cache")
    out = tmp_path / "gzip"
    batch = build_many([str(b.spec)], str(out), format="oci-dir", compress="gzip", cache=False,
                       cache_repo=cache, insecure=True)  # fmt: skip
    assert not batch.failed
    assert tree(out / "blobs") == tree(cold / "blobs")
    assert batch.items[0].result.remote_hits == 3


def _entries(registry: Registry, repo: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://{registry.host}/v2/{repo}/tags/list") as r:
        tags = json.load(r)["tags"]
    out = {}
    for t in tags:
        req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{t}",
                                     headers={"Accept": OCI})  # fmt: skip
        with urllib.request.urlopen(req) as r:
            out[t] = json.load(r)
    return out


def _put(registry: Registry, repo: str, tag: str, doc: dict) -> None:
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}", data=json.dumps(doc).encode(),
        method="PUT", headers={"Content-Type": OCI},
    )  # fmt: skip
    urllib.request.urlopen(req).close()


@pytest.mark.validators
def test_damaged_entries_fall_back_to_the_store_with_a_warning(tmp_path, registry):
    origin = tmp_path / "origin"
    paths, _ = make_closure(origin, OWN, REFS)
    a = Machine(tmp_path, "a", origin, paths)
    b = Machine(tmp_path, "b", origin, paths)  # B's store as A's: a fallback gives A's image
    cache = f"docker://{registry.host}/ci/damaged-build"
    argv = [sys.executable, "-m", "fastlayer", "push", str(a.spec), "--insecure", "-q",
            f"docker://{registry.host}/team/dmg:1", "--cache-repo", cache]  # fmt: skip
    subprocess.run(argv, env=a.env(), check=True, capture_output=True)
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "gzip", "--no-cache")
    entries = _entries(registry, "ci/damaged-build")
    assert len(entries) == 3
    tags = sorted(entries)
    blobs = [entries[t]["layers"][0] for t in tags]
    # 1: a wrong diff_id; 2: another layer's blob (digest and size); 3: the blob deleted
    one = json.loads(json.dumps(entries[tags[0]]))
    one["annotations"]["org.fastlayer.cache.diff-id"] = "sha256:" + "1" * 64
    _put(registry, "ci/damaged-build", tags[0], one)
    two = json.loads(json.dumps(entries[tags[1]]))
    two["layers"][0].update(digest=blobs[0]["digest"], size=blobs[0]["size"])
    _put(registry, "ci/damaged-build", tags[1], two)
    registry.blob_path(blobs[2]["digest"]).unlink()

    warm = tmp_path / "warm"
    err = b.build(warm, "--format", "oci-dir", "--compress", "gzip", "--cache-repo", cache,
                  "--insecure")  # fmt: skip
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 3, err
    assert sum("holds another layer" in w for w in warnings) == 2, err
    assert sorted(w.split(" entry ")[1][:12] for w in warnings) == sorted(t[:12] for t in tags)
    assert all(w.endswith("the layer is built") for w in warnings)
    assert sum("404" in w for w in warnings) == 1
    assert tree(warm) == tree(cold)
    skopeo = validators.require("skopeo")
    validators.run_tool([skopeo, "inspect", f"oci:{warm}:1"])


def test_an_unreachable_cache_registry_warns_once_and_the_store_is_read(world, tmp_path):
    a, _, _, _ = world
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "zstd", "--no-cache")
    out = tmp_path / "out"
    # port 1 on 127.0.0.1: nothing listens, the connection is refused at once
    err = a.build(out, "--format", "oci-dir", "--compress", "zstd", "--insecure",
                  "--cache-repo", "docker://127.0.0.1:1/ci/none")  # fmt: skip
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "cannot be read" in warnings[0], err
    assert tree(out) == tree(cold)


def test_build_refuses_cache_to_in_one_line(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "x", "tag": "1"}))
    out = tmp_path / "o.tar"
    p = subprocess.run([sys.executable, "-m", "fastlayer", "build", str(spec), "-o", str(out),
                        "--cache-to", "docker://127.0.0.1:1/ci/c"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "--cache-to" in p.stderr and "push" in p.stderr
    assert not out.exists()


# -- the check of a downloaded blob, on bytes given here --------------------------------


def _layer(blob: bytes, known: Known, as_blob: bool = True) -> FetchedLayer:
    def chunks(digest: str):
        yield from (blob[i : i + 1000] for i in range(0, len(blob), 1000))

    return FetchedLayer(chunks, known, "gzip/x", "k" * 64, lambda: None, as_blob)


def _gzip_layer(data: bytes) -> tuple[bytes, Known]:
    import gzip

    blob = gzip.compress(data, mtime=0)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    diff = "sha256:" + hashlib.sha256(data).hexdigest()
    return blob, Known(diff, len(data), {"gzip/x": (digest, len(blob))})


def test_a_checked_download_gives_the_blob_and_the_layer():
    data = os.urandom(50_000) + bytes(300_000)
    blob, known = _gzip_layer(data)
    out = bytearray()
    assert _layer(blob, known).pump_blob(out.extend) == known.diff_id[7:]
    assert bytes(out) == blob
    out.clear()
    assert _layer(blob, known, as_blob=False).pump(out.extend) == known.diff_id[7:]
    assert bytes(out) == data


@pytest.mark.parametrize(
    "damage",
    ["flipped", "truncated", "longer", "other layer", "not gzip", "unreadable"],
)
def test_a_download_that_is_not_what_the_entry_says_fails_as_a_hint(damage):
    data = os.urandom(20_000) * 5
    blob, known = _gzip_layer(data)
    digest, size = known.blobs["gzip/x"]
    if damage == "flipped":  # the registry served other bytes than the digest names
        blob = blob[:500] + bytes([blob[500] ^ 1]) + blob[501:]
    elif damage == "truncated":
        blob = blob[:-10]
    elif damage == "longer":
        blob = blob + b"\0" * 10
    elif damage == "other layer":  # a real blob, of another layer than the diff_id says
        blob, other = _gzip_layer(data + b"x")
        known = Known(known.diff_id, known.size, {"gzip/x": other.blobs["gzip/x"]})
    elif damage == "not gzip":
        blob = b"\0" * size
        known = Known(known.diff_id, known.size,
                      {"gzip/x": ("sha256:" + hashlib.sha256(blob).hexdigest(), size)})  # fmt: skip
    layer = _layer(blob, known)
    if damage == "unreadable":

        def refused(digest: str):
            raise FastlayerError("registry 127.0.0.1: GET blob: 403 denied")
            yield b""

        layer.chunks = refused
    with pytest.raises(HintFailed, match="entry kkkkkkkkkkkk"):
        layer.pump_blob(bytearray().extend)
    layer.as_blob = False
    with pytest.raises(HintFailed):
        layer.pump(bytearray().extend)


def test_the_rule_fetches_only_the_compressed_kind_the_output_stores(monkeypatch):
    blobs = {"gzip/a": ("sha256:" + "a" * 64, 1), "zstd/b": ("sha256:" + "b" * 64, 1)}
    monkeypatch.delenv("FASTLAYER_CACHE_FETCH", raising=False)
    assert fetch_kind("gzip/a", blobs) == "gzip/a"
    assert fetch_kind("gzip/other-isal", blobs) is None  # another encoder: other bytes
    assert fetch_kind(None, blobs) is None  # uncompressed output: the store is faster
    monkeypatch.setenv("FASTLAYER_CACHE_FETCH", "always")
    assert fetch_kind(None, blobs) == "zstd/b"
    monkeypatch.setenv("FASTLAYER_CACHE_FETCH", "never")
    assert fetch_kind("gzip/a", blobs) is None


# -- a hostile cache registry ---------------------------------------------------------


def _proxy_entries(hostile, registry: Registry, repo: str, blob) -> None:
    """hostile answers the entries of repo as the real registry has them, and their
    blobs with blob(handler, digest)."""

    def entry(h, m) -> None:
        try:
            ask = urllib.request.Request(f"http://{registry.host}{h.path}", headers={"Accept": OCI})
            with urllib.request.urlopen(ask) as r:
                h.send(200, r.read(), {"Content-Type": OCI})
        except urllib.error.HTTPError as e:
            h.send(e.code)

    hostile.on("GET", rf"/v2/{repo}/manifests/[^/]+", entry)
    hostile.on("GET", rf"/v2/{repo}/blobs/(sha256:[0-9a-f]{{64}})", lambda h, m: blob(h, m[1]))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_stalled_download_ends_the_build_at_once(
    world, registry, hostile, tmp_path, signum
):
    _, b, _, _ = world

    def slow(h, digest: str) -> None:  # a byte a second: never a stall, never done
        with urllib.request.urlopen(f"http://{registry.host}/v2/ci/bcache/blobs/{digest}") as r:
            data = r.read()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.trickle(data, 1.0)

    server = hostile()
    _proxy_entries(server, registry, "ci/bcache", slow)
    spool = tmp_path / "tmp"
    spool.mkdir()
    out = tmp_path / "out"
    env = b.env(XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(spool))
    argv = [sys.executable, "-m", "fastlayer", "build", str(b.spec), "-o", str(out), "-q",
            "--format", "oci-dir", "--compress", "gzip", "--insecure",
            "--cache-repo", f"docker://{server.host}/ci/bcache"]  # fmt: skip
    p = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any("/blobs/" in s.path for s in server.seen):
            assert p.poll() is None and time.monotonic() < deadline, server.seen
            time.sleep(0.1)
        time.sleep(1.0)  # bytes are coming in
        p.send_signal(signum)
        _, err = p.communicate(timeout=15)  # not when the blobs end, hours from now
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert not out.exists()
    assert list(spool.iterdir()) == []


def test_the_build_api_reads_a_shared_cache_with_a_stall_limit(world, hostile, tmp_path):
    """build(..., cache_repo=...) from Python, with no timeout given, still gives up on
    a registry that never answers (the stall limit, lowered here to 1 s in the child)."""
    a, _, _, _ = world
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "gzip", "--no-cache")
    server = hostile()
    server.on("GET", r"/v2/.*", lambda h, m: server.stopping.wait(60))  # accepts, says nothing
    out = tmp_path / "out"
    code = (
        "import sys, fastlayer.registry.client as c; c.STALL = 1.0\n"
        "from fastlayer.builder import build\n"
        f"build({str(a.spec)!r}, {str(out)!r}, format='oci-dir', compress='gzip',"
        f" cache=False, cache_repo='docker://{server.host}/ci/x', insecure=True)\n"
    )  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], env=a.env(), capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "stalled" in warnings[0], p.stderr
    assert tree(out) == tree(cold)


@pytest.mark.parametrize("answer", ["403", "hang up"])
def test_blobs_the_cache_registry_will_not_give_warn_once_not_per_layer(
    world, registry, hostile, tmp_path, answer
):
    """The entries are read, then every blob GET fails the same way (refused, or the
    registry went away): one warning for the registry, the layers built from the store."""
    a, _, _, _ = world
    cold = tmp_path / "cold"
    a.build(cold, "--format", "oci-dir", "--compress", "gzip", "--no-cache")

    def refuse(h, digest: str) -> None:
        if answer == "403":
            h.send(403, b'{"errors": [{"code": "DENIED", "message": "no"}]}')
        else:
            h.close_connection = True  # no answer at all

    server = hostile()
    _proxy_entries(server, registry, "ci/bcache", refuse)
    out = tmp_path / "out"
    err = a.build(out, "--format", "oci-dir", "--compress", "gzip", "--insecure",
                  "--cache-repo", f"docker://{server.host}/ci/bcache")  # fmt: skip
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1, err
    assert "blob" in warnings[0] and "built" in warnings[0], err
    assert tree(out) == tree(cold)


@pytest.mark.validators
def test_a_build_says_what_the_shared_cache_gave(world, tmp_path):
    """--cache-repo on a build never does nothing silently: one stderr line says
    how many layers came from the registry, or why it was not asked."""
    _, b, _, cache = world

    def build(out: Path, *flags: str) -> list[str]:
        argv = [sys.executable, "-m", "fastlayer", "build", str(b.spec), "-o", str(out),
                "--cache-repo", cache, "--insecure", *flags]  # fmt: skip
        p = subprocess.run(argv, env=b.env(XDG_CACHE_HOME=str(out) + ".xdg"),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stderr.splitlines()

    lines = build(tmp_path / "layout", "--format", "oci-dir", "--compress", "gzip")
    assert lines == ["fastlayer: shared layer cache: 3 of 3 layers downloaded (gzip blobs), "
                     "the rest built from the store"]  # fmt: skip
    lines = build(tmp_path / "image.tar")
    assert len(lines) == 1 and "shared layer cache not asked" in lines[0], lines
    assert "uncompressed" in lines[0]
    # --cache-from only, the local cache already knowing every layer: nothing to ask
    home = {"XDG_CACHE_HOME": str(tmp_path / "warm.xdg")}
    for out in ("warm1", "warm2"):
        argv = [sys.executable, "-m", "fastlayer", "build", str(b.spec), "-o",
                str(tmp_path / out), "--cache-from", cache, "--insecure",
                "--format", "oci-dir", "--compress", "gzip"]  # fmt: skip
        p = subprocess.run(argv, env=b.env(**home), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == ["fastlayer: shared layer cache: no layer asked for (each "
                                     "known to the local cache, or without a portable key: "
                                     "no narHash in the graph)"]  # fmt: skip
