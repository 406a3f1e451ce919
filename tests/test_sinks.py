"""Image sinks: docker-archive (both specs), OCI layout dir and archive, compression.

Checked by the real tools (podman load, skopeo copy, umoci unpack) and by a
tiny v1-only reader that ignores manifest.json and follows parent chains.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import validators
import zstandard

import fastlayer
from fastlayer.emit import Owner, StreamSource, store_layer
from fastlayer.errors import FastlayerError
from fastlayer.sinks import open_sink
from fastlayer.sinks.base import split_ref
from fastlayer.sinks.compress import compressor

TAG = "reg.example:5000/team/app:v1"
NAMES = ["aaaa-base", "bbbb-lib", "cccc-app"]


def make_store(root: Path) -> list[str]:
    """A small store: files, an executable, a symlink, a long and a non-ASCII name."""
    paths = []
    for i, name in enumerate(NAMES):
        p = root / "nix" / "store" / (name[0] * 32 + name[4:])
        (p / "bin").mkdir(parents=True)
        (p / "share" / ("d" * 60) / ("e" * 60)).mkdir(parents=True)
        (p / "share" / ("d" * 60) / ("e" * 60) / "long.txt").write_text("long name\n")
        (p / "bin" / "tool").write_bytes(os.urandom(3000 + i) * 3)
        (p / "bin" / "tool").chmod(0o755)
        (p / "share" / "zürich").write_text(f"{i}\n" * 999)
        (p / "lib").symlink_to("share")
        paths.append("/" + str(p.relative_to(root)))
    return paths


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("store")
    return root, make_store(root)


def config_for(diff_ids: list[str]) -> dict:
    return {
        "created": "1970-01-01T00:00:01+00:00",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/nix/store/x/bin/tool"], "Env": ["A=1"]},
        "rootfs": {"diff_ids": diff_ids, "type": "layers"},
        "history": [{"created": "1970-01-01T00:00:01+00:00"} for _ in diff_ids],
    }


def write_image(store, out, fmt="docker-archive", compress="none", tags=(TAG,), owner=None):
    root, paths = store
    owner = owner or Owner()
    with open_sink(str(out), fmt, compress) as sink:
        layers = [sink.add_layer(StreamSource(store_layer([p], owner, str(root)))) for p in paths]
        record = sink.finish(config_for([x.diff_id for x in layers]), list(tags))
    return record


def tar_digest(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def legacy_layers(path: Path) -> tuple[list[str], dict]:
    """A v1-only reader: `repositories` -> top id -> `<id>/json` parents, bottom first.
    Returns each layer's sha256 (read through `<id>/layer.tar`) and the top json."""
    with tarfile.open(path) as tar:
        repos = json.load(tar.extractfile("repositories"))
        ((_, tags),) = repos.items()
        ((_, layer_id),) = tags.items()
        chain, top = [], None
        while layer_id:
            meta = json.load(tar.extractfile(f"{layer_id}/json"))
            assert meta["id"] == layer_id
            assert tar.extractfile(f"{layer_id}/VERSION").read() == b"1.0"
            top = top or meta
            chain.append(tar_digest(tar.extractfile(f"{layer_id}/layer.tar")))
            layer_id = meta.get("parent")
    return chain[::-1], top


def test_docker_archive_carries_both_specs(store, tmp_path):
    out = tmp_path / "img.tar"
    record = write_image(store, out)
    diff_ids = [x.diff_id for x in record.layers]
    archive = validators.read_docker_archive(out)
    assert archive.manifest[0]["RepoTags"] == [TAG]
    assert ["sha256:" + d for d in archive.layer_digests] == diff_ids
    assert "sha256:" + archive.config_digest == record.config_digest
    chain, top = legacy_layers(out)
    assert chain == diff_ids
    assert top["config"]["Cmd"] == ["/nix/store/x/bin/tool"] and "rootfs" not in top
    # legacy ids are the OCI spec's chain ids (computed here, not by fastlayer):
    # ChainID(L1) = DiffID(L1), ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " + DiffID(Ln))
    chains = [diff_ids[0]]
    for d in diff_ids[1:]:
        chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {d}".encode()).hexdigest())
    assert archive.layer_names == [c[7:] + "/layer.tar" for c in chains]
    # each layer's bytes are stored once
    with tarfile.open(out) as tar:
        stored = [m for m in tar.getmembers() if m.isreg() and m.name.endswith("layer.tar")]
        assert len(stored) == len(NAMES)
        repos = json.load(tar.extractfile("repositories"))
    assert list(repos) == ["reg.example:5000/team/app"] and list(repos[split_ref(TAG)[0]]) == ["v1"]


def test_podman_loads_docker_archive(store, tmp_path, fresh_podman):
    out = tmp_path / "img.tar"
    record = write_image(store, out)
    assert TAG in fresh_podman.load(out)
    info = fresh_podman.inspect(TAG)
    assert info["Id"] == record.config_digest[7:]
    assert info["RootFS"]["Layers"] == [x.diff_id for x in record.layers]
    assert info["Config"]["Env"] == ["A=1"]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compressed_docker_archive_is_the_same_tar(store, tmp_path, kind):
    plain = tmp_path / "img.tar"
    write_image(store, plain)
    packed = tmp_path / f"img.tar.{'gz' if kind == 'gzip' else 'zst'}"
    write_image(store, packed, compress="auto")  # compression chosen by extension
    if kind == "gzip":
        assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    else:
        with zstandard.ZstdDecompressor().stream_reader(packed.read_bytes()) as f:
            assert f.read() == plain.read_bytes()


def source_tree(store) -> dict:
    root, _ = store
    tree = validators.walk_tree(root / "nix" / "store", "/nix/store", uid=0, gid=0)
    return {k: v for k, v in tree.items()}


def unpacked_store(rootfs: Path) -> dict:
    tree = validators.walk_rootfs(rootfs)
    return {k: v for k, v in tree.items() if k.startswith("/nix/store/")}


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_umoci_unpacks_oci_dir(store, tmp_path, compress):
    validators.require_root("umoci keeps owners only as root")
    layout = tmp_path / "layout"
    record = write_image(store, layout, "oci-dir", compress)
    assert record.manifest_digest is not None
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"] == {
        "org.opencontainers.image.ref.name": "v1",  # what umoci --image DIR:v1 looks up
        "io.containerd.image.name": "reg.example:5000/team/app:v1",
    }
    manifest = json.loads((layout / "blobs/sha256" / record.manifest_digest[7:]).read_bytes())
    want = "application/vnd.oci.image.layer.v1.tar" + ("" if compress == "none" else "+gzip")
    assert {x["mediaType"] for x in manifest["layers"]} == {want}
    assert not [p for p in (layout / "blobs/sha256").iterdir() if p.name.startswith(".")]
    rootfs = validators.umoci_unpack(layout, "v1", tmp_path / "bundle")
    assert unpacked_store(rootfs) == source_tree(store)


def skopeo(tmp_path: Path, *args) -> None:
    exe = validators.require("skopeo")
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    validators.run_tool([exe, "--policy", policy, "copy", "--quiet", *args])


OCI_READS = [("oci-archive", "none"), ("oci-archive", "gzip"), ("oci-dir", "zstd"),
             ("oci-archive", "zstd")]  # fmt: skip


@pytest.mark.parametrize("fmt,compress", OCI_READS)
def test_skopeo_reads_oci(store, tmp_path, fmt, compress):
    validators.require_root("umoci keeps owners only as root")
    out = tmp_path / ("img.tar" if fmt == "oci-archive" else "layout")
    write_image(store, out, fmt, compress)
    transport = "oci-archive" if fmt == "oci-archive" else "oci"
    # umoci 0.4 reads no zstd: skopeo recompresses to gzip, decompressing ours
    skopeo(tmp_path, "--dest-compress-format", "gzip", "--dest-compress",
           f"{transport}:{out}:v1", f"oci:{tmp_path / 'copy'}:v1")  # fmt: skip
    rootfs = validators.umoci_unpack(tmp_path / "copy", "v1", tmp_path / "bundle")
    assert unpacked_store(rootfs) == source_tree(store)


def test_podman_loads_oci_archive_zstd(store, tmp_path, fresh_podman):
    out = tmp_path / "img.tar"
    record = write_image(store, out, "oci-archive", "zstd")
    fresh_podman.load(out)
    info = fresh_podman.inspect(record.config_digest[7:])
    assert info["RootFS"]["Layers"] == [x.diff_id for x in record.layers]


def test_same_image_id_in_every_format(store, tmp_path):
    ids = {
        write_image(store, tmp_path / f"o{i}", fmt, c).config_digest
        for i, (fmt, c) in enumerate(
            [("docker-archive", "none"), ("oci-dir", "gzip"), ("oci-archive", "zstd")]
        )  # fmt: skip
    }
    assert len(ids) == 1


def test_oci_dir_adds_to_existing_layout(store, tmp_path):
    layout = tmp_path / "layout"
    first = write_image(store, layout, "oci-dir", tags=["app:one"])
    second = write_image(store, layout, "oci-dir", "gzip", tags=["app:two"])
    refs = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in json.loads((layout / "index.json").read_text())["manifests"]
    }
    assert refs == {"one": first.manifest_digest, "two": second.manifest_digest}
    validators.umoci_unpack(layout, "one", tmp_path / "b1")
    validators.umoci_unpack(layout, "two", tmp_path / "b2")


class Failing:
    """A LayerSource that fails after writing some bytes."""

    size = 1 << 20

    def pump(self, write) -> str:
        write(memoryview(b"x" * 4096))
        raise FastlayerError("source changed while reading")


FAILING = [("docker-archive", "none"), ("docker-archive", "gzip"), ("oci-dir", "zstd"),
           ("oci-archive", "none")]  # fmt: skip


@pytest.mark.parametrize("fmt,compress", FAILING)
def test_failure_leaves_nothing(store, tmp_path, fmt, compress):
    out = tmp_path / "out" / "img"
    out.parent.mkdir()
    root, paths = store
    with pytest.raises(FastlayerError, match="source changed"):
        with open_sink(str(out), fmt, compress) as sink:
            sink.add_layer(StreamSource(store_layer(paths[:1], Owner(), str(root))))
            sink.add_layer(Failing())
    assert list(out.parent.iterdir()) == []


def test_failure_in_existing_layout_removes_new_blobs(store, tmp_path):
    layout = tmp_path / "layout"
    write_image(store, layout, "oci-dir", tags=["app:one"])
    before = sorted(p.name for p in (layout / "blobs/sha256").iterdir())
    root, paths = store
    with pytest.raises(FastlayerError):
        with open_sink(str(layout), "oci-dir", "gzip") as sink:
            sink.add_layer(StreamSource(store_layer(paths[:1], Owner(), str(root))))
            sink.add_layer(Failing())
    assert sorted(p.name for p in (layout / "blobs/sha256").iterdir()) == before


def test_unfinished_sink_is_an_error(store, tmp_path):
    out = tmp_path / "img.tar"
    with pytest.raises(RuntimeError, match="finish"):
        with open_sink(str(out)) as sink:
            sink.add_layer(StreamSource(store_layer(store[1][:1], Owner(), str(store[0]))))
    assert not out.exists()


def test_unknown_format_and_compression_are_user_errors(tmp_path):
    with pytest.raises(FastlayerError, match="oci-tarball"):
        with open_sink(str(tmp_path / "x"), "oci-tarball"):
            pass
    with pytest.raises(FastlayerError, match="lz4"):
        with open_sink(str(tmp_path / "x"), "docker-archive", "lz4"):
            pass
    with pytest.raises(FastlayerError, match="needs an output directory"):
        with open_sink(None, "oci-dir"):
            pass


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b) -> None:
        self.data += b


def compressed(kind: str, data: bytes, threads: int, chunk: int) -> bytes:
    out = Sink()
    comp = compressor(kind, out, threads)
    for i in range(0, len(data), chunk):
        comp.write(memoryview(data)[i : i + chunk])
    comp.close()
    return bytes(out.data)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compression_is_deterministic(kind):
    rng = random.Random(4)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(500)]
    data = b" ".join(rng.choices(words, k=1_200_000))[: 9 << 20]  # several blocks and jobs
    outputs = {
        compressed(kind, data, threads, chunk)
        for threads, chunk in [(1, 1 << 20), (2, 65536), (4, 1_000_003)]
    }
    assert len(outputs) == 1
    (out,) = outputs
    assert len(out) < len(data) // 2
    if kind == "gzip":
        assert gzip.decompress(out) == data
    else:
        assert zstandard.ZstdDecompressor().stream_reader(out).read() == data


def test_split_ref_keeps_registry_port():
    assert split_ref("reg.example:5000/team/app:tag") == ("reg.example:5000/team/app", "tag")
    assert split_ref("reg.example:5000/team/app") == ("reg.example:5000/team/app", "latest")
    assert split_ref("app") == ("app", "latest")


def test_pipe_output_matches_file_output(store, tmp_path):
    """docker-archive to a pipe (spooled) is byte-identical to a file (written back)."""
    root, paths = store
    here = Path(__file__).parent
    package_root = str(Path(fastlayer.__file__).parent.parent)  # installed or src/
    code = (
        f"import sys; sys.path[:0] = [{package_root!r}, {str(here)!r}]\n"
        f"import test_sinks as t; t.write_image((t.Path({str(root)!r}), {paths!r}), '-')\n"
    )
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    write_image(store, tmp_path / "img.tar")
    assert piped == (tmp_path / "img.tar").read_bytes()
